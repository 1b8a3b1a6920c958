"""Handles to values the server holds: RemoteTensor and RemoteCache.

Plain PyTorch works on a RemoteTensor: torch functions, tensor methods,
operators and indexing run on the server (see djinn.ops for which). Each
result's shape and dtype are inferred here on meta tensors, so the
operation is only queued; then the session's policy decides per result:
a small one comes back as a plain tensor at once (one round trip for the
whole queued chain), a large one stays on the server as a new RemoteTensor.
Reading a RemoteTensor (`.cpu()`, `.tolist()`, `.item()`, `bool()`,
`print()`, `torch.as_tensor`) fetches it. A handle that is garbage-collected
releases its server value with the session's next call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from djinn import ops
from djinn.errors import UsageError
from djinn.net.payload import Ref
from djinn.semantics import Decision, DecisionRecord, Lifecycle, Phase, Value
from djinn.tree import map_tree

if TYPE_CHECKING:
    from djinn.session import RemoteSession

# Ids offered for the outputs of an operation whose structure meta tensors cannot infer.
_UNKNOWN_OUTPUTS: Final = 16


class _Handle:
    __slots__ = ("__weakref__", "_ref", "_session")

    def __init__(self, session: RemoteSession, ref: Ref) -> None:
        self._session = session
        self._ref = ref

    @property
    def ref(self) -> Ref:
        return self._ref

    def _check_session(self, session: RemoteSession, what: str) -> None:
        if session is not self._session:
            raise UsageError(
                f"cannot use {what} of another RemoteModel's session: server state belongs "
                "to the session that made it; fetch it with .cpu() and pass the tensor instead"
            )

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown nothing is left
            self._session.release(self._ref)


class RemoteTensor(_Handle):
    """A tensor that lives on the server. Shape and dtype are known here; values cross when read."""

    __slots__ = ("_value", "dtype", "shape")
    __hash__ = object.__hash__  # == builds a tensor, as it does for torch.Tensor

    def __init__(
        self, session: RemoteSession, ref: Ref, shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        super().__init__(session, ref)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._value: torch.Tensor | None = None  # known once fetched

    def _arrived(self, value: torch.Tensor) -> None:
        self._value = value

    # -- what is known without a round trip ---------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    # -- reading: these cross the wire ------------------------------------------------

    def cpu(self) -> torch.Tensor:
        """The values: one round trip moving `nbytes` (and running queued work), unless
        they came back already with an earlier call."""
        if self._value is None:
            [self._value] = self._session.fetch([self._ref])
        return self._value

    def to(self, device: Any) -> torch.Tensor:
        """Only to("cpu"): the server decides where server values live."""
        if torch.device(device).type != "cpu":
            raise UsageError(
                f"cannot move a RemoteTensor to {device}: read it with .cpu(), then move the tensor"
            )
        return self.cpu()

    def numpy(self) -> np.ndarray:
        return self.cpu().numpy()

    def tolist(self) -> Any:
        return self.cpu().tolist()

    def item(self) -> Any:
        if self.numel() != 1:
            raise UsageError(f"cannot call item() on a tensor of {self.numel()} elements")
        return self.cpu().item()

    def __bool__(self) -> bool:
        return bool(self.cpu())

    def __int__(self) -> int:
        return int(self.cpu())

    def __float__(self) -> float:
        return float(self.cpu())

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.numpy()
        return array.astype(dtype) if dtype is not None else array

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        """torch.as_tensor(rt) and torch.asarray(rt) read the values through this."""
        return self.cpu().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU: fetched values arrive in host memory

    def __str__(self) -> str:
        return f"RemoteTensor({self.cpu()})"

    def __repr__(self) -> str:
        return f"RemoteTensor(shape={list(self.shape)}, dtype={self.dtype}, ref={self._ref.id})"

    # -- operations: these run on the server ------------------------------------------

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        return apply(func, args, kwargs or {})

    def __getattr__(self, name: str) -> Any:
        if name in ops.TENSOR_METHODS:
            method = getattr(torch.Tensor, name)
            return lambda *args, **kwargs: apply(method, (self, *args), kwargs)
        raise AttributeError(
            f"RemoteTensor has no attribute {name!r}: it runs the tensor operations in "
            "djinn.ops on the server; read it with .cpu() for anything else"
        )

    @property
    def T(self) -> Any:  # torch's name
        return apply(torch.Tensor.t, (self,), {})


def _operator(name: str) -> Callable[..., Any]:
    method = getattr(torch.Tensor, name)

    def run(self: RemoteTensor, *args: Any) -> Any:
        return apply(method, (self, *args), {})

    run.__name__ = name
    return run


for _name in sorted(ops.TENSOR_METHODS):
    if _name.startswith("__"):
        setattr(RemoteTensor, _name, _operator(_name))


def apply(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Queue `func(*args, **kwargs)` on the server; small results come back at once.

    Raises UsageError for an operation djinn does not run remotely or one that
    mixes references of two sessions, and what torch raises for bad shapes.
    """
    name = ops.name_of(func)
    label = getattr(func, "__name__", repr(func))
    if name is None:
        raise UsageError(
            f"cannot run {label} on a RemoteTensor: it is not among the operations djinn runs "
            "on the server (djinn.ops); read the tensor with .cpu() first"
        )
    sessions: list[RemoteSession] = []
    inputs: list[Any] = []

    def to_wire(value: Any) -> Any:
        if isinstance(value, RemoteTensor):
            if all(s is not value._session for s in sessions):
                sessions.append(value._session)
            inputs.append(value)
            return value.ref
        if isinstance(value, torch.Tensor):
            inputs.append(value)
        return value

    wire_args, wire_kwargs = map_tree((args, kwargs), to_wire)
    if len(sessions) != 1:
        raise UsageError(
            f"cannot run {label}: it mixes tensors of {len(sessions)} sessions; "
            "server values belong to the RemoteModel that made them; fetch one with .cpu()"
        )
    session = sessions[0]
    try:
        inferred = _infer(name, func, args, kwargs)
    except NotImplementedError:  # a data-dependent shape: ask the server
        index = session.queued
        ids = [session.new_ref().id for _ in range(_UNKNOWN_OUTPUTS)]
        session.enqueue(("op", name, wire_args, wire_kwargs, ids, True), label)
        structure, metas = session.describe()[index]
        result = map_tree(structure, lambda v: _handle(session, v, metas))
    else:
        outputs: list[RemoteTensor] = []

        def handle(meta: Any) -> Any:
            if not isinstance(meta, torch.Tensor):
                return meta
            outputs.append(RemoteTensor(session, session.new_ref(), meta.shape, meta.dtype))
            return outputs[-1]

        result = _rebuild(inferred, handle)
        ids = [t.ref.id for t in outputs]
        session.enqueue(("op", name, wire_args, wire_kwargs, ids, False), label)
    for value in inputs:
        remote = isinstance(value, RemoteTensor)
        nbytes = 0 if remote else value.nbytes
        _record(session, label, "input", Decision.REFERENCE if remote else Decision.DATA, nbytes)
    return _settle(session, label, result)


# Shapes and dtypes of results by operation and argument signature: a decode
# loop asks the same questions every step, and meta inference is the
# client's largest cost per operation.
_INFERRED: dict[Any, Any] = {}
_INFERRED_LIMIT: Final = 4096


def _infer(name: str, func: Callable[..., Any], args: Any, kwargs: Any) -> Any:
    """The result as meta tensors. Raises what torch raises for bad arguments,
    NotImplementedError when the result's shape depends on the values."""
    try:
        key: Any = (name, _signature(args), _signature(kwargs))
        hash(key)
    except TypeError:  # an unhashable argument: infer without remembering
        key = None
    if key is not None and key in _INFERRED:
        return _INFERRED[key]
    inferred = func(*map_tree(args, _to_meta), **map_tree(kwargs, _to_meta))
    if key is not None:
        if len(_INFERRED) >= _INFERRED_LIMIT:
            _INFERRED.clear()
        _INFERRED[key] = inferred
    return inferred


def _signature(value: Any) -> Any:
    """What meta inference depends on, hashable: shapes and dtypes, not values."""
    if isinstance(value, (RemoteTensor, torch.Tensor)):
        return (
            "tensor",
            tuple(value.shape),
            value.dtype,
            value.device.type if isinstance(value, torch.Tensor) else "remote",
        )
    kind = type(value)
    if kind is slice:
        return (slice, _signature(value.start), _signature(value.stop), _signature(value.step))
    if kind in (tuple, list):
        return (kind, tuple(_signature(v) for v in value))
    if kind is dict:
        return (dict, tuple((k, _signature(v)) for k, v in value.items()))
    return (kind, value)  # 1, 1.0 and True infer different dtypes


def _to_meta(value: Any) -> Any:
    if isinstance(value, RemoteTensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    return value


def _rebuild(value: Any, fn: Callable[[Any], Any]) -> Any:
    """map_tree that keeps torch's named result tuples (topk's .values, .indices)."""
    if isinstance(value, tuple) and type(value) is not tuple:
        return type(value)(tuple(_rebuild(v, fn) for v in value))
    return map_tree(value, fn)


def _handle(session: RemoteSession, value: Any, metas: dict[int, Any]) -> Any:
    if isinstance(value, Ref):
        shape, dtype = metas[value.id]
        return RemoteTensor(session, value, shape, dtype)
    return value


def _settle(session: RemoteSession, label: str, result: Any) -> Any:
    """Decide, per result, data or reference. A result the policy wants as data
    (a small one) comes back with the session's next call, which its first read
    makes happen; the others stay on the server until read."""

    def decide(value: Any) -> Any:
        if isinstance(value, RemoteTensor):
            wanted = Value(label, Lifecycle.OUTPUT, value.nbytes, Phase.DECODE, True)
            if session.policy.decide(wanted) is Decision.DATA:
                session.want(value.ref, value, label)
            else:
                _record(session, label, "output", Decision.REFERENCE, 0)
        return value

    _rebuild(result, decide)
    return result


def _record(session: RemoteSession, op: str, value: str, decision: Decision, nbytes: int) -> None:
    lifecycle = Lifecycle.OUTPUT if value != "input" else Lifecycle.ACTIVATION
    session.record(DecisionRecord(op, value, lifecycle, decision, nbytes))


class RemoteCache(_Handle):
    """A KV cache the server holds for its session; pass it back as `past_key_values`/`cache`."""

    __slots__ = ("_length",)

    def __init__(self, session: RemoteSession, ref: Ref, length: int) -> None:
        super().__init__(session, ref)
        self._length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached, as transformers' Cache.get_seq_length (no round trip)."""
        return self._length

    def _update(self, length: int) -> None:
        self._length = length

    def __repr__(self) -> str:
        return f"RemoteCache(tokens={self._length}, ref={self._ref.id})"
