"""`python -m djinn.cluster`'s refusals, which come before Ray is imported or started."""

from __future__ import annotations

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
