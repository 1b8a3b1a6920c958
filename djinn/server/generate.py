"""transformers' own `generate`, run on the server on a session's model.

No copy of its logic: the server calls `generate` on a shallow copy of the
model whose `forward` sends each decode step through the batcher (so steps
of concurrent generates and user loops share one forward) and gives the
device's turn up between steps. A stopping criterion checks the job every
step, so a CANCEL, a closed connection or --max-call-seconds stops it
within one step. Sampling draws from the global torch RNG, seeded per call
from the client's seed; its state is set aside whenever the job gives the
turn up and put back when it takes the turn again, so a seed gives the same
samples however many other calls run in between.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import torch

from djinn import messages
from djinn.errors import LimitExceededError, RemoteUsageError
from djinn.generation import CONFIG_FIELDS, build_component, check_token_ids
from djinn.modelfacts import check_mask
from djinn.net.codec import Ref
from djinn.server.batching import Step, batchable
from djinn.server.device import Device, Job
from djinn.server.inference import Context, _store
from djinn.server.models import LoadedModel

# Keyword arguments generate passes a decode step that a batched forward serves.
_STEP_KWARGS: Final = frozenset(
    {"input_ids", "attention_mask", "position_ids", "logits_to_keep", "use_cache", "return_dict"}
)


@dataclass
class Result:
    tokens: torch.Tensor  # the new tokens, on the host
    outputs: messages.Described | None  # the GenerateOutput's other fields, if asked


def run_generate(
    ctx: Context,
    args: messages.GenerateArgs,
    send_tokens: Callable[[torch.Tensor], None],
    max_tokens: int,
) -> Result:
    model = ctx.session.model
    if model is None:
        raise RemoteUsageError("cannot generate: this session has no model")
    ids = ctx.resolve(args.input_ids)
    if not isinstance(ids, torch.Tensor):
        raise RemoteUsageError("cannot generate: input_ids must be a tensor")
    if type(args.input_ids) is not Ref:
        model.facts.check_ids(ids)
    config = _config(model, args.config)
    cache = ctx.session.get(args.cache) if args.cache else None
    if cache is not None and not hasattr(cache, "get_seq_length"):
        raise RemoteUsageError(f"cannot generate: reference {args.cache} is not a KV cache")
    kwargs: dict[str, Any] = {"input_ids": ctx.device.to_device(ids), "generation_config": config}
    if args.attention_mask is not None:
        mask = ctx.resolve(args.attention_mask)
        if not isinstance(mask, torch.Tensor):
            raise RemoteUsageError("cannot generate: attention_mask must be a tensor")
        check_mask(mask, ids.shape[0], ids.shape[1])
        kwargs["attention_mask"] = ctx.device.to_device(mask)
    if cache is not None:
        kwargs[model.cache_arg] = cache
    _check_size(ctx, model, config, ids, max_tokens)
    vocab = model.facts.vocab_size
    check_token_ids(config.to_dict(), vocab)  # a forged request: the client checked too
    for spec in (*args.processors, *args.criteria):
        check_token_ids(spec.kwargs, vocab, f"use {spec.name}", strict=True)
    processors = [build_component(c, "processor") for c in args.processors]
    criteria = [build_component(c, "criteria") for c in args.criteria]
    from transformers import LogitsProcessorList, StoppingCriteriaList

    kwargs["logits_processor"] = LogitsProcessorList(processors)
    kwargs["stopping_criteria"] = StoppingCriteriaList([*criteria, _Checkpoint(ctx.job)])
    if args.stream:
        kwargs["streamer"] = _Streamer(send_tokens)
    rng = _Rng(ctx.device) if config.do_sample else None
    if rng is not None:
        torch.manual_seed(args.seed if args.seed is not None else 0)
    steps = _Steps()
    proxy = _proxy(ctx, model, rng, steps)
    try:
        out = proxy.generate(**kwargs)  # type: ignore[operator]
    except (ValueError, ZeroDivisionError) as exc:  # num_beams=0 divides by zero
        if steps.forwards or not _from_generation(exc):  # it failed running, or in our code
            raise
        # transformers checks some settings only as it builds its processors
        raise RemoteUsageError(f"cannot generate: {type(exc).__name__}: {exc}") from None
    sequences = out if isinstance(out, torch.Tensor) else out.sequences
    tokens = ctx.device.to_host(sequences[:, ids.shape[1] :])
    ctx.device.tokens["generated"] += tokens.numel()
    if isinstance(out, torch.Tensor):
        return Result(tokens, None)
    return Result(tokens, _outputs(ctx, out, model, keep=bool(args.keep)))


def _config(model: LoadedModel, fields: dict[str, Any]) -> Any:
    unknown = sorted(set(fields) - CONFIG_FIELDS)
    if unknown:
        raise RemoteUsageError(f"cannot generate: the server does not take {', '.join(unknown)}")
    module: Any = model.module  # a transformers model: it has a generation_config
    config = copy.deepcopy(module.generation_config)
    try:
        config.update(**fields)
        config.validate()
    except (TypeError, ValueError) as exc:
        raise RemoteUsageError(f"cannot generate: {exc}") from None
    return config


def _check_size(
    ctx: Context, model: LoadedModel, config: Any, ids: torch.Tensor, limit: int
) -> None:
    """Tokens and memory, from the settings alone, before anything runs."""
    prompt = ids.shape[1]
    new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt
    rows = ids.shape[0] * max(config.num_beams or 1, config.num_return_sequences or 1)
    if rows * max(new, 0) > limit:
        raise LimitExceededError(
            f"cannot generate {new} tokens for {rows} rows: the server allows {limit:,} "
            "(batch x beams x new tokens) per call (--max-generate-tokens)"
        )
    model.facts.check_length(0, prompt + max(new, 0))
    item = model.dtype.itemsize
    nbytes = rows * (prompt + new) * model.facts.kv_bytes_per_token(item)
    if config.output_scores or config.output_logits:
        nbytes += 2 * new * rows * model.facts.vocab_size * 4
    ctx.reserve(nbytes, "generate")


class _Checkpoint:
    """A stopping criterion that never stops on its own; it stops generate by raising
    when the job must end (cancelled, disconnected, out of time)."""

    def __init__(self, job: Job) -> None:
        self._job = job

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self._job.check()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class _Streamer:
    """transformers' streamer interface; the first put is the prompt, which the client has."""

    def __init__(self, send: Callable[[torch.Tensor], None]) -> None:
        self._send = send
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        self._send(value.detach().to("cpu", copy=True))

    def end(self) -> None:
        pass


class _Rng:
    """The call's RNG state, kept aside while another job holds the turn."""

    def __init__(self, device: Device) -> None:
        self._cuda = device.device if device.is_cuda else None
        self._state: tuple[torch.Tensor, torch.Tensor | None] | None = None

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        cuda = torch.cuda.get_rng_state(self._cuda) if self._cuda is not None else None
        saved = (torch.get_rng_state(), cuda)
        try:
            yield
        finally:
            torch.set_rng_state(saved[0])
            if self._cuda is not None and saved[1] is not None:
                torch.cuda.set_rng_state(saved[1], self._cuda)


def _from_generation(exc: BaseException) -> bool:
    """Raised in transformers' generation code itself (where it checks settings)."""
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and f"transformers{os.sep}generation{os.sep}" in frames[-1].filename


@dataclass
class _Steps:
    forwards: int = 0  # the model's forwards generate has run so far


def _proxy(ctx: Context, model: LoadedModel, rng: _Rng | None, steps: _Steps) -> torch.nn.Module:
    """The model with a forward that batches decode steps and yields the turn between."""
    proxy = copy.copy(model.module)  # shares the weights; its own __dict__
    real = model.module.forward

    @functools.wraps(real)  # generate reads forward's signature to choose its kwargs
    def forward(*args: Any, **kwargs: Any) -> Any:
        steps.forwards += 1
        ids = kwargs.get("input_ids")
        out = run(*args, **kwargs)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:  # rows: the batch times its beams
            ctx.device.count(*ids.shape)
        return out

    def run(*args: Any, **kwargs: Any) -> Any:
        """A decode step through the batcher; anything else as it is, after a pause."""
        ids = kwargs.get("input_ids")
        cache = kwargs.get(model.cache_arg)
        plain = not args and set(kwargs) - {model.cache_arg} <= _STEP_KWARGS
        guard = rng.aside() if rng is not None else contextlib.nullcontext()
        if plain and ids is not None and batchable(model, ids, cache):
            step = Step(model, ids, cache, kwargs.get("attention_mask"), kwargs.get("position_ids"))
            with guard:
                logits = ctx.device.batcher.run(ctx.job, step)
            keep = kwargs.get("logits_to_keep") or 0
            return _output(model, logits[:, -keep:] if keep else logits, cache)
        with guard:
            ctx.device.pause(ctx.job)
        return real(*args, **kwargs)

    proxy.forward = forward
    return proxy


def _output(model: LoadedModel, logits: torch.Tensor, cache: Any) -> Any:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast(logits=logits, **{model.cache_arg: cache})


def _outputs(ctx: Context, out: Any, model: LoadedModel, keep: bool) -> messages.Described:
    """The GenerateOutput's fields but the sequences: under the ids the server gives them
    where the client keeps them on the server, else as data; a cache as its layers."""
    from djinn.kvcache import cache_layers

    fields: dict[str, Any] = {}
    metas: dict[int, messages.TensorMeta] = {}
    for name, value in out.items():
        if name == "sequences" or value is None:
            continue
        if hasattr(value, "get_seq_length"):  # the cache
            if keep:
                ref_id = next(ctx.server_ids)
                ctx.keep(ref_id, value, 0)
                metas[ref_id] = messages.TensorMeta([value.get_seq_length()], "cache")
                fields[name] = Ref(ref_id)
            else:
                fields[name] = [
                    (ctx.device.to_host(k), ctx.device.to_host(v)) for k, v in cache_layers(value)
                ]
        elif keep:
            structure, found = _store(ctx, value, ctx.server_ids, 0)
            fields[name] = structure
            metas.update(found)
        else:
            fields[name] = _on_host(ctx.device, value)
    return messages.Described(fields, metas)


def _on_host(device: Device, value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return device.to_host(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_on_host(device, v) for v in value)
    return value
