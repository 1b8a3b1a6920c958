#!/usr/bin/env python3
"""Soak test: killed clients, churn and an adversary must leave the server's memory flat
and its honest clients served.

Default mode:

1. `--kills` cycles of a client SIGKILLed in the middle of work (alternating:
   mid-transfer of a 256 MB tensor, and mid-generate holding a KV cache and
   logits), each kill sent once the server shows that work under way; after
   each, the server must be back to no sessions, no session memory, no
   receive buffers in use.
2. `--refs` server-held tensors made and dropped, and `--sessions`
   sessions opened and closed.

--adversarial: a well-behaved client runs a greedy decode loop that reads
every token, alone and then while an adversary process cycles through the
attacks of tests/test_security.py (structured messages, stalled frames,
quota-busting work, forged indices, long generates, reference floods,
connection floods). The honest client's tokens must stay exact and its p99
per-token latency within `--latency-ratio` of its solo figure; the server's
RSS must come back to its baseline once the adversary leaves. The honest
steps' latencies are also reported by the attack running as each ended.

Reports the server's RSS after a warm-up and at the end of each part.

    python scripts/soak.py [--kills 100] [--refs 10000] [--sessions 1000]
    python scripts/soak.py --adversarial [--seconds 30]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import djinn  # noqa: E402
from djinn.errors import DjinnError  # noqa: E402
from djinn.net.frame import MAGIC, PROTOCOL_VERSION, Frame, FrameKind, encode_frame  # noqa: E402
from harness.server import ServerProcess  # noqa: E402

SETTLED = {"sessions": 0, "resident_bytes": 0, "receive_in_use_bytes": 0, "connections": 1}
VOCAB = 2000


def tiny_model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=VOCAB, n_positions=512)
    return GPT2LMHeadModel(config).eval()


def wait_for(check: Callable[[], bool], seconds: float = 30.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    raise SystemExit("timed out waiting for the server")


def settled(observer: djinn.Client, connections: int = 1) -> bool:
    stats = observer.server_stats()
    return all(stats[k] == v for k, v in {**SETTLED, "connections": connections}.items())


def mib(process: psutil.Process) -> float:
    return process.memory_info().rss / 2**20


# -- default mode: kills and churn ------------------------------------------------------------


def victim(address: str, what: str) -> None:
    client = djinn.connect(address, timeout=60)
    if what == "transfer":
        client.echo(torch.zeros(64_000_000))
    else:
        rm = djinn.RemoteModel(tiny_model(), client)
        rm(torch.randint(0, VOCAB, (1, 200))).logits[:, -1].argmax().item()
        rm.generate(torch.randint(0, VOCAB, (1, 50)), max_new_tokens=400)
    time.sleep(60)  # held until killed


def busy(observer: djinn.Client, what: str) -> bool:
    stats = observer.server_stats()
    return bool(stats["receive_in_use_bytes"] if what == "transfer" else stats["queued_calls"])


def kills_and_churn(args: argparse.Namespace, server: ServerProcess) -> list[tuple[str, float]]:
    model = tiny_model()
    process = psutil.Process(server.pid)
    djinn.RemoteModel(model, server.address).close()
    observer = djinn.connect(server.address)
    rows = []
    worst = 0.0
    for cycle in range(args.kills + 4):
        if cycle == 4:
            rows.append(("after 4 warm-up kills", mib(process)))
        what = "transfer" if cycle % 2 else "generate"
        # a fresh interpreter: a forked child of a process whose OpenMP pool runs can
        # hang in its first parallel torch operation
        child = subprocess.Popen([sys.executable, __file__, "--victim", server.address, what])
        try:
            wait_for(lambda w=what: busy(observer, w))  # type: ignore[misc]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        worst = max(worst, wait_for(lambda: settled(observer), seconds=10))
    rows.append((f"after {args.kills} more kills (settled within {worst:.2f}s each)", mib(process)))
    with djinn.RemoteModel(model, observer) as rm:
        logits = rm(torch.randint(0, VOCAB, (1, 8)), use_cache=False).logits
        for i in range(args.refs):
            (logits * 2)[:, :, :1000]  # made on the server, dropped at once
            if i % 1000 == 999:
                rm.synchronize()
        rm.synchronize()
    rows.append((f"after {args.refs} references made and freed", mib(process)))
    for _ in range(args.sessions):
        djinn.RemoteModel(model, observer).close()
    wait_for(lambda: settled(observer), seconds=10)
    rows.append((f"after {args.sessions} sessions opened and closed", mib(process)))
    observer.close()
    return rows


# -- adversarial mode --------------------------------------------------------------------------


def honest(
    client: djinn.Client, model: torch.nn.Module, prompt: torch.Tensor, tokens: int
) -> tuple[list[int], list[float], list[float]]:
    """A streaming client's loop, a session on its own connection: every token read as
    it is made. Returns the tokens, each step's latency, and when each step ended."""
    with djinn.RemoteModel(model, client) as rm:
        out = rm(prompt)
        got, latencies, ends = [], [], []
        for _ in range(tokens):
            start = time.perf_counter()
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(token.item()))
            out = rm(token, past_key_values=out.past_key_values)
            latencies.append(time.perf_counter() - start)
            ends.append(time.time())
    return got, latencies, ends


def _raw(address: str) -> socket.socket:
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(b"".join(encode_frame(Frame(FrameKind.HELLO, 0, os.urandom(32)))))
    sock.recv(4096)
    sock.sendall(b"".join(encode_frame(Frame(FrameKind.AUTH, 0, b""))))
    sock.recv(4096)
    return sock


def _attacks(address: str) -> list[tuple[str, Callable[[], None]]]:
    model = tiny_model()

    def structured() -> None:
        sock = _raw(address)
        for control in (b"\x92\xa4echo" + b"\x91" * 50_000 + b"\xc0", b"\x91\xa7newkind"):
            sock.sendall(b"".join(encode_frame(Frame(FrameKind.REQUEST, 1, control))))
            sock.recv(65536)
        sock.close()

    def stalled_frame() -> None:
        sock = _raw(address)
        header = struct.pack("!4sBBHQII", MAGIC, PROTOCOL_VERSION, FrameKind.REQUEST, 0, 1, 1, 1)
        sock.sendall(header + b"\xc0" + struct.pack("!Q", 256 * 2**20) + b"\0" * 4096)
        time.sleep(0.5)
        sock.close()

    def quota_busting() -> None:
        with djinn.RemoteModel(model, address) as rm:
            logits = rm(torch.randint(0, VOCAB, (1, 16)), use_cache=False).logits
            logits.expand(50_000, 16, VOCAB).contiguous().sum().item()

    def forged_indices() -> None:
        with djinn.RemoteModel(model, address) as rm:
            logits = rm(torch.randint(0, VOCAB, (1, 16)), use_cache=False).logits
            far = logits[:, -1].argmax(-1) + 10**6
            logits[0].index_select(0, far).cpu()

    def long_generate() -> None:
        with djinn.RemoteModel(model, address) as rm:
            rm.generate(torch.randint(0, VOCAB, (64, 32)), max_new_tokens=300, do_sample=False)

    def reference_flood() -> None:
        with djinn.RemoteModel(model, address) as rm:
            logits = rm(torch.randint(0, VOCAB, (1, 4)), use_cache=False).logits
            views = [logits[:, :0] for _ in range(5000)]
            rm.synchronize()
            del views

    def connection_flood() -> None:
        host, port = address.rsplit(":", 1)
        socks = []
        for _ in range(200):
            try:
                socks.append(socket.create_connection((host, int(port)), timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        for s in socks:
            s.close()

    return [
        ("structured messages", structured),
        ("a stalled 256 MiB frame", stalled_frame),
        ("work past the quota", quota_busting),
        ("out-of-range indices", forged_indices),
        ("a 64 x 300-token generate", long_generate),
        ("5,000 views", reference_flood),
        ("200 idle connections", connection_flood),
    ]


def adversary(address: str, stop: Any, counts: Any) -> None:
    torch.set_num_threads(1)
    attacks = _attacks(address)
    i = 0
    while not stop.is_set():
        name, attack = attacks[i % len(attacks)]
        began = time.time()
        with contextlib.suppress(DjinnError, OSError):  # refused: what the attack should get
            attack()
        counts.put((name, began, time.time()))
        i += 1


def by_attack(
    spans: list[tuple[str, float, float]], ends: list[float], latencies: list[float]
) -> dict[str, list[float]]:
    """The honest steps' latencies by the attack running as each step ended."""
    found: dict[str, list[float]] = {}
    for end, latency in zip(ends, latencies, strict=True):
        name = next((n for n, began, ended in spans if began <= end <= ended), "(between)")
        found.setdefault(name, []).append(latency)
    return dict(sorted(found.items()))


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def adversarial(
    args: argparse.Namespace, server: ServerProcess
) -> tuple[list[tuple[str, float]], bool]:
    model = tiny_model()
    process = psutil.Process(server.pid)
    prompt = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model.generate(
            prompt, max_new_tokens=args.tokens, do_sample=False, pad_token_id=0
        )
    expected_tokens = expected[0, prompt.shape[1] :].tolist()
    torch.set_num_threads(1)
    # one connection for the whole test, as a serving client keeps: the attacker's
    # connection flood is refused past --max-connections, and must not touch it
    client = djinn.connect(server.address)
    honest(client, model, prompt, args.tokens)  # warm-up
    observer = djinn.connect(server.address)
    wait_for(lambda: settled(observer, connections=2))
    baseline = mib(process)
    solo_tokens, solo, _ = honest(client, model, prompt, args.tokens)
    context = multiprocessing.get_context("fork")
    stop, counts = context.Event(), context.Queue()
    attacker = context.Process(target=adversary, args=(server.address, stop, counts))
    attacker.start()
    under: list[float] = []
    ends: list[float] = []
    tokens_ok = solo_tokens == expected_tokens
    deadline = time.monotonic() + args.seconds
    loops = 0
    while time.monotonic() < deadline:
        got, latencies, ended = honest(client, model, prompt, args.tokens)
        ends.extend(ended)
        tokens_ok &= got == expected_tokens
        under.extend(latencies)
        loops += 1
    peak = mib(process)
    stop.set()
    attacker.join(60)
    attacks: dict[str, int] = {}
    spans: list[tuple[str, float, float]] = []
    while not counts.empty():
        spans.append(counts.get())
        attacks[spans[-1][0]] = attacks.get(spans[-1][0], 0) + 1
    settle = wait_for(lambda: settled(observer, connections=2), seconds=30)
    time.sleep(1.0)
    after = mib(process)
    observer.close()
    client.close()
    ratio = p99(under) / p99(solo)
    print(f"honest client: {args.tokens}-token greedy loop, every token read")
    print(f"  solo: p50 {statistics.median(solo) * 1e3:.2f} ms, p99 {p99(solo) * 1e3:.2f} ms")
    print(
        f"  under attack ({loops} loops): p50 {statistics.median(under) * 1e3:.2f} ms, "
        f"p99 {p99(under) * 1e3:.2f} ms = {ratio:.2f}x solo (limit {args.latency_ratio}x)"
    )
    print(f"  tokens equal local greedy in every loop: {'yes' if tokens_ok else 'NO'}")
    print("attacks run: " + ", ".join(f"{name} x{n}" for name, n in attacks.items()))
    for name, latencies in by_attack(spans, ends, under).items():
        print(
            f"  honest steps during {name}: {len(latencies)}, "
            f"p50 {statistics.median(latencies) * 1e3:.2f} ms, p99 {p99(latencies) * 1e3:.2f} ms"
        )
    print(f"server settled {settle:.2f}s after the adversary left")
    rows = [
        ("baseline, before the adversary", baseline),
        ("peak seen during the attacks", peak),
        ("after the adversary left", after),
    ]
    ok = tokens_ok and ratio <= args.latency_ratio and after - baseline < args.rss_slack
    return rows, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--refs", type=int, default=10_000)
    parser.add_argument("--sessions", type=int, default=1_000)
    parser.add_argument(
        "--adversarial", action="store_true", help="an attacker beside an honest client"
    )
    parser.add_argument("--seconds", type=float, default=30.0, help="how long the attacks go on")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per honest loop")
    parser.add_argument(
        "--latency-ratio", type=float, default=3.0, help="p99 under attack / solo, at most"
    )
    parser.add_argument(
        "--rss-slack", type=float, default=64.0, help="MiB the server may keep after"
    )
    parser.add_argument("--victim", nargs=2, metavar=("ADDRESS", "WHAT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.victim:  # a child of the kill cycles
        victim(*args.victim)
        return
    store = tempfile.mkdtemp(prefix="djinn-soak-")
    server_args = ["--device", "cpu", "--log-level", "WARNING", "--store", store]
    if args.adversarial:  # limits small enough that each attack meets one
        server_args += ["--session-quota", "0.5", "--receive-budget", "1", "--frame-timeout", "2"]
        server_args += ["--max-connections", "128", "--max-generate-tokens", "65536"]
    ok = True
    with ServerProcess(*server_args) as server:
        if args.adversarial:
            rows, ok = adversarial(args, server)
        else:
            rows = kills_and_churn(args, server)
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"{'server RSS':<60}{'MiB':>8}")
    for label, value in rows:
        print(f"{label:<60}{value:>8.1f}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
