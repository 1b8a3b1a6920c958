"""Statistics every benchmark reports the same way: medians with their spread,
bootstrap intervals of paired ratios, and outliers flagged, never hidden.

Machines here are shared and noisy; a ratio is taken between runs of the same
round (paired), its median is the headline, and the interval says how far it
could be from another sample of the same runs.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

# A run more than this many times its baseline's median is flagged.
OUTLIER_FACTOR = 3.0


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1), linear between the nearest ranks."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = q * (len(ordered) - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def spread(values: Sequence[float], fmt: str = ".2f") -> str:
    """'median [p25, p75] (n=N)'."""
    return (
        f"{statistics.median(values):{fmt}} [{percentile(values, 0.25):{fmt}}, "
        f"{percentile(values, 0.75):{fmt}}] (n={len(values)})"
    )


def bootstrap(ratios: Sequence[float], rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% interval of the median of `ratios`, by resampling them with replacement."""
    if len(ratios) < 2:
        return (ratios[0], ratios[0]) if ratios else (math.nan, math.nan)
    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(rounds))
    return medians[int(0.025 * rounds)], medians[int(0.975 * rounds) - 1]


@dataclass(frozen=True)
class Paired:
    """Paired per-run ratios of a measurement to its baseline, summarized."""

    median: float
    low: float  # the 95% bootstrap interval of the median
    high: float
    q25: float
    q75: float
    mean_ratio: float  # of the means, shown beside the paired median
    n: int

    @classmethod
    def of(cls, values: Sequence[float], baseline: Sequence[float]) -> Paired:
        ratios = [v / b for v, b in zip(values, baseline, strict=True)]
        low, high = bootstrap(ratios)
        return cls(
            median=statistics.median(ratios),
            low=low,
            high=high,
            q25=percentile(ratios, 0.25),
            q75=percentile(ratios, 0.75),
            mean_ratio=statistics.mean(values) / statistics.mean(baseline),
            n=len(ratios),
        )

    def below(self, limit: float) -> bool | None:
        """True when the whole interval is at or under `limit`, False when all of it
        is over, None when it straddles: too wide to conclude."""
        if self.high <= limit:
            return True
        if self.low > limit:
            return False
        return None

    def above(self, limit: float) -> bool | None:
        """True when the whole interval is at or over `limit`, False when all of it is
        under, None when it straddles."""
        if self.low >= limit:
            return True
        if self.high < limit:
            return False
        return None

    def describe(self, fmt: str = ".3f") -> str:
        return (
            f"{self.median:{fmt}}x (95% CI {self.low:{fmt}}-{self.high:{fmt}}, "
            f"IQR {self.q25:{fmt}}-{self.q75:{fmt}}, n={self.n}; by means {self.mean_ratio:{fmt}}x)"
        )


def outliers(values: Sequence[float], factor: float = OUTLIER_FACTOR) -> list[int]:
    """Indices of the values more than `factor` times the median."""
    middle = statistics.median(values)
    return [i for i, v in enumerate(values) if v > factor * middle]
