"""The CUDA path: pinned receive buffers, device-resident models, dtypes, out-of-memory.

Marked `gpu`: skipped where CUDA is not available (see conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import djinn
from djinn import RemoteModel, RemoteTensor
from djinn.errors import DeviceOutOfMemoryError, RemoteUsageError
from djinn.net.buffers import BufferPool, pinned_block
from harness.server import ServerProcess
from tests.models import BUILDERS, prompt, tiny_gpt2

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300)]


@pytest.fixture(scope="module", params=["float32", "float16", "bfloat16"])
def cuda_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str]]:
    store = tmp_path_factory.mktemp("store")
    args = ("--store", str(store), "--device", "cuda", "--dtype", request.param)
    with ServerProcess(*args) as proc:
        yield proc, request.param


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_greedy_parity_with_a_local_model_of_the_same_dtype(
    cuda_server: tuple[ServerProcess, str], arch: str
) -> None:
    server, dtype_name = cuda_server
    dtype = getattr(torch, dtype_name)
    model = BUILDERS[arch]()
    local = BUILDERS[arch]().to("cuda", dtype)
    ids = prompt(batch=2, length=20)
    with torch.no_grad():
        expected = local.generate(ids.cuda(), max_new_tokens=24, do_sample=False).cpu()
    for policy in ("full", "semantic_blind"):
        with RemoteModel(model, server.address, policy=policy) as rm:
            assert torch.equal(rm.generate(ids, max_new_tokens=24), expected), policy


def test_server_reports_its_device_and_memory(cuda_server: tuple[ServerProcess, str]) -> None:
    server, _ = cuda_server
    with djinn.connect(server.address) as client:
        stats = client.server_stats()
    assert stats["device"].startswith("cuda")
    assert stats["device_total_bytes"] > stats["device_free_bytes"] > 0


def test_cuda_tensors_echo_through_pinned_memory(cuda_server: tuple[ServerProcess, str]) -> None:
    server, _ = cuda_server
    tensor = torch.randn(4, 1024, 1024, device="cuda")
    with djinn.connect(server.address) as client:
        back = client.echo(tensor)
    assert back.device.type == "cpu" and torch.equal(back, tensor.cpu())


def test_receive_pool_hands_out_pinned_memory() -> None:
    pool = BufferPool(pinned_block)
    buffer = pool(4 * 1024 * 1024)
    assert torch.from_numpy(buffer).is_pinned()


def test_kv_cache_stays_on_the_device_and_counts_against_the_session(tmp_path: Path) -> None:
    args = ("--store", str(tmp_path), "--device", "cuda")
    with (
        ServerProcess(*args) as proc,
        djinn.connect(proc.address) as observer,
        RemoteModel(tiny_gpt2(), proc.address) as rm,
    ):
        out = rm(prompt(length=64))
        token = out.logits[:, -1].argmax(-1, keepdim=True).cpu()
        assert isinstance(token, torch.Tensor) and token.device.type == "cpu"
        assert observer.server_stats()["resident_bytes"] > 0
        del out


def test_out_of_range_indices_are_errors_not_device_asserts(tmp_path: Path) -> None:
    """On CUDA each of these would be a device-side assert, the end of every session."""
    args = ("--store", str(tmp_path), "--device", "cuda")
    with (
        ServerProcess(*args) as proc,
        RemoteModel(tiny_gpt2(), proc.address) as rm,
        RemoteModel(tiny_gpt2(), proc.address) as other,
    ):
        logits = rm(prompt(length=16)).logits  # [1, 16, VOCAB]
        assert isinstance(logits, RemoteTensor)
        far = logits[:, -1].argmax(-1) + 10**6  # made on the device, never read
        bad = [
            lambda: logits.gather(-1, far[:, None, None].expand(1, 16, 1)),
            lambda: logits[0].index_select(0, far),
            lambda: logits[0, far],
            lambda: torch.multinomial(logits[0, -1].softmax(-1).log(), 4, replacement=True),
            lambda: rm(far[:, None]).logits,
        ]
        for make in bad:
            with pytest.raises(RemoteUsageError, match=r"outside|cannot sample"):
                make().cpu()
            # the device is still fine, for this session and the other one
            assert rm.generate(prompt(), max_new_tokens=2).shape == (1, 14)
            assert other.generate(prompt(), max_new_tokens=2).shape == (1, 14)


def test_device_out_of_memory_is_a_typed_error_for_that_session_only(tmp_path: Path) -> None:
    # budgets past the device's memory, so that the device itself runs out
    args = ("--store", str(tmp_path), "--device", "cuda", "--session-quota", "4096")
    args += ("--session-memory", "4096")
    with (
        ServerProcess(*args) as proc,
        RemoteModel(tiny_gpt2(), proc.address) as greedy,
        RemoteModel(tiny_gpt2(), proc.address) as other,
    ):
        logits = greedy(prompt(length=16), use_cache=False).logits
        assert isinstance(logits, RemoteTensor)
        free = torch.cuda.mem_get_info()[1]
        copies = int(free // logits.nbytes) * 4
        huge = logits.repeat(copies, 1, 1)  # several times the device's memory
        with pytest.raises(DeviceOutOfMemoryError):
            huge.sum().item()
        assert other.generate(prompt(), max_new_tokens=4).shape == (1, 16)
        assert greedy.generate(prompt(), max_new_tokens=4).shape == (1, 16)
