"""djinn servers as Ray actors: one per GPU (or per CPU, for tests and CPU machines),
named and detached so they outlive the command that started them, and restarted by
Ray, on the same port, when they die. Ray's named actors are the registry: a router
lists them to find the servers' addresses.

Needs Ray (pip install 'djinn[cluster]'); nothing else in djinn imports this module.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import msgspec

from djinn.errors import UsageError

NAMESPACE: Final = "djinn"
PREFIX: Final = "djinn-server-"
READY_TIMEOUT_S: Final = 300.0
PROBE_TIMEOUT_S: Final = 5.0


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise UsageError("djinn's cluster needs Ray: pip install 'djinn[cluster]'") from None
    return ray


def connect_ray(address: str = "") -> Any:
    """Ray, initialized: the session this process runs already, else the cluster at
    `address` (`auto`, the default, finds a local one)."""
    ray = ray_module()
    if not ray.is_initialized():
        address = address.removeprefix("djinn+ray://")  # the address `up` prints for clients
        probe(address)
        ray.init(
            address=address or "auto",
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    return ray


# HTTP/2's client preface and an empty SETTINGS frame: a Ray head (gRPC) answers with
# a SETTINGS frame of its own, anything else with something else or nothing.
_HTTP2_HELLO: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])


def probe(address: str) -> None:
    """Fail in seconds where Ray would retry for minutes: nothing listens at HOST:PORT,
    or what does is not a Ray head (it does not speak gRPC)."""
    if address in ("", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"cannot use the Ray address {address!r}: expected auto or HOST:PORT")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), PROBE_TIMEOUT_S)
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address}: {exc}") from None
    with sock:
        try:
            sock.sendall(_HTTP2_HELLO)
            reply = sock.recv(9)
        except OSError:
            reply = b""
    if len(reply) < 4 or reply[3] != 4:  # a frame's type is its fourth byte; 4 is SETTINGS
        raise ConnectionError(f"{address} is not a Ray cluster: it does not answer gRPC")


class ServerActor:
    """One djinn server, on an event loop in a thread of the actor's process."""

    def __init__(self, argv: list[str]) -> None:
        from djinn.server.__main__ import config_from, parser
        from djinn.server.app import Background

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        self._server = Background(config_from(parser().parse_args(argv)), READY_TIMEOUT_S)
        host, port = self._server.server.address
        if host in ("0.0.0.0", "::", ""):
            host = ray_module().util.get_node_ip_address()
        self._address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def address(self) -> str:
        return self._address

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        return self._server.call(lambda server: server.stats())

    def models(self) -> list[dict[str, Any]]:
        return self._server.call(
            lambda server: [msgspec.structs.asdict(m) for m in server.models.listing()]
        )


def up(
    servers: int,
    server_argv: Sequence[str] = (),
    *,
    ports: Sequence[int],
    gpus: bool = False,
    ray_address: str = "",
) -> list[str]:
    """Start `servers` server actors (server i on ports[i], with a store of its own
    under the --store given, if any) and wait until they listen; returns their
    addresses. Raises UsageError when a cluster is up already."""
    if len(ports) != servers:
        raise UsageError(f"cannot start {servers} servers on {len(ports)} ports")
    ray = connect_ray(ray_address)
    if handles(ray):
        raise UsageError("a djinn cluster is up already: `python -m djinn.cluster down` first")
    from djinn.server.__main__ import parser

    # read as the server reads them (--store=PATH too); each server's own values go
    # last on its command line, where argparse takes them over the shared ones
    given = parser().parse_args(list(server_argv))
    store: Path = given.store
    metrics = given.metrics_port  # like --port, server i serves metrics on the given port + i
    argv = list(server_argv)
    resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
    actor = ray.remote(ServerActor)
    started = []
    for index in range(servers):
        own = [*argv, "--port", str(ports[index]), "--store", str(store / f"server-{index}")]
        if metrics is not None:
            own += ["--metrics-port", str(metrics + index)]
        started.append(
            actor.options(
                name=f"{PREFIX}{index}",
                namespace=NAMESPACE,
                lifetime="detached",
                max_restarts=-1,
                max_concurrency=4,
                **resources,
            ).remote(own)
        )
    try:
        addresses: list[str] = ray.get(
            [a.address.remote() for a in started], timeout=READY_TIMEOUT_S
        )
    except Exception:
        for handle in started:
            ray.kill(handle, no_restart=True)
        raise
    return addresses


def handles(ray: Any) -> dict[str, Any]:
    """The server actors that exist now, by name."""
    names = sorted(
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == NAMESPACE and a["name"].startswith(PREFIX)
    )
    found = {}
    for name in names:
        try:
            found[name] = ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:  # killed between the listing and now
            continue
    return found


def ask(ray: Any, calls: dict[str, Any], timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """The results of the calls that answer within `timeout`, by name."""
    ready, _ = ray.wait(list(calls.values()), num_returns=len(calls), timeout=timeout)
    done = set(ready)
    out = {}
    for name, ref in calls.items():
        if ref in done:
            try:
                out[name] = ray.get(ref)
            except Exception:  # a dead actor's call fails; it is left out
                continue
    return out


def server_addresses(ray_address: str = "") -> list[str]:
    """The djinn addresses of the server actors that answer now."""
    ray = connect_ray(ray_address)
    found = handles(ray)
    answers = ask(ray, {name: h.address.remote() for name, h in found.items()})
    return [answers[name] for name in sorted(answers)]


def status(ray_address: str = "", interval: float = 1.0) -> list[dict[str, Any]]:
    """Every server actor: address, models, sessions and tokens/s (over `interval`)."""
    ray = connect_ray(ray_address)
    found = handles(ray)
    first = ask(ray, {name: h.stats.remote() for name, h in found.items()})
    began = time.monotonic()
    time.sleep(interval)
    second = ask(ray, {name: h.stats.remote() for name, h in found.items()})
    seconds = time.monotonic() - began
    addresses = ask(ray, {name: h.address.remote() for name, h in found.items()})
    models = ask(ray, {name: h.models.remote() for name, h in found.items()})
    rows = []
    for name in found:
        stats = second.get(name)
        if stats is None:
            rows.append({"name": name, "alive": False})
            continue
        before = first.get(name, stats)
        done = sum(stats["tokens"].values()) - sum(before["tokens"].values())
        rows.append(
            {
                "name": name,
                "alive": True,
                "address": addresses.get(name, "?"),
                "sessions": stats["sessions"],
                "queued_calls": stats["queued_calls"],
                "tokens_per_s": done / seconds,
                "models": models.get(name, []),
            }
        )
    return rows


def down(ray_address: str = "") -> int:
    """Stop every server actor; returns how many there were."""
    ray = connect_ray(ray_address)
    found = handles(ray)
    for handle in found.values():
        ray.kill(handle, no_restart=True)
    return len(found)
