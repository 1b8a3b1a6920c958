"""What both ends know of a causal LM from its config, and the input checks both make.

The client plans a call and checks its inputs before anything is sent; the
server checks again what arrives (a forged request must not reach a CUDA
kernel with an out-of-range index, which is a device-side assert that ends
every session). Both read the same facts from the same config here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Final

import torch

from djinn.errors import UsageError

ID_DTYPES: Final = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
# transformers' loss ignores label positions that hold this value.
IGNORE_INDEX: Final = -100


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """Sizes a call's outputs take, from the config alone."""

    vocab_size: int
    max_positions: int | None
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: Any) -> ModelFacts:
        text = getattr(config, "get_text_config", None)
        config = text() if callable(text) else config
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        heads = int(getattr(config, "num_attention_heads", 0) or 1)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or (hidden // heads if hidden else 0))
        positions = getattr(config, "max_position_embeddings", None)
        return cls(
            vocab_size=int(getattr(config, "vocab_size", 0) or 0),
            max_positions=positions if isinstance(positions, int) and positions > 0 else None,
            layers=int(getattr(config, "num_hidden_layers", 0) or 0),
            hidden=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
        )

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """Bytes one position of one row adds to a KV cache."""
        return self.layers * 2 * self.kv_heads * self.head_dim * itemsize

    def check_ids(self, ids: torch.Tensor, what: str = "input_ids") -> None:
        """Shape and dtype of token ids, and (for values at hand) the vocabulary range."""
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise UsageError(
                f"cannot run the model: {what} must be [batch, seq], got {list(ids.shape)}"
            )
        if ids.dtype not in ID_DTYPES:
            raise UsageError(f"cannot run the model: {what} must be integers, got {ids.dtype}")
        if ids.device.type == "cpu" and self.vocab_size:
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.vocab_size:
                bad = high if high >= self.vocab_size else low
                raise UsageError(
                    f"cannot run the model: {what} holds token {bad}, outside the "
                    f"vocabulary [0, {self.vocab_size})"
                )

    def check_length(self, cached: int, new: int) -> None:
        if self.max_positions is not None and cached + new > self.max_positions:
            raise UsageError(
                f"cannot run the model: {cached} cached + {new} new tokens exceed "
                f"its {self.max_positions} positions"
            )


def check_mask(mask: torch.Tensor, rows: int, length: int) -> None:
    """An attention mask is [rows, cached + new] of zeros and ones: many models derive
    positions from its running sum, so any other value indexes past their tables."""
    if tuple(mask.shape) != (rows, length):
        raise UsageError(
            f"cannot run the model: attention_mask must be [batch, cached + new] = "
            f"{[rows, length]}, got {list(mask.shape)}"
        )
    if mask.dtype.is_complex:
        raise UsageError("cannot run the model: attention_mask must hold 0s and 1s")
    if mask.device.type == "cpu" and mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise UsageError("cannot run the model: attention_mask must hold only 0s and 1s")


def check_positions(positions: torch.Tensor, rows: int, new: int, limit: int | None) -> None:
    if tuple(positions.shape) not in ((rows, new), (1, new)):
        raise UsageError(
            f"cannot run the model: position_ids must be [batch, new] = {[rows, new]}, "
            f"got {list(positions.shape)}"
        )
    if positions.dtype not in ID_DTYPES:
        raise UsageError(
            f"cannot run the model: position_ids must be integers, not {positions.dtype}"
        )
    if positions.device.type == "cpu" and positions.numel() and limit is not None:
        low, high = int(positions.min()), int(positions.max())
        if low < 0 or high >= limit:
            raise UsageError(
                f"cannot run the model: position_ids holds {high if high >= limit else low}, "
                f"outside [0, {limit})"
            )


def check_labels(labels: torch.Tensor, shape: tuple[int, int], vocab: int) -> None:
    if tuple(labels.shape) != shape:
        raise UsageError(
            f"cannot compute the loss: labels must be {list(shape)}, got {list(labels.shape)}"
        )
    if labels.dtype not in ID_DTYPES:
        raise UsageError(f"cannot compute the loss: labels must be integers, not {labels.dtype}")
    if labels.device.type == "cpu" and labels.numel():
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            raise UsageError(
                f"cannot compute the loss: labels must lie in [0, {vocab}) or be {IGNORE_INDEX}"
            )


def cache_arg(module: torch.nn.Module) -> str | None:
    """How this model's forward names its KV cache, across transformers versions."""
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None
