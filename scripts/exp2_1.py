#!/usr/bin/env python3
"""Experiment 2.1: LLM decode with a KV cache, four baselines, the seed's results table.

Every baseline runs the same client-driven greedy decode loop (harness/exp2_1.py).
native_pytorch runs it on a local model; semantic_blind, partially_aware and
full_djinn run it on a RemoteModel with that policy, against a server this
script starts on 127.0.0.1 and stops when it ends. Runs are interleaved
(native, full, blind, partial, then the reverse, ...) so machine drift hits all
four alike; warm-up runs are not counted. Every baseline must produce exactly
the native tokens. Bytes are counted on the wire, headers included.

Run it through scripts/run_exp2_1.sh, which sets up the environment first.
"""

from __future__ import annotations

import argparse
import dataclasses
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
# Before torch loads OpenMP: an idle pool must sleep, not spin on the cores the other
# process (client or server) is timed on. The server inherits it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import djinn  # noqa: E402
from djinn.cli import HelpFormatter  # noqa: E402
from djinn.net.link import Link  # noqa: E402
from djinn.server.config import COMPILE_MODES  # noqa: E402
from harness.exp2_1 import (  # noqa: E402
    BASELINES,
    COMPILED,
    LLAMA_PRESETS,
    MIN_DISTINCT,
    POLICIES,
    PRESETS,
    SEED_TABLE,
    Local,
    LocalCompiled,
    aggregate,
    build_model,
    check,
    llama_folder,
    prompt_ids,
    timed_run,
    trace,
    wait_idle,
)
from harness.server import ServerProcess  # noqa: E402
from harness.stats import OUTLIER_FACTOR, Paired, outliers, percentile  # noqa: E402


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
        help=f"a GPT-2 preset ({', '.join(PRESETS)}) or a Llama preset "
        f"({', '.join(LLAMA_PRESETS)}; llama-7b needs CUDA) with seeded random weights, or a "
        "local model folder loaded with from_pretrained; gpt2-xl where CUDA is available, "
        "else gpt2. Llama presets are written once to $DJINN_WEIGHTS (default "
        "~/.cache/djinn/weights) and served by path (--model NAME=PATH on the server)",
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
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model dtype; auto is float16 for llama-7b, float32 otherwise",
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
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="torch threads for the native baseline and for the server alike; the default, "
        "half the CPUs, keeps the two processes from oversubscribing one machine",
    )
    p.add_argument(
        "--compile",
        default="off",
        choices=COMPILE_MODES,
        help="start the server with --compile MODE and add the baseline native_compiled: the "
        "local model under the same compile settings (auto compiles on CUDA only)",
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the untimed pass that compares every step's logits and the final KV "
        "cache of each remote baseline with native's",
    )
    args = p.parse_args(argv)
    if args.dtype == "auto":
        args.dtype = "float16" if args.model == "llama-7b" else "float32"
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    unknown = set(args.baselines) - set(BASELINES)
    if unknown or not args.baselines:
        p.error(f"unknown baselines {sorted(unknown)}; choose from {', '.join(BASELINES)}")
    if "native_pytorch" not in args.baselines:
        args.baselines.insert(
            0, "native_pytorch"
        )  # the reference every other run is checked against
    if min(args.runs, args.prompt_tokens, args.new_tokens, args.threads) < 1 or args.warmup < 0:
        p.error("--runs, --prompt-tokens, --new-tokens and --threads must be >= 1, --warmup >= 0")
    if args.link_gbps is not None and args.link_gbps <= 0:
        p.error("--link-gbps must be positive")
    return args


def compare(results: dict[str, dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The seed's comparison metrics as paired medians with their spread, the runs
    flagged as outliers, and the targets this project holds itself to: met, missed,
    or (None) too spread out to tell."""
    native = results["native_pytorch"]
    per_token = {name: [r["per_token_ms"] for r in r_["runs"]] for name, r_ in results.items()}
    out: dict[str, Any] = {}
    full = results.get("full_djinn")
    blind = results.get("semantic_blind")
    if full:
        paired = Paired.of(per_token["full_djinn"], per_token["native_pytorch"])
        out["full_over_native_per_token"] = dataclasses.asdict(paired)
        # the split of full's time: the server's device thread, and everything else
        new_tokens = full["runs"][0]["tokens_generated"]
        out["full_server_busy_per_token_ms"] = (
            full["aggregates"]["mean_server_busy_ms"] / new_tokens
        )
        out["full_rest_per_token_ms"] = (
            full["aggregates"]["mean_per_token_ms"] - out["full_server_busy_per_token_ms"]
        )
    if full and COMPILED in results:
        out["full_over_native_compiled_per_token"] = dataclasses.asdict(
            Paired.of(per_token["full_djinn"], per_token[COMPILED])
        )
    if full and blind:
        out["full_vs_blind_speedup"] = dataclasses.asdict(
            Paired.of(per_token["semantic_blind"], per_token["full_djinn"])
        )
        full_mb, blind_mb = full["aggregates"]["data_mb"], blind["aggregates"]["data_mb"]
        out["data_savings_pct"] = 100 * (1 - full_mb / blind_mb) if blind_mb else 0.0
        out["blind_over_full_data"] = blind_mb / full_mb if full_mb else math.inf
    out["outliers"] = {
        name: [
            {"run_id": i, "total_ms": result["runs"][i]["total_ms"], "x_median": x}
            for i, x in flagged(per_token[name])
        ]
        for name, result in results.items()
    }
    limit = 1.10 if device.type == "cuda" else 1.05
    targets: dict[str, bool | None] = {}
    if full:
        targets[f"full per-token <= {limit}x native"] = paired.below(limit)
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
    distinct = len(set(native["runs"][0]["tokens"]))
    wanted = min(MIN_DISTINCT, math.ceil(0.6 * len(native["runs"][0]["tokens"])))
    targets[f"native tokens have >= {wanted} distinct values (found {distinct})"] = (
        distinct >= wanted
    )
    checked = {n: r["verification"] for n, r in results.items() if "verification" in r}
    if checked:
        targets["every step's logits and the final KV cache match native"] = all(
            v["ok"] for v in checked.values()
        )
    out["distinct_native_tokens"] = distinct
    out["targets"] = targets
    return out


def flagged(values: list[float]) -> list[tuple[int, float]]:
    """(index, times the median) of the runs more than OUTLIER_FACTOR times the median."""
    middle = statistics.median(values)
    return [(i, values[i] / middle) for i in outliers(values)]


def _bound(tolerance: float | None) -> str:
    if tolerance is None:  # compiled against eager (harness.exp2_1.check says why)
        return "tokens and cache length; differences reported"
    return f"tolerance {tolerance:g}"


def verdict(ok: bool | None) -> str:
    return {True: "PASS", False: "FAIL", None: "CANNOT CONCLUDE"}[ok]


def describe(paired: dict[str, Any]) -> str:
    return Paired(**paired).describe()


# -- outputs ------------------------------------------------------------------------------


def table(results: dict[str, dict[str, Any]]) -> str:
    names = {
        "native_pytorch": "Native PyTorch",
        "semantic_blind": "Semantic-Blind",
        "partially_aware": "Partially-Aware",
        "full_djinn": "Full Djinn",
        COMPILED: "Native Compiled",
    }
    columns = [
        "Baseline",
        "Mean Latency (ms)",
        "P95 Latency (ms)",
        "Mean Per-Token (ms)",
        "Data Transfer (MB)",
        "CPU client/server (ms)",
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
            f"{a['mean_client_cpu_ms']:.0f}/{a['mean_server_cpu_ms']:.0f} | "
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
        f"**Threads:** {meta['threads']} for native and for the server, "
        f"OMP_WAIT_POLICY={meta['omp_wait_policy']}  ",
        f"**Machine:** {meta['machine']}; load average {meta['load_before']} before, "
        f"{meta['load_after']} after  ",
        f"**Date:** {meta['date']}  ",
        f"**Command:** `{meta['command']}`",
        "",
        "## Results",
        "",
        table(results),
        "",
        "Data Transfer is the mean per run of bytes sent plus received on the wire "
        "(headers included), in MB of 10^6 bytes. CPU is the mean CPU time per run of this "
        "process and of the server process: a run whose wall time far outgrows them waited "
        "for cores.",
        "",
        "## Comparison Metrics",
        "",
    ]
    if "full_over_native_per_token" in c:
        lines.append(
            "- **Full Djinn per token, over Native PyTorch:** "
            f"{describe(c['full_over_native_per_token'])}. The headline is the median of "
            "the per-run ratios of runs made side by side; the interval is a bootstrap of it."
        )
        native_ms = results["native_pytorch"]["aggregates"]["mean_per_token_ms"]
        lines.append(
            f"- **Where Full Djinn's time went, per token:** "
            f"{c['full_server_busy_per_token_ms']:.2f} ms in the server's device thread "
            f"(native ran the same steps in {native_ms:.2f} ms), "
            f"{c['full_rest_per_token_ms']:.2f} ms elsewhere (client, wire, waiting)"
        )
    if "full_over_native_compiled_per_token" in c:
        lines.append(
            "- **Full Djinn per token, over Native Compiled** (the local model under the "
            f"server's --compile {meta['compile']}): "
            f"{describe(c['full_over_native_compiled_per_token'])}"
        )
    warmups = [(f"server, model {fp[:12]}", w) for fp, w in meta.get("server_warmups", {}).items()]
    if "native_warmup" in meta:
        warmups.append(("native_compiled", meta["native_warmup"]))
    for side, w in warmups:
        lines.append(
            f"- **Compile warm-up ({side}):** {'kept' if w['enabled'] else 'not kept'} "
            f"({w['why']}); compiled in {w['compile_s']:.1f} s; {w['tokens_equal']} "
            f"greedy tokens equal eager, max logit diff {w['max_logit_diff']:.3g}; "
            f"{w['compiled_ms']:.2f} ms/step compiled against {w['eager_ms']:.2f} eager"
        )
    if "full_vs_blind_speedup" in c:
        faster = Paired(**c["full_vs_blind_speedup"])
        claim = (
            f"{describe(c['full_vs_blind_speedup'])} faster"
            if faster.low > 1
            else f"no supported difference ({describe(c['full_vs_blind_speedup'])})"
        )
        lines.append(f"- **Full Djinn vs Semantic-Blind:** {claim}")
        lines.append(
            f"- **Data Savings:** {c['data_savings_pct']:.4f}% "
            f"({c['blind_over_full_data']:,.0f}x less data than semantic-blind)"
        )
    lines.append(
        f"- **Distinct native tokens:** {c['distinct_native_tokens']} of {meta['new_tokens']}"
    )
    flagged_runs = [(n, o) for n, runs in c["outliers"].items() for o in runs]
    lines.append(
        f"- **Outliers** (runs over {OUTLIER_FACTOR:g}x their baseline's median, kept in "
        f"every statistic): {len(flagged_runs)}"
        + "".join(
            f"\n  - {n} run {o['run_id']}: {o['total_ms']:,.0f} ms ({o['x_median']:.1f}x)"
            for n, o in flagged_runs
        )
    )
    checked = {n: r["verification"] for n, r in results.items() if "verification" in r}
    if checked:
        lines += ["", "## Verification (one untimed pass per remote baseline)", ""]
        lines.append(
            "Every step's last logits row and the KV cache after the last step (fetched from "
            "the server where it stays there), against native's (against native_compiled's "
            "where both the server and native_compiled kept the compiled step), within the "
            "tolerance shown, of the largest native value."
        )
        lines.append("")
        for name, v in checked.items():
            lines.append(
                f"- {name}: {'ok' if v['ok'] else 'MISMATCH'} ({_bound(v['tolerance'])}); "
                f"max logit diff "
                f"{v['max_logit_diff']:.3g} (largest logit {v['logit_scale']:.3g}); cache "
                f"{v['cache_tokens']} of {v['native_cache_tokens']} positions, max diff "
                f"{v['max_cache_diff']:.3g} (largest value {v['cache_scale']:.3g})"
            )
    lines += ["", "## Targets", ""]
    lines += [f"- [{verdict(ok)}] {name}" for name, ok in c["targets"].items()]
    if None in c["targets"].values():
        lines += [
            "",
            "CANNOT CONCLUDE: the 95% interval of the paired median straddles the target. "
            "The runs were too spread out (look at the outliers and the CPU columns); rerun "
            "with more --runs, on a quieter machine.",
        ]
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
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        args.baselines.insert(1, COMPILED)  # auto compiles nothing on a CPU
    torch.set_num_threads(args.threads)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir = args.out or ROOT / "results" / f"exp2_1_{stamp}"
    out_dir.mkdir(parents=True, exist_ok=True)
    link = Link(args.link_gbps, args.link_latency_ms / 1e3) if args.link_gbps else None
    command = " ".join(["scripts/run_exp2_1.sh", *(argv if argv is not None else sys.argv[1:])])
    log = print if sys.stderr.isatty() else lambda *a, **k: print(*a, **k, flush=True)

    source, served = args.model, None  # served: the name the server holds it by
    if args.model in LLAMA_PRESETS:
        if args.model == "llama-7b" and device.type != "cuda":
            print(
                "llama-7b needs CUDA (13.5 GB of fp16 weights per copy); on this machine "
                "run --model llama-1b, the same architecture at 1.1 B parameters"
            )
            return 2
        source, served = str(llama_folder(args.model, dtype, args.seed, log)), args.model
    log(f"building {args.model} on {device} ({args.dtype}) ...")
    model, tokenizer, model_id = build_model(source, device, dtype, args.seed)
    if served:
        model_id = f"{served} (Llama architecture, seeded random weights, seed {args.seed})"
    vocab = model.get_output_embeddings().out_features
    ids = prompt_ids(tokenizer, args.prompt_tokens, vocab).to(device)
    server_args = ["--device", str(device), "--dtype", args.dtype, "--log-level", "WARNING"]
    server_args += ["--threads", str(args.threads), "--compile", args.compile]
    if served:
        server_args += ["--model", f"{served}={source}"]
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
        "threads": args.threads,
        "compile": args.compile,
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "load_before": load_average(),
    }
    log(f"starting a djinn server on 127.0.0.1 (log: {out_dir / 'server.log'}) ...")
    with ServerProcess(*server_args, log=str(out_dir / "server.log")) as server:
        client = djinn.connect(server.address, link=link, timeout=600)
        runners: dict[str, Any] = {"native_pytorch": Local(model)}
        if COMPILED in args.baselines:
            log(f"compiling the local model's decode step for {COMPILED} ...")
            runners[COMPILED] = LocalCompiled(model, args.compile)
            meta["native_warmup"] = runners[COMPILED].warmup.as_dict()
        remote = [name for name in args.baselines if name in POLICIES]
        for name in remote:
            log(f"registering the model for {name} ...")
            began = time.perf_counter()
            if served:  # the server reads the weights from its own disk
                runners[name] = djinn.RemoteModel.from_pretrained(
                    served, client, policy=POLICIES[name]
                )
            else:
                runners[name] = djinn.RemoteModel(model, client, policy=POLICIES[name])
            sent = runners[name].uploaded_bytes
            held = f"uploaded {sent / 1e6:.1f} MB" if sent else "the server held it already"
            log(f"  {held}, {time.perf_counter() - began:.1f} s")
        log("waiting for the server to be idle ...")
        meta["server_warmups"] = wait_idle(client).get("compiled", {})
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.baselines}
        total = (args.warmup + args.runs) * len(args.baselines)
        with tqdm(total=total, desc="runs", unit="run", file=sys.stderr) as bar:
            for run_id in range(args.warmup + args.runs):
                for name in round_order(args.baselines, run_id):
                    bar.set_postfix_str(name)
                    result = timed_run(runners[name], ids, args.new_tokens, device, client)
                    if run_id >= args.warmup:
                        runs[name].append({"run_id": run_id - args.warmup, **result})
                    bar.update()
        meta["load_after"] = load_average()
        checks = {}
        if not args.no_verify:
            log("verifying every step's logits and the final KV cache (untimed) ...")
            reference = trace(runners["native_pytorch"], ids, args.new_tokens)
            # remote baselines that ran the compiled step: held to native_compiled's
            # trace where it kept the step too, else to eager's tokens only
            compiled = any(w["enabled"] for w in meta["server_warmups"].values())
            if COMPILED in runners:
                ours = trace(runners[COMPILED], ids, args.new_tokens)
                checks[COMPILED] = check(reference, ours, dtype, compiled=True)
                if compiled and runners[COMPILED].decode is not None:
                    reference, compiled = ours, False
            for name in remote:
                theirs = trace(runners[name], ids, args.new_tokens)
                checks[name] = check(reference, theirs, dtype, compiled=compiled)
        for name in remote:
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
            **({"verification": checks[name]} if name in checks else {}),
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
    keys = ("full_over_native_per_token", "full_over_native_compiled_per_token")
    for key in (*keys, "full_vs_blind_speedup"):
        if key in comparison:
            print(f"{key}: {describe(comparison[key])}")
    for key in ("full_server_busy_per_token_ms", "full_rest_per_token_ms", "blind_over_full_data"):
        if key in comparison:
            print(f"{key}: {comparison[key]:,.4g}")
    for name, v in checks.items():
        print(
            f"verified {name}: {'ok' if v['ok'] else 'MISMATCH'}, max logit diff "
            f"{v['max_logit_diff']:.3g}, cache {v['cache_tokens']}/{v['native_cache_tokens']} "
            f"positions, max diff {v['max_cache_diff']:.3g}"
        )
    flagged_runs = sum(len(o) for o in comparison["outliers"].values())
    print(f"outliers (> {OUTLIER_FACTOR:g}x their baseline's median): {flagged_runs}")
    for name, ok in comparison["targets"].items():
        print(f"[{verdict(ok)}] {name}")
    print(f"\nresults in {out_dir}")
    correct = comparison["targets"]["every baseline produced the native tokens"] and all(
        v["ok"] for v in checks.values()
    )
    return 0 if correct else 1


def round_order(baselines: list[str], run_id: int) -> list[str]:
    """The baselines of one round: full_djinn right after native (the headline ratio
    pairs runs seconds apart, not a round apart), and every other round reversed, so
    drift within a round weighs on both sides of each pair alike (ABBA)."""
    order = [b for b in baselines if b in ("native_pytorch", "full_djinn")]
    order += [b for b in baselines if b not in order]
    return order if run_id % 2 == 0 else order[::-1]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    sys.exit(main())
