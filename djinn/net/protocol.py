"""The asyncio face of the codec: a thin BufferedProtocol plus flow control.

`get_buffer` hands the transport the decoder's next destination (header
scratch space, or the receive buffer of the payload being read), so bulk
bytes land in their final memory with no copy. `send` writes the encoder's
buffer list with `writelines`; uvloop keeps references to the memoryviews
rather than copying what the socket has not taken yet.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Protocol, cast

from djinn.errors import ConnectionLostError, ProtocolError
from djinn.net.frame import (
    DEFAULT_LIMITS,
    NEED_DATA,
    Allocator,
    Frame,
    FrameDecoder,
    Limits,
    encode_frame,
)

# Pause senders while more than this much is queued in the transport; large
# enough that a 64 MiB payload streams without a pause per socket buffer.
WRITE_HIGH_WATER = 256 * 1024 * 1024
WRITE_LOW_WATER = 64 * 1024 * 1024


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


class Peer(Protocol):
    """What a FrameProtocol reports to: the client or server side of a connection."""

    def on_frame(self, frame: Frame) -> None: ...

    def on_protocol_error(self, exc: ProtocolError) -> None:
        """The peer broke the protocol; the owner answers and closes."""

    def on_lost(self, exc: Exception | None) -> None:
        """Called once when the connection ends, with why if known."""


class FrameProtocol(asyncio.BufferedProtocol):
    """Frames in and out of one TCP connection, reported to a `Peer`."""

    def __init__(
        self,
        peer: Peer,
        allocate: Allocator,
        limits: Limits = DEFAULT_LIMITS,
        *,
        backpressure: bool = False,
    ) -> None:
        """With `backpressure`, stop reading while writes are backed up: a peer
        that does not read its replies stops getting its requests read, so
        what it can make this side hold is bounded."""
        self.decoder = FrameDecoder(allocate, limits)
        self._backpressure = backpressure
        self.peer_limits = limits
        self.counters = Counters()
        self.transport: asyncio.Transport | None = None
        self._peer = peer
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._lost_reason: Exception | None = None

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # uvloop's is no subclass, but is one
        self.transport = stream
        sock = stream.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.decoder.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.counters.bytes_received += nbytes
        try:
            self.decoder.buffer_updated(nbytes)
            while (frame := self.decoder.next_frame()) is not NEED_DATA:
                assert isinstance(frame, Frame)
                self.counters.frames_received += 1
                self._peer.on_frame(frame)
        except ProtocolError as exc:
            self._lost_reason = self._lost_reason or exc
            self._peer.on_protocol_error(exc)

    def eof_received(self) -> bool:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._paused = True
        if self._backpressure and self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self._backpressure and self.transport is not None:
            self.transport.resume_reading()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.decoder.close()  # a half-received frame's buffers go back at once
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionLostError("cannot send: connection lost"))
        self._peer.on_lost(self._lost_reason or exc)

    # -- sending ---------------------------------------------------------------

    @property
    def paused(self) -> bool:
        """True while the transport holds more than the high-water mark."""
        return self._paused

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, frame: Frame) -> int:
        """Queue `frame` for sending; returns its size on the wire.

        Raises ConnectionLostError when closed and LocalProtocolError when the
        frame breaks the peer's limits.
        """
        if not self.is_open:
            raise ConnectionLostError("cannot send: the connection is closed")
        buffers = encode_frame(frame, self.peer_limits)
        size = sum(memoryview(b).nbytes for b in buffers)
        assert self.transport is not None
        self.transport.writelines(buffers)
        self.counters.bytes_sent += size
        self.counters.frames_sent += 1
        return size

    async def drain(self) -> None:
        """Wait until the transport has drained below the low-water mark."""
        if not self._paused:
            return
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drain)

    def abort(self, reason: Exception) -> None:
        """Drop the connection at once, recording why."""
        if self._lost_reason is None:
            self._lost_reason = reason
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Close after the queued bytes are written."""
        if self.transport is not None:
            self.transport.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (its write path does not copy), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where supported
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
