"""The server's asyncio face of the codec: a thin BufferedProtocol plus flow control.

`get_buffer` hands the transport the decoder's next destination (header
scratch space, or the receive buffer of the payload being read), so bulk
bytes land in their final memory with no copy. `send` writes the encoder's
buffer list with `writelines`; uvloop keeps references to the memoryviews
rather than copying what the socket has not taken yet.

A frame that announces payload must deliver it in time: a peer that stops
halfway would otherwise hold its receive buffers forever. Past
`frame_deadline(bytes)` the connection is dropped and the buffers go back.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final, Protocol, cast

from djinn.errors import ConnectionLostError, ProtocolError, RemoteProtocolError
from djinn.net.core import Counters
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
WRITE_HIGH_WATER: Final = 256 * 1024 * 1024
WRITE_LOW_WATER: Final = 64 * 1024 * 1024
# A frame's payload must arrive within FRAME_MIN_S plus its size at FRAME_MIN_RATE:
# 10 s, and 64 Mb/s, far below any link a GPU server sits on.
FRAME_MIN_S: Final = 10.0
FRAME_MIN_RATE: Final = 8e6


def frame_deadline(nbytes: int, base_s: float = FRAME_MIN_S) -> float:
    return base_s + nbytes / FRAME_MIN_RATE


class Peer(Protocol):
    """What a FrameProtocol reports to: the server side of a connection."""

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
        frame_timeout_s: float = FRAME_MIN_S,
    ) -> None:
        """With `backpressure`, stop reading while writes are backed up: a peer
        that does not read its replies stops getting its requests read, so
        what it can make this side hold is bounded. A frame's payload must
        arrive within `frame_deadline(bytes, frame_timeout_s)`."""
        self.decoder = FrameDecoder(allocate, limits)
        self._backpressure = backpressure
        self.peer_limits = DEFAULT_LIMITS
        self.counters = Counters()
        self.transport: asyncio.Transport | None = None
        self._peer = peer
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._lost_reason: Exception | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._frame_timeout_s = frame_timeout_s

    # -- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = stream = no_delay(transport)
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
            return
        self._watch_payload()

    def _watch_payload(self) -> None:
        pending = self.decoder.payload_bytes
        if pending and self._deadline is None:
            loop = asyncio.get_running_loop()
            seconds = frame_deadline(pending, self._frame_timeout_s)
            self._deadline = loop.call_later(seconds, self._on_deadline, pending, seconds)
        elif not pending and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self, pending: int, seconds: float) -> None:
        self._deadline = None
        self.abort(
            RemoteProtocolError(
                f"cannot receive frame: its {pending}-byte payload did not arrive within "
                f"{seconds:.0f}s"
            )
        )

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
        if self._deadline is not None:
            self._deadline.cancel()
        self.decoder.close()  # a half-received frame's buffers go back at once
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionLostError("cannot send: connection lost"))
        self._peer.on_lost(self._lost_reason or exc)

    # -- sending ---------------------------------------------------------------

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


def no_delay(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """The transport with TCP_NODELAY on: small frames leave at once."""
    stream = cast(asyncio.Transport, transport)  # uvloop's is no subclass, but is one
    sock = stream.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return stream


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed (its write path does not copy), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where supported
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
