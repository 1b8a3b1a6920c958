"""Messages: values round trip with tensors out of band; the decoder runs no code."""

from __future__ import annotations

import math
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from djinn.errors import RemoteProtocolError, UsageError
from djinn.net import payload
from djinn.net.payload import INLINE_BYTES, TORCH_DTYPES, Ref


def round_trip(value: object) -> object:
    control, buffers = payload.dumps(value)
    received = [bytearray(memoryview(b).cast("B")) for b in buffers]  # as a socket would
    return payload.loads(control, received)


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=INLINE_BYTES * 2),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)


@given(plain)
def test_plain_values_round_trip(value: object) -> None:
    assert round_trip(value) == value


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
def test_every_torch_dtype_round_trips(name: str) -> None:
    dtype = TORCH_DTYPES[name][0]
    source = torch.arange(24, dtype=torch.uint8).view(torch.uint8)
    itemsize = TORCH_DTYPES[name][1]
    tensor = source[: 24 // itemsize * itemsize].view(dtype).reshape(-1)
    back = round_trip(tensor)
    assert isinstance(back, torch.Tensor)
    assert back.dtype == dtype and back.shape == tensor.shape
    assert torch.equal(back.view(torch.uint8), tensor.view(torch.uint8))


@pytest.mark.parametrize(
    "tensor",
    [
        torch.tensor(3.5),
        torch.empty(0, 4),
        torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
        torch.arange(20).reshape(4, 5)[::2, 1:],  # strided view
        torch.randn(3, 3, dtype=torch.bfloat16),
        torch.randn(2, 2, dtype=torch.complex64).conj(),
        torch.nn.Parameter(torch.ones(2)),
    ],
    ids=["0-dim", "empty", "transposed", "strided", "bfloat16", "conj", "parameter"],
)
def test_tensor_shapes_and_layouts(tensor: torch.Tensor) -> None:
    back = round_trip(tensor)
    assert isinstance(back, torch.Tensor) and type(back) is torch.Tensor
    assert back.shape == tensor.shape and back.dtype == tensor.dtype
    assert torch.equal(back, tensor.detach().resolve_conj())


def test_tensor_bytes_leave_the_pickle() -> None:
    tensor = torch.zeros(1000, 1000)
    control, buffers = payload.dumps({"w": tensor})
    assert len(control) < 200
    assert [b.nbytes for b in buffers] == [4_000_000]


def test_contiguous_tensor_is_sent_from_its_own_storage() -> None:
    tensor = torch.zeros(1000)
    _, [view] = payload.dumps(tensor)
    tensor[0] = 7.0
    assert np.frombuffer(view, dtype=np.float32)[0] == 7.0  # no copy was taken


@pytest.mark.parametrize(
    "array",
    [
        np.arange(10, dtype=np.int16),
        np.ones((3, 4), dtype=">f8"),
        np.array(["ab", "c"]),
        np.zeros(0),
    ],
    ids=["int16", "big-endian", "unicode", "empty"],
)
def test_numpy_arrays_round_trip(array: np.ndarray) -> None:
    back = round_trip(array)
    assert isinstance(back, np.ndarray) and back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_torch_types_and_refs_round_trip() -> None:
    value = (torch.float16, torch.device("cpu"), torch.Size([2, 3]), Ref(5), slice(1, None, 2), ...)
    assert round_trip(value) == value


@pytest.mark.parametrize(
    "value",
    [object(), lambda: 1, np.float32(1.0), np.zeros(2, dtype=object), torch.ones(2).to_sparse()],
    ids=["object", "lambda", "numpy-scalar", "object-array", "sparse"],
)
def test_unsendable_values_raise_usage_errors(value: object) -> None:
    with pytest.raises(UsageError, match="cannot send"):
        payload.dumps(value)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_reduce_payload_calling_os_system_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    control = pickle.dumps(("echo", (_Evil(marker),)), protocol=5)
    with pytest.raises(RemoteProtocolError, match=r"posix\.system.*not allowed"):
        payload.loads(control, [])
    assert not marker.exists()
    pickle.loads(control)  # the same bytes unpickled without restriction...
    assert marker.exists()  # ...do run the command, so the check above can fail


@pytest.mark.parametrize(
    "pid",
    [
        ("tensor", 0, "float32", (10**12,)),
        ("tensor", 5, "float32", (1,)),
        ("tensor", 0, "qint8", (4,)),
        ("tensor", 0, "float32", (-1,)),
        ("tensor", 0, "float32", "4"),
        ("ndarray", 0, "O", (4,)),
        ("ndarray", 0, "V4,i4", (1,)),
        ("dtype", "os.system"),
        ("nonsense",),
        "ref",
    ],
    ids=[
        "huge-shape",
        "bad-index",
        "quantized",
        "negative",
        "shape-type",
        "object",
        "structured",
        "dtype",
        "tag",
        "not-a-tuple",
    ],
)
def test_malformed_persistent_ids_are_refused(pid: object) -> None:
    class Forge(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            return pid if obj == "X" else None

    import io

    out = io.BytesIO()
    Forge(out, protocol=5).dump(["X"])
    with pytest.raises(RemoteProtocolError):
        payload.loads(out.getvalue(), [bytearray(16)])


def test_a_memo_index_bomb_is_refused_before_it_allocates() -> None:
    # 61 bytes that made CPython's unpickler allocate a 5 GB memo table (found by the fuzzer)
    blob = b"\x80\x05}\x8c\x06seorver" + b"r" + (680_820_116).to_bytes(4, "little") + b"."
    start = time.perf_counter()
    with pytest.raises(RemoteProtocolError, match="LONG_BINPUT"):
        payload.loads(blob, [])
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x80\x05", b"garbage", pickle.dumps(math.pi)[:-1], b"\x80\x05cbuiltins\nset\n."],
    ids=["empty", "truncated-proto", "garbage", "no-stop", "set-global"],
)
def test_broken_pickles_raise_the_protocol_error(blob: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        payload.loads(blob, [])
