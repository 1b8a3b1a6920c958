"""What a value is for, and which phase of decoding an operation is in."""

from __future__ import annotations

import enum


class Lifecycle(enum.Enum):
    """How long a value lives, which decides where it should stay.

    WEIGHT: parameters and buffers; live as long as the server, shared by
    every session of the same model. SESSION_STATE: KV caches; live until the
    session ends. ACTIVATION: intermediates and unread outputs; live one call.
    OUTPUT: what user code reads.
    """

    WEIGHT = "weight"
    SESSION_STATE = "session_state"
    ACTIVATION = "activation"
    OUTPUT = "output"

    __hash__ = object.__hash__  # members are singletons; Enum hashes by name, in Python


class Phase(enum.Enum):
    """PREFILL reads a whole prompt into an empty cache; DECODE extends a cache by a few tokens."""

    PREFILL = "prefill"
    DECODE = "decode"

    __hash__ = object.__hash__  # members are singletons; Enum hashes by name, in Python


def detect_phase(cached_tokens: int) -> Phase:
    """A call that starts from an empty cache is a prefill; anything after is a decode step."""
    if cached_tokens < 0:
        raise ValueError(f"cannot detect phase: negative cache length {cached_tokens}")
    return Phase.PREFILL if cached_tokens == 0 else Phase.DECODE
