"""A session's queued work as the device runs it: operations, forward passes, module calls.

`run_ops` runs one call's prelude on a worker thread holding the device's
turn: each operation is checked (allowlist, indices, sizes against the
quota from its meta shapes) before it allocates anything, then run, and
its results kept under the ids the client chose. Results nobody holds any
more are freed after their last use in the batch. Between operations the
job yields the turn if others wait. Nothing here touches the network;
the dispatcher commits the batch to the session on the event loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from djinn import messages, ops
from djinn.errors import RemoteUsageError
from djinn.kvcache import cache_from_layers, cache_layers, cache_length
from djinn.messages import CallOp, ForwardOp, TensorOp
from djinn.modelfacts import check_labels, check_mask, check_positions
from djinn.net.codec import Ref
from djinn.server.batching import Step, batchable
from djinn.server.bounds import Deferred, guard, within
from djinn.server.device import Device, Job
from djinn.server.models import LoadedModel
from djinn.server.sessions import Session
from djinn.tree import map_tree


class OpFailed(Exception):
    """Operation `index` of a queued batch raised `cause`; the batch stopped there."""

    def __init__(self, index: int, name: str, cause: BaseException, done: Batch) -> None:
        super().__init__(f"cannot run {name}: {cause}")
        self.index = index
        self.name = name
        self.cause = cause
        self.done = done  # what the operations before it produced


@dataclass
class Batch:
    produced: dict[int, Any] = field(default_factory=dict)  # new reference id -> value
    grown: list[int] = field(default_factory=list)  # held caches that grew in place
    described: dict[int, messages.Described] = field(default_factory=dict)  # by op index
    values: dict[int, Any] = field(default_factory=dict)  # fetched, on the host
    nbytes: int = 0  # bytes of the values produced and still held


@dataclass
class Context:
    """What the operations of one call run against."""

    job: Job
    device: Device
    session: Session
    server_ids: Iterator[int]
    batch: Batch
    deferred: Deferred
    prefill_chunk: int

    def resolve(self, value: Any) -> Any:
        if type(value) is Ref:
            produced = self.batch.produced
            return produced[value.id] if value.id in produced else self.session.get(value.id)
        if isinstance(value, torch.Tensor):
            return self.device.to_device(value)
        return value

    def keep(self, ref_id: int, value: Any, nbytes: int) -> None:
        self.batch.produced[ref_id] = value
        self.batch.nbytes += nbytes

    def reserve(self, nbytes: int, what: str) -> None:
        self.session.reserve(self.batch.nbytes + nbytes, what)


def run_ops(
    job: Job,
    device: Device,
    session: Session,
    prelude: messages.Prelude,
    server_ids: Iterator[int],
    prefill_chunk: int,
) -> Batch:
    """Run a call's queued operations in order, then bring the fetched values to the host.

    Raises OpFailed at the first failing operation (what ran before it is kept),
    LostReferenceError for a fetch of a value the session does not hold.
    """
    deferred = Deferred(eager=not device.is_cuda)
    ctx = Context(job, device, session, server_ids, Batch(), deferred, prefill_chunk)
    last_use = _last_uses(prelude)
    made_before: list[int] = []  # per operation: how many values the batch had made before it
    for index, op in enumerate(prelude.ops):
        made_before.append(len(ctx.batch.produced))
        name = op.name if isinstance(op, TensorOp) else type(op).__name__.removesuffix("Op").lower()
        ctx.deferred.at(index, name)
        try:
            if isinstance(op, TensorOp):
                _run_tensor_op(ctx, index, op)
            elif isinstance(op, ForwardOp):
                _run_forward(ctx, index, op)
            else:
                _run_call(ctx, index, op)
            for ref_id in last_use.get(index, ()):
                _drop(ctx.batch, ref_id)
            device.pause(job)
        except Exception as exc:
            raise OpFailed(index, name, exc, ctx.batch) from exc
    failure = ctx.deferred.first_failure()  # the batch's one synchronization for these
    if failure is not None:
        # the batch ran on with safe values in place of bad ones: what the failed operation
        # and those after it made is not kept (held caches they grew count as grown)
        index = failure[0]
        kept = dict(itertools.islice(ctx.batch.produced.items(), made_before[index]))
        raise OpFailed(*failure, Batch(produced=kept, grown=ctx.batch.grown))
    for fetch in prelude.fetch:
        value = ctx.resolve(Ref(fetch.ref))
        ctx.batch.values[fetch.ref] = _to_host(device, value, fetch.form)
    return ctx.batch


def _last_uses(prelude: messages.Prelude) -> dict[int, list[int]]:
    """For each released reference the batch makes and nobody fetches: the index of
    the last operation that reads it, after which it can go."""
    if not prelude.released:
        return {}
    made = {i for op in prelude.ops for i in _outputs(op)}
    doomed = (set(prelude.released) & made) - {f.ref for f in prelude.fetch}
    if not doomed:  # a decode loop releases what earlier calls made
        return {}
    last: dict[int, int] = {
        ref_id: index
        for index, op in enumerate(prelude.ops)
        for ref_id in _outputs(op)
        if ref_id in doomed
    }
    for index, op in enumerate(prelude.ops):
        for ref_id in _inputs(op):
            if ref_id in last:
                last[ref_id] = index
    by_op: dict[int, list[int]] = {}
    for ref_id, index in last.items():
        by_op.setdefault(index, []).append(ref_id)
    return by_op


def _outputs(op: messages.Op) -> list[int]:
    if isinstance(op, TensorOp):
        return list(op.out)
    if isinstance(op, ForwardOp):
        return [i for i in (op.out_logits, op.out_cache, op.out_loss) if i]
    return []


def _inputs(op: messages.Op) -> list[int]:
    found: list[int] = []

    def visit(value: Any) -> Any:
        if type(value) is Ref:
            found.append(value.id)
        return value

    if isinstance(op, ForwardOp):
        fields = (
            op.input_ids,
            op.attention_mask,
            op.position_ids,
            op.inputs_embeds,
            op.labels,
            op.cache,
        )
        map_tree(fields, visit)
    else:
        map_tree((op.args, op.kwargs), visit)
    return found


def _drop(batch: Batch, ref_id: int) -> None:
    value = batch.produced.pop(ref_id, None)
    if isinstance(value, torch.Tensor):
        batch.nbytes -= value.untyped_storage().nbytes()


def _to_host(device: Device, value: Any, form: str) -> Any:
    if form == "cache":
        if not hasattr(value, "get_seq_length"):
            raise RemoteUsageError("cannot fetch: the reference is not a KV cache")
        return [(device.to_host(k), device.to_host(v)) for k, v in cache_layers(value)]
    if not isinstance(value, torch.Tensor):
        raise RemoteUsageError("cannot fetch: the reference is not a tensor")
    return device.to_host(value)


# -- tensor operations ----------------------------------------------------------------------


def _run_tensor_op(ctx: Context, index: int, op: TensorOp) -> None:
    fn = ops.lookup(op.name)
    if fn is None:
        raise RemoteUsageError(f"{op.name!r} is not an operation a RemoteTensor may run")
    if "out" in op.kwargs:
        raise RemoteUsageError(f"cannot run {op.name} with out=: results are always new tensors")
    refused = ops.refusal(op.name, op.args, op.kwargs)
    if refused is not None:
        raise RemoteUsageError(refused)
    args, kwargs = map_tree((op.args, op.kwargs), ctx.resolve)
    if op.seed is not None or op.name in ops.RANDOM:
        kwargs = {**kwargs, "generator": _generator(op, args, kwargs)}
    args, kwargs = guard(op.name, args, kwargs, ctx.deferred)
    nbytes = output_bytes(op.name, fn, args, kwargs)
    ctx.reserve(nbytes, f"run {op.name}")
    result = fn(*args, **kwargs)
    if op.describe:  # the client could not name the results: the server says what they are
        structure, metas = _store(ctx, result, ctx.server_ids, nbytes)
        ctx.batch.described[index] = messages.Described(structure, metas)
        return
    tensors = [leaf for leaf in _leaves(result) if isinstance(leaf, torch.Tensor)]
    if len(tensors) != len(op.out):
        raise RemoteUsageError(f"{op.name} made {len(tensors)} tensors, expected {len(op.out)}")
    for ref_id, tensor in zip(op.out, tensors, strict=True):
        ctx.keep(ref_id, tensor, nbytes)
        nbytes = 0  # the op's bytes, counted once


def _generator(op: TensorOp, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Generator:
    """The seeded generator of a random operation, on its input's device: never the
    process's own RNG, which every session shares."""
    if op.name not in ops.RANDOM:
        raise RemoteUsageError(f"cannot seed {op.name}: it draws no random numbers")
    if op.seed is None or "generator" in kwargs:
        raise RemoteUsageError(f"cannot run {op.name}: it needs a seed, and no generator=")
    source = args[0] if args else kwargs.get("input")
    if not isinstance(source, torch.Tensor):
        raise RemoteUsageError(f"cannot run {op.name}: its input must be a tensor")
    generator = torch.Generator(device=source.device)
    generator.manual_seed(op.seed)
    return generator


def _store(
    ctx: Context, result: Any, ids: Iterator[int], nbytes: int
) -> tuple[Any, dict[int, messages.TensorMeta]]:
    metas: dict[int, messages.TensorMeta] = {}
    first = [True]

    def store(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        ref_id = next(ids)
        ctx.keep(ref_id, leaf, nbytes if first[0] else 0)  # the op's bytes, counted once
        first[0] = False
        metas[ref_id] = messages.TensorMeta(list(leaf.shape), _dtype_name(leaf.dtype))
        return Ref(ref_id)

    structure = map_tree(tuple(result) if isinstance(result, tuple) else result, store)
    return structure, metas


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# Bytes of new storage an operation makes, by its arguments' shapes: a decode
# loop asks the same questions every step.
_OUTPUT_BYTES: dict[Any, int] = {}
_OUTPUT_BYTES_LIMIT: Final = 4096


def output_bytes(name: str, fn: Callable[..., Any], args: Any, kwargs: Any) -> int:
    """New storage the operation will allocate, from a run on meta tensors: views
    of an input cost nothing. Where meta cannot tell (a boolean mask's selection),
    the inputs' size bounds it."""
    key = (name, _signature(args), _signature(kwargs))
    known = _OUTPUT_BYTES.get(key)
    if known is not None:
        return known
    metas: list[torch.Tensor] = []

    def to_meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            meta = torch.empty_strided(
                value.shape, value.stride(), dtype=value.dtype, device="meta"
            )
            metas.append(meta)
            return meta
        return value

    try:
        result = fn(*map_tree(args, to_meta), **map_tree(kwargs, to_meta))
    except (NotImplementedError, RuntimeError):
        total = sum(m.numel() * m.element_size() for m in metas)
    else:
        total = 0
        for leaf in _leaves(tuple(result) if isinstance(result, tuple) else result):
            if isinstance(leaf, torch.Tensor) and not any(_shares(leaf, m) for m in metas):
                total += leaf.numel() * leaf.element_size()
    if len(_OUTPUT_BYTES) >= _OUTPUT_BYTES_LIMIT:
        _OUTPUT_BYTES.clear()
    _OUTPUT_BYTES[key] = total
    return total


def _shares(out: torch.Tensor, source: torch.Tensor) -> bool:
    base = out._base if out._base is not None else out
    return base is source or base is source._base or out is source


def _signature(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype)
    kind = type(value)
    if kind is slice:
        return (slice, value.start, value.stop, value.step)
    if kind is tuple or kind is list:
        return (kind, tuple(_signature(v) for v in value))
    if kind is dict:
        return (dict, tuple((k, _signature(v)) for k, v in value.items()))
    return (kind, value)


# -- the model --------------------------------------------------------------------------------


def _model(session: Session) -> LoadedModel:
    if session.model is None:
        raise RemoteUsageError("cannot run a model: this session has none")
    return session.model


def _run_forward(ctx: Context, index: int, op: ForwardOp) -> None:
    model = _model(ctx.session)
    facts = model.facts
    ids = ctx.resolve(op.input_ids) if op.input_ids is not None else None
    embeds = ctx.resolve(op.inputs_embeds) if op.inputs_embeds is not None else None
    if (ids is None) == (embeds is None):
        raise RemoteUsageError("cannot run the model: pass input_ids or inputs_embeds (one)")
    if embeds is not None and (
        not isinstance(embeds, torch.Tensor)
        or embeds.dim() != 3
        or embeds.shape[-1] != facts.hidden
    ):
        raise RemoteUsageError(
            f"cannot run the model: inputs_embeds must be [batch, seq, {facts.hidden}]"
        )
    cache = _cache_in(ctx, op.cache, model)
    cached = cache_length(cache)
    source = ids if ids is not None else embeds
    assert isinstance(source, torch.Tensor)
    rows, new = int(source.shape[0]), int(source.shape[1])
    kwargs: dict[str, Any] = {"use_cache": op.use_cache}
    if ids is not None:
        kwargs["input_ids"] = _checked_ids(ctx, model, ids, op.input_ids)
    else:
        kwargs["inputs_embeds"] = embeds
    facts.check_length(cached, new)
    if op.attention_mask is not None:
        kwargs["attention_mask"] = _checked_mask(ctx, op.attention_mask, rows, cached + new)
    if op.position_ids is not None:
        kwargs["position_ids"] = _checked_positions(
            ctx, op.position_ids, rows, new, facts.max_positions
        )
    if op.labels is not None:
        labels = ctx.resolve(op.labels)
        if not isinstance(labels, torch.Tensor):
            raise RemoteUsageError("cannot compute the loss: labels must be a tensor")
        check_labels(labels, (rows, new), facts.vocab_size)
        kwargs["labels"] = labels
    if op.output_hidden_states:
        kwargs["output_hidden_states"] = True
    if op.output_attentions:
        kwargs["output_attentions"] = True
    if op.logits_to_keep:
        kwargs["logits_to_keep"] = op.logits_to_keep
    if cache is not None:
        kwargs[model.cache_arg] = cache
    ctx.reserve(_forward_bytes(model, op, rows, new, cached), "run the model")
    plain = op.labels is None and not op.output_hidden_states and not op.output_attentions
    out = _call_model(ctx, model, kwargs, cache, plain)
    _keep_outputs(ctx, index, op, model, out, rows, new, cached)
    ctx.device.count(rows, new)


def _cache_in(ctx: Context, value: Any, model: LoadedModel) -> Any:
    if value is None:
        return None
    if type(value) is Ref:
        held = ctx.resolve(value)
        if not hasattr(held, "get_seq_length"):
            raise RemoteUsageError(f"cannot run the model: reference {value.id} is not a KV cache")
        return held
    if isinstance(value, list) and all(
        isinstance(p, tuple) and len(p) == 2 and all(isinstance(t, torch.Tensor) for t in p)
        for p in value
    ):
        layers = [(ctx.device.to_device(k), ctx.device.to_device(v)) for k, v in value]
        return cache_from_layers(layers, model.config)
    raise RemoteUsageError(
        "cannot run the model: cache must be a reference, (keys, values) per layer, or None"
    )


def _checked_ids(ctx: Context, model: LoadedModel, ids: Any, wire: Any) -> torch.Tensor:
    """Ids the model can index with. Ids from the wire are checked at once; ids a
    queued operation made are not read (that would synchronize the device each
    step): a bad one is replaced by 0 and flagged, for the batch's one check."""
    if not isinstance(ids, torch.Tensor):
        raise RemoteUsageError("cannot run the model: input_ids must be a tensor")
    if type(wire) is not Ref:
        model.facts.check_ids(ids)
        return ctx.device.to_device(ids)
    model.facts.check_ids(ids.to("meta"))  # shape and dtype only
    vocab = model.facts.vocab_size
    error = RemoteUsageError(
        f"cannot run the model: input_ids holds a token outside the vocabulary [0, {vocab})"
    )
    return within(ids, 0, vocab, error, ctx.deferred)


def _checked_mask(ctx: Context, wire: Any, rows: int, length: int) -> torch.Tensor:
    """Zeros and ones only: many models take positions from the mask's running sum."""
    mask = ctx.resolve(wire)
    if not isinstance(mask, torch.Tensor):
        raise RemoteUsageError("cannot run the model: attention_mask must be a tensor")
    if type(wire) is not Ref:
        check_mask(mask, rows, length)
        return ctx.device.to_device(mask)
    check_mask(mask.to("meta"), rows, length)
    error = RemoteUsageError("cannot run the model: attention_mask must hold only 0s and 1s")
    return within(mask, 0, 2, error, ctx.deferred)


def _checked_positions(
    ctx: Context, wire: Any, rows: int, new: int, limit: int | None
) -> torch.Tensor:
    positions = ctx.resolve(wire)
    if not isinstance(positions, torch.Tensor):
        raise RemoteUsageError("cannot run the model: position_ids must be a tensor")
    if type(wire) is not Ref:
        check_positions(positions, rows, new, limit)
        return ctx.device.to_device(positions)
    check_positions(positions.to("meta"), rows, new, limit)
    if limit is None:
        return positions
    error = RemoteUsageError(f"cannot run the model: position_ids lie outside [0, {limit})")
    return within(positions, 0, limit, error, ctx.deferred)


def _forward_bytes(model: LoadedModel, op: ForwardOp, rows: int, new: int, cached: int) -> int:
    """What a forward will allocate and keep, from shapes alone."""
    facts, item = model.facts, model.dtype.itemsize
    kept = new if op.logits_to_keep == 0 else min(op.logits_to_keep, new)
    total = rows * kept * facts.vocab_size * item if op.out_logits else 0
    if op.use_cache:
        built = cached if isinstance(op.cache, list) else 0  # a cache sent as data is rebuilt
        total += rows * (built + new) * facts.kv_bytes_per_token(item)
    if op.output_hidden_states:
        total += (facts.layers + 1) * rows * new * facts.hidden * item
    if op.output_attentions:
        total += facts.layers * rows * facts.heads * new * (cached + new) * item
    return total


def _call_model(
    ctx: Context, model: LoadedModel, kwargs: dict[str, Any], cache: Any, plain: bool
) -> Any:
    """The forward: a decode step through the batcher, a long prompt in chunks that
    give the turn up between them, anything else in one call."""
    ids = kwargs.get("input_ids")
    if plain and ids is not None and cache is not None and batchable(model, ids, cache):
        step = Step(model, ids, cache, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        logits = ctx.device.batcher.run(ctx.job, step)
        if kwargs.get("logits_to_keep"):
            logits = logits[:, -kwargs["logits_to_keep"] :]
        return _Output(logits=logits, cache=cache)
    chunk = ctx.prefill_chunk
    if plain and ids is not None and ids.shape[1] > chunk and kwargs["use_cache"]:
        return _chunked(ctx, model, kwargs, cache, chunk)
    out = model.module(**kwargs)
    return _Output(
        logits=out.logits,
        cache=getattr(out, model.cache_arg, None) if model.cache_arg else None,
        loss=getattr(out, "loss", None),
        hidden_states=getattr(out, "hidden_states", None),
        attentions=getattr(out, "attentions", None),
    )


@dataclass
class _Output:
    logits: torch.Tensor
    cache: Any = None
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def _chunked(
    ctx: Context, model: LoadedModel, kwargs: dict[str, Any], cache: Any, chunk: int
) -> _Output:
    """A long prompt, `chunk` tokens per turn, so that others' decode steps run between."""
    from transformers import DynamicCache

    ids: torch.Tensor = kwargs.pop("input_ids")
    mask = kwargs.pop("attention_mask", None)
    positions = kwargs.pop("position_ids", None)
    keep = kwargs.pop("logits_to_keep", 0)
    if cache is None:
        cache = DynamicCache(config=model.config)
    done = cache_length(cache)
    pieces = []
    for start in range(0, ids.shape[1], chunk):
        part: dict[str, Any] = {**kwargs, model.cache_arg: cache}
        end = min(start + chunk, ids.shape[1])
        if mask is not None:
            part["attention_mask"] = mask[:, : done + end]
        if positions is not None:
            part["position_ids"] = positions[:, start:end]
        out = model.module(input_ids=ids[:, start:end], **part)
        pieces.append(out.logits)
        cache = getattr(out, model.cache_arg)
        ctx.device.pause(ctx.job)
    logits = torch.cat(pieces, dim=1)
    return _Output(logits=logits[:, -keep:] if keep else logits, cache=cache)


def _keep_outputs(
    ctx: Context,
    index: int,
    op: ForwardOp,
    model: LoadedModel,
    out: _Output,
    rows: int,
    new: int,
    cached: int,
) -> None:
    per_token = model.facts.kv_bytes_per_token(model.dtype.itemsize)
    if op.out_logits:
        ctx.keep(op.out_logits, out.logits, out.logits.numel() * out.logits.element_size())
    if op.use_cache and out.cache is not None:
        if type(op.cache) is Ref:
            ctx.batch.grown.append(op.cache.id)  # it grew in place
            ctx.batch.nbytes += rows * new * per_token
        elif op.out_cache:
            ctx.keep(op.out_cache, out.cache, rows * (cached + new) * per_token)
    if op.out_loss and out.loss is not None:
        ctx.keep(op.out_loss, out.loss, out.loss.element_size())
    if op.output_hidden_states or op.output_attentions:
        states = {"hidden_states": out.hidden_states, "attentions": out.attentions}
        structure, metas = _store(ctx, states, ctx.server_ids, 0)
        ctx.batch.described[index] = messages.Described(structure, metas)


def _run_call(ctx: Context, index: int, op: CallOp) -> None:
    """A plain nn.Module's forward; its outputs stay under ids the server gives them."""
    model = _model(ctx.session)
    args, kwargs = map_tree((op.args, op.kwargs), ctx.resolve)
    result = model.module(*args, **kwargs)
    nbytes = sum(
        t.numel() * t.element_size() for t in _leaves(result) if isinstance(t, torch.Tensor)
    )
    ctx.reserve(nbytes, "keep the module's outputs")
    structure, metas = _store(ctx, result, ctx.server_ids, nbytes)
    ctx.batch.described[index] = messages.Described(structure, metas)
