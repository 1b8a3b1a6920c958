"""Content fingerprints of models: how a server knows it already holds one.

A fingerprint is the SHA-256 of a canonical header (architecture: class
name and config, or the hash of pickled code; the generation defaults; the
name, dtype and shape of every weight; which weights alias which) followed
by every weight's bytes in manifest order. The client computes it before registering; the server
recomputes it from what was uploaded and refuses a mismatch, so one
client cannot plant weights under another model's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Final

import torch

from djinn.messages import ModelSpec, TensorEntry
from djinn.net.codec import tensor_bytes

FORMAT: Final = b"djinn-model-2\0"
# Config keys that vary with the writer, not with the model.
VOLATILE_CONFIG_KEYS: Final = frozenset(
    {"transformers_version", "_name_or_path", "_commit_hash", "_attn_implementation_autoset"}
)


def canonical_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict without the keys that differ between equal models."""
    return {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}


def storage_key(tensor: torch.Tensor) -> tuple[Any, ...]:
    """Equal for two tensors exactly when they view the same memory the same way."""
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tuple(tensor.stride()),
        tensor.dtype,
    )


def unique_tensors(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], list[tuple[str, str]]]:
    """Split a state dict into unique tensors and (alias, source) pairs.

    Tied weights (GPT-2's lm_head and wte) share memory; they travel once,
    under the name that comes first in the state dict, which is the one a
    transformers checkpoint keeps.
    """
    unique: dict[str, torch.Tensor] = {}
    seen: dict[tuple[Any, ...], str] = {}
    aliases: list[tuple[str, str]] = []
    for name, tensor in state.items():
        key = storage_key(tensor)
        if key in seen and tensor.numel():
            aliases.append((name, seen[key]))
        else:
            seen[key] = name
            unique[name] = tensor
    return unique, aliases


def manifest_of(tensors: Mapping[str, torch.Tensor]) -> list[TensorEntry]:
    return [
        TensorEntry(name, str(t.dtype).removeprefix("torch."), list(t.shape))
        for name, t in tensors.items()
    ]


def header(spec: ModelSpec) -> bytes:
    """The canonical bytes of everything in a model spec but the weights' values."""
    code = spec.code
    fields = {
        "kind": spec.kind,
        "class": spec.cls,
        "config": spec.config,
        "generation_config": spec.generation_config,
        "code_sha256": hashlib.sha256(code).hexdigest() if code is not None else None,
        "manifest": [[e.name, e.dtype, list(e.shape)] for e in spec.manifest],
        "aliases": [list(pair) for pair in spec.aliases],
    }
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


class Hasher:
    """Incremental fingerprint: feed the header once, then each weight in order."""

    def __init__(self, spec: ModelSpec) -> None:
        head = header(spec)
        self._hash = hashlib.sha256(FORMAT + len(head).to_bytes(8, "big") + head)

    def update(self, tensor: torch.Tensor) -> None:
        self._hash.update(tensor_bytes(tensor))

    def update_bytes(self, data: memoryview) -> None:
        """Part of a weight's bytes, as a file holds them (row-major, little-endian)."""
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def fingerprint(spec: ModelSpec, tensors: Mapping[str, torch.Tensor]) -> str:
    hasher = Hasher(spec)
    for entry in spec.manifest:
        hasher.update(tensors[entry.name])
    return hasher.hexdigest()
