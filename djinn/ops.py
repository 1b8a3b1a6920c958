"""The tensor operations a RemoteTensor may run on the server, by wire name.

An explicit allowlist: the server resolves a received name in this table and
nowhere else, so a client can name pure tensor math, never an arbitrary
callable. Everything here allocates new tensors and leaves its inputs alone
(no in-place ops), so a lazily queued batch means the same as eager code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import torch
import torch.nn.functional as F

_FUNCTIONS: Final = """
    abs add all amax amin any argmax argmin argsort bmm cat ceil chunk clamp clone
    cumsum cumprod div dot einsum eq exp expm1 flatten flip floor gather ge gt index_select
    isin isfinite isnan le log log1p log_softmax logsumexp lt masked_fill matmul max maximum
    allclose isclose equal
    mean median min minimum mm mul multinomial narrow ne neg norm outer permute pow prod
    reshape round rsqrt sigmoid sign sin softmax sort split sqrt square squeeze stack std sub
    sum t tanh topk transpose tril triu unbind unsqueeze var where cos
    zeros_like ones_like full_like
""".split()

_METHODS: Final = """
    __getitem__ __add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__
    __floordiv__ __rfloordiv__ __mod__ __matmul__ __rmatmul__ __pow__ __rpow__ __neg__ __abs__
    __lt__ __le__ __gt__ __ge__ __eq__ __ne__ __and__ __or__ __xor__ __invert__
    abs add all amax amin any argmax argmin argsort bfloat16 bool ceil chunk clamp clone
    contiguous cos cumsum detach div double exp expand expand_as flatten flip float floor
    gather half index_select int isnan log log_softmax logsumexp long masked_fill matmul max
    mean min mul multinomial narrow neg norm permute pow prod repeat reshape reshape_as round rsqrt
    sigmoid sign sin softmax sort split sqrt square squeeze std sub sum t tanh topk transpose
    tril triu type_as unbind unsqueeze var view view_as
""".split()

_FUNCTIONAL: Final = """
    gelu silu relu softmax log_softmax normalize layer_norm linear cross_entropy nll_loss
""".split()


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Tensor.to as a RemoteTensor may run it: a dtype only, never a device."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"Tensor.to on the server takes a dtype, got {type(dtype).__name__}")
    return tensor.to(dtype)


def _table() -> dict[str, Callable[..., Any]]:
    table: dict[str, Callable[..., Any]] = {}
    for name in _FUNCTIONS:
        table[f"torch.{name}"] = getattr(torch, name)
    for name in _METHODS:
        table[f"Tensor.{name}"] = getattr(torch.Tensor, name)
    for name in _FUNCTIONAL:
        table[f"F.{name}"] = getattr(F, name)
    table["Tensor.to"] = _cast
    return table


OPS: Final = _table()
_NAMES: Final = {fn: name for name, fn in OPS.items()} | {torch.Tensor.to: "Tensor.to"}
TENSOR_METHODS: Final = frozenset(_METHODS)
# Operations that draw random numbers: the client sends a seed drawn from the caller's
# RNG (or generator=), and the server draws from a generator seeded with it.
RANDOM: Final = frozenset({"torch.multinomial", "Tensor.multinomial"})
# Where a function takes an `inplace` flag: its keyword, or its position.
_INPLACE_FLAG: Final = {"F.relu": 1, "F.silu": 1}
# Functions that make a tensor like their input, which could put it on another device.
_LIKE: Final = frozenset({"torch.zeros_like", "torch.ones_like", "torch.full_like"})


def refusal(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Why `name` may not run with these arguments, if it may not: server values never
    change in place (an in-place change is a new value; see djinn.tensor)."""
    index = _INPLACE_FLAG.get(name)
    if index is not None and (kwargs.get("inplace") or (len(args) > index and args[index])):
        return f"cannot run {name} with inplace=True: server values never change; call it without"
    if name in _LIKE and "device" in kwargs:
        return f"cannot run {name} with device=: the server keeps its values on its device"
    return None


def name_of(fn: Callable[..., Any]) -> str | None:
    """The wire name of an allowed operation, or None."""
    try:
        return _NAMES.get(fn)
    except TypeError:  # an unhashable callable is no operation of ours
        return None


def lookup(name: object) -> Callable[..., Any] | None:
    return OPS.get(name) if isinstance(name, str) else None
