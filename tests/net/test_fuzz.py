"""The mutation fuzzer, a few thousand inputs (scripts/fuzz_decoder.py runs 100,000)."""

from __future__ import annotations

import pytest

from scripts.fuzz_decoder import fuzz


@pytest.mark.timeout(120)
def test_mutated_frames_decode_or_raise_the_protocol_error() -> None:
    outcomes = fuzz(inputs=3000, seed=1)
    assert outcomes["inputs"] == 3000
    # every path was taken: frames, whole messages, and refusals
    assert outcomes["frames"] > 0 and outcomes["messages"] > 0 and outcomes["protocol_errors"] > 0
