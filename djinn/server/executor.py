"""Model work off the event loop, on the server's device.

One worker thread owns the device: calls from every session queue there
while the event loop keeps moving bytes, so the next request is received
while this one is copied and computed. On a CUDA device:

- received payloads land in pinned host memory (the receive pool), and go
  to the device with non-blocking copies on the worker's own stream;
- model work runs on that stream, never on the default one;
- results leave through pinned buffers (non-blocking device-to-host);
- each job ends by synchronizing the stream once, which is both what a
  result needs before it can be sent and what lets the pinned inputs go
  back to the pool: no copy can still be reading them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

from djinn.errors import ServerBusyError, UsageError
from djinn.net.buffers import BufferPool, host_block, pinned_block
from djinn.net.frame import Allocator

T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """'auto' (CUDA when available), 'cpu', 'cuda' or 'cuda:N'; UsageError otherwise."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(
            f"cannot use device {name!r}: expected auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"cannot use device {name}: CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"cannot use device {name}: only {torch.cuda.device_count()} CUDA device(s)"
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UsageError(f"cannot use device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


class Executor:
    def __init__(self, device: torch.device, receive_budget: int, max_queued: int) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.receive_pool = BufferPool(
            pinned_block if self.is_cuda else host_block, max_in_use_bytes=receive_budget
        )
        self.allocate: Allocator = self.receive_pool
        self._stream = torch.cuda.Stream(device) if self.is_cuda else None  # type: ignore[no-untyped-call]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="djinn-device")
        self._max_queued = max_queued
        self.queued = 0
        # Wall time the device thread spent in jobs (final sync included), and how many:
        # what lets a client split a call's time into the server's work and the rest.
        self.busy_s = 0.0
        self.jobs = 0

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the device thread under inference mode.

        Raises ServerBusyError rather than queue past the server's limit.
        """
        if self.queued >= self._max_queued:
            raise ServerBusyError(
                f"cannot queue more work: {self.queued} calls are waiting for the device; "
                "retry later"
            )
        self.queued += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._call, fn, args)
        finally:
            self.queued -= 1

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        start = time.perf_counter()
        with torch.inference_mode(), self._on_stream():
            try:
                return fn(*args)
            finally:
                if self._stream is not None:
                    self._stream.synchronize()
                self.busy_s += time.perf_counter() - start
                self.jobs += 1

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        if self._stream is None:
            yield
        else:
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                yield

    def to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """A received tensor on the device; from pinned memory the copy is asynchronous."""
        if tensor.device == self.device:
            return tensor
        return tensor.to(self.device, non_blocking=tensor.is_pinned())

    def to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """A result to send: on the host, in pinned memory when it comes from the device.

        The copy is queued on the worker's stream and complete when the job
        returns (see _call), before anything reads the bytes.
        """
        if tensor.device.type == "cpu":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        return host

    def memory(self) -> dict[str, int]:
        """Device memory facts for server_stats (empty on CPU)."""
        if not self.is_cuda:
            return {}
        free, total = torch.cuda.mem_get_info(self.device)
        return {
            "device_total_bytes": total,
            "device_free_bytes": free,
            "device_allocated_bytes": torch.cuda.memory_allocated(self.device),
        }

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
