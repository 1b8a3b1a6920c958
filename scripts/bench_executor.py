#!/usr/bin/env python3
"""The server's device thread against the caller's own thread: one decode loop, one process.

Experiment 2.1 splits full_djinn's time into the server's device thread and
the rest. When the device thread itself is slower than native, this says
which part of how the server runs work costs the time, with no network and
no client in the way:

- native: the experiment's greedy loop in this thread, on the default stream;
- side_stream: the same in this thread, on the executor's own CUDA stream (CUDA only);
- worker_thread: the same in a plain worker thread, on the default stream;
- one_job: the same as a single job of the server's Device (its thread, turn and stream);
- server_ops: what a full_djinn decode sends, run as the server runs it: one
  Device job of `run_ops` over the queued forward, `[:, -1]` and argmax of
  every step, then the fetch of the tokens;
- job_per_step: one Device job per step, as a loop that reads every token.

Runs are interleaved; each line reports per-token ms and the ratio to native
in the same round (median over rounds). With --profile, one more decode of
native and of server_ops runs under torch's profiler, and the operators
whose host time differs most between the two are listed (a decode of at most
10 tokens: the profiler's own work grows with every operator it records).

    python scripts/bench_executor.py [--model gpt2|DIR] [--device auto] [--runs 5] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from djinn import messages  # noqa: E402
from djinn.errors import UsageError  # noqa: E402
from djinn.modelfacts import ModelFacts  # noqa: E402
from djinn.net import codec  # noqa: E402
from djinn.net.codec import Ref, wire_value  # noqa: E402
from djinn.server.config import ServerConfig  # noqa: E402
from djinn.server.device import Device, Job, resolve_device  # noqa: E402
from djinn.server.inference import Batch, run_ops  # noqa: E402
from djinn.server.models import LoadedModel  # noqa: E402
from djinn.server.sessions import Session, SessionRegistry  # noqa: E402
from harness.exp2_1 import PRESETS, Local, build_model, decode, is_model, prompt_ids  # noqa: E402

PROFILED_TOKENS = 10


def job() -> Job:
    return Job("bench", max_s=3600.0)


def per_step_jobs(device: Device, model: Local, ids: torch.Tensor, new_tokens: int) -> None:
    async def run() -> None:
        def step(_: Job, token: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
            out = model(token, past_key_values=cache, use_cache=True)
            return out.logits[:, -1].argmax(-1, keepdim=True), out.past_key_values

        token, cache = await device.run(job(), step, ids, None)
        for _ in range(new_tokens - 1):
            token, cache = await device.run(job(), step, token, cache)

    asyncio.run(run())


def decode_ops(ids: torch.Tensor, new_tokens: int, device: Device) -> messages.Prelude:
    """The prelude RemoteModel sends for the experiment's loop under the full policy:
    per step a forward that keeps logits and cache on the server, then `logits[:, -1]`
    and `argmax(-1, keepdim=True)`; the tokens come back at the end."""
    numbers = itertools.count(1)
    ops: list[messages.Op] = []
    tokens: list[int] = []
    step_ids: Any = ids
    cache: Ref | None = None
    cache_id = next(numbers)
    for _ in range(new_tokens):
        logits = next(numbers)
        ops.append(
            messages.ForwardOp(
                input_ids=step_ids, cache=cache, out_logits=logits, out_cache=cache_id
            )
        )
        last, token = next(numbers), next(numbers)
        key = wire_value((Ref(logits), (slice(None), -1)))
        ops.append(messages.TensorOp("Tensor.__getitem__", key, {}, [last]))
        ops.append(
            messages.TensorOp(
                "Tensor.argmax", wire_value((Ref(last), -1)), {"keepdim": True}, [token]
            )
        )
        step_ids, cache = Ref(token), Ref(cache_id)
        tokens.append(token)
    prelude = messages.Prelude(ops=ops, fetch=[messages.Fetch(t) for t in tokens])
    control, buffers = codec.encode(prelude)
    received = []  # as the server receives it: in its receive pool (pinned on a GPU)
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        destination = device.receive_pool(view.nbytes)
        memoryview(destination).cast("B")[:] = view
        received.append(destination)
    return codec.decode(control, received, messages.Prelude)


def host_times(fn: Callable[[], object]) -> dict[str, tuple[int, float]]:
    """Per operator over one call of `fn` in this thread: (calls, self host ms); under
    "wall", the call's own time, which also holds the Python between operators."""
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    wall = (1, (time.perf_counter() - start) * 1e3)
    return {
        "wall": wall,
        **{e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()},
    }


def print_profile(
    native: dict[str, tuple[int, float]], server: dict[str, tuple[int, float]], tokens: int
) -> None:
    def ms(side: dict[str, tuple[int, float]], key: str) -> float:
        return side.get(key, (0, 0.0))[1]

    ops = (set(native) | set(server)) - {"wall"}
    heaviest = sorted(ops, key=lambda k: -ms(native, k))[:5]  # shown however they compare
    different = sorted(ops, key=lambda k: -abs(ms(server, k) - ms(native, k)))[:15]
    shown = [*different, *(k for k in heaviest if k not in different)]
    print(
        f"\nhost time per operator, one profiled decode of {tokens} tokens (the most "
        "different first, then the heaviest)"
    )
    print(f"{'operator':<36} {'native calls':>12} {'ms':>8} {'server_ops calls':>16} {'ms':>8}")
    for key in shown:
        (nc, nms), (sc, sms) = native.get(key, (0, 0.0)), server.get(key, (0, 0.0))
        print(f"{key[:36]:<36} {nc:>12} {nms:>8.2f} {sc:>16} {sms:>8.2f}")
    for name, values in (
        ("all operators", [sum(ms(side, k) for k in ops) for side in (native, server)]),
        ("wall, profiler included", [ms(native, "wall"), ms(server, "wall")]),
    ):
        print(f"{name:<36} {'':>12} {values[0]:>8.2f} {'':>16} {values[1]:>8.2f}")


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
    p.add_argument("--profile", action="store_true", help="also profile native against server_ops")
    args = p.parse_args(argv)
    if not is_model(args.model):
        p.error(f"--model must be one of {', '.join(PRESETS)} or a model folder")
    if min(args.runs, args.prompt_tokens, args.new_tokens) < 1:
        p.error("--runs, --prompt-tokens and --new-tokens must be >= 1")
    try:
        device = Device(str(resolve_device(args.device)), receive_budget=1 << 30, max_queued=4)
    except UsageError as exc:
        p.error(str(exc))
    built, tokenizer, _ = build_model(args.model, device.device, torch.float32, 0)
    model = Local(built)
    ids = prompt_ids(tokenizer, args.prompt_tokens, model.model.config.vocab_size)
    loaded = LoadedModel(
        "bench", built, 0, model.name, ModelFacts.of(built.config), torch.float32, True
    )
    session = Session(None, loaded, 1 << 40, SessionRegistry(ServerConfig()))
    n = args.new_tokens
    prelude = decode_ops(ids, n, device)
    ids = ids.to(device.device)
    plain_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def native() -> list[int]:
        with torch.inference_mode():
            return decode(model, ids, n)

    side = torch.cuda.Stream(device.device) if device.is_cuda else None

    def side_stream() -> None:
        with torch.cuda.stream(side):
            native()

    def run_prelude(job: Job, chosen: messages.Prelude) -> Batch:
        return run_ops(job, device, session, chosen, itertools.count(1 << 62), 512)

    def server_ops() -> list[int]:
        batch = asyncio.run(device.run(job(), run_prelude, prelude))
        return [int(batch.values[f.ref]) for f in prelude.fetch]

    # the timings still come out if not (they are what a device run is for), but it fails
    same_tokens = server_ops() == native()
    if not same_tokens:
        print("bench_executor: server_ops made other tokens than native", file=sys.stderr)
    ways: dict[str, Callable[[], object]] = {
        "native": native,
        "worker_thread": lambda: plain_thread.submit(native).result(),
        "one_job": lambda: asyncio.run(device.run(job(), lambda _, *a: decode(*a), model, ids, n)),
        "server_ops": server_ops,
        "job_per_step": lambda: per_step_jobs(device, model, ids, n),
    }
    if side is not None:
        ways["side_stream"] = side_stream
    times: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(args.runs + 1):
        for name, way in ways.items():
            if device.is_cuda:
                torch.cuda.synchronize(device.device)
            start = time.perf_counter()
            way()
            if device.is_cuda:
                torch.cuda.synchronize(device.device)
            if round_:  # the first round warms up
                times[name].append((time.perf_counter() - start) * 1e3 / n)
    print(f"{args.model} on {device.device}, {args.prompt_tokens}+{n} tokens, {args.runs} rounds")
    for name, ms in times.items():
        ratio = statistics.median(a / b for a, b in zip(ms, times["native"], strict=True))
        print(f"{name:>13}: {statistics.median(ms):8.2f} ms/token  {ratio:.3f}x native")
    if args.profile:  # a short decode: profiling the whole one takes longer than running it
        k = min(n, PROFILED_TOKENS)
        with torch.inference_mode():
            on_caller = host_times(lambda: decode(model, ids, k))
        short = decode_ops(ids.cpu(), k, device)
        profiled = asyncio.run(
            device.run(job(), lambda j: host_times(lambda: run_prelude(j, short)))
        )
        print_profile(on_caller, profiled, k)
    device.shutdown()
    plain_thread.shutdown()
    return 0 if same_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
