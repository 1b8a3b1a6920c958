#!/usr/bin/env python3
"""Soak test: killed clients and reference/session churn must leave the server's memory flat.

1. `--kills` cycles of a client SIGKILLed in the middle of work (alternating:
   mid-transfer of a 256 MB tensor, and mid-generate holding a KV cache and
   logits); after each, the server must be back to no sessions, no
   session memory, no receive buffers in use.
2. `--refs` server-held tensors made and dropped, and `--sessions`
   sessions opened and closed.

Reports the server's RSS after a warm-up and at the end of each part.

    python scripts/soak.py [--kills 100] [--refs 10000] [--sessions 1000]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import djinn  # noqa: E402
from harness.server import ServerProcess  # noqa: E402

SETTLED = {"sessions": 0, "resident_bytes": 0, "receive_in_use_bytes": 0, "connections": 1}


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=2000, n_positions=256)
    return GPT2LMHeadModel(config).eval()


def victim(address: str, what: str) -> None:
    client = djinn.connect(address, timeout=60)
    if what == "transfer":
        client.echo(torch.zeros(64_000_000))
    else:
        rm = djinn.RemoteModel(tiny_model(), client)
        rm(torch.randint(0, 2000, (1, 200))).logits[:, -1].argmax().item()
        rm.generate(torch.randint(0, 2000, (1, 50)), max_new_tokens=200)
    time.sleep(60)


def wait_settled(observer: djinn.Client, seconds: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        stats = observer.server_stats()
        if all(stats[k] == v for k, v in SETTLED.items()):
            return time.monotonic() - start
        time.sleep(0.02)
    raise SystemExit(f"server did not settle: {observer.server_stats()}")


def mib(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--refs", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=1_000)
    args = parser.parse_args()
    model = tiny_model()
    store = tempfile.mkdtemp(prefix="djinn-soak-")
    with ServerProcess("--device", "cpu", "--log-level", "WARNING", "--store", store) as server:
        process = psutil.Process(server.pid)
        djinn.RemoteModel(model, server.address).close()
        observer = djinn.connect(server.address)
        rows = []
        worst = 0.0
        for cycle in range(args.kills + 4):
            if cycle == 4:
                rows.append(("after 4 warm-up kills", mib(process)))
            pid = os.fork()
            if pid == 0:
                try:
                    victim(server.address, "transfer" if cycle % 2 else "generate")
                finally:
                    os._exit(0)
            time.sleep(0.4)
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            worst = max(worst, wait_settled(observer))
        rows.append(
            (f"after {args.kills} more kills (settled within {worst:.2f}s each)", mib(process))
        )

        with djinn.RemoteModel(model, observer) as rm:
            logits = rm(torch.randint(0, 2000, (1, 8)), use_cache=False).logits
            for i in range(args.refs):
                (logits * 2)[:, :, :1000]  # made on the server, dropped at once
                if i % 1000 == 999:
                    rm.synchronize()
            rm.synchronize()
        rows.append((f"after {args.refs} references made and freed", mib(process)))
        for _ in range(args.sessions):
            djinn.RemoteModel(model, observer).close()
        wait_settled(observer)
        rows.append((f"after {args.sessions} sessions opened and closed", mib(process)))
        observer.close()
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"{'server RSS':<60}{'MiB':>8}")
    for label, value in rows:
        print(f"{label:<60}{value:>8.1f}")


if __name__ == "__main__":
    main()
