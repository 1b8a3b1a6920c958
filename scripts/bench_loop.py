#!/usr/bin/env python3
"""A user's decode loop that reads every token, remote against local, interleaved.

    out = rm(tok, past_key_values=cache); tok = out.logits[:, -1].argmax(-1, keepdim=True)
    tok.item()

is what a streaming client or an agent runs: one round trip per token. Each
round runs `--tokens` steps of that loop on a RemoteModel (full policy, a
server on 127.0.0.1) and the same steps on the local model, and the per-step
overhead is (remote - local) / tokens in that round. Reported: the median
over rounds with its spread, the paired ratio, and the CPU time per step of
the server process and of this client. One torch thread on each side.

    python scripts/bench_loop.py [--rounds 60] [--tokens 50] [--compile on] [--profile]

With --profile, one more set of rounds runs with the client under cProfile
and the server under py-spy (where installed), and the top entries of each
are printed.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import djinn  # noqa: E402
from djinn.server.config import COMPILE_MODES  # noqa: E402
from harness.server import ServerProcess, pin  # noqa: E402
from harness.stats import Paired, outliers, spread  # noqa: E402


def model() -> GPT2LMHeadModel:
    """The issue's model: 2 layers, 256 wide, GPT-2's own vocabulary."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=256, n_head=4, n_positions=1024)
    return GPT2LMHeadModel(config).eval()


def remote_loop(rm: djinn.RemoteModel, ids: torch.Tensor, tokens: int) -> list[int]:
    out = rm(ids)
    got = []
    for _ in range(tokens):
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        got.append(tok.item())
        out = rm(tok, past_key_values=out.past_key_values)
    return got


def local_loop(local: Any, ids: torch.Tensor, tokens: int) -> list[int]:
    got = []
    with torch.inference_mode():
        out = local(ids, use_cache=True)
        for _ in range(tokens):
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            got.append(tok.item())
            out = local(tok, cache=out.cache, use_cache=True)
    return got


def cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--compile",
        default="off",
        choices=COMPILE_MODES,
        help="the server's --compile; the local loop stays eager (the user's own loop)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="let the scheduler place both (default: a CPU each)"
    )
    args = parser.parse_args()
    pinned = not args.no_pin and (os.cpu_count() or 1) >= 2
    torch.set_num_threads(1)
    local = model()
    ids = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    store = tempfile.mkdtemp(prefix="djinn-loop-")
    server_args = ["--device", "cpu", "--threads", "1", "--log-level", "WARNING", "--store", store]
    server_args += ["--compile", args.compile]
    with ServerProcess(*server_args) as server, djinn.RemoteModel(model(), server.address) as rm:
        sp, me = psutil.Process(server.pid), psutil.Process()
        if pinned:  # as on two machines: each side keeps its core and its caches
            pin(server.pid, 1)
            pin(os.getpid(), 0)
        for _ in range(3):  # warm-up
            assert remote_loop(rm, ids, args.tokens) == local_loop(local, ids, args.tokens)
        remote, native, overhead, server_cpu, client_cpu = [], [], [], [], []
        for _ in range(args.rounds):
            s0, c0, t0 = cpu_s(sp), cpu_s(me), time.perf_counter()
            got = remote_loop(rm, ids, args.tokens)
            t1, s1, c1 = time.perf_counter(), cpu_s(sp), cpu_s(me)
            expected = local_loop(local, ids, args.tokens)
            t2 = time.perf_counter()
            assert got == expected, "the remote loop made other tokens than the local one"
            remote.append((t1 - t0) / args.tokens * 1e3)
            native.append((t2 - t1) / args.tokens * 1e3)
            overhead.append(remote[-1] - native[-1])
            server_cpu.append((s1 - s0) / args.tokens * 1e3)
            client_cpu.append((c1 - c0) / args.tokens * 1e3)
        if args.profile:
            profile(rm, server.pid, ids, args.tokens)
    paired = Paired.of(remote, native)
    print(f"command: {' '.join(sys.argv)}")
    placement = "client on cpu 0, server on cpu 1" if pinned else "unpinned"
    print(
        f"machine: {os.cpu_count()} cpus ({placement}), torch {torch.__version__}; "
        f"one torch thread each side; server --compile {args.compile}"
    )
    print(
        f"2-layer GPT-2 (256 wide, vocab 50257), {args.tokens} tokens per round, "
        "token read each step"
    )
    print(f"local loop:            {spread(native)} ms/step")
    print(f"remote loop (djinn):   {spread(remote)} ms/step")
    print(
        f"overhead per step:     {spread(overhead, '.3f')} ms  "
        f"(median of {args.rounds} interleaved rounds)"
    )
    print(f"remote / local:        {paired.describe()}")
    print(f"server CPU per step:   {spread(server_cpu, '.3f')} ms")
    print(f"client CPU per step:   {spread(client_cpu, '.3f')} ms (its model work included: none)")
    flagged = outliers(remote)
    if flagged:
        print(
            f"{len(flagged)} remote rounds over 3x the median: "
            + ", ".join(f"{remote[i]:.2f}" for i in flagged)
        )


def profile(rm: djinn.RemoteModel, server_pid: int, ids: torch.Tensor, tokens: int) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out = Path(tempfile.mkdtemp()) / "server.txt"
    recorder = None
    if Path(spy).exists():
        recorder = subprocess.Popen(
            [
                spy,
                "record",
                "-d",
                "6",
                "-r",
                "1000",
                "--format",
                "raw",
                "-o",
                str(out),
                "-p",
                str(server_pid),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
    profiler = cProfile.Profile()
    deadline = time.monotonic() + 5
    profiler.enable()
    while time.monotonic() < deadline:
        remote_loop(rm, ids, tokens)
    profiler.disable()
    print("\nclient, cProfile (own time):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
    if recorder is not None:
        recorder.wait(30)
        print("server, py-spy samples by innermost djinn or torch frame:")
        for line in summarize(out):
            print(line)


def summarize(path: Path) -> list[str]:
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(("_worker (concurrent", "serve (djinn/server/app.py")):
            continue  # idle
        total += int(n)
        mine = [f for f in frames if "djinn/" in f]
        key = mine[-1] if mine else frames[-1]
        counts[key] = counts.get(key, 0) + int(n)
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:25]
    return [f"{n:6d} {n / total * 100:5.1f}%  {frame[:120]}" for frame, n in top]


if __name__ == "__main__":
    main()
