"""Settings the server must not start with are refused at start, in one line naming the
flag, before anything is bound or loaded."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from djinn.server.__main__ import main


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--threads", "0"], "--threads must be positive, got 0"),
        (["--memory-budget", "-5"], "--memory-budget must be positive, got -5.0"),
        (["--session-quota", "-1"], "--session-quota must be positive"),
        (["--frame-timeout", "-1"], "--frame-timeout must be positive"),
        (["--max-generate-tokens", "0"], "--max-generate-tokens must be positive"),
        (["--receive-budget", "0"], "--receive-budget must be positive"),
        (["--metrics-port", "-3"], "cannot serve metrics on port -3"),
    ],
)
def test_bad_settings_are_refused_naming_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["--device", "cpu", "--store", str(tmp_path), *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_store_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    store.write_text("")
    assert main(["--device", "cpu", "--store", str(store)]) == 2
    assert "it is a file, not a folder" in capsys.readouterr().err


def test_a_port_in_use_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["--device", "cpu", "--store", str(tmp_path), "--port", str(port)]
        assert main(args) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_a_bad_model_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    assert main(["--device", "cpu", "--store", str(tmp_path / "s"), "--model", f"m={folder}"]) == 2
    err = capsys.readouterr().err
    assert "config.json cannot be read" in err and "cannot listen" not in err
