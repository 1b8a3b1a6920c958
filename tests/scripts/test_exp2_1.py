"""The experiment script end to end, small: a saved model folder, every output file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.models import tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("model")
    tiny_gpt2(seed=3).save_pretrained(folder)  # a local model folder without a tokenizer
    out = tmp_path_factory.mktemp("results")
    args = [sys.executable, str(ROOT / "scripts" / "exp2_1.py"), "--model", str(folder)]
    args += ["--runs", "2", "--warmup", "1", "--prompt-tokens", "24", "--new-tokens", "6"]
    args += ["--device", "cpu", "--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stdout + result.stderr
    return out, result.stdout


def test_prints_the_table_and_checks_tokens(run: tuple[Path, str]) -> None:
    _, stdout = run
    for name in ("Native PyTorch", "Semantic-Blind", "Partially-Aware", "Full Djinn"):
        assert name in stdout
    assert "[PASS] every baseline produced the native tokens" in stdout
    assert "[PASS] every step's logits and the final KV cache match native" in stdout
    assert "verified full_djinn: ok" in stdout and "outliers (> 3x" in stdout


def test_writes_every_output_the_issue_names(run: tuple[Path, str]) -> None:
    out, _ = run
    for name in ("native_pytorch", "semantic_blind", "partially_aware", "full_djinn"):
        [path] = (out / name).glob(f"llm_decode_{name}_*.json")
        data = json.loads(path.read_text())
        assert data["baseline"] == name and data["new_tokens"] == 6 and data["batch_size"] == 1
        assert len(data["runs"]) == 2
        assert {
            "run_id",
            "total_ms",
            "per_token_ms",
            "tokens_generated",
            "bytes_sent",
            "bytes_received",
        } <= set(data["runs"][0])
        for r in data["runs"]:  # CPU time on both ends, for every run
            assert r["client_cpu_ms"] > 0 and r["server_cpu_ms"] >= 0
        for r in data["runs"]:  # the server's device time lies inside the client's timed span
            busy = r["server_busy_ms"]
            assert busy == 0 if name == "native_pytorch" else 0 < busy < r["total_ms"]
        # a round trip per step where the cache travels; full's queued loop makes one
        calls = {"native_pytorch": 0, "full_djinn": 1}.get(name, 6)
        assert [r["calls"] for r in data["runs"]] == [calls, calls]
    [report_path] = out.glob("comparison_report_*.json")
    report = json.loads(report_path.read_text())
    baselines = report["baselines"]
    for entry in baselines.values():
        assert {
            "mean_total_ms",
            "p95_total_ms",
            "mean_per_token_ms",
            "data_mb",
            "tokens_match_native",
        } <= set(entry)
        assert entry["tokens_match_native"]
    assert baselines["native_pytorch"]["data_mb"] == 0
    assert baselines["full_djinn"]["data_mb"] < baselines["partially_aware"]["data_mb"]
    assert baselines["partially_aware"]["data_mb"] < baselines["semantic_blind"]["data_mb"]
    assert {"full_over_native_per_token", "full_vs_blind_speedup", "data_savings_pct"} <= set(
        report
    )
    paired = report["full_over_native_per_token"]
    assert paired["low"] <= paired["median"] <= paired["high"] and paired["n"] == 2
    assert set(report["outliers"]) == set(baselines)
    for name in ("semantic_blind", "partially_aware", "full_djinn"):  # the untimed check
        data = json.loads(next((out / name).glob("llm_decode_*.json")).read_text())
        check = data["verification"]
        assert check["ok"] and check["cache_tokens"] == 24 + 6 - 1, check
        assert check["max_logit_diff"] <= 1e-4 * check["logit_scale"]
    assert report["full_server_busy_per_token_ms"] > 0 and report["full_rest_per_token_ms"] > 0
    summary = (out / "summary.md").read_text()
    assert (
        summary.startswith("# Experiment 2.1") and "crossed in 1 round trip(s) per run" in summary
    )
    assert (out / "latency.png").stat().st_size > 10_000
    assert "listening on" in (out / "server.log").read_text()


def test_help_lists_the_options() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "exp2_1.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--model",
        "--runs",
        "--warmup",
        "--prompt-tokens",
        "--new-tokens",
        "--baselines",
        "--device",
        "--out",
        "--link-gbps",
    ):
        assert option in out
    assert "(default: None)" not in out  # such options say what they fall back to
    assert "(default: 72)" in out and "(default: 30)" in out
