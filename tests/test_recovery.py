"""A session survives its server: killed and restarted mid-loop or mid-generate, the
client resumes on the restarted server by replaying its log, and the tokens equal an
uninterrupted run. A session that cannot be replayed says why."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

import djinn
from djinn import RemoteModel
from djinn.cluster.__main__ import free_ports
from djinn.errors import ConnectionLostError, ReplayError
from harness.exp2_1 import Local, decode
from harness.server import ServerProcess
from tests.helpers import eventually
from tests.models import prompt, slow_gpt2, tiny_gpt2

pytestmark = pytest.mark.timeout(180)


class Restartable:
    """A server that can be SIGKILLed and started again on the same port and store."""

    def __init__(self, tmp: Path) -> None:
        [self.port] = free_ports(1)
        self.args = ["--store", str(tmp / "store"), "--device", "cpu", "--port", str(self.port)]
        self.proc = ServerProcess(*self.args).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def restart(self) -> None:
        self.proc.kill()
        self.proc = ServerProcess(*self.args).start()

    def stop(self) -> None:
        self.proc.stop()


@pytest.fixture
def server(tmp_path: Path) -> Any:
    restartable = Restartable(tmp_path)
    yield restartable
    restartable.stop()


def test_a_decode_loop_survives_a_restart(server: Restartable) -> None:
    model, ids = tiny_gpt2(seed=2), prompt()
    expected = decode(Local(model), ids, 24)
    with RemoteModel(model, server.address, recover_s=60) as rm:
        out = rm(ids, use_cache=True)
        tokens = []
        for step in range(24):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token.item())  # a streaming client reads each token
            if step == 11:
                server.restart()  # the server's state is gone; the next call finds out
            if step < 23:
                out = rm(token, past_key_values=out.past_key_values, use_cache=True)
        assert tokens == expected
        [seconds] = rm.session.recoveries
        assert 0 < seconds < 60


def test_a_generate_in_flight_survives_a_restart(server: Restartable) -> None:
    model, ids, n = slow_gpt2(seed=4), prompt(batch=2), 1000
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    with RemoteModel(model, server.address, recover_s=60) as rm:
        rm.generate(ids, max_new_tokens=4, pad_token_id=0)  # a first call, for the replay
        result: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: result.update(out=rm.generate(ids, max_new_tokens=n, pad_token_id=0))
        )
        with djinn.connect(server.address) as observer:
            worker.start()
            assert eventually(
                lambda: observer.server_stats()["device_held"] or not worker.is_alive(),
                seconds=30,
            )
        assert worker.is_alive(), "the generate ended before the server was killed"
        server.restart()
        worker.join(timeout=120)
        assert torch.equal(result["out"], expected)
        assert len(rm.session.recoveries) == 1


def test_without_recovery_a_lost_server_fails_at_once(server: Restartable) -> None:
    with RemoteModel(tiny_gpt2(), server.address) as rm:
        out = rm(prompt())
        server.proc.kill()
        with pytest.raises(ConnectionLostError):
            out.logits[:, -1].argmax(-1).tolist()


def test_a_session_too_big_to_replay_says_why(
    server: Restartable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("djinn.session.REPLAY_LOG_BYTES", 10_000)
    with RemoteModel(tiny_gpt2(), server.address, policy="semantic_blind", recover_s=30) as rm:
        out = rm(prompt(), use_cache=True)  # the KV cache comes back as data
        out = rm(prompt(length=1), past_key_values=out.past_key_values, use_cache=True)
        server.restart()
        with pytest.raises(ReplayError, match="too much to keep for a replay"):
            rm(prompt(length=1), past_key_values=out.past_key_values, use_cache=True)


def test_a_finished_stream_is_replayed_without_streaming(server: Restartable) -> None:
    model, ids = tiny_gpt2(seed=5), prompt()
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    with RemoteModel(model, server.address, recover_s=60) as rm:
        streamed = torch.cat(list(rm.stream(ids, max_new_tokens=12)), dim=-1)
        assert torch.equal(streamed, expected[:, ids.shape[1] :])
        server.restart()
        assert torch.equal(rm.generate(ids, max_new_tokens=12), expected)
        assert len(rm.session.recoveries) == 1


def test_a_session_with_a_call_failed_on_the_server_says_why(server: Restartable) -> None:
    with RemoteModel(tiny_gpt2(seed=6), server.address, recover_s=30) as rm:
        out = rm(prompt(), use_cache=True)
        with pytest.raises(djinn.errors.ServerError):
            torch.multinomial(out.logits[:, -1] - 1e9, 1).tolist()  # negative "probabilities"
        server.restart()
        with pytest.raises(ReplayError, match="failed on the server"):
            rm(prompt(length=1), past_key_values=out.past_key_values).logits.sum().item()
