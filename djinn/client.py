"""Connecting to a djinn server: `connect()` for plain code, `AsyncClient` for asyncio code.

`Client` does its socket I/O in the calling thread (no event loop, no
thread hop per call); `AsyncClient` keeps many calls in flight on one
connection. Both drive the same protocol core (djinn.net.core).
"""

from __future__ import annotations

import os
import time
from typing import Any, Final, TypeVar

import msgspec

from djinn import messages
from djinn.errors import RemoteProtocolError, UsageError
from djinn.net.aio import AsyncConnection, Partials
from djinn.net.blocking import BlockingConnection
from djinn.net.codec import wire_value
from djinn.net.core import Meter
from djinn.net.frame import DEFAULT_LIMITS, Limits
from djinn.net.link import Link

DEFAULT_PORT: Final = 5556
DEFAULT_TIMEOUT: Final = 120.0  # seconds a call may take before DjinnTimeoutError
CONNECT_TIMEOUT: Final = 10.0

T = TypeVar("T")
R = TypeVar("R", bound=messages.Message)


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


def expect(reply: messages.Message, kind: type[R]) -> R:
    """The reply as the type its request promises; RemoteProtocolError otherwise."""
    if not isinstance(reply, kind):
        raise RemoteProtocolError(
            f"cannot read reply: expected {kind.__name__}, got {type(reply).__name__}"
        )
    return reply


class _Connected:
    """What both clients read off their connection without a round trip."""

    def __init__(self, connection: BlockingConnection | AsyncConnection, timeout: float) -> None:
        self._conn = connection
        self.timeout = timeout

    @property
    def address(self) -> str:
        return self._conn.address

    @property
    def server_info(self) -> dict[str, Any]:
        """What the server said about itself in the handshake (version, device, dtype)."""
        info: dict[str, Any] = msgspec.structs.asdict(self._conn.server_info)
        return info

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

    def request(
        self,
        message: messages.Message,
        kind: type[R],
        *,
        timeout: float | None = None,
        meter: Meter | None = None,
        on_partial: Partials | None = None,
    ) -> R:
        """Low level: send a message of djinn.messages, wait for its reply of `kind`."""
        reply = self._conn.call(
            message,
            timeout=self.timeout if timeout is None else timeout,
            meter=meter,
            on_partial=on_partial,
        )
        return expect(reply, kind)

    @property
    def connection(self) -> BlockingConnection:
        return self._conn

    def ping(self, *, timeout: float | None = None) -> float:
        """One small round trip; returns its duration in seconds."""
        start = time.perf_counter()
        self.request(messages.Ping(), messages.Done, timeout=timeout)
        return time.perf_counter() - start

    def echo(self, obj: T, *, timeout: float | None = None) -> T:
        """Send `obj` to the server and back (tensors, arrays, bytes, str, numbers, containers)."""
        reply = self.request(messages.Echo(wire_value(obj)), messages.Echoed, timeout=timeout)
        value: T = reply.value
        return value

    def server_stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The server's view: sessions, models, resident bytes, device memory, batching,
        and the time its device has spent working (device_busy_s, device_jobs)."""
        return self.request(messages.Stats(), messages.StatsReply, timeout=timeout).stats

    def models(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The models the server holds: name, fingerprint, parameters, dtype, and whether
        each is resident on the device or only in the store."""
        reply = self.request(messages.Models(), messages.ModelsReply, timeout=timeout)
        return [msgspec.structs.asdict(m) for m in reply.models]

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

    _conn: AsyncConnection

    def __init__(self, connection: AsyncConnection, timeout: float) -> None:
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
        conn = await AsyncConnection.open(
            host, port, token=_token(token), timeout=connect_timeout, limits=limits
        )
        return cls(conn, timeout)

    async def request(
        self,
        message: messages.Message,
        kind: type[R],
        *,
        timeout: float | None = None,
        meter: Meter | None = None,
        on_partial: Partials | None = None,
    ) -> R:
        """Low level: send a message of djinn.messages, wait for its reply of `kind`."""
        reply = await self._conn.call(
            message,
            timeout=self.timeout if timeout is None else timeout,
            meter=meter,
            on_partial=on_partial,
        )
        return expect(reply, kind)

    async def ping(self, *, timeout: float | None = None) -> float:
        start = time.perf_counter()
        await self.request(messages.Ping(), messages.Done, timeout=timeout)
        return time.perf_counter() - start

    async def echo(self, obj: T, *, timeout: float | None = None) -> T:
        reply = await self.request(messages.Echo(wire_value(obj)), messages.Echoed, timeout=timeout)
        value: T = reply.value
        return value

    async def server_stats(self, *, timeout: float | None = None) -> dict[str, Any]:
        reply = await self.request(messages.Stats(), messages.StatsReply, timeout=timeout)
        return reply.stats

    async def models(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        reply = await self.request(messages.Models(), messages.ModelsReply, timeout=timeout)
        return [msgspec.structs.asdict(m) for m in reply.models]

    async def close(self) -> None:
        self._conn.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
