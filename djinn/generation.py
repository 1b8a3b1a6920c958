"""transformers' `generate` arguments, as they cross the wire, checked the same on both ends.

The client sends what the caller passed: GenerationConfig fields, and
transformers' built-in LogitsProcessors and StoppingCriteria as their class
name and constructor arguments. The server rebuilds them from these
allowlists only, so no client object and no callable ever reaches it: a
field or class outside them is refused with a message that says what to
do instead. Streamers stay on the client; the server streams the tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Final

import torch

from djinn import messages
from djinn.errors import UsageError

# GenerationConfig fields that are plain data for a decoder-only model. Left
# out: what needs a tokenizer (stop_strings, token_healing), a second model
# (assistants, guidance_scale), code from a hub (custom_generate, dola) or the
# server's own compile and cache machinery.
CONFIG_FIELDS: Final = frozenset(
    """
    max_new_tokens max_length min_length min_new_tokens early_stopping max_time
    do_sample num_beams temperature top_k top_p min_p top_h typical_p epsilon_cutoff
    eta_cutoff repetition_penalty length_penalty no_repeat_ngram_size bad_words_ids
    suppress_tokens begin_suppress_tokens forced_bos_token_id forced_eos_token_id
    remove_invalid_values exponential_decay_length_penalty sequence_bias
    renormalize_logits num_return_sequences output_scores output_logits
    return_dict_in_generate output_hidden_states output_attentions pad_token_id
    bos_token_id eos_token_id use_cache low_memory prefill_chunk_size
    """.split()
)

PROCESSORS: Final = frozenset(
    """
    MinLengthLogitsProcessor MinNewTokensLengthLogitsProcessor TemperatureLogitsWarper
    RepetitionPenaltyLogitsProcessor TopPLogitsWarper TopKLogitsWarper MinPLogitsWarper
    TypicalLogitsWarper EpsilonLogitsWarper EtaLogitsWarper NoRepeatNGramLogitsProcessor
    SequenceBiasLogitsProcessor NoBadWordsLogitsProcessor ForcedBOSTokenLogitsProcessor
    ForcedEOSTokenLogitsProcessor InfNanRemoveLogitsProcessor
    SuppressTokensAtBeginLogitsProcessor SuppressTokensLogitsProcessor
    """.split()
)
CRITERIA: Final = frozenset({"MaxLengthCriteria", "MaxTimeCriteria", "EosTokenCriteria"})
# Constructor parameters that are rebuilt on the server, not sent.
_LOCAL_PARAMS: Final = frozenset({"self", "device", "args", "kwargs"})
# Parameters a class keeps under another attribute name.
_STORED_AS: Final = {("NoBadWordsLogitsProcessor", "bad_words_ids"): "bad_word_ids"}


def config_fields(fields: Mapping[str, Any], what: str) -> dict[str, Any]:
    """The GenerationConfig fields to send; UsageError names any the server will not take."""
    unknown = sorted(set(fields) - CONFIG_FIELDS)
    if unknown:
        raise UsageError(
            f"cannot generate with {what} {', '.join(unknown)}: a RemoteModel takes the "
            f"GenerationConfig fields {', '.join(sorted(CONFIG_FIELDS))}"
        )
    return {k: plain(v) for k, v in fields.items()}


def component(obj: Any, kind: str) -> messages.Component:
    """A LogitsProcessor or StoppingCriteria as data, if it is one of transformers' own
    allowlisted classes whose arguments can all be read back from the object."""
    allowed = PROCESSORS if kind == "logits_processor" else CRITERIA
    name = type(obj).__name__
    module = type(obj).__module__
    if name not in allowed or not module.startswith("transformers."):
        raise UsageError(
            f"cannot send {kind} {name}: a RemoteModel runs on the server only transformers' "
            f"built-in {', '.join(sorted(allowed))}; for other logic, iterate "
            "rm.stream(...) and stop or steer from your loop"
        )
    kwargs: dict[str, Any] = {}
    for param in inspect.signature(type(obj).__init__).parameters.values():
        if param.name in _LOCAL_PARAMS:
            continue
        stored = _STORED_AS.get((name, param.name), param.name)
        if hasattr(obj, stored):
            kwargs[param.name] = plain(getattr(obj, stored))
        elif param.default is inspect.Parameter.empty:
            raise UsageError(f"cannot send {kind} {name}: its {param.name} cannot be read back")
    return messages.Component(name, kwargs)


def plain(value: Any) -> Any:
    """A value as it travels, and so as settings are compared: tensors as lists,
    tuple-keyed dicts (sequence_bias) as [key, value] pairs."""
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, dict) and any(isinstance(k, tuple) for k in value):
        return [[list(k), v] for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


# Fields (of a GenerationConfig or a component) whose token ids index the scores: one
# outside the vocabulary is a device-side assert on CUDA, which ends every session.
_INDEXING: Final = (
    "forced_bos_token_id forced_eos_token_id suppress_tokens begin_suppress_tokens "
    "bad_words_ids sequence_bias"
).split()


def check_token_ids(
    fields: Mapping[str, Any], vocab: int, what: str = "generate", strict: bool = False
) -> None:
    """UsageError when a token id among `fields` would index outside [0, vocab).

    End-of-sequence ids outside the vocabulary are harmless (they are never made,
    as with GPT-2's default 50256 on a smaller model) unless a minimum length
    masks them; the pad token is fed to finished rows, so it must be inside once
    any end-of-sequence id can finish a row. `strict` (a processor or criterion
    built by the caller) checks every token id it holds.
    """
    names = list(_INDEXING)
    eos = _ids(fields.get("eos_token_id"))
    if strict or fields.get("min_length") or fields.get("min_new_tokens"):
        names.append("eos_token_id")
    if strict or any(0 <= token < vocab for token in eos):
        names.append("pad_token_id")
        if fields.get("pad_token_id") is None and eos:  # transformers pads with the first eos
            fields = {**fields, "pad_token_id": eos[0]}
    for name in names:
        value = fields.get(name)
        if value is None:
            continue
        for token in _ids(value):
            if not 0 <= token < vocab:
                raise UsageError(
                    f"cannot {what}: {name} holds token {token}, outside the vocabulary "
                    f"[0, {vocab}); pass ids inside it"
                )


def _ids(value: Any) -> list[int]:
    """Every int in a token-id field: an int, lists of them, or sequence_bias pairs."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, torch.Tensor):
        return [int(v) for v in value.flatten().tolist()]
    if isinstance(value, dict):
        return [t for key in value for t in _ids(list(key) if isinstance(key, tuple) else key)]
    if isinstance(value, (list, tuple)):
        return [t for item in value if not isinstance(item, float) for t in _ids(item)]
    return []


def build_component(spec: messages.Component, kind: str) -> Any:
    """The server's side of `component`: an allowlisted class, built from plain data."""
    from transformers.generation import logits_process, stopping_criteria

    allowed, module = (
        (PROCESSORS, logits_process) if kind == "processor" else (CRITERIA, stopping_criteria)
    )
    if spec.name not in allowed:
        raise UsageError(f"cannot build {spec.name}: it is not an allowed {kind}")
    cls = getattr(module, spec.name)
    params = inspect.signature(cls.__init__).parameters
    unknown = set(spec.kwargs) - set(params)
    if unknown:
        raise UsageError(f"cannot build {spec.name}: unknown arguments {sorted(unknown)}")
    try:
        return cls(**spec.kwargs)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot build {spec.name}: {exc}") from None
