"""Token-by-token generation, shared by the server (full policy) and the client (the others).

It follows `transformers`' `generate` for the options it supports, so greedy
output is token-for-token what `model.generate(..., do_sample=False)` gives:
finished rows are padded with `pad_token_id`, and generation stops once
every row has produced an end-of-sequence token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from djinn.errors import UsageError


@dataclass(frozen=True)
class GenerationParams:
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if type(self.max_new_tokens) is not int or self.max_new_tokens < 0:
            raise UsageError(
                f"cannot generate: max_new_tokens must be a non-negative int, "
                f"got {self.max_new_tokens!r}"
            )
        if self.do_sample and not self.temperature > 0:
            raise UsageError(f"cannot sample: temperature must be > 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"cannot sample: top_k must be >= 1, got {self.top_k}")
        if self.pad_token_id is not None and type(self.pad_token_id) is not int:
            raise UsageError(
                f"cannot generate: pad_token_id must be an int, got {self.pad_token_id!r}"
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise UsageError(f"cannot sample: top_p must be in (0, 1], got {self.top_p}")

    @property
    def pad(self) -> int:
        """The token finished rows get: pad_token_id, else the first eos id, else 0."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id[0] if self.eos_token_id else 0

    def check_pad(self, vocab: int) -> None:
        """Raise UsageError if finished rows would be fed a token outside [0, vocab)."""
        if self.eos_token_id and not 0 <= self.pad < vocab:
            raise UsageError(
                f"cannot generate: finished rows would be fed pad token {self.pad}, outside "
                f"the vocabulary [0, {vocab}); pass a pad_token_id inside it"
            )

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, fields: object) -> GenerationParams:
        """Rebuild from a received dict; UsageError for anything malformed."""
        if not isinstance(fields, dict) or set(fields) - set(cls.__dataclass_fields__):
            raise UsageError("cannot generate: malformed generation parameters")
        try:
            params = cls(**fields)
        except TypeError as exc:
            raise UsageError(f"cannot generate: {exc}") from None
        if not isinstance(params.eos_token_id, tuple) or not all(
            type(t) is int for t in params.eos_token_id
        ):
            raise UsageError("cannot generate: eos_token_id must be a tuple of ints")
        return params


def eos_ids(value: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def warp(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as transformers applies them. logits: [B, V]."""
    scores = logits.float()
    if params.temperature != 1.0:
        scores = scores / params.temperature
    if params.top_k is not None:
        k = min(params.top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False, dim=-1)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - params.top_p)
        drop[..., -1:] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def next_tokens(
    logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None
) -> torch.Tensor:
    """The next token of each row from its last-position logits [B, V] -> [B]."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = warp(logits, params).softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


# step(input_ids [B, S], cache, attention_mask) -> (last-position logits [B, V], cache)
Step = Callable[[torch.Tensor, Any, torch.Tensor | None], tuple[torch.Tensor, Any]]


def generate(
    step: Step,
    input_ids: torch.Tensor,
    params: GenerationParams,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Prompt plus up to max_new_tokens new tokens per row, [B, S + n]."""
    if params.do_sample and generator is None:
        generator = torch.Generator(device=input_ids.device).manual_seed(params.seed)
    eos = torch.tensor(params.eos_token_id, device=input_ids.device, dtype=input_ids.dtype)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    pieces = [input_ids]
    ids, cache, mask = input_ids, None, attention_mask
    for _ in range(params.max_new_tokens):
        logits, cache = step(ids, cache, mask)
        token = next_tokens(logits, params, generator)
        if eos.numel():
            token = torch.where(unfinished, token, torch.full_like(token, params.pad))
            unfinished &= ~torch.isin(token, eos)
        ids = token[:, None]
        pieces.append(ids)
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        if eos.numel() and not bool(unfinished.any()):
            break
    return torch.cat(pieces, dim=-1)
