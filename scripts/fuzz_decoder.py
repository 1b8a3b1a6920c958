#!/usr/bin/env python3
"""Mutation fuzzer for the wire decoder: the only outcomes are frames or the protocol error.

Records valid frames of every kind djinn sends (handshakes, requests with
tensors and arrays, replies, errors), then feeds the decoder mutations of
them: flipped bits, replaced bytes, truncations, insertions, spliced frames,
and header fields set to extremes, each input fed whole and in random
chunks. Every decoded frame's control header also goes through the message
decoder. Anything but a frame or RemoteProtocolError, an input that takes
too long, or a decoder that allocates past its limits is a failure.

    python scripts/fuzz_decoder.py [--inputs 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from djinn.errors import RemoteProtocolError  # noqa: E402
from djinn.net import payload  # noqa: E402
from djinn.net.frame import NEED_DATA, Frame, FrameDecoder, FrameKind, Limits, encode_frame  # noqa: E402
from djinn.net.payload import Ref  # noqa: E402

# Small limits, so a mutated length cannot ask for much memory.
LIMITS = Limits(max_control=64 * 1024, max_buffers=16, max_buffer=1 << 20, max_frame=2 << 20)
SLOW_S = 0.5  # one input taking longer than this counts as a hang


def corpus() -> list[bytes]:
    """Valid frames, as a client and a server would send them."""
    messages: list[tuple[FrameKind, Any]] = [
        (FrameKind.HELLO, {"nonce": bytes(32)}),
        (FrameKind.CHALLENGE, {"nonce": bytes(32), "auth": True, "proof": bytes(32)}),
        (FrameKind.AUTH, {"proof": None}),
        (FrameKind.WELCOME, {"server": {"version": "0.1.0", "device": "cpu"}}),
        (FrameKind.REQUEST, ("ping", ())),
        (FrameKind.REQUEST, ("echo", (torch.arange(12.0).reshape(3, 4),))),
        (FrameKind.REQUEST, ("echo", ({"a": np.arange(5), "b": [1, 2.5, "x", b"y" * 5000]},))),
        (
            FrameKind.REQUEST,
            (
                "run",
                ("sid", ([1, 2], [("op", "Tensor.softmax", (Ref(3), -1), {}, [4], False)]), [4]),
            ),
        ),
        (FrameKind.RESPONSE, ({4: torch.ones(2, dtype=torch.bfloat16)}, {})),
        (FrameKind.RESPONSE, (torch.float16, torch.Size([2, 3]), slice(1, None), ...)),
        (
            FrameKind.ERROR,
            {"code": "usage", "message": "cannot", "type": "X", "traceback": "", "op": 0},
        ),
    ]
    frames = []
    for i, (kind, message) in enumerate(messages):
        control, buffers = payload.dumps(message)
        frames.append(
            b"".join(
                bytes(memoryview(b)) for b in encode_frame(Frame(kind, i, control, buffers), LIMITS)
            )
        )
    return frames


def mutate(rng: random.Random, frames: list[bytes]) -> bytes:
    data = bytearray(rng.choice(frames))
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(7)
        if choice == 0 and data:  # flip a bit
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and data:  # replace a byte
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif choice == 2 and data:  # truncate
            del data[rng.randrange(len(data)) :]
        elif choice == 3:  # insert random bytes
            i = rng.randrange(len(data) + 1)
            data[i:i] = rng.randbytes(rng.randint(1, 16))
        elif choice == 4:  # splice in another frame
            data += rng.choice(frames)
        elif choice == 5 and len(data) >= 24:  # a header field at an extreme
            field = rng.choice([(4, "B"), (5, "B"), (6, "H"), (8, "Q"), (16, "I"), (20, "I")])
            offset, fmt = field
            extreme = rng.choice(
                [
                    0,
                    1,
                    2 ** (8 * struct.calcsize(fmt)) - 1,
                    rng.randrange(2 ** (8 * struct.calcsize(fmt))),
                ]
            )
            struct.pack_into("!" + fmt, data, offset, extreme)
        elif choice == 6 and len(data) > 24:  # a length-table entry at an extreme
            i = 24 + rng.randrange(max(1, len(data) - 32))
            struct.pack_into(
                "!Q", data, min(i, len(data) - 8), rng.choice([0, 1 << 20, (1 << 64) - 1])
            )
    return bytes(data)


def feed(data: bytes, chunks: list[int]) -> int:
    """Decode `data` split at `chunks`; returns frames decoded. Raises only RemoteProtocolError."""
    allocated = [0]

    def allocate(n: int) -> bytearray:
        allocated[0] += n
        if allocated[0] > LIMITS.max_frame:
            raise AssertionError(f"decoder allocated {allocated[0]} bytes past its frame limit")
        return bytearray(n)

    decoder = FrameDecoder(allocate, LIMITS)
    frames = 0
    for lo, hi in zip([0, *chunks], [*chunks, len(data)], strict=True):
        decoder.receive_data(data[lo:hi])
        while (frame := decoder.next_frame()) is not NEED_DATA:
            assert isinstance(frame, Frame)
            allocated[0] = 0
            frames += 1
            with contextlib.suppress(RemoteProtocolError):
                payload.loads(frame.control, frame.buffers)
    return frames


def fuzz(inputs: int, seed: int) -> dict[str, int]:
    """Run `inputs` mutated inputs; raises AssertionError on the first bad outcome."""
    rng = random.Random(seed)
    frames = corpus()
    outcomes = {"inputs": 0, "frames": 0, "protocol_errors": 0}
    for _ in range(inputs):
        data = mutate(rng, frames)
        chunks = (
            sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
            if len(data) > 1
            else []
        )
        start = time.perf_counter()
        try:
            outcomes["frames"] += feed(data, chunks)
        except RemoteProtocolError:
            outcomes["protocol_errors"] += 1
        except Exception as exc:
            raise AssertionError(
                f"input {data[:64]!r}... raised {type(exc).__name__}: {exc}"
            ) from exc
        if time.perf_counter() - start > SLOW_S:
            raise AssertionError(f"input {data[:64]!r}... took {time.perf_counter() - start:.2f}s")
        outcomes["inputs"] += 1
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    outcomes = fuzz(args.inputs, args.seed)
    took = time.perf_counter() - start
    print(f"command: {' '.join(sys.argv)}")
    print(
        f"{outcomes['inputs']} inputs in {took:.1f}s: {outcomes['frames']} frames decoded, "
        f"{outcomes['protocol_errors']} protocol errors, nothing else"
    )


if __name__ == "__main__":
    main()
