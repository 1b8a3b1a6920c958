"""Link emulation: frames leave at the link's rate, each a latency after its last bit."""

from __future__ import annotations

import pytest

from djinn.net.link import Link


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_frame_waits_its_serialization_plus_latency() -> None:
    clock = Clock()
    link = Link(gbps=8.0, latency_s=0.001, clock=clock)  # 1 GB/s
    assert link.delay(1_000_000) == pytest.approx(0.001 + 0.001)


def test_back_to_back_frames_queue_behind_each_other() -> None:
    clock = Clock()
    link = Link(gbps=8.0, clock=clock)
    assert link.delay(1_000_000) == pytest.approx(0.001)
    assert link.delay(1_000_000) == pytest.approx(0.002)  # the link is still busy with the first
    clock.now += 0.010  # idle long enough: no queue
    assert link.delay(1_000_000) == pytest.approx(0.001)


def test_a_25_gbps_link_makes_a_100_mb_cache_cost_32_ms() -> None:
    assert Link(gbps=25.0, clock=Clock()).delay(100_000_000) == pytest.approx(0.032)


@pytest.mark.parametrize(("gbps", "latency"), [(0.0, 0.0), (-1.0, 0.0), (1.0, -0.1)])
def test_bad_links_are_refused(gbps: float, latency: float) -> None:
    with pytest.raises(ValueError, match="positive bandwidth"):
        Link(gbps, latency)
