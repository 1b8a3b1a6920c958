"""The frame codec: bytes in, frames out; frames in, a list of buffers out.

No sockets and no asyncio here, so every byte-level rule is testable on
plain bytes. A frame on the wire is::

    offset  size  field
    0       4     magic            b"DJNN"
    4       1     version          PROTOCOL_VERSION
    5       1     kind             FrameKind
    6       2     flags            reserved, 0
    8       8     request id       u64; pairs a response with its request
    16      4     control length   u32; bytes of the control header below
    20      4     buffer count     u32; entries in the length table below
    24      C     control header   a small encoded message (see payload.py)
    24+C    8*N   length table     u64 per out-of-band buffer
    ...           buffers          the N raw buffers, back to back

All integers are big-endian. Every length is checked against `Limits`
before anything is allocated for it; a violation raises
`RemoteProtocolError` and leaves the decoder in a final error state.

Zero copy: `encode_frame` passes buffers through as the objects it was
given (memoryviews of tensor storage), and the decoder hands out the
destination buffer itself through `get_buffer` so a socket can read a
payload straight into the memory that becomes the received tensor.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

from djinn.errors import LocalProtocolError, RemoteProtocolError, VersionMismatchError

MAGIC: Final = b"DJNN"
# 2: MessagePack control headers (djinn.messages), CANCEL and STREAM frames.
PROTOCOL_VERSION: Final = 2

_HEADER = struct.Struct("!4sBBHQII")
HEADER_SIZE: Final = _HEADER.size  # 24
_LENGTH = struct.Struct("!Q")

# Bytes a connection keeps for headers and small frames; one read of this
# size usually holds many small frames at once.
SCRATCH_BYTES: Final = 64 * 1024
# Never offer a read smaller than this while the scratch buffer can be compacted.
MIN_READ: Final = 4096
# A payload with at least this much left to arrive is read straight into its
# destination; smaller remainders go through the scratch buffer so that one
# read can still pick up the frames behind them.
DIRECT_READ_MIN: Final = 64 * 1024


class FrameKind(enum.IntEnum):
    HELLO = 1  # client -> server: version, client nonce
    CHALLENGE = 2  # server -> client: server nonce, server proof
    AUTH = 3  # client -> server: client proof
    WELCOME = 4  # server -> client: handshake done, server facts
    REQUEST = 5
    RESPONSE = 6
    ERROR = 7
    STREAM = 8  # server -> client: a partial result of a running request
    CANCEL = 9  # client -> server: stop the request with this id


_KINDS: Final = (None, *FrameKind)  # wire value -> FrameKind, fast


@dataclass(frozen=True, slots=True)
class Limits:
    """Upper bounds checked before any allocation.

    Defaults: control headers carry method names, shapes and small values,
    never bulk data (a batch of 256 queued operations is about 30 KiB), so
    4 MiB is generous; 4096 buffers covers the state dict
    of any model djinn uploads in one chunk and a KV cache of 2048 layers;
    one buffer of 4 GiB holds the largest single weight of a 70B model
    (its 2 GiB bf16 embedding) with room to spare; a frame of 8 GiB bounds
    what one peer can make the other allocate at once.
    """

    max_control: int = 4 * 1024 * 1024
    max_buffers: int = 4096
    max_buffer: int = 4 * 1024**3
    max_frame: int = 8 * 1024**3


DEFAULT_LIMITS: Final = Limits()
# Before a peer has authenticated it may send only tiny control-only frames
# (the handshake's fixed fields are at most 65 bytes).
HANDSHAKE_LIMITS: Final = Limits(max_control=128, max_buffers=0, max_buffer=0, max_frame=256)


class Frame(NamedTuple):
    kind: FrameKind
    request_id: int
    control: bytes
    buffers: Sequence[Any] = ()
    flags: int = 0


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

Allocator = Callable[[int], Any]
"""Returns a writable object with the buffer protocol of exactly n bytes."""


def wire_size(frame: Frame) -> int:
    """Bytes `frame` takes on the wire, header included."""
    return (
        HEADER_SIZE
        + len(frame.control)
        + _LENGTH.size * len(frame.buffers)
        + sum(memoryview(b).nbytes for b in frame.buffers)
    )


def encode_frame(frame: Frame, limits: Limits = DEFAULT_LIMITS) -> list[Any]:
    """Return the buffers to write for `frame`, payloads passed through uncopied.

    Raises LocalProtocolError when the frame breaks `limits`, which are the
    peer's: sending it would only get the connection closed.
    """
    control = frame.control
    if not frame.buffers:  # the common small frame: one buffer out
        _check_body(len(control), 0, limits, LocalProtocolError, "send")
        _check_sizes((), len(control), limits, LocalProtocolError, "send")
        header = _HEADER.pack(
            MAGIC, PROTOCOL_VERSION, frame.kind, frame.flags, frame.request_id, len(control), 0
        )
        return [header + control]
    sizes = [memoryview(b).nbytes for b in frame.buffers]
    _check_body(len(control), len(sizes), limits, LocalProtocolError, "send")
    _check_sizes(sizes, len(control), limits, LocalProtocolError, "send")
    head = b"".join(
        (
            _HEADER.pack(
                MAGIC,
                PROTOCOL_VERSION,
                frame.kind,
                frame.flags,
                frame.request_id,
                len(control),
                len(sizes),
            ),
            control,
            struct.pack(f"!{len(sizes)}Q", *sizes),
        )
    )
    return [head, *(b for b, n in zip(frame.buffers, sizes, strict=True) if n)]


def _check_body(
    control: int, count: int, limits: Limits, error: type[Exception], verb: str = "accept"
) -> None:
    if control > limits.max_control:
        raise error(
            f"cannot {verb} frame: control header of {control} bytes exceeds "
            f"the limit of {limits.max_control}"
        )
    if count > limits.max_buffers:
        raise error(
            f"cannot {verb} frame: {count} buffers exceed the limit of {limits.max_buffers}"
        )


def _check_sizes(
    sizes: Sequence[int], control: int, limits: Limits, error: type[Exception], verb: str = "accept"
) -> None:
    for size in sizes:
        if size > limits.max_buffer:
            raise error(
                f"cannot {verb} frame: a buffer of {size} bytes exceeds "
                f"the limit of {limits.max_buffer}"
            )
    total = HEADER_SIZE + control + _LENGTH.size * len(sizes) + sum(sizes)
    if total > limits.max_frame:
        raise error(
            f"cannot {verb} frame: {total} bytes exceed the frame limit of {limits.max_frame}"
        )


class _State(enum.Enum):
    HEADER = 1
    BODY = 2
    BUFFERS = 3
    ERROR = 4


class FrameDecoder:
    """Turns received bytes into `Frame`s.

    Two ways to feed it: `receive_data(bytes)` (copies; for tests and simple
    callers), or the zero-copy pair `get_buffer()` / `buffer_updated(n)` that an
    `asyncio.BufferedProtocol` maps onto one to one. Completed frames queue up
    for `next_frame()`. Any protocol violation raises `RemoteProtocolError` and
    every later call raises it again.
    """

    def __init__(self, allocate: Allocator = bytearray, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._allocate = allocate
        self._scratch = bytearray(SCRATCH_BYTES)
        self._lo = 0  # unconsumed bytes are self._scratch[self._lo:self._hi]
        self._hi = 0
        self._state = _State.HEADER
        self._error: RemoteProtocolError | None = None
        self._frames: deque[Frame] = deque()
        self._direct = False  # the last get_buffer() handed out a destination
        # the frame being read
        self._kind = FrameKind.REQUEST
        self._flags = 0
        self._request_id = 0
        self._control_len = 0
        self._count = 0
        self._control = b""
        self._buffers: list[Any] = []
        self._views: list[memoryview] = []
        self._index = 0  # buffer being filled
        self._offset = 0  # bytes of it filled
        self._payload = 0  # bytes of buffers announced by the frame being read

    # -- feeding -------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Where the next received bytes should be written."""
        self._raise_if_failed()
        if self._state is _State.BUFFERS and self._lo == self._hi:
            view = self._views[self._index]
            if view.nbytes - self._offset >= DIRECT_READ_MIN:
                self._direct = True
                return view[self._offset :]
        self._direct = False
        if self._lo == self._hi:
            self._lo = self._hi = 0
        elif len(self._scratch) - self._hi < MIN_READ:
            self._compact()
        return memoryview(self._scratch)[self._hi :]

    def buffer_updated(self, nbytes: int) -> None:
        """`nbytes` were written into the buffer from the last `get_buffer()`."""
        self._raise_if_failed()
        if self._direct:
            self._offset += nbytes
            self._advance_buffers()
        else:
            self._hi += nbytes
        try:
            self._parse()
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes; copies them. Equivalent to get_buffer/buffer_updated rounds."""
        data = memoryview(data).cast("B")
        while data.nbytes:
            target = self.get_buffer()
            n = min(target.nbytes, data.nbytes)
            target[:n] = data[:n]
            self.buffer_updated(n)
            data = data[n:]

    def next_frame(self) -> Frame | _NeedData:
        """The next complete frame, or NEED_DATA."""
        if self._frames:
            return self._frames.popleft()
        self._raise_if_failed()
        return NEED_DATA

    @property
    def idle(self) -> bool:
        """True between frames: nothing of a next frame has arrived."""
        return self._state is _State.HEADER and self._lo == self._hi

    @property
    def payload_bytes(self) -> int:
        """Buffer bytes the frame being received announced (0 between such frames):
        what a slow peer holds allocated on this side."""
        return self._payload if self._state is _State.BUFFERS else 0

    # -- parsing -------------------------------------------------------------

    def _parse(self) -> None:
        while True:
            available = self._hi - self._lo
            if self._state is _State.HEADER:
                if available < HEADER_SIZE:
                    return
                self._parse_header()
            elif self._state is _State.BODY:
                if available < self._body_len():
                    return
                self._parse_body()
            elif self._state is _State.BUFFERS:
                if not available:
                    return
                self._copy_from_scratch()
            else:  # pragma: no cover - _fail() raises before we get here
                return

    def _parse_header(self) -> None:
        magic, version, kind, flags, request_id, control_len, count = _HEADER.unpack_from(
            self._scratch, self._lo
        )
        if magic != MAGIC:
            raise RemoteProtocolError(
                f"cannot decode frame: bad magic {magic!r} (not a djinn peer?)"
            )
        if version != PROTOCOL_VERSION:
            raise VersionMismatchError(
                f"cannot decode frame: the peer speaks protocol version {version}, "
                f"this side speaks {PROTOCOL_VERSION}; install matching djinn versions"
            )
        if not 0 < kind < len(_KINDS):
            raise RemoteProtocolError(f"cannot decode frame: unknown frame kind {kind}")
        self._kind = _KINDS[kind]
        _check_body(control_len, count, self.limits, RemoteProtocolError)
        self._lo += HEADER_SIZE
        self._flags = flags
        self._request_id = request_id
        self._control_len = control_len
        self._count = count
        self._state = _State.BODY
        needed = self._body_len()
        if needed > len(self._scratch) - self._lo:
            self._compact(needed)

    def _body_len(self) -> int:
        return self._control_len + _LENGTH.size * self._count

    def _parse_body(self) -> None:
        lo = self._lo
        self._control = bytes(self._scratch[lo : lo + self._control_len])
        lo += self._control_len
        if not self._count:  # the common small frame
            self._lo = lo
            self._frames.append(Frame(self._kind, self._request_id, self._control, (), self._flags))
            self._state = _State.HEADER
            return
        sizes = struct.unpack_from(f"!{self._count}Q", self._scratch, lo)
        self._lo = lo + _LENGTH.size * self._count
        _check_sizes(sizes, self._control_len, self.limits, RemoteProtocolError)
        self._payload = sum(sizes)
        self._buffers = [self._allocate(size) for size in sizes]
        self._views = [memoryview(b).cast("B") for b in self._buffers]
        self._index = 0
        self._offset = 0
        self._state = _State.BUFFERS
        self._advance_buffers()
        if len(self._scratch) > SCRATCH_BYTES and self._lo == self._hi:
            self._scratch = bytearray(SCRATCH_BYTES)  # a large control header passed
            self._lo = self._hi = 0

    def _copy_from_scratch(self) -> None:
        view = self._views[self._index]
        n = min(view.nbytes - self._offset, self._hi - self._lo)
        view[self._offset : self._offset + n] = memoryview(self._scratch)[self._lo : self._lo + n]
        self._lo += n
        self._offset += n
        self._advance_buffers()

    def _advance_buffers(self) -> None:
        while self._index < len(self._views) and self._offset == self._views[self._index].nbytes:
            self._index += 1
            self._offset = 0
        if self._index == len(self._views):
            self._frames.append(
                Frame(self._kind, self._request_id, self._control, self._buffers, self._flags)
            )
            self._buffers = []
            self._views = []
            self._state = _State.HEADER

    def _compact(self, needed: int = 0) -> None:
        """Move unconsumed bytes to the front, growing to hold `needed` bytes."""
        pending = self._scratch[self._lo : self._hi]
        if needed > len(self._scratch):
            self._scratch = bytearray(needed)
        self._scratch[: len(pending)] = pending
        self._lo, self._hi = 0, len(pending)

    def close(self) -> None:
        """Drop a half-received frame's buffers now: the stream has ended."""
        self._fail(RemoteProtocolError("cannot decode: the stream has ended"))
        self._frames.clear()

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._state = _State.ERROR
        self._error = exc
        self._scratch = bytearray()
        self._lo = self._hi = 0
        self._buffers = []
        self._views = []

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
