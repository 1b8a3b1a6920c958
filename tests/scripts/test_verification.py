"""The experiment's verification pass has teeth: it passes every remote path that keeps
the KV cache right and fails paths that mishandle it, injected here through wrappers
only a test builds."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from djinn import RemoteModel
from harness.exp2_1 import INIT_RANGE, MIN_DISTINCT, Local, build_model, check, prompt_ids, trace
from harness.server import ServerProcess

pytestmark = pytest.mark.timeout(120)
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=64, vocab_size=512, initializer_range=INIT_RANGE
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def ids(model: GPT2LMHeadModel) -> torch.Tensor:
    return prompt_ids(None, 16, model.config.vocab_size)


class IgnoresCache:
    """A fault: every step runs without the cache the last step returned."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __call__(self, ids: torch.Tensor, past_key_values: Any, use_cache: bool) -> Any:
        return self.model(ids, past_key_values=None, use_cache=use_cache)


class StaleCache:
    """A fault: every step gets the prefill's cache again, never the newest one."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.first: Any = None

    def __call__(self, ids: torch.Tensor, past_key_values: Any, use_cache: bool) -> Any:
        out = self.model(ids, past_key_values=self.first, use_cache=use_cache)
        if self.first is None:
            self.first = out.past_key_values
        return out


@pytest.mark.parametrize("policy", ["full", "semantic_blind", "partially_aware"])
def test_a_correct_remote_path_passes(
    server: ServerProcess, model: GPT2LMHeadModel, ids: torch.Tensor, policy: str
) -> None:
    native = trace(Local(model), ids, NEW_TOKENS)
    with RemoteModel(model, server.address, policy=policy) as rm:
        result = check(native, trace(rm, ids, NEW_TOKENS), torch.float32)
    assert result["ok"], result
    assert result["cache_tokens"] == 16 + NEW_TOKENS - 1
    assert result["max_logit_diff"] <= 1e-4 * result["logit_scale"]


def test_an_ignored_cache_fails(
    server: ServerProcess, model: GPT2LMHeadModel, ids: torch.Tensor
) -> None:
    native = trace(Local(model), ids, NEW_TOKENS)
    with RemoteModel(model, server.address, policy="full") as rm:
        result = check(native, trace(IgnoresCache(rm), ids, NEW_TOKENS), torch.float32)
    assert not result["ok"]
    assert result["cache_tokens"] == 1  # the server holds only the last step's position
    assert result["max_logit_diff"] > 1e-4 * result["logit_scale"]


def test_a_stale_cache_fails_even_where_tokens_agree(
    server: ServerProcess, model: GPT2LMHeadModel, ids: torch.Tensor
) -> None:
    native = trace(Local(model), ids, NEW_TOKENS)
    with RemoteModel(model, server.address, policy="semantic_blind") as rm:
        broken = trace(StaleCache(rm), ids, NEW_TOKENS)
    result = check(native, broken, torch.float32)
    assert not result["ok"]
    assert result["max_logit_diff"] > 1e-4 * result["logit_scale"]
    assert result["cache_tokens"] != result["native_cache_tokens"]


@pytest.mark.slow
def test_the_default_preset_decodes_varied_tokens() -> None:
    model, tokenizer, _ = build_model("gpt2", torch.device("cpu"), torch.float32, seed=0)
    ids = prompt_ids(tokenizer, 72, model.config.vocab_size)
    tokens = trace(Local(model), ids, 50).tokens
    assert len(set(tokens)) >= MIN_DISTINCT


def test_a_compiled_trace_is_held_to_its_tokens_and_cache_length(
    model: GPT2LMHeadModel, ids: torch.Tensor
) -> None:
    """Compiled against eager: summation-order differences are reported, not failed; a
    changed token or a short cache still fails."""
    native = trace(Local(model), ids, NEW_TOKENS)
    drifted = native._replace(logits=native.logits + 0.5)
    result = check(native, drifted, torch.float32, compiled=True)
    assert result["ok"] and result["tolerance"] is None
    assert result["max_logit_diff"] == pytest.approx(0.5)
    assert not check(native, drifted, torch.float32)["ok"]
    other = native._replace(tokens=[native.tokens[0] + 1, *native.tokens[1:]])
    assert not check(native, other, torch.float32, compiled=True)["ok"]
    short = native._replace(cache=[(k[..., :-1, :], v[..., :-1, :]) for k, v in native.cache])
    assert not check(native, short, torch.float32, compiled=True)["ok"]
