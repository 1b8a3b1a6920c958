"""Faults and limits: cut connections, killed clients and servers, full sessions, leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

import djinn
from djinn import RemoteModel, messages
from djinn.errors import (
    ConnectionLostError,
    DjinnTimeoutError,
    LocalProtocolError,
    LostReferenceError,
    QuotaExceededError,
    ServerBusyError,
)
from harness.server import ServerProcess
from tests.helpers import FaultProxy, eventually
from tests.models import prompt, tiny_gpt2

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess("--store", str(tmp_path / "store"), "--device", "cpu") as proc:
        yield proc


def settled(observer: djinn.Client, baseline: dict[str, int]) -> bool:
    stats = observer.server_stats()
    return all(stats[key] == value for key, value in baseline.items())


BASELINE = {"sessions": 0, "resident_bytes": 0, "receive_in_use_bytes": 0, "connections": 1}


def test_a_connection_cut_mid_request_fails_the_call_at_once(fresh: ServerProcess) -> None:
    with FaultProxy(fresh.address) as proxy, djinn.connect(fresh.address) as observer:
        client = djinn.connect(proxy.address, timeout=30)
        client.ping()
        proxy.cut_up_after = proxy.up + 3_000_000  # 3 MB into an 8 MB frame
        start = time.monotonic()
        with pytest.raises(ConnectionLostError):
            client.echo(torch.zeros(2_000_000))
        assert time.monotonic() - start < 5
        assert eventually(lambda: settled(observer, BASELINE))
        assert observer.echo("still serving") == "still serving"


def test_a_reply_cut_halfway_fails_the_call_and_is_not_retried(fresh: ServerProcess) -> None:
    with FaultProxy(fresh.address) as proxy, djinn.connect(fresh.address) as observer:
        client = djinn.connect(proxy.address, timeout=30)
        client.ping()
        up = proxy.up
        proxy.cut_down_after = proxy.down + 4_000_000
        with pytest.raises(ConnectionLostError):
            client.echo(torch.zeros(2_000_000))
        assert proxy.up - up < 8_100_000  # the request went up once, never again
        with pytest.raises(ConnectionLostError):
            client.ping()  # the client does not reconnect behind the caller's back
        assert eventually(lambda: settled(observer, BASELINE))


def test_a_slow_link_runs_into_the_call_timeout(fresh: ServerProcess) -> None:
    with FaultProxy(fresh.address) as proxy:
        client = djinn.connect(proxy.address, timeout=30)
        proxy.delay_s = 0.3
        assert client.echo(7) == 7  # slow but fine
        with pytest.raises(DjinnTimeoutError):
            client.echo(8, timeout=0.1)


# A victim in a fresh interpreter: forking a process whose OpenMP pool is running can
# leave the child stuck in its first parallel torch operation.
_VICTIM = """
import sys, time, torch, djinn
from tests.models import prompt, tiny_gpt2
address, what = sys.argv[1:3]
client = djinn.connect(address, timeout=60)
if what == "transfer":
    client.echo(torch.zeros(64_000_000))  # 256 MB: killed while it is on the wire
else:
    rm = djinn.RemoteModel(tiny_gpt2(seed=1), client)
    rm(prompt(length=200)).logits[:, -1].argmax()  # holds a cache and logits
    rm.generate(prompt(length=50), max_new_tokens=200)  # killed in here
time.sleep(60)
"""


def _busy(observer: djinn.Client, what: str) -> bool:
    """The child's work is under way on the server: its payload is arriving, or its
    generate holds the device."""
    stats = observer.server_stats()
    if what == "transfer":
        return bool(stats["receive_in_use_bytes"])
    return bool(stats["queued_calls"])


def _kill_cycles(address: str, what: str, cycles: int, observer: djinn.Client) -> None:
    root = Path(__file__).resolve().parents[1]
    for _ in range(cycles):
        victim = subprocess.Popen([sys.executable, "-c", _VICTIM, address, what], cwd=root)
        try:
            started = eventually(lambda: _busy(observer, what), seconds=60)
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
        assert started, "the victim never got its work under way"


@pytest.mark.parametrize("what", ["transfer", "generate"])
def test_killed_clients_leave_nothing_behind(fresh: ServerProcess, what: str) -> None:
    RemoteModel(tiny_gpt2(seed=1), fresh.address).close()  # registered once, up front
    with djinn.connect(fresh.address) as observer:
        _kill_cycles(fresh.address, what, 1, observer)  # warm up the server's allocators
        if what == "transfer":
            # the receive pool keeps the victims' block for reuse; a kill leaves resident
            # only the pages its transfer reached, so touch all of them first, or a later
            # victim that gets further than the first would read as growth
            observer.echo(torch.zeros(64_000_000))
        assert eventually(lambda: settled(observer, BASELINE))
        rss = psutil.Process(fresh.pid).memory_info().rss
        _kill_cycles(fresh.address, what, 3, observer)
        assert eventually(lambda: settled(observer, BASELINE))
        grown = psutil.Process(fresh.pid).memory_info().rss - rss
        assert grown < 64 * 2**20, f"server RSS grew {grown / 2**20:.0f} MiB over 3 kills"


def test_a_killed_server_fails_pending_calls_and_a_restart_needs_no_upload(tmp_path: Path) -> None:
    args = ("--store", str(tmp_path), "--device", "cpu")
    model = tiny_gpt2(seed=2)
    proc = ServerProcess(*args).start()
    rm = RemoteModel(model, proc.address)
    logits = rm(prompt(length=200), use_cache=False).logits
    big = logits.repeat(1, 50, 1)[0]  # [10000, 2000]
    slow = big @ big.T  # 4e11 flops: seconds of work the server will not finish
    pid = os.fork()
    if pid == 0:  # once the slow job holds the device, kill the server under it
        with djinn.connect(proc.address) as observer:
            eventually(lambda: _busy(observer, "generate"), seconds=30)
        os.kill(proc.pid, signal.SIGKILL)
        os._exit(0)
    start = time.monotonic()
    with pytest.raises(ConnectionLostError):
        slow.sum().item()
    assert time.monotonic() - start < 10
    os.waitpid(pid, 0)
    proc.stop()
    with ServerProcess(*args) as again:
        with djinn.connect(again.address) as client:  # listed from the store, not loaded
            [info] = client.models()
            assert not info["resident"] and info["dtype"] == "float32"
            assert info["parameters"] == sum(p.numel() for p in model.parameters())
            assert client.models() == [info]
        with RemoteModel(model, again.address) as rm2:
            assert rm2.uploaded_bytes == 0
            assert rm2.generate(prompt(), max_new_tokens=3).shape == (1, 15)


def test_max_sessions_gives_busy_and_spares_the_others(tmp_path: Path) -> None:
    args = ("--store", str(tmp_path), "--device", "cpu", "--max-sessions", "2")
    with ServerProcess(*args) as proc:
        model = tiny_gpt2(seed=3)
        with RemoteModel(model, proc.address) as a, RemoteModel(model, proc.address) as b:
            with pytest.raises(ServerBusyError, match="maximum of 2"):
                RemoteModel(model, proc.address)
            assert a.generate(prompt(), max_new_tokens=2).shape == (1, 14)
            assert b.generate(prompt(), max_new_tokens=2).shape == (1, 14)


def test_a_session_over_its_quota_fails_alone(tmp_path: Path) -> None:
    quota_gib = 200_000 / 2**30  # 200 KB: one 20-token prefill's logits fit, 40 do not
    args = ("--store", str(tmp_path), "--device", "cpu", "--session-quota", str(quota_gib))
    with ServerProcess(*args) as proc:
        model = tiny_gpt2(seed=4)
        with RemoteModel(model, proc.address) as greedy, RemoteModel(model, proc.address) as modest:
            big = greedy(prompt(length=40), use_cache=False).logits  # 320 KB
            with pytest.raises(QuotaExceededError, match="quota"):
                greedy.synchronize()
            token = modest(prompt(length=8)).logits[:, -1].argmax(-1)
            assert token.shape == (1,)
            with pytest.raises(LostReferenceError):
                big.cpu()  # it was refused, never held


def test_the_shared_session_budget_gives_busy(tmp_path: Path) -> None:
    budget_gib = 300_000 / 2**30
    args = ("--store", str(tmp_path), "--device", "cpu", "--session-memory", str(budget_gib))
    with ServerProcess(*args) as proc:
        model = tiny_gpt2(seed=4)
        with RemoteModel(model, proc.address) as a, RemoteModel(model, proc.address) as b:
            kept = a(prompt(length=30), use_cache=False).logits  # 240 KB
            a.synchronize()
            b(prompt(length=30), use_cache=False)
            with pytest.raises(ServerBusyError, match="shared"):
                b.synchronize()
            del kept
            a.synchronize()
            b(prompt(length=30), use_cache=False)
            b.synchronize()


def test_the_receive_budget_refuses_huge_frames(tmp_path: Path) -> None:
    args = ("--store", str(tmp_path), "--device", "cpu", "--receive-budget", str(16 / 1024))
    with ServerProcess(*args) as proc, djinn.connect(proc.address) as other:
        client = djinn.connect(proc.address)
        with pytest.raises((LocalProtocolError, ConnectionLostError)):
            client.echo(torch.zeros(8_000_000))  # 32 MB against a 16 MB budget
        assert other.echo(torch.ones(1_000_000)).sum() == 1_000_000  # 4 MB fits


def test_one_session_cannot_free_anothers_references(fresh: ServerProcess) -> None:
    model = tiny_gpt2(seed=5)
    with (
        djinn.connect(fresh.address) as client,
        RemoteModel(model, client) as a,
        RemoteModel(model, client) as b,
    ):
        logits = a(prompt(length=16), use_cache=False).logits
        a.synchronize()
        b_frees = messages.Run(b.session.id, messages.Prelude(released=[logits.ref.id]))
        client.request(b_frees, messages.Ran)  # b tries to free a's logits
        assert a.synchronize() is None and logits.cpu().shape == logits.shape


def test_reference_and_session_cycles_leave_memory_flat(fresh: ServerProcess) -> None:
    model = tiny_gpt2(seed=6)
    process = psutil.Process(fresh.pid)

    def cycles(refs: int, sessions: int) -> None:
        with RemoteModel(model, fresh.address) as rm:
            logits = rm(prompt(length=8), use_cache=False).logits
            for _ in range(refs):
                (logits * 2)[:, :, :1000]  # made on the server, dropped at once
            rm.synchronize()
        client = djinn.connect(fresh.address)
        for _ in range(sessions):
            RemoteModel(model, client).close()
        client.close()

    cycles(500, 50)
    before = process.memory_info().rss
    cycles(2000, 200)
    with djinn.connect(fresh.address) as observer:
        assert eventually(lambda: settled(observer, BASELINE))
    grown = process.memory_info().rss - before
    assert grown < 32 * 2**20, f"server RSS grew {grown / 2**20:.0f} MiB"
