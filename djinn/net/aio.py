"""A ClientCore driven by an event loop: many calls in flight on one connection.

Each request's reply finds its future by request id, in whatever order the
server answers. A lost connection fails every pending call at once with
ConnectionLostError; a call that times out or is cancelled sends CANCEL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from djinn import messages
from djinn.errors import (
    ConnectionLostError,
    DjinnError,
    DjinnTimeoutError,
)
from djinn.net.buffers import shared_pool
from djinn.net.core import Answer, Broken, ClientCore, Driver, Meter, timeout_message
from djinn.net.frame import DEFAULT_LIMITS, Limits
from djinn.net.protocol import no_delay

Partials = Callable[[messages.Streamed], None]


class AsyncConnection(Driver, asyncio.BufferedProtocol):
    """An authenticated connection to a djinn server, for use on one event loop."""

    def __init__(self, core: ClientCore) -> None:
        self.address = core.address
        self._core = core
        self._transport: asyncio.Transport | None = None
        self._pending: dict[int, tuple[asyncio.Future[messages.Message], Partials | None]] = {}
        self._ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed: DjinnError | None = None

    @classmethod
    async def open(
        cls,
        host: str,
        port: int,
        *,
        token: str | None,
        timeout: float,
        limits: Limits = DEFAULT_LIMITS,
    ) -> AsyncConnection:
        """Connect and authenticate.

        Raises ConnectionLostError (refused, unreachable), DjinnTimeoutError,
        AuthenticationError, VersionMismatchError.
        """
        conn = cls(ClientCore(f"{host}:{port}", token, shared_pool(), limits))
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, host, port), timeout)
            await asyncio.wait_for(asyncio.shield(conn._ready), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            conn._abort(ConnectionLostError("handshake timed out"))
            raise DjinnTimeoutError(
                f"cannot connect to {conn.address}: no answer within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise ConnectionLostError(f"cannot connect to {conn.address}: {exc}") from None
        except BaseException:
            conn._abort(ConnectionLostError("handshake failed"))
            raise
        return conn

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def is_open(self) -> bool:
        return self._closed is None

    async def call(
        self,
        message: messages.Message,
        *,
        timeout: float,
        meter: Meter | None = None,
        on_partial: Partials | None = None,
    ) -> messages.Message:
        """Send a request and wait for its reply; `on_partial` gets its STREAM frames.

        Raises the typed error the server reported, ConnectionLostError,
        DjinnTimeoutError, or UsageError for values that cannot travel.
        """
        what = type(message).__name__.lower()
        if self._closed is not None:
            raise ConnectionLostError(f"cannot {what}: {self._closed}")
        request_id = self._core.request(message, meter)
        future: asyncio.Future[messages.Message] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (future, on_partial)
        self._flush()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except (TimeoutError, asyncio.TimeoutError):
            raise DjinnTimeoutError(timeout_message(what, self.address, timeout)) from None
        finally:
            if self._pending.pop(request_id, None) is not None:  # abandoned: tell the server
                self._core.cancel(request_id)
                self._flush()

    def _flush(self) -> None:
        buffers = self._core.outgoing()
        if buffers and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(buffers)

    def close(self) -> None:
        self._fail(ConnectionLostError("the client closed the connection"))
        if self._transport is not None:
            self._transport.close()

    def _abort(self, reason: DjinnError) -> None:
        self._fail(reason)
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio callbacks ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = no_delay(transport)
        self._flush()  # the HELLO

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._core.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._core.buffer_updated(nbytes)
            while (event := self._core.next_event()) is not None:
                self._dispatch(event)
            if self._core.ready and not self._ready.done():
                self._ready.set_result(None)
            self._flush()
        except DjinnError as exc:
            if not self._ready.done():
                self._ready.set_exception(exc)
            self._abort(exc)

    def _dispatch(self, event: Any) -> None:
        if isinstance(event, Broken):
            self._abort(event.error)
            return
        entry = self._pending.get(event.request_id)
        if entry is None:
            return
        future, on_partial = entry
        if isinstance(event, Answer):
            del self._pending[event.request_id]
            if not future.done():
                if event.error is not None:
                    future.set_exception(event.error)
                else:
                    assert event.reply is not None
                    future.set_result(event.reply)
        elif on_partial is not None:
            on_partial(event.message)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._core.close()
        reason = f" ({exc})" if exc else ""
        error = ConnectionLostError(
            f"cannot finish call: connection to {self.address} lost{reason}"
        )
        if not self._ready.done():
            self._ready.set_exception(self._closed or error)
        self._fail(error)

    def _fail(self, error: DjinnError) -> None:
        if self._closed is None:
            self._closed = error
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(self._closed)
