"""A ClientCore driven by a blocking socket, in the caller's own thread.

No event loop and no thread hop per call: on a virtual machine every
cross-thread wakeup costs tens of microseconds, the whole budget of a small
round trip. Many calls may be in flight (a suspended `RemoteModel.stream`
and the calls made while it is suspended): whichever thread waits reads
the socket and files every answer under its request id; the others wait
for it to hand theirs over.

Payloads still land in place: `recv_into` writes straight into the core's
destination buffers, and `sendmsg` gathers the encoded buffers with no
concatenation.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from djinn import messages
from djinn.errors import (
    ConnectionLostError,
    DjinnError,
    DjinnTimeoutError,
    ProtocolError,
    UsageError,
)
from djinn.net.buffers import shared_pool
from djinn.net.core import Answer, Broken, ClientCore, Driver, Meter, Partial, timeout_message
from djinn.net.frame import DEFAULT_LIMITS, Limits
from djinn.net.link import Link

# sendmsg takes at most this many buffers at once (Linux's IOV_MAX).
_IOV_MAX: Final = 1024

_OPEN: weakref.WeakSet[BlockingConnection] = weakref.WeakSet()
_FORK_HOOK: list[bool] = []


def _watch_forks(conn: BlockingConnection) -> None:
    """A child shares its parent's sockets: after fork() the child's copies refuse calls."""
    if not _FORK_HOOK:
        os.register_at_fork(after_in_child=_after_fork)
        _FORK_HOOK.append(True)
    _OPEN.add(conn)


def _after_fork() -> None:
    for conn in list(_OPEN):
        conn._broken = UsageError("cannot use a Client across fork(); connect again in the child")


@dataclass
class _Slot:
    """Where the answer of one request in flight lands."""

    answer: Answer | None = None
    partials: deque[messages.Streamed] = field(default_factory=deque)


class BlockingConnection(Driver):
    """An authenticated connection to a djinn server on a blocking socket."""

    def __init__(self, sock: socket.socket, core: ClientCore, link: Link | None) -> None:
        self.address = core.address
        self.link = link
        self._sock = sock
        self._core = core
        self._send_lock = threading.Lock()
        self._state = threading.Condition()
        self._reading = False
        self._slots: dict[int, _Slot] = {}
        self._timeout = -1.0
        self._broken: DjinnError | None = None
        _watch_forks(self)

    @classmethod
    def open(
        cls,
        host: str,
        port: int,
        *,
        token: str | None,
        timeout: float,
        limits: Limits = DEFAULT_LIMITS,
        link: Link | None = None,
    ) -> BlockingConnection:
        """Connect and authenticate.

        Raises ConnectionLostError (refused, unreachable), DjinnTimeoutError,
        AuthenticationError, VersionMismatchError.
        """
        address = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except TimeoutError:
            raise DjinnTimeoutError(
                f"cannot connect to {address}: no answer within {timeout:g}s"
            ) from None
        except OSError as exc:
            raise ConnectionLostError(f"cannot connect to {address}: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)  # blocking; timeouts come from SO_RCVTIMEO/SO_SNDTIMEO
        conn = cls(sock, ClientCore(address, token, shared_pool(), limits), link)
        deadline = time.monotonic() + timeout
        try:
            conn._set_timeout(timeout)
            conn._flush("connect", timeout)
            while not conn._core.ready:
                conn._read("connect", deadline, timeout)
                conn._flush("connect", timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    @property
    def in_flight(self) -> int:
        return self._core.in_flight

    @property
    def is_open(self) -> bool:
        return self._broken is None

    # -- calls ---------------------------------------------------------------------------

    def call(
        self,
        message: messages.Message,
        *,
        timeout: float,
        meter: Meter | None = None,
        on_partial: Callable[[messages.Streamed], None] | None = None,
    ) -> messages.Message:
        """Send a request and wait for its reply; `on_partial` gets its STREAM frames.

        Raises the typed error the server reported, ConnectionLostError,
        DjinnTimeoutError, or UsageError for values that cannot travel. An
        interrupted wait (a timeout, Ctrl-C) cancels the request on the server.
        """
        request_id = self.send(message, meter=meter, timeout=timeout)
        return self.wait(request_id, timeout=timeout, on_partial=on_partial)

    def send(self, message: messages.Message, *, meter: Meter | None, timeout: float) -> int:
        """Send a request without waiting; `wait` or `next_partial` collect its answer."""
        what = type(message).__name__.lower()
        if self._broken is not None:
            raise ConnectionLostError(f"cannot {what}: {self._broken}")
        with self._send_lock:
            request_id = self._core.request(message, meter)
            with self._state:
                self._slots[request_id] = _Slot()
            self._flush(what, timeout)
        return request_id

    def wait(
        self,
        request_id: int,
        *,
        timeout: float,
        on_partial: Callable[[messages.Streamed], None] | None = None,
        what: str = "call",
    ) -> messages.Message:
        deadline = time.monotonic() + timeout
        try:
            while True:
                event = self._next(request_id, deadline, timeout, what)
                if isinstance(event, Answer):
                    if event.error is not None:
                        raise event.error
                    assert event.reply is not None
                    return event.reply
                if on_partial is not None:
                    on_partial(event)
        except BaseException:
            self.cancel(request_id)
            raise

    def next_partial(
        self, request_id: int, *, timeout: float, what: str = "stream"
    ) -> messages.Streamed | messages.Message:
        """The request's next STREAM message, or its final reply. Raises as `wait`
        does, without cancelling: the caller decides."""
        event = self._next(request_id, time.monotonic() + timeout, timeout, what)
        if isinstance(event, Answer):
            if event.error is not None:
                raise event.error
            assert event.reply is not None
            return event.reply
        return event

    def cancel(self, request_id: int) -> None:
        """Stop a request on the server (best effort) and drop its answer."""
        with self._state:
            self._slots.pop(request_id, None)
        if self._broken is not None:
            return
        try:
            with self._send_lock:
                self._core.cancel(request_id)
                self._flush("cancel", 5.0)
        except DjinnError:
            pass  # the connection is gone, and with it the request

    # -- the socket ----------------------------------------------------------------------

    def _next(
        self, request_id: int, deadline: float, timeout: float, what: str
    ) -> Answer | messages.Streamed:
        """Wait for the request's next event, reading the socket if nobody else is."""
        while True:
            with self._state:
                slot = self._slots.get(request_id)
                if slot is None:
                    raise ConnectionLostError(f"cannot {what}: the request was dropped")
                if slot.partials:
                    return slot.partials.popleft()
                if slot.answer is not None:
                    del self._slots[request_id]
                    return slot.answer
                if self._broken is not None:
                    del self._slots[request_id]
                    raise ConnectionLostError(f"cannot finish {what}: {self._broken}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DjinnTimeoutError(timeout_message(what, self.address, timeout))
                if self._reading:
                    self._state.wait(remaining)
                    continue
                self._reading = True
            try:
                self._read(what, deadline, timeout)
            finally:
                with self._state:
                    self._reading = False
                    self._state.notify_all()

    def _read(self, what: str, deadline: float, timeout: float) -> None:
        """One recv, then file every complete event under its request."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DjinnTimeoutError(timeout_message(what, self.address, timeout))
        if remaining < 0.5 * self._timeout:  # a wait may overrun its deadline by at most 2x
            self._set_timeout(remaining)
        try:
            received = self._sock.recv_into(self._core.get_buffer())
        except BlockingIOError:  # SO_RCVTIMEO expired; the caller checks its deadline
            return
        except OSError as exc:
            raise self._break(ConnectionLostError(f"cannot finish {what}: {exc}")) from None
        if not received:
            raise self._break(
                ConnectionLostError(f"cannot finish {what}: {self.address} closed the connection")
            )
        try:
            self._core.buffer_updated(received)
            while (event := self._core.next_event()) is not None:
                self._file(event)
        except ProtocolError as exc:
            raise self._break(exc) from None

    def _file(self, event: Answer | Partial | Broken) -> None:
        if isinstance(event, Broken):
            raise self._break(event.error)
        with self._state:
            slot = self._slots.get(event.request_id)
            if slot is None:
                return
            if isinstance(event, Answer):
                slot.answer = event
            else:
                slot.partials.append(event.message)

    def _flush(self, what: str, timeout: float) -> None:
        buffers = self._core.outgoing()
        if not buffers:
            return
        if self.link is not None:
            time.sleep(self.link.delay(sum(memoryview(b).nbytes for b in buffers)))
        if not 0.5 * timeout <= self._timeout <= timeout:
            self._set_timeout(timeout)
        try:
            if len(buffers) == 1:
                self._sock.sendall(buffers[0])
            else:
                self._send_gather([memoryview(b).cast("B") for b in buffers])
        except BlockingIOError:  # SO_SNDTIMEO expired with part of a frame on the wire
            raise self._break(
                DjinnTimeoutError(timeout_message(what, self.address, timeout))
            ) from None
        except OSError as exc:
            raise self._break(ConnectionLostError(f"cannot send {what}: {exc}")) from None

    def _send_gather(self, views: list[memoryview]) -> None:
        while views:
            sent = self._sock.sendmsg(views[:_IOV_MAX])
            while sent:
                if sent >= views[0].nbytes:
                    sent -= views.pop(0).nbytes
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def _set_timeout(self, timeout: float) -> None:
        """Bound each blocking send and receive in the kernel: SO_RCVTIMEO/SO_SNDTIMEO
        cost no syscall per call, where a Python socket timeout costs a poll() per recv."""
        whole = int(timeout)
        value = struct.pack("ll", whole, max(1, int((timeout - whole) * 1e6)))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        self._timeout = timeout

    def _break(self, error: DjinnError) -> DjinnError:
        """Mark the connection unusable and close it; returns the error to raise."""
        with self._state:
            if self._broken is None:
                self._broken = error
            self._state.notify_all()
        self._sock.close()
        self._core.close()
        return error

    def close(self) -> None:
        with self._state:
            if self._broken is None:
                self._broken = ConnectionLostError("the client closed the connection")
            self._state.notify_all()
        self._sock.close()
