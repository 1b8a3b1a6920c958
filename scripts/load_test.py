#!/usr/bin/env python3
"""Load test: N concurrent clients decoding on one server, every token checked.

Each client is its own process with its own connection and session. It
drives a greedy decode loop of `--tokens` steps on a tiny GPT-2 (full
policy), reading every token as a streaming client does, from its own
prompt; its tokens must equal local unbatched greedy decoding of that
prompt. With --generate, each client instead calls the server's `generate`
and reads each token as it streams back, so the client spends almost no CPU
per token. The server batches the decode steps that wait at the same time.

Reported per level: the server's throughput, p50/p99 latency of one token
as a client sees it, the mean rows per batched forward, and whether every
token matched. In the same run, for comparison:

- 1 client on a server started with --batching off (the serial path);
- the local ceiling: `model.generate` over one batch of 32 prompts in this
  process, the most that batching on this machine could reach.

    python scripts/load_test.py [--clients 1,4,16,32,64] [--tokens 32] [--repeats 3] [--generate]
    python scripts/load_test.py --cluster 2 [--clients 1,8]

With --cluster N the same levels run against 1, then N, server actors of a local
Ray cluster (`python -m djinn.cluster up`), each client placed by the router; then
one streaming client's server is SIGKILLed halfway through its decode, and the time
from the loss to its next token is reported beside a fresh session's prefill.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Before torch loads OpenMP: idle pools sleep rather than spin on the clients' cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import psutil  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import djinn  # noqa: E402
from harness.server import ServerProcess  # noqa: E402
from harness.stats import Paired, outliers, percentile, spread  # noqa: E402

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
    address: str,
    ids: torch.Tensor,
    tokens: int,
    generate: bool,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    torch.set_num_threads(1)
    try:
        with djinn.RemoteModel(tiny_model(), address) as rm:
            ready.put(os.getpid())
            start.wait()
            got, latencies = [], []
            if generate:  # the server's generate, each token streamed back as it is made
                began = time.perf_counter()
                settings = {"max_new_tokens": tokens, "do_sample": False, "pad_token_id": 0}
                for step in rm.stream(ids, **settings):
                    got.append(int(step[0, 0]))
                    latencies.append(time.perf_counter() - began)
                    began = time.perf_counter()
            else:
                out = rm(ids)
                for _ in range(tokens):
                    began = time.perf_counter()
                    step = out.logits[:, -1].argmax(-1, keepdim=True)
                    got.append(int(step.item()))  # read each token, as a streaming client does
                    out = rm(step, past_key_values=out.past_key_values)
                    latencies.append(time.perf_counter() - began)
        results.put((got, latencies))
    except BaseException as exc:
        results.put(exc)


def server_stats(address: str) -> dict[str, Any]:
    with djinn.connect(address) as observer:
        return observer.server_stats()


def level(
    address: str,
    n: int,
    prompts: list[torch.Tensor],
    expected: list[list[int]],
    tokens: int,
    timeout: float,
    generate: bool = False,
) -> dict[str, Any]:
    context = multiprocessing.get_context("fork")
    ready, start, results = context.Queue(), context.Event(), context.Queue()
    procs = [
        context.Process(  # daemons: a failing run must not leave them waiting forever
            target=client,
            args=(address, prompts[i], tokens, generate, ready, start, results),
            daemon=True,
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    for _ in range(n):  # every client has registered and opened its session
        ready.get(timeout=timeout)
    servers = address.split(",")  # a cluster's servers, or the one server
    before = [server_stats(one) for one in servers]
    began = time.perf_counter()
    start.set()
    outputs = [results.get(timeout=timeout) for _ in range(n)]
    wall = time.perf_counter() - began
    after = [server_stats(one) for one in servers]
    for p in procs:
        p.join(timeout=10)
    failed = [o for o in outputs if isinstance(o, BaseException)]
    if failed:
        raise SystemExit(f"{len(failed)} of {n} clients failed: {failed[0]!r}")
    tokens_ok = sorted(map(tuple, (o[0] for o in outputs))) == sorted(map(tuple, expected[:n]))
    latencies = [x for o in outputs for x in o[1]]
    forwards = sum(
        a["batch_sizes"].get(k, 0) - b["batch_sizes"].get(k, 0)
        for a, b in zip(after, before, strict=True)
        for k in a["batch_sizes"]
    )
    rows = sum(a["decode_tokens"] - b["decode_tokens"] for a, b in zip(after, before, strict=True))
    return {
        "clients": n,
        "tokens_per_s": n * tokens / wall,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": percentile(latencies, 0.99) * 1e3,
        "batch_mean": rows / forwards if forwards else 0.0,
        "wait_p99_ms": max(a["queue_wait_p99_ms"] for a in after),
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


def serve(stack: contextlib.ExitStack, extra: list[str], model: Any) -> str:
    """A server with `extra` arguments, the model uploaded before any timing."""
    store = stack.enter_context(tempfile.TemporaryDirectory(prefix="djinn-load-"))
    server_args = ["--device", "cpu", "--log-level", "WARNING", "--store", store]
    server_args += ["--threads", "1", *extra]  # the clients need the other cores
    server = stack.enter_context(ServerProcess(*server_args))
    djinn.RemoteModel(model, server.address).close()
    return server.address


def kill_server_on(address: str) -> None:
    """SIGKILL the process listening on `address`'s port (a server actor of the cluster)."""
    port = int(address.rsplit(":", 1)[1])
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            os.kill(conn.pid, signal.SIGKILL)
            return
    raise SystemExit(f"no process listens on {address}")


def recover_once(
    address: str, model: Any, ids: torch.Tensor, want: list[int], tokens: int
) -> dict[str, Any]:
    """One streaming decode whose server is SIGKILLed halfway: the time from the loss to
    the next token, against a fresh session's prefill and first token."""
    with djinn.RemoteModel(model, address) as rm:
        began = time.perf_counter()
        out = rm(ids)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        got = [int(step.item())]
        prefill = time.perf_counter() - began
        recovery = 0.0
        for i in range(1, tokens):
            if i == tokens // 2:
                kill_server_on(rm.client.address)
                lost = time.perf_counter()
            out = rm(step, past_key_values=out.past_key_values)
            step = out.logits[:, -1].argmax(-1, keepdim=True)
            got.append(int(step.item()))
            if i == tokens // 2:
                recovery = time.perf_counter() - lost
    return {"prefill_s": prefill, "recovery_s": recovery, "match": got == want}


def cluster_run(
    servers: int,
    model: Any,
    levels: list[int],
    prompts: list[torch.Tensor],
    expected: list[list[int]],
    args: argparse.Namespace,
) -> tuple[dict[int, list[dict[str, Any]]], dict[str, Any] | None]:
    """The levels against `servers` server actors. `python -m djinn.cluster up` runs in
    its own process, so this one never imports Ray and can fork its clients."""
    store = tempfile.mkdtemp(prefix="djinn-cluster-")
    command = [sys.executable, "-m", "djinn.cluster"]
    server_args = ["--device", "cpu", "--log-level", "WARNING", "--threads", "1", "--store", store]
    up = subprocess.run(
        [*command, "up", "--servers", str(servers), "--cpus", str(servers + 2), "--", *server_args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    found = re.search(r"without Ray: (\S+)\)", up.stdout)
    if up.returncode or not found:
        raise SystemExit(f"cannot start the cluster:\n{up.stdout}{up.stderr}")
    address = found.group(1)
    try:
        for one in address.split(","):
            djinn.RemoteModel(model, one).close()  # every server holds it before timing
        rows = {
            n: [
                level(address, n, prompts, expected, args.tokens, args.timeout)
                for _ in range(args.repeats)
            ]
            for n in levels
        }
        recovery = None
        if servers > 1:
            recovery = recover_once(address, model, prompts[0], expected[0], args.tokens)
    finally:
        subprocess.run([*command, "down", "--stop-ray"], capture_output=True, timeout=120)
    return rows, recovery


def report_cluster(
    model: Any,
    levels: list[int],
    prompts: list[torch.Tensor],
    expected: list[list[int]],
    args: argparse.Namespace,
) -> bool:
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    print(f"{'servers':>8} {'clients':>8}  {'tokens/s: median [IQR]':<30}  match")
    ok = True
    recovery = None
    for servers in range(1, args.cluster + 1):
        rows, measured = cluster_run(servers, model, levels, prompts, expected, args)
        recovery = measured or recovery
        for n, runs in rows.items():
            match = all(r["match"] for r in runs)
            ok &= match
            rates = [r["tokens_per_s"] for r in runs]
            print(f"{servers:>8} {n:>8}  {spread(rates, '.1f'):<30}  {'yes' if match else 'NO'}")
    if recovery is not None:
        ok &= recovery["match"]
        print(
            f"server SIGKILLed mid-decode: the next token came {recovery['recovery_s']:.3f} s "
            f"after the loss (a fresh session's prefill and first token: "
            f"{recovery['prefill_s']:.3f} s); tokens match: "
            f"{'yes' if recovery['match'] else 'NO'}"
        )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16,32,64")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every level")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per level at most")
    parser.add_argument("--batch-wait-us", type=int, help="passed to the server (default: its own)")
    parser.add_argument(
        "--generate",
        action="store_true",
        help="clients call the server's generate and read each token as it streams back, "
        "instead of driving the decode loop step by step",
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the serial and local runs"
    )
    parser.add_argument(
        "--cluster",
        type=int,
        help="instead: the levels against 1..N server actors of a local Ray cluster "
        "(needs djinn[cluster]), and the recovery time when one is SIGKILLed",
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
    if args.cluster:
        sys.exit(0 if report_cluster(model, levels, prompts, expected, args) else 1)
    extra = ["--batch-wait-us", str(args.batch_wait_us)] if args.batch_wait_us is not None else []
    rows: dict[int, list[dict[str, Any]]] = {n: [] for n in levels}
    serial: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        # Both servers live through the run; an idle one takes no CPU. Rounds alternate
        # between them, so drift hits batching on and off alike and ratios pair up.
        on = serve(stack, extra, model)
        off = serve(stack, ["--batching", "off"], model) if not args.no_baselines else ""
        for round_ in range(args.repeats):
            for n in levels:
                rows[n].append(
                    level(on, n, prompts, expected, args.tokens, args.timeout, args.generate)
                )
            if off:
                serial.append(
                    level(off, 1, prompts, expected, args.tokens, args.timeout, args.generate)
                )
            print(f"  round {round_ + 1} of {args.repeats} done", file=sys.stderr)
    torch.set_num_threads(os.cpu_count() or 1)
    local = 0.0 if args.no_baselines else ceiling(model, prompts, args.tokens)
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}")
    print(
        f"tiny GPT-2 (2 layers, 128 wide), {PROMPT}-token prompts, {args.tokens} tokens "
        f"per client, full policy; {args.repeats} rounds, each level once per round; "
        + ("the server's generate, streamed" if args.generate else "a client-driven loop")
    )
    print(f"{'clients':>8}  {'tokens/s: median [IQR]':<30}{'p99 ms':>9} {'batch':>6}  match")
    flagged = 0
    for n, runs in rows.items():
        rates = [r["tokens_per_s"] for r in runs]
        flagged += len(outliers([1 / r for r in rates]))
        p99 = statistics.median(r["p99_ms"] for r in runs)
        batch = statistics.median(r["batch_mean"] for r in runs)
        match = "yes" if all(r["match"] for r in runs) else "NO"
        print(f"{n:>8}  {spread(rates, '.1f'):<30}{p99:>9.2f} {batch:>6.2f}  {match}")
    if serial:
        rates = [r["tokens_per_s"] for r in serial]
        print(f"1 client, --batching off: {spread(rates, '.1f')} tokens/s")
        if 1 in rows:
            ratio = Paired.of([r["tokens_per_s"] for r in rows[1]], rates)  # paired by round
            print(f"1-client batching on / off: {ratio.describe()} (target >= 0.95x)")
    if local:
        print(f"local ceiling, model.generate over 32 prompts in one batch: {local:.1f} tokens/s")
    if 1 in rows and 32 in rows:
        one, many = [r["tokens_per_s"] for r in rows[1]], [r["tokens_per_s"] for r in rows[32]]
        print(f"32 clients / 1 client, paired by round: {Paired.of(many, one).describe('.2f')}")
        print("  (target >= 6x)")
        tail = Paired.of([r["p99_ms"] for r in rows[32]], [r["p99_ms"] for r in rows[1]])
        print(f"32-client p99 / 1-client p99: {tail.describe('.2f')} (target <= 4x)")
        if local:
            share = statistics.median(many) / local
            print(f"32 clients / local ceiling: {share:.2f}x (target >= 0.6x)")
    print(f"outlier rounds (over 3x their level's median time, kept): {flagged}")
    if not all(r["match"] for runs in [*rows.values(), serial] for r in runs):
        sys.exit(1)


if __name__ == "__main__":
    main()
