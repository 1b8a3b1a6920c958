"""The client side of a connection on a blocking socket, in the caller's own thread.

Same frames and handshake as the event-loop client, without a thread hop
per call: on a virtual machine every cross-thread wakeup costs tens of
microseconds, which is the whole budget of a small round trip. One call is
in flight at a time per connection (a lock serializes threads); code that
wants many in flight uses AsyncClient.

Payloads still land in place: `recv_into` writes straight into the
decoder's destination buffers, and `sendmsg` gathers the encoder's buffer
list with no concatenation.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time
import weakref
from typing import Any, Final

from djinn.errors import (
    ConnectionLostError,
    DjinnError,
    DjinnTimeoutError,
    ProtocolError,
    UsageError,
)
from djinn.net.buffers import shared_pool
from djinn.net.frame import (
    DEFAULT_LIMITS,
    NEED_DATA,
    Frame,
    FrameDecoder,
    FrameKind,
    Limits,
    encode_frame,
    wire_size,
)
from djinn.net.handshake import ClientHandshake
from djinn.net.link import Link
from djinn.net.protocol import Counters
from djinn.net.rpc import (
    HANDSHAKE_ID,
    Meter,
    decode_reply,
    handshake_frame,
    request_frame,
    timeout_message,
)

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


class BlockingConnection:
    """An authenticated connection to a djinn server on a blocking socket."""

    def __init__(
        self, sock: socket.socket, address: str, limits: Limits, link: Link | None = None
    ) -> None:
        self.address = address
        self.link = link
        self.server_info: dict[str, Any] = {}
        self.counters = Counters()
        self._sock = sock
        self._limits = limits
        self._decoder = FrameDecoder(shared_pool(), limits)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._timeout = -1.0
        self._in_flight = 0
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
        conn = cls(sock, address, limits, link)
        deadline = time.monotonic() + timeout
        try:
            conn._set_timeout(timeout)
            shake = ClientHandshake(token, address)
            hello = handshake_frame(FrameKind.HELLO, shake.hello())
            challenge = conn._exchange(hello, deadline, timeout)
            auth = handshake_frame(FrameKind.AUTH, shake.answer(challenge))
            welcome = conn._exchange(auth, deadline, timeout)
            conn.server_info = shake.welcome(welcome)
        except BaseException:
            conn.close()
            raise
        return conn

    def _exchange(self, frame: Frame, deadline: float, timeout: float) -> Any:
        self._send(frame, "connect", timeout)
        return decode_reply(self._receive(HANDSHAKE_ID, deadline, "connect", timeout))

    def call(
        self, method: str, args: tuple[Any, ...], *, timeout: float, meter: Meter | None = None
    ) -> Any:
        """Run `method(*args)` on the server and return its result.

        Raises the typed error the server reported, ConnectionLostError,
        DjinnTimeoutError, or UsageError for arguments that cannot travel.
        """
        with self._lock:
            if self._broken is not None:
                raise ConnectionLostError(f"cannot call {method}: {self._broken}")
            request_id = next(self._ids)
            frame = request_frame(request_id, method, args)
            deadline = time.monotonic() + timeout
            self._in_flight = 1
            try:
                if timeout != self._timeout:
                    self._set_timeout(timeout)
                sent = self._send(frame, method, timeout)
                reply = self._receive(request_id, deadline, method, timeout)
            finally:
                self._in_flight = 0
        if meter is not None:
            meter.calls += 1
            meter.bytes_sent += sent
            meter.bytes_received += wire_size(reply)
        return decode_reply(reply)

    def _set_timeout(self, timeout: float) -> None:
        """Bound each blocking send and receive by `timeout`, in the kernel.

        SO_RCVTIMEO/SO_SNDTIMEO cost no syscall per call, where a Python socket
        timeout costs a poll() before every recv and two fcntl()s per change.
        """
        whole = int(timeout)
        value = struct.pack("ll", whole, max(1, int((timeout - whole) * 1e6)))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        self._timeout = timeout

    def _send(self, frame: Frame, method: str, timeout: float) -> int:
        buffers = encode_frame(frame, self._limits)
        if self.link is not None:
            time.sleep(self.link.delay(sum(memoryview(b).nbytes for b in buffers)))
        try:
            if len(buffers) == 1:
                self._sock.sendall(buffers[0])
                self.counters.bytes_sent += len(buffers[0])
                return len(buffers[0])
            return self._send_gather([memoryview(b).cast("B") for b in buffers])
        except BlockingIOError:  # SO_SNDTIMEO expired with part of a frame on the wire
            raise self._break(
                DjinnTimeoutError(timeout_message(method, self.address, timeout))
            ) from None
        except OSError as exc:
            raise self._break(ConnectionLostError(f"cannot send {method}: {exc}")) from None
        finally:
            self.counters.frames_sent += 1

    def _send_gather(self, views: list[memoryview]) -> int:
        total = sum(v.nbytes for v in views)
        while views:
            sent = self._sock.sendmsg(views[:_IOV_MAX])
            self.counters.bytes_sent += sent
            while sent:
                if sent >= views[0].nbytes:
                    sent -= views.pop(0).nbytes
                else:
                    views[0] = views[0][sent:]
                    sent = 0
        return total

    def _receive(self, request_id: int, deadline: float, method: str, timeout: float) -> Frame:
        decoder = self._decoder
        while True:
            frame = decoder.next_frame()
            if frame is not NEED_DATA:
                assert isinstance(frame, Frame)
                self.counters.frames_received += 1
                if frame.request_id == request_id:
                    return frame
                if frame.request_id == HANDSHAKE_ID and frame.kind is FrameKind.ERROR:
                    decode_reply(frame)  # a connection-level error: raises it
                continue  # the late answer to a call that timed out
            try:
                received = self._sock.recv_into(decoder.get_buffer())
            except BlockingIOError:  # SO_RCVTIMEO expired
                if time.monotonic() < deadline:
                    continue
                raise DjinnTimeoutError(timeout_message(method, self.address, timeout)) from None
            except OSError as exc:
                raise self._break(ConnectionLostError(f"cannot finish {method}: {exc}")) from None
            if not received:
                raise self._break(
                    ConnectionLostError(
                        f"cannot finish {method}: {self.address} closed the connection"
                    )
                )
            self.counters.bytes_received += received
            try:
                decoder.buffer_updated(received)
            except ProtocolError as exc:
                raise self._break(exc) from None

    def _break(self, error: DjinnError) -> DjinnError:
        """Mark the connection unusable and close it; returns the error to raise."""
        if self._broken is None:
            self._broken = error
        self._sock.close()
        return error

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def is_open(self) -> bool:
        return self._broken is None

    def close(self) -> None:
        if self._broken is None:
            self._broken = ConnectionLostError("the client closed the connection")
        self._sock.close()
