"""Placing a new session on a server of a cluster, and finding one again after a loss.

A cluster address is either `djinn+ray://RAY_ADDRESS` (the servers `python -m
djinn.cluster up` started, read from Ray; RAY_ADDRESS may be empty for the Ray
this process already runs, or `auto`) or a plain list `host:port,host:port`,
which needs no Ray on the client. Placement asks each server for its models and
load, over djinn's own wire, and picks: the model already in memory, then on disk,
then the fewest sessions and queued calls, then the most memory headroom. The
session then talks to that server directly: there is no routing hop per call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Final, TypeGuard

from djinn.client import connect
from djinn.errors import ConnectionLostError, DjinnError, UsageError

SCHEME: Final = "djinn+ray://"
PROBE_TIMEOUT_S: Final = 5.0

log = logging.getLogger("djinn")


def is_cluster(address: object) -> TypeGuard[str]:
    return isinstance(address, str) and (address.startswith(SCHEME) or "," in address)


class Router:
    def __init__(self, address: str, token: str | None = None) -> None:
        if not is_cluster(address):
            raise UsageError(f"cannot route through {address!r}: not a cluster address")
        self.address = address
        self._token = token

    def servers(self) -> list[str]:
        """The servers' djinn addresses, as the cluster knows them now."""
        if self.address.startswith(SCHEME):
            from djinn.cluster.actors import server_addresses

            return server_addresses(self.address.removeprefix(SCHEME))
        return [part.strip() for part in self.address.split(",") if part.strip()]

    def place(self, model: str | None, avoid: Iterable[str] = ()) -> str:
        """The best server for a session on `model` (a fingerprint or a name), among those
        that answer. Raises ConnectionLostError when none does."""
        avoided = set(avoid)
        ranked: list[tuple[tuple[Any, ...], str]] = []
        for address in self.servers():
            try:
                with connect(
                    address,
                    token=self._token,
                    timeout=PROBE_TIMEOUT_S,
                    connect_timeout=PROBE_TIMEOUT_S,
                ) as client:
                    stats = client.server_stats()
                    models = client.models()
            except DjinnError as exc:
                log.info("cluster: %s does not answer (%s)", address, exc)
                continue
            held = [m for m in models if model in (m["fingerprint"], m["name"])]
            resident = any(m["resident"] for m in held)
            headroom = stats.get("device_free_bytes", -stats["model_bytes"])
            load = stats["sessions"] + stats["queued_calls"]
            rank = (address in avoided, not resident, not held, load, -headroom)
            ranked.append((rank, address))
        if not ranked:
            raise ConnectionLostError(f"cannot reach any server of the cluster {self.address}")
        best = min(ranked)[1]
        log.info("cluster: session on %s placed on %s", (model or "")[:12], best)
        return best
