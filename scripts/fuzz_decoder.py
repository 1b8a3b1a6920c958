#!/usr/bin/env python3
"""Mutation fuzzer for the wire decoder: the only outcomes are messages or the protocol error.

Records valid frames of every kind djinn sends (the handshake's fixed
fields, requests with tensors, arrays and queued operations, replies,
errors, streamed tokens), then feeds the decoder mutations of them:

- bytes: flipped bits, replaced bytes, truncations, insertions, spliced
  frames, header fields and length-table entries set to extremes, each
  input fed whole and in random chunks;
- structure: control headers rebuilt with deep nesting (arrays, maps and
  tuple extensions), containers that announce huge counts, extensions with
  malformed payloads, values shared between fields, and the pickle attacks
  of the old wire format (memo references, shared containers, memo index
  bombs) in place of a header.

Every decoded frame's control header also goes through the message decoder
of its kind. Anything but a message or RemoteProtocolError, an input that
takes longer than SLOW_S, or a decoder that allocates past its limits is a
failure.

    python scripts/fuzz_decoder.py [--inputs 100000] [--seed 0]
"""

from __future__ import annotations

import argparse
import pickle
import random
import struct
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from djinn import messages  # noqa: E402
from djinn.errors import RemoteProtocolError  # noqa: E402
from djinn.net import codec  # noqa: E402
from djinn.net.codec import Ref, wire_value  # noqa: E402
from djinn.net.frame import NEED_DATA, Frame, FrameDecoder, FrameKind, Limits, encode_frame  # noqa: E402

# Small limits, so a mutated length cannot ask for much memory.
LIMITS = Limits(max_control=64 * 1024, max_buffers=16, max_buffer=1 << 20, max_frame=2 << 20)
SLOW_S = 0.5  # one input taking longer than this counts as a hang
# What each frame kind's control header decodes as.
KINDS: dict[FrameKind, Any] = {
    FrameKind.REQUEST: messages.Request,
    FrameKind.RESPONSE: messages.Reply,
    FrameKind.ERROR: messages.Failure,
    FrameKind.STREAM: messages.Streamed,
    FrameKind.WELCOME: messages.ServerInfo,
}


def corpus() -> list[bytes]:
    """Valid frames, as a client and a server would send them."""
    ops: list[messages.Op] = [
        messages.ForwardOp(input_ids=Ref(1), cache=Ref(2), out_logits=3),
        messages.TensorOp("Tensor.__getitem__", wire_value((Ref(3), (slice(None), -1))), {}, [5]),
        messages.TensorOp("Tensor.argmax", wire_value((Ref(5), -1)), {"keepdim": True}, [6]),
    ]
    spec = messages.ModelSpec(
        kind="transformers",
        cls="GPT2LMHeadModel",
        fingerprint="ab" * 32,
        manifest=[messages.TensorEntry("wte.weight", "float32", [10, 4])],
        config={"n_layer": 2, "nested": {"a": [1, 2]}},
    )
    bodies: list[tuple[FrameKind, messages.Message | bytes]] = [
        (FrameKind.HELLO, bytes(32)),
        (FrameKind.CHALLENGE, bytes(32) + b"\x01" + bytes(32)),
        (FrameKind.AUTH, bytes(32)),
        (FrameKind.WELCOME, messages.ServerInfo("0.1.0", 2, "cpu", "auto", False)),
        (FrameKind.REQUEST, messages.Ping()),
        (FrameKind.REQUEST, messages.Echo(torch.arange(12.0).reshape(3, 4))),
        (
            FrameKind.REQUEST,
            messages.Echo(wire_value({"a": np.arange(5), "b": (1, 2.5, "x", b"y" * 5000)})),
        ),
        (
            FrameKind.REQUEST,
            messages.Run("sid", messages.Prelude([1, 2], ops, [messages.Fetch(6)])),
        ),
        (FrameKind.REQUEST, messages.Register(spec)),
        (
            FrameKind.REQUEST,
            messages.Generate(
                "sid",
                messages.Prelude(),
                messages.GenerateArgs(
                    torch.ones(1, 3, dtype=torch.long), config={"max_new_tokens": 4}
                ),
            ),
        ),
        (FrameKind.RESPONSE, messages.Ran({4: torch.ones(2, dtype=torch.bfloat16)})),
        (
            FrameKind.RESPONSE,
            messages.Echoed(wire_value((torch.float16, torch.Size([2, 3]), slice(1, None), ...))),
        ),
        (FrameKind.ERROR, messages.Failure("usage", "cannot", "X", 0)),
        (FrameKind.STREAM, messages.Streamed(torch.tensor([3, 4]))),
    ]
    frames = []
    for i, (kind, body) in enumerate(bodies):
        buffers: list[memoryview] = []
        if isinstance(body, bytes):
            control = body
        else:
            control, buffers = codec.encode(body)
        frames.append(_wire(Frame(kind, i, control, buffers)))
    return frames


def _wire(frame: Frame) -> bytes:
    return b"".join(bytes(memoryview(b)) for b in encode_frame(frame, LIMITS))


# -- structure-aware control headers ------------------------------------------------------


def _ext(code: int, payload: bytes) -> bytes:
    return msgspec.msgpack.encode(msgspec.msgpack.Ext(code, payload))


def structured(rng: random.Random) -> bytes:
    """A REQUEST frame whose control header was built to stress the decoder."""
    depth = rng.choice([8, 31, 32, 33, 100, 1000, 20_000])
    choice = rng.randrange(9)
    if choice == 0:
        value = b"\x91" * depth + b"\xc0"  # nested arrays
    elif choice == 1:
        value = b"\x81\xa1k" * depth + b"\xc0"  # nested maps
    elif choice == 2:  # nested tuple extensions
        value = b"\xc0"
        for _ in range(min(depth, 2000)):
            value = _ext(1, b"\x91" + value)
    elif choice == 3:  # a container that announces far more items than it holds
        value = rng.choice([b"\xdd", b"\xdf"]) + rng.choice([2**32 - 1, 2**31, 70_000]).to_bytes(
            4, "big"
        )
    elif choice == 4:  # an extension with a malformed payload
        value = _ext(rng.randrange(1, 13), rng.randbytes(rng.randrange(0, 40)))
    elif choice == 5:  # many nodes, some shared-looking (the same bytes repeated)
        item = b"\x92\xa1a\x91\xc0"
        count = rng.choice([1000, 65_536, 70_000])
        value = b"\xdd" + count.to_bytes(4, "big") + item * count
    elif choice == 6:  # the old pickle attacks, in place of the whole header
        return _request(rng.choice(_PICKLES))
    elif choice == 7:  # a list used as a dict key, then hashing a deep one
        value = b"\x81" + b"\x91" * min(depth, 30) + b"\xc0" + b"\xc0"
    else:  # a tensor extension naming a buffer that is not there, or twice
        tensor = _ext(
            5, msgspec.msgpack.encode([rng.randrange(-1, 3), "float32", [rng.randrange(0, 2**40)]])
        )
        value = b"\x92" + tensor + tensor
    return _request(b"\x92\xa4echo" + value)


def _request(control: bytes) -> bytes:
    control = control[: LIMITS.max_control]
    return _wire(Frame(FrameKind.REQUEST, 7, control, []))


def _pickles() -> list[bytes]:
    """What broke the old pickle-based header: shared tuples under a dict key (2^depth
    hashing), nested lists shared through the memo, and a memo index bomb. Built as
    bytes: making the dict here would hash the key, which is the attack."""
    shared: Any = ()
    for _ in range(64):
        shared = (shared, shared)
    body = pickle.dumps(shared, protocol=2)[2:-1]  # the tuple's opcodes, no PROTO or STOP
    hash_bomb = b"\x80\x02}q\x00" + body + b"K\x01s."  # {shared: 1}
    deep: Any = []
    for _ in range(64):
        deep = [deep, deep]
    memo_bomb = b"\x80\x05}\x8c\x06seorver" + b"r" + (680_820_116).to_bytes(4, "little") + b"."
    return [hash_bomb, pickle.dumps(("echo", (deep,)), protocol=5), memo_bomb]


_PICKLES = _pickles()


# -- byte-level mutations ---------------------------------------------------------------


def mutate(rng: random.Random, frames: list[bytes]) -> bytes:
    if rng.random() < 0.2:
        return structured(rng)
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
            offset, fmt = rng.choice([(4, "B"), (5, "B"), (6, "H"), (8, "Q"), (16, "I"), (20, "I")])
            top = 2 ** (8 * struct.calcsize(fmt))
            extreme = rng.choice([0, 1, top - 1, rng.randrange(top)])
            struct.pack_into("!" + fmt, data, offset, extreme)
        elif choice == 6 and len(data) > 24:  # a length-table entry at an extreme
            i = 24 + rng.randrange(max(1, len(data) - 32))
            struct.pack_into(
                "!Q", data, min(i, len(data) - 8), rng.choice([0, 1 << 20, (1 << 64) - 1])
            )
    return bytes(data)


def feed(data: bytes, chunks: list[int]) -> tuple[int, int]:
    """Decode `data` split at `chunks`; returns (frames, messages) decoded. Raises only
    RemoteProtocolError."""
    allocated = [0]

    def allocate(n: int) -> bytearray:
        allocated[0] += n
        if allocated[0] > LIMITS.max_frame:
            raise AssertionError(f"decoder allocated {allocated[0]} bytes past its frame limit")
        return bytearray(n)

    decoder = FrameDecoder(allocate, LIMITS)
    frames = decoded = 0
    for lo, hi in zip([0, *chunks], [*chunks, len(data)], strict=True):
        decoder.receive_data(data[lo:hi])
        while (frame := decoder.next_frame()) is not NEED_DATA:
            assert isinstance(frame, Frame)
            allocated[0] = 0
            frames += 1
            kind = KINDS.get(frame.kind)
            if kind is not None:
                try:
                    codec.decode(frame.control, frame.buffers, kind)
                    decoded += 1
                except RemoteProtocolError:
                    pass
    return frames, decoded


def fuzz(inputs: int, seed: int) -> dict[str, float]:
    """Run `inputs` mutated inputs; raises AssertionError on the first bad outcome."""
    rng = random.Random(seed)
    frames = corpus()
    outcomes: dict[str, float] = {
        "inputs": 0,
        "frames": 0,
        "messages": 0,
        "protocol_errors": 0,
        "slowest_s": 0.0,
    }
    for _ in range(inputs):
        data = mutate(rng, frames)
        chunks = (
            sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 6))))
            if len(data) > 1
            else []
        )
        start = time.perf_counter()
        try:
            got_frames, got_messages = feed(data, chunks)
            outcomes["frames"] += got_frames
            outcomes["messages"] += got_messages
        except RemoteProtocolError:
            outcomes["protocol_errors"] += 1
        except Exception as exc:
            raise AssertionError(
                f"input {data[:64]!r}... raised {type(exc).__name__}: {exc}"
            ) from exc
        took = time.perf_counter() - start
        outcomes["slowest_s"] = max(outcomes["slowest_s"], took)
        if took > SLOW_S:
            raise AssertionError(f"input {data[:64]!r}... took {took:.2f}s")
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
        f"{outcomes['inputs']:.0f} inputs in {took:.1f}s: {outcomes['frames']:.0f} frames and "
        f"{outcomes['messages']:.0f} messages decoded, {outcomes['protocol_errors']:.0f} protocol "
        f"errors, nothing else; slowest input {outcomes['slowest_s'] * 1e3:.1f} ms "
        f"(bound {SLOW_S * 1e3:.0f} ms)"
    )


if __name__ == "__main__":
    main()
