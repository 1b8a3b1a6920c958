"""The client side of a connection with no I/O: bytes in, events out; requests in, bytes out.

`Client` (blocking socket) and `AsyncClient` (event loop) both drive one of
these, in the manner of h11: they write what `outgoing()` returns and feed
what they read to `get_buffer()` / `buffer_updated()`, then take events
from `next_event()`. The core runs the handshake, numbers requests, meters
traffic per call, turns ERROR frames into typed errors, and drops the late
answer of a request that was forgotten (timed out or cancelled).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from djinn import messages
from djinn.errors import (
    ConnectionLostError,
    DjinnError,
    RemoteProtocolError,
    from_wire,
)
from djinn.net import codec
from djinn.net.frame import (
    DEFAULT_LIMITS,
    NEED_DATA,
    Allocator,
    Frame,
    FrameDecoder,
    FrameKind,
    Limits,
    encode_frame,
    wire_size,
)
from djinn.net.handshake import HANDSHAKE_ID, ClientHandshake


@dataclass(slots=True)
class Meter:
    """Bytes and calls of one user of a shared connection (a RemoteModel, say)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    calls: int = 0


@dataclass(slots=True)
class Counters:
    """Traffic of one connection, as counted on the wire (headers included)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
        }


@dataclass(slots=True)
class Answer:
    """The end of a request: its reply, or the error it failed with."""

    request_id: int
    reply: messages.Message | None
    error: DjinnError | None


@dataclass(slots=True)
class Partial:
    """A STREAM frame of a running request."""

    request_id: int
    message: messages.Streamed


@dataclass(slots=True)
class Broken:
    """The server reported a connection-level error; it closes the connection next."""

    error: DjinnError


Event = Answer | Partial | Broken

_HANDSHAKE_KINDS: Final = (FrameKind.CHALLENGE, FrameKind.WELCOME)
REPLY: Final[Any] = messages.Reply  # a union: what codec.decode takes as the kind


class ClientCore:
    """One connection's protocol state, for a driver that does the I/O."""

    def __init__(
        self, address: str, token: str | None, allocate: Allocator, limits: Limits = DEFAULT_LIMITS
    ) -> None:
        self.address = address
        self.counters = Counters()
        self.server_info: messages.ServerInfo | None = None
        self._limits = limits
        self._decoder = FrameDecoder(allocate, limits)
        self._shake: ClientHandshake | None = ClientHandshake(token, address)
        self._out: list[Any] = []
        self._next_id = 1
        self._meters: dict[int, Meter | None] = {}
        self._emit(self._shake.hello())

    # -- sending ---------------------------------------------------------------------

    def _emit(self, frame: Frame) -> int:
        buffers = encode_frame(frame, self._limits)
        size = sum(memoryview(b).nbytes for b in buffers)
        self._out.extend(buffers)
        self.counters.bytes_sent += size
        self.counters.frames_sent += 1
        return size

    def outgoing(self) -> list[Any]:
        """Buffers to write, in order; the caller writes all of them."""
        out, self._out = self._out, []
        return out

    def request(self, message: messages.Message, meter: Meter | None = None) -> int:
        """Queue a request; returns its id. Raises UsageError for values that cannot
        travel and LocalProtocolError for a frame past the server's limits."""
        if self._shake is not None:
            raise ConnectionLostError(f"cannot call {self.address}: the handshake is not done")
        control, buffers = codec.encode(message)
        request_id = self._next_id
        size = self._emit(Frame(FrameKind.REQUEST, request_id, control, buffers))
        self._next_id += 1
        self._meters[request_id] = meter
        if meter is not None:
            meter.calls += 1
            meter.bytes_sent += size
        return request_id

    def cancel(self, request_id: int) -> None:
        """Ask the server to stop a request, and drop whatever it still answers."""
        if request_id in self._meters:
            del self._meters[request_id]
            self._emit(Frame(FrameKind.CANCEL, request_id, b""))

    def forget(self, request_id: int) -> None:
        """Drop the answer of a request nobody waits for any more."""
        self._meters.pop(request_id, None)

    @property
    def in_flight(self) -> int:
        return len(self._meters)

    @property
    def ready(self) -> bool:
        return self._shake is None

    # -- receiving -------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        return self._decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        """Raises RemoteProtocolError when the bytes break the protocol."""
        self.counters.bytes_received += nbytes
        self._decoder.buffer_updated(nbytes)

    def receive_data(self, data: bytes) -> None:
        self.counters.bytes_received += len(data)
        self._decoder.receive_data(data)

    def close(self) -> None:
        """The stream ended: a half-received frame's buffers go back at once."""
        self._decoder.close()

    def next_event(self) -> Event | None:
        """The next event, or None when more bytes are needed. During the handshake
        it answers the server itself (see `outgoing`) and returns no events; it
        raises AuthenticationError or RemoteProtocolError if the handshake fails."""
        while True:
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return None
            assert isinstance(frame, Frame)
            self.counters.frames_received += 1
            if self._shake is not None:
                self._on_handshake(frame)
                continue
            event = self._on_frame(frame)
            if event is not None:
                return event

    def _on_handshake(self, frame: Frame) -> None:
        assert self._shake is not None
        if frame.kind is FrameKind.ERROR:
            raise _failure(frame)
        if frame.kind not in _HANDSHAKE_KINDS:
            raise RemoteProtocolError(f"cannot connect: unexpected {frame.kind.name} frame")
        if frame.kind is FrameKind.CHALLENGE:
            self._emit(self._shake.answer(frame))
        else:
            self.server_info = self._shake.welcome(frame)
            self._shake = None

    def _on_frame(self, frame: Frame) -> Event | None:
        if frame.request_id == HANDSHAKE_ID:
            if frame.kind is FrameKind.ERROR:
                return Broken(_failure(frame))
            raise RemoteProtocolError(f"cannot read: unexpected {frame.kind.name} frame")
        if frame.request_id not in self._meters:
            return None  # the late answer of a forgotten request
        meter = self._meters[frame.request_id]
        if meter is not None:
            meter.bytes_received += wire_size(frame)
        if frame.kind is FrameKind.STREAM:
            streamed = codec.decode(frame.control, frame.buffers, messages.Streamed)
            return Partial(frame.request_id, streamed)
        del self._meters[frame.request_id]
        if frame.kind is FrameKind.RESPONSE:
            reply: messages.Message = codec.decode(frame.control, frame.buffers, REPLY)
            return Answer(frame.request_id, reply, None)
        if frame.kind is FrameKind.ERROR:
            return Answer(frame.request_id, None, _failure(frame))
        raise RemoteProtocolError(f"cannot read reply: unexpected {frame.kind.name} frame")


class Driver:
    """What a driver of a ClientCore tells its owner without a round trip."""

    _core: ClientCore

    @property
    def server_info(self) -> messages.ServerInfo:
        assert self._core.server_info is not None
        return self._core.server_info

    @property
    def counters(self) -> Counters:
        return self._core.counters


def _failure(frame: Frame) -> DjinnError:
    failure = codec.decode(frame.control, frame.buffers, messages.Failure)
    return from_wire(failure.code, failure.message, failure.remote_type, failure.op)


def timeout_message(what: str, address: str, timeout: float) -> str:
    return (
        f"cannot finish {what}: no answer from {address} within {timeout:g}s; "
        "pass a larger timeout= (to the call, or to RemoteModel/connect) if the work needs longer"
    )
