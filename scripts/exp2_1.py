#!/usr/bin/env python3
"""Experiment 2.1: LLM decode with a KV cache, four baselines, the seed's results table.

Every baseline runs the same client-driven greedy decode loop (harness/exp2_1.py).
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
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import djinn  # noqa: E402
from djinn.cli import HelpFormatter  # noqa: E402
from djinn.net.link import Link  # noqa: E402
from harness.exp2_1 import (  # noqa: E402
    BASELINES,
    POLICIES,
    PRESETS,
    SEED_TABLE,
    Local,
    aggregate,
    build_model,
    percentile,
    prompt_ids,
    timed_run,
)
from harness.server import ServerProcess  # noqa: E402


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


def plot(path: Path, results: dict[str, dict[str, Any]], meta: dict[str, Any]) -> bool:
    """The latency and data chart, where matplotlib (the `plot` extra) is installed."""
    try:
        import matplotlib
    except ImportError:
        return False

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
    return True


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
    if not plot(out_dir / "latency.png", results, meta):
        print("no chart: matplotlib is not installed (pip install 'djinn[plot]')")

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
