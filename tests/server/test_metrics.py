"""Prometheus metrics (--metrics-port), scraped over loopback as Prometheus would."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

import djinn
from djinn import RemoteModel
from djinn.cluster.__main__ import free_ports
from harness.server import ServerProcess
from tests.models import prompt, tiny_gpt2

pytest.importorskip("prometheus_client")
pytestmark = pytest.mark.timeout(120)


def test_metrics_scrape_over_loopback(tmp_path: Path) -> None:
    [port] = free_ports(1)
    args = ["--store", str(tmp_path / "store"), "--device", "cpu", "--metrics-port", str(port)]
    with ServerProcess(*args) as server:
        with RemoteModel(tiny_gpt2(), server.address) as rm:
            rm.generate(prompt(), max_new_tokens=5)
        with djinn.connect(server.address) as client:
            client.ping()
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    text = body.decode()
    assert 'djinn_tokens_total{kind="generated"} 5.0' in text
    # generate's own forwards: the 12-token prompt, then 4 steps of one token
    assert 'djinn_tokens_total{kind="prefill"} 12.0' in text
    assert 'djinn_tokens_total{kind="decode"} 4.0' in text
    assert 'djinn_calls_total{type="Generate"} 1.0' in text
    assert "djinn_wire_bytes_total" in text and "djinn_model_resident_bytes" in text
    assert "djinn_sessions 0.0" in text
