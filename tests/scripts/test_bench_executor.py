"""The device-thread benchmark runs, small, and reports every way it times."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_reports_each_way_against_native() -> None:
    args = [sys.executable, str(ROOT / "scripts" / "bench_executor.py"), "--device", "cpu"]
    args += ["--runs", "1", "--prompt-tokens", "4", "--new-tokens", "3"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=110)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "gpt2 on cpu, 4+3 tokens, 1 rounds"
    for way in ("native", "one_job", "job_per_step"):
        [line] = [x for x in lines if x.strip().startswith(f"{way}:")]
        assert "ms/token" in line and "x native" in line
