"""The planner as pure logic: every data-vs-reference rule, as tables."""

from __future__ import annotations

import pytest

from djinn.errors import UsageError
from djinn.semantics import (
    POLICIES,
    SMALL_VALUE_BYTES,
    Call,
    Decision,
    DecisionLog,
    Lifecycle,
    Phase,
    Side,
    Value,
    detect_phase,
    get_policy,
    plan,
    plan_read,
)

D, R = Decision.DATA, Decision.REFERENCE
W, S, A, OUT = Lifecycle.WEIGHT, Lifecycle.SESSION_STATE, Lifecycle.ACTIVATION, Lifecycle.OUTPUT
CLIENT, SERVER = Side.CLIENT, Side.SERVER
BIG, SMALL = 10 * 2**20, 16

# (policy, lifecycle, side, read, output, expected)
TABLE = [
    # weights: uploaded when the server lacks them, referenced ever after, any policy
    ("semantic_blind", W, SERVER, False, False, R),
    ("full", W, SERVER, False, False, R),
    ("full", W, CLIENT, False, False, D),
    # inputs: what only the client holds travels; what the server holds is referenced
    ("full", A, CLIENT, False, False, D),
    ("full", S, CLIENT, False, False, D),
    ("semantic_blind", A, SERVER, False, False, R),
    ("full", S, SERVER, False, False, R),
    # a value being read crosses, whatever the policy and lifecycle
    ("full", OUT, SERVER, True, True, D),
    ("full", S, SERVER, True, True, D),
    ("partially_aware", A, SERVER, True, True, D),
    # outputs by the policy's table: the KV cache
    ("semantic_blind", S, SERVER, False, True, D),
    ("partially_aware", S, SERVER, False, True, D),
    ("full", S, SERVER, False, True, R),
    # logits rows nobody reads in a decode loop
    ("semantic_blind", A, SERVER, False, True, D),
    ("partially_aware", A, SERVER, False, True, R),
    ("full", A, SERVER, False, True, R),
    # what user code may read
    ("semantic_blind", OUT, SERVER, False, True, D),
    ("partially_aware", OUT, SERVER, False, True, D),
    ("full", OUT, SERVER, False, True, R),
]


def _id(row: tuple[str, Lifecycle, Side, bool, bool, Decision]) -> str:
    policy, lifecycle, side, read, output, expected = row
    role = "output" if output else "input"
    reading = "-read" if read else ""
    return f"{policy}-{lifecycle.value}-{role}-on-{side.value}{reading}->{expected.value}"


@pytest.mark.parametrize("row", TABLE, ids=[_id(r) for r in TABLE])
@pytest.mark.parametrize("nbytes", [SMALL, BIG], ids=["small", "big"])
def test_decision_table(
    row: tuple[str, Lifecycle, Side, bool, bool, Decision], nbytes: int
) -> None:
    policy, lifecycle, side, read, output, expected = row
    value = Value("v", lifecycle, nbytes, side, read)
    call = (
        Call("op", Phase.DECODE, outputs=(value,)) if output else Call("op", Phase.DECODE, (value,))
    )
    decided = plan(call, POLICIES[policy])
    assert decided["v"] is expected  # and size never matters: nothing is truncated or guessed


def test_every_placement_is_recorded_with_its_bytes_phase_and_reason() -> None:
    call = Call(
        "forward",
        Phase.PREFILL,
        inputs=(Value("input_ids", A, 96, CLIENT),),
        outputs=(Value("logits", A, BIG), Value("past_key_values", S, 0)),
    )
    records = plan(call, POLICIES["semantic_blind"]).records()
    assert [(r.value, r.decision, r.bytes) for r in records] == [
        ("input_ids", D, 96),
        ("logits", D, BIG),
        ("past_key_values", D, 0),
    ]
    assert all(r.reason and r.phase is Phase.PREFILL and r.op == "forward" for r in records)
    full = plan(call, POLICIES["full"]).records()
    assert [r.bytes for r in full] == [96, 0, 0]  # a reference moves no payload


def test_a_read_brings_back_the_small_values_of_its_line_only() -> None:
    read = Value("token", OUT, 8, read=True)
    series = [
        Value("token", OUT, 8),
        Value("token", OUT, SMALL_VALUE_BYTES + 1),
        Value("token", OUT, SMALL_VALUE_BYTES),
    ]
    decided, chosen = plan_read(read, series)
    assert chosen == [True, False, True]
    assert len(decided.records()) == 3 and all(r.decision is D for r in decided.records())
    assert "same line" in decided.records()[1].reason


def test_a_read_alone_brings_back_nothing_else() -> None:
    decided, chosen = plan_read(Value("logits", OUT, BIG, read=True), [])
    assert chosen == [] and [r.bytes for r in decided.records()] == [BIG]


def test_phase_is_detected_from_the_cache() -> None:
    assert detect_phase(0) is Phase.PREFILL
    assert detect_phase(7) is Phase.DECODE
    with pytest.raises(ValueError):
        detect_phase(-1)


def test_log_totals_by_lifecycle_and_phase() -> None:
    log = DecisionLog(capacity=2)
    call = Call(
        "forward", Phase.PREFILL, (Value("input_ids", A, 10, CLIENT),), (Value("logits", A, 50),)
    )
    for _ in range(3):
        log.extend(plan(call, POLICIES["semantic_blind"]).records())
    assert len(log) == 2  # the recent ones in full
    assert log.by_lifecycle()["activation"] == {
        "data_bytes": 180,
        "data_values": 6,
        "references": 0,
    }
    assert log.by_phase()["prefill"]["data_bytes"] == 180


def test_unknown_policy_names_the_choices() -> None:
    with pytest.raises(UsageError, match="semantic_blind, partially_aware, full"):
        get_policy("fastest")
    assert get_policy(POLICIES["full"]) is POLICIES["full"]
