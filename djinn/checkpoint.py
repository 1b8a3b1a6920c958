"""Model folders (config.json and safetensors shards) registered without building the
model: the spec comes from the config and the shards' headers, the fingerprint and the
upload from the files, a chunk at a time.

The client attaches a model it cannot hold this way (RemoteModel.from_pretrained),
and a server registers its own `--model NAME=PATH` folders the same way, so both
reach the same fingerprint for the same files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import msgspec
import torch

from djinn import messages
from djinn.errors import UsageError
from djinn.fingerprint import Hasher, canonical_config, header
from djinn.net.codec import TORCH_DTYPES
from djinn.paths import cache_root

NO_FINGERPRINT: Final = "0" * 64
READ_BYTES: Final = 16 << 20  # hashing reads the files this much at a time
MAX_HEADER_BYTES: Final = 100 << 20
_SAFETENSORS_DTYPES: Final = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
_INDEX: Final = "model.safetensors.index.json"
_SINGLE: Final = "model.safetensors"


class Span(NamedTuple):
    """Where one weight's bytes lie."""

    file: Path
    offset: int
    nbytes: int


class Folder(NamedTuple):
    """A model folder, read: its spec (the fingerprint still a placeholder), where each
    weight of the manifest lies, the files' (name, size, mtime) to notice edits, and the
    config it was checked against (a client stands in for the model with it)."""

    path: Path
    spec: messages.ModelSpec
    spans: list[Span]
    stamp: list[tuple[str, int, int]]
    config: Any


def transformers_spec(
    cls: str, config: Any, generation: Any, manifest: list[messages.TensorEntry], aliases: Any
) -> messages.ModelSpec:
    """The spec of a stock transformers model: rebuilt on the server from its config."""
    fields = json.loads(config.to_json_string(use_diff=False))
    fields["architectures"] = [cls]
    return messages.ModelSpec(
        kind="transformers",
        cls=cls,
        fingerprint=NO_FINGERPRINT,
        manifest=manifest,
        aliases=[tuple(pair) for pair in aliases],
        config=canonical_config(fields),
        generation_config=generation_dict(generation),
    )


def generation_dict(generation: Any) -> dict[str, Any] | None:
    """A GenerationConfig as the fields that differ from transformers' defaults."""
    if generation is None:
        return None
    fields: dict[str, Any] = json.loads(generation.to_json_string(use_diff=True))
    fields.pop("transformers_version", None)
    return fields


def read_folder(path: str | os.PathLike[str]) -> Folder:
    """The folder's spec and weight spans, checked against its config. Raises UsageError
    naming what is wrong: no config, no shards, a truncated or missing shard, a weight
    the config builds that no shard holds, a shape that disagrees with the config."""
    import transformers

    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise UsageError(f"cannot attach {folder}: it holds no config.json (not a model folder)")
    shards, stamp = _shards(folder)
    headers: dict[str, tuple[str, list[int], Span]] = {}
    for shard in shards:
        headers.update(_header(shard))
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:  # not JSON, or a model_type unknown here
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        why = f"its config.json cannot be read: {line}"
        raise UsageError(f"cannot attach {folder}: {why}") from None
    cls = _architecture(folder, config)
    with torch.device("meta"):
        module = cls(config)
    state = module.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    aliases = []
    for name, tensor in state.items():
        if id(tensor) in first and tensor.numel():
            aliases.append((name, first[id(tensor)]))
        else:
            first.setdefault(id(tensor), name)
    unique = [name for name in state if first.get(id(state[name])) == name]
    missing = [name for name in unique if name not in headers]
    if missing:
        raise UsageError(
            f"cannot attach {folder}: its config builds weights no shard holds: "
            f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    manifest, spans = [], []
    for name in unique:
        dtype, shape, span = headers[name]
        if shape != list(state[name].shape):
            raise UsageError(
                f"cannot attach {folder}: its config builds {name} as "
                f"{list(state[name].shape)}, the shard {span.file.name} holds {shape}"
            )
        manifest.append(messages.TensorEntry(name, dtype, shape))
        spans.append(span)
    generation = _generation(folder, config)
    spec = transformers_spec(cls.__name__, config, generation, manifest, aliases)
    return Folder(folder, spec, spans, stamp, config)


def hash_folder(folder: Folder) -> str:
    """The fingerprint, read from the files a chunk at a time (never the whole model)."""
    hasher = Hasher(folder.spec)
    buffer = bytearray(READ_BYTES)
    view = memoryview(buffer)
    for span in folder.spans:
        with span.file.open("rb", buffering=0) as f:
            f.seek(span.offset)
            left = span.nbytes
            while left:
                got = f.readinto(view[: min(left, READ_BYTES)])
                if not got:
                    raise UsageError(f"cannot attach: {span.file} ended early (truncated?)")
                hasher.update_bytes(view[:got])
                left -= got
    return hasher.hexdigest()


def weights(folder: Folder, start: int) -> Iterator[torch.Tensor]:
    """The manifest's tensors from index `start` on, each read from its shard when asked
    for: at most one weight (and an upload chunk) in memory at a time."""
    for entry, span in zip(folder.spec.manifest[start:], folder.spans[start:], strict=True):
        data = bytearray(span.nbytes)
        with span.file.open("rb", buffering=0) as f:
            f.seek(span.offset)
            if f.readinto(data) != span.nbytes:
                raise UsageError(f"cannot attach: {span.file} ended early (truncated?)")
        dtype = TORCH_DTYPES[entry.dtype][0]
        if not data:  # frombuffer refuses an empty buffer
            yield torch.empty(entry.shape, dtype=dtype)
            continue
        yield torch.frombuffer(data, dtype=dtype).reshape(entry.shape)


def fingerprinted(folder: Folder, cache: Path | None) -> Folder:
    """The folder with its fingerprint in its spec (see `fingerprint_of`)."""
    fingerprint = fingerprint_of(folder, cache)
    return folder._replace(spec=msgspec.structs.replace(folder.spec, fingerprint=fingerprint))


def fingerprint_of(folder: Folder, cache: Path | None) -> str:
    """The folder's fingerprint, remembered in `cache` (a JSON file) by path and the
    files' sizes and mtimes, so attaching the same files again reads none of them."""
    key = str(folder.path)
    known: dict[str, Any] = {}
    if cache is not None:
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
    entry = known.get(key)
    stamp = [list(s) for s in folder.stamp]
    spec_hash = hashlib.sha256(header(folder.spec)).hexdigest()
    if isinstance(entry, dict) and entry.get("files") == stamp and entry.get("spec") == spec_hash:
        return str(entry["fingerprint"])
    fingerprint = hash_folder(folder)
    if cache is not None:
        known[key] = {"files": stamp, "spec": spec_hash, "fingerprint": fingerprint}
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(json.dumps(known))
        partial.replace(cache)
    return fingerprint


def changed(folder: Folder) -> bool:
    """Whether any file was replaced or edited since the folder was read."""
    names = [Path(name) for name, _, _ in folder.stamp[1:]]  # the first is config.json
    return _stamp(folder.path, names) != folder.stamp


def user_cache() -> Path:
    """Where the client remembers fingerprints: $DJINN_CACHE, else the user's cache folder."""
    root = os.environ.get("DJINN_CACHE")
    return (Path(root) if root else cache_root()) / "fingerprints.json"


# -- the pieces -------------------------------------------------------------------------


def _shards(folder: Path) -> tuple[list[Path], list[tuple[str, int, int]]]:
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"cannot attach {folder}: {_INDEX} is damaged ({exc})") from None
    elif (folder / _SINGLE).is_file():
        names = [_SINGLE]
    else:
        raise UsageError(
            f"cannot attach {folder}: it holds no safetensors weights ({_SINGLE} or {_INDEX}); "
            "save the model with save_pretrained(..., safe_serialization=True)"
        )
    paths = []
    for name in names:
        shard = (folder / name).resolve()
        if shard.parent != folder or not shard.is_file():
            raise UsageError(f"cannot attach {folder}: the shard {name} is missing")
        paths.append(shard)
    relative = [Path(name) for name in names]
    return paths, _stamp(folder, relative)


def _stamp(folder: Path, names: list[Path]) -> list[tuple[str, int, int]]:
    out = []
    for name in [Path("config.json"), *names]:
        try:
            st = (folder / name).stat()
        except OSError:
            out.append((str(name), -1, -1))
            continue
        out.append((str(name), st.st_size, st.st_mtime_ns))
    return out


def _header(shard: Path) -> dict[str, tuple[str, list[int], Span]]:
    """A safetensors file's weights: dtype, shape and byte span each, checked against the
    file's size so a truncated shard is named here, not at load."""
    size = shard.stat().st_size
    with shard.open("rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise UsageError(f"cannot attach: {shard} is not a safetensors file (or truncated)")
        try:
            header = json.loads(f.read(length))
        except ValueError:
            raise UsageError(f"cannot attach: {shard} has a damaged safetensors header") from None
    out = {}
    start = 8 + length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
        begin, end = info.get("data_offsets", (0, -1))
        shape = list(info.get("shape", []))
        if dtype is None:
            raise UsageError(f"cannot attach: {shard} holds {name} as {info.get('dtype')}")
        if end - begin != math.prod(shape) * TORCH_DTYPES[dtype][1] or begin < 0:
            raise UsageError(f"cannot attach: {shard} describes {name} inconsistently")
        if start + end > size:
            raise UsageError(
                f"cannot attach: {shard} is truncated ({size:,} bytes; {name} ends at "
                f"{start + end:,})"
            )
        out[name] = (dtype, shape, Span(shard, start + begin, end - begin))
    return out


def _architecture(folder: Path, config: Any) -> Any:
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    raise UsageError(
        f"cannot attach {folder}: its config names no transformers architecture "
        f"({names or 'none'}); attach code of your own with RemoteModel(model)"
    )


def _generation(folder: Path, config: Any) -> Any:
    """The generation defaults a from_pretrained model would carry."""
    from transformers import GenerationConfig

    if (folder / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    return GenerationConfig.from_model_config(config)
