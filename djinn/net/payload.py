"""Messages: Python values <-> a control header plus out-of-band buffers.

The control header is pickle protocol 5, but never decoded by an
unrestricted unpickler. Values djinn knows how to ship (tensors, numpy
arrays, large bytes, dtypes, devices, `Ref`s) leave the pickle through
`persistent_id` as small validated tuples; everything else must be a plain
value (numbers, str, bytes, None, list, tuple, dict, set, slice, range,
Ellipsis). The decoder's `find_class` admits only the harmless builtins
below, so a payload whose `__reduce__` names `os.system` raises
`RemoteProtocolError` and runs nothing.

Tensor and array bytes never enter the pickle: they are memoryviews of the
tensor's own storage on the way out, and views of the receive buffers
(filled in place by the socket) on the way in.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, Final

import numpy as np
import torch

from djinn.errors import RemoteProtocolError, UsageError

# bytes up to this size travel inside the pickle; larger ones out of band.
INLINE_BYTES: Final = 4096
# torch's own limit on the number of dimensions of a tensor.
MAX_DIMS: Final = 64

_PLAIN: Final = frozenset(
    {
        type(None),
        bool,
        int,
        float,
        complex,
        str,
        list,
        tuple,
        dict,
        set,
        frozenset,
        slice,
        range,
        EllipsisType,
        bytearray,
    }
)

# Builtins the decoder may name. None of them allocates in proportion to an
# argument (set(), list(), bytearray() would: set(range(10**12))).
_SAFE_GLOBALS: Final = {
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("builtins", "range"): range,
    ("builtins", "Ellipsis"): Ellipsis,
}
_SAFE_CALLABLES: Final = frozenset({slice, complex, range})


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


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to an object the server holds for one session."""

    id: int


def dumps(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Encode `obj` as a control header and the buffers to send after it.

    Raises UsageError for a value that cannot travel (with what to send instead).
    """
    if type(obj) in _SCALARS:
        return pickle.dumps(obj, protocol=5), []
    pickler = getattr(_local, "pickler", None)
    if pickler is None or pickler.busy:
        pickler = _local.pickler = _Pickler()
    return pickler.encode(obj)


def loads(control: bytes, buffers: Sequence[Any]) -> Any:
    """Decode a control header; `buffers` are the received out-of-band buffers.

    Raises RemoteProtocolError for anything but a well-formed djinn message.
    """
    try:
        _check_opcodes(control)
        unpickler = _Unpickler(io.BytesIO(control))
        unpickler.buffers = buffers
        return unpickler.load()
    except RemoteProtocolError:
        raise
    except Exception as exc:  # a malformed pickle raises any of a dozen types
        raise RemoteProtocolError(f"cannot decode message: {type(exc).__name__}: {exc}") from None


def _check_opcodes(control: bytes) -> None:
    """Refuse memo writes by index (PUT, LONG_BINPUT): CPython's C unpickler grows
    its memo table to the index it is given, so `LONG_BINPUT 680820116` in a
    61-byte message allocates 5 GB. djinn's encoder (protocol 5) never emits
    them; it numbers memo entries with MEMOIZE."""
    for opcode, _, _ in pickletools.genops(control):
        if opcode.code in _MEMO_BY_INDEX:
            raise RemoteProtocolError(
                f"cannot decode message: it uses the {opcode.name} opcode, which djinn never sends"
            )


_MEMO_BY_INDEX: Final = frozenset({"p", "r"})  # PUT, LONG_BINPUT (BINPUT's index is one byte)
_SCALARS: Final = frozenset({type(None), bool, int, float, str})
# One reusable pickler per thread: building one costs more than a small dump.
_local = threading.local()


class _Pickler(pickle.Pickler):
    def __init__(self) -> None:
        self._out = io.BytesIO()
        super().__init__(self._out, protocol=5)
        self._buffers: list[memoryview] = []
        self.busy = False

    def encode(self, obj: Any) -> tuple[bytes, list[memoryview]]:
        self.busy = True
        try:
            self.dump(obj)
            return self._out.getvalue(), self._buffers
        finally:
            self._out.seek(0)
            self._out.truncate()
            self.clear_memo()
            self._buffers = []
            self.busy = False

    def persistent_id(self, obj: Any) -> Any:
        kind = type(obj)
        if kind in _PLAIN:
            return None
        if kind is bytes:
            return None if len(obj) <= INLINE_BYTES else ("bytes", self._add(memoryview(obj)))
        if isinstance(obj, torch.Tensor):
            return self._tensor(obj)
        if kind is np.ndarray:
            return self._ndarray(obj)
        if kind is torch.dtype:
            return ("dtype", _dtype_name(obj))
        if kind is torch.device:
            return ("device", str(obj))
        if kind is torch.Size:
            return ("size", tuple(obj))
        if kind is Ref:
            return ("ref", obj.id)
        if kind is type and obj in _SAFE_CALLABLES:
            return None  # slice, complex and range pickle as calls to themselves
        raise UsageError(
            f"cannot send a {kind.__module__}.{kind.__qualname__}: only tensors, numpy arrays, "
            "bytes, str, numbers and lists/tuples/dicts of these travel; convert it first"
        )

    def _add(self, view: memoryview) -> int:
        self._buffers.append(view)
        return len(self._buffers) - 1

    def _tensor(self, tensor: torch.Tensor) -> tuple[str, int, str, tuple[int, ...]]:
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise UsageError(
                f"cannot send a {tensor.layout} {tensor.dtype} tensor: only dense, "
                "unquantized tensors travel; call .to_dense() or .dequantize() first"
            )
        name = _dtype_name(tensor.dtype)
        return ("tensor", self._add(tensor_bytes(tensor)), name, tuple(tensor.shape))

    def _ndarray(self, array: np.ndarray) -> tuple[str, int, str, tuple[int, ...]]:
        if array.dtype.hasobject or array.dtype.fields is not None:
            raise UsageError(
                f"cannot send a numpy array of dtype {array.dtype}: only plain numeric, "
                "bool and fixed-width string dtypes travel"
            )
        data = np.ascontiguousarray(array)
        raw = data.reshape(-1).view(np.uint8)
        return ("ndarray", self._add(raw.data), data.dtype.str, data.shape)


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


class _Unpickler(pickle.Unpickler):
    buffers: Sequence[Any] = ()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise RemoteProtocolError(
                f"cannot decode message: it names {module}.{name}, which is not allowed on the wire"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or not isinstance(pid[0], str):
            raise RemoteProtocolError(f"cannot decode message: malformed value tag {pid!r:.80}")
        tag, *args = pid
        decode = _DECODERS.get(tag)
        if decode is None:
            raise RemoteProtocolError(f"cannot decode message: unknown value tag {tag!r:.40}")
        try:
            return decode(self.buffers, *args)
        except RemoteProtocolError:
            raise
        except Exception as exc:
            raise RemoteProtocolError(f"cannot decode {tag}: {exc}") from None


def _buffer(buffers: Sequence[Any], index: object) -> np.ndarray:
    if type(index) is not int or not 0 <= index < len(buffers):
        raise RemoteProtocolError(f"cannot decode message: no out-of-band buffer {index!r:.40}")
    return np.frombuffer(buffers[index], dtype=np.uint8)


def _shape(shape: object, itemsize: int, nbytes: int) -> tuple[int, ...]:
    if (
        type(shape) is not tuple
        or len(shape) > MAX_DIMS
        or not all(type(n) is int and n >= 0 for n in shape)
    ):
        raise RemoteProtocolError(f"cannot decode message: bad shape {shape!r:.80}")
    if math.prod(shape) * itemsize != nbytes:
        raise RemoteProtocolError(
            f"cannot decode message: shape {shape} needs {math.prod(shape) * itemsize} bytes, "
            f"the buffer holds {nbytes}"
        )
    return shape


def _decode_tensor(buffers: Sequence[Any], index: object, dtype: object, shape: object) -> Any:
    raw = _buffer(buffers, index)
    if type(dtype) is not str or dtype not in TORCH_DTYPES:
        raise RemoteProtocolError(f"cannot decode message: unknown dtype {dtype!r:.40}")
    torch_dtype, itemsize = TORCH_DTYPES[dtype]
    dims = _shape(shape, itemsize, raw.nbytes)
    return torch.from_numpy(raw).view(torch_dtype).reshape(dims)


def _decode_ndarray(buffers: Sequence[Any], index: object, dtype: object, shape: object) -> Any:
    raw = _buffer(buffers, index)
    if type(dtype) is not str or len(dtype) > 16:
        raise RemoteProtocolError(f"cannot decode message: bad numpy dtype {dtype!r:.40}")
    np_dtype = np.dtype(dtype)
    if np_dtype.hasobject or np_dtype.fields is not None or np_dtype.itemsize == 0:
        raise RemoteProtocolError(f"cannot decode message: numpy dtype {dtype} is not allowed")
    dims = _shape(shape, np_dtype.itemsize, raw.nbytes)
    return raw.view(np_dtype).reshape(dims)


def _decode_bytes(buffers: Sequence[Any], index: object) -> bytes:
    return _buffer(buffers, index).tobytes()


def _decode_dtype(buffers: Sequence[Any], name: object) -> torch.dtype:
    if type(name) is not str or name not in TORCH_DTYPES:
        raise RemoteProtocolError(f"cannot decode message: unknown dtype {name!r:.40}")
    return TORCH_DTYPES[name][0]


def _decode_device(buffers: Sequence[Any], name: object) -> torch.device:
    if type(name) is not str or len(name) > 32:
        raise RemoteProtocolError(f"cannot decode message: bad device {name!r:.40}")
    return torch.device(name)


def _decode_size(buffers: Sequence[Any], dims: object) -> torch.Size:
    if type(dims) is not tuple or not all(type(n) is int for n in dims):
        raise RemoteProtocolError(f"cannot decode message: bad size {dims!r:.80}")
    return torch.Size(dims)


def _decode_ref(buffers: Sequence[Any], ref_id: object) -> Ref:
    if type(ref_id) is not int:
        raise RemoteProtocolError(f"cannot decode message: bad reference {ref_id!r:.40}")
    return Ref(ref_id)


_DECODERS: Final[dict[str, Callable[..., Any]]] = {
    "tensor": _decode_tensor,
    "ndarray": _decode_ndarray,
    "bytes": _decode_bytes,
    "dtype": _decode_dtype,
    "device": _decode_device,
    "size": _decode_size,
    "ref": _decode_ref,
}
