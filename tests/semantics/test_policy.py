"""Every data-vs-reference rule, as a table."""

from __future__ import annotations

import pytest

from djinn.errors import UsageError
from djinn.semantics import (
    POLICIES,
    SMALL_VALUE_BYTES,
    Decision,
    DecisionLog,
    DecisionRecord,
    Lifecycle,
    Phase,
    Value,
    detect_phase,
    get_policy,
)

D, R = Decision.DATA, Decision.REFERENCE
W, S, A, OUT = Lifecycle.WEIGHT, Lifecycle.SESSION_STATE, Lifecycle.ACTIVATION, Lifecycle.OUTPUT
BIG, SMALL = 10 * 2**20, 16

# (policy, lifecycle, bytes, on_server, expected)
TABLE = [
    # weights: uploaded once, referenced ever after, whatever the policy
    ("semantic_blind", W, BIG, True, R),
    ("partially_aware", W, BIG, True, R),
    ("full", W, BIG, True, R),
    ("full", W, SMALL, False, R),
    # the KV cache: shipped by the two baselines, kept by full
    ("semantic_blind", S, BIG, True, D),
    ("partially_aware", S, BIG, True, D),
    ("full", S, BIG, True, R),
    ("full", S, SMALL, True, R),  # small session state is still never shipped
    # logits rows nobody reads: blind ships them, the others keep them
    ("semantic_blind", A, BIG, True, D),
    ("partially_aware", A, BIG, True, R),
    ("full", A, BIG, True, R),
    # what user code reads
    ("semantic_blind", OUT, BIG, True, D),
    ("partially_aware", OUT, BIG, True, D),
    ("full", OUT, BIG, True, R),
    # small outputs and activations are always data: a reference costs a round trip
    ("full", OUT, SMALL, True, D),
    ("full", OUT, SMALL_VALUE_BYTES, True, D),
    ("full", OUT, SMALL_VALUE_BYTES + 1, True, R),
    ("full", A, SMALL, True, D),
    # what only the client holds must travel
    ("full", A, BIG, False, D),
    ("full", S, BIG, False, D),
    ("partially_aware", OUT, BIG, False, D),
]


def _id(row: tuple[str, Lifecycle, int, bool, Decision]) -> str:
    policy, lifecycle, nbytes, on_server, expected = row
    size = {BIG: "big", SMALL: "small"}.get(nbytes, str(nbytes))
    where = "server" if on_server else "client"
    return f"{policy}-{lifecycle.value}-{size}-{where}->{expected.value}"


@pytest.mark.parametrize("row", TABLE, ids=[_id(r) for r in TABLE])
def test_decision_table(row: tuple[str, Lifecycle, int, bool, Decision]) -> None:
    policy, lifecycle, nbytes, on_server, expected = row
    value = Value("v", lifecycle, nbytes, Phase.DECODE, on_server)
    assert POLICIES[policy].decide(value) is expected


@pytest.mark.parametrize("phase", list(Phase))
def test_decisions_do_not_depend_on_phase_for_builtin_policies(phase: Phase) -> None:
    for policy in POLICIES.values():
        for lifecycle in Lifecycle:
            value = Value("v", lifecycle, BIG, phase, True)
            assert policy.decide(value) is policy.decide(
                Value("v", lifecycle, BIG, Phase.PREFILL, True)
            )


@pytest.mark.parametrize(
    ("cached", "phase"), [(0, Phase.PREFILL), (1, Phase.DECODE), (500, Phase.DECODE)]
)
def test_phase_detection(cached: int, phase: Phase) -> None:
    assert detect_phase(cached) is phase


def test_negative_cache_length_is_a_bug() -> None:
    with pytest.raises(ValueError, match="negative"):
        detect_phase(-1)


def test_policies_by_name() -> None:
    assert get_policy("full") is POLICIES["full"]
    assert get_policy(POLICIES["full"]) is POLICIES["full"]
    with pytest.raises(UsageError, match="semantic_blind, partially_aware, full"):
        get_policy("fast")


def test_decision_log_totals_outlive_its_window() -> None:
    log = DecisionLog(capacity=3)
    for i in range(5):
        log.add(DecisionRecord("forward", "past_key_values", S, D, 100 + i))
    log.add(DecisionRecord("forward", "logits", OUT, R, 0))
    assert len(log) == 3
    assert log.by_lifecycle() == {
        "session_state": {"data_bytes": 510, "data_values": 5, "references": 0},
        "output": {"data_bytes": 0, "data_values": 0, "references": 1},
    }
