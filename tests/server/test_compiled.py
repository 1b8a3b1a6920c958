"""--compile on: the decode step runs compiled (the warm-up kept it) and a user's loop and
generate give local eager's greedy tokens, fp32 on CPU. One compile of a tiny model on
this machine's two cores takes about half a minute, so that test is slow."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from djinn import RemoteModel, connect
from djinn.errors import UsageError
from djinn.server.batching import Step, _alone
from djinn.server.compiled import WARMUP_TOKENS, CompiledDecode, prepare
from djinn.server.config import ServerConfig
from harness.server import ServerProcess
from tests.models import tiny_gpt2

pytestmark = pytest.mark.timeout(300)
TOKENS = 24


@pytest.fixture(scope="module")
def compiling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("store")
    args = ("--store", str(store), "--device", "cpu", "--compile", "on")
    with ServerProcess(*args, "--log-level", "INFO") as proc:
        yield proc


def local_tokens(model: torch.nn.Module, ids: torch.Tensor) -> list[int]:
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
    return list(out[0, ids.shape[1] :].tolist())


@pytest.mark.slow
def test_a_compiled_loop_and_generate_give_eager_tokens(compiling: ServerProcess) -> None:
    model = tiny_gpt2()
    ids = torch.randint(1, 1999, (1, 12), generator=torch.Generator().manual_seed(4))
    expected = local_tokens(model, ids)
    with RemoteModel(model, compiling.address) as rm:
        out = rm(ids, use_cache=True)
        loop = []
        for _ in range(TOKENS):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            loop.append(int(token.item()))
            out = rm(token, past_key_values=out.past_key_values, use_cache=True)
        generated = rm.generate(ids, max_new_tokens=TOKENS, do_sample=False)
    assert loop == expected
    assert generated[0, ids.shape[1] :].tolist() == expected
    with connect(compiling.address) as client:
        stats = client.server_stats()
    (warmup,) = stats["compiled"].values()
    assert warmup["enabled"], warmup
    assert warmup["tokens_equal"] == WARMUP_TOKENS
    assert warmup["compile_s"] > 0
    assert any("decode step compiled in" in line for line in compiling.lines)


def test_the_warm_up_refuses_a_step_that_changes_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled step that disagrees with eager (here: logits reversed over the vocabulary)
    is never used. Nothing is compiled: the check is what is under test."""
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    real = CompiledDecode.__call__

    def wrong(self: CompiledDecode, *args: object, **kwargs: object) -> torch.Tensor:
        return real(self, *args, **kwargs).flip(-1)  # type: ignore[arg-type]

    monkeypatch.setattr(CompiledDecode, "__call__", wrong)
    model = tiny_gpt2()
    decode, warmup = prepare(model, "cache", 2000, torch.device("cpu"), "on", "tiny")
    assert decode is None
    assert not warmup.enabled
    assert "greedy tokens equal" in warmup.why
    assert warmup.tokens_equal < WARMUP_TOKENS


def test_auto_stays_eager_on_cpu() -> None:
    decode, warmup = prepare(tiny_gpt2(), "cache", 2000, torch.device("cpu"), "auto", "tiny")
    assert decode is None and not warmup.enabled and "CUDA only" in warmup.why


def test_an_unknown_mode_is_refused_at_start() -> None:
    with pytest.raises(UsageError, match="choose one of off, auto, on"):
        ServerConfig(compile="fast").check()


def test_a_step_whose_graph_fails_to_build_runs_eager() -> None:
    """A compiled step that raises before it ran (a new graph that cannot be built) is
    served eager, and the model stays eager; one that raises after growing the cache
    is an error, never run twice."""

    class Failing:
        def __init__(self, grow: bool) -> None:
            self.grow = grow

        def takes(self, rows: int, cached: int) -> bool:
            return True

        def __call__(self, ids: torch.Tensor, cache: Any, *rest: Any) -> torch.Tensor:
            if self.grow:
                layer = cache.layers[0]
                layer.update(layer.keys[..., -1:, :], layer.values[..., -1:, :])
            raise RuntimeError("cannot build this graph")

    model = tiny_gpt2()
    ids = torch.randint(1, 1999, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        cache = model(ids, use_cache=True).cache
        token = torch.tensor([[7]])
        expected = model(token, cache=copy.deepcopy(cache), use_cache=True).logits
        loaded = SimpleNamespace(
            module=model, cache_arg="cache", decode=Failing(False), fingerprint="f" * 64
        )
        step = Step(loaded, token, cache, None, None)  # type: ignore[arg-type]
        _alone(step)
        assert step.logits is not None and torch.equal(step.logits, expected)
        assert loaded.decode is None
        loaded.decode = Failing(True)
        with pytest.raises(RuntimeError, match="cannot build"):
            _alone(Step(loaded, token, cache, None, None))  # type: ignore[arg-type]
