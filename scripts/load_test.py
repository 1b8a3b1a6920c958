#!/usr/bin/env python3
"""Load test: N concurrent clients decoding on one server, every token checked.

Each client is its own process with its own connection and session. It
drives a greedy decode loop of `--tokens` steps on a tiny GPT-2 (full
policy), reading every token as a streaming client does, from its own
prompt; its tokens must equal local unbatched greedy decoding of that
prompt. The server batches the decode steps that wait at the same time.

Reported per level: the server's throughput, p50/p99 latency of one token
as a client sees it, the mean rows per batched forward, and whether every
token matched. In the same run, for comparison:

- 1 client on a server started with --batching off (the serial path);
- the local ceiling: `model.generate` over one batch of 32 prompts in this
  process, the most that batching on this machine could reach.

    python scripts/load_test.py [--clients 1,4,16,32,64] [--tokens 32]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import djinn  # noqa: E402
from harness.server import ServerProcess  # noqa: E402
from harness.stats import percentile  # noqa: E402

VOCAB = 2048
PROMPT = 16


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_head=4, n_embd=128, vocab_size=VOCAB, n_positions=512, eos_token_id=None
    )
    return GPT2LMHeadModel(config).eval()


def greedy(model: Any, ids: torch.Tensor, tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    made: list[int] = out[0, ids.shape[1] :].tolist()
    return made


def client(
    address: str, ids: torch.Tensor, tokens: int, ready: Any, start: Any, results: Any
) -> None:
    torch.set_num_threads(1)
    try:
        with djinn.RemoteModel(tiny_model(), address) as rm:
            ready.put(os.getpid())
            start.wait()
            out = rm(ids)
            got, latencies = [], []
            for _ in range(tokens):
                began = time.perf_counter()
                step = out.logits[:, -1].argmax(-1, keepdim=True)
                got.append(int(step.item()))  # read each token, as a streaming client does
                out = rm(step, past_key_values=out.past_key_values)
                latencies.append(time.perf_counter() - began)
        results.put((got, latencies))
    except BaseException as exc:
        results.put(exc)


def level(
    address: str,
    n: int,
    prompts: list[torch.Tensor],
    expected: list[list[int]],
    tokens: int,
    timeout: float,
) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    ready, start, results = context.Queue(), context.Event(), context.Queue()
    procs = [
        context.Process(target=client, args=(address, prompts[i], tokens, ready, start, results))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    for _ in range(n):  # every client has registered and opened its session
        ready.get(timeout=timeout)
    with djinn.connect(address) as observer:
        before = observer.server_stats()
        began = time.perf_counter()
        start.set()
        outputs = [results.get(timeout=timeout) for _ in range(n)]
        wall = time.perf_counter() - began
        after = observer.server_stats()
    for p in procs:
        p.join(timeout=10)
    failed = [o for o in outputs if isinstance(o, BaseException)]
    if failed:
        raise SystemExit(f"{len(failed)} of {n} clients failed: {failed[0]!r}")
    tokens_ok = sorted(map(tuple, (o[0] for o in outputs))) == sorted(map(tuple, expected[:n]))
    latencies = [x for o in outputs for x in o[1]]
    forwards = sum(
        after["batch_sizes"].get(k, 0) - before["batch_sizes"].get(k, 0)
        for k in after["batch_sizes"]
    )
    rows = after["decode_tokens"] - before["decode_tokens"]
    return {
        "clients": n,
        "tokens_per_s": n * tokens / wall,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "batch_mean": rows / forwards if forwards else 0.0,
        "wait_p99_ms": after["queue_wait_p99_ms"],
        "match": tokens_ok,
    }


def ceiling(model: Any, prompts: list[torch.Tensor], tokens: int, rounds: int = 3) -> float:
    """Tokens/s of the local model generating for 32 prompts as one batch."""
    batch = torch.cat(prompts[:32])
    best = 0.0
    for _ in range(rounds):
        began = time.perf_counter()
        with torch.no_grad():
            model.generate(batch, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
        best = max(best, batch.shape[0] * tokens / (time.perf_counter() - began))
    return best


def run_server(
    extra: list[str],
    levels: list[int],
    model: Any,
    prompts: list[torch.Tensor],
    expected: list[list[int]],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    store = tempfile.mkdtemp(prefix="djinn-load-")
    server_args = ["--device", "cpu", "--log-level", "WARNING", "--store", store, *extra]
    rows = []
    with ServerProcess(*server_args) as server:
        djinn.RemoteModel(model, server.address).close()  # upload once, before timing
        for n in levels:
            rows.append(level(server.address, n, prompts, expected, args.tokens, args.timeout))
            print(f"  {n} clients done ({' '.join(extra) or 'batching on'})", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16,32,64")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per level at most")
    parser.add_argument("--batch-wait-us", type=int, help="passed to the server (default: its own)")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the serial and local runs"
    )
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    model = tiny_model()
    generator = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(1, VOCAB, (1, PROMPT), generator=generator) for _ in range(max([*levels, 32]))
    ]
    torch.set_num_threads(1)
    expected = [greedy(model, p, args.tokens) for p in prompts]
    extra = ["--batch-wait-us", str(args.batch_wait_us)] if args.batch_wait_us is not None else []
    rows = run_server(extra, levels, model, prompts, expected, args)
    serial = (
        []
        if args.no_baselines
        else run_server(["--batching", "off"], [1], model, prompts, expected, args)
    )
    torch.set_num_threads(os.cpu_count() or 1)
    local = 0.0 if args.no_baselines else ceiling(model, prompts, args.tokens)
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}")
    print(
        f"tiny GPT-2 (2 layers, 128 wide), {PROMPT}-token prompts, {args.tokens} tokens "
        "per client, full policy"
    )
    print(
        f"{'clients':>8} {'tokens/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'batch':>6} "
        f"{'wait p99':>9}  tokens match local"
    )
    for r in rows:
        match = "yes" if r["match"] else "NO"
        print(
            f"{r['clients']:>8} {r['tokens_per_s']:>10.1f} {r['p50_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f} {r['batch_mean']:>6.2f} {r['wait_p99_ms']:>8.2f}  {match}"
        )
    by_n = {r["clients"]: r for r in rows}
    if serial:
        one = serial[0]
        rate, p99 = one["tokens_per_s"], one["p99_ms"]
        print(f"1 client, --batching off: {rate:.1f} tokens/s, p99 {p99:.2f} ms")
        if 1 in by_n:
            ratio = by_n[1]["tokens_per_s"] / rate
            print(f"1-client batching on / off: {ratio:.3f}x (target >= 0.95x)")
    if local:
        print(f"local ceiling, model.generate over 32 prompts in one batch: {local:.1f} tokens/s")
    if 1 in by_n and 32 in by_n:
        scale = by_n[32]["tokens_per_s"] / by_n[1]["tokens_per_s"]
        print(f"32 clients / 1 client: {scale:.2f}x (target >= 6x)")
        tail = by_n[32]["p99_ms"] / by_n[1]["p99_ms"]
        print(f"32-client p99 / 1-client p99: {tail:.2f}x (target <= 4x)")
        if local:
            share = by_n[32]["tokens_per_s"] / local
            print(f"32 clients / local ceiling: {share:.2f}x (target >= 0.6x)")
    if not all(r["match"] for r in rows + serial):
        sys.exit(1)


if __name__ == "__main__":
    main()
