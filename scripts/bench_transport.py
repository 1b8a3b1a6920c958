#!/usr/bin/env python3
"""Transport benchmark: djinn's wire against the raw-socket limit, in one run, on loopback.

Small calls: round-trip p50/p99 of `Client.ping()` against a blocking-socket
echo of the same size served by a second process.

Bulk: a float32 tensor echoed through the server, GB/s one way
(2 x payload / round trip), against the raw-socket limit (the same
pattern: sendall of a memoryview, recv_into a preallocated buffer) and
against naive in-band pickling (pickle.dumps of the tensor, sent over the
same djinn connection, pickle.loads on return).

    python scripts/bench_transport.py [--pings 5000] [--mib 64] [--repeats 10]
                                      [--device cpu|cuda] [--json FILE]

With --device cuda the echoed tensor lives in GPU memory on the client side:
each round trip includes the device-to-host copy before sending and the
host-to-device copy after receiving.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import djinn  # noqa: E402
from harness.server import ServerProcess, pin  # noqa: E402
from harness.stats import Paired, outliers, percentile  # noqa: E402

_RAW_SERVER = r"""
import socket, struct, sys
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(int(sys.argv[1]) + 8)
view = memoryview(buf)
while True:
    got = 0
    while got < 8:
        n = conn.recv_into(view[got:8])
        if not n:
            sys.exit(0)
        got += n
    size = struct.unpack("!Q", view[:8])[0]
    while got < 8 + size:
        got += conn.recv_into(view[got : 8 + size])
    conn.sendall(view[: 8 + size])
"""


class RawEcho:
    """A blocking-socket echo server in a second process, and its client side."""

    def __init__(self, max_bytes: int, cpu: int | None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _RAW_SERVER, str(max_bytes)], stdout=subprocess.PIPE, text=True
        )
        if cpu is not None:
            pin(self.proc.pid, cpu)
        assert self.proc.stdout is not None
        port = int(self.proc.stdout.readline())
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray(max_bytes + 8)
        self.view = memoryview(self.buf)

    def round_trip(self, payload: memoryview) -> None:
        self.sock.sendall(struct.pack("!Q", payload.nbytes))
        self.sock.sendall(payload)
        need, got = payload.nbytes + 8, 0
        while got < need:
            got += self.sock.recv_into(self.view[got:need])

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(timeout=10)


def time_calls(fn, count: int) -> list[float]:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pings", type=int, default=5000, help="small round trips per side")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds of pings")
    parser.add_argument("--mib", type=int, default=64, help="bulk tensor size in MiB")
    parser.add_argument("--repeats", type=int, default=10, help="bulk round trips per side")
    parser.add_argument("--device", default="cpu", help="where the client's tensor lives")
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the scheduler place client and servers (default: one CPU each)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    nbytes = args.mib * 1024 * 1024
    tensor = torch.randn(nbytes // 4, device=args.device)
    host = tensor.cpu()
    small = memoryview(bytes(48))
    results: dict[str, float] = {}
    # Client and servers on different CPUs, as on two machines: without this,
    # round trips on a VM swing 3x with whether the scheduler happens to put
    # both ends on one CPU (no wakeup) or not (an idle exit per message).
    server_cpu = 1 if args.pin else None
    if args.pin:
        pin(os.getpid(), 0)
    with ServerProcess("--log-level", "WARNING") as server, djinn.connect(server.address) as client:
        if server_cpu is not None:
            pin(server.pid, server_cpu)
        # The two sides alternate in rounds, each raw round with a fresh echo
        # process, and the ratio is taken per round, so drift hits both alike.
        raw_rt: list[float] = []
        ping_rt: list[float] = []
        raw_p50: list[float] = []
        ping_p50: list[float] = []
        per_round = max(100, args.pings // args.rounds)
        for _ in range(args.rounds):
            raw = RawEcho(64, server_cpu)
            time_calls(lambda: raw.round_trip(small), 100)  # noqa: B023
            raw_round = time_calls(lambda: raw.round_trip(small), per_round)  # noqa: B023
            raw.close()
            time_calls(client.ping, 100)
            ping_round = time_calls(client.ping, per_round)
            raw_p50.append(percentile(raw_round, 0.5))
            ping_p50.append(percentile(ping_round, 0.5))
            raw_rt += raw_round
            ping_rt += ping_round
        for name, samples in (("raw_socket", raw_rt), ("djinn_ping", ping_rt)):
            results[f"{name}_p50_us"] = percentile(samples, 0.50) * 1e6
            results[f"{name}_p99_us"] = percentile(samples, 0.99) * 1e6
        ping_paired = Paired.of(ping_p50, raw_p50)
        results["ping_p50_ratio_vs_raw"] = ping_paired.median
        flagged = len(outliers(raw_p50)) + len(outliers(ping_p50))

        raw = RawEcho(nbytes, server_cpu)

        def djinn_echo() -> None:
            back = client.echo(tensor)
            if args.device != "cpu":
                back.to(args.device)

        def pickle_echo() -> None:
            back = pickle.loads(client.echo(pickle.dumps(tensor)))
            if args.device != "cpu":
                back.to(args.device)

        def raw_echo() -> None:
            data = tensor.cpu() if args.device != "cpu" else host
            raw.round_trip(data.numpy().data.cast("B"))

        echoed = client.echo(tensor)
        if not torch.equal(echoed.to(tensor.device), tensor):
            raise SystemExit("echo returned different data")
        bulk: dict[str, list[float]] = {"raw_socket": [], "djinn_echo": [], "inband_pickle": []}
        for _ in range(args.repeats):
            for name, fn in (("raw_socket", raw_echo), ("djinn_echo", djinn_echo)):
                bulk[name] += time_calls(fn, 1)
        for _ in range(max(2, args.repeats // 3)):
            bulk["inband_pickle"] += time_calls(pickle_echo, 1)
        for name, samples in bulk.items():
            results[f"{name}_gbps"] = 2 * nbytes / statistics.median(samples) / 1e9
            flagged += len(outliers(samples))
        echo_paired = Paired.of(bulk["raw_socket"], bulk["djinn_echo"])  # rate ratio
        raw.close()

    echo_ratio = echo_paired.median
    pickle_ratio = results["djinn_echo_gbps"] / results["inband_pickle_gbps"]
    results.update(
        echo_ratio_vs_raw=echo_ratio,
        echo_ratio_vs_inband_pickle=pickle_ratio,
    )
    placement = "client on cpu 0, servers on cpu 1" if args.pin else "unpinned"
    print(f"machine: {os.cpu_count()} cpus ({placement}), torch {torch.__version__}")
    print(f"client tensor on: {args.device}")
    print(f"command: {' '.join(sys.argv)}")
    print()
    print(f"{'small round trip':<28}{'p50 us':>10}{'p99 us':>10}")
    for name in ("raw_socket", "djinn_ping"):
        print(f"{name:<28}{results[name + '_p50_us']:>10.1f}{results[name + '_p99_us']:>10.1f}")
    print(f"djinn / raw, p50 per round, paired: {ping_paired.describe('.2f')}")
    print(f"  target <= 2.00x: {verdict(ping_paired.below(2.0))}")
    print()
    print(f"{f'{args.mib} MiB echo, one way':<28}{'GB/s':>10}")
    for name in ("raw_socket", "djinn_echo", "inband_pickle"):
        print(f"{name:<28}{results[name + '_gbps']:>10.2f}")
    print(f"djinn / raw rate, paired repeats: {echo_paired.describe('.2f')}")
    print(f"  target >= 0.70x: {verdict(echo_paired.above(0.7))}")
    print(f"{'djinn / in-band pickle':<28}{pickle_ratio:>10.2f}x")
    print(f"\noutliers (rounds or repeats over 3x their side's median, kept): {flagged}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "missed", None: "cannot conclude (the interval straddles it)"}[ok]


if __name__ == "__main__":
    main()
