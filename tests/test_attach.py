"""A thin client: models attached from a folder (never built on the client) or by a name
the server holds, token-exact with local generate; uploads resumed; bad folders refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import djinn
from djinn import RemoteModel, checkpoint
from djinn.errors import DjinnError, RemoteUsageError, UsageError
from harness.server import ServerProcess
from tests.models import prompt, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test remembers fingerprints in a cache of its own."""
    monkeypatch.setenv("DJINN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama(seed=5).save_pretrained(folder, max_shard_size="200KB")  # several shards
    assert len(list(folder.glob("*.safetensors"))) > 2
    return folder


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("gpt2")
    tiny_gpt2(seed=6).save_pretrained(folder)  # tied lm_head: one file, an alias
    return folder


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[ServerProcess]:
    with ServerProcess("--store", str(tmp_path / "store"), "--device", "cpu") as proc:
        yield proc


def local_generate(folder: Path, ids: torch.Tensor, n: int = 16) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_attach_by_path_is_token_exact_and_remembers(
    fresh: ServerProcess,
    llama_folder: Path,
    gpt2_folder: Path,
    which: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    folder = llama_folder if which == "llama" else gpt2_folder
    ids = prompt(batch=2)
    expected = local_generate(folder, ids)
    with RemoteModel.from_pretrained(folder, fresh.address) as rm:
        assert rm.uploaded_bytes > 0 and rm.config.model_type == which
        assert torch.equal(rm.generate(ids, max_new_tokens=16), expected)
        first = rm.fingerprint

    def no_hashing(folder: checkpoint.Folder) -> str:
        raise AssertionError("hashed the files again")

    monkeypatch.setattr(checkpoint, "hash_folder", no_hashing)
    with RemoteModel.from_pretrained(str(folder), fresh.address) as rm:
        assert rm.fingerprint == first and rm.uploaded_bytes == 0
        assert torch.equal(rm.generate(ids, max_new_tokens=16), expected)


def test_the_folder_and_the_module_agree(fresh: ServerProcess, llama_folder: Path) -> None:
    """A folder attached by path lands on the fingerprint of the same model in memory."""
    model = AutoModelForCausalLM.from_pretrained(llama_folder, dtype=torch.float32)
    with (
        RemoteModel(model, fresh.address) as held,
        RemoteModel.from_pretrained(llama_folder, fresh.address) as attached,
    ):
        assert attached.uploaded_bytes == 0
        assert attached.fingerprint == held.fingerprint


def test_attach_by_name_needs_nothing_local(tmp_path: Path, llama_folder: Path) -> None:
    ids = prompt()
    expected = local_generate(llama_folder, ids)
    args = ["--store", str(tmp_path / "store"), "--device", "cpu"]
    with (
        ServerProcess(*args, "--model", f"tiny={llama_folder}") as server,
        djinn.connect(server.address) as client,
    ):
        [info] = client.models()
        assert info["name"] == "tiny" and not info["resident"]
        assert info["parameters"] == sum(p.numel() for p in tiny_llama().parameters())
        with RemoteModel.from_pretrained("tiny", client) as rm:
            assert rm.uploaded_bytes == 0 and rm.config.model_type == "llama"
            assert torch.equal(rm.generate(ids, max_new_tokens=16), expected)
            assert rm(ids).logits.shape == (1, ids.shape[1], rm.config.vocab_size)
        [info] = client.models()
        assert info["resident"]
        # the same files, attached by path on the client: the server holds them
        with RemoteModel.from_pretrained(llama_folder, client) as rm:
            assert rm.uploaded_bytes == 0
        with pytest.raises(RemoteUsageError, match="neither a fingerprint nor a name"):
            RemoteModel.from_pretrained("nonesuch", client)
    assert not list((tmp_path / "store").glob("*/djinn.json"))  # served in place, not copied


def test_a_killed_upload_resumes(
    fresh: ServerProcess, llama_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = prompt()
    expected = local_generate(llama_folder, ids)
    real = checkpoint.weights
    total = sum(s.nbytes for s in checkpoint.read_folder(llama_folder).spans)

    def dies_midway(folder: checkpoint.Folder, start: int) -> Iterator[torch.Tensor]:
        for index, tensor in enumerate(real(folder, start), start):
            if index == len(folder.spans) // 2:
                raise ConnectionResetError("the client died mid-upload")
            yield tensor

    monkeypatch.setattr("djinn.model.weights", dies_midway)
    monkeypatch.setattr("djinn.registration.CHUNK_BYTES", 1)  # a message per weight
    with pytest.raises(ConnectionResetError):
        RemoteModel.from_pretrained(llama_folder, fresh.address)
    monkeypatch.setattr("djinn.model.weights", real)
    with RemoteModel.from_pretrained(llama_folder, fresh.address) as rm:
        assert 0 < rm.uploaded_bytes < total
        assert torch.equal(rm.generate(ids, max_new_tokens=16), expected)


# -- bad folders ------------------------------------------------------------------------


@pytest.fixture
def copy(tmp_path: Path, llama_folder: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(llama_folder, target)
    return target


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "config.json").unlink(), "no config.json"),
        (lambda f: _shards(f)[1].unlink(), "is missing"),
        (
            lambda f: (
                [p.unlink() for p in _shards(f)] and (f / "model.safetensors.index.json").unlink()
            ),
            "no safetensors",
        ),
        (lambda f: _shards(f)[0].write_bytes(_shards(f)[0].read_bytes()[:-100]), "truncated"),
        (
            lambda f: _shards(f)[0].write_bytes(
                b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "
            ),
            "damaged",
        ),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps({**json.loads((f / "config.json").read_text()), "intermediate_size": 96})
            ),
            "its config builds",
        ),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps({**json.loads((f / "config.json").read_text()), "num_hidden_layers": 3})
            ),
            "no shard holds",
        ),
        (lambda f: (f / "config.json").write_text("{not json"), "config.json cannot be read"),
        (
            lambda f: (f / "config.json").write_text(
                json.dumps({**json.loads((f / "config.json").read_text()), "model_type": "nosuch"})
            ),
            "config.json cannot be read",
        ),
    ],
    ids=[
        "no-config",
        "missing-shard",
        "no-weights",
        "truncated",
        "bad-header",
        "shapes",
        "layers",
        "config-not-json",
        "unknown-model-type",
    ],
)
def test_bad_folders_are_refused_before_any_upload(
    copy: Path, damage: object, message: str
) -> None:
    damage(copy)  # type: ignore[operator]
    with pytest.raises(UsageError, match=message):
        checkpoint.read_folder(copy)


def test_a_bad_folder_sends_nothing(fresh: ServerProcess, copy: Path) -> None:
    _shards(copy)[0].write_bytes(_shards(copy)[0].read_bytes()[:-100])
    with djinn.connect(fresh.address) as client:
        with pytest.raises(UsageError, match="truncated"):
            RemoteModel.from_pretrained(copy, client)
        assert client.models() == []
    with pytest.raises(UsageError, match="no such folder"):
        RemoteModel.from_pretrained("./nowhere", fresh.address)


def test_the_server_refuses_bad_names(tmp_path: Path, llama_folder: Path, copy: Path) -> None:
    store = ["--store", str(tmp_path / "store"), "--device", "cpu"]
    with pytest.raises(DjinnError, match="must differ"):
        ServerProcess(*store, "--model", f"a={llama_folder}", "--model", f"a={copy}").start(30)
    (copy / "config.json").unlink()
    with pytest.raises(DjinnError, match=r"no config\.json"):
        ServerProcess(*store, "--model", f"b={copy}").start(30)
