"""Connecting to a djinn server: `connect()` for plain code, `AsyncClient` for asyncio code.

`Client` does its socket I/O in the calling thread (no event loop, no
thread hop per call) and runs one call at a time; `AsyncClient` keeps many
calls in flight on one connection.
"""

from __future__ import annotations

import os
import time
from typing import Any, Final, TypeVar

from djinn.errors import UsageError
from djinn.net.blocking import BlockingConnection
from djinn.net.frame import DEFAULT_LIMITS, Limits
from djinn.net.link import Link
from djinn.net.rpc import Meter, RpcConnection

DEFAULT_PORT: Final = 5556
DEFAULT_TIMEOUT: Final = 120.0  # seconds a call may take before DjinnTimeoutError
CONNECT_TIMEOUT: Final = 10.0

T = TypeVar("T")


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """'host:port', '[v6]:port', 'host' (port 5556) or a (host, port) tuple."""
    if isinstance(address, tuple):
        return address[0], int(address[1])
    text = address.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":") or str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, str(DEFAULT_PORT)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"cannot parse server address {address!r}: expected 'host:port'")
    return host, int(port_text)


def _token(token: str | None) -> str | None:
    return token if token is not None else (os.environ.get("DJINN_TOKEN") or None)


class _Connected:
    """What both clients read off their connection without a round trip."""

    def __init__(self, connection: BlockingConnection | RpcConnection, timeout: float) -> None:
        self._conn = connection
        self.timeout = timeout

    @property
    def address(self) -> str:
        return self._conn.address

    @property
    def server_info(self) -> dict[str, Any]:
        """What the server said about itself in the handshake (version, device)."""
        return dict(self._conn.server_info)

    def stats(self) -> dict[str, int]:
        """This connection's traffic on the wire, headers included, and calls in flight."""
        return {**self._conn.counters.as_dict(), "calls_in_flight": self._conn.in_flight}

    @property
    def is_open(self) -> bool:
        return self._conn.is_open


class Client(_Connected):
    """A connection to a djinn server; create it with `djinn.connect`.

    Every call takes a `timeout` (default: the client's) and raises
    DjinnTimeoutError past it; a dead server raises ConnectionLostError at once.
    """

    _conn: BlockingConnection

    def __init__(self, connection: BlockingConnection, timeout: float) -> None:
        super().__init__(connection, timeout)

    def call(
        self, method: str, *args: Any, timeout: float | None = None, meter: Meter | None = None
    ) -> Any:
        """Low level: run a server method. `meter` accumulates this call's traffic."""
        return self._conn.call(
            method, args, timeout=self.timeout if timeout is None else timeout, meter=meter
        )

    def ping(self, *, timeout: float | None = None) -> float:
        """One small round trip; returns its duration in seconds."""
        start = time.perf_counter()
        self.call("ping", timeout=timeout)
        return time.perf_counter() - start

    def echo(self, obj: T, *, timeout: float | None = None) -> T:
        """Send `obj` to the server and back (tensors, arrays, bytes, str, numbers, containers)."""
        result: T = self.call("echo", obj, timeout=timeout)
        return result

    def server_stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's view: sessions, models, resident bytes, device memory, and the
        time its device thread has spent working (device_busy_s, device_jobs)."""
        result: dict[str, Any] = self.call("server_stats", timeout=timeout)
        return result

    def close(self) -> None:
        """Close the connection; the server frees this client's sessions."""
        self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(
    address: str | tuple[str, int] = f"127.0.0.1:{DEFAULT_PORT}",
    *,
    token: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
    limits: Limits = DEFAULT_LIMITS,
    link: Link | None = None,
) -> Client:
    """Connect to a djinn server and authenticate (token: argument, else $DJINN_TOKEN).

    `timeout` bounds every later call; `link` paces this client's sends to
    emulate a network (the server paces its own with --link-gbps). Raises
    ConnectionLostError, DjinnTimeoutError, AuthenticationError,
    VersionMismatchError, UsageError.
    """
    host, port = parse_address(address)
    conn = BlockingConnection.open(
        host, port, token=_token(token), timeout=connect_timeout, limits=limits, link=link
    )
    return Client(conn, timeout)


class AsyncClient(_Connected):
    """A connection to a djinn server for asyncio code, with many calls in flight.

    Create it with `await AsyncClient.connect(address)`; same calls as Client.
    """

    _conn: RpcConnection

    def __init__(self, connection: RpcConnection, timeout: float) -> None:
        super().__init__(connection, timeout)

    @classmethod
    async def connect(
        cls,
        address: str | tuple[str, int] = f"127.0.0.1:{DEFAULT_PORT}",
        *,
        token: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        limits: Limits = DEFAULT_LIMITS,
    ) -> AsyncClient:
        """Connect and authenticate; raises as `connect` does."""
        host, port = parse_address(address)
        conn = await RpcConnection.open(
            host, port, token=_token(token), timeout=connect_timeout, limits=limits
        )
        return cls(conn, timeout)

    async def call(
        self, method: str, *args: Any, timeout: float | None = None, meter: Meter | None = None
    ) -> Any:
        """Low level: run a server method. `meter` accumulates this call's traffic."""
        return await self._conn.call(
            method, args, timeout=self.timeout if timeout is None else timeout, meter=meter
        )

    async def ping(self, *, timeout: float | None = None) -> float:
        start = time.perf_counter()
        await self.call("ping", timeout=timeout)
        return time.perf_counter() - start

    async def echo(self, obj: T, *, timeout: float | None = None) -> T:
        result: T = await self.call("echo", obj, timeout=timeout)
        return result

    async def server_stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self.call("server_stats", timeout=timeout)
        return result

    async def close(self) -> None:
        self._conn.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
