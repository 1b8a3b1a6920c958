"""Values on the wire: msgpack control headers plus out-of-band buffers.

The control header is MessagePack, decoded by msgspec into the typed
messages of `djinn.messages`. MessagePack has no references between
nodes, so a decoded message is a tree: decoding, hashing, validating and
walking it all cost time linear in its bytes, and nothing on the wire can
name a class or a callable. The values plain MessagePack lacks travel as
extension types with small, validated payloads:

    code  value                      payload
    1     tuple                      an array of values (lists stay arrays)
    2     slice                      [start, stop, step], each int or nil
    3     Ellipsis                   empty
    4     Ref                        its id, 8 bytes big-endian
    5     torch.Tensor               [buffer index, dtype name, shape]
    6     numpy.ndarray              [buffer index, dtype string, shape]
    7     torch.dtype                its name
    8     torch.device               its string
    9     torch.Size                 its dimensions
    10    complex                    [real, imag]
    11    bytes of over 4 KiB        a buffer index

Tensor and array bytes never enter the header: they leave as memoryviews of
the tensor's own storage and arrive as views of the receive buffers the
socket filled in place. Every dynamic value is checked after decoding: at
most MAX_DEPTH levels of containers, MAX_NODES nodes, dict keys that are
str or int, and every buffer used exactly once.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from types import EllipsisType
from typing import Any, Final, TypeVar

import msgspec
import numpy as np
import torch

from djinn.errors import RemoteProtocolError, UsageError

# bytes up to this size travel inside the header; larger ones out of band.
INLINE_BYTES: Final = 4096
# torch's own limit on the number of dimensions of a tensor.
MAX_DIMS: Final = 64
# Containers nest at most this deep: op arguments are shallow (a subscript is
# a tuple of slices), and every walk of a value stays far from Python's stack limit.
MAX_DEPTH: Final = 32
# Nodes of one message's dynamic values: a batch of 256 queued operations
# is a few thousand, a state dict chunk of 4096 tensors about 4,100.
MAX_NODES: Final = 65_536

_TUPLE, _SLICE, _ELLIPSIS, _REF, _TENSOR, _NDARRAY = 1, 2, 3, 4, 5, 6
_DTYPE, _DEVICE, _SIZE, _COMPLEX, _BYTES = 7, 8, 9, 10, 11


def _torch_dtypes() -> dict[str, tuple[torch.dtype, int]]:
    """Every dtype with a plain byte layout, by name, with its element size.

    Quantized dtypes are left out: their values mean nothing without the
    scale and zero point that live beside the buffer.
    """
    table = {}
    for attr in dir(torch):
        dtype = getattr(torch, attr)
        if isinstance(dtype, torch.dtype):
            name = str(dtype).removeprefix("torch.")
            if not name.startswith("q"):
                table[name] = (dtype, dtype.itemsize)
    return table


TORCH_DTYPES: Final = _torch_dtypes()


class Ref:
    """A reference to an object the server holds for one session.

    A plain class, not a dataclass, which msgspec would encode as a map."""

    __slots__ = ("id",)

    def __init__(self, ref_id: int) -> None:
        self.id = ref_id

    def __eq__(self, other: object) -> bool:
        return type(other) is Ref and other.id == self.id

    def __hash__(self) -> int:
        return hash((Ref, self.id))

    def __repr__(self) -> str:
        return f"Ref({self.id})"


# -- encoding -------------------------------------------------------------------------------

_local = threading.local()  # the buffers of the message being encoded or decoded


class Outgoing:
    """A value `wire_value` prepared for sending; validation treats it as a leaf."""

    __slots__ = ()


class OutgoingTuple(Outgoing):
    """A tuple on its way out: msgspec would send a tuple as an array, which
    arrives as a list, and torch reads `x[(0, 1)]` and `x[[0, 1]]` differently."""

    __slots__ = ("items",)

    def __init__(self, items: list[Any]) -> None:
        self.items = items


class _Size(Outgoing):
    """A torch.Size on its way out (a tuple subclass, which msgspec would send as an array)."""

    __slots__ = ("dims",)

    def __init__(self, dims: torch.Size) -> None:
        self.dims = list(dims)


class _Big(Outgoing):
    """Bytes of over INLINE_BYTES, sent out of band."""

    __slots__ = ("view",)

    def __init__(self, data: bytes | bytearray) -> None:
        self.view = memoryview(data).cast("B")


def _enc_hook(obj: Any) -> Any:
    kind = type(obj)
    if kind is OutgoingTuple:
        return msgspec.msgpack.Ext(_TUPLE, _encoder.encode(obj.items))
    if kind is slice:
        fields = [obj.start, obj.stop, obj.step]
        if not all(v is None or type(v) is int for v in fields):
            raise UsageError(f"cannot send {obj!r}: slice bounds must be ints or None")
        return msgspec.msgpack.Ext(_SLICE, _encoder.encode(fields))
    if kind is EllipsisType:
        return msgspec.msgpack.Ext(_ELLIPSIS, b"")
    if kind is Ref:
        return msgspec.msgpack.Ext(_REF, obj.id.to_bytes(8, "big", signed=True))
    if isinstance(obj, torch.Tensor):
        return _tensor_ext(obj)
    if kind is np.ndarray:
        return _ndarray_ext(obj)
    if kind is torch.dtype:
        return msgspec.msgpack.Ext(_DTYPE, _dtype_name(obj).encode())
    if kind is torch.device:
        return msgspec.msgpack.Ext(_DEVICE, str(obj).encode())
    if kind is _Size:
        return msgspec.msgpack.Ext(_SIZE, _encoder.encode(obj.dims))
    if kind is complex:
        return msgspec.msgpack.Ext(_COMPLEX, _encoder.encode([obj.real, obj.imag]))
    if kind is _Big:
        return msgspec.msgpack.Ext(_BYTES, _encoder.encode(_add(obj.view)))
    raise UsageError(
        f"cannot send a {kind.__module__}.{kind.__qualname__}: only tensors, numpy arrays, "
        "bytes, str, numbers, slices and lists/tuples/dicts of these travel; convert it first"
    )


def _add(view: memoryview) -> int:
    buffers: list[memoryview] = _local.out
    buffers.append(view)
    return len(buffers) - 1


def _tensor_ext(tensor: torch.Tensor) -> msgspec.msgpack.Ext:
    if tensor.layout != torch.strided or tensor.is_quantized:
        raise UsageError(
            f"cannot send a {tensor.layout} {tensor.dtype} tensor: only dense, "
            "unquantized tensors travel; call .to_dense() or .dequantize() first"
        )
    fields = [_add(tensor_bytes(tensor)), _dtype_name(tensor.dtype), list(tensor.shape)]
    return msgspec.msgpack.Ext(_TENSOR, _encoder.encode(fields))


def _ndarray_ext(array: np.ndarray) -> msgspec.msgpack.Ext:
    if array.dtype.hasobject or array.dtype.fields is not None:
        raise UsageError(
            f"cannot send a numpy array of dtype {array.dtype}: only plain numeric, "
            "bool and fixed-width string dtypes travel"
        )
    data = np.ascontiguousarray(array)
    raw = data.reshape(-1).view(np.uint8)
    fields = [_add(raw.data), data.dtype.str, list(data.shape)]
    return msgspec.msgpack.Ext(_NDARRAY, _encoder.encode(fields))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in row-major order: a view of its storage when it is
    a contiguous CPU tensor, else of the one copy that makes it so."""
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.resolve_conj().resolve_neg().contiguous()
    return data.reshape(-1).view(torch.uint8).numpy().data


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in TORCH_DTYPES:
        raise UsageError(f"cannot send dtype {dtype}: it has no plain byte layout")
    return name


_encoder: Final = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def _wire(value: Any) -> Any:
    kind = type(value)
    if kind is torch.Size:
        return _Size(value)
    if isinstance(value, tuple):  # named tuples too
        return OutgoingTuple([_wire(v) for v in value])
    if kind is list:
        return [_wire(v) for v in value]
    if kind is dict:
        return {k: _wire(v) for k, v in value.items()}
    if (kind is bytes or kind is bytearray) and len(value) > INLINE_BYTES:
        return _Big(value)
    if kind is set or kind is frozenset:  # msgspec would send an array, which arrives a list
        raise UsageError("cannot send a set: send a list or a tuple instead")
    return value


def encode(message: msgspec.Struct) -> tuple[bytes, list[memoryview]]:
    """A message as its control header and the buffers to send after it.

    Raises UsageError for a value that cannot travel (saying what to send instead).
    """
    previous = getattr(_local, "out", None)
    _local.out = []
    try:
        control = _encoder.encode(message)
        return control, _local.out
    except (TypeError, OverflowError, ValueError) as exc:
        raise UsageError(f"cannot send {type(message).__name__}: {exc}") from None
    finally:
        buffers = _local.out
        _local.out = previous
        del buffers


def wire_value(value: Any) -> Any:
    """A dynamic value (op arguments, an echo) made ready for a field typed Any:
    tuples stay tuples, and bytes over INLINE_BYTES go out of band."""
    return _wire(value)


# -- decoding -------------------------------------------------------------------------------

T = TypeVar("T")


class _Decoding:
    __slots__ = ("buffers", "used")

    def __init__(self, buffers: Sequence[Any]) -> None:
        self.buffers = buffers
        self.used = [False] * len(buffers)


def _buffer(index: object) -> np.ndarray:
    state: _Decoding = _local.decoding
    if type(index) is not int or not 0 <= index < len(state.buffers):
        raise RemoteProtocolError(f"cannot decode message: no out-of-band buffer {index!r:.40}")
    if state.used[index]:
        raise RemoteProtocolError(f"cannot decode message: buffer {index} is used twice")
    state.used[index] = True
    return np.frombuffer(state.buffers[index], dtype=np.uint8)


def _shape(shape: object, itemsize: int, nbytes: int) -> tuple[int, ...]:
    if (
        type(shape) is not list
        or len(shape) > MAX_DIMS
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise RemoteProtocolError(f"cannot decode message: bad shape {shape!r:.80}")
    if math.prod(shape) * itemsize != nbytes:
        raise RemoteProtocolError(
            f"cannot decode message: shape {shape} needs {math.prod(shape) * itemsize} bytes, "
            f"the buffer holds {nbytes}"
        )
    return tuple(shape)


def _triple(data: memoryview, what: str) -> list[Any]:
    fields = _plain.decode(data)
    if type(fields) is not list or len(fields) != 3:
        raise RemoteProtocolError(f"cannot decode message: malformed {what}")
    return fields


def _ext_hook(code: int, data: memoryview) -> Any:
    if code == _TUPLE:
        items = _values.decode(data)
        if type(items) is not list:
            raise RemoteProtocolError("cannot decode message: malformed tuple")
        return tuple(items)
    if code == _REF:
        if len(data) != 8:
            raise RemoteProtocolError("cannot decode message: malformed reference")
        return Ref(int.from_bytes(data, "big", signed=True))
    if code == _SLICE:
        fields = _triple(data, "slice")
        if not all(v is None or type(v) is int for v in fields):
            raise RemoteProtocolError("cannot decode message: malformed slice")
        return slice(*fields)
    if code == _ELLIPSIS:
        return Ellipsis
    if code == _TENSOR:
        index, dtype, shape = _triple(data, "tensor")
        raw = _buffer(index)
        if type(dtype) is not str or dtype not in TORCH_DTYPES:
            raise RemoteProtocolError(f"cannot decode message: unknown dtype {dtype!r:.40}")
        torch_dtype, itemsize = TORCH_DTYPES[dtype]
        dims = _shape(shape, itemsize, raw.nbytes)
        with torch.inference_mode(False):  # a tensor that counts its in-place changes
            return torch.from_numpy(raw).view(torch_dtype).reshape(dims)
    if code == _NDARRAY:
        index, dtype, shape = _triple(data, "array")
        raw = _buffer(index)
        if type(dtype) is not str or len(dtype) > 16:
            raise RemoteProtocolError(f"cannot decode message: bad numpy dtype {dtype!r:.40}")
        try:
            np_dtype = np.dtype(dtype)
        except TypeError:
            raise RemoteProtocolError(f"cannot decode message: bad numpy dtype {dtype!r}") from None
        if np_dtype.hasobject or np_dtype.fields is not None or np_dtype.itemsize == 0:
            raise RemoteProtocolError(f"cannot decode message: numpy dtype {dtype} is not allowed")
        return raw.view(np_dtype).reshape(_shape(shape, np_dtype.itemsize, raw.nbytes))
    if code == _DTYPE:
        name = bytes(data).decode(errors="replace")
        if name not in TORCH_DTYPES:
            raise RemoteProtocolError(f"cannot decode message: unknown dtype {name!r:.40}")
        return TORCH_DTYPES[name][0]
    if code == _DEVICE:
        return _device(bytes(data).decode(errors="replace"))
    if code == _SIZE:
        dims = _plain.decode(data)
        if type(dims) is not list or len(dims) > MAX_DIMS or not all(type(n) is int for n in dims):
            raise RemoteProtocolError("cannot decode message: malformed size")
        return torch.Size(dims)
    if code == _COMPLEX:
        parts = _plain.decode(data)
        if type(parts) is not list or len(parts) != 2 or not all(type(p) is float for p in parts):
            raise RemoteProtocolError("cannot decode message: malformed complex")
        return complex(*parts)
    if code == _BYTES:
        return _buffer(_plain.decode(data)).tobytes()
    raise RemoteProtocolError(f"cannot decode message: unknown extension type {code}")


def _device(name: str) -> torch.device:
    if len(name) > 16 or name.split(":")[0] not in ("cpu", "cuda", "meta"):
        raise RemoteProtocolError(f"cannot decode message: bad device {name!r:.40}")
    try:
        return torch.device(name)
    except RuntimeError:
        raise RemoteProtocolError(f"cannot decode message: bad device {name!r:.40}") from None


_plain: Final = msgspec.msgpack.Decoder()
_values: Final = msgspec.msgpack.Decoder(ext_hook=_ext_hook)
_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}


def decode(control: bytes | memoryview, buffers: Sequence[Any], kind: type[T]) -> T:
    """Decode a control header as a message of `kind`; `buffers` are the frame's
    out-of-band buffers, each of which the message must use exactly once.

    Raises RemoteProtocolError for anything but a well-formed message of that kind.
    """
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.msgpack.Decoder(kind, ext_hook=_ext_hook)
    previous = getattr(_local, "decoding", None)
    state = _local.decoding = _Decoding(buffers)
    try:
        message: T = decoder.decode(control)
    except RemoteProtocolError:
        raise
    except msgspec.ValidationError as exc:
        raise RemoteProtocolError(
            f"cannot decode message: {exc} (is the peer a djinn of another version?)"
        ) from None
    except (msgspec.DecodeError, RecursionError, ValueError, TypeError) as exc:
        raise RemoteProtocolError(f"cannot decode message: {exc}") from None
    finally:
        _local.decoding = previous
    if not all(state.used):
        raise RemoteProtocolError("cannot decode message: it leaves out-of-band buffers unused")
    return message


def check_value(value: Any, what: str = "value") -> None:
    """Refuse a dynamic value nested deeper than MAX_DEPTH, of more than MAX_NODES
    nodes, or with dict keys other than str and int. Linear in its size."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    nodes = 1
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if kind is list or kind is tuple or kind is dict:
            nodes += len(item)  # counted before any is visited: a flat list of millions stops here
            if nodes > MAX_NODES:
                raise ValueError(f"{what} has more than {MAX_NODES} nodes")
            if depth >= MAX_DEPTH:
                raise ValueError(f"{what} nests deeper than {MAX_DEPTH} levels")
            if kind is dict:
                for key in item:
                    if type(key) is not str and type(key) is not int:
                        raise ValueError(f"{what} has a dict key of type {type(key).__name__}")
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)
