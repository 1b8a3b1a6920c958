#!/usr/bin/env python3
"""generate on the server, measured: first-token latency, cancel latency, bytes per token.

- first token: `rm.stream(...)` until its first token, against
  `rm.generate(..., max_new_tokens=1)` measured in the same rounds;
- cancel: a stream of `--cancel-tokens` tokens left after its 5th token, from
  the moment the loop is left to the moment the server's device has no
  call left (polled over a second connection);
- bytes per generated token under the full policy: a generate of 101 tokens
  against one of 1, the difference over 100.

Rounds are interleaved; medians and spreads are printed.

    python scripts/bench_generate.py [--rounds 20] [--cancel-tokens 1000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import djinn  # noqa: E402
from harness.server import ServerProcess  # noqa: E402
from harness.stats import spread  # noqa: E402


def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=4,
        n_embd=128,
        vocab_size=2048,
        n_positions=2048,
        bos_token_id=None,
        eos_token_id=None,
    )
    return GPT2LMHeadModel(config).eval()


def first_token(rm: djinn.RemoteModel, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    stream = rm.stream(ids, max_new_tokens=32)
    next(iter(stream))
    took = time.perf_counter() - start
    stream.close()  # cancels the rest
    return took


def one_token(rm: djinn.RemoteModel, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    rm.generate(ids, max_new_tokens=1)
    return time.perf_counter() - start


def cancel(rm: djinn.RemoteModel, observer: djinn.Client, ids: torch.Tensor, tokens: int) -> float:
    for i, _ in enumerate(rm.stream(ids, max_new_tokens=tokens)):
        if i == 4:
            break
    start = time.perf_counter()  # the loop is left: the cancel is on its way
    while observer.server_stats()["queued_calls"]:
        pass
    return time.perf_counter() - start


def wire_bytes(rm: djinn.RemoteModel) -> int:
    stats = rm.stats()
    return int(stats["bytes_sent"] + stats["bytes_received"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--cancel-tokens", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    ids = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(1))
    store = tempfile.mkdtemp(prefix="djinn-bench-")
    server_args = ("--device", "cpu", "--threads", "1", "--log-level", "WARNING", "--store", store)
    with (
        ServerProcess(*server_args) as server,
        djinn.connect(server.address) as observer,
        djinn.RemoteModel(model(), server.address) as rm,
    ):
        firsts, ones, cancels = [], [], []
        for _ in range(2):  # warm-up
            first_token(rm, ids), one_token(rm, ids)
        for _ in range(args.rounds):
            firsts.append(first_token(rm, ids))
            ones.append(one_token(rm, ids))
            cancels.append(cancel(rm, observer, ids, args.cancel_tokens))
        before = wire_bytes(rm)
        rm.generate(ids, max_new_tokens=1)
        single = wire_bytes(rm) - before
        before = wire_bytes(rm)
        rm.generate(ids, max_new_tokens=101)
        many = wire_bytes(rm) - before
    ratio = [f / o for f, o in zip(firsts, ones, strict=True)]
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}; one torch thread each side")
    print("tiny GPT-2 (2 layers, 128 wide), 16-token prompt, full policy, loopback")
    print(f"first token, rm.stream:              {spread([f * 1e3 for f in firsts])} ms")
    print(f"rm.generate(max_new_tokens=1):       {spread([o * 1e3 for o in ones])} ms")
    print(f"stream first token / generate(1):    {spread(ratio, '.3f')}x (paired)")
    print(
        f"cancel of a {args.cancel_tokens}-token generate to a free device: "
        f"{spread([c * 1e3 for c in cancels])} ms"
    )
    print(f"bytes per generated token (full): {(many - single) / 100:.1f}")


if __name__ == "__main__":
    main()
