"""The server process: listening socket, shared state, shutdown."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

import djinn
from djinn import messages
from djinn.errors import UsageError
from djinn.net.frame import PROTOCOL_VERSION
from djinn.net.protocol import new_event_loop
from djinn.server.config import ServerConfig
from djinn.server.connection import Refusal, ServerConnection
from djinn.server.device import Device
from djinn.server.metrics import serve_metrics
from djinn.server.models import ModelStore
from djinn.server.sessions import Session, SessionRegistry

T = TypeVar("T")
RATE_INTERVAL_S = 1.0  # tokens_per_s in server_stats is over this window
log = logging.getLogger("djinn.server")


class Server:
    """Shared state of one server: config, device, model store, sessions, connections."""

    def __init__(self, config: ServerConfig) -> None:
        config.check()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.config = config
        self.device = Device(
            config.device,
            config.receive_budget_bytes,
            config.max_queued,
            batching=config.batching,
            max_batch=config.max_batch,
            batch_wait_us=config.batch_wait_us,
        )
        self.models = ModelStore(config, self.device)
        self.sessions = SessionRegistry(config)
        self.sessions.on_close = self._on_session_closed
        self.connections: set[ServerConnection] = set()
        self.calls: collections.Counter[str] = collections.Counter()  # by request type
        self.errors: collections.Counter[str] = collections.Counter()  # by error code
        self.closed_traffic: collections.Counter[str] = collections.Counter()  # bytes, gone
        self._listener: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._rater: asyncio.Task[None] | None = None
        self.tokens_per_s = 0.0  # over the last RATE_INTERVAL_S
        self._metrics: Any = None  # the exporter's HTTP server, with --metrics-port
        self.metrics_port: int | None = None
        self.address: tuple[str, int] = (config.host, config.port)

    def _on_session_closed(self, session: Session) -> None:
        if session.model is not None:
            self.models.release(session.model)

    async def start(self) -> tuple[str, int]:
        """Bind and start accepting; returns the real (host, port)."""
        loop = asyncio.get_running_loop()
        if self.config.metrics_port is not None:  # first: a port in use leaves nothing bound
            self._metrics, self.metrics_port = serve_metrics(
                self, self.config.host, self.config.metrics_port
            )
        try:
            self._listener = await loop.create_server(
                self._accept, self.config.host, self.config.port, reuse_address=True
            )
        except BaseException as exc:
            if self._metrics is not None:
                self._metrics.shutdown()
                self._metrics.server_close()
            if isinstance(exc, OSError):
                where = f"{self.config.host}:{self.config.port}"
                raise UsageError(f"cannot listen on {where}: {exc}") from None
            raise
        host, port = self._listener.sockets[0].getsockname()[:2]
        self.address = (host, port)
        self._sweeper = loop.create_task(self.sessions.sweep_forever())
        self._rater = loop.create_task(self._rate_forever())
        return self.address

    def _accept(self) -> Any:
        if len(self.connections) >= self.config.max_connections:
            return Refusal(self.config.max_connections)
        conn = ServerConnection(self)
        self.connections.add(conn)
        return conn.protocol

    async def _rate_forever(self) -> None:
        last, since = 0, time.monotonic()
        while True:
            await asyncio.sleep(RATE_INTERVAL_S)
            total, now = sum(self.device.tokens.values()), time.monotonic()
            self.tokens_per_s = (total - last) / (now - since)
            last, since = total, now

    def traffic(self) -> dict[str, int]:
        """Bytes on the wire since the start, both directions, headers included."""
        live = [conn.protocol.counters for conn in self.connections]
        return {
            "sent": self.closed_traffic["sent"] + sum(c.bytes_sent for c in live),
            "received": self.closed_traffic["received"] + sum(c.bytes_received for c in live),
        }

    def info(self) -> messages.ServerInfo:
        """Facts a client learns in the handshake."""
        return messages.ServerInfo(
            version=djinn.__version__,
            protocol=PROTOCOL_VERSION,
            device=str(self.device.device),
            dtype=self.config.dtype,
            trust_remote_code=self.config.trust_remote_code,
        )

    def stats(self) -> dict[str, Any]:
        turn = self.device.turn
        return {
            "version": djinn.__version__,
            "device": str(self.device.device),
            "dtype": self.config.dtype,
            "connections": len(self.connections),
            "sessions": len(self.sessions),
            "models": len(self.models),
            "resident_bytes": self.sessions.resident_bytes,
            "model_bytes": self.models.resident_bytes,
            "receive_in_use_bytes": self.device.receive_pool.in_use_bytes,
            "queued_calls": self.device.queued,
            "device_busy_s": turn.held_s,
            "device_jobs": self.device.jobs,
            "device_jobs_inline": self.device.inline_jobs,
            "tokens": dict(self.device.tokens),
            "tokens_per_s": self.tokens_per_s,
            "device_held": turn.held,
            "store_loading": self.models.loading,
            "process_cpu_s": time.process_time(),
            **self.device.batcher.stats(),
            "compiled": self.models.compiled(),
            **self.device.memory(),
        }

    async def close(self) -> None:
        """Stop accepting, drop every connection and session, release the device."""
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._rater is not None:
            self._rater.cancel()
        if self._metrics is not None:
            self._metrics.shutdown()
            self._metrics.server_close()
        tasks = [task for conn in list(self.connections) for task in conn.close()]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await asyncio.sleep(0)
        self.sessions.close_all()
        self.models.close()
        self.device.shutdown()


def serve(config: ServerConfig) -> None:
    """Run a server until SIGINT or SIGTERM."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(config))
    finally:
        loop.close()


async def _serve(config: ServerConfig) -> None:
    server = Server(config)
    host, port = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"djinn server {djinn.__version__} listening on {shown}:{port} "
        f"(device {server.device.device}, torch {torch.__version__}, "
        f"auth {'token' if config.token else 'off'}, store {config.store})",
        flush=True,
    )
    if server.metrics_port is not None:
        print(f"metrics on http://{shown}:{server.metrics_port}/metrics", flush=True)
    await stop.wait()
    print("djinn server shutting down", file=sys.stderr, flush=True)
    await server.close()


class Background:
    """A server on an event loop in a thread of this process: how a cluster actor hosts
    one (a Ray actor's main thread belongs to Ray, and signals to the actor's process)."""

    def __init__(self, config: ServerConfig, timeout: float = 600.0) -> None:
        """Returns once the server listens; `timeout` covers fingerprinting its --model
        folders, which a first start reads whole."""
        self._loop = new_event_loop()
        self._stop = asyncio.Event()
        started: concurrent.futures.Future[Server] = concurrent.futures.Future()
        self._thread = threading.Thread(
            target=self._run, args=(config, started), name="djinn-server", daemon=True
        )
        self._thread.start()
        self.server = started.result(timeout=timeout)

    def _run(self, config: ServerConfig, started: concurrent.futures.Future[Server]) -> None:
        asyncio.set_event_loop(self._loop)

        async def main() -> None:
            try:
                server = Server(config)
                await server.start()
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(server)
            await self._stop.wait()
            await server.close()

        try:
            self._loop.run_until_complete(main())
        finally:
            self._loop.close()

    def call(self, fn: Callable[[Server], T]) -> T:
        """`fn(server)` on the server's loop, where its state changes."""

        async def run() -> T:
            return fn(self.server)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)
