"""Registering a model with a server: describe it, fingerprint it, upload it only if needed.

A transformers model is described by its class name, config and generation
defaults, so the server rebuilds it from code it already has. Any other
nn.Module travels as cloudpickle (weights left out, sent as tensors), which
a server accepts only with --trust-remote-code. Uploads show progress: a
tqdm bar on a terminal, INFO lines on the `djinn` logger otherwise.
"""

from __future__ import annotations

import io
import logging
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, Final

import cloudpickle
import msgspec
import torch

from djinn import messages
from djinn.checkpoint import NO_FINGERPRINT, transformers_spec
from djinn.client import Client
from djinn.errors import UsageError
from djinn.fingerprint import (
    fingerprint,
    manifest_of,
    storage_key,
    unique_tensors,
)
from djinn.net.codec import wire_value
from djinn.net.core import Meter

# Seconds allowed per GiB of upload on top of the client's timeout, so a
# large model's chunk is not cut off on a slow link.
UPLOAD_S_PER_GIB: Final = 60.0
# The largest upload message: it bounds what a client streaming weights from files
# holds at once (with the largest single weight).
CHUNK_BYTES: Final = 32 << 20

log = logging.getLogger("djinn")

_SPECS: weakref.WeakKeyDictionary[
    torch.nn.Module, tuple[Any, messages.ModelSpec, dict[str, torch.Tensor]]
]
_SPECS = weakref.WeakKeyDictionary()


def transformers_class(model: torch.nn.Module) -> str | None:
    """The class name when `model` is a stock transformers model the server can rebuild."""
    import transformers

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


def weights_version(model: torch.nn.Module) -> tuple[Any, ...]:
    """Changes when any weight is replaced or edited in place."""
    return tuple((t.data_ptr(), t._version) for t in model.state_dict().values())


class WeightWatch:
    """The cheap per-call form of `weights_version`: the model's parameter and buffer
    slots are listed once; a call compares each slot's tensor and its version counter
    (a few microseconds for a small model, where state_dict() costs half a millisecond)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._slots = [
            (slots, name, tensor, tensor._version, tensor.data_ptr())
            for module in model.modules()
            for slots in (module._parameters, module._buffers)
            for name, tensor in slots.items()
            if tensor is not None
        ]

    def changed(self) -> bool:
        """A slot holds another tensor, or its tensor was edited in place or given new
        memory (`param.data = other` keeps the object and its version counter)."""
        return any(
            slots.get(name) is not tensor
            or tensor._version != version
            or tensor.data_ptr() != pointer
            for slots, name, tensor, version, pointer in self._slots
        )


def describe(model: torch.nn.Module) -> tuple[messages.ModelSpec, dict[str, torch.Tensor]]:
    """The spec a server registers `model` by, and its unique weights by name.

    Cached per model object until any weight changes.
    """
    if not isinstance(model, torch.nn.Module):
        raise UsageError(
            f"cannot wrap a {type(model).__name__}: RemoteModel takes a transformers model "
            "or another torch.nn.Module"
        )
    version = weights_version(model)
    cached = _SPECS.get(model)
    if cached is not None and cached[0] == version:
        return cached[1], cached[2]
    tensors, aliases = unique_tensors(model.state_dict())
    name = transformers_class(model)
    manifest = manifest_of(tensors)
    if name is not None:
        pretrained: Any = model  # a transformers PreTrainedModel, as transformers_class found
        generation = getattr(pretrained, "generation_config", None)
        spec = transformers_spec(name, pretrained.config, generation, manifest, aliases)
    else:
        out = io.BytesIO()
        names = {storage_key(t): n for n, t in tensors.items()}
        _ModulePickler(out, names).dump(model)
        spec = messages.ModelSpec(
            kind="pickle",
            cls=type(model).__qualname__,
            fingerprint=NO_FINGERPRINT,
            manifest=manifest,
            aliases=aliases,
            code=out.getvalue(),
        )
    spec = msgspec.structs.replace(spec, fingerprint=fingerprint(spec, tensors))
    _SPECS[model] = (version, spec, tensors)
    return spec, tensors


def register(
    client: Client,
    spec: messages.ModelSpec,
    weights: Callable[[int], Iterator[torch.Tensor]],
    sizes: list[int],
    meter: Meter,
) -> int:
    """Make the server hold the model; returns the weight bytes uploaded (0 when it had
    them). `weights(start)` yields the manifest's tensors from index `start` on, and
    `sizes` gives each one's bytes, so a caller can stream them from files."""
    model = spec.fingerprint[:12]
    reply = client.request(messages.Register(spec), messages.Registered, meter=meter)
    if reply.status == "ready":
        log.info("model %s: the server holds it, nothing to upload", model)
        return 0
    start = reply.have
    total = sum(sizes[start:])
    if start:
        log.info("model %s: resuming an interrupted upload at weight %d", model, start)
    log.info("model %s: uploading %d tensors, %.1f MB", model, len(sizes) - start, total / 1e6)
    began = time.perf_counter()
    uploaded = 0
    with _progress(total, model) as advance:
        chunk: list[torch.Tensor] = []
        size, first = 0, start
        for index, tensor in enumerate(weights(start), start):
            chunk.append(tensor)
            size += sizes[index]
            if size >= min(reply.chunk_bytes, CHUNK_BYTES) or index == len(sizes) - 1:
                timeout = client.timeout + UPLOAD_S_PER_GIB * size / 2**30
                message = messages.Upload(spec.fingerprint, first, wire_value(chunk))
                client.request(message, messages.Done, timeout=timeout, meter=meter)
                uploaded += size
                advance(size)
                chunk, size, first = [], 0, index + 1
    client.request(
        messages.Commit(spec.fingerprint),
        messages.Registered,
        timeout=client.timeout + UPLOAD_S_PER_GIB * total / 2**30,
        meter=meter,
    )
    seconds = time.perf_counter() - began
    log.info(
        "model %s: uploaded %.1f MB in %.1f s (%.1f MB/s)",
        model,
        uploaded / 1e6,
        seconds,
        uploaded / 1e6 / max(seconds, 1e-9),
    )
    return uploaded


class _progress:
    """A tqdm bar on a terminal; DEBUG log lines per chunk otherwise."""

    def __init__(self, total: int, model: str) -> None:
        self._total = total
        self._model = model
        self._done = 0
        self._bar: Any = None

    def __enter__(self) -> Callable[[int], None]:
        if sys.stderr.isatty() and self._total:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._total, unit="B", unit_scale=True, desc=f"upload {self._model}"
            )
        return self._advance

    def _advance(self, nbytes: int) -> None:
        self._done += nbytes
        if self._bar is not None:
            self._bar.update(nbytes)
        log.debug(
            "model %s: %.1f of %.1f MB uploaded", self._model, self._done / 1e6, self._total / 1e6
        )

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()
