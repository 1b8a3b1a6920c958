"""KV caches in the forms both ends meet them: a transformers cache object
(with `layers` from transformers 5 on) or the legacy tuple of (keys, values)
per layer. The wire carries only the (keys, values) pairs, so the client and
the server read and rebuild caches with these same three functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from djinn.errors import UsageError

Layers = list[tuple[torch.Tensor, torch.Tensor]]


def cache_length(cache: Any) -> int:
    """How many positions the cache holds; 0 for no cache."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple of (k, v) per layer


def cache_layers(cache: Any) -> Layers:
    """(keys, values) per layer, legacy tuples included."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    if isinstance(cache, (list, tuple)):
        return [(k, v) for k, v, *_ in cache]
    raise UsageError(
        f"cannot send a cache of type {type(cache).__name__}: pass the past_key_values "
        "a previous call returned"
    )


def cache_from_layers(
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]], config: Any = None
) -> Any:
    """A transformers DynamicCache holding these layers (the model's config, where
    known, tells it each layer's kind)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(layers), config=config)
