"""The planner: for every value of a call, data or reference, and why.

A `Call` describes one operation: its inputs (where each lives now), its
outputs (all made on the server), what the caller reads, and the phase.
`plan` applies these rules, first match wins, and records every decision:

1. Weights: uploaded when the server lacks them, referenced ever after.
2. A value being read crosses as data.
3. An input only the client holds must travel as data; one the server
   holds travels as a reference.
4. A value made on the server and returned to the caller: the policy's
   table decides by lifecycle.

Outputs are never truncated: a value that does not cross is a reference to
the whole value, so reading it later gives all of it. `plan_read` decides
what else comes back with a read: only values the caller still holds that
were made by the same line of user code (the caller is reading a series,
like the tokens of a decode loop), and small enough that a later round trip
would cost more than the bytes.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterator
from typing import Final, NamedTuple

from djinn.semantics.lifecycle import Lifecycle, Phase
from djinn.semantics.policy import Decision, Policy
from djinn.semantics.record import DecisionRecord

# A reference costs a round trip to read later; below this size the bytes
# are cheaper than that round trip on any link (4 KiB at 1 Gb/s is 33 us).
SMALL_VALUE_BYTES: Final = 4096


class Side(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class Value(NamedTuple):
    """One input or output of a call, as the planner sees it. (NamedTuples: a decode
    loop plans several calls per token, and these cost a third of a dataclass.)"""

    name: str
    lifecycle: Lifecycle
    nbytes: int
    side: Side = Side.SERVER  # where it lives now (an output: where it is made)
    read: bool = False  # user code reads it now


class Call(NamedTuple):
    op: str
    phase: Phase
    inputs: tuple[Value, ...] = ()
    outputs: tuple[Value, ...] = ()


class Placement(NamedTuple):
    value: Value
    decision: Decision
    reason: str


class Plan:
    """The placements of one call, by value name."""

    def __init__(self, call: Call, placements: list[Placement]) -> None:
        self.call = call
        self._by_name = {p.value.name: p for p in placements}
        self.placements = placements

    def __getitem__(self, name: str) -> Decision:
        return self._by_name[name].decision

    def __iter__(self) -> Iterator[Placement]:
        return iter(self.placements)

    def data(self, name: str) -> bool:
        return self._by_name[name].decision is Decision.DATA

    def records(self) -> list[DecisionRecord]:
        op, phase, data = self.call.op, self.call.phase, Decision.DATA
        return [
            DecisionRecord(
                op,
                p.value.name,
                p.value.lifecycle,
                p.decision,
                p.value.nbytes if p.decision is data else 0,
                phase,
                p.reason,
            )
            for p in self.placements
        ]


def plan(call: Call, policy: Policy) -> Plan:
    """Every value of `call` placed by the rules in this module's docstring."""
    placements = [
        Placement(v, *_rule(v.lifecycle, v.side, v.read, False, policy)) for v in call.inputs
    ] + [Placement(v, *_rule(v.lifecycle, v.side, v.read, True, policy)) for v in call.outputs]
    return Plan(call, placements)


@functools.cache
def _rule(
    lifecycle: Lifecycle, side: Side, read: bool, output: bool, policy: Policy
) -> tuple[Decision, str]:
    if lifecycle is Lifecycle.WEIGHT:
        if side is Side.SERVER:
            return Decision.REFERENCE, "the server holds these weights (same fingerprint)"
        return Decision.DATA, "the server lacks these weights: uploaded once"
    if read:
        return Decision.DATA, "user code reads it"
    if not output:
        if side is Side.CLIENT:
            return Decision.DATA, "only the client holds it"
        return Decision.REFERENCE, "the server holds it already"
    return policy.decide(lifecycle)


def plan_read(
    read: Value, series: list[Value], phase: Phase = Phase.DECODE
) -> tuple[Plan, list[bool]]:
    """What a read brings back: `read` itself, and of `series` (values the caller still
    holds that the same line of user code made) the small ones. Returns the plan
    and, per value of `series`, whether it comes back."""
    placements = [Placement(read, Decision.DATA, "user code reads it")]
    chosen = [value.nbytes <= SMALL_VALUE_BYTES for value in series]
    reason = "made by the same line as the value read, and small: user code reads a series"
    placements += [
        Placement(value, Decision.DATA, reason)
        for value, take in zip(series, chosen, strict=True)
        if take
    ]
    return Plan(Call("read", phase, outputs=(read, *series)), placements), chosen
