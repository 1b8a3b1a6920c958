"""Link emulation: pace sends to a bandwidth and add one-way latency.

Loopback moves gigabytes a second with microseconds of latency, which hides
what shipping a KV cache costs on a real network. A sender asks `delay(n)`
before writing an n-byte frame and waits that long: frames leave one after
another at `gbps`, each `latency_s` after its serialization, as on a link
with a bandwidth-delay product. Each direction paces its own sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Link:
    gbps: float
    latency_s: float = 0.0
    clock: Callable[[], float] = time.monotonic
    _free_at: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not self.gbps > 0 or self.latency_s < 0:
            raise ValueError("a link needs a positive bandwidth and a non-negative latency")

    def delay(self, nbytes: int) -> float:
        """Seconds to wait before writing `nbytes`: until the link would have delivered them."""
        now = self.clock()
        start = max(now, self._free_at)
        self._free_at = start + nbytes * 8 / (self.gbps * 1e9)
        return self._free_at + self.latency_s - now

    def describe(self) -> str:
        return f"{self.gbps:g} Gb/s, {self.latency_s * 1e3:g} ms one way"
