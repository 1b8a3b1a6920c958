"""A model's decode step under torch.compile (`--compile off|auto|on`).

Why on the server: it owns the model and sees every decode step, so it pays
for one compile and serves every session of the model with it, where a
user's local eager loop pays the framework's per-op overhead each token.

The step is compiled once, when the model is loaded, with dynamic shapes
over transformers' DynamicCache, so a growing cache does not recompile and
a session's cache stays the plain cache every other path (batching,
fetch, replay) handles. It serves one row's decode step run alone (a user's
loop, a one-row generate); prefill, several sessions' steps batched
together and multi-row steps stay eager. A compiled step is always called
with the same arguments (mask and positions made when the caller gave
none), so one graph serves every caller. A step that would need a new
graph and fails to build it runs eager, and so does the model from then on.

The warm-up runs in the loading thread, beside other sessions' work: on a
busy server its timings, and with them `auto`'s choice, are noisier. Models
of one architecture share their graph (torch keys it on the forward's code);
past torch's recompile limit, 8 graphs per forward, torch runs eager, and
the warm-up would keep a step that gains nothing.

The warm-up decides: it runs the same greedy decode eager and compiled,
and keeps the compiled step only if every token is equal. With `auto` it
must also be faster; `auto` compiles on CUDA only, because on this
project's 2-core CPU the gpt2 preset's compile took 14 s (41 s for a 2-layer
GPT-2 with no inductor cache yet) and saved 7-12% per step (README).

Left for a GPU: a static cache sized by --max-context under CUDA graphs
(`mode="reduce-overhead"`), where the launch-bound decode step gains most.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Final

import torch

WARMUP_PROMPT: Final = 8  # prompt tokens of the warm-up decode
WARMUP_TOKENS: Final = 8  # greedy tokens it compares
MIN_CACHED: Final = 2  # shorter caches run eager: torch specializes sizes 0 and 1

log = logging.getLogger("djinn.server")


@dataclass(frozen=True)
class Warmup:
    """What the warm-up measured, reported in the log and in server_stats."""

    enabled: bool
    why: str
    compile_s: float = 0.0  # the first compiled decode (WARMUP_TOKENS steps), compile included
    eager_ms: float = 0.0  # per decode step, on the warm-up prompt
    compiled_ms: float = 0.0
    tokens_equal: int = 0  # of WARMUP_TOKENS
    max_logit_diff: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CompiledDecode:
    """One model's compiled decode step: [rows, 1] new tokens on a DynamicCache."""

    def __init__(self, module: torch.nn.Module, cache_arg: str) -> None:
        self._forward = torch.compile(module.forward, dynamic=True)
        self._cache_arg = cache_arg

    def takes(self, rows: int, cached: int) -> bool:
        """Steps the compiled graph serves without a recompile."""
        return rows == 1 and cached >= MIN_CACHED

    def __call__(
        self,
        input_ids: torch.Tensor,
        cache: Any,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The step's logits; the cache grows in place."""
        rows, cached = input_ids.shape[0], cache.get_seq_length()
        device = input_ids.device
        if attention_mask is None:
            attention_mask = torch.ones(rows, cached + 1, dtype=torch.long, device=device)
        if position_ids is None:
            position_ids = torch.full((rows, 1), cached, dtype=torch.long, device=device)
        out = self._forward(
            input_ids=input_ids,
            attention_mask=attention_mask.to(torch.long),
            position_ids=position_ids.to(torch.long),
            use_cache=True,
            **{self._cache_arg: cache},
        )
        logits: torch.Tensor = out.logits
        return logits


def prepare(
    module: torch.nn.Module, cache_arg: str, vocab: int, device: torch.device, mode: str, name: str
) -> tuple[CompiledDecode | None, Warmup]:
    """The model's compiled decode step, if `mode` and the warm-up say to use one."""
    if mode == "off":
        return None, Warmup(False, "--compile off")
    if mode == "auto" and device.type != "cuda":
        return None, Warmup(False, "--compile auto compiles on CUDA only; pass --compile on")
    if not cache_arg:
        return None, Warmup(False, "the model takes no KV cache")
    log.info("model %s: compiling its decode step (--compile %s)...", name, mode)
    try:
        compiled = CompiledDecode(module, cache_arg)
        report = _warm_up(module, cache_arg, compiled, vocab, device, mode)
    except Exception as exc:  # a backend that cannot build (no compiler, an unsupported op)
        log.warning("model %s: compile failed, serving eager: %s", name, exc)
        return None, Warmup(False, f"compile failed: {type(exc).__name__}: {exc}")
    log.info(
        "model %s: decode step compiled in %.1f s; warm-up: %d/%d greedy tokens equal eager, "
        "max logit diff %.3g, %.2f ms/step compiled against %.2f eager: %s",
        name,
        report.compile_s,
        report.tokens_equal,
        WARMUP_TOKENS,
        report.max_logit_diff,
        report.compiled_ms,
        report.eager_ms,
        "compiled" if report.enabled else f"eager ({report.why})",
    )
    return (compiled if report.enabled else None), report


def _warm_up(
    module: torch.nn.Module,
    cache_arg: str,
    compiled: CompiledDecode,
    vocab: int,
    device: torch.device,
    mode: str,
) -> Warmup:
    ids = torch.randint(0, vocab, (1, WARMUP_PROMPT), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)

    def eager(tok: torch.Tensor, cache: Any) -> torch.Tensor:
        logits: torch.Tensor = module(input_ids=tok, use_cache=True, **{cache_arg: cache}).logits
        return logits

    def run(step: Callable[[torch.Tensor, Any], torch.Tensor]) -> tuple[list[int], Any, float]:
        return _greedy(module, cache_arg, ids, step, device)

    with torch.inference_mode():
        run(eager)  # warm caches and allocator before anything is timed
        began = time.perf_counter()
        run(compiled)
        compile_s = time.perf_counter() - began
        eager_tokens, eager_logits, eager_s = min((run(eager) for _ in range(2)), key=_seconds)
        tokens, logits, compiled_s = min((run(compiled) for _ in range(2)), key=_seconds)
    equal = sum(a == b for a, b in zip(tokens, eager_tokens, strict=True))
    diff = float((logits - eager_logits).abs().max())
    eager_ms, compiled_ms = eager_s / WARMUP_TOKENS * 1e3, compiled_s / WARMUP_TOKENS * 1e3
    why = "its greedy tokens equal eager's"
    enabled = equal == WARMUP_TOKENS
    if not enabled:
        why = f"only {equal} of {WARMUP_TOKENS} greedy tokens equal eager's"
    elif mode == "auto" and compiled_ms >= eager_ms:
        enabled, why = False, "the compiled step was not faster"
    return Warmup(enabled, why, compile_s, eager_ms, compiled_ms, equal, diff)


def _seconds(result: tuple[list[int], Any, float]) -> float:
    return result[2]


def _greedy(
    module: torch.nn.Module,
    cache_arg: str,
    ids: torch.Tensor,
    step: Callable[[torch.Tensor, Any], torch.Tensor],
    device: torch.device,
) -> tuple[list[int], torch.Tensor, float]:
    """The tokens and logits of WARMUP_TOKENS greedy decode steps after an eager prefill,
    and the steps' seconds; the host reads nothing until the end."""
    out = module(input_ids=ids, use_cache=True)
    cache = getattr(out, cache_arg)
    tok = out.logits[:, -1:].argmax(-1)
    tokens, logits = [], []
    _sync(device)
    began = time.perf_counter()
    for _ in range(WARMUP_TOKENS):
        last = step(tok, cache)[:, -1]
        logits.append(last.float())
        tok = last.argmax(-1, keepdim=True)
        tokens.append(tok)
    _sync(device)
    seconds = time.perf_counter() - began
    return torch.cat(tokens, dim=1)[0].tolist(), torch.stack(logits), seconds


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
