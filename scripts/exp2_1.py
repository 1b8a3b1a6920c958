#!/usr/bin/env python3
"""Experiment 2.1: LLM decode with a KV cache, four baselines, the seed's results table.

Every baseline runs the same client-driven greedy loop: one prefill of the
prompt, then one step per new token, each step feeding back the previous
step's cache and reading the next token from the last logits row:

    out = model(ids, past_key_values=cache)
    ids = out.logits[:, -1].argmax(-1, keepdim=True)

native_pytorch runs it on a local model; semantic_blind, partially_aware and
full_djinn run it on a RemoteModel with that policy, against a server this
script starts on 127.0.0.1 and stops when it ends. Runs are interleaved
(native, blind, partial, full, native, ...) so machine drift hits all four
alike; warm-up runs are not counted. Every baseline must produce exactly
the native tokens. Bytes are counted on the wire, headers included.

Run it through scripts/run_exp2_1.sh, which sets up the environment first.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import djinn  # noqa: E402
from djinn.cli import HelpFormatter  # noqa: E402
from djinn.net.link import Link  # noqa: E402
from djinn.server.process import ServerProcess  # noqa: E402

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        prog="scripts/run_exp2_1.sh",
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--model",
        default="gpt2-xl" if cuda else "gpt2",
        help=f"a GPT-2 preset ({', '.join(PRESETS)}) with seeded random weights, or a local "
        "model folder loaded with from_pretrained; gpt2-xl where CUDA is available, else gpt2",
    )
    p.add_argument("--runs", type=int, default=30, help="counted runs per baseline")
    p.add_argument("--warmup", type=int, default=2, help="uncounted runs per baseline first")
    p.add_argument("--prompt-tokens", type=int, default=72, help="prompt length, as in the seed")
    p.add_argument("--new-tokens", type=int, default=50, help="tokens to generate per run")
    p.add_argument(
        "--baselines", default=",".join(BASELINES), help="comma-separated subset of the four"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda[:N]")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype"
    )
    p.add_argument("--out", type=Path, help="output folder (default: results/exp2_1_<UTC time>)")
    p.add_argument("--store", type=Path, help="the server's weight store (default: its own)")
    p.add_argument(
        "--link-gbps", type=float, help="emulate a link of this bandwidth between client and server"
    )
    p.add_argument(
        "--link-latency-ms", type=float, default=0.0, help="one-way latency of that link"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random preset weights")
    args = p.parse_args(argv)
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = set(args.baselines) - set(BASELINES)
    if unknown or not args.baselines:
        p.error(f"unknown baselines {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    if "native_pytorch" not in args.baselines:
        args.baselines.insert(
            0, "native_pytorch"
        )  # the reference every other run is checked against
    if args.runs < 1 or args.warmup < 0 or args.prompt_tokens < 1 or args.new_tokens < 1:
        p.error("--runs, --prompt-tokens and --new-tokens must be >= 1, --warmup >= 0")
    if args.link_gbps is not None and args.link_gbps <= 0:
        p.error("--link-gbps must be positive")
    return args


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


def compare(results: dict[str, dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The seed's comparison metrics, plus the targets this project holds itself to."""
    native = results["native_pytorch"]
    out: dict[str, Any] = {}
    full = results.get("full_djinn")
    blind = results.get("semantic_blind")
    if full:
        paired = [
            f["per_token_ms"] / n["per_token_ms"]
            for f, n in zip(full["runs"], native["runs"], strict=True)
        ]
        out["full_vs_native_speedup"] = (
            native["aggregates"]["mean_total_ms"] / full["aggregates"]["mean_total_ms"]
        )
        out["full_over_native_per_token"] = (
            full["aggregates"]["mean_per_token_ms"] / native["aggregates"]["mean_per_token_ms"]
        )
        out["full_over_native_per_token_paired_median"] = statistics.median(paired)
        # the split of full's time: the server's device thread, and everything else
        new_tokens = full["runs"][0]["tokens_generated"]
        out["full_server_busy_per_token_ms"] = (
            full["aggregates"]["mean_server_busy_ms"] / new_tokens
        )
        out["full_rest_per_token_ms"] = (
            full["aggregates"]["mean_per_token_ms"] - out["full_server_busy_per_token_ms"]
        )
    if full and blind:
        out["full_vs_blind_speedup"] = (
            blind["aggregates"]["mean_total_ms"] / full["aggregates"]["mean_total_ms"]
        )
        full_mb, blind_mb = full["aggregates"]["data_mb"], blind["aggregates"]["data_mb"]
        out["data_savings_pct"] = 100 * (1 - full_mb / blind_mb) if blind_mb else 0.0
        out["blind_over_full_data"] = blind_mb / full_mb if full_mb else math.inf
    limit = 1.10 if device.type == "cuda" else 1.05
    targets: dict[str, Any] = {}
    if full:
        targets[f"full per-token <= {limit}x native"] = (
            out["full_over_native_per_token_paired_median"] <= limit
        )
        targets["full data <= 0.05 MB per run"] = full["aggregates"]["data_mb"] <= 0.05
    if full and blind:
        targets[">= 10,000x less data than semantic_blind"] = out["blind_over_full_data"] >= 10_000
    if blind and "partially_aware" in results:
        targets["partially_aware moves less than semantic_blind"] = (
            results["partially_aware"]["aggregates"]["data_mb"] < blind["aggregates"]["data_mb"]
        )
    targets["every baseline produced the native tokens"] = all(
        r["tokens_match_native"] for r in results.values()
    )
    out["targets"] = targets
    return out


# -- outputs ------------------------------------------------------------------------------


def table(results: dict[str, dict[str, Any]]) -> str:
    names = {
        "native_pytorch": "Native PyTorch",
        "semantic_blind": "Semantic-Blind",
        "partially_aware": "Partially-Aware",
        "full_djinn": "Full Djinn",
    }
    columns = [
        "Baseline",
        "Mean Latency (ms)",
        "P95 Latency (ms)",
        "Mean Per-Token (ms)",
        "Data Transfer (MB)",
        "Tokens match native",
    ]
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("-" * (len(c) + 2) for c in columns) + "|",
    ]
    for name, result in results.items():
        a = result["aggregates"]
        mb = a["data_mb"]
        shown = f"{mb:.2f}" if mb >= 0.1 or mb == 0 else f"{mb:.4f}"
        lines.append(
            f"| **{names[name]}** | {a['mean_total_ms']:.2f} | {a['p95_total_ms']:.2f} | "
            f"{a['mean_per_token_ms']:.2f} | {shown} | "
            f"{'yes' if result['tokens_match_native'] else 'NO'} |"
        )
    return "\n".join(lines)


def summary_md(
    meta: dict[str, Any], results: dict[str, dict[str, Any]], comparison: dict[str, Any]
) -> str:
    c = comparison
    lines = [
        "# Experiment 2.1: LLM Decode with KV Cache - Results Summary",
        "",
        f"**Model:** {meta['model_id']}  ",
        f"**Device:** {meta['device']} ({meta['dtype']})  ",
        f"**Prompt Length:** {meta['prompt_tokens']} tokens  ",
        f"**New Tokens:** {meta['new_tokens']} tokens  ",
        f"**Runs per Baseline:** {meta['runs']} (after {meta['warmup']} warm-up runs), "
        "interleaved  ",
        f"**Link:** {meta['link']}  ",
        f"**Date:** {meta['date']}  ",
        f"**Command:** `{meta['command']}`",
        "",
        "## Results",
        "",
        table(results),
        "",
        "Data Transfer is the mean per run of bytes sent plus received on the wire "
        "(headers included), in MB of 10^6 bytes.",
        "",
        "## Comparison Metrics",
        "",
    ]
    if "full_vs_native_speedup" in c:
        lines.append(
            f"- **Full Djinn vs Native PyTorch:** {c['full_vs_native_speedup']:.2f}x speedup "
            f"(per token {c['full_over_native_per_token']:.3f}x native by means, "
            f"{c['full_over_native_per_token_paired_median']:.3f}x by the median of paired runs)"
        )
        native_ms = results["native_pytorch"]["aggregates"]["mean_per_token_ms"]
        lines.append(
            f"- **Where Full Djinn's time went, per token:** "
            f"{c['full_server_busy_per_token_ms']:.2f} ms in the server's device thread "
            f"(native ran the same steps in {native_ms:.2f} ms), "
            f"{c['full_rest_per_token_ms']:.2f} ms elsewhere (client, wire, waiting)"
        )
    if "full_vs_blind_speedup" in c:
        lines.append(
            f"- **Full Djinn vs Semantic-Blind:** {c['full_vs_blind_speedup']:.2f}x speedup"
        )
        lines.append(
            f"- **Data Savings:** {c['data_savings_pct']:.4f}% "
            f"({c['blind_over_full_data']:,.0f}x less data than semantic-blind)"
        )
    lines += ["", "## Targets", ""]
    lines += [f"- [{'x' if ok else ' '}] {name}" for name, ok in c["targets"].items()]
    lines += [
        "",
        "## What the seed showed, and what changed",
        "",
        f"The seed table ({SEED_TABLE}) had every remote baseline moving 925 MB per run and "
        "running 6x slower than native, because the KV cache crossed the network at every step. "
        "Here semantic_blind and partially_aware still ship the cache both ways every step (that "
        "is what those baselines are), while full_djinn keeps it on the server.",
    ]
    if "full_djinn" in results:
        full = results["full_djinn"]["aggregates"]
        lines[-1] += (
            " Its decode steps (a forward and an argmax each) are queued on the client, "
            f"{full['mean_bytes_sent'] / meta['new_tokens']:.0f} bytes sent per new token, "
            f"and crossed in {full['mean_calls']:g} round trip(s) per run, which brought "
            "every new token back."
        )
    return "\n".join([*lines, ""])


def plot(path: Path, results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    colors = ["#4c72b0", "#c44e52", "#dd8452", "#55a868"][: len(names)]
    per_token = [results[n]["aggregates"]["mean_per_token_ms"] for n in names]
    p95 = [
        percentile([r["per_token_ms"] for r in results[n]["runs"]], 0.95) - per_token[i]
        for i, n in enumerate(names)
    ]
    data = [max(results[n]["aggregates"]["data_mb"], 1e-6) for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    bars = left.bar(names, per_token, yerr=[[0] * len(names), p95], color=colors, capsize=4)
    left.bar_label(bars, fmt="%.2f", padding=2)
    left.set_ylim(top=max(m + e for m, e in zip(per_token, p95, strict=True)) * 1.15)
    left.set_ylabel("ms per token (mean, bar to p95)")
    left.set_title("Per-token latency")
    bars = right.bar(names, data, color=colors)
    right.set_yscale("log")
    right.set_ylim(top=max(data) * 20)
    right.bar_label(
        bars, labels=[f"{results[n]['aggregates']['data_mb']:.3g}" for n in names], padding=2
    )
    right.set_ylabel("MB per run, both directions (log)")
    right.set_title("Data on the wire")
    for axis in (left, right):
        axis.tick_params(axis="x", labelrotation=15)
    fig.suptitle(
        f"Experiment 2.1: {meta['model_id']}, {meta['device']}, "
        f"{meta['prompt_tokens']}+{meta['new_tokens']} tokens, link: {meta['link']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the experiment -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu")
    if args.device not in ("auto", "cpu"):
        device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or ROOT / "results" / f"exp2_1_{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    link = Link(args.link_gbps, args.link_latency_ms / 1e3) if args.link_gbps else None
    command = " ".join(["scripts/run_exp2_1.sh", *(argv if argv is not None else sys.argv[1:])])
    log = print if sys.stderr.isatty() else lambda *a, **k: print(*a, **k, flush=True)

    log(f"building {args.model} on {device} ({args.dtype}) ...")
    model, tokenizer, model_id = build_model(args.model, device, dtype, args.seed)
    vocab = model.get_output_embeddings().out_features
    ids = prompt_ids(tokenizer, args.prompt_tokens, vocab).to(device)
    server_args = ["--device", str(device), "--dtype", args.dtype, "--log-level", "WARNING"]
    server_args += ["--store", str(args.store or out_dir / "store")]
    if link:
        server_args += [
            "--link-gbps",
            str(link.gbps),
            "--link-latency-ms",
            str(args.link_latency_ms),
        ]
    meta = {
        "experiment": "2.1",
        "model_id": model_id,
        "device": str(device)
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "dtype": args.dtype,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "batch_size": 1,
        "runs": args.runs,
        "warmup": args.warmup,
        "link": link.describe() if link else "loopback (no emulation)",
        "date": stamp,
        "command": command,
        "machine": f"{platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
        f"djinn {djinn.__version__}",
    }
    log(f"starting a djinn server on 127.0.0.1 (log: {out_dir / 'server.log'}) ...")
    with ServerProcess(*server_args, log=str(out_dir / "server.log")) as server:
        client = djinn.connect(server.address, link=link, timeout=600)
        runners: dict[str, Any] = {"native_pytorch": Local(model)}
        for name in args.baselines[1:]:
            log(f"registering the model for {name} ...")
            began = time.perf_counter()
            runners[name] = djinn.RemoteModel(model, client, policy=POLICIES[name])
            sent = runners[name].uploaded_bytes
            held = f"uploaded {sent / 1e6:.1f} MB" if sent else "the server held it already"
            log(f"  {held}, {time.perf_counter() - began:.1f} s")
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.baselines}
        total = (args.warmup + args.runs) * len(args.baselines)
        with tqdm(total=total, desc="runs", unit="run", file=sys.stderr) as bar:
            for run_id in range(args.warmup + args.runs):
                for name in args.baselines:
                    bar.set_postfix_str(name)
                    remote = client if name != "native_pytorch" else None
                    result = timed_run(runners[name], ids, args.new_tokens, device, remote)
                    if run_id >= args.warmup:
                        runs[name].append({"run_id": run_id - args.warmup, **result})
                    bar.update()
        for name in args.baselines[1:]:
            runners[name].close()
        client.close()

    native_runs = runs["native_pytorch"]
    results: dict[str, dict[str, Any]] = {}
    for name in args.baselines:
        match = all(
            r["tokens"] == n["tokens"] for r, n in zip(runs[name], native_runs, strict=True)
        )
        results[name] = {
            "baseline": name,
            **{
                k: meta[k]
                for k in (
                    "model_id",
                    "device",
                    "dtype",
                    "prompt_tokens",
                    "new_tokens",
                    "batch_size",
                    "link",
                )
            },
            "runs": runs[name],
            "aggregates": aggregate(runs[name]),
            "tokens_match_native": match,
        }
        folder = out_dir / name
        folder.mkdir(exist_ok=True)
        (folder / f"llm_decode_{name}_{stamp}.json").write_text(json.dumps(results[name], indent=1))
    comparison = compare(results, device)
    report = {
        **meta,
        "baselines": {
            name: {**r["aggregates"], "tokens_match_native": r["tokens_match_native"]}
            for name, r in results.items()
        },
        **{k: v for k, v in comparison.items() if k != "targets"},
        "targets": comparison["targets"],
    }
    (out_dir / f"comparison_report_{stamp}.json").write_text(json.dumps(report, indent=1))
    (out_dir / "summary.md").write_text(summary_md(meta, results, comparison))
    plot(out_dir / "latency.png", results, meta)

    print()
    print(f"Experiment 2.1 -- {model_id} on {meta['device']}, link: {meta['link']}")
    print(table(results))
    print()
    for key in (
        "full_over_native_per_token_paired_median",
        "full_server_busy_per_token_ms",
        "full_rest_per_token_ms",
        "full_vs_blind_speedup",
        "blind_over_full_data",
    ):
        if key in comparison:
            print(f"{key}: {comparison[key]:,.4g}")
    for name, ok in comparison["targets"].items():
        print(f"[{'PASS' if ok else 'FAIL'}] {name}")
    print(f"\nresults in {out_dir}")
    return 0 if comparison["targets"]["every baseline produced the native tokens"] else 1


if __name__ == "__main__":
    sys.exit(main())
