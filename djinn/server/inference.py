"""Model work as the device thread runs it: checked inputs in, host-ready results out.

Nothing here touches sessions or the network; the handlers do that on the
event loop with what these functions return.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from djinn.errors import RemoteUsageError
from djinn.generation import GenerationParams, generate
from djinn.kvcache import Layers, cache_from_layers, cache_layers, cache_length
from djinn.net.payload import Ref
from djinn.ops import lookup
from djinn.server.bounds import Deferred, guard, within
from djinn.server.executor import Executor
from djinn.server.models import LoadedModel
from djinn.server.sessions import Session
from djinn.tree import map_tree

LOGITS_MODES = ("all", "last", "ref", "none")
CACHE_MODES = ("data", "ref", "none")


@dataclass
class ForwardResult:
    logits: torch.Tensor | None  # on the host (all/last) or the device (ref)
    cache: Any  # the transformers cache object, on the device
    cache_data: Layers | None  # on the host, when asked
    cache_len: int


def resolve_cache(session: Session, cache: Any) -> Any:
    """A forward's cache argument: a held cache object, host (k, v) pairs, or None."""
    if isinstance(cache, Ref):
        held = session.get(cache)
        if not hasattr(held, "get_seq_length"):
            raise RemoteUsageError(f"cannot run the model: reference {cache.id} is not a KV cache")
        return held
    if isinstance(cache, list):
        if not all(
            isinstance(p, tuple) and len(p) == 2 and all(isinstance(t, torch.Tensor) for t in p)
            for p in cache
        ):
            raise RemoteUsageError("cannot run the model: cache must be a list of (keys, values)")
        return cache
    if cache is not None:
        raise RemoteUsageError("cannot run the model: cache must be a reference, layers, or None")
    return None


def check_ids(
    model: LoadedModel, ids: torch.Tensor, cached: int, deferred: Deferred | None = None
) -> torch.Tensor:
    """Ids the model can index with: an out-of-vocabulary id would be a device-side
    assert on CUDA, which ends every session on the device.

    Ids from the wire are checked at once. Ids a queued operation made (a
    queued argmax, on the device) are not read here, which would synchronize
    the device every step: when `deferred` is given, any bad one is replaced
    by id 0 where it lies and flagged there (see djinn.server.bounds).
    """
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise RemoteUsageError(
            f"cannot run the model: input_ids must be [batch, seq], got {list(ids.shape)}"
        )
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise RemoteUsageError(f"cannot run the model: input_ids must be integers, got {ids.dtype}")
    vocab = model.vocab
    if deferred is None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab:
            raise OutOfVocabulary(vocab, high if high >= vocab else low)
    else:
        ids = within(ids, 0, vocab, OutOfVocabulary(vocab), deferred)
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cached + ids.shape[1] > limit:
        raise RemoteUsageError(
            f"cannot run the model: {cached} cached + {ids.shape[1]} new tokens exceed "
            f"its {limit} positions"
        )
    return ids


class OutOfVocabulary(RemoteUsageError):
    def __init__(self, vocab: int, token: int | None = None) -> None:
        which = f"token {token}" if token is not None else "a token"
        super().__init__(
            f"cannot run the model: input_ids holds {which}, outside the vocabulary [0, {vocab})"
        )


def forward(
    executor: Executor,
    model: LoadedModel,
    input_ids: torch.Tensor,
    cache: Any,
    attention_mask: torch.Tensor | None,
    logits_mode: str,
    cache_mode: str,
    deferred: Deferred | None = None,
) -> ForwardResult:
    """One model call. `cache` is a cache object, a list of host (k, v) pairs, or None.
    `deferred` collects vocabulary checks left for later (see check_ids)."""
    if isinstance(cache, list):
        cache = cache_from_layers(
            [(executor.to_device(k), executor.to_device(v)) for k, v in cache], model.config
        )
    cached = cache_length(cache)
    input_ids = check_ids(model, input_ids, cached, deferred)
    if attention_mask is not None and tuple(attention_mask.shape) != (
        input_ids.shape[0],
        cached + input_ids.shape[1],
    ):
        expected = [input_ids.shape[0], cached + input_ids.shape[1]]
        raise RemoteUsageError(
            f"cannot run the model: attention_mask must be [batch, cached + new] = "
            f"{expected}, got {list(attention_mask.shape)}"
        )
    kwargs: dict[str, Any] = {"use_cache": cache_mode != "none"}
    if model.cache_arg is not None and cache is not None:
        kwargs[model.cache_arg] = cache
    if attention_mask is not None:
        kwargs["attention_mask"] = executor.to_device(attention_mask)
    out = model.module(input_ids=executor.to_device(input_ids), **kwargs)
    logits = out.logits
    cache_out = (
        getattr(out, model.cache_arg, None) if model.cache_arg and cache_mode != "none" else None
    )
    if logits_mode == "all":
        logits = executor.to_host(logits)
    elif logits_mode == "last":
        logits = executor.to_host(logits[:, -1:])
    elif logits_mode == "none":
        logits = None
    cache_data = None
    if cache_mode == "data" and cache_out is not None:
        cache_data = [
            (executor.to_host(k), executor.to_host(v)) for k, v in cache_layers(cache_out)
        ]
    return ForwardResult(logits, cache_out, cache_data, cache_length(cache_out))


def run_generate(
    executor: Executor,
    model: LoadedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    params: GenerationParams,
) -> torch.Tensor:
    """A whole generation on the device; returns the new tokens on the host."""
    check_ids(model, input_ids, 0)
    params.check_pad(model.vocab)  # a forged request: the client checked it too
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and input_ids.shape[1] + params.max_new_tokens > limit:
        raise RemoteUsageError(
            f"cannot generate: {input_ids.shape[1]} prompt + {params.max_new_tokens} new tokens "
            f"exceed the model's {limit} positions"
        )
    ids = executor.to_device(input_ids).long()
    mask = executor.to_device(attention_mask) if attention_mask is not None else None

    def step(tokens: torch.Tensor, cache: Any, m: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        kwargs: dict[str, Any] = {"use_cache": True}
        if model.cache_arg is not None and cache is not None:
            kwargs[model.cache_arg] = cache
        if m is not None:
            kwargs["attention_mask"] = m
        out = model.module(input_ids=tokens, **kwargs)
        return out.logits[:, -1, :], getattr(out, model.cache_arg) if model.cache_arg else None

    tokens = generate(step, ids, params, mask)
    return executor.to_host(tokens[:, input_ids.shape[1] :])


def call_module(
    executor: Executor,
    model: LoadedModel,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    keep_over: int,
    ref_ids: list[int],
) -> tuple[Any, dict[int, torch.Tensor]]:
    """Run a plain module. Output tensors over `keep_over` bytes stay on the device under
    the given reference ids (while ids last); the rest come back on the host."""
    to_device = lambda x: executor.to_device(x) if isinstance(x, torch.Tensor) else x  # noqa: E731
    out = model.module(*map_tree(args, to_device), **map_tree(kwargs, to_device))
    kept: dict[int, torch.Tensor] = {}
    ids = iter(ref_ids)

    def leaf(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if value.nbytes > keep_over:
            ref_id = next(ids, None)
            if ref_id is not None:
                kept[ref_id] = value
                return Ref(ref_id)
        return executor.to_host(value)

    return map_tree(out, leaf), kept


class OpFailed(Exception):
    """Operation `index` of a queued batch raised `cause`; the batch stopped there."""

    def __init__(self, index: int, name: str, cause: BaseException, done: Batch) -> None:
        super().__init__(f"cannot run {name}: {type(cause).__name__}: {cause}")
        self.index = index
        self.name = name
        self.cause = cause
        self.done = done  # what the operations before it produced


@dataclass
class Batch:
    produced: dict[int, Any] = field(default_factory=dict)  # new reference id -> value
    grown: list[Ref] = field(default_factory=list)  # held caches that grew in place
    # op index -> (output structure with Refs, {id: (shape, dtype)})
    described: dict[int, Any] = field(default_factory=dict)
    fetched: dict[int, torch.Tensor] = field(default_factory=dict)  # id -> value on the host


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def run_ops(
    executor: Executor, session: Session, ops: list[Any], fetch: list[int] | None = None
) -> Batch:
    """Run a client's queued operations in order, then bring the `fetch` values to the
    host. Raises OpFailed at the first failing operation, LostReferenceError for a
    fetch of a value the session does not hold."""
    batch = Batch()
    deferred = Deferred()

    def resolve(value: Any) -> Any:
        if isinstance(value, Ref):
            return batch.produced[value.id] if value.id in batch.produced else session.get(value)
        if isinstance(value, torch.Tensor):
            return executor.to_device(value)
        return value

    made_before: list[int] = []  # per operation: how many values the batch had made before it
    for index, op in enumerate(ops):
        made_before.append(len(batch.produced))
        name = op[1] if isinstance(op, tuple) and len(op) > 1 and op[0] == "op" else "forward"
        name = str(name)[:60]  # a client's string, as error messages will quote it
        deferred.at(index, name)
        try:
            if isinstance(op, tuple) and len(op) == 6 and op[0] == "op":
                _run_op(op, resolve, batch, index, deferred)
            elif isinstance(op, tuple) and len(op) == 7 and op[0] == "forward":
                _run_forward(executor, session, op, resolve, batch, deferred)
            else:
                raise RemoteUsageError("malformed operation")
        except Exception as exc:
            raise OpFailed(index, name, exc, batch) from exc
    failure = deferred.first_failure()  # the batch's one synchronization for these
    if failure is not None:
        # the batch ran on with safe values in place of bad ones: what the failed operation
        # and those after it made is not kept (held caches they grew count as grown)
        index = failure[0]
        kept = dict(itertools.islice(batch.produced.items(), made_before[index]))
        raise OpFailed(*failure, Batch(produced=kept, grown=batch.grown))
    for ref_id in fetch or ():
        value = resolve(Ref(ref_id))
        if not isinstance(value, torch.Tensor):
            raise RemoteUsageError(f"cannot fetch reference {ref_id}: it is not a tensor")
        batch.fetched[ref_id] = executor.to_host(value)
    return batch


def _run_op(
    op: tuple[Any, ...], resolve: Any, batch: Batch, index: int, deferred: Deferred
) -> None:
    _, name, args, kwargs, out_ids, describe = op
    fn = lookup(name)
    if fn is None:
        raise RemoteUsageError(f"{name!r} is not an operation a RemoteTensor may run")
    if not isinstance(args, tuple) or not isinstance(kwargs, dict) or not isinstance(out_ids, list):
        raise RemoteUsageError("malformed operation")
    args, kwargs = guard(name, map_tree(args, resolve), map_tree(kwargs, resolve), deferred)
    result = fn(*args, **kwargs)
    tensors = [leaf for leaf in _leaves(result) if isinstance(leaf, torch.Tensor)]
    if len(tensors) > len(out_ids) or (not describe and len(tensors) != len(out_ids)):
        raise RemoteUsageError(f"{name} made {len(tensors)} tensors, expected {len(out_ids)}")
    ids = iter(out_ids)
    metas: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}

    def store(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        ref_id = next(ids)
        batch.produced[ref_id] = leaf
        metas[ref_id] = (tuple(leaf.shape), leaf.dtype)
        return Ref(ref_id)

    structure = map_tree(tuple(result) if isinstance(result, tuple) else result, store)
    if describe:
        batch.described[index] = (structure, metas)


def _run_forward(
    executor: Executor,
    session: Session,
    op: tuple[Any, ...],
    resolve: Any,
    batch: Batch,
    deferred: Deferred,
) -> None:
    _, input_ids, cache, mask, logits_id, cache_id, use_cache = op
    if session.model is None:
        raise RemoteUsageError("this session has no model")
    if type(logits_id) is not int or type(cache_id) is not int:
        raise RemoteUsageError("malformed forward")
    made_here = isinstance(input_ids, Ref)
    ids = resolve(input_ids) if made_here else input_ids
    if not isinstance(ids, torch.Tensor):
        raise RemoteUsageError("input_ids must be a tensor")
    held = batch.produced.get(cache.id) if isinstance(cache, Ref) else None
    cache_in = held if held is not None else resolve_cache(session, cache)
    mask = resolve(mask) if isinstance(mask, Ref) else mask
    cache_mode = "ref" if use_cache else "none"
    checks = deferred if made_here else None
    result = forward(executor, session.model, ids, cache_in, mask, "ref", cache_mode, checks)
    batch.produced[logits_id] = result.logits
    if result.cache is not None:
        if isinstance(cache, Ref) and held is None:
            batch.grown.append(cache)
        elif not isinstance(cache, Ref):
            batch.produced[cache_id] = result.cache
