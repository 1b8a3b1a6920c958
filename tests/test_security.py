"""A hostile client cannot freeze, starve, out-allocate or run code on the server.

One section per class of attack found in review; each test runs the attack
against a live server on loopback and checks that it is refused with a
typed error, in bounded time, and that other clients carry on.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import torch

import djinn
from djinn import RemoteModel, RemoteTensor, messages
from djinn.errors import (
    ConnectionLostError,
    LimitExceededError,
    QuotaExceededError,
    RemoteCodeRefusedError,
    RemoteUsageError,
    ServerBusyError,
    StoreCorruptError,
    UsageError,
)
from djinn.net.codec import wire_value
from djinn.net.frame import MAGIC, PROTOCOL_VERSION, FrameKind
from djinn.server.sessions import REF_OVERHEAD_BYTES
from harness.server import ServerProcess
from tests.helpers import RawPeer, eventually
from tests.models import VOCAB, prompt, tiny_gpt2

pytestmark = pytest.mark.timeout(120)
MIB = 2**20


def serves(address: str) -> bool:
    with djinn.connect(address, timeout=10) as other:
        return other.ping() < 1.0


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with small limits, so that each attack meets one quickly."""
    store = tmp_path_factory.mktemp("store")
    args = ["--store", str(store), "--device", "cpu", "--log-level", "INFO"]
    args += ["--session-quota", "0.0625", "--receive-budget", "0.0625", "--frame-timeout", "1"]
    args += ["--max-sessions-per-connection", "3", "--max-call-seconds", "3"]
    args += ["--max-generate-tokens", "4096", "--max-ops-per-call", "600"]
    with ServerProcess(*args) as proc:
        yield proc


@pytest.fixture
def rm(tight: ServerProcess) -> Iterator[RemoteModel]:
    with RemoteModel(tiny_gpt2(), tight.address) as model:
        yield model


# -- 1. decoding: linear time, before and after authentication ---------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"\x91" * 20_000 + b"\xc0",
        b"\x81\xa1k" * 20_000 + b"\xc0",
        b"\xdd" + (2**32 - 1).to_bytes(4, "big"),
    ],
    ids=["deep-lists", "deep-maps", "huge-count"],
)
def test_structured_values_after_auth_are_refused_at_once(
    tight: ServerProcess, value: bytes
) -> None:
    peer = RawPeer(tight.address)
    peer.handshake()
    for request_id, control in enumerate(
        (
            b"\x92\xa4echo" + value,  # an echo
            b"\x93\xa3run\xa3sid\x93" + value + b"\x90\x90",  # a session call's prelude
        ),
        start=1,
    ):
        start = time.perf_counter()
        peer.send_frame(FrameKind.REQUEST, control, request_id=request_id)
        failure = peer.failure()
        assert failure.code == "protocol" and time.perf_counter() - start < 1.0
    assert serves(tight.address)


def test_a_nested_config_in_a_registration_is_refused(tight: ServerProcess) -> None:
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with djinn.connect(tight.address) as client:
        with pytest.raises(ValueError, match="deeper"):  # the client will not even build it
            messages.ModelSpec("transformers", "GPT2LMHeadModel", "ab" * 32, [], config={"x": deep})
        peer = RawPeer(tight.address)
        peer.handshake()
        nested = b"\x91" * 40 + b"\x01"
        control = b"\x92\xa8register\x98\xactransformers\xafGPT2LMHeadModel\xd9\x40" + b"ab" * 32
        control += b"\x90\x90\x81\xa1x" + nested + b"\xc0\xc0"
        peer.send_frame(FrameKind.REQUEST, control, request_id=9)
        assert peer.failure().code == "protocol"
        assert client.ping() < 1.0


# -- 2. code from the store ----------------------------------------------------------------------


def test_a_session_takes_only_fingerprints_and_names_and_leaks_no_paths(
    tight: ServerProcess, tmp_path: Path
) -> None:
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "djinn.json").write_text(json.dumps({"kind": "pickle"}))
    with djinn.connect(tight.address) as client:
        said = []
        for model in (str(tmp_path / "evil"), "/nonexistent/path", "../" * 10 + "etc"):
            with pytest.raises(RemoteUsageError) as caught:
                client.request(messages.OpenSession(model), messages.SessionOpened)
            said.append(str(caught.value).replace(model[:80], "X"))
        assert len(set(said)) == 1  # the same words whether the path exists or not
        assert "neither a fingerprint nor a name" in said[0]


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def test_pickled_code_stored_by_a_trusted_run_does_not_load_on_an_untrusted_one(
    tmp_path: Path,
) -> None:
    store = str(tmp_path / "store")
    trusted = ("--store", store, "--device", "cpu", "--trust-remote-code", "--token", "t")
    module = _Mlp()
    with ServerProcess(*trusted) as proc, RemoteModel(module, proc.address, token="t") as rm:
        fingerprint = rm.fingerprint
        assert rm.uploaded_bytes > 0
    with (
        ServerProcess("--store", store, "--device", "cpu") as proc,
        djinn.connect(proc.address) as client,
    ):
        with pytest.raises(RemoteCodeRefusedError, match="--trust-remote-code"):
            client.request(messages.OpenSession(fingerprint), messages.SessionOpened)
        with pytest.raises(RemoteCodeRefusedError):
            RemoteModel(module, client)


# -- 3. index checks -----------------------------------------------------------------------------


def test_index_forms_that_skipped_the_checks_are_refused(rm: RemoteModel) -> None:
    logits = rm(prompt(length=4), use_cache=False).logits
    rm.synchronize()  # the forged calls below go around the session's queue
    client = rm.client
    far = torch.tensor([[VOCAB * 10]])
    forged = [
        # gather with dim as a 0-dim tensor
        messages.TensorOp(
            "torch.gather", wire_value((logits.ref, torch.tensor(2), far[None])), {}, [990]
        ),
        messages.TensorOp(
            "Tensor.index_select", wire_value((logits.ref, torch.tensor(2), far[0])), {}, [991]
        ),
    ]
    for op in forged:
        run = messages.Run(rm.session.id, messages.Prelude(ops=[op]))
        with pytest.raises(RemoteUsageError, match="dim must be an int"):
            client.request(run, messages.Ran)
    with pytest.raises(UsageError, match="range"):
        logits[:, range(3)].cpu()
    # a mask a queued operation made, out of 0/1: flagged on the device, refused at the batch's end
    mask = (torch.ones(1, 4, dtype=torch.long) + logits[:, :, 0].argmax(-1, keepdim=True) * 0) * 500
    with pytest.raises(RemoteUsageError, match="0s and 1s"):
        rm(prompt(length=4), attention_mask=mask, use_cache=False).logits.cpu()
    assert rm.generate(prompt(), max_new_tokens=2).shape == (1, 14)


# -- 4. budgets before bytes ----------------------------------------------------------------------


def test_queued_work_past_the_quota_is_refused_before_it_allocates(
    tight: ServerProcess, rm: RemoteModel
) -> None:
    process = psutil.Process(tight.pid)
    logits = rm(prompt(length=16), use_cache=False).logits  # [1, 16, 2000], 128 KB
    rm.synchronize()
    before = process.memory_info().rss
    attacks = [
        lambda: logits.expand(4096, 16, 2000).contiguous(),  # 500 MB from a view
        lambda: logits.repeat(4096, 1, 1),
        lambda: torch.outer(logits.reshape(-1), logits.reshape(-1)),
        lambda: logits.expand(512, 16, 2000).cumsum(0),
    ]
    for attack in attacks:
        with pytest.raises(QuotaExceededError, match="--session-quota"):
            attack().sum().item()
    assert process.memory_info().rss - before < 64 * MIB
    assert rm.generate(prompt(), max_new_tokens=2).shape == (1, 14)


def test_a_view_is_charged_for_the_storage_it_keeps(tight: ServerProcess, rm: RemoteModel) -> None:
    logits = rm(prompt(length=16), use_cache=False).logits
    big = logits.repeat(100, 1, 1)  # 12.8 MB
    corner = big[:1, :1, :1]  # 4 bytes of view, 12.8 MB kept alive
    rm.synchronize()
    with djinn.connect(tight.address) as observer:
        del big
        rm.synchronize()
        resident = observer.server_stats()["resident_bytes"]
        assert resident >= 100 * logits.nbytes
        del corner
        rm.synchronize()
        assert observer.server_stats()["resident_bytes"] < resident - 90 * logits.nbytes


def test_out_arguments_are_refused(rm: RemoteModel) -> None:
    logits = rm(prompt(length=4), use_cache=False).logits
    rm.synchronize()
    op = messages.TensorOp("torch.add", wire_value((logits.ref, 1)), {"out": logits.ref}, [992])
    with pytest.raises(RemoteUsageError, match="out="):
        rm.client.request(messages.Run(rm.session.id, messages.Prelude(ops=[op])), messages.Ran)


def test_a_config_that_builds_more_than_its_manifest_is_refused_without_allocating(
    tight: ServerProcess,
) -> None:
    from djinn.registration import describe

    model = tiny_gpt2(seed=21)
    spec, tensors = describe(model)
    assert spec.config is not None
    config = {**spec.config, "vocab_size": 2**23}  # 2 GiB of embeddings the upload lacks
    forged = messages.ModelSpec(
        spec.kind, spec.cls, spec.fingerprint, spec.manifest, spec.aliases, config, None, None
    )
    import msgspec

    from djinn.fingerprint import fingerprint

    forged = msgspec.structs.replace(forged, fingerprint=fingerprint(forged, tensors))
    process = psutil.Process(tight.pid)
    before = process.memory_info().rss
    with djinn.connect(tight.address) as client:
        for _ in range(2):  # and again: nothing bad was kept
            reply = client.request(messages.Register(forged), messages.Registered)
            assert reply.status == "upload"
            names = [e.name for e in forged.manifest]
            client.request(
                messages.Upload(forged.fingerprint, 0, wire_value([tensors[n] for n in names])),
                messages.Done,
            )
            with pytest.raises(RemoteUsageError, match="the upload holds"):
                client.request(messages.Commit(forged.fingerprint), messages.Registered)
    assert process.memory_info().rss - before < 256 * MIB


def test_forward_outputs_and_generate_caches_count_against_the_quota(rm: RemoteModel) -> None:
    kept = []
    with pytest.raises(QuotaExceededError, match="--session-quota"):
        for _ in range(60):  # logits of 200 x 2000 floats and a cache: 1.8 MB a call
            kept.append(rm(prompt(length=200)))
            rm.synchronize()
    assert 30 <= len(kept) <= 40  # refused where 64 MiB runs out, not before
    del kept
    with pytest.raises((QuotaExceededError, LimitExceededError, UsageError)):
        rm.generate(prompt(batch=64), max_new_tokens=200, do_sample=False)


# -- 5. bounded work and fairness --------------------------------------------------------------


def test_per_call_limits_name_their_flags(rm: RemoteModel) -> None:
    ops = [messages.TensorOp("torch.zeros", wire_value((1,)), {}, [5000 + i]) for i in range(601)]
    with pytest.raises(LimitExceededError, match="--max-ops-per-call"):
        rm.client.request(messages.Run(rm.session.id, messages.Prelude(ops=ops)), messages.Ran)
    with pytest.raises(LimitExceededError, match="--max-generate-tokens"):
        rm.generate(prompt(batch=40), max_new_tokens=200)
    logits = rm(prompt(length=200), use_cache=False).logits
    slow = logits[0].repeat(10, 1)[:2000]  # [2000, 2000]
    for _ in range(120):  # 16 GFLOP each, over 3 s on any CPU; 243 ops queue as one call
        slow = (slow @ slow) * 1e-3
    start = time.monotonic()
    with pytest.raises(LimitExceededError, match="--max-call-seconds"):
        slow.sum().item()
    assert time.monotonic() - start < 10  # stopped between operations, not at the end
    assert rm.generate(prompt(), max_new_tokens=2).shape == (1, 14)


def test_work_stops_when_its_connection_closes(tight: ServerProcess) -> None:
    model = tiny_gpt2()
    client = djinn.connect(tight.address, timeout=60)
    rm = RemoteModel(model, client)
    worker = threading.Thread(
        target=lambda: _swallow(lambda: rm.generate(prompt(batch=4), max_new_tokens=240)),
        daemon=True,
    )
    with djinn.connect(tight.address) as observer:
        worker.start()
        assert eventually(lambda: observer.server_stats()["queued_calls"] > 0)
        client.close()
        assert eventually(lambda: observer.server_stats()["queued_calls"] == 0, seconds=3)
    worker.join(10)


def _swallow(fn: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):
        fn()


def test_a_long_generate_does_not_hold_the_device_from_others(tight: ServerProcess) -> None:
    _steps_beside_a_generate(tight.address)


def test_without_batching_too(tmp_path: Path) -> None:
    """The serial path gives the turn up between a generate's steps as the batcher does."""
    args = ("--store", str(tmp_path), "--device", "cpu", "--batching", "off")
    with ServerProcess(*args, "--log-level", "WARNING") as server:
        _steps_beside_a_generate(server.address)


def _steps_beside_a_generate(address: str) -> None:
    model = tiny_gpt2()
    with RemoteModel(model, address) as hog, RemoteModel(model, address) as other:
        worker = threading.Thread(
            target=lambda: hog.generate(prompt(batch=8), max_new_tokens=240, do_sample=False)
        )
        worker.start()
        out = other(prompt())
        steps = []
        for _ in range(20):
            start = time.perf_counter()
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            token.item()
            out = other(token, past_key_values=out.past_key_values)
            steps.append(time.perf_counter() - start)
        busy = worker.is_alive()
        worker.join(60)
    assert busy, "the generate ended before the other client's steps: nothing was tested"
    assert max(steps) < 0.5, f"a step waited {max(steps):.2f}s behind the generate"


# -- 6. no client starves the others ---------------------------------------------------------------


def _announce(address: str, nbytes: int) -> socket.socket:
    """Authenticate, then announce a frame of `nbytes` of payload and send almost none."""
    peer = RawPeer(address)
    peer.handshake()
    header = struct.pack("!4sBBHQII", MAGIC, PROTOCOL_VERSION, FrameKind.REQUEST, 0, 1, 1, 1)
    peer.send_raw(header + b"\xc0" + struct.pack("!Q", nbytes) + b"\0" * 1024)
    return peer.sock


def test_a_frame_that_never_completes_is_dropped_and_its_buffer_freed(tight: ServerProcess) -> None:
    with djinn.connect(tight.address) as observer:
        sock = _announce(tight.address, 8 * MIB)  # deadline: 1 s + 1 s per 8 MB
        assert eventually(lambda: observer.server_stats()["receive_in_use_bytes"] > 0, seconds=2)
        assert eventually(lambda: observer.server_stats()["receive_in_use_bytes"] == 0, seconds=8)
        sock.settimeout(2)
        assert sock.recv(65536) in (b"",) or True  # closed (reset or EOF)
        assert observer.ping() < 1.0


def test_one_connection_holds_at_most_its_share_of_the_receive_budget(tight: ServerProcess) -> None:
    hog = _announce(tight.address, 40 * MIB)  # more than half of the 64 MiB budget
    hog.settimeout(5)
    data = b""
    with contextlib.suppress(OSError):
        data = hog.recv(65536)
    assert b"share" in data or data == b""  # refused
    with djinn.connect(tight.address) as other:
        assert other.echo(torch.ones(4 * MIB // 4)).sum() == MIB  # 4 MiB fits


def test_one_connection_cannot_open_every_session(tight: ServerProcess) -> None:
    with djinn.connect(tight.address) as client:
        for _ in range(3):
            client.request(messages.OpenSession(None), messages.SessionOpened)
        with pytest.raises(ServerBusyError, match="this connection"):
            client.request(messages.OpenSession(None), messages.SessionOpened)
    with djinn.connect(tight.address) as other:
        other.request(messages.OpenSession(None), messages.SessionOpened)


def test_connections_past_the_limit_are_refused_clearly(tmp_path: Path) -> None:
    args = ("--store", str(tmp_path), "--device", "cpu", "--max-connections", "2")
    with ServerProcess(*args) as proc:
        first, second = djinn.connect(proc.address), djinn.connect(proc.address)
        with pytest.raises(ServerBusyError, match="--max-connections"):
            djinn.connect(proc.address)
        second.close()
        assert eventually(lambda: _connects(proc.address))
        first.close()


def _connects(address: str) -> bool:
    try:
        djinn.connect(address).close()
    except (ServerBusyError, ConnectionLostError):
        return False
    return True


def test_every_reference_is_charged_its_bookkeeping(tight: ServerProcess, rm: RemoteModel) -> None:
    logits = rm(prompt(length=4), use_cache=False).logits
    views = [logits[:, :0] for _ in range(500)]  # empty views: no storage of their own
    rm.synchronize()
    with djinn.connect(tight.address) as observer:
        assert observer.server_stats()["resident_bytes"] >= 500 * REF_OVERHEAD_BYTES
    del views


# -- 7. store integrity ---------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip", "truncate", "kind"])
def test_a_damaged_store_entry_is_quarantined_and_uploaded_again(
    tmp_path: Path, damage: str
) -> None:
    """Opening a damaged entry by fingerprint is a typed error; registering the model
    uploads it again at once. A djinn.json naming a kind djinn does not load is damage
    too (it must not reach the pickle loader's branch)."""
    store = tmp_path / "store"
    args = ("--store", str(store), "--device", "cpu")
    model = tiny_gpt2(seed=31)
    ids = prompt()
    with ServerProcess(*args) as proc, RemoteModel(model, proc.address) as rm:
        expected = rm.generate(ids, max_new_tokens=6)
    entry = store / rm.fingerprint
    [shard] = entry.glob("model-*.safetensors")
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x10
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        meta = json.loads((entry / "djinn.json").read_text())
        (entry / "djinn.json").write_text(json.dumps({**meta, "kind": "other"}))
    shard.write_bytes(bytes(data))
    with ServerProcess(*args) as proc:
        if damage == "flip":
            with (
                djinn.connect(proc.address) as client,
                pytest.raises(StoreCorruptError, match="register the model again"),
            ):
                client.request(messages.OpenSession(rm.fingerprint), messages.SessionOpened)
        with RemoteModel(model, proc.address) as again:
            assert again.uploaded_bytes > 0
            assert torch.equal(again.generate(ids, max_new_tokens=6), expected)
        assert any(p.name.startswith(".quarantine-") for p in store.iterdir())


def test_user_errors_are_logged_one_line_each_and_rate_limited(
    tight: ServerProcess, rm: RemoteModel
) -> None:
    logits = rm(prompt(length=4), use_cache=False).logits
    rm.synchronize()
    time.sleep(10.5)  # the log's window of earlier tests' failures is over
    before = len(tight.lines)
    bad = messages.TensorOp("Tensor.reshape", wire_value((logits.ref, 7, 3)), {}, [993])
    for _ in range(60):  # forged: the client's own shape check would stop these first
        with pytest.raises(RemoteUsageError, match="invalid for input"):
            rm.client.request(
                messages.Run(rm.session.id, messages.Prelude(ops=[bad])), messages.Ran
            )
    time.sleep(0.5)  # the server's last lines reach its output
    lines = [line for line in list(tight.lines)[before:] if "call failed" in line]
    assert 1 <= len(lines) <= 20, lines
    assert not any("Traceback" in line for line in tight.lines)


def test_unexpected_errors_reach_the_client_without_traceback_or_paths(
    tight: ServerProcess,
) -> None:
    with djinn.connect(tight.address) as client:
        # a cache reference that is not a cache, handed to generate: the server's own code
        # fails in an unexpected way, and the client only learns an incident id
        session = client.request(messages.OpenSession(None), messages.SessionOpened).session
        run = messages.Run(session, messages.Prelude(ops=[messages.ForwardOp(input_ids=prompt())]))
        with pytest.raises(RemoteUsageError) as caught:
            client.request(run, messages.Ran)
        assert "/" not in str(caught.value) and "Traceback" not in str(caught.value)


# -- the queue limit -------------------------------------------------------------------------


def test_a_chain_of_a_thousand_queued_operations(tight: ServerProcess) -> None:
    with RemoteModel(tiny_gpt2(), tight.address) as model:
        x = model(prompt(length=2), use_cache=False).logits[:, -1, :8]
        for _ in range(1000):
            x = x + 1
        assert isinstance(x, RemoteTensor)
        assert x.shape == (1, 8)
        local = tiny_gpt2()(prompt(length=2)).logits[:, -1, :8].detach() + 1000
        torch.testing.assert_close(x.cpu(), local, rtol=1e-4, atol=1e-3)
