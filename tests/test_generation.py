"""generate's arguments as they cross the wire: allowlisted processors and criteria
rebuild into objects that act exactly as the caller's, and nothing else passes."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers.generation import logits_process as lp
from transformers.generation import stopping_criteria as sc

from djinn import messages
from djinn.errors import UsageError
from djinn.generation import CONFIG_FIELDS, build_component, component, config_fields
from djinn.net import codec
from djinn.net.codec import wire_value

PROCESSORS = [
    lp.MinLengthLogitsProcessor(5, eos_token_id=[2, 3]),
    lp.MinNewTokensLengthLogitsProcessor(2, 3, eos_token_id=2),
    lp.TemperatureLogitsWarper(0.7),
    lp.RepetitionPenaltyLogitsProcessor(1.3),
    lp.TopPLogitsWarper(0.8),
    lp.TopKLogitsWarper(5),
    lp.MinPLogitsWarper(0.1),
    lp.TypicalLogitsWarper(0.9),
    lp.EpsilonLogitsWarper(0.01),
    lp.EtaLogitsWarper(0.01),
    lp.NoRepeatNGramLogitsProcessor(2),
    lp.SequenceBiasLogitsProcessor([[[4, 5], 2.0], [[7], -1.0]]),
    lp.NoBadWordsLogitsProcessor([[6], [8, 9]], eos_token_id=2),
    lp.ForcedBOSTokenLogitsProcessor(1),
    lp.ForcedEOSTokenLogitsProcessor(6, eos_token_id=2),
    lp.InfNanRemoveLogitsProcessor(),
    lp.SuppressTokensAtBeginLogitsProcessor([4, 5], begin_index=4),
    lp.SuppressTokensLogitsProcessor([3]),
]


def _over_the_wire(spec: messages.Component) -> messages.Component:
    control, buffers = codec.encode(messages.Echo(wire_value(spec)))
    back = codec.decode(control, buffers, messages.Request)  # type: ignore[arg-type]
    assert isinstance(back, messages.Echo)
    return back.value  # type: ignore[no-any-return]


@pytest.mark.parametrize("processor", PROCESSORS, ids=lambda p: type(p).__name__)
def test_processors_rebuild_into_the_same_behaviour(processor: Any) -> None:
    spec = component(processor, "logits_processor")
    control, buffers = codec.encode(spec)
    sent = codec.decode(control, buffers, messages.Component)
    rebuilt = build_component(sent, "processor")
    assert type(rebuilt) is type(processor)
    torch.manual_seed(0)
    ids = torch.randint(0, 10, (3, 4))
    scores = torch.randn(3, 10)
    torch.testing.assert_close(rebuilt(ids, scores.clone()), processor(ids, scores.clone()))


@pytest.mark.parametrize(
    "criteria",
    [sc.MaxLengthCriteria(5), sc.EosTokenCriteria([2, 7]), sc.MaxTimeCriteria(30.0)],
    ids=lambda c: type(c).__name__,
)
def test_stopping_criteria_rebuild_into_the_same_behaviour(criteria: Any) -> None:
    spec = component(criteria, "stopping_criteria")
    rebuilt = build_component(codec.decode(*codec.encode(spec), messages.Component), "criteria")
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 7]])
    assert torch.equal(rebuilt(ids, None), criteria(ids, None))


class MyStop(sc.StoppingCriteria):
    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


@pytest.mark.parametrize(
    ("obj", "kind"),
    [
        (MyStop(), "stopping_criteria"),
        (lp.PrefixConstrainedLogitsProcessor(lambda b, i: [0], 1), "logits_processor"),
        (object(), "logits_processor"),
    ],
    ids=["own-criteria", "callable", "object"],
)
def test_anything_else_is_refused_with_what_to_do(obj: Any, kind: str) -> None:
    with pytest.raises(UsageError, match=r"rm\.stream"):
        component(obj, kind)


@pytest.mark.parametrize(
    "spec",
    [
        messages.Component("os.system", {}),
        messages.Component("TopKLogitsWarper", {"top_k": 5, "evil": 1}),
        messages.Component("TopKLogitsWarper", {"top_k": "five"}),
    ],
    ids=["unknown-class", "unknown-argument", "bad-value"],
)
def test_the_server_rebuilds_only_allowlisted_classes_with_their_arguments(
    spec: messages.Component,
) -> None:
    with pytest.raises(UsageError):
        build_component(spec, "processor")


def test_config_fields_outside_the_allowlist_are_named() -> None:
    assert config_fields({"max_new_tokens": 3, "top_k": 0}, "x") == {
        "max_new_tokens": 3,
        "top_k": 0,
    }
    with pytest.raises(UsageError, match="custom_generate"):
        config_fields({"custom_generate": "hub/repo"}, "the arguments")
    assert "stop_strings" not in CONFIG_FIELDS and "max_new_tokens" in CONFIG_FIELDS
