"""The model store: models held by content fingerprint, in memory and on disk.

A registration names a fingerprint. A model already in memory, or in the
on-disk store, is ready at once (no upload). Otherwise the client uploads the
weights in chunks; the server hashes them as they arrive, writes them as
safetensors shards into a staging folder, and at commit checks the hash
against the fingerprint before moving the folder into the store and loading
it. A transformers model is rebuilt from its config by the transformers class
the spec names, so no client code runs; pickled code is accepted only from a
server started with --trust-remote-code.

Layout of one stored model, `<store>/<fingerprint>/`:
    djinn.json                      the spec, less config and code
    config.json | module.pkl        transformers config, or the pickled module
    model.safetensors.index.json    weight name -> shard
    model-00001.safetensors ...     the weights, in upload order
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import pickle
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import torch
from safetensors.torch import load_file, save_file

from djinn.errors import RemoteCodeRefusedError, RemoteUsageError, ServerBusyError
from djinn.fingerprint import Hasher
from djinn.net.payload import TORCH_DTYPES

if TYPE_CHECKING:
    from djinn.server.config import ServerConfig
    from djinn.server.executor import Executor

log = logging.getLogger("djinn.server")

# Upload chunk size the server asks for: large enough that per-call overhead
# vanishes, small enough that hashing and writing one chunk takes well under
# a second and two chunks in memory are cheap.
CHUNK_BYTES: Final = 128 * 1024 * 1024
KINDS: Final = ("transformers", "pickle")


@dataclass
class LoadedModel:
    fingerprint: str
    module: torch.nn.Module
    nbytes: int
    cache_arg: str | None  # "cache" (transformers 5), "past_key_values", or None
    refcount: int = 0
    last_used: float = field(default_factory=time.monotonic)

    @property
    def config(self) -> Any:
        return getattr(self.module, "config", None)

    @property
    def vocab(self) -> int:
        """How many ids the model can index with: its input embedding's rows."""
        module: Any = self.module
        return int(module.get_input_embeddings().num_embeddings)


@dataclass
class Upload:
    """One model being uploaded on one connection."""

    spec: dict[str, Any]
    staging: Path
    hasher: Hasher
    next_index: int = 0
    shards: int = 0
    weight_map: dict[str, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def write_chunk(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            self.hasher.update(tensor)
        self.shards += 1
        shard = f"model-{self.shards:05d}.safetensors"
        save_file(
            {n: t.contiguous() for n, t in zip(names, tensors, strict=True)},
            str(self.staging / shard),
            metadata={"format": "pt"},
        )
        self.weight_map.update(dict.fromkeys(names, shard))

    def finish(self) -> None:
        spec = self.spec
        index = {"metadata": {"format": "pt"}, "weight_map": self.weight_map}
        (self.staging / "model.safetensors.index.json").write_text(json.dumps(index))
        if spec["kind"] == "transformers":
            (self.staging / "config.json").write_text(json.dumps(spec["config"], indent=1))
        else:
            (self.staging / "module.pkl").write_bytes(spec["code"])
        meta = {k: v for k, v in spec.items() if k not in ("config", "code")}
        (self.staging / "djinn.json").write_text(json.dumps(meta))


class ModelStore:
    def __init__(self, config: ServerConfig, executor: Executor) -> None:
        self._config = config
        self._executor = executor
        self._root = Path(config.store)
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}

    def __len__(self) -> int:
        return len(self._models)

    @property
    def resident_bytes(self) -> int:
        return sum(m.nbytes for m in self._models.values())

    def _path(self, fingerprint: str) -> Path:
        return self._root / fingerprint

    # -- registration ------------------------------------------------------------

    async def register(self, uploads: dict[str, Upload], spec: object) -> dict[str, Any]:
        """Ready when held in memory or on disk; else start an upload on this connection."""
        spec = self._check_spec(spec)
        fingerprint = spec["fingerprint"]
        if fingerprint in self._models or (self._path(fingerprint) / "djinn.json").exists():
            await self.load(fingerprint)
            return {"status": "ready", "fingerprint": fingerprint}
        if fingerprint not in uploads:
            self._root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self._root))
            uploads[fingerprint] = Upload(spec, staging, Hasher(spec))
        return {"status": "upload", "fingerprint": fingerprint, "chunk_bytes": CHUNK_BYTES}

    def _check_spec(self, spec: object) -> dict[str, Any]:
        if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
            raise RemoteUsageError("cannot register: malformed model spec")
        fingerprint = spec.get("fingerprint")
        if (
            not isinstance(fingerprint, str)
            or len(fingerprint) != 64
            or not all(c in "0123456789abcdef" for c in fingerprint)
        ):
            raise RemoteUsageError("cannot register: the fingerprint must be 64 hex digits")
        if spec["kind"] == "pickle" and not self._config.trust_remote_code:
            raise RemoteCodeRefusedError(
                "cannot register a pickled module: this server does not run client code; "
                "start it with --trust-remote-code, or wrap a transformers model instead"
            )
        if spec["kind"] == "transformers" and not isinstance(spec.get("config"), dict):
            raise RemoteUsageError("cannot register: a transformers spec needs its config")
        if spec["kind"] == "pickle" and not isinstance(spec.get("code"), bytes):
            raise RemoteUsageError("cannot register: a pickled spec needs its code")
        if not isinstance(spec.get("class"), str):
            raise RemoteUsageError("cannot register: the spec names no class")
        manifest = spec.get("manifest")
        if not isinstance(manifest, list) or not all(_is_entry(e) for e in manifest):
            raise RemoteUsageError("cannot register: malformed weight manifest")
        aliases = spec.get("aliases", [])
        if not isinstance(aliases, list) or not all(
            isinstance(a, tuple) and len(a) == 2 and all(isinstance(n, str) for n in a)
            for a in aliases
        ):
            raise RemoteUsageError("cannot register: malformed aliases")
        return spec

    async def upload(
        self, uploads: dict[str, Upload], fingerprint: object, start: object, tensors: object
    ) -> None:
        """Take the next chunk of weights, in manifest order."""
        upload = uploads.get(fingerprint) if isinstance(fingerprint, str) else None
        if upload is None:
            raise RemoteUsageError("cannot upload: register this fingerprint first")
        if not isinstance(tensors, list) or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise RemoteUsageError("cannot upload: expected a list of tensors")
        async with upload.lock:
            manifest = upload.spec["manifest"]
            if start != upload.next_index or upload.next_index + len(tensors) > len(manifest):
                raise RemoteUsageError(
                    f"cannot upload: expected weights from index {upload.next_index}, got {start}"
                )
            names = []
            for offset, tensor in enumerate(tensors):
                name, dtype, shape = manifest[upload.next_index + offset]
                if (
                    str(tensor.dtype).removeprefix("torch.") != dtype
                    or tuple(tensor.shape) != shape
                ):
                    raise RemoteUsageError(
                        f"cannot upload {name}: expected {dtype}{list(shape)}, "
                        f"got {tensor.dtype}{list(tensor.shape)}"
                    )
                names.append(name)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, upload.write_chunk, names, tensors)
            upload.next_index += len(tensors)

    async def commit(self, uploads: dict[str, Upload], fingerprint: object) -> dict[str, Any]:
        """Check the uploaded weights against the fingerprint, store them, load the model."""
        upload = uploads.get(fingerprint) if isinstance(fingerprint, str) else None
        if upload is None:
            raise RemoteUsageError("cannot commit: register this fingerprint first")
        assert isinstance(fingerprint, str)
        async with upload.lock:
            del uploads[fingerprint]
            try:
                if upload.next_index != len(upload.spec["manifest"]):
                    raise RemoteUsageError(
                        f"cannot commit: {upload.next_index} of "
                        f"{len(upload.spec['manifest'])} weights uploaded"
                    )
                digest = upload.hasher.hexdigest()
                if digest != fingerprint:
                    raise RemoteUsageError(
                        f"cannot commit: the uploaded weights hash to {digest[:16]}..., "
                        f"not to the registered fingerprint {fingerprint[:16]}..."
                    )
                await asyncio.get_running_loop().run_in_executor(None, upload.finish)
                with contextlib.suppress(FileExistsError, OSError):
                    upload.staging.rename(self._path(fingerprint))  # a racing twin may win
            finally:
                shutil.rmtree(upload.staging, ignore_errors=True)
        await self.load(fingerprint)
        log.info("model %s stored and loaded", fingerprint[:12])
        return {"status": "ready", "fingerprint": fingerprint}

    @staticmethod
    def abandon(uploads: dict[str, Upload]) -> None:
        """Delete what a closed connection left half uploaded."""
        for upload in uploads.values():
            shutil.rmtree(upload.staging, ignore_errors=True)
        uploads.clear()

    # -- loading -------------------------------------------------------------------

    async def load(self, fingerprint: str) -> LoadedModel:
        """The model in memory, loading it from the store once however many ask."""
        model = self._models.get(fingerprint)
        if model is not None:
            return model
        pending = self._loading.get(fingerprint)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._loading[fingerprint] = pending
            try:
                model = await self._executor.run(self._load_from_disk, fingerprint)
                self._make_room(model.nbytes)
                self._models[fingerprint] = model
                pending.set_result(model)
            except BaseException as exc:
                pending.set_exception(exc)
                raise
            finally:
                del self._loading[fingerprint]
            log.info("model %s loaded (%d bytes)", fingerprint[:12], model.nbytes)
            return model
        return await asyncio.shield(pending)

    def _load_from_disk(self, fingerprint: str) -> LoadedModel:
        path = self._path(fingerprint)
        meta = json.loads((path / "djinn.json").read_text())
        dtype = None if self._config.dtype == "auto" else TORCH_DTYPES[self._config.dtype][0]
        if meta["kind"] == "transformers":
            module = _load_transformers(path, meta, dtype)
        else:
            module = _load_pickled(path, dtype)
        module = module.to(self._executor.device).eval()
        nbytes = sum(
            t.nbytes
            for t in {**dict(module.named_parameters()), **dict(module.named_buffers())}.values()
        )
        return LoadedModel(fingerprint, module, nbytes, _cache_arg(module))

    def _make_room(self, nbytes: int) -> None:
        """Evict idle models, least recently used first, to stay within the memory budget."""
        budget = self._config.memory_budget_bytes
        idle = sorted(
            (m for m in self._models.values() if m.refcount == 0), key=lambda m: m.last_used
        )
        while idle and self.resident_bytes + nbytes > budget:
            victim = idle.pop(0)
            del self._models[victim.fingerprint]
            log.info("model %s evicted from memory (idle)", victim.fingerprint[:12])
        if self.resident_bytes + nbytes > budget:
            raise ServerBusyError(
                f"cannot load a model of {nbytes} bytes: models in use hold "
                f"{self.resident_bytes} of the {budget}-byte budget"
            )

    def acquire(self, fingerprint: object) -> LoadedModel:
        model = self._models.get(fingerprint) if isinstance(fingerprint, str) else None
        if model is None:
            raise RemoteUsageError("cannot open a session: register the model first")
        model.refcount += 1
        model.last_used = time.monotonic()
        return model

    def release(self, model: LoadedModel) -> None:
        model.refcount -= 1
        model.last_used = time.monotonic()


def _is_entry(entry: object) -> bool:
    return (
        isinstance(entry, tuple)
        and len(entry) == 3
        and isinstance(entry[0], str)
        and entry[1] in TORCH_DTYPES
        and isinstance(entry[2], tuple)
        and all(type(n) is int and n >= 0 for n in entry[2])
    )


def _load_transformers(path: Path, meta: Mapping[str, Any], dtype: torch.dtype | None) -> Any:
    import transformers

    # the server logs loads itself
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    cls = getattr(transformers, meta["class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise RemoteUsageError(
            f"cannot load model: {meta['class']!r} is not a transformers model class "
            f"in transformers {transformers.__version__}"
        )
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    module = cls.from_pretrained(str(path), **kwargs)
    _restore_aliases(module, meta)
    return module


def _restore_aliases(module: torch.nn.Module, meta: Mapping[str, Any]) -> None:
    """Weights that shared memory on the client, and were not tied again by the config."""
    state = module.state_dict()
    expected = {name for name, _, _ in meta["manifest"]}
    for alias, source in meta.get("aliases", []):
        if alias in state and state[alias].data_ptr() != state[source].data_ptr():
            state[alias].copy_(state[source])
        expected.add(alias)
    unknown = set(state) - expected
    if unknown:
        raise RemoteUsageError(
            f"cannot load model: its config builds weights the upload lacks: {sorted(unknown)[:5]}"
        )


def _load_pickled(path: Path, dtype: torch.dtype | None) -> Any:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        weights.update(load_file(str(path / shard)))
    with (path / "module.pkl").open("rb") as f:
        module = _WeightsUnpickler(f, weights).load()  # trusted: --trust-remote-code
    if not isinstance(module, torch.nn.Module):
        raise RemoteUsageError(f"cannot load model: the pickle holds a {type(module).__name__}")
    return module.to(dtype) if dtype is not None else module


class _WeightsUnpickler(pickle.Unpickler):
    """Unrestricted (the operator opted in), with weights supplied from safetensors."""

    def __init__(self, file: Any, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(file)
        self._weights = weights

    def persistent_load(self, pid: Any) -> Any:
        return self._weights[pid[1]]


def _cache_arg(module: torch.nn.Module) -> str | None:
    """How this model's forward names its KV cache, across transformers versions."""
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None
