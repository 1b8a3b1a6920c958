"""Index guards, on CPU tensors and without sockets.

CPU torch raises "index ... out of bounds" exactly where CUDA would hit a
device-side assert, so it is the oracle here: a guarded operation must never
raise it, must flag only the inputs that raise it unguarded (or that select
nothing, where torch reads no index), and must give the unguarded result
whenever nothing is flagged.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from djinn.errors import RemoteUsageError
from djinn.ops import lookup
from djinn.server.bounds import Deferred, guard

# torch warns of its legacy reading of a list subscript, which the guard mirrors
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")

X = torch.arange(60).reshape(3, 4, 5)
# what CPU torch says of an index value out of range (not of a bad dimension number)
_OUT_OF_RANGE = re.compile(r"\bind(ex|ices)\b.* out of .*\b(bounds|range)\b", re.IGNORECASE)


def _run(name: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
    """(guarded result or the exception it raised, the batch's failure or None)."""
    deferred = Deferred()
    deferred.at(7, name)
    fn = lookup(name)
    assert fn is not None
    try:
        safe_args, safe_kwargs = guard(name, args, kwargs or {}, deferred)
        result: Any = fn(*safe_args, **safe_kwargs)
    except Exception as exc:  # the outcome is what the tests compare
        result = exc
    return result, deferred.first_failure()


def _plain(name: str, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
    fn = lookup(name)
    assert fn is not None
    try:
        return fn(*args, **(kwargs or {}))
    except Exception as exc:
        return exc


def _is_out_of_range(value: Any) -> bool:
    return isinstance(value, Exception) and _OUT_OF_RANGE.search(str(value)) is not None


def _check_against_torch(name: str, args: tuple[Any, ...], kwargs: Any = None) -> None:
    guarded, failure = _run(name, args, kwargs)
    plain = _plain(name, args, kwargs)
    assert not _is_out_of_range(guarded), guarded  # on CUDA: a device-side assert
    empty = isinstance(plain, torch.Tensor) and plain.numel() == 0
    if isinstance(guarded, RemoteUsageError):  # refused before torch saw it
        # x[empty, [0]] with a dimension of size 0: torch reads no index, the guard refuses
        assert isinstance(plain, Exception) or empty, plain
    elif isinstance(guarded, Exception):  # torch's own refusal on the host, unchanged
        assert type(plain) is type(guarded), plain
    elif failure is not None:
        assert failure[0] == 7 and failure[1] == name
        # torch reads no index for an empty selection (x[False, bad]); the guard still flags
        assert _is_out_of_range(plain) or empty, plain
    else:
        assert not isinstance(plain, Exception), plain
        assert torch.equal(guarded, plain)


T = torch.tensor
KEYS = {
    "int tensor": T([0, 2]),
    "negative ids": T([-1, -3]),
    "too large": T([0, 3]),
    "too negative": T([-4]),
    "second dim": (slice(None), T([3, -4])),
    "second dim too large": (slice(None), T([4])),
    "after ellipsis": (Ellipsis, T([4, -5])),
    "after ellipsis too large": (Ellipsis, T([5])),
    "after none": (None, 0, T([0, 3])),
    "after none too large": (None, 0, T([4])),
    "after a mask": (T([True, False, True]), T([1, 4])),
    "after a mask, too large": (T([True, False, True]), T([1, 5])),
    "after a 2-d mask": (torch.ones(3, 4, dtype=torch.bool), T([4])),
    "after a 2-d mask, too large": (torch.ones(3, 4, dtype=torch.bool), T([5])),
    "after a python bool": (True, T([2])),
    "after a python bool, too large": (True, T([3])),
    "int32": T([1, 2], dtype=torch.int32),
    "int32 too large": T([9], dtype=torch.int32),
    "list": [0, 2],
    "list too large": [0, 3],
    "floats in a list": [0.7, 2.9],
    "list in a tuple": (0, [1, 3]),
    "list in a tuple, too large": (0, [1, 4]),
    "legacy list of lists": [[0, 1], [3, 2]],
    "legacy list of lists, too large": [[0, 1], [4, 2]],
    "2-d index": T([[0, 1], [2, 0]]),
    "two index tensors": (T([0, 2]), T([3, 1])),
    "two index tensors, second too large": (T([0, 2]), T([3, 4])),
    "empty": T([], dtype=torch.long),
    "0-dim": T(2),
    "0-dim too large": T(3),
    "too many indices": (0, 0, 0, T([0])),
    "index shapes that do not broadcast": (T([0, 1]), T([0, 1, 2])),
    "mask of the wrong shape": T([True, False]),
    "float tensor": T([0.5]),
    "plain ints": (1, 2, 3),
}


@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
def test_subscripts_against_torch(key: Any) -> None:
    _check_against_torch("Tensor.__getitem__", (X, key))


def test_an_out_of_range_subscript_is_flagged_and_runs_safely() -> None:
    result, failure = _run("Tensor.__getitem__", (X, (slice(None), T([1, 9]))))
    assert failure is not None
    index, name, error = failure
    assert (index, name) == (7, "Tensor.__getitem__")
    assert "outside [-4, 4)" in str(error) and isinstance(error, RemoteUsageError)
    assert result.shape == (3, 2, 5)


def test_a_second_ellipsis_is_refused() -> None:
    result, _ = _run("Tensor.__getitem__", (X, (Ellipsis, 0, Ellipsis)))
    assert isinstance(result, RemoteUsageError) and "Ellipsis" in str(result)


def test_a_sequence_torch_cannot_read_is_refused() -> None:
    result, _ = _run("Tensor.__getitem__", (X, (0, [[0, 1], [2]])))
    assert isinstance(result, RemoteUsageError) and "list of ints" in str(result)


SELECTIONS = {
    "gather": ("Tensor.gather", (X, 2, T([[[0, 4]] * 4] * 3)), {}),
    "gather too large": ("Tensor.gather", (X, 2, T([[[0, 5]] * 4] * 3)), {}),
    "gather negative": ("torch.gather", (X, -1, T([[[-1, 0]] * 4] * 3)), {}),
    "gather by keyword": ("torch.gather", (X,), {"dim": 1, "index": T([[[4, 0]]])}),
    "gather by keyword, valid": ("torch.gather", (X,), {"dim": 1, "index": T([[[3, 0]]])}),
    "gather from a 0-dim tensor": ("Tensor.gather", (T(5), -1, T(1)), {}),
    "gather with a bad dim": ("Tensor.gather", (X, 3, T([[[0]]])), {}),
    "index_select": ("torch.index_select", (X, 0, T([2, 0])), {}),
    "index_select too large": ("Tensor.index_select", (X, 1, T([4])), {}),
    "index_select negative": ("Tensor.index_select", (X, 1, T([-1])), {}),
    "index_select int32": ("Tensor.index_select", (X, 2, T([4], dtype=torch.int32)), {}),
    "index_select int32 too large": ("Tensor.index_select", (X, 2, T([5], dtype=torch.int32)), {}),
}


@pytest.mark.parametrize("case", SELECTIONS.values(), ids=SELECTIONS.keys())
def test_gather_and_index_select_against_torch(case: Any) -> None:
    _check_against_torch(*case)


def test_an_index_of_an_empty_dimension_is_refused_at_once() -> None:
    result, failure = _run("torch.index_select", (torch.ones(2, 0), 1, T([0])))
    assert isinstance(result, RemoteUsageError) and failure is None


ROWS = {
    "valid": T([[0.2, 0.8], [1.0, 0.0]]),
    "nan": T([[0.2, float("nan")], [1.0, 0.0]]),
    "inf": T([[0.2, 0.8], [float("inf"), 0.0]]),
    "negative": T([0.5, -0.1]),
    "sums to 0": T([[0.0, 0.0], [0.5, 0.5]]),
    "sum overflows float32": T([3e38, 3e38]),
}


@pytest.mark.parametrize("probs", ROWS.values(), ids=ROWS.keys())
def test_multinomial_rows_that_are_not_distributions_are_flagged(probs: torch.Tensor) -> None:
    valid = bool(
        (torch.isfinite(probs) & (probs >= 0)).all()
        and (probs.double().sum(-1) > 0).all()
        and torch.isfinite(probs.double().sum(-1)).all()
    )
    result, failure = _run("torch.multinomial", (probs, 3), {"replacement": True})
    assert (failure is None) == valid
    assert isinstance(result, torch.Tensor) and result.shape == (*probs.shape[:-1], 3)
    if not valid:
        assert "cannot sample" in str(failure[2])  # type: ignore[index]


def test_operations_without_indices_pass_through_untouched() -> None:
    deferred = Deferred()
    args, kwargs = (X, 1), {"keepdim": True}
    assert guard("torch.sum", args, kwargs, deferred) == (args, kwargs)
    assert deferred.first_failure() is None


# -- any subscript -------------------------------------------------------------------------


@st.composite
def subscripts(draw: st.DrawFn) -> tuple[torch.Tensor, Any]:
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=4))
    source = torch.arange(int(torch.tensor(shape, dtype=torch.long).prod())).reshape(shape)
    bound = max(shape, default=1) * 2 + 1
    index = st.lists(st.integers(-bound, bound), min_size=1, max_size=3)
    item = st.one_of(
        st.integers(-bound, bound),
        st.builds(slice, st.none() | st.integers(-3, 3), st.none() | st.integers(-3, 3)),
        st.just(None),
        st.just(Ellipsis),
        st.booleans(),
        index.map(torch.tensor),
        index,
        st.lists(st.booleans(), min_size=1, max_size=4).map(torch.tensor),
    )
    items = draw(
        st.lists(item, min_size=1, max_size=4).filter(lambda i: sum(x is ... for x in i) <= 1)
    )
    key = tuple(items) if draw(st.booleans()) or len(items) > 1 else items[0]
    return source, key


@given(subscripts())
def test_any_subscript_against_torch(case: tuple[torch.Tensor, Any]) -> None:
    source, key = case
    _check_against_torch("Tensor.__getitem__", (source, key))
