"""Model work off the event loop, one step at a time, fairly.

Each call that needs the device runs as a job on a worker thread, while
the event loop keeps moving bytes. Only the thread that holds the device's
`Turn` may compute; the turn is a FIFO lock that a job gives back between
its steps (a decode step, a prefill chunk, a slice of queued operations),
so one long generate never holds the device for more than one step while
others wait. Every job has a `Job` ticket: cancelled when its client sends
CANCEL or its connection drops, and past its deadline after
--max-call-seconds; the job checks it between steps and stops.

On a CUDA device every worker thread computes on one stream of its own:
received payloads land in pinned host memory and reach the device with
non-blocking copies; results leave through pinned buffers; each job ends
by synchronizing that stream, which both completes its results and lets
the pinned inputs go back to the pool.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Final, TypeVar

import torch

from djinn.errors import CancelledError, LimitExceededError, ServerBusyError, UsageError
from djinn.net.buffers import BufferPool, host_block, pinned_block
from djinn.server.batching import Batcher

T = TypeVar("T")

# A job that holds the turn this long while others wait gives it up at its next step.
SLICE_S: Final = 0.005


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


class Turn:
    """A FIFO lock: the next holder is whoever asked first. It counts the time it was held,
    which is how long the device worked."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: deque[threading.Lock] = deque()
        self._held = False
        self._since = 0.0
        self.held_s = 0.0
        self.grants = 0

    def try_acquire(self) -> bool:
        """Take the turn if nobody holds it or waits for it; never blocks."""
        with self._lock:
            if self._held or self._queue:
                return False
            self._grant()
            return True

    def acquire(self) -> None:
        with self._lock:
            if not self._held:
                self._grant()
                return
            waiter = threading.Lock()
            waiter.acquire()
            self._queue.append(waiter)
        waiter.acquire()  # release() hands the turn over by releasing it

    def release(self) -> None:
        with self._lock:
            self.held_s += time.perf_counter() - self._since
            if self._queue:
                self._grant()
                self._queue.popleft().release()
            else:
                self._held = False

    def _grant(self) -> None:
        self._held = True
        self._since = time.perf_counter()
        self.grants += 1

    @property
    def held(self) -> bool:
        return self._held

    @property
    def contended(self) -> bool:
        """Someone is waiting for the turn."""
        return bool(self._queue)


class Job:
    """One call's claim on the device: whether it should stop, and why."""

    def __init__(self, what: str, max_s: float) -> None:
        self.what = what
        self.max_s = max_s
        self.started = time.monotonic()
        self.cancelled: str | None = None
        self.slice_start = 0.0

    def cancel(self, reason: str) -> None:
        self.cancelled = reason

    def check(self) -> None:
        """Raise if the job must stop: CancelledError, or LimitExceededError past its time."""
        if self.cancelled is not None:
            raise CancelledError(f"cannot finish {self.what}: {self.cancelled}")
        if time.monotonic() - self.started > self.max_s:
            raise LimitExceededError(
                f"cannot finish {self.what}: it ran past the server's limit of {self.max_s:g}s "
                "of device time per call (--max-call-seconds); split the work into smaller calls"
            )


class Device:
    """The server's device, its worker threads, and the turn they share."""

    def __init__(
        self,
        name: str,
        receive_budget: int,
        max_queued: int,
        *,
        batching: bool = True,
        max_batch: int = 64,
        batch_wait_us: int = 0,
    ) -> None:
        self.device = resolve_device(name)
        self.is_cuda = self.device.type == "cuda"
        self.receive_pool = BufferPool(
            pinned_block if self.is_cuda else host_block, max_in_use_bytes=receive_budget
        )
        self.stream = torch.cuda.Stream(self.device) if self.is_cuda else None  # type: ignore[no-untyped-call]
        self.turn = Turn()
        self._max_queued = max_queued
        self._pool = ThreadPoolExecutor(
            max_workers=max_queued, thread_name_prefix="djinn-device", initializer=self._enter
        )
        self.queued = 0
        self.jobs = 0
        self.inline_jobs = 0  # of `jobs`, those run on the event loop (see `run`)
        self.tokens: collections.Counter[str] = collections.Counter()  # prefill, decode, generated
        self.batcher = Batcher(self, max_batch, batch_wait_us, batching)

    def _enter(self) -> None:
        if self.stream is not None:
            torch.cuda.set_device(self.device)
            torch.cuda.set_stream(self.stream)  # this thread's current stream, from now on

    async def run(self, job: Job, fn: Callable[..., T], *args: Any, short: bool = False) -> T:
        """Run `fn(job, *args)` on a worker thread holding the turn, under inference mode.

        A `short` job (one decode step) finding the device idle runs right here
        on the event loop instead: two thread hops and their wake-ups cost more
        than the step's own bookkeeping, and nothing else is waiting to run.
        Raises ServerBusyError rather than queue past --max-queued. If the caller
        is cancelled (its connection dropped), the job is told to stop.
        """
        if short and not self.queued and self.turn.try_acquire():
            self.inline_jobs += 1
            return self._held(job, fn, args)
        if self.queued >= self._max_queued:
            raise ServerBusyError(
                f"cannot queue more work: {self.queued} calls are waiting for the device "
                "(--max-queued); retry later"
            )
        self.queued += 1
        try:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self._pool, self._call, job, fn, args)
            try:
                return await asyncio.shield(future)
            except asyncio.CancelledError:
                job.cancel("the connection closed")
                raise
        finally:
            self.queued -= 1

    def _call(self, job: Job, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        self.turn.acquire()
        return self._held(job, fn, args)

    def _held(self, job: Job, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        """Run the job; the caller took the turn, and it is given back here."""
        job.slice_start = time.perf_counter()
        try:
            with torch.inference_mode(), self._on_stream():
                job.check()
                result = fn(job, *args)
                if self.stream is not None:
                    self.stream.synchronize()
                return result
        finally:
            self.jobs += 1
            self.turn.release()

    @contextlib.contextmanager
    def _on_stream(self) -> Iterator[None]:
        """The device's stream, current for the job (worker threads set it once)."""
        if self.stream is None or torch.cuda.current_stream(self.device) == self.stream:
            yield
        else:
            with torch.cuda.stream(self.stream):
                yield

    @contextlib.contextmanager
    def released(self) -> Iterator[None]:
        """Give the turn up for a while (to wait for a batched step); take it back after."""
        self.turn.release()
        try:
            yield
        finally:
            self.turn.acquire()

    def count(self, rows: int, new: int) -> None:
        """A forward's tokens: one new token per row is a decode step, more a prefill."""
        self.tokens["decode" if new == 1 else "prefill"] += rows * new

    def pause(self, job: Job) -> None:
        """Between steps: stop if the job must, and let a waiting job go first once
        this one has had its slice."""
        job.check()
        now = time.perf_counter()
        if self.turn.contended and now - job.slice_start > SLICE_S:
            self.turn.release()
            self.turn.acquire()
            job.slice_start = time.perf_counter()
            job.check()

    # -- moving tensors ------------------------------------------------------------------

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

    def free_bytes(self) -> int | None:
        """Free device memory, or None on CPU (where the budget flags are the limit)."""
        if not self.is_cuda:
            return None
        return int(torch.cuda.mem_get_info(self.device)[0])

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
