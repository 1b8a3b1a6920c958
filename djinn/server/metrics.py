"""Prometheus metrics on --metrics-port: what an operator graphs and a cluster router
reads. prometheus_client serves them; a collector reads the server's own counters at
scrape time, on the event loop where they change, so a scrape never sees a table
half-updated and the hot path pays nothing.

Needs prometheus_client (pip install 'djinn[metrics]').
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from djinn.errors import UsageError

if TYPE_CHECKING:
    from djinn.server.app import Server

SCRAPE_TIMEOUT_S = 5.0


class _Collector:
    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop

    async def _snapshot(self) -> dict[str, Any]:
        server = self._server
        names = {fp: name for name, fp in server.models.names.items()}
        return {
            "stats": server.stats(),
            "tokens": dict(server.device.tokens),
            "calls": dict(server.calls),
            "errors": dict(server.errors),
            "traffic": server.traffic(),
            "models": [(fp, names.get(fp, ""), n) for fp, n in server.models.resident()],
        }

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        future = asyncio.run_coroutine_threadsafe(self._snapshot(), self._loop)
        snap = future.result(timeout=SCRAPE_TIMEOUT_S)
        stats = snap["stats"]
        tokens = CounterMetricFamily(
            "djinn_tokens", "Token positions run through a model", labels=["kind"]
        )
        for kind in ("prefill", "decode", "generated"):
            tokens.add_metric([kind], snap["tokens"].get(kind, 0))
        yield tokens
        for name, key, doc in (
            ("djinn_sessions", "sessions", "Open sessions"),
            ("djinn_connections", "connections", "Open client connections"),
            ("djinn_queued_calls", "queued_calls", "Calls waiting for the device"),
            ("djinn_session_state_bytes", "resident_bytes", "Bytes of session state held"),
        ):
            yield GaugeMetricFamily(name, doc, value=stats[key])
        busy = CounterMetricFamily(
            "djinn_device_busy_seconds", "Seconds the device worked", value=stats["device_busy_s"]
        )
        yield busy
        models = GaugeMetricFamily(
            "djinn_model_resident_bytes", "Weights in memory, per model", labels=["model", "name"]
        )
        for fingerprint, name, nbytes in snap["models"]:
            models.add_metric([fingerprint[:12], name], nbytes)
        yield models
        wire = CounterMetricFamily(
            "djinn_wire_bytes", "Bytes on the wire, headers included", labels=["direction"]
        )
        for direction, nbytes in snap["traffic"].items():
            wire.add_metric([direction], nbytes)
        yield wire
        calls = CounterMetricFamily("djinn_calls", "Requests, by type", labels=["type"])
        for kind, count in sorted(snap["calls"].items()):
            calls.add_metric([kind], count)
        yield calls
        errors = CounterMetricFamily("djinn_errors", "Failed requests, by code", labels=["code"])
        for code, count in sorted(snap["errors"].items()):
            errors.add_metric([code], count)
        yield errors
        memory = GaugeMetricFamily("djinn_device_memory_bytes", "Device memory", labels=["kind"])
        for kind in ("total", "free", "allocated"):
            value = stats.get(f"device_{kind}_bytes")
            if value is not None:
                memory.add_metric([kind], value)
        yield memory


def serve_metrics(server: Server, host: str, port: int) -> tuple[Any, int]:
    """Start the exporter's HTTP thread; returns (its server, to shut down; its port)."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        raise UsageError(
            "cannot serve --metrics-port: prometheus_client is not installed "
            "(pip install 'djinn[metrics]')"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(server, asyncio.get_running_loop()))
    try:
        http, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise UsageError(f"cannot serve metrics on {host}:{port}: {exc}") from None
    return http, int(http.server_address[1])
