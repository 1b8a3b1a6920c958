"""The client side of a connection on an event loop: handshake, request ids, futures, timeouts.

Many calls may be in flight at once; each response finds its future by
request id, in whatever order the server answers. A lost connection fails
every pending call at once with ConnectionLostError. The pieces both client
connections share (framing a request, reading a reply) live here too.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

from djinn.errors import (
    ConnectionLostError,
    DjinnError,
    DjinnTimeoutError,
    ProtocolError,
    RemoteProtocolError,
    error_from_wire,
)
from djinn.net import payload
from djinn.net.buffers import shared_pool
from djinn.net.frame import DEFAULT_LIMITS, Frame, FrameKind, Limits, wire_size
from djinn.net.handshake import ClientHandshake
from djinn.net.protocol import Counters, FrameProtocol

# Request id 0 is reserved for handshake frames.
HANDSHAKE_ID = 0
_REPLY_KINDS = frozenset(
    {FrameKind.RESPONSE, FrameKind.ERROR, FrameKind.CHALLENGE, FrameKind.WELCOME}
)


@dataclass(slots=True)
class Meter:
    """Bytes and calls of one user of a shared connection (a RemoteModel, say)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0


def request_frame(request_id: int, method: str, args: tuple[Any, ...]) -> Frame:
    """Raises UsageError for arguments that cannot travel."""
    control, buffers = payload.dumps((method, args))
    return Frame(FrameKind.REQUEST, request_id, control, buffers)


def handshake_frame(kind: FrameKind, message: dict[str, Any]) -> Frame:
    return Frame(kind, HANDSHAKE_ID, payload.dumps(message)[0])


def decode_reply(frame: Frame) -> Any:
    """The value of a reply frame, or the typed error it carries."""
    if frame.kind not in _REPLY_KINDS:
        raise RemoteProtocolError(f"cannot read reply: unexpected {frame.kind.name} frame")
    value = payload.loads(frame.control, frame.buffers)
    if frame.kind is FrameKind.ERROR:
        if not isinstance(value, dict):
            raise RemoteProtocolError("cannot read error: malformed error frame")
        op = value.get("op")
        raise error_from_wire(
            str(value.get("code", "")),
            str(value.get("message", "")),
            str(value.get("type", "")),
            str(value.get("traceback", "")),
            op if type(op) is int else None,
        )
    return value


def timeout_message(method: str, address: str, timeout: float) -> str:
    return f"cannot finish {method}: no answer from {address} within {timeout:g}s"


def _expire(future: asyncio.Future[Frame], message: str) -> None:
    if not future.done():
        future.set_exception(DjinnTimeoutError(message))


class RpcConnection:
    """An authenticated connection to a djinn server, for use on one event loop."""

    def __init__(self, address: str, limits: Limits) -> None:
        self.address = address
        self.server_info: dict[str, Any] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._closed: DjinnError | None = None
        self.protocol = FrameProtocol(self, shared_pool(), limits)

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        token: str | None,
        timeout: float,
        limits: Limits = DEFAULT_LIMITS,
    ) -> RpcConnection:
        """Connect and authenticate.

        Raises ConnectionLostError (refused, unreachable), DjinnTimeoutError,
        AuthenticationError, VersionMismatchError.
        """
        loop = asyncio.get_running_loop()
        conn = cls(f"{host}:{port}", limits)
        try:
            await asyncio.wait_for(conn._connect(loop, host, port, token), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            conn.protocol.abort(ConnectionLostError("handshake timed out"))
            raise DjinnTimeoutError(
                f"cannot connect to {conn.address}: no answer within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise ConnectionLostError(f"cannot connect to {conn.address}: {exc}") from None
        except BaseException:
            conn.protocol.abort(ConnectionLostError("handshake failed"))
            raise
        return conn

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int, token: str | None
    ) -> None:
        await loop.create_connection(lambda: self.protocol, host, port)
        shake = ClientHandshake(token, self.address)
        challenge = await self._exchange(handshake_frame(FrameKind.HELLO, shake.hello()))
        welcome = await self._exchange(handshake_frame(FrameKind.AUTH, shake.answer(challenge)))
        self.server_info = shake.welcome(welcome)

    async def _exchange(self, frame: Frame) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._pending[HANDSHAKE_ID] = future
        try:
            self.protocol.send(frame)
            reply = await future
        finally:
            self._pending.pop(HANDSHAKE_ID, None)
        return decode_reply(reply)

    async def call(
        self, method: str, args: tuple[Any, ...], *, timeout: float, meter: Meter | None = None
    ) -> Any:
        """Run `method(*args)` on the server and return its result.

        Raises the typed error the server reported, ConnectionLostError,
        DjinnTimeoutError, or UsageError for arguments that cannot travel.
        """
        if self._closed is not None:
            raise ConnectionLostError(f"cannot call {method}: {self._closed}")
        loop = asyncio.get_running_loop()
        request_id = next(self._ids)
        frame = request_frame(request_id, method, args)
        future: asyncio.Future[Frame] = loop.create_future()
        self._pending[request_id] = future
        deadline = loop.time() + timeout
        message = timeout_message(method, self.address, timeout)
        timer = loop.call_at(deadline, _expire, future, message)
        try:
            sent = self.protocol.send(frame)
            if meter is not None:
                meter.bytes_sent += sent
                meter.calls += 1
            if self.protocol.paused:
                await asyncio.wait_for(self.protocol.drain(), max(0.0, deadline - loop.time()))
            reply = await future
        except (TimeoutError, asyncio.TimeoutError):
            raise DjinnTimeoutError(message) from None
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)
        if meter is not None:
            meter.bytes_received += wire_size(reply)
        return decode_reply(reply)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def counters(self) -> Counters:
        return self.protocol.counters

    @property
    def is_open(self) -> bool:
        return self._closed is None

    def close(self) -> None:
        self._fail(ConnectionLostError("the client closed the connection"))
        self.protocol.close()

    # -- Peer interface ----------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        future = self._pending.get(frame.request_id)
        if future is not None and not future.done():
            future.set_result(frame)
        elif frame.request_id == HANDSHAKE_ID and frame.kind is FrameKind.ERROR:
            try:  # the server's word on why it is about to close the connection
                decode_reply(frame)
            except DjinnError as exc:
                self._fail(exc)
        # else: the call timed out and was forgotten; drop the late answer

    def on_protocol_error(self, exc: ProtocolError) -> None:
        self.protocol.abort(exc)

    def on_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, DjinnError):
            self._fail(exc)
        else:
            reason = f" ({exc})" if exc else ""
            self._fail(
                ConnectionLostError(
                    f"cannot finish call: connection to {self.address} lost{reason}"
                )
            )

    def _fail(self, error: DjinnError) -> None:
        if self._closed is None:
            self._closed = error
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
