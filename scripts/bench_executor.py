#!/usr/bin/env python3
"""The server's device thread against the caller's own thread: one decode loop, one process.

Experiment 2.1 splits full_djinn's time into the server's device thread and
the rest. When the device thread itself is slower than native, this says
whether the cause is how the server runs work (a worker thread, its own
CUDA stream, a job per call) rather than the network or the client:

- native: the experiment's greedy loop in this thread, on the default stream;
- one_job: the same loop as a single job of the server's Executor, as a
  full_djinn decode that reads its tokens at the end runs on the server;
- job_per_step: one Executor job per step, as a loop that reads every token.

Runs are interleaved; each line reports per-token ms and the ratio to native
in the same round (median over rounds). No server, no sockets.

    python scripts/bench_executor.py [--model gpt2|DIR] [--device auto] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from djinn.errors import UsageError  # noqa: E402
from djinn.server.executor import Executor, resolve_device  # noqa: E402
from scripts.exp2_1 import PRESETS, Local, build_model, decode, is_model, prompt_ids  # noqa: E402


def per_step_jobs(executor: Executor, model: Local, ids: torch.Tensor, new_tokens: int) -> None:
    async def run() -> None:
        def step(token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
            out = model(token, past_key_values=cache, use_cache=True)
            return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

        token, cache = await executor.run(step, ids, None)
        for _ in range(new_tokens - 1):
            token, cache = await executor.run(step, token, cache)

    asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        default="gpt2",
        help=f"a GPT-2 preset ({', '.join(PRESETS)}) or a local model folder",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda[:N]")
    p.add_argument("--runs", type=int, default=5, help="counted rounds (after one warm-up)")
    p.add_argument("--prompt-tokens", type=int, default=72)
    p.add_argument("--new-tokens", type=int, default=50)
    args = p.parse_args(argv)
    if not is_model(args.model):
        p.error(f"--model must be one of {', '.join(PRESETS)} or a model folder")
    if min(args.runs, args.prompt_tokens, args.new_tokens) < 1:
        p.error("--runs, --prompt-tokens and --new-tokens must be >= 1")
    try:
        device = resolve_device(args.device)
    except UsageError as exc:
        p.error(str(exc))
    built, tokenizer, _ = build_model(args.model, device, torch.float32, 0)
    model = Local(built)
    ids = prompt_ids(tokenizer, args.prompt_tokens, model.model.config.vocab_size).to(device)
    executor = Executor(device, receive_budget=1 << 30, max_queued=4)
    n = args.new_tokens

    def one_job() -> None:
        asyncio.run(executor.run(decode, model, ids, n))

    def native() -> None:
        with torch.inference_mode():
            decode(model, ids, n)

    ways: dict[str, Callable[[], None]] = {
        "native": native,
        "one_job": one_job,
        "job_per_step": lambda: per_step_jobs(executor, model, ids, n),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.runs + 1):
        for name, way in ways.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            way()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) * 1e3 / n)
    executor.shutdown()
    print(f"{args.model} on {device}, {args.prompt_tokens}+{n} tokens, {args.runs} rounds")
    for name, ms in times.items():
        ratio = statistics.median(a / b for a, b in zip(ms, times["native"], strict=True))
        print(f"{name:>13}: {statistics.median(ms):8.2f} ms/token  {ratio:.3f}x native")
    return 0


if __name__ == "__main__":
    sys.exit(main())
