"""Registering a model with a server: describe it, fingerprint it, upload it only if needed.

A transformers model is described by its class name and config, so the
server rebuilds it from code it already has. Any other nn.Module travels as
cloudpickle (weights left out, sent as tensors), which a server accepts only
with --trust-remote-code.
"""

from __future__ import annotations

import io
import json
import logging
import time
import weakref
from typing import Any, Final

import cloudpickle
import torch

from djinn.client import Client
from djinn.errors import UsageError
from djinn.fingerprint import (
    canonical_config,
    fingerprint,
    manifest_of,
    storage_key,
    unique_tensors,
)
from djinn.net.rpc import Meter

# Seconds allowed per GiB of upload on top of the client's timeout, so a
# large model's chunk is not cut off on a slow link.
UPLOAD_S_PER_GIB: Final = 60.0

log = logging.getLogger("djinn")

_SPECS: weakref.WeakKeyDictionary[
    torch.nn.Module, tuple[Any, dict[str, Any], dict[str, torch.Tensor]]
]
_SPECS = weakref.WeakKeyDictionary()


def _transformers_class(model: torch.nn.Module) -> str | None:
    """The class name when `model` is a stock transformers model the server can rebuild."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    name = type(model).__name__
    if isinstance(model, transformers.PreTrainedModel) and getattr(
        transformers, name, None
    ) is type(model):
        return name
    return None


class _ModulePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with the module's weights replaced by their manifest names."""

    def __init__(self, file: io.BytesIO, names: dict[tuple[Any, ...], str]) -> None:
        super().__init__(file, protocol=5)
        self._names = names

    def persistent_id(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor:
            name = self._names.get(storage_key(obj))
            if name is not None:
                return ("w", name)
        return None


def describe(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The spec a server registers `model` by, and its unique weights by name.

    Cached per model object until any weight changes in place.
    """
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"cannot wrap a {type(model).__name__}: RemoteModel takes a transformers model "
            "or another torch.nn.Module"
        )
    state = model.state_dict()
    version = tuple((t.data_ptr(), t._version) for t in state.values())
    cached = _SPECS.get(model)
    if cached is not None and cached[0] == version:
        return cached[1], cached[2]
    tensors, aliases = unique_tensors(state)
    name = _transformers_class(model)
    spec: dict[str, Any]
    if name is not None:
        pretrained: Any = model  # a transformers PreTrainedModel, as _transformers_class found
        config = json.loads(pretrained.config.to_json_string(use_diff=False))
        config["architectures"] = [name]
        spec = {"kind": "transformers", "class": name, "config": canonical_config(config)}
    else:
        out = io.BytesIO()
        names = {storage_key(t): n for n, t in tensors.items()}
        _ModulePickler(out, names).dump(model)
        spec = {"kind": "pickle", "class": type(model).__qualname__, "code": out.getvalue()}
    spec["manifest"] = manifest_of(tensors)
    spec["aliases"] = aliases
    spec["fingerprint"] = fingerprint(spec, tensors)
    _SPECS[model] = (version, spec, tensors)
    return spec, tensors


def register(
    client: Client, spec: dict[str, Any], tensors: dict[str, torch.Tensor], meter: Meter
) -> int:
    """Make the server hold the model; returns the weight bytes uploaded (0 when it had them)."""
    model = str(spec["fingerprint"])[:12]
    reply = client.call("register", spec, meter=meter)
    if reply["status"] == "ready":
        log.info("model %s: the server holds it, nothing to upload", model)
        return 0
    chunk_limit = int(reply["chunk_bytes"])
    names = [name for name, _, _ in spec["manifest"]]
    total = sum(tensors[name].nbytes for name in names)
    log.info("model %s: uploading %d tensors, %.1f MB", model, len(names), total / 1e6)
    began = time.perf_counter()
    uploaded = 0
    start = 0
    while start < len(names):
        chunk: list[torch.Tensor] = []
        size = 0
        while start + len(chunk) < len(names) and (not chunk or size < chunk_limit):
            tensor = tensors[names[start + len(chunk)]]
            chunk.append(tensor)
            size += tensor.nbytes
        timeout = client.timeout + UPLOAD_S_PER_GIB * size / 2**30
        client.call("upload", spec["fingerprint"], start, chunk, timeout=timeout, meter=meter)
        start += len(chunk)
        uploaded += size
        log.debug("model %s: %.1f of %.1f MB uploaded", model, uploaded / 1e6, total / 1e6)
    client.call("commit", spec["fingerprint"], timeout=client.timeout + 60.0, meter=meter)
    seconds = time.perf_counter() - began
    log.info("model %s: uploaded %.1f MB in %.1f s", model, uploaded / 1e6, seconds)
    return uploaded
