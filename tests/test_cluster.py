"""djinn servers as Ray actors: sessions placed on both, one actor SIGKILLed mid-generate,
and the generate completing on the other with the tokens of local greedy decoding."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from djinn import RemoteModel
from djinn.cluster import Router
from djinn.cluster.__main__ import free_ports
from tests.helpers import eventually
from tests.models import prompt, slow_gpt2, tiny_gpt2

ray = pytest.importorskip("ray")
from djinn.cluster import actors  # noqa: E402
from djinn.cluster.__main__ import main  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    ray.init(num_cpus=4, include_dashboard=False, namespace=actors.NAMESPACE, log_to_driver=False)
    store = tmp_path_factory.mktemp("cluster")
    argv = ["--device", "cpu", "--store", str(store), "--log-level", "WARNING", "--threads", "1"]
    try:
        yield actors.up(2, argv, ports=free_ports(2))
    finally:
        actors.down()
        ray.shutdown()


def actor_at(address: str) -> Any:
    for handle in actors.handles(ray).values():
        if ray.get(handle.address.remote(), timeout=30) == address:
            return handle
    raise AssertionError(f"no server actor at {address}")


def test_sessions_spread_and_survive_a_killed_actor(cluster: list[str]) -> None:
    assert len(cluster) == 2
    model, ids, n = slow_gpt2(seed=7), prompt(batch=2), 800
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    with (
        RemoteModel(model, actors_address(), timeout=120) as first,
        RemoteModel(tiny_gpt2(seed=9), actors_address()) as second,
    ):
        # the second session went to the idle server: sessions run on both
        assert {first.client.address, second.client.address} == set(cluster)
        first.generate(ids, max_new_tokens=2, pad_token_id=0)
        victim = actor_at(first.client.address)
        result: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: result.update(out=first.generate(ids, max_new_tokens=n, pad_token_id=0))
        )
        worker.start()
        assert eventually(
            lambda: ray.get(victim.stats.remote())["device_held"] or not worker.is_alive(), 30
        )
        assert worker.is_alive(), "the generate ended before its server was killed"
        lost = first.client.address
        os.kill(ray.get(victim.pid.remote()), signal.SIGKILL)
        worker.join(timeout=200)
        assert torch.equal(result["out"], expected)
        assert first.client.address != lost  # resumed on the other server
        [seconds] = first.session.recoveries
        assert seconds < 60
        # the other session never noticed
        assert second.generate(prompt(), max_new_tokens=4).shape == (1, 16)
    # Ray restarted the killed actor on its port
    assert eventually(lambda: sorted(actors.server_addresses()) == sorted(cluster), 120)


def test_a_plain_address_list_routes_without_ray(cluster: list[str]) -> None:
    router = Router(",".join(cluster))
    assert router.place(None) in cluster
    with RemoteModel(tiny_gpt2(seed=10), ",".join(cluster)) as rm:
        assert rm.generate(prompt(), max_new_tokens=4).shape == (1, 16)


def actors_address() -> str:
    return "djinn+ray://"  # the Ray this process runs


def test_status_lists_servers_models_and_load(
    cluster: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with RemoteModel(tiny_gpt2(seed=11), actors_address()) as rm:
        rm.generate(prompt(), max_new_tokens=4)
        rows = actors.status(interval=0.2)
        assert sorted(r["address"] for r in rows if r["alive"]) == sorted(cluster)
        held = [m["fingerprint"] for r in rows for m in r.get("models", [])]
        assert rm.fingerprint in held
        assert all(r["tokens_per_s"] >= 0 and r["sessions"] >= 0 for r in rows)
    assert main(["status"]) == 0
    shown = capsys.readouterr().out
    assert all(address in shown for address in cluster) and "tokens/s" in shown
