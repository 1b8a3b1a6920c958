"""Experiment 2.1's reusable parts: the presets, the model and prompt, the decode loop
every baseline runs, and the statistics of timed runs. The report (scripts/exp2_1.py)
and the benchmarks build on these.

Every baseline runs the same client-driven greedy loop: one prefill of the
prompt, then one step per new token, each step feeding back the previous
step's cache and reading the next token from the last logits row:

    out = model(ids, past_key_values=cache)
    ids = out.logits[:, -1].argmax(-1, keepdim=True)
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {  # (layers, width, heads) of the released GPT-2 checkpoints
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
BASELINES = ("native_pytorch", "semantic_blind", "partially_aware", "full_djinn")
POLICIES = {
    "semantic_blind": "semantic_blind",
    "partially_aware": "partially_aware",
    "full_djinn": "full",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
PROMPT_FILE = ROOT / "scripts" / "data" / "prompt.txt"
SEED_TABLE = "GPT2-XL, 72 prompt tokens, 50 new tokens; ../shared/seed/000_890ddc4eb1080847.txt"


# -- the model and the prompt ---------------------------------------------------------------


def is_model(name: str) -> bool:
    """A GPT-2 preset name, or a folder holding a model's config."""
    return name in PRESETS or (Path(name) / "config.json").is_file()


def build_model(
    name: str, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[Any, Any, str]:
    """(model, tokenizer or None, model id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if name in PRESETS:
        layers, width, heads = PRESETS[name]
        config = GPT2Config(n_layer=layers, n_embd=width, n_head=heads)
        torch.manual_seed(seed)
        with torch.device(device):
            model: Any = GPT2LMHeadModel(config)  # Any: transformers types .to() for its own use
        return model.to(dtype).eval(), None, f"{name} (seeded random weights, seed {seed})"
    path = Path(name)
    if not is_model(name):
        raise SystemExit(f"--model {name}: not a preset ({', '.join(PRESETS)}) nor a model folder")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tokenizer = None  # a folder without a tokenizer: ids come from the text's bytes
    if any((path / f).exists() for f in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.to(device).eval(), tokenizer, str(path.resolve())


def prompt_ids(tokenizer: Any, length: int, vocab: int) -> torch.Tensor:
    """The repo's fixed prompt as exactly `length` ids, repeated as needed.

    With a tokenizer, its tokens; without one, the text's UTF-8 bytes, which
    are valid ids in any vocabulary of 256 or more (GPT-2's first 256 tokens
    are the bytes).
    """
    text = PROMPT_FILE.read_text()
    ids = tokenizer(text)["input_ids"] if tokenizer is not None else list(text.encode())
    ids = [i % vocab for i in ids] * (length // len(ids) + 1)
    return torch.tensor([ids[:length]], dtype=torch.long)


# -- the decode loop ------------------------------------------------------------------------


class Local:
    """The local model behind the loop's interface, whichever name its transformers
    version gives the cache (past_key_values up to 4.x, cache from 5.0)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.name = "cache" if "cache" in params else "past_key_values"

    def __call__(self, ids: torch.Tensor, past_key_values: Any, use_cache: bool) -> Any:
        out = self.model(input_ids=ids, use_cache=use_cache, **{self.name: past_key_values})
        return SimpleNamespace(logits=out.logits, past_key_values=getattr(out, self.name))


def decode(model: Callable[..., Any], ids: torch.Tensor, new_tokens: int) -> list[int]:
    """The loop every baseline runs: greedy, with the KV cache passed back each step."""
    out = model(ids, past_key_values=None, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [token]
    for _ in range(new_tokens - 1):
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat([t.to("cpu") for t in tokens], dim=-1)[0].tolist()


def counters(model: Any, client: Any) -> tuple[int, int, int, float]:
    """(bytes sent, bytes received, calls, server device-thread seconds) so far; zeros
    locally."""
    if client is None:
        return 0, 0, 0, 0.0
    stats = model.stats()
    busy = client.server_stats()["device_busy_s"]
    return stats["bytes_sent"], stats["bytes_received"], stats["calls"], busy


def timed_run(
    model: Any, ids: torch.Tensor, new_tokens: int, device: torch.device, client: Any = None
) -> dict[str, Any]:
    """One counted decode. With `client` (a remote baseline) it also counts the wire bytes,
    the calls (round trips) and the server's device-thread time, read outside the timed
    span."""
    before = counters(model, client)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = decode(model, ids, new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    sent, received, calls, busy = (
        a - b for a, b in zip(counters(model, client), before, strict=True)
    )
    return {
        "total_ms": seconds * 1e3,
        "per_token_ms": seconds * 1e3 / new_tokens,
        "server_busy_ms": busy * 1e3,
        "tokens_generated": len(tokens),
        "bytes_sent": sent,
        "bytes_received": received,
        "calls": calls,
        "tokens": tokens,
    }


# -- numbers ------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q * (len(ordered) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    totals = [r["total_ms"] for r in runs]
    data = [(r["bytes_sent"] + r["bytes_received"]) / 1e6 for r in runs]
    return {
        "mean_total_ms": statistics.mean(totals),
        "p50_total_ms": percentile(totals, 0.50),
        "p95_total_ms": percentile(totals, 0.95),
        "mean_per_token_ms": statistics.mean(r["per_token_ms"] for r in runs),
        "mean_server_busy_ms": statistics.mean(r["server_busy_ms"] for r in runs),
        "p50_per_token_ms": percentile([r["per_token_ms"] for r in runs], 0.50),
        "data_mb": statistics.mean(data),
        "mean_bytes_sent": statistics.mean(r["bytes_sent"] for r in runs),
        "mean_bytes_received": statistics.mean(r["bytes_received"] for r in runs),
        "mean_calls": statistics.mean(r["calls"] for r in runs),
    }
