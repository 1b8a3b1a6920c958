"""Policies: which lifecycles cross the wire as data and which stay as references.

A policy is a table, lifecycle -> decision, for the values a call makes
on the server and returns to the caller. What every policy shares (weights
are referenced once uploaded, what only the client holds must travel, a
value being read crosses) lives in the planner, not here. The three
built-in tables reproduce Experiment 2.1's remote baselines.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from djinn.errors import UsageError
from djinn.semantics.lifecycle import Lifecycle


class Decision(enum.Enum):
    DATA = "data"  # send the bytes
    REFERENCE = "reference"  # keep it where it is; send a reference

    __hash__ = object.__hash__  # members are singletons; Enum hashes by name, in Python


@dataclass(frozen=True, eq=False)  # compared (and cached by) identity: tables are not hashable
class Policy:
    """`table`: per lifecycle of a value the server makes, its decision and why."""

    name: str
    table: Mapping[Lifecycle, tuple[Decision, str]]
    description: str

    def decide(self, lifecycle: Lifecycle) -> tuple[Decision, str]:
        return self.table[lifecycle]


_D, _R = Decision.DATA, Decision.REFERENCE
_SHIPPED = "the policy ships session state both ways every step"
_KEPT_STATE = "session state stays on the server; calls pass it back by reference"
_RETURNED = "the policy returns outputs as data"
_KEPT_OUTPUT = "kept on the server until user code reads it"
_UNREAD = "nobody reads it: it stays on the server, dropped with its handle"

POLICIES: Final[Mapping[str, Policy]] = MappingProxyType(
    {
        "semantic_blind": Policy(
            "semantic_blind",
            MappingProxyType(
                {
                    Lifecycle.SESSION_STATE: (_D, _SHIPPED),
                    Lifecycle.ACTIVATION: (_D, "the policy returns every output row as data"),
                    Lifecycle.OUTPUT: (_D, _RETURNED),
                }
            ),
            "weights cached; KV cache shipped both ways every step; full logits returned",
        ),
        "partially_aware": Policy(
            "partially_aware",
            MappingProxyType(
                {
                    Lifecycle.SESSION_STATE: (_D, _SHIPPED),
                    Lifecycle.ACTIVATION: (_R, _UNREAD),
                    Lifecycle.OUTPUT: (_D, _RETURNED),
                }
            ),
            "weights cached; KV cache shipped both ways every step; last logits row only",
        ),
        "full": Policy(
            "full",
            MappingProxyType(
                {
                    Lifecycle.SESSION_STATE: (_R, _KEPT_STATE),
                    Lifecycle.ACTIVATION: (_R, _UNREAD),
                    Lifecycle.OUTPUT: (_R, _KEPT_OUTPUT),
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
