"""The model store: models held by content fingerprint, in memory and on disk.

A registration names a fingerprint. A model already in memory, or in the
on-disk store, is ready at once (no upload). Otherwise the client uploads the
weights in chunks; the server hashes them as they arrive, writes them as
safetensors shards into a staging folder, and at commit checks the hash
against the fingerprint before moving the folder into the store. An upload
cut off by a lost connection is kept: the next registration of the same
fingerprint continues from the first weight it lacks.

Budgets before bytes: a model's size is known from its manifest before any
weight is sent, and from its config built on the meta device before any is
loaded; one that cannot fit in --memory-budget (or the device's free memory)
is refused with both sizes.

Integrity: every file of a stored model has its SHA-256 recorded at write
time and checked at load. A corrupt entry is moved aside (quarantined): opening
it by fingerprint is a StoreCorruptError, and a register uploads it again at
once (the client holds good bytes).

Code: a transformers model is rebuilt from its config by the class the spec
names, so no client code runs. A pickled module loads only on a server
started with --trust-remote-code, checked where it is loaded.

Layout of one stored model, `<store>/<fingerprint>/`:
    djinn.json                      the spec, less config and code, plus file hashes
    config.json | module.pkl        transformers config, or the pickled module
    generation_config.json          the model's generation defaults, if it has any
    model.safetensors.index.json    weight name -> shard
    model-00001.safetensors ...     the weights, in upload order
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import pickle
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import msgspec
import torch
from safetensors.torch import load_file, save_file

from djinn import messages
from djinn.checkpoint import Folder, changed, fingerprinted, generation_dict, read_folder
from djinn.errors import (
    QuotaExceededError,
    RemoteCodeRefusedError,
    RemoteUsageError,
    ServerBusyError,
    StoreCorruptError,
    UsageError,
)
from djinn.fingerprint import Hasher
from djinn.modelfacts import ModelFacts, cache_arg
from djinn.net.codec import TORCH_DTYPES
from djinn.server import compiled
from djinn.server.batching import takes_positions
from djinn.server.compiled import CompiledDecode, Warmup

if TYPE_CHECKING:
    from djinn.server.config import ServerConfig
    from djinn.server.device import Device

log = logging.getLogger("djinn.server")

# Upload chunk size the server asks for: large enough that per-call overhead
# vanishes, small enough that hashing and writing one chunk takes well under
# a second and two chunks in memory are cheap.
CHUNK_BYTES: Final = 128 * 1024 * 1024
# Uploads whose connection dropped, kept for a later registration to resume.
ORPHANS_KEPT: Final = 8
# What a stored djinn.json may name (messages.ModelSpec.kind); anything else is damage.
_KINDS: Final = ("transformers", "pickle")


@dataclass
class LoadedModel:
    fingerprint: str
    module: torch.nn.Module
    nbytes: int
    cache_arg: str
    facts: ModelFacts
    dtype: torch.dtype
    takes_positions: bool
    refcount: int = 0
    last_used: float = field(default_factory=time.monotonic)
    decode: CompiledDecode | None = None  # the compiled decode step, under --compile
    warmup: Warmup | None = None  # what the compile warm-up measured

    @property
    def config(self) -> Any:
        return getattr(self.module, "config", None)


@dataclass
class Upload:
    """One model being uploaded; it outlives a dropped connection, to be resumed."""

    spec: messages.ModelSpec
    staging: Path
    hasher: Hasher
    owner: object | None
    next_index: int = 0
    shards: int = 0
    weight_map: dict[str, str] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def write_chunk(self, names: list[str], tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            self.hasher.update(tensor)
        shard = f"model-{self.shards + 1:05d}.safetensors"
        # write, then rename: a crash never leaves a half-written shard under its name
        partial = self.staging / f".{shard}.partial"
        save_file(
            {n: t.contiguous() for n, t in zip(names, tensors, strict=True)},
            str(partial),
            metadata={"format": "pt"},
        )
        partial.rename(self.staging / shard)
        self.shards += 1
        self.weight_map.update(dict.fromkeys(names, shard))

    def finish(self) -> dict[str, Any]:
        """The staged folder's index, config and djinn.json; returns what djinn.json holds."""
        spec = self.spec
        index = {"metadata": {"format": "pt"}, "weight_map": self.weight_map}
        (self.staging / "model.safetensors.index.json").write_text(json.dumps(index))
        if spec.kind == "transformers":
            (self.staging / "config.json").write_text(json.dumps(spec.config, indent=1))
        else:
            assert spec.code is not None
            (self.staging / "module.pkl").write_bytes(spec.code)
        if spec.generation_config:
            text = json.dumps(spec.generation_config, indent=1)
            (self.staging / "generation_config.json").write_text(text)
        files = {p.name: file_sha256(p) for p in sorted(self.staging.iterdir()) if p.is_file()}
        meta = _spec_meta(spec)
        meta["files"] = files
        (self.staging / "djinn.json").write_text(json.dumps(meta))
        return meta


def _spec_meta(spec: messages.ModelSpec) -> dict[str, Any]:
    """A spec as djinn.json stores it: without the config and code, which lie in files."""
    meta = msgspec.structs.asdict(msgspec.structs.replace(spec, config=None, code=None))
    meta["manifest"] = [[e.name, e.dtype, e.shape] for e in spec.manifest]
    return meta


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_bytes(manifest: list[messages.TensorEntry], dtype: torch.dtype | None) -> int:
    """Bytes the weights take in memory, at the server's --dtype where it sets one
    (floating weights only: integer buffers keep their type)."""
    total = 0
    for entry in manifest:
        own, itemsize = TORCH_DTYPES[entry.dtype]
        if dtype is not None and own.is_floating_point:
            itemsize = dtype.itemsize
        total += math.prod(entry.shape) * itemsize
    return total


class ModelStore:
    def __init__(self, config: ServerConfig, device: Device) -> None:
        self._config = config
        self._device = device
        self._root = Path(config.store)
        self._dtype = None if config.dtype == "auto" else TORCH_DTYPES[config.dtype][0]
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._uploads: dict[str, Upload] = {}
        self._writing = 0  # uploads and commits writing to the store now
        self.names: dict[str, str] = {}  # --model NAME -> fingerprint
        self._named: dict[str, Folder] = {}  # fingerprint -> the folder it is read from
        self._stored: dict[str, messages.ModelSpec] = {}  # store entries listed so far
        self._sweep_staging()
        for name, path in config.models:
            self.hold(name, path)

    def hold(self, name: str, path: Path) -> None:
        """Serve the model folder `path` (the server's own disk) under `name`. It is read
        from there when first used, never copied into the store. Raises UsageError."""
        if messages.is_fingerprint(name):
            raise UsageError(
                f"cannot hold {name[:16]}...: a --model name must not look like a fingerprint"
            )
        folder = read_folder(path)
        began = time.perf_counter()
        folder = fingerprinted(folder, self._root / ".fingerprints.json")
        fingerprint = folder.spec.fingerprint
        self._named[fingerprint] = folder
        self.names[name] = fingerprint
        log.info(
            "model %s: %s (%s), fingerprint %s (%.1f s)",
            name,
            folder.path,
            folder.spec.cls,
            fingerprint[:12],
            time.perf_counter() - began,
        )

    def __len__(self) -> int:
        return len(self._models)

    @property
    def resident_bytes(self) -> int:
        return sum(m.nbytes for m in self._models.values())

    def resident(self) -> list[tuple[str, int]]:
        """(fingerprint, bytes) of every model in memory."""
        return [(fp, model.nbytes) for fp, model in self._models.items()]

    def compiled(self) -> dict[str, dict[str, Any]]:
        """The compile warm-up of every model in memory that had one, by fingerprint."""
        return {
            fp: model.warmup.as_dict()
            for fp, model in self._models.items()
            if model.warmup is not None
        }

    @property
    def loading(self) -> int:
        """Models being read from the store or written to it now."""
        return len(self._loading) + self._writing

    @contextlib.asynccontextmanager
    async def _busy(self) -> AsyncIterator[None]:
        self._writing += 1
        try:
            yield
        finally:
            self._writing -= 1

    def _path(self, fingerprint: str) -> Path:
        return self._root / fingerprint

    def _sweep_staging(self) -> None:
        """Staging folders of an earlier run cannot be resumed (their hash state is gone)."""
        if self._root.is_dir():
            for stale in self._root.glob(".upload-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def stored(self, fingerprint: str) -> bool:
        return (
            fingerprint in self._models
            or fingerprint in self._named
            or (self._path(fingerprint) / "djinn.json").exists()
        )

    def resolve(self, model: str) -> str:
        """A model id from a client: a fingerprint, or a name given with --model.
        Never a path: anything else is refused before it reaches the file system."""
        if model in self.names:
            return self.names[model]
        if messages.is_fingerprint(model):
            return model
        raise RemoteUsageError(
            f"cannot find model {model[:80]!r}: it is neither a fingerprint nor a name this "
            "server holds; list them with djinn.connect(address).models()"
        )

    # -- registration ------------------------------------------------------------------

    async def register(self, owner: object, spec: messages.ModelSpec) -> messages.Registered:
        """Ready when held in memory or on disk; else start (or resume) an upload."""
        fingerprint = spec.fingerprint
        if spec.kind == "pickle" and not self._config.trust_remote_code:
            raise _refuse_code()
        if spec.kind == "transformers" and spec.config is None:
            raise RemoteUsageError("cannot register: a transformers spec needs its config")
        if spec.kind == "pickle" and spec.code is None:
            raise RemoteUsageError("cannot register: a pickled spec needs its code")
        for entry in spec.manifest:
            if entry.dtype not in TORCH_DTYPES or any(n < 0 for n in entry.shape):
                raise RemoteUsageError(f"cannot register: bad manifest entry {entry.name!r}")
        if self.stored(fingerprint):
            try:
                await self.load(fingerprint)
                return messages.Registered("ready", fingerprint)
            except StoreCorruptError:  # logged; the client holds good bytes
                if self._path(fingerprint).exists():  # not set aside: never write over it
                    raise
                log.info("model %s: uploading it again", fingerprint[:12])
        self.check_fits(manifest_bytes(spec.manifest, self._dtype), f"model {fingerprint[:12]}")
        upload = self._uploads.get(fingerprint)
        if upload is not None and upload.owner is not None and upload.owner is not owner:
            raise ServerBusyError(
                f"cannot register model {fingerprint[:12]}: another client is uploading it; "
                "retry when it is done"
            )
        if upload is None:
            self._root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=self._root))
            upload = self._uploads[fingerprint] = Upload(spec, staging, Hasher(spec), owner)
        elif upload.owner is None:
            log.info(
                "model %s: resuming its upload at weight %d", fingerprint[:12], upload.next_index
            )
            upload.owner = owner
        return messages.Registered("upload", fingerprint, upload.next_index, CHUNK_BYTES)

    async def upload(self, owner: object, fingerprint: str, start: int, tensors: list[Any]) -> None:
        """Take the next chunk of weights, in manifest order."""
        upload = self._uploads.get(fingerprint)
        if upload is None or upload.owner is not owner:
            raise RemoteUsageError("cannot upload: register this fingerprint first")
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            raise RemoteUsageError("cannot upload: expected a list of tensors")
        async with upload.lock, self._busy():
            manifest = upload.spec.manifest
            if start != upload.next_index or start + len(tensors) > len(manifest):
                raise RemoteUsageError(
                    f"cannot upload: expected weights from index {upload.next_index}, got {start}"
                )
            names = []
            for entry, tensor in zip(manifest[start:], tensors, strict=False):
                if (
                    str(tensor.dtype).removeprefix("torch.") != entry.dtype
                    or list(tensor.shape) != entry.shape
                ):
                    raise RemoteUsageError(
                        f"cannot upload {entry.name}: expected {entry.dtype}{entry.shape}, "
                        f"got {tensor.dtype}{list(tensor.shape)}"
                    )
                names.append(entry.name)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, upload.write_chunk, names, tensors)
            upload.next_index += len(tensors)

    async def commit(self, owner: object, fingerprint: str) -> messages.Registered:
        """Check the uploaded weights against the fingerprint, store them, load the model."""
        upload = self._uploads.get(fingerprint)
        if upload is None or upload.owner is not owner:
            raise RemoteUsageError("cannot commit: register this fingerprint first")
        async with upload.lock, self._busy():
            del self._uploads[fingerprint]
            try:
                if upload.next_index != len(upload.spec.manifest):
                    raise RemoteUsageError(
                        f"cannot commit: {upload.next_index} of "
                        f"{len(upload.spec.manifest)} weights uploaded"
                    )
                digest = upload.hasher.hexdigest()
                if digest != fingerprint:
                    raise RemoteUsageError(
                        f"cannot commit: the uploaded weights hash to {digest[:16]}..., "
                        f"not to the registered fingerprint {fingerprint[:16]}..."
                    )
                loop = asyncio.get_running_loop()
                meta = await loop.run_in_executor(None, upload.finish)
                if upload.spec.kind == "transformers":  # what its config builds, before storing it
                    size = await loop.run_in_executor(
                        None, _meta_size, upload.staging, meta, self._dtype
                    )
                    self.check_fits(size, f"model {fingerprint[:12]}")
                with contextlib.suppress(OSError):  # a racing twin may have stored it first
                    upload.staging.rename(self._path(fingerprint))
            finally:
                shutil.rmtree(upload.staging, ignore_errors=True)
        log.info("model %s: uploaded and stored", fingerprint[:12])
        await self.load(fingerprint, hashed=True)
        return messages.Registered("ready", fingerprint)

    def abandon(self, owner: object) -> None:
        """A connection closed: keep its unfinished uploads for a later resume (a few)."""
        for upload in self._uploads.values():
            if upload.owner is owner:
                upload.owner = None
        orphans = [f for f, u in self._uploads.items() if u.owner is None]
        for fingerprint in orphans[:-ORPHANS_KEPT] if len(orphans) > ORPHANS_KEPT else []:
            shutil.rmtree(self._uploads.pop(fingerprint).staging, ignore_errors=True)

    def close(self) -> None:
        for upload in self._uploads.values():
            shutil.rmtree(upload.staging, ignore_errors=True)
        self._uploads.clear()

    # -- budgets -------------------------------------------------------------------------

    def check_fits(self, nbytes: int, what: str) -> None:
        """Refuse a model that cannot fit even after evicting every idle one."""
        budget = self._config.memory_budget_bytes
        pinned = sum(m.nbytes for m in self._models.values() if m.refcount > 0)
        if pinned + nbytes > budget:
            raise QuotaExceededError(
                f"cannot load {what}: its weights take {nbytes:,} bytes and models in use hold "
                f"{pinned:,} of the server's {budget:,}-byte budget (--memory-budget)"
            )
        free = self._device.free_bytes()
        idle = sum(m.nbytes for m in self._models.values() if m.refcount == 0)
        if free is not None and nbytes > free + idle:
            raise QuotaExceededError(
                f"cannot load {what}: its weights take {nbytes:,} bytes and the device has "
                f"{free:,} free"
            )

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

    # -- loading -------------------------------------------------------------------------

    async def load(self, fingerprint: str, hashed: bool = False) -> LoadedModel:
        """The model in memory, loading it from the store once however many ask. `hashed`:
        its stored files were hashed a moment ago (a commit), so the load need not again."""
        model = self._models.get(fingerprint)
        if model is not None:
            return model
        pending = self._loading.get(fingerprint)
        if pending is not None:
            return await asyncio.shield(pending)
        pending = asyncio.get_running_loop().create_future()
        self._loading[fingerprint] = pending
        try:
            loop = asyncio.get_running_loop()
            meta, size = await loop.run_in_executor(None, self._inspect, fingerprint, hashed)
            self.check_fits(size, f"model {fingerprint[:12]}")
            self._make_room(size)
            model = await loop.run_in_executor(None, self._load_from_disk, fingerprint, meta)
            self._models[fingerprint] = model
            pending.set_result(model)
        except BaseException as exc:
            pending.set_exception(exc)
            pending.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            del self._loading[fingerprint]
        log.info(
            "model %s loaded from %s (%d bytes)",
            fingerprint[:12],
            self._source(fingerprint),
            model.nbytes,
        )
        return model

    def _source(self, fingerprint: str) -> str:
        """Where a model is read from, as an operator named it."""
        folder = self._named.get(fingerprint)
        if folder is None:
            return "the store"
        names = [name for name, fp in self.names.items() if fp == fingerprint]
        return f"--model {names[0]}={folder.path}" if names else str(folder.path)

    def _inspect(self, fingerprint: str, hashed: bool = False) -> tuple[dict[str, Any], int]:
        """The stored spec, checked file by file, and the bytes the model will take,
        counted on the meta device before anything is allocated."""
        folder = self._named.get(fingerprint)
        if folder is not None:
            if changed(folder):
                raise RemoteUsageError(
                    f"cannot load model {fingerprint[:12]}: the files in {folder.path.name} "
                    "changed since the server started; restart it to serve them"
                )
            meta = _spec_meta(folder.spec)
            return meta, _meta_size(folder.path, meta, self._dtype)
        path = self._path(fingerprint)
        try:
            meta = json.loads((path / "djinn.json").read_text())
            if meta["kind"] not in _KINDS:  # damage, never code to trust
                raise ValueError(f"djinn.json names no kind of model djinn loads: {meta['kind']!r}")
            files = {} if hashed else meta["files"]
            for name, digest in files.items():
                if file_sha256(path / name) != digest:
                    raise ValueError(f"{name} does not match its recorded hash")
        except FileNotFoundError:
            raise RemoteUsageError(
                f"cannot load model {fingerprint[:12]}: not in the store"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self._quarantine(fingerprint, str(exc))
            raise StoreCorruptError(
                f"cannot load model {fingerprint[:12]}: its stored copy is damaged and was set "
                "aside; register the model again to upload it again"
            ) from None
        if meta["kind"] == "pickle" and not self._config.trust_remote_code:
            raise _refuse_code()
        if meta["kind"] == "transformers":
            size = _meta_size(path, meta, self._dtype)
        else:
            size = manifest_bytes(_manifest(meta), self._dtype)
        return meta, size

    def _quarantine(self, fingerprint: str, why: str) -> None:
        path = self._path(fingerprint)
        target = self._root / f".quarantine-{fingerprint}-{int(time.time())}"
        self._stored.pop(fingerprint, None)
        try:
            path.rename(target)
        except OSError as exc:
            log.error(
                "model %s: stored copy is damaged (%s); cannot move it aside: %s",
                fingerprint[:12],
                why,
                exc,
            )
            return
        log.error(
            "model %s: stored copy is damaged (%s); moved to %s", fingerprint[:12], why, target
        )

    def _load_from_disk(self, fingerprint: str, meta: dict[str, Any]) -> LoadedModel:
        named = self._named.get(fingerprint)
        path = named.path if named is not None else self._path(fingerprint)
        try:
            if meta["kind"] == "transformers":
                module = _load_transformers(path, meta, self._dtype)
            else:  # "pickle": _inspect refused any other kind, and code not trusted
                module = _load_pickled(path, self._dtype)
        except (OSError, ValueError, KeyError) as exc:  # damaged since it was hashed
            if named is not None:  # the operator's folder: named and refused, never moved
                del self._named[fingerprint]
                raise StoreCorruptError(
                    f"cannot load model {fingerprint[:12]} from {named.path.name}: {exc}"
                ) from None
            self._quarantine(fingerprint, str(exc))
            raise StoreCorruptError(
                f"cannot load model {fingerprint[:12]}: its stored copy is damaged and was set "
                "aside; register the model again to upload it again"
            ) from None
        module = module.to(self._device.device).eval()
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
        arg = cache_arg(module) or ""
        model = LoadedModel(
            fingerprint=fingerprint,
            module=module,
            nbytes=sum(t.nbytes for t in tensors.values()),
            cache_arg=arg,
            facts=ModelFacts.of(getattr(module, "config", None)),
            dtype=dtype,
            takes_positions=bool(arg) and takes_positions(module),
        )
        if self._config.compile != "off" and model.takes_positions and model.facts.vocab_size:
            model.decode, model.warmup = compiled.prepare(
                module,
                arg,
                model.facts.vocab_size,
                self._device.device,
                self._config.compile,
                fingerprint[:12],
            )
        return model

    def acquire(self, fingerprint: str) -> LoadedModel:
        model = self._models.get(fingerprint)
        if model is None:
            raise RemoteUsageError("cannot open a session: register the model first")
        model.refcount += 1
        model.last_used = time.monotonic()
        return model

    def release(self, model: LoadedModel) -> None:
        model.refcount -= 1
        model.last_used = time.monotonic()

    def listing(self) -> list[messages.ModelInfo]:
        """Every model the server can serve: in memory (resident), or only on disk (held by
        --model or in the store), by name where it has one."""
        names = {fp: name for name, fp in self.names.items()}
        out = [
            messages.ModelInfo(
                name=names.get(fp, ""),
                fingerprint=fp,
                parameters=sum(p.numel() for p in model.module.parameters()),
                dtype=str(model.dtype).removeprefix("torch."),
                resident=True,
                nbytes=model.nbytes,
            )
            for fp, model in self._models.items()
        ]
        on_disk = {fp: folder.spec for fp, folder in self._named.items()}
        for meta_file in sorted(self._root.glob("*/djinn.json")) if self._root.is_dir() else []:
            fp = meta_file.parent.name
            if messages.is_fingerprint(fp) and fp not in on_disk:
                spec = self._stored.get(fp) or self._read_spec(meta_file)
                if spec is not None:
                    on_disk[fp] = self._stored[fp] = spec
        for fp, spec in on_disk.items():
            if fp in self._models:
                continue
            dtypes = [e.dtype for e in spec.manifest if TORCH_DTYPES[e.dtype][0].is_floating_point]
            out.append(
                messages.ModelInfo(
                    name=names.get(fp, ""),
                    fingerprint=fp,
                    parameters=sum(math.prod(e.shape) for e in spec.manifest),
                    dtype=max(set(dtypes), key=dtypes.count) if dtypes else "",
                    resident=False,
                    nbytes=manifest_bytes(spec.manifest, self._dtype),
                )
            )
        return out

    @staticmethod
    def _read_spec(meta_file: Path) -> messages.ModelSpec | None:
        """A store entry's spec, read once: its djinn.json never changes (the folder is
        named by the content's fingerprint), and a quarantined entry leaves the glob."""
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            meta = json.loads(meta_file.read_text())
            entries = _manifest(meta)
            if meta["kind"] in _KINDS and all(e.dtype in TORCH_DTYPES for e in entries):
                return messages.ModelSpec(meta["kind"], meta["cls"], meta_file.parent.name, entries)
        return None

    def card(self, model: LoadedModel) -> messages.ModelCard:
        """What a client needs to stand in for a model it attached by name."""
        import transformers

        module = model.module
        config = getattr(module, "config", None)
        if config is None or getattr(transformers, type(module).__name__, None) is not type(module):
            raise RemoteUsageError(
                "cannot describe this model: only transformers models can be attached by name"
            )
        return messages.ModelCard(
            type(module).__name__,
            json.loads(config.to_json_string(use_diff=False)),
            generation_dict(getattr(module, "generation_config", None)),
        )


def _refuse_code() -> RemoteCodeRefusedError:
    return RemoteCodeRefusedError(
        "cannot load a pickled module: this server does not run client code; "
        "start it with --trust-remote-code, or wrap a transformers model instead"
    )


def _transformers_class(name: str) -> Any:
    import transformers

    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise RemoteUsageError(
            f"cannot load model: {name!r} is not a transformers model class "
            f"in transformers {transformers.__version__}"
        )
    return cls


def _manifest(meta: Mapping[str, Any]) -> list[messages.TensorEntry]:
    return [messages.TensorEntry(n, d, shape) for n, d, shape in meta["manifest"]]


def _meta_size(path: Path, meta: Mapping[str, Any], dtype: torch.dtype | None) -> int:
    """The model's bytes, from its config built on the meta device; refuses a config that
    builds weights the manifest lacks (it would allocate them at load)."""
    import transformers

    cls = _transformers_class(meta["cls"])
    config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    with torch.device("meta"):
        module = cls(config)
    shapes = {name: list(shape) for name, _, shape in meta["manifest"]}
    sources = dict(meta.get("aliases", []))
    params = dict(module.named_parameters(remove_duplicate=False))
    missing = [n for n in params if n not in shapes and sources.get(n) not in shapes]
    if missing:
        raise RemoteUsageError(
            f"cannot load model: its config builds weights the upload lacks: {sorted(missing)[:5]}"
        )
    for name, param in params.items():
        uploaded = shapes.get(name) or shapes[sources[name]]
        if list(param.shape) != uploaded:
            raise RemoteUsageError(
                f"cannot load model: its config builds {name} as {list(param.shape)}, "
                f"the upload holds {uploaded}"
            )
    total = 0
    seen: set[int] = set()
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        itemsize = dtype.itemsize if dtype is not None and tensor.is_floating_point() else None
        total += tensor.numel() * (itemsize or tensor.element_size())
    return total


def _load_transformers(path: Path, meta: Mapping[str, Any], dtype: torch.dtype | None) -> Any:
    import transformers

    # the server logs loads itself
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    cls = _transformers_class(meta["cls"])
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    module = cls.from_pretrained(str(path), **kwargs)
    _restore_aliases(module, meta)
    return module


def _restore_aliases(module: torch.nn.Module, meta: Mapping[str, Any]) -> None:
    """Weights that shared memory on the client, and were not tied again by the config."""
    state = module.state_dict()
    for alias, source in meta.get("aliases", []):
        if alias in state and state[alias].data_ptr() != state[source].data_ptr():
            state[alias].copy_(state[source])


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
    """Unrestricted (the operator opted in, and _inspect checked it), with weights
    supplied from safetensors."""

    def __init__(self, file: Any, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__(file)
        self._weights = weights

    def persistent_load(self, pid: Any) -> Any:
        return self._weights[pid[1]]
