"""Pure decision logic, no I/O: lifecycles, phases, policies, and the decision record."""

from djinn.semantics.lifecycle import Lifecycle, Phase, detect_phase
from djinn.semantics.policy import (
    POLICIES,
    SMALL_VALUE_BYTES,
    Decision,
    Policy,
    Value,
    get_policy,
)
from djinn.semantics.record import DecisionLog, DecisionRecord

__all__ = [
    "POLICIES",
    "SMALL_VALUE_BYTES",
    "Decision",
    "DecisionLog",
    "DecisionRecord",
    "Lifecycle",
    "Phase",
    "Policy",
    "Value",
    "detect_phase",
    "get_policy",
]
