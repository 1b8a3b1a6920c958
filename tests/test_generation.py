"""Token selection against transformers' own logits warpers, and the generate loop's stopping."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from djinn.errors import UsageError
from djinn.generation import GenerationParams, generate, warp


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (1.0, None, None),
        (0.7, None, None),
        (1.0, 5, None),
        (1.0, None, 0.8),
        (1.3, 20, 0.5),
        (1.0, 1, None),
    ],
    ids=["plain", "temperature", "top-k", "top-p", "all", "top-1"],
)
def test_warp_matches_transformers(
    temperature: float, top_k: int | None, top_p: float | None
) -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    expected = logits.clone()
    ids = torch.zeros(3, 1, dtype=torch.long)
    if temperature != 1.0:
        expected = TemperatureLogitsWarper(temperature)(ids, expected)
    if top_k is not None:
        expected = TopKLogitsWarper(top_k)(ids, expected)
    if top_p is not None:
        expected = TopPLogitsWarper(top_p)(ids, expected)
    params = GenerationParams(1, True, temperature, top_k, top_p)
    torch.testing.assert_close(warp(logits, params), expected)


def _counting_step(vocab: int, script: list[list[int]]):  # type: ignore[no-untyped-def]
    """A fake model whose argmax follows `script` (one list of tokens per step)."""
    calls = []

    def step(ids: torch.Tensor, cache: object, mask: object) -> tuple[torch.Tensor, object]:
        calls.append(ids.shape)
        logits = torch.zeros(ids.shape[0], vocab)
        for row, token in enumerate(script[len(calls) - 1]):
            logits[row, token] = 1.0
        return logits, cache

    return step, calls


def test_stops_when_every_row_has_ended_and_pads_finished_rows() -> None:
    step, calls = _counting_step(10, [[5, 9], [9, 3], [4, 4], [1, 1]])
    params = GenerationParams(max_new_tokens=4, eos_token_id=(9,), pad_token_id=0)
    out = generate(step, torch.ones(2, 3, dtype=torch.long), params)
    assert out[:, 3:].tolist() == [[5, 9], [9, 0]]
    assert len(calls) == 2 and calls[1] == (2, 1)


def test_runs_to_max_new_tokens_without_eos() -> None:
    step, calls = _counting_step(10, [[1]] * 5)
    out = generate(step, torch.ones(1, 2, dtype=torch.long), GenerationParams(max_new_tokens=5))
    assert out.shape == (1, 7) and len(calls) == 5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": -1},
        {"max_new_tokens": 1, "do_sample": True, "temperature": 0.0},
        {"max_new_tokens": 1, "top_p": 1.5},
        {"max_new_tokens": 1, "top_k": 0},
    ],
    ids=["negative-length", "zero-temperature", "top-p", "top-k"],
)
def test_bad_parameters_are_usage_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        GenerationParams(**kwargs)  # type: ignore[arg-type]


def test_parameters_survive_the_wire_and_refuse_garbage() -> None:
    params = GenerationParams(7, True, 0.5, 3, 0.9, (2,), 0, 11)
    assert GenerationParams.from_wire(params.to_wire()) == params
    for bad in (
        "x",
        {"max_new_tokens": 1, "evil": 1},
        {"max_new_tokens": 1, "eos_token_id": ["a"]},
    ):
        with pytest.raises(UsageError):
            GenerationParams.from_wire(bad)
