#!/usr/bin/env python3
"""Attaching a model the client cannot hold: the client's peak memory, the time to attach
a model the server already holds, and upload and hashing rates against their raw limits.

    python scripts/bench_attach.py [--model llama-1b] [--repeats 5] [--json FILE]

1. The folder: the preset's seeded random fp32 weights as safetensors shards (written
   once to the weights cache, as scripts/run_exp2_1.sh --model llama-1b does).
2. Hashing: djinn's fingerprint of the folder against `sha256sum` of the same shard
   files, alternating, both from a warm page cache.
3. Upload: a fresh client process attaches the folder by path to a server with an empty
   store. Its peak RSS during the attach, over its RSS just before, as a share of the
   weights' bytes; and its upload rate against a raw-socket echo on the same loopback.
4. Held: a server started with --model NAME=PATH; fresh client processes attach by name
   and by path (the fingerprint remembered from step 3), `--repeats` times each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from djinn.checkpoint import hash_folder, read_folder  # noqa: E402
from harness.exp2_1 import LLAMA_PRESETS, llama_folder  # noqa: E402
from harness.server import ServerProcess  # noqa: E402
from harness.stats import spread  # noqa: E402
from scripts.bench_transport import RawEcho  # noqa: E402

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)

import djinn
what, address = sys.argv[1], sys.argv[2]
client = djinn.connect(address, timeout=3600)
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts from here
before = rss("VmRSS")
began = time.perf_counter()
model = djinn.RemoteModel.from_pretrained(what, client)
seconds = time.perf_counter() - began
peak = rss("VmHWM")
model.close()
began = time.perf_counter()  # again in the same process: its transformers code imported
djinn.RemoteModel.from_pretrained(what, client).close()
again = time.perf_counter() - began
print(json.dumps({"seconds": seconds, "again_s": again, "rss_before": before, "rss_peak": peak,
                  "uploaded": model.uploaded_bytes, "weights": model.weight_bytes}))
client.close()
"""


def attach(what: str, address: str, cache: Path) -> dict[str, Any]:
    """One attach in a fresh client process (its memory is this attach's alone)."""
    env = {**os.environ, "DJINN_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, what, address],
        capture_output=True,
        text=True,
        env=env,
        timeout=3600,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"the attaching client failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def sha256sum(files: list[Path]) -> float:
    began = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, files)], check=True, capture_output=True)
    return time.perf_counter() - began


def raw_rate(mib: int, repeats: int) -> list[float]:
    """One-way GB/s of a raw-socket echo of `mib` MiB on loopback."""
    echo = RawEcho(mib << 20, None)
    payload = memoryview(bytearray(mib << 20))
    rates = []
    for _ in range(repeats):
        began = time.perf_counter()
        echo.round_trip(payload)
        rates.append(2 * payload.nbytes / (time.perf_counter() - began) / 1e9)
    echo.close()
    return rates


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-1b", choices=sorted(LLAMA_PRESETS))
    p.add_argument("--repeats", type=int, default=5, help="timed attaches of a held model")
    p.add_argument("--json", type=Path, help="write the numbers here too")
    args = p.parse_args()
    folder = llama_folder(args.model, torch.float32, 0)
    shards = sorted(folder.glob("*.safetensors"))
    weight_bytes = sum(f.stat().st_size for f in shards)
    print(f"{args.model}: {folder}, {len(shards)} shards, {weight_bytes / 1e9:.2f} GB")

    # hashing, against sha256sum on the same files (alternating; the first read warms)
    sha256sum(shards)
    parsed = read_folder(folder)
    ours, theirs = [], []
    for _ in range(2):
        began = time.perf_counter()
        hash_folder(parsed)
        ours.append(weight_bytes / (time.perf_counter() - began) / 1e9)
        theirs.append(weight_bytes / sha256sum(shards) / 1e9)
    print(f"hashing: djinn {spread(ours)} GB/s, sha256sum {spread(theirs)} GB/s")

    with tempfile.TemporaryDirectory(prefix="djinn-bench-attach-") as tmp:
        cache = Path(tmp) / "cache"
        with ServerProcess("--store", str(Path(tmp) / "store"), "--device", "cpu") as server:
            upload = attach(str(folder), server.address, cache)
        raw = raw_rate(256, 5)
        peak = upload["rss_peak"] - upload["rss_before"]
        rate = upload["uploaded"] / upload["seconds"] / 1e9
        print(
            f"upload by path: {upload['uploaded'] / 1e9:.2f} GB in {upload['seconds']:.1f} s "
            f"({rate:.2f} GB/s, hashing, the server's write and load included; raw socket "
            f"{spread(raw)} GB/s one way)"
        )
        print(
            f"client peak RSS over its RSS before the attach: {peak / 1e6:.0f} MB = "
            f"{peak / weight_bytes:.3f}x the weights (target < 0.1x)"
        )
        name = args.model
        held = ("--store", str(Path(tmp) / "held"), "--device", "cpu")
        with ServerProcess(*held, "--model", f"{name}={folder}") as server:
            attach(name, server.address, cache)  # the first session loads it into memory
            named = [attach(name, server.address, cache) for _ in range(args.repeats)]
            pathed = [attach(str(folder), server.address, cache) for _ in range(args.repeats)]
        by_name, by_path = [a["seconds"] for a in named], [a["seconds"] for a in pathed]
        print(
            "attach a held model, in a fresh client process (the first attach imports the "
            "model's transformers code):"
        )
        print(
            f"  by name: {spread(by_name, '.3f')} s; by path (fingerprint remembered): "
            f"{spread(by_path, '.3f')} s"
        )
        print(
            f"  again in the same process: by name {spread([a['again_s'] for a in named], '.3f')}"
            f" s, by path {spread([a['again_s'] for a in pathed], '.3f')} s (target < 1 s)"
        )

    numbers = {
        "model": args.model,
        "weight_bytes": weight_bytes,
        "hash_gbps": ours,
        "sha256sum_gbps": theirs,
        "upload": upload,
        "upload_gbps": rate,
        "raw_socket_gbps": raw,
        "peak_rss_ratio": peak / weight_bytes,
        "attach_by_name_s": by_name,
        "attach_by_path_s": by_path,
        "attach_again_by_name_s": [a["again_s"] for a in named],
        "attach_again_by_path_s": [a["again_s"] for a in pathed],
        "machine": f"{platform.node()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "median_attach_by_name_s": statistics.median(by_name),
    }
    print(f"(machine: {numbers['machine']}; command: python scripts/bench_attach.py)")
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
