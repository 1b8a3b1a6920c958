"""The device-thread benchmark runs, small, and reports every way it times; the
server's own path (server_ops) has made the native tokens, or the script exits 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.models import tiny_gpt2

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = [sys.executable, str(ROOT / "scripts" / "bench_executor.py"), "--device", "cpu"]
SMALL = ["--runs", "1", "--prompt-tokens", "4", "--new-tokens", "3"]


def check_report(stdout: str, first_line: str) -> None:
    lines = stdout.splitlines()
    assert lines[0] == first_line
    for way in ("native", "worker_thread", "one_job", "server_ops", "job_per_step"):
        [line] = [x for x in lines if x.strip().startswith(f"{way}:")]
        assert "ms/token" in line and "x native" in line


@pytest.mark.timeout(120)
def test_reports_each_way_against_native() -> None:
    result = subprocess.run(SCRIPT + SMALL, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    check_report(result.stdout, "gpt2 on cpu, 4+3 tokens, 1 rounds")
    assert "host time per operator" not in result.stdout


@pytest.mark.timeout(120)
def test_profile_compares_the_operators_of_native_and_server_ops() -> None:
    args = [*SCRIPT, *SMALL, "--profile"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    profile = result.stdout.split("host time per operator", 1)[1].splitlines()
    rows = {line[:36].strip(): line[36:].split() for line in profile[2:]}
    # the model's own matmuls ran on both sides, as often (3 steps, 12 layers, 4 per layer)
    native_calls, _, server_calls, _ = rows["aten::addmm"]
    assert native_calls == server_calls and int(native_calls) == 3 * 12 * 4
    assert all(float(ms) > 0 for ms in rows["wall, profiler included"])


@pytest.mark.timeout(120)
def test_runs_a_saved_model_folder(tmp_path: Path) -> None:
    tiny_gpt2(seed=5).save_pretrained(tmp_path)
    args = [*SCRIPT, "--model", str(tmp_path), *SMALL]
    result = subprocess.run(args, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    check_report(result.stdout, f"{tmp_path} on cpu, 4+3 tokens, 1 rounds")


def test_an_unknown_model_is_a_usage_error(tmp_path: Path) -> None:
    args = [*SCRIPT, "--model", str(tmp_path / "absent")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "--model must be one of" in result.stderr
