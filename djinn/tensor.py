"""Handles to values the server holds: RemoteTensor and RemoteCache.

Plain PyTorch works on a RemoteTensor: torch functions, tensor methods,
operators and indexing run on the server (see djinn.ops for which). Each
result's shape and dtype are inferred here on meta tensors, so the
operation is only queued and its result is a new RemoteTensor; the planner
records each value's placement. Reading a RemoteTensor (`.cpu()`,
`.tolist()`, `.item()`, `bool()`, `print()`, `torch.as_tensor`) fetches it,
with the small values of the same line the caller still holds. Once a
value has crossed, operations on it run locally. A handle that is
garbage-collected releases its server value with the session's next call.

The server's values never change. An in-place operation makes a new value
and gives it to the handle, so every name bound to the handle sees the
change, as in torch; a view's change cannot reach the value it views, which
refuses use from then on rather than show what torch would not.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from djinn import messages, ops
from djinn.errors import UsageError
from djinn.kvcache import cache_from_layers
from djinn.net.codec import OutgoingTuple, Ref, wire_value
from djinn.semantics import Call, Decision, Lifecycle, Side, Value, plan
from djinn.tree import map_tree

if TYPE_CHECKING:
    from djinn.session import RemoteSession

_WIRE_DTYPES: Final = {
    name: getattr(torch, name)
    for name in dir(torch)
    if isinstance(getattr(torch, name, None), torch.dtype)
}


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

    __slots__ = (
        "_name",
        "_seen",
        "_storage",
        "_stride",
        "_tail",
        "_tail_version",
        "_value",
        "_version",
        "dtype",
        "shape",
    )
    __hash__ = object.__hash__  # == builds a tensor, as it does for torch.Tensor

    def __init__(
        self,
        session: RemoteSession,
        ref: Ref,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        name: str = "tensor",
    ) -> None:
        super().__init__(session, ref)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._name = name
        self._value: torch.Tensor | None = None  # known once fetched
        self._version = 0  # the fetched value's version counter when it arrived
        self._tail: torch.Tensor | None = None  # its last position along dim 1, when known
        self._tail_version = 0
        self._stride: tuple[int, ...] | None = None  # torch's layout, where inferred
        self._storage: _Storage | None = None  # shared with its views, once it has some
        self._seen = -1  # for a view, its storage's writes when it was made

    def _arrived(self, value: torch.Tensor) -> None:
        self._value = value
        self._version = value._version  # fetched values are normal tensors (codec.py)

    def _arrived_tail(self, tail: torch.Tensor) -> None:
        self._tail, self._tail_version = tail, tail._version

    def _current(self) -> None:
        """Raise where torch would show an in-place change that djinn cannot."""
        why = None
        storage = self._storage
        if storage is not None:
            why = storage.stale
            if why is None and self._seen >= 0:  # a view: of a value changed since?
                root = storage.root()
                if self._seen != storage.writes or (root is not None and root._changed_here()):
                    why = "the tensor it views was changed in place since"
        if self._tail is not None and self._tail._version != self._tail_version:
            why = "its last position was changed in place through a view"
        if why is not None:
            raise UsageError(
                f"cannot use this RemoteTensor ({self._name}): {why}. Server values do not "
                "share storage as torch's views do, so the change would not show here; change "
                "views out of place (v = v * 2), or read the tensor with .cpu() first"
            )

    def _changed_here(self) -> bool:
        """Whether the caller changed the fetched values in place since they arrived."""
        return self._value is not None and self._value._version != self._version

    def _wrote(self, how: str) -> None:
        """After an in-place change: a value's views made before it are out of date; a
        view's change makes every handle of its storage so, and it has a value of its own."""
        storage = self._storage
        if storage is None:
            return
        if self._seen < 0:
            storage.writes += 1
        else:
            storage.stale = f"it was changed in place through a view ({how})"
            self._storage, self._seen = None, -1

    def _view_of(self, viewed: RemoteTensor) -> None:
        storage = viewed._storage
        if storage is None:
            storage = viewed._storage = _Storage(viewed)
        self._storage, self._seen = storage, storage.writes

    @property
    def ref(self) -> Ref:
        self._current()
        return self._ref

    def wired(self) -> Ref | torch.Tensor:
        """What crosses for this tensor: its reference, or the fetched values once the
        caller has changed them in place (the server's are out of date then)."""
        self._current()
        if self._changed_here():
            assert self._value is not None
            return self._value
        return self._ref

    # -- what is known without a round trip ---------------------------------------

    @property
    def device(self) -> torch.device:
        """The server's device, where the values live."""
        return self._session.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def element_size(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    @property
    def is_floating_point_type(self) -> bool:
        return self.dtype.is_floating_point

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    # -- reading: these cross the wire ------------------------------------------------

    def cpu(self) -> torch.Tensor:
        """The values: one round trip moving `nbytes` (and running queued work), unless
        they came back already."""
        self._current()
        if self._value is None:
            self._arrived(self._session.read(self._ref, self, self._name))
        assert self._value is not None
        return self._value

    def to(self, *args: Any, **kwargs: Any) -> Any:
        """to(dtype) runs on the server; to("cpu") reads the values; to(its own device)
        is a no-op. The server decides where its values live, so other devices are refused."""
        dtype = kwargs.pop("dtype", None)
        device: Any = kwargs.pop("device", None)
        copy = bool(kwargs.pop("copy", False))
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, (str, torch.device)):
                device = arg
            elif isinstance(arg, (torch.Tensor, RemoteTensor)):
                dtype = arg.dtype
            else:
                raise UsageError(f"cannot move a RemoteTensor with {arg!r}: pass a dtype or 'cpu'")
        result: Any = self
        if dtype is not None and dtype != self.dtype:
            result = apply(torch.Tensor.to, (self, dtype), {})
        elif copy:
            result = apply(torch.Tensor.clone, (self,), {})
        if device is None or torch.device(device) == self.device:
            return result
        if torch.device(device).type == "cpu":
            return result.cpu() if isinstance(result, RemoteTensor) else result
        raise UsageError(
            f"cannot move a RemoteTensor to {device}: the server keeps it on {self.device}; "
            "read it with .cpu(), then move the tensor"
        )

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

    def __index__(self) -> int:
        return self.cpu().__index__()

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
        if name[:-1] in ops.TENSOR_METHODS and name.endswith("_") and hasattr(torch.Tensor, name):
            return lambda *args, **kwargs: self._in_place(name[:-1], name, args, kwargs)
        raise AttributeError(
            f"RemoteTensor has no attribute {name!r}: it runs the tensor operations in "
            "djinn.ops on the server; read it with .cpu() for anything else"
        )

    @property
    def T(self) -> Any:  # torch's name
        return apply(torch.Tensor.t, (self,), {})

    def _in_place(
        self, name: str, in_place: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> RemoteTensor:
        """`self.<in_place>(*args)`, as torch runs it. Fetched values change here, as
        local tensors do. Otherwise `name`'s result, cast as torch casts it, becomes this
        handle's value, so every name bound to the handle sees it; the tensor a view
        views cannot, so it refuses use from then on (see _current)."""
        self._current()
        if self._value is not None:
            local = getattr(self._value, in_place)
            local(*map_tree(args, _local_value), **map_tree(kwargs, _local_value))
        else:
            _check_in_place(self, in_place, args, kwargs)
            result = apply(getattr(torch.Tensor, name), (self, *args), kwargs)
            if result.dtype != self.dtype:  # as torch casts an in-place result
                result = apply(torch.Tensor.to, (result, self.dtype), {})
            # the handles trade references: the old value goes with `result`'s handle
            self._ref, result._ref = result._ref, self._ref
            self._value, self._version = result._value, result._version
            self._tail, self._tail_version = result._tail, result._tail_version
            self._session.track(self._ref, self, "", self._name)
        self._wrote(in_place)
        return self

    def __setitem__(self, key: Any, value: Any) -> None:
        if self._value is None:
            raise UsageError(
                "cannot assign into a RemoteTensor before reading it: the server's values "
                "change only through operations that make new tensors; build the new tensor "
                "(torch.where, masked_fill), or read it with .cpu() and assign into that"
            )
        self._current()
        self._value[key] = _local_value(value)
        self._wrote("__setitem__")


def _operator(name: str) -> Callable[..., Any]:
    method = getattr(torch.Tensor, name)

    def run(self: RemoteTensor, *args: Any) -> Any:
        return apply(method, (self, *args), {})

    run.__name__ = name
    return run


def _check_in_place(
    tensor: RemoteTensor, in_place: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Raise what torch raises for this in-place change (broadcast, casting, overlap), and
    UsageError for one that changes the shape, which djinn does not do in place, or reads
    another view of its own storage."""
    if tensor._stride is not None and any(
        step == 0 and size > 1 for step, size in zip(tensor._stride, tensor.shape, strict=True)
    ):  # meta tensors do not check this
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers "
            "to a single memory location. Please clone() the tensor before performing the "
            "operation."
        )
    storage = tensor._storage
    if storage is not None and any(
        type(other) is RemoteTensor and other is not tensor and other._storage is storage
        for other in _leaves([*args, *kwargs.values()])
    ):  # torch writes as it goes over an overlap; djinn writes a new value at once
        raise UsageError(
            f"cannot run {in_place} with an operand that views the same tensor as its target: "
            "djinn cannot tell whether they overlap, where torch's result depends on the "
            "order it writes in; clone() the operand first"
        )
    with torch.inference_mode(False):
        meta = getattr(_to_meta(tensor), in_place)(
            *map_tree(args, _to_meta), **map_tree(kwargs, _to_meta)
        )
    if meta.shape != tensor.shape:
        raise UsageError(
            f"cannot run {in_place} on a RemoteTensor: it changes the shape, which djinn "
            f"does not do in place; write x = x.{in_place[:-1]}(...) for a new tensor"
        )


def _in_place_operator(name: str) -> Callable[..., Any]:
    def run(self: RemoteTensor, other: Any) -> Any:
        return self._in_place(name, f"__i{name[2:]}", (other,), {})

    run.__name__ = f"__i{name[2:]}"
    return run


for _name in sorted(ops.TENSOR_METHODS):
    if _name.startswith("__"):
        setattr(RemoteTensor, _name, _operator(_name))
        if hasattr(torch.Tensor, f"__i{_name[2:]}"):  # x += y, x /= y, ...
            setattr(RemoteTensor, f"__i{_name[2:]}", _in_place_operator(_name))


def apply(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Queue `func(*args, **kwargs)` on the server; results are RemoteTensors (or, where
    every input has already crossed, the local result).

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
    refused = ops.refusal(name, args, kwargs)
    if refused is not None:
        raise UsageError(refused)
    scan = _Scan()
    remote_kwargs, generator = kwargs, None
    if name in ops.RANDOM:  # the server's generator is seeded from this one
        generator = kwargs.get("generator")
        remote_kwargs = {k: v for k, v in kwargs.items() if k != "generator"}
    wire_args = scan.wire(args)
    wire_kwargs = scan.wire(remote_kwargs)
    session = scan.session(label)
    if scan.known:
        known = _known_locally(name, args, scan.remote)
        if known is not None:
            return func(*known, **map_tree(kwargs, _local_value))
    seed = _seed(generator) if name in ops.RANDOM else None
    try:
        inferred, aliased = _infer(name, func, scan.key, args, remote_kwargs)
    except NotImplementedError:  # a data-dependent shape: the server says what it made
        result = _described(session, name, label, (wire_args, wire_kwargs), seed)
        outputs = [v for v in _leaves(result) if isinstance(v, RemoteTensor)]
    else:
        outputs = []

        viewed = scan.remote[0] if len(scan.remote) == 1 else None

        def handle(meta: Any) -> Any:
            if not isinstance(meta, torch.Tensor):
                return meta
            out = RemoteTensor(session, session.new_ref(), meta.shape, meta.dtype, label)
            out._stride = tuple(meta.stride())
            if viewed is not None and (aliased or meta._is_view()):  # torch shares storage
                out._view_of(viewed)
            outputs.append(out)
            return out

        result = (
            handle(inferred) if isinstance(inferred, torch.Tensor) else _rebuild(inferred, handle)
        )
        op = messages.TensorOp(
            name, wire_args, wire_kwargs, [t._ref.id for t in outputs], seed=seed
        )
        from djinn.session import user_site

        site = user_site()
        session.enqueue(op, label, site)
        for out in outputs:
            session.track(out._ref, out, site, label)
    if _record(session, label, scan, outputs):  # the policy wants results as data at once
        _rebuild(result, lambda v: v.cpu() if isinstance(v, RemoteTensor) else v)
    return result


class _Scan:
    """One walk over an operation's arguments: their wire form (RemoteTensors as Refs,
    tuples kept), the tensors in them, and a hashable key of what meta inference
    depends on (shapes and dtypes, not values)."""

    __slots__ = ("key", "known", "local", "remote", "sessions")

    def __init__(self) -> None:
        self.remote: list[RemoteTensor] = []
        self.local: list[torch.Tensor] = []
        self.sessions: list[RemoteSession] = []
        self.known = False  # some RemoteTensor's value (or last row) is here already
        self.key: list[Any] = []

    def wire(self, value: Any) -> Any:
        kind = type(value)
        if kind is RemoteTensor:
            if value._session not in self.sessions:
                self.sessions.append(value._session)
            wired = value.wired()
            if type(wired) is Ref:
                self.remote.append(value)
                self.known = self.known or value._value is not None or value._tail is not None
                self.key.append((value.shape, value.dtype, value._stride))
                return wired
            self.known = True  # the caller's values now
            value, kind = wired, torch.Tensor
        if kind is tuple or kind is list:
            self.key.append((kind, len(value)))
            items = [self.wire(v) for v in value]
            return OutgoingTuple(items) if kind is tuple else items
        if kind is dict:
            self.key.append((dict, tuple(value)))
            return {k: self.wire(v) for k, v in value.items()}
        if isinstance(value, torch.Tensor):
            self.local.append(value)
            self.key.append((value.shape, value.dtype, value.device.type))
            return value
        if kind is slice:
            self.key.append((slice, value.start, value.stop, value.step))
            return value
        self.key.append((kind, value))  # 1, 1.0 and True infer different dtypes
        return wire_value(value)

    def session(self, label: str) -> RemoteSession:
        if len(self.sessions) != 1:
            raise UsageError(
                f"cannot run {label}: it mixes tensors of {len(self.sessions)} sessions; "
                "server values belong to the RemoteModel that made them; fetch one with .cpu()"
            )
        return self.sessions[0]


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _local_value(value: Any) -> Any:
    return value.cpu() if isinstance(value, RemoteTensor) else value


def _known_locally(name: str, args: tuple[Any, ...], remote: list[RemoteTensor]) -> Any:
    """The arguments with local values, when every RemoteTensor among them has crossed
    already (or, for a subscript of the last position, its last row has)."""
    if all(t._value is not None for t in remote):
        return map_tree(args, _local_value)
    if name == "Tensor.__getitem__" and len(args) == 2 and isinstance(args[0], RemoteTensor):
        source, key = args
        if source._tail is not None and len(remote) == 1:
            tail_key = _last_position_key(key, source.shape)
            if tail_key is not None:
                return (source._tail, tail_key)
    return None


def _last_position_key(key: Any, shape: torch.Size) -> Any:
    """`key` rewritten for the tensor's last position along dim 1 alone (shape [B, 1, ...]),
    when it reads nothing else: [:, -1], [:, -1, ...], [:, -1:], [:, n - 1]."""
    items = key if isinstance(key, tuple) else (key,)
    if len(shape) < 2 or len(items) < 2 or items[0] != slice(None):
        return None
    second, rest = items[1], items[2:]
    if any(isinstance(k, (torch.Tensor, RemoteTensor, list)) for k in rest):
        return None
    last = shape[1] - 1
    if type(second) is int and second in (-1, last):
        return (slice(None), 0, *rest)
    whole_tail = type(second) is slice and second.step in (None, 1) and second.stop is None
    if whole_tail and second.start in (-1, last):
        return (slice(None), slice(0, 1), *rest)
    return None


def _seed(generator: Any) -> int:
    """A seed drawn from the caller's generator (default: torch's global one), so that
    torch.manual_seed repeats a remote sample as it repeats a local one."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


def _described(session: RemoteSession, name: str, label: str, wire: Any, seed: int | None) -> Any:
    op = messages.TensorOp(name, wire[0], wire[1], [], describe=True, seed=seed)
    index = session.enqueue(op, label)
    return remote_tree(session, session.run().described[index], label)


def remote_tree(session: RemoteSession, described: messages.Described, name: str) -> Any:
    """A described structure with handles in place of its Refs (caches as RemoteCaches)."""

    def build(value: Any) -> Any:
        if type(value) is Ref:
            meta = described.metas[value.id]
            if meta.dtype == "cache":
                return RemoteCache(session, value, meta.shape[0])
            return RemoteTensor(session, value, tuple(meta.shape), _WIRE_DTYPES[meta.dtype], name)
        return value

    return map_tree(described.structure, build)


def _record(session: RemoteSession, label: str, scan: _Scan, outputs: list[RemoteTensor]) -> bool:
    """Record the operation's placements; True when the policy returns its results as data."""
    inputs = tuple(Value("input", Lifecycle.ACTIVATION, 0) for _ in scan.remote) + tuple(
        Value("input", Lifecycle.ACTIVATION, t.nbytes, Side.CLIENT) for t in scan.local
    )
    results = tuple(Value("output", Lifecycle.OUTPUT, t.nbytes) for t in outputs)
    decided = plan(Call(label, session.phase, inputs, results), session.policy)
    session.record(decided)
    return bool(results) and decided.placements[-1].decision is Decision.DATA


# Shapes and dtypes of results by operation and argument signature: a decode
# loop asks the same questions every step, and meta inference is the
# client's largest cost per operation.
_INFERRED: dict[Any, Any] = {}
_INFERRED_LIMIT: Final = 4096


def _infer(
    name: str, func: Callable[..., Any], key: list[Any], args: Any, kwargs: Any
) -> tuple[Any, bool]:
    """The result as meta tensors, and whether it is an input itself (as `contiguous()`
    of a contiguous tensor is, and `detach()` shares its storage). Raises what torch
    raises for bad arguments, NotImplementedError when the result's shape depends on
    the values."""
    try:
        signature: Any = (name, *key)
        hash(signature)
    except TypeError:  # an unhashable argument: infer without remembering
        signature = None
    if signature is not None:
        known = _INFERRED.get(signature)
        if known is not None:
            return known  # type: ignore[no-any-return]
    try:
        with torch.inference_mode(False):  # where torch records views (see _in_place)
            metas = map_tree(args, _to_meta)
            inferred = func(*metas, **map_tree(kwargs, _to_meta))
    except RuntimeError as exc:
        if "meta" in str(exc) or "data-dependent" in str(exc):
            raise NotImplementedError(str(exc)) from None
        raise
    aliased = name == "Tensor.detach" or any(inferred is meta for meta in _leaves(metas))
    if signature is not None:
        if len(_INFERRED) >= _INFERRED_LIMIT:
            _INFERRED.clear()
        _INFERRED[signature] = (inferred, aliased)
    return inferred, aliased


def _to_meta(value: Any) -> Any:
    if isinstance(value, RemoteTensor):
        if value._stride is not None:  # a view's layout decides what contiguous() makes
            return torch.empty_strided(value.shape, value._stride, dtype=value.dtype, device="meta")
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    return value


def _rebuild(value: Any, fn: Callable[[Any], Any]) -> Any:
    """map_tree that keeps torch's named result tuples (topk's .values, .indices)."""
    if isinstance(value, tuple) and type(value) is not tuple:
        return type(value)(tuple(_rebuild(v, fn) for v in value))
    return map_tree(value, fn)


class _Storage:
    """What a server value and the views made of it share, as a torch tensor's views share
    its storage. Server values share none, so this keeps what the views cannot see:
    `writes`, the value's own in-place changes; `stale`, why every handle of it is out of
    date, once a view of it was changed."""

    __slots__ = ("root", "stale", "writes")

    def __init__(self, root: RemoteTensor) -> None:
        self.root = weakref.ref(root)  # weak: a value nobody holds leaves the server
        self.writes = 0
        self.stale: str | None = None


class RemoteCache(_Handle):
    """A KV cache the server holds for its session; pass it back as `past_key_values`/`cache`."""

    __slots__ = ("_length",)

    def __init__(self, session: RemoteSession, ref: Ref, length: int) -> None:
        super().__init__(session, ref)
        self._length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached, as transformers' Cache.get_seq_length (no round trip)."""
        return self._length

    def fetch(self) -> Any:
        """The keys and values, here, as a DynamicCache: one round trip moving all of
        them. For checks and for moving a conversation off the server; decoding on
        passes the RemoteCache back instead."""
        ran = self._session.run([messages.Fetch(self._ref.id, "cache")])
        return cache_from_layers(ran.values[self._ref.id])

    def _update(self, length: int) -> None:
        self._length = length

    def __repr__(self) -> str:
        return f"RemoteCache(tokens={self._length}, ref={self._ref.id})"
