"""RemoteModel end to end against a real server process: parity, bytes per step, lifecycles."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import djinn
from djinn import RemoteModel, RemoteTensor, messages
from djinn.errors import (
    LostReferenceError,
    RemoteCodeRefusedError,
    RemoteUsageError,
    UsageError,
)
from djinn.semantics import Decision, Lifecycle
from djinn.tensor import RemoteCache
from harness.server import ServerProcess
from tests.models import BUILDERS, VOCAB, prompt, tiny_gpt2

pytestmark = pytest.mark.timeout(120)
POLICIES = ["full", "semantic_blind", "partially_aware"]


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    return {name: build() for name, build in BUILDERS.items()}


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of this test's own, with an empty store."""
    with ServerProcess("--store", str(tmp_path / "store"), "--device", "cpu") as proc:
        yield proc


def local_generate(model: torch.nn.Module, ids: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False)  # type: ignore[operator]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_greedy_generate_matches_local(
    server: ServerProcess, models: dict[str, torch.nn.Module], arch: str, policy: str
) -> None:
    model = models[arch]
    ids = prompt(batch=2)
    expected = local_generate(model, ids, 24)
    with RemoteModel(model, server.address, policy=policy) as rm:
        assert torch.equal(rm.generate(ids, max_new_tokens=24), expected)


@pytest.mark.parametrize("policy", POLICIES)
def test_user_written_decode_loop_matches_local(
    server: ServerProcess, models: dict[str, torch.nn.Module], policy: str
) -> None:
    model = models["gpt2"]
    ids = prompt()
    expected = local_generate(model, ids, 12)
    with RemoteModel(model, server.address, policy=policy) as rm:
        tokens, cache, step = ids, None, ids
        for _ in range(12):
            out = rm(step, past_key_values=cache, use_cache=True)
            logits = out.logits.cpu() if isinstance(out.logits, RemoteTensor) else out.logits
            step = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step], dim=-1)
            cache = out.past_key_values
    assert torch.equal(tokens, expected)


def _step_bytes(rm: RemoteModel, ids: torch.Tensor, steps: int) -> tuple[list[int], list[int]]:
    """Bytes each way of a decode step that reads its token, as a streaming loop does."""
    out = rm(ids)
    cache = out.past_key_values
    token = out.logits[:, -1].argmax(-1, keepdim=True).cpu()
    sent, received = [], []
    for _ in range(steps):
        before = rm.stats()
        out = rm(token, past_key_values=cache)
        token = out.logits[:, -1].argmax(-1, keepdim=True).cpu()
        after = rm.stats()
        sent.append(after["bytes_sent"] - before["bytes_sent"])
        received.append(after["bytes_received"] - before["bytes_received"])
        cache = out.past_key_values
    return sent, received


def test_full_policy_decode_step_moves_a_few_hundred_bytes(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    with RemoteModel(models["gpt2"], server.address, policy="full") as rm:
        sent, received = _step_bytes(rm, prompt(length=40), steps=10)
    assert max(sent) < 400 and max(received) < 200, (sent, received)


def test_blind_policy_ships_the_whole_cache_both_ways(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    model = models["gpt2"]
    config = model.config
    with RemoteModel(model, server.address, policy="semantic_blind") as rm:
        sent, received = _step_bytes(rm, prompt(length=40), steps=5)
    for i, (s, r) in enumerate(zip(sent, received, strict=True)):
        cached = 40 + i  # tokens in the cache sent with step i
        kv = 2 * config.n_layer * cached * config.n_embd * 4
        assert s >= kv and r >= kv + 2 * config.n_layer * config.n_embd * 4 + VOCAB * 4


def test_partially_aware_ships_only_the_last_logits_row_and_truncates_nothing(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    ids = prompt(length=30)
    with (
        RemoteModel(models["gpt2"], server.address, policy="partially_aware") as partial,
        RemoteModel(models["gpt2"], server.address, policy="semantic_blind") as blind,
    ):
        p, b = partial(ids), blind(ids)
        assert isinstance(p.logits, RemoteTensor) and isinstance(b.logits, torch.Tensor)
        assert p.logits.shape == b.logits.shape == (1, 30, VOCAB)
        received = partial.stats()["bytes_received"]
        last = p.logits[:, -1]  # came back with the forward: no round trip
        assert isinstance(last, torch.Tensor) and torch.equal(last, b.logits[:, -1])
        assert partial.stats()["bytes_received"] == received
        assert received <= blind.stats()["bytes_received"] - 29 * VOCAB * 4
        torch.testing.assert_close(p.logits.cpu(), b.logits)  # the rest is still there


def test_full_policy_keeps_logits_and_cache_on_the_server(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    model = models["gpt2"]
    ids = prompt(length=20)
    with RemoteModel(model, server.address) as rm:
        out = rm(ids)
        assert isinstance(out.logits, RemoteTensor) and isinstance(out.past_key_values, RemoteCache)
        assert out.cache is out.past_key_values
        received = rm.stats()["bytes_received"]
        assert out.logits.shape == (1, 20, VOCAB) and out.logits.dtype == torch.float32
        assert out.past_key_values.get_seq_length() == 20
        assert rm.stats()["bytes_received"] == received  # shape, dtype and length cost nothing
        with torch.no_grad():
            local = model(ids).logits
        fetched = out.logits.cpu()
        assert rm.stats()["bytes_received"] - received >= local.nbytes
        torch.testing.assert_close(fetched, local)
        torch.testing.assert_close(torch.as_tensor(out.logits), local)
        assert out.logits.tolist()[0][0][:3] == pytest.approx(local[0, 0, :3].tolist(), abs=1e-5)
        assert out.logits.numpy().shape == (1, 20, VOCAB)
        follow = rm(ids[:, -1:], cache=out.cache)  # the transformers-5 name works too
        assert follow.past_key_values is out.past_key_values
        assert out.past_key_values.get_seq_length() == 21


def test_every_decision_is_recorded(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    with RemoteModel(models["gpt2"], server.address, policy="full") as rm:
        out = rm(prompt())
        rm(prompt(length=1), past_key_values=out.past_key_values)
        records = [(r.op, r.value, r.lifecycle, r.decision) for r in rm.decisions]
        stats = rm.stats()
    weights = [r for r in rm.decisions if r.op == "register"]
    uploaded = Decision.DATA if rm.uploaded_bytes else Decision.REFERENCE
    assert [(r.value, r.lifecycle, r.decision) for r in weights] == [
        ("weights", Lifecycle.WEIGHT, uploaded)
    ]
    assert weights[0].bytes == (rm.weight_bytes if rm.uploaded_bytes else 0)
    assert ("forward", "logits[:, :-1]", Lifecycle.ACTIVATION, Decision.REFERENCE) in records
    assert ("forward", "logits[:, -1]", Lifecycle.OUTPUT, Decision.REFERENCE) in records
    assert ("forward", "past_key_values", Lifecycle.SESSION_STATE, Decision.REFERENCE) in records
    assert stats["by_lifecycle"]["session_state"]["data_bytes"] == 0
    assert all(r.reason for r in rm.decisions)


def test_second_registration_uploads_nothing(
    fresh: ServerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="djinn")
    model = tiny_gpt2(seed=5)
    weights = sum(p.nbytes for p in model.parameters())
    with RemoteModel(model, fresh.address) as first:
        assert first.uploaded_bytes >= weights * 0.9
    said = f"model {first.fingerprint[:12]}: "
    mb = f"{first.uploaded_bytes / 1e6:.1f} MB"
    start, done = caplog.messages[-2:]
    assert start.startswith(f"{said}uploading ") and start.endswith(f" tensors, {mb}")
    assert done.startswith(f"{said}uploaded {mb} in ") and done.endswith(" MB/s)")
    with djinn.connect(fresh.address) as client, RemoteModel(model, client) as second:
        assert second.uploaded_bytes == 0
        assert caplog.messages[-1] == f"{said}the server holds it, nothing to upload"
        assert second.stats()["bytes_sent"] < 20_000
        assert client.server_stats()["models"] == 1


def test_restarted_server_registers_from_its_store(tmp_path: Path) -> None:
    model = tiny_gpt2(seed=6)
    ids = prompt()
    args = ("--store", str(tmp_path / "store"), "--device", "cpu")
    with ServerProcess(*args) as proc, RemoteModel(model, proc.address) as rm:
        assert rm.uploaded_bytes > 0
    with ServerProcess(*args) as proc, RemoteModel(model, proc.address) as rm:
        assert rm.uploaded_bytes == 0
        assert torch.equal(rm.generate(ids, max_new_tokens=8), local_generate(model, ids, 8))


def test_changed_weights_are_a_new_model(fresh: ServerProcess) -> None:
    model = tiny_gpt2(seed=7)
    with RemoteModel(model, fresh.address) as rm:
        first = rm.fingerprint
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with RemoteModel(model, fresh.address) as rm:
        assert rm.fingerprint != first and rm.uploaded_bytes > 0


def test_from_pretrained_model_round_trips(server: ServerProcess, tmp_path: Path) -> None:
    tiny_gpt2(seed=8).save_pretrained(tmp_path / "saved")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = prompt()
    with RemoteModel(model, server.address) as rm:
        assert torch.equal(rm.generate(ids, max_new_tokens=10), local_generate(model, ids, 10))


def test_sampling_is_seeded_and_reproducible(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    ids = prompt()
    with RemoteModel(models["gpt2"], server.address) as rm:
        torch.manual_seed(1)
        a = rm.generate(ids, max_new_tokens=20, do_sample=True, top_k=50, top_p=0.9)
        torch.manual_seed(1)
        b = rm.generate(ids, max_new_tokens=20, do_sample=True, top_k=50, top_p=0.9)
        c = rm.generate(ids, max_new_tokens=20, do_sample=True, top_k=50, top_p=0.9)
    assert torch.equal(a, b) and not torch.equal(a, c)  # the caller's RNG moved on
    assert a.shape == (1, 32)


def test_another_sessions_cache_is_refused(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    model = models["gpt2"]
    with (
        djinn.connect(server.address) as client,
        RemoteModel(model, client) as a,
        RemoteModel(model, client) as b,
    ):
        cache = a(prompt()).past_key_values
        with pytest.raises(UsageError, match="another RemoteModel's session"):
            b(prompt(length=1), past_key_values=cache)
        # forging it past the client's check: the server does not hold it for b
        forged = messages.Run(
            b.session.id, messages.Prelude(fetch=[messages.Fetch(cache.ref.id, "cache")])
        )
        with pytest.raises(LostReferenceError, match="does not hold it"):
            client.request(forged, messages.Ran)


def test_token_ids_outside_the_vocabulary_are_refused(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    # each is an index into the scores: on CUDA, one outside the vocabulary is a device assert
    with djinn.connect(server.address) as client, RemoteModel(models["gpt2"], client) as rm:
        for policy in ("full", "semantic_blind"):
            with RemoteModel(models["gpt2"], client, policy=policy) as each:
                for bad in (
                    {"pad_token_id": VOCAB},
                    {"suppress_tokens": [VOCAB + 3]},
                    {"bad_words_ids": [[-2]]},
                ):
                    with pytest.raises(UsageError, match="outside the vocabulary"):
                        each.generate(prompt(), max_new_tokens=2, eos_token_id=3, **bad)
        # forged past the client's check, the server refuses it too
        args = messages.GenerateArgs(prompt(), config={"max_new_tokens": 2, "pad_token_id": VOCAB})
        with pytest.raises(RemoteUsageError, match="outside the vocabulary"):
            client.request(
                messages.Generate(rm.session.id, messages.Prelude(), args), messages.Generated
            )
        assert rm.generate(prompt(), max_new_tokens=2, eos_token_id=3).shape == (1, 14)


def test_server_stats_count_the_device_threads_work(fresh: ServerProcess) -> None:
    with djinn.connect(fresh.address) as observer, RemoteModel(tiny_gpt2(), fresh.address) as rm:
        before = observer.server_stats()
        for _ in range(3):
            rm(prompt(length=20))
            rm.synchronize()  # one device job per call: the forward runs with it
        after = observer.server_stats()
        assert after["device_jobs"] - before["device_jobs"] == 3
        assert after["device_busy_s"] > before["device_busy_s"]


def test_session_memory_is_freed_on_close_and_on_disconnect(fresh: ServerProcess) -> None:
    model = tiny_gpt2(seed=9)
    with djinn.connect(fresh.address) as observer:
        rm = RemoteModel(model, fresh.address)
        out = rm(prompt(length=50))
        rm.synchronize()
        stats = observer.server_stats()
        assert stats["sessions"] == 1 and stats["resident_bytes"] > 0
        del out
        rm.close()
        assert observer.server_stats()["sessions"] == 0
        assert observer.server_stats()["resident_bytes"] == 0

        rm = RemoteModel(model, fresh.address)
        kept = rm(prompt(length=50))
        rm.synchronize()
        assert observer.server_stats()["resident_bytes"] > 0
        rm._client.close()  # the connection drops without a goodbye
        deadline = time.monotonic() + 5
        while observer.server_stats()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert observer.server_stats()["sessions"] == 0
        assert observer.server_stats()["resident_bytes"] == 0
        del kept


def test_dropped_remote_tensors_free_server_memory(fresh: ServerProcess) -> None:
    config = tiny_gpt2().config
    with RemoteModel(tiny_gpt2(), fresh.address) as rm, djinn.connect(fresh.address) as observer:
        cache = None
        for _ in range(30):
            out = rm(prompt(length=8), past_key_values=cache)  # the last step's logits drop here
            cache = out.past_key_values
        rm(prompt(length=1), past_key_values=cache)
        rm.synchronize()  # runs the queued steps, then frees what was dropped
        logits = 8 * VOCAB * 4
        kv = 2 * config.n_layer * (30 * 8 + 1) * config.n_embd * 4
        resident = observer.server_stats()["resident_bytes"]
        assert kv <= resident < kv + 3 * logits  # not 30 steps' worth of logits
        del out, cache
        rm.synchronize()
        assert observer.server_stats()["resident_bytes"] < 3 * logits


def test_idle_session_lease_expires(tmp_path: Path) -> None:
    args = ("--store", str(tmp_path), "--device", "cpu", "--session-lease", "0.5")
    with ServerProcess(*args) as proc, djinn.connect(proc.address) as observer:
        rm = RemoteModel(tiny_gpt2(seed=10), proc.address)
        out = rm(prompt())
        assert observer.server_stats()["sessions"] == 1
        deadline = time.monotonic() + 10
        while observer.server_stats()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert observer.server_stats()["sessions"] == 0
        with pytest.raises(LostReferenceError, match="closed, expired"):
            rm(prompt(length=1), past_key_values=out.past_key_values)
            rm.synchronize()
        rm.close()


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(8, 2048)
        self.down = torch.nn.Linear(2048, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = torch.relu(self.up(x))
        return self.down(hidden), hidden


def test_plain_modules_need_trust_remote_code(server: ServerProcess) -> None:
    with pytest.raises(RemoteCodeRefusedError, match="--trust-remote-code"):
        RemoteModel(_Mlp(), server.address)


def test_plain_module_runs_on_a_trusting_server(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _Mlp().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        out, hidden = module(x)
    args = ("--store", str(tmp_path), "--device", "cpu", "--trust-remote-code", "--token", "t0k")
    with ServerProcess(*args) as proc, RemoteModel(module, proc.address, token="t0k") as rm:
        remote_out, remote_hidden = rm(x)
        assert isinstance(remote_out, RemoteTensor) and isinstance(remote_hidden, RemoteTensor)
        torch.testing.assert_close(remote_out.cpu(), out)  # kept under "full" until read
        torch.testing.assert_close(remote_hidden.cpu(), hidden)
    with (
        ServerProcess(*args) as proc,
        RemoteModel(module, proc.address, "semantic_blind", token="t0k") as rm,
    ):
        blind_out, blind_hidden = rm(x)  # data at once under the blind policy
        assert isinstance(blind_out, torch.Tensor) and isinstance(blind_hidden, torch.Tensor)
        torch.testing.assert_close(blind_out, out)


@pytest.mark.parametrize(
    ("method", "advice"),
    [
        ("parameters", "use the model you wrapped"),
        ("train", "inference only"),
        ("state_dict", "weights"),
    ],
)
def test_local_only_module_methods_explain_themselves(
    server: ServerProcess, models: dict[str, torch.nn.Module], method: str, advice: str
) -> None:
    with RemoteModel(models["gpt2"], server.address) as rm, pytest.raises(UsageError, match=advice):
        getattr(rm, method)()


@pytest.mark.parametrize("policy", POLICIES)
def test_bad_inputs_get_clear_errors_before_anything_is_sent(
    server: ServerProcess, models: dict[str, torch.nn.Module], policy: str
) -> None:
    with RemoteModel(models["gpt2"], server.address, policy=policy) as rm:
        sent = rm.stats()["bytes_sent"]
        with pytest.raises(UsageError, match="outside the vocabulary"):
            rm(torch.tensor([[VOCAB + 5]]))
        with pytest.raises(UsageError, match="exceed its 256 positions"):
            rm(torch.zeros(1, 300, dtype=torch.long))
        with pytest.raises(UsageError, match=r"must be \[batch, seq\]"):
            rm(torch.zeros(5, dtype=torch.long))
        with pytest.raises(UsageError, match=r"cannot pass token_type_ids.*it takes input_ids"):
            rm(prompt(), token_type_ids=torch.zeros(1, 12, dtype=torch.long))
        with pytest.raises(UsageError, match="must be integers"):
            rm(torch.zeros(1, 3))
        with pytest.raises(UsageError, match="0s and 1s"):
            rm(prompt(), attention_mask=torch.full((1, 12), 2))
        assert rm.stats()["bytes_sent"] == sent  # refused before sending
        assert rm.generate(prompt(), max_new_tokens=2).shape == (1, 14)  # still usable
    with pytest.raises(UsageError, match="cannot wrap a dict"):
        RemoteModel({"weights": torch.zeros(2)}, server.address)  # type: ignore[arg-type]


def test_the_server_makes_the_same_checks(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    with djinn.connect(server.address) as client, RemoteModel(models["gpt2"], client) as rm:
        for bad, words in (
            (messages.ForwardOp(input_ids=torch.tensor([[VOCAB + 5]])), "outside the vocabulary"),
            (
                messages.ForwardOp(input_ids=prompt(), attention_mask=torch.full((1, 12), 500)),
                "0s and 1s",
            ),
            (
                messages.ForwardOp(input_ids=prompt(), position_ids=torch.full((1, 12), 10**6)),
                "position_ids",
            ),
        ):
            forged = messages.Run(rm.session.id, messages.Prelude(ops=[bad]))
            with pytest.raises(RemoteUsageError, match=words):
                client.request(forged, messages.Ran)
        assert rm.generate(prompt(), max_new_tokens=2).shape == (1, 14)


def test_unknown_policy_names_the_choices(
    server: ServerProcess, models: dict[str, torch.nn.Module]
) -> None:
    with pytest.raises(UsageError, match="semantic_blind, partially_aware, full"):
        RemoteModel(models["gpt2"], server.address, policy="magic")


def _small_vocab_gpt2() -> torch.nn.Module:
    """One logits row of 4,000 bytes: what the old size rule mistook for 'small'."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(11)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=64, vocab_size=1000, n_positions=256)
    return GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("policy", POLICIES)
def test_logits_have_the_local_shape_for_a_small_vocabulary(
    server: ServerProcess, policy: str
) -> None:
    model = _small_vocab_gpt2()
    ids = prompt(length=9) % 1000
    with torch.no_grad():
        local = model(ids).logits
    with RemoteModel(model, server.address, policy=policy) as rm:
        logits = rm(ids).logits
        assert tuple(logits.shape) == tuple(local.shape) == (1, 9, 1000)
        got = logits.cpu() if isinstance(logits, RemoteTensor) else logits
        torch.testing.assert_close(got, local)


def test_full_generate_moves_under_64_bytes_per_token_for_a_small_vocabulary(
    server: ServerProcess,
) -> None:
    model = _small_vocab_gpt2()
    ids = prompt(length=9) % 1000
    with RemoteModel(model, server.address) as rm:
        rm.generate(ids, max_new_tokens=1)  # warm: the prompt and the reply's fixed part
        short = rm.stats()
        rm.generate(ids, max_new_tokens=1)
        one = rm.stats()
        rm.generate(ids, max_new_tokens=41)
        many = rm.stats()
    fixed = (one["bytes_sent"] + one["bytes_received"]) - (
        short["bytes_sent"] + short["bytes_received"]
    )
    total = (many["bytes_sent"] + many["bytes_received"]) - (
        one["bytes_sent"] + one["bytes_received"]
    )
    assert (total - fixed) / 40 <= 64, (fixed, total)


@pytest.mark.parametrize("vocab", [1000, VOCAB])
def test_a_loop_reading_only_the_token_moves_under_a_kib_per_step(
    server: ServerProcess, vocab: int
) -> None:
    model = _small_vocab_gpt2() if vocab == 1000 else tiny_gpt2()
    with RemoteModel(model, server.address) as rm:
        sent, received = _step_bytes(rm, prompt(length=20) % vocab, steps=12)
    per_step = [s + r for s, r in zip(sent, received, strict=True)]
    assert max(per_step) < 1024, per_step


def test_the_decisions_explain_the_bytes_on_the_wire(server: ServerProcess) -> None:
    model = _small_vocab_gpt2()
    with RemoteModel(model, server.address, policy="semantic_blind") as rm:
        before = rm.stats()
        payload_before = sum(r.bytes for r in rm.decisions)
        out = rm(prompt(length=20) % 1000)
        for _ in range(5):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = rm(token, past_key_values=out.past_key_values)
        after = rm.stats()
        payload = sum(r.bytes for r in rm.decisions) - payload_before
    wire = (
        after["bytes_sent"]
        + after["bytes_received"]
        - before["bytes_sent"]
        - before["bytes_received"]
    )
    calls = after["calls"] - before["calls"]
    # the recorded payload is what crossed, less the frames' headers and control
    assert payload <= wire <= payload + 400 * calls, (payload, wire, calls)
