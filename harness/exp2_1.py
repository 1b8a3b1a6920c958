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
import json
import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch

from djinn.kvcache import cache_layers
from djinn.model import RemoteModel
from djinn.paths import cache_root
from djinn.server.compiled import prepare
from harness.stats import percentile

ROOT = Path(__file__).resolve().parents[1]

# Seeded random weights at GPT-2's own initializer range (0.02) decode one token over
# and over, which a broken KV cache would reproduce too. At 0.5 the 50 greedy tokens
# are varied (30-39 distinct values per preset), so matching them means something.
INIT_RANGE = 0.5
MIN_DISTINCT = 30  # distinct tokens of 50 the presets must produce
PRESETS = {  # (layers, width, heads) of the released GPT-2 checkpoints
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
# The seed's next step, LLaMA-7B, and a ~1B model of the same family for CPU machines:
# (layers, width, intermediate, heads, kv heads), vocabulary 32,000. Their seeded random
# weights are written once as safetensors shards, which the server serves by path
# (--model NAME=PATH), so no weights cross the wire.
LLAMA_PRESETS = {
    "llama-7b": (32, 4096, 11008, 32, 32),  # Llama-2-7B's shape; fp16, CUDA only
    "llama-1b": (22, 2048, 5632, 32, 4),  # TinyLlama-1.1B's shape
}
LLAMA_INIT_RANGE = 0.05
SHARD_BYTES = 2 << 30
BASELINES = ("native_pytorch", "semantic_blind", "partially_aware", "full_djinn")
COMPILED = "native_compiled"  # added by --compile: the local model compiled as the server is
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


def weights_cache() -> Path:
    """Where generated preset weights are kept: $DJINN_WEIGHTS, else the user's cache."""
    root = os.environ.get("DJINN_WEIGHTS")
    return Path(root) if root else cache_root() / "weights"


def llama_folder(
    name: str, dtype: torch.dtype, seed: int, log: Callable[[str], None] = print
) -> Path:
    """The preset's seeded random weights as a model folder of safetensors shards, made
    on first use (a shard at a time, so never more than one shard in memory)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    layers, width, inner, heads, kv_heads = LLAMA_PRESETS[name]
    dtype_name = str(dtype).removeprefix("torch.")
    folder = weights_cache() / f"{name}-seed{seed}-{dtype_name}"
    if (folder / "model.safetensors.index.json").is_file():
        return folder
    config = LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=width,
        intermediate_size=inner,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=32000,
        max_position_embeddings=4096,
        initializer_range=LLAMA_INIT_RANGE,
        dtype=dtype_name,
    )
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in LlamaForCausalLM(config).state_dict().items()}
    total = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    log(f"writing {name}'s seeded random weights ({total / 1e9:.1f} GB) to {folder} (once) ...")
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # an interrupted earlier attempt
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal shard, size
        file = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(partial / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        shard, size = {}, 0

    for weight, shape in shapes.items():
        if weight.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = torch.empty(shape).normal_(0, LLAMA_INIT_RANGE, generator=generator)
            tensor = tensor.to(dtype)
        shard[weight] = tensor
        size += tensor.nbytes
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    config.save_pretrained(partial)
    GenerationConfig.from_model_config(config).save_pretrained(partial)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index))
    partial.rename(folder)
    return folder


def build_model(
    name: str, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[Any, Any, str]:
    """(model, tokenizer or None, model id)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

    if name in PRESETS:
        layers, width, heads = PRESETS[name]
        config = GPT2Config(
            n_layer=layers, n_embd=width, n_head=heads, initializer_range=INIT_RANGE
        )
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


class LocalCompiled(Local):
    """The local model with the server's compile settings: the same warm-up decides, and
    decode steps it kept run through the same compiled step; prefill stays eager."""

    def __init__(self, model: Any, mode: str) -> None:
        super().__init__(model)
        vocab = model.get_output_embeddings().out_features
        self.decode, self.warmup = prepare(
            model, self.name, vocab, model.device, mode, "native_compiled"
        )

    def __call__(self, ids: torch.Tensor, past_key_values: Any, use_cache: bool) -> Any:
        cache = past_key_values
        if (
            self.decode is None
            or cache is None
            or not self.decode.takes(ids.shape[0], cache.get_seq_length())
        ):
            return super().__call__(ids, past_key_values, use_cache)
        return SimpleNamespace(logits=self.decode(ids, cache), past_key_values=cache)


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


def counters(model: Any, client: Any) -> tuple[float, ...]:
    """(bytes sent, bytes received, calls, server device-thread seconds, server CPU
    seconds) so far. The server's CPU time is read for every baseline, native too: a
    server that burns CPU while native runs is stealing from it."""
    stats = client.server_stats() if client is not None else {}
    cpu = stats.get("process_cpu_s", 0.0)
    if not isinstance(model, RemoteModel):
        return 0, 0, 0, 0.0, cpu
    mine = model.stats()
    return mine["bytes_sent"], mine["bytes_received"], mine["calls"], stats["device_busy_s"], cpu


def timed_run(
    model: Any, ids: torch.Tensor, new_tokens: int, device: torch.device, client: Any = None
) -> dict[str, Any]:
    """One counted decode: wall time, and CPU time on both ends (a run whose wall time
    outgrows its CPU time waited for cores someone else held). With `client`, also the
    wire bytes, the calls (round trips) and the server's device-thread time of a remote
    `model`, all read outside the timed span."""
    before = counters(model, client)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cpu = time.process_time()
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = decode(model, ids, new_tokens)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu
    sent, received, calls, busy, server_cpu = (
        a - b for a, b in zip(counters(model, client), before, strict=True)
    )
    return {
        "total_ms": seconds * 1e3,
        "per_token_ms": seconds * 1e3 / new_tokens,
        "client_cpu_ms": cpu * 1e3,
        "server_cpu_ms": server_cpu * 1e3,
        "server_busy_ms": busy * 1e3,
        "tokens_generated": len(tokens),
        "bytes_sent": int(sent),
        "bytes_received": int(received),
        "calls": int(calls),
        "tokens": tokens,
    }


# -- numbers ------------------------------------------------------------------------------


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
        "mean_client_cpu_ms": statistics.mean(r["client_cpu_ms"] for r in runs),
        "mean_server_cpu_ms": statistics.mean(r["server_cpu_ms"] for r in runs),
    }


# -- the verification pass ----------------------------------------------------------------

# How far a remote path's logits and cache may drift from native's, as a fraction of the
# largest native value: kernels may sum in another order (other thread counts, batching).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


class Trace(NamedTuple):
    """What one decode computed: every step's last logits row, and the KV cache after
    the last step as whoever holds it has it."""

    tokens: list[int]
    logits: torch.Tensor  # [new_tokens, vocab], fp32 on the CPU
    cache: list[tuple[torch.Tensor, torch.Tensor]]


def trace(model: Callable[..., Any], ids: torch.Tensor, new_tokens: int) -> Trace:
    """The decode loop, untimed, reading every step's logits and, at the end, the cache:
    for full_djinn the one the server holds, fetched for the check."""
    rows = []
    token: Any = ids
    cache: Any = None
    with torch.inference_mode():
        for _ in range(new_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            row = out.logits[:, -1]
            rows.append(row.cpu().float())
            token = row.argmax(-1, keepdim=True)
            cache = out.past_key_values
    held = cache.fetch() if hasattr(cache, "fetch") else cache
    layers = [(k.cpu().float(), v.cpu().float()) for k, v in cache_layers(held)]
    logits = torch.cat(rows)
    return Trace(logits.argmax(-1).tolist(), logits, layers)


def check(
    native: Trace, remote: Trace, dtype: torch.dtype, compiled: bool = False
) -> dict[str, Any]:
    """A remote trace against native's: every step's logits and the final cache's length
    and values, within TOLERANCE of the largest native value.

    A `compiled` trace against an eager one is held to its tokens and cache length only,
    its differences reported: fused kernels sum in another order, and the seeded
    presets amplify any such difference along the sequence (on gpt2, compiled fp32
    logits differ from eager by 1e-5 of the largest at the first step and 3% by the
    50th; eager on two threads against one differs by more and changes tokens)."""
    logit_scale = native.logits.abs().max().item()
    logit_diff = (remote.logits - native.logits).abs().max().item()
    length = native.cache[0][0].shape[-2]
    got_length = remote.cache[0][0].shape[-2] if remote.cache else 0
    mine = [t for layer in native.cache for t in layer]
    theirs = [t for layer in remote.cache for t in layer]
    cache_scale = max(t.abs().max().item() for t in mine)
    cache_diff = math.inf
    if [t.shape for t in mine] == [t.shape for t in theirs]:
        cache_diff = max((a - b).abs().max().item() for a, b in zip(mine, theirs, strict=True))
    tolerance = None if compiled else TOLERANCE[dtype]
    close = tolerance is None or (
        logit_diff <= tolerance * logit_scale and cache_diff <= tolerance * cache_scale
    )
    return {
        "max_logit_diff": logit_diff,
        "logit_scale": logit_scale,
        "cache_tokens": got_length,
        "native_cache_tokens": length,
        "max_cache_diff": cache_diff,
        "cache_scale": cache_scale,
        "tolerance": tolerance,  # None: held to its tokens and cache length only
        "ok": remote.tokens == native.tokens and got_length == length and close,
    }


def wait_idle(client: Any, timeout: float = 120.0, cpu_share: float = 0.05) -> dict[str, Any]:
    """Return once the server has nothing queued, running, loading or being stored, and
    used under `cpu_share` of a core for half a second: timed runs must not share the
    machine with the server's own background work. Raises TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    before, since = client.server_stats(), time.perf_counter()
    while True:
        time.sleep(0.5)
        now: dict[str, Any] = client.server_stats()
        at = time.perf_counter()
        busy = now["queued_calls"] or now["device_held"] or now["store_loading"]
        share = (now["process_cpu_s"] - before["process_cpu_s"]) / (at - since)
        if not busy and share < cpu_share:
            return now
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the server did not go idle in {timeout:.0f} s (queued {now['queued_calls']}, "
                f"loading {now['store_loading']}, CPU {share:.0%} of a core)"
            )
        before, since = now, at
