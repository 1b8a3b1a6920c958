"""Index checks that cannot end the server, and cost no synchronization.

On CUDA an out-of-range index (a token id, a gather or index_select index, an
integer tensor in a subscript) or an invalid multinomial row is not an
exception but a device-side assert: the process loses its CUDA context, and
every session with it. Reading the values to check them would synchronize
the device at every such operation. Instead each bad value is replaced,
where it lies, by one that is safe (index 0, a uniform row), and a flag per
operation is kept; `Deferred.first_failure` reads all of a batch's flags at
once, when the batch is done, and names the first operation that had a bad
value.
The same path runs on every device, so the CPU tests exercise it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, Final

import numpy as np
import torch

from djinn.errors import RemoteUsageError

_INDEX_DTYPES: Final = (torch.int64, torch.int32)
_MASK_DTYPES: Final = (torch.bool, torch.uint8)
# torch reads a list subscript shorter than this that holds a slice, None,
# Ellipsis, a tensor or a sequence as a tuple of indices (numpy's legacy rule)
_LEGACY_TUPLE_LIMIT: Final = 32


class Deferred:
    """The flags of one batch: (operation index, name, any-bad flag on the device, error).

    `eager`: values on the host are read at once instead (a CPU server: reading them
    costs no synchronization there), and a bad one raises its error immediately.
    """

    def __init__(self, eager: bool = False) -> None:
        self._flags: list[tuple[int, str, torch.Tensor, RemoteUsageError]] = []
        self.op = 0
        self.name = ""
        self.eager = eager

    def at(self, index: int, name: str) -> None:
        """The operation that the next flags belong to."""
        self.op, self.name = index, name

    def flag(self, bad: torch.Tensor, error: RemoteUsageError) -> None:
        self._flags.append((self.op, self.name, bad.any(), error))

    def first_failure(self) -> tuple[int, str, RemoteUsageError] | None:
        """The first flagged operation, reading every flag in one synchronization."""
        if not self._flags:
            return None
        device = self._flags[0][2].device
        bad = torch.stack([flag.to(device) for _, _, flag, _ in self._flags]).cpu()
        if not bool(bad.any()):
            return None
        index, name, _, error = self._flags[int(bad.nonzero()[0])]
        return index, name, error


class OutOfRange(RemoteUsageError):
    pass


def safe_index(
    index: torch.Tensor, size: int, negative: bool, what: str, deferred: Deferred
) -> torch.Tensor:
    """`index` with every value outside the valid range replaced by 0."""
    if index.numel() == 0:
        return index
    low = -size if negative else 0
    if size == 0:  # no value is valid, and the shapes alone say so
        raise OutOfRange(f"cannot index {what}: it has size 0")
    error = OutOfRange(f"cannot index {what}: an index lies outside [{low}, {size})")
    return within(index, low, size, error, deferred)


def within(
    values: torch.Tensor, low: int, high: int, error: RemoteUsageError, deferred: Deferred
) -> torch.Tensor:
    """`values` with each one outside [low, high) replaced by 0, flagged as `error`."""
    if deferred.eager and values.device.type == "cpu":
        if values.numel() and (int(values.min()) < low or int(values.max()) >= high):
            raise error
        return values
    bad = (values < low) | (values >= high)
    deferred.flag(bad, error)
    return values.masked_fill(bad, 0)


# -- the operations that take indices ----------------------------------------------------

Guard = Callable[
    [tuple[Any, ...], dict[str, Any], Deferred], tuple[tuple[Any, ...], dict[str, Any]]
]


def guard(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], deferred: Deferred
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The arguments of operation `name` with every index made safe (flagged in
    `deferred`). Arguments torch would refuse on the host anyway go through as they are."""
    check = _GUARDS.get(name)
    return check(args, kwargs, deferred) if check is not None else (args, kwargs)


def _selection(
    args: tuple[Any, ...], kwargs: dict[str, Any], deferred: Deferred, name: str
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """gather and index_select: (source, dim, index), by position or keyword; neither
    takes negative indices."""
    names = ("input", "dim", "index")
    bound = {**dict(zip(names, args, strict=False)), **kwargs}
    source, dim, index = (bound.get(n) for n in names)
    if not (isinstance(index, torch.Tensor) and index.dtype in _INDEX_DTYPES):
        return args, kwargs  # no index values to check: torch judges the rest on the host
    if type(dim) is not int:  # a tensor dim would let the index through unchecked
        raise RemoteUsageError(f"cannot run {name}: dim must be an int, got {type(dim).__name__}")
    if not (
        isinstance(source, torch.Tensor) and -max(source.dim(), 1) <= dim < max(source.dim(), 1)
    ):
        return args, kwargs
    size = source.shape[dim] if source.dim() else 1
    safe = safe_index(index, size, False, f"dimension {dim} of {name}'s input", deferred)
    if "index" in kwargs:
        return args, {**kwargs, "index": safe}
    return (*args[:2], safe, *args[3:]), kwargs


def _multinomial(
    args: tuple[Any, ...], kwargs: dict[str, Any], deferred: Deferred
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Rows that are not a distribution (inf, nan, negative, summing to 0) become uniform."""
    probs = args[0] if args else kwargs.get("input")
    if not (
        isinstance(probs, torch.Tensor) and probs.is_floating_point() and probs.dim() in (1, 2)
    ):
        return args, kwargs
    total = probs.sum(-1, dtype=torch.float64)
    fine = (torch.isfinite(probs) & (probs >= 0)).all(-1) & torch.isfinite(total) & (total > 0)
    error = OutOfRange(
        "cannot sample: a row of probabilities holds inf, nan, a negative value or sums to 0"
    )
    deferred.flag(~fine, error)
    safe = torch.where(fine.unsqueeze(-1), probs, torch.ones_like(probs))
    if args:
        return (safe, *args[1:]), kwargs
    return args, {**kwargs, "input": safe}


def _subscript(
    args: tuple[Any, ...], kwargs: dict[str, Any], deferred: Deferred
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """tensor[key]: each integer index tensor (or sequence, which torch makes one) is
    checked against the size of the dimension it indexes; plain ints at once."""
    if len(args) != 2 or kwargs or not isinstance(args[0], torch.Tensor):
        return args, kwargs
    source, key = args
    items = [_as_index(item, source.device) for item in _key_items(key)]
    shape = list(source.shape)
    used = sum(_dims_used(item) for item in items if item is not Ellipsis)
    if used > len(shape):
        raise RemoteUsageError(f"cannot index: too many indices for a tensor of shape {shape}")
    if sum(item is Ellipsis for item in items) > 1:  # numpy refuses it; torch's reading is odd
        raise RemoteUsageError("cannot index with more than one Ellipsis (...)")
    dim, safe = 0, []  # dim: the source dimension the next item indexes
    for item in items:
        if item is Ellipsis:  # it stands for the dimensions nothing else indexes
            dim += len(shape) - used
            safe.append(item)
            continue
        if isinstance(item, torch.Tensor) and item.dtype in _INDEX_DTYPES:
            what = f"dimension {dim} of a tensor of shape {shape}"
            item = safe_index(item, shape[dim], True, what, deferred)
        elif type(item) is int and not -shape[dim] <= item < shape[dim]:  # known: no deferring
            raise OutOfRange(
                f"cannot index dimension {dim} of a tensor of shape {shape}: "
                f"index {item} lies outside [{-shape[dim]}, {shape[dim]})"
            )
        dim += _dims_used(item)
        safe.append(item)
    return (source, tuple(safe)), kwargs


def _key_items(key: Any) -> tuple[Any, ...]:
    """The subscript as the tuple of indices torch reads it as."""
    if isinstance(key, tuple):
        return key
    if isinstance(key, list) and len(key) < _LEGACY_TUPLE_LIMIT:
        nested = (torch.Tensor, list, tuple, slice, type(None), type(Ellipsis))
        if any(isinstance(k, nested) for k in key):
            return tuple(key)
    return (key,)


def _as_index(item: Any, device: torch.device) -> Any:
    """A sequence in a subscript as the tensor torch makes of it (bools stay a mask,
    anything else becomes int64), so that it can be checked."""
    if not isinstance(item, (list, tuple, np.ndarray)):
        return item
    try:
        tensor = torch.as_tensor(item, device=device)
    except (TypeError, ValueError, RuntimeError):
        raise RemoteUsageError(
            "cannot index with this sequence: use a tensor or a list of ints"
        ) from None
    return tensor if tensor.dtype in _MASK_DTYPES else tensor.long()


def _dims_used(item: Any) -> int:
    if item is None or isinstance(item, bool):
        return 0  # a new dimension
    if isinstance(item, torch.Tensor) and item.dtype in _MASK_DTYPES:
        return item.dim()
    return 1


_GUARDS: Final[dict[str, Guard]] = {
    "torch.gather": partial(_selection, name="gather"),
    "Tensor.gather": partial(_selection, name="gather"),
    "torch.index_select": partial(_selection, name="index_select"),
    "Tensor.index_select": partial(_selection, name="index_select"),
    "torch.multinomial": _multinomial,
    "Tensor.multinomial": _multinomial,
    "Tensor.__getitem__": _subscript,
}
