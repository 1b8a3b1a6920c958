"""Policies: for each value an operation reads or writes, send its bytes or a reference.

Every data-vs-reference rule lives in `Policy.decide`, in this order:

1. Weights are uploaded once and referenced ever after.
2. A value only the client holds must travel as data.
3. A small value (at most SMALL_VALUE_BYTES) travels as data, unless it is
   session state: a reference to an output would cost a later round trip to
   read it, while session state is only ever passed back, never read.
4. Otherwise the policy's table decides by lifecycle.

The three built-in tables reproduce Experiment 2.1's remote baselines.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from djinn.errors import UsageError
from djinn.semantics.lifecycle import Lifecycle, Phase

# A reference costs a round trip to read later; below this size the bytes
# are cheaper than that round trip on any link (4 KiB at 1 Gb/s is 33 us).
SMALL_VALUE_BYTES: Final = 4096


class Decision(enum.Enum):
    DATA = "data"  # send the bytes
    REFERENCE = "reference"  # keep it where it is; send a reference


@dataclass(frozen=True, slots=True)
class Value:
    """One input or output of an operation, as the policy sees it."""

    name: str
    lifecycle: Lifecycle
    nbytes: int
    phase: Phase
    on_server: bool  # the server holds (or will produce) it


@dataclass(frozen=True)
class Policy:
    name: str
    table: Mapping[Lifecycle, Decision]
    description: str

    def decide(self, value: Value) -> Decision:
        if value.lifecycle is Lifecycle.WEIGHT:
            return Decision.REFERENCE
        if not value.on_server:
            return Decision.DATA
        if value.lifecycle is not Lifecycle.SESSION_STATE and value.nbytes <= SMALL_VALUE_BYTES:
            return Decision.DATA
        return self.table[value.lifecycle]


_D, _R = Decision.DATA, Decision.REFERENCE

POLICIES: Final[Mapping[str, Policy]] = MappingProxyType(
    {
        "semantic_blind": Policy(
            "semantic_blind",
            MappingProxyType(
                {
                    Lifecycle.SESSION_STATE: _D,
                    Lifecycle.ACTIVATION: _D,
                    Lifecycle.OUTPUT: _D,
                }
            ),
            "weights cached; KV cache shipped both ways every step; full logits returned",
        ),
        "partially_aware": Policy(
            "partially_aware",
            MappingProxyType(
                {
                    Lifecycle.SESSION_STATE: _D,
                    Lifecycle.ACTIVATION: _R,
                    Lifecycle.OUTPUT: _D,
                }
            ),
            "weights cached; KV cache shipped both ways every step; last logits row only",
        ),
        "full": Policy(
            "full",
            MappingProxyType(
                {
                    Lifecycle.SESSION_STATE: _R,
                    Lifecycle.ACTIVATION: _R,
                    Lifecycle.OUTPUT: _R,
                }
            ),
            "weights cached; KV cache stays on the server; outputs stay until read",
        ),
    }
)


def get_policy(policy: str | Policy) -> Policy:
    """A built-in policy by name, or a Policy passed through. UsageError names the choices."""
    if isinstance(policy, Policy):
        return policy
    try:
        return POLICIES[policy]
    except KeyError:
        raise UsageError(
            f"cannot use policy {policy!r}: choose one of {', '.join(POLICIES)}"
        ) from None
