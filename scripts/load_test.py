#!/usr/bin/env python3
"""Load test: N concurrent clients generating on one server, every token checked.

Each client is its own process with its own connection and session. It
drives a greedy decode loop of `--tokens` steps on a tiny GPT-2 (full
policy: one round trip per token) from its own prompt, and its tokens must
equal local greedy decoding of that prompt. Reported per N: throughput of
the whole server and p50/p99 latency of one token as a client sees it.
Bounded: N x tokens steps per level, and a timeout per level.

    python scripts/load_test.py [--clients 1,4,16,32] [--tokens 32]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import djinn  # noqa: E402
from harness.server import ServerProcess  # noqa: E402

VOCAB = 2048


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=128, vocab_size=VOCAB, n_positions=512)
    return GPT2LMHeadModel(config).eval()


def greedy(model: Any, ids: torch.Tensor, tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def client(address: str, ids: torch.Tensor, tokens: int, start: Any, results: Any) -> None:
    torch.set_num_threads(1)
    model = tiny_model()
    with djinn.RemoteModel(model, address) as rm:
        start.wait()
        step, cache, got, latencies = ids, None, [], []
        for _ in range(tokens):
            t = time.perf_counter()
            out = rm(step, past_key_values=cache)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(step))  # read each token, as a streaming client does
            latencies.append(time.perf_counter() - t)
            cache = out.past_key_values
    results.put((got, latencies))


def level(
    address: str,
    n: int,
    prompts: list[torch.Tensor],
    expected: list[list[int]],
    tokens: int,
    timeout: float,
) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    procs = [
        context.Process(target=client, args=(address, prompts[i], tokens, start, results))
        for i in range(n)
    ]
    for p in procs:
        p.start()
    time.sleep(1.0)  # let every client register and open its session
    began = time.perf_counter()
    start.set()
    outputs = [results.get(timeout=timeout) for _ in range(n)]
    wall = time.perf_counter() - began
    for p in procs:
        p.join(timeout=10)
    tokens_ok = sorted(map(tuple, (o[0] for o in outputs))) == sorted(map(tuple, expected[:n]))
    latencies = sorted(x for o in outputs for x in o[1])
    return {
        "clients": n,
        "tokens_per_s": n * tokens / wall,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e3,
        "match": tokens_ok,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16,32")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per level at most")
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    torch.set_num_threads(1)
    model = tiny_model()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, VOCAB, (1, 16), generator=generator) for _ in range(max(levels))]
    expected = [greedy(model, p, args.tokens) for p in prompts]
    rows = []
    with ServerProcess(
        "--device", "cpu", "--log-level", "WARNING", "--store", str(ROOT / "results" / "load_store")
    ) as server:
        djinn.RemoteModel(model, server.address).close()  # upload once, before timing
        for n in levels:
            rows.append(level(server.address, n, prompts, expected, args.tokens, args.timeout))
            print(f"  {n} clients done", file=sys.stderr)
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"tiny GPT-2, {args.tokens} tokens per client, full policy")
    print(f"{'clients':>8} {'tokens/s':>10} {'p50 ms':>8} {'p99 ms':>8}  tokens match local")
    for r in rows:
        match = "yes" if r["match"] else "NO"
        print(
            f"{r['clients']:>8} {r['tokens_per_s']:>10.1f} {r['p50_ms']:>8.2f} "
            f"{r['p99_ms']:>8.2f}  {match}"
        )
    if not all(r["match"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
