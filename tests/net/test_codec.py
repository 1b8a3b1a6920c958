"""Messages: typed, round-tripping, tensors out of band; the decoder names no code and
costs time linear in its input whatever the structure."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from djinn import messages
from djinn.errors import RemoteProtocolError, UsageError
from djinn.net import codec
from djinn.net.codec import INLINE_BYTES, MAX_DEPTH, MAX_NODES, TORCH_DTYPES, Ref, wire_value


def round_trip(value: object) -> object:
    control, buffers = codec.encode(messages.Echo(wire_value(value)))
    received = [bytearray(memoryview(b).cast("B")) for b in buffers]  # as a socket would
    decoded = codec.decode(control, received, messages.Request)  # type: ignore[arg-type]
    assert isinstance(decoded, messages.Echo)
    return decoded.value


plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=50)
    | st.binary(max_size=INLINE_BYTES * 2),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=10) | st.integers(0, 100), inner, max_size=5)
    ),
    max_leaves=20,
)


@given(plain)
def test_plain_values_round_trip_with_their_types(value: object) -> None:
    back = round_trip(value)
    assert back == value
    assert _types(back) == _types(value)  # a tuple stays a tuple, a list a list


def _types(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return (type(value), [_types(v) for v in value])
    if isinstance(value, dict):
        return (dict, {k: _types(v) for k, v in value.items()})
    return type(value)


@pytest.mark.parametrize("name", sorted(TORCH_DTYPES))
def test_every_torch_dtype_round_trips(name: str) -> None:
    dtype, itemsize = TORCH_DTYPES[name]
    source = torch.arange(24, dtype=torch.uint8)
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
        torch.arange(12.0).reshape(3, 4).t(),
        torch.arange(20).reshape(4, 5)[::2, 1:],
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


def test_tensor_bytes_leave_the_header() -> None:
    control, buffers = codec.encode(messages.Echo({"w": torch.zeros(1000, 1000)}))
    assert len(control) < 100
    assert [b.nbytes for b in buffers] == [4_000_000]


def test_contiguous_tensor_is_sent_from_its_own_storage() -> None:
    tensor = torch.zeros(1000)
    _, [view] = codec.encode(messages.Echo(tensor))
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


def test_torch_types_slices_and_refs_round_trip() -> None:
    value = (torch.float16, torch.device("cpu"), torch.Size([2, 3]), Ref(5), slice(1, None, 2), ...)
    back = round_trip(value)
    assert back == value
    assert type(back[2]) is torch.Size and type(back[3]) is Ref  # type: ignore[index]


@pytest.mark.parametrize(
    "value",
    [
        object(),
        lambda: 1,
        np.float32(1.0),
        np.zeros(2, dtype=object),
        torch.ones(2).to_sparse(),
        {1, 2},
        2**70,
    ],
    ids=["object", "lambda", "numpy-scalar", "object-array", "sparse", "set", "huge-int"],
)
def test_unsendable_values_raise_usage_errors(value: object) -> None:
    with pytest.raises(UsageError, match="cannot send"):
        codec.encode(messages.Echo(wire_value(value)))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_not_a_message(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    control = pickle.dumps(("echo", (_Evil(marker),)), protocol=5)
    with pytest.raises(RemoteProtocolError):
        codec.decode(control, [], messages.Request)  # type: ignore[arg-type]
    assert not marker.exists()
    pickle.loads(control)  # the same bytes unpickled without restriction...
    assert marker.exists()  # ...do run the command, so the check above can fail


def _ext(code: int, payload: bytes) -> bytes:
    return msgspec.msgpack.encode(msgspec.msgpack.Ext(code, payload))


def _echo(value_bytes: bytes) -> bytes:
    """An Echo request whose value is the given raw msgpack."""
    return b"\x92\xa4echo" + value_bytes


@pytest.mark.parametrize(
    "value",
    [
        _ext(5, msgspec.msgpack.encode([0, "float32", [10**12]])),
        _ext(5, msgspec.msgpack.encode([5, "float32", [1]])),
        _ext(5, msgspec.msgpack.encode([0, "qint8", [4]])),
        _ext(5, msgspec.msgpack.encode([0, "float32", [-1]])),
        _ext(5, msgspec.msgpack.encode([0, "float32", "4"])),
        _ext(6, msgspec.msgpack.encode([0, "O", [4]])),
        _ext(6, msgspec.msgpack.encode([0, "V4,i4", [1]])),
        _ext(7, b"os.system"),
        _ext(8, b"cuda:0; rm -rf /"),
        _ext(4, b"\x01"),
        _ext(99, b""),
        _ext(2, msgspec.msgpack.encode(["a", None, None])),
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
        "device",
        "short-ref",
        "unknown-ext",
        "slice-of-str",
    ],
)
def test_malformed_extensions_are_refused(value: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.decode(_echo(value), [bytearray(16)], messages.Request)  # type: ignore[arg-type]


def test_a_buffer_used_twice_or_not_at_all_is_refused() -> None:
    tensor = _ext(5, msgspec.msgpack.encode([0, "uint8", [4]]))
    twice = b"\x92" + tensor + tensor
    with pytest.raises(RemoteProtocolError, match="twice"):
        codec.decode(_echo(twice), [bytearray(4)], messages.Request)  # type: ignore[arg-type]
    with pytest.raises(RemoteProtocolError, match="unused"):
        codec.decode(_echo(b"\xc0"), [bytearray(4)], messages.Request)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "value",
    [
        b"\x91" * (MAX_DEPTH + 1) + b"\xc0",  # nested lists
        b"\x81\xa1k" * (MAX_DEPTH + 1) + b"\xc0",  # nested maps
        b"\xdd" + (MAX_NODES + 1).to_bytes(4, "big") + b"\xc0" * (MAX_NODES + 1),
        b"\x81\x91\x01\xc0",  # a list as a dict key
    ],
    ids=["deep-lists", "deep-maps", "too-many-nodes", "list-key"],
)
def test_values_past_the_structure_limits_are_refused(value: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        codec.decode(_echo(value), [], messages.Request)  # type: ignore[arg-type]


def test_nested_tuples_past_the_depth_limit_are_refused() -> None:
    value = b"\xc0"
    for _ in range(MAX_DEPTH + 2):
        value = _ext(1, b"\x91" + value)
    with pytest.raises(RemoteProtocolError):
        codec.decode(_echo(value), [], messages.Request)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"\x92\xa4echo",  # truncated
        b"\x91\xa4nope",  # unknown tag
        b"\x93\xa4echo\xc0\xc0",  # an extra field: a newer peer's message
        b"\xdd\xff\xff\xff\xff",  # an array that announces 4 billion items
        b"\xdf\xff\xff\xff\xff",  # a map that does the same
        b"\x92\xa3run\xc0",  # a field of the wrong type
    ],
    ids=[
        "empty",
        "truncated",
        "unknown-tag",
        "extra-field",
        "huge-array",
        "huge-map",
        "wrong-type",
    ],
)
def test_broken_messages_raise_the_protocol_error_at_once(blob: bytes) -> None:
    start = time.perf_counter()
    with pytest.raises(RemoteProtocolError):
        codec.decode(blob, [], messages.Request)  # type: ignore[arg-type]
    assert time.perf_counter() - start < 0.1


def test_decoding_a_full_size_header_of_small_nodes_is_fast() -> None:
    """The old pickle header spent 18 s scanning 16 MiB of trivial opcodes; a 4 MiB msgpack
    header of the most nodes a message may hold decodes (or is refused) in milliseconds."""
    flat = b"\xdd" + (4 * 2**20 - 8).to_bytes(4, "big") + b"\xc0" * (4 * 2**20 - 8)
    start = time.perf_counter()
    with pytest.raises(RemoteProtocolError):
        codec.decode(_echo(flat), [], messages.Request)  # type: ignore[arg-type]
    assert time.perf_counter() - start < 1.0


def test_an_unknown_tag_says_the_peer_may_be_another_version() -> None:
    with pytest.raises(RemoteProtocolError, match="another version"):
        codec.decode(b"\x91\xa7newkind", [], messages.Request)  # type: ignore[arg-type]


def test_a_bad_fingerprint_is_refused_at_decode() -> None:
    spec = msgspec.msgpack.encode(["register", ["transformers", "X", "../../etc", [], []]])
    with pytest.raises(RemoteProtocolError, match="fingerprint"):
        codec.decode(spec, [], messages.Request)  # type: ignore[arg-type]
