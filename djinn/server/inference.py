"""Model work as the device thread runs it: checked inputs in, host-ready results out.

Nothing here touches sessions or the network; the handlers do that on the
event loop with what these functions return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from djinn.errors import RemoteUsageError
from djinn.generation import GenerationParams, generate
from djinn.net.payload import Ref
from djinn.server.executor import Executor
from djinn.server.models import LoadedModel
from djinn.tree import map_tree

LOGITS_MODES = ("all", "last", "ref", "none")
CACHE_MODES = ("data", "ref", "none")


@dataclass
class ForwardResult:
    logits: torch.Tensor | None  # on the host (all/last) or the device (ref)
    cache: Any  # the transformers cache object, on the device
    cache_data: list[tuple[torch.Tensor, torch.Tensor]] | None  # on the host, when asked
    cache_len: int


def cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) per layer of a transformers cache, legacy tuples included."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v, *_ in cache]


def cache_from_layers(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], config: Any) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers), config=config)


def cache_length(cache: Any) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def check_ids(model: LoadedModel, ids: torch.Tensor, cached: int, name: str = "input_ids") -> None:
    """Refuse ids the model would index out of bounds with (a device assert on CUDA)."""
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
        raise RemoteUsageError(
            f"cannot run the model: {name} must be [batch, seq], got {list(ids.shape)}"
        )
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise RemoteUsageError(f"cannot run the model: {name} must be integers, got {ids.dtype}")
    embeddings = model.module.get_input_embeddings()
    vocab = embeddings.num_embeddings
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        raise RemoteUsageError(
            f"cannot run the model: {name} holds token {high if high >= vocab else low}, "
            f"outside the vocabulary [0, {vocab})"
        )
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and cached + ids.shape[1] > limit:
        raise RemoteUsageError(
            f"cannot run the model: {cached} cached + {ids.shape[1]} new tokens exceed "
            f"its {limit} positions"
        )


def forward(
    executor: Executor,
    model: LoadedModel,
    input_ids: torch.Tensor,
    cache: Any,
    attention_mask: torch.Tensor | None,
    logits_mode: str,
    cache_mode: str,
) -> ForwardResult:
    """One model call. `cache` is a cache object, a list of host (k, v) pairs, or None."""
    if isinstance(cache, list):
        cache = cache_from_layers(
            [(executor.to_device(k), executor.to_device(v)) for k, v in cache], model.config
        )
    check_ids(model, input_ids, cache_length(cache))
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
