"""The decision record: why each byte crossed the wire (or did not)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Final, NamedTuple

from djinn.semantics.lifecycle import Lifecycle, Phase
from djinn.semantics.policy import Decision

# Recent decisions kept in full; totals cover all of them.
RECORD_CAPACITY: Final = 10_000


class DecisionRecord(NamedTuple):
    op: str
    value: str
    lifecycle: Lifecycle
    decision: Decision
    bytes: int  # payload bytes that crossed the wire for this value (0 for a reference)
    phase: Phase = Phase.DECODE
    reason: str = ""


class DecisionLog:
    """The last RECORD_CAPACITY decisions, plus byte totals per lifecycle and phase."""

    def __init__(self, capacity: int = RECORD_CAPACITY) -> None:
        self._records: deque[DecisionRecord] = deque(maxlen=capacity)
        self._totals: dict[tuple[Lifecycle, Phase, Decision], list[int]] = {}

    def add(self, record: DecisionRecord) -> None:
        self._records.append(record)
        total = self._totals.setdefault((record.lifecycle, record.phase, record.decision), [0, 0])
        total[0] += 1
        total[1] += record.bytes

    def extend(self, records: list[DecisionRecord]) -> None:
        for record in records:
            self.add(record)

    def __iter__(self) -> Iterator[DecisionRecord]:
        return iter(list(self._records))

    def __len__(self) -> int:
        return len(self._records)

    def _summary(self, key: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (lifecycle, phase, decision), (count, nbytes) in self._totals.items():
            name = lifecycle.value if key == "lifecycle" else phase.value
            entry = out.setdefault(name, {"data_bytes": 0, "data_values": 0, "references": 0})
            if decision is Decision.DATA:
                entry["data_bytes"] += nbytes
                entry["data_values"] += count
            else:
                entry["references"] += count
        return out

    def by_lifecycle(self) -> dict[str, dict[str, int]]:
        """{lifecycle: {"data_bytes", "data_values", "references"}} over every decision."""
        return self._summary("lifecycle")

    def by_phase(self) -> dict[str, dict[str, int]]:
        """The same by phase: what prefill and decode each moved."""
        return self._summary("phase")
