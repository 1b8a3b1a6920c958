"""Receive buffers: the memory a socket reads payloads into, which becomes tensor storage.

Large buffers come from a `BufferPool`: the first touch of fresh memory costs
a page fault per 4 KiB page, which on a virtual machine made a fresh 64 MiB
receive buffer cost as much as the copy into it. A pooled block goes back to
the pool when the last array or tensor built on it is gone, so reuse never
overwrites memory anyone still holds.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import torch

from djinn.errors import RemoteProtocolError

# Below this, a bytearray is cheaper than a pooled block and glibc reuses
# freed heap memory anyway.
POOL_MIN_BYTES: Final = 1024 * 1024
# Idle blocks kept for reuse, at most; more are freed.
POOL_IDLE_BYTES: Final = 512 * 1024 * 1024


def _size_class(nbytes: int) -> int:
    return 1 << (nbytes - 1).bit_length()


def host_block(nbytes: int) -> np.ndarray:
    return torch.empty(nbytes, dtype=torch.uint8).numpy()


def pinned_block(nbytes: int) -> np.ndarray:
    """Page-locked, so copies to a GPU run asynchronously."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).numpy()


class BufferPool:
    """An allocator of receive buffers that recycles large blocks.

    Call it with a byte count. Blocks are power-of-two sized; a buffer is a
    view of the first `nbytes` of one, and the block returns to the pool when
    that view (and so every tensor made from it) has been freed.
    """

    def __init__(
        self,
        new_block: Callable[[int], np.ndarray] = host_block,
        max_idle_bytes: int = POOL_IDLE_BYTES,
        max_in_use_bytes: int | None = None,
    ) -> None:
        """`max_in_use_bytes` bounds the blocks handed out and not yet back: past
        it a request raises RemoteProtocolError, so one peer's frame headers cannot
        make this process allocate without limit."""
        self._new_block = new_block
        self._max_idle = max_idle_bytes
        self._max_in_use = max_in_use_bytes
        self._idle: dict[int, list[np.ndarray]] = {}
        self._idle_bytes = 0
        self._in_use = 0
        self._lock = threading.Lock()  # blocks come back on whatever thread freed them

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    def __call__(self, nbytes: int) -> Any:
        if nbytes < POOL_MIN_BYTES:
            return bytearray(nbytes)
        size = _size_class(nbytes)
        with self._lock:
            if self._max_in_use is not None and self._in_use + size > self._max_in_use:
                raise RemoteProtocolError(
                    f"cannot accept a buffer of {nbytes} bytes: {self._in_use} of the "
                    f"{self._max_in_use}-byte receive budget are in use; retry later"
                )
            self._in_use += size
            idle = self._idle.get(size)
            block = idle.pop() if idle else None
            if block is not None:
                self._idle_bytes -= size
        if block is None:
            block = self._new_block(size)
        view = np.frombuffer(block, dtype=np.uint8, count=nbytes)
        weakref.finalize(view, self._give, block)
        return view

    def _give(self, block: np.ndarray) -> None:
        with self._lock:
            self._in_use -= block.nbytes
            if self._idle_bytes + block.nbytes <= self._max_idle:
                self._idle.setdefault(block.nbytes, []).append(block)
                self._idle_bytes += block.nbytes


_shared: list[BufferPool] = []
_shared_lock = threading.Lock()


def shared_pool() -> BufferPool:
    """The pool every client connection of this process receives into."""
    with _shared_lock:
        if not _shared:
            _shared.append(BufferPool())
        return _shared[0]


class Share:
    """One connection's share of a pool: past `cap` bytes in use at once, its frames are
    refused, so one peer cannot hold the whole receive budget while others wait."""

    def __init__(self, pool: BufferPool, cap: int) -> None:
        self._pool = pool
        self._cap = cap
        self._lock = threading.Lock()
        self.in_use = 0

    def __call__(self, nbytes: int) -> Any:
        if nbytes < POOL_MIN_BYTES:
            return bytearray(nbytes)
        size = _size_class(nbytes)
        with self._lock:
            if self.in_use + size > self._cap:
                raise RemoteProtocolError(
                    f"cannot accept a buffer of {nbytes} bytes: this connection holds "
                    f"{self.in_use} bytes of receive buffers, its share is {self._cap}; "
                    "send smaller frames"
                )
            self.in_use += size
        try:
            view = self._pool(nbytes)
        except BaseException:
            self._give(size)
            raise
        weakref.finalize(view, self._give, size)
        return view

    def _give(self, size: int) -> None:
        with self._lock:
            self.in_use -= size
