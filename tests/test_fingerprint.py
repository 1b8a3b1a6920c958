"""Fingerprints: stable for equal models, different for any change, tied weights sent once."""

from __future__ import annotations

import copy

import torch

from djinn.registration import WeightWatch, describe
from tests.models import tiny_gpt2, tiny_llama


def test_equal_models_share_a_fingerprint() -> None:
    assert describe(tiny_gpt2(seed=3))[0].fingerprint == describe(tiny_gpt2(seed=3))[0].fingerprint


def test_any_weight_or_config_change_changes_it() -> None:
    base = tiny_gpt2(seed=3)
    first = describe(base)[0].fingerprint
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.transformer.h[1].mlp.c_fc.bias[7] += 1e-3
    assert describe(other)[0].fingerprint != first
    other = copy.deepcopy(base)
    other.config.layer_norm_epsilon = 1e-3
    assert describe(other)[0].fingerprint != first
    assert describe(tiny_llama())[0].fingerprint != first


def test_in_place_change_invalidates_the_cached_spec() -> None:
    model = tiny_gpt2(seed=4)
    first = describe(model)[0].fingerprint
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    assert describe(model)[0].fingerprint != first


def test_tied_weights_travel_once() -> None:
    model = tiny_gpt2()
    spec, tensors = describe(model)
    assert ("lm_head.weight", "transformer.wte.weight") in [tuple(a) for a in spec.aliases]
    assert "lm_head.weight" not in tensors and "transformer.wte.weight" in tensors


def test_volatile_config_keys_do_not_count() -> None:
    model = tiny_gpt2(seed=3)
    spec = describe(model)[0]
    assert "transformers_version" not in spec.config
    assert spec.config["architectures"] == ["GPT2LMHeadModel"]


def test_the_weight_watch_sees_every_kind_of_edit() -> None:
    model = tiny_gpt2(seed=4)
    for edit in (
        lambda p: p.add_(1.0),  # in place (through .data it escapes the version counter)
        lambda p: setattr(p, "data", p.data.clone()),  # new memory, same object and version
    ):
        watch = WeightWatch(model)
        assert not watch.changed()
        with torch.no_grad():
            edit(next(model.parameters()))
        assert watch.changed()
