"""Shared fixtures: a real server process on 127.0.0.1, clients, and an in-process server."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from djinn import connect
from djinn.client import Client
from harness.server import ServerProcess

settings.register_profile(
    "djinn", deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow]
)
# HYPOTHESIS_PROFILE=long: a hundred times the examples, for a search before a release
settings.register_profile("long", parent=settings.get_profile("djinn"), max_examples=20_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "djinn"))

# Keep torch to the machine's two cores in every process the tests start.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server process for the tests that only talk to it; its store is temporary."""
    store = tmp_path_factory.mktemp("store")
    with ServerProcess("--store", str(store), "--log-level", "WARNING", "--device", "cpu") as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with connect(server.address, timeout=60) as c:
        yield c
