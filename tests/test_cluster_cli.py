"""`python -m djinn.cluster`'s refusals, which come before Ray is started."""

from __future__ import annotations

import socket
import time

import pytest

from djinn.cluster.__main__ import main


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--servers", "0"], "--servers must be >= 1"),
        (["up", "--", "--max-batch", "-1"], "--max-batch must be positive"),
        (["up", "--", "--host", "0.0.0.0"], "no token is set"),
    ],
)
def test_up_refuses_bad_options_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    monkeypatch.delenv("DJINN_TOKEN", raising=False)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_address_where_nothing_listens_fails_in_seconds(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("ray")
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    began = time.monotonic()
    assert main(["status", "--address", f"127.0.0.1:{port}"]) == 2
    assert f"nothing answers at 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["up", "--address", "no-port-here"]) == 2
    assert "expected auto or HOST:PORT" in capsys.readouterr().err
    assert time.monotonic() - began < 30  # Ray's own retries take a minute or more


def test_an_address_where_something_else_listens_is_not_taken_for_ray(
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("ray")
    with socket.socket() as listener:  # accepts, and never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        began = time.monotonic()
        assert main(["status", "--address", f"djinn+ray://127.0.0.1:{port}"]) == 2
        assert f"127.0.0.1:{port} is not a Ray cluster" in capsys.readouterr().err
        assert time.monotonic() - began < 30
