"""Pure decision logic, no I/O: lifecycles, phases, policies, the planner and its record."""

from djinn.semantics.lifecycle import Lifecycle, Phase, detect_phase
from djinn.semantics.planner import (
    SMALL_VALUE_BYTES,
    Call,
    Placement,
    Plan,
    Side,
    Value,
    plan,
    plan_read,
)
from djinn.semantics.policy import POLICIES, Decision, Policy, get_policy
from djinn.semantics.record import DecisionLog, DecisionRecord

__all__ = [
    "POLICIES",
    "SMALL_VALUE_BYTES",
    "Call",
    "Decision",
    "DecisionLog",
    "DecisionRecord",
    "Lifecycle",
    "Phase",
    "Placement",
    "Plan",
    "Policy",
    "Side",
    "Value",
    "detect_phase",
    "get_policy",
    "plan",
    "plan_read",
]
