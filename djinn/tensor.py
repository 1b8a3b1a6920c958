"""Handles to values the server holds: RemoteTensor and RemoteCache.

A handle knows what it needs to answer without a round trip (a tensor's
shape and dtype, a cache's length). Reading a tensor's values (`.cpu()`,
`.tolist()`, `.numpy()`, `.item()`, `torch.as_tensor`) fetches them. When a
handle is garbage-collected, its server-side value is released with the
session's next call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from djinn.errors import UsageError
from djinn.net.payload import Ref

if TYPE_CHECKING:
    from djinn.session import RemoteSession


class _Handle:
    __slots__ = ("__weakref__", "_ref", "_session")

    def __init__(self, session: RemoteSession, ref: Ref) -> None:
        self._session = session
        self._ref = ref

    @property
    def ref(self) -> Ref:
        return self._ref

    def _check_session(self, session: RemoteSession, what: str) -> None:
        if session is not self._session:
            raise UsageError(
                f"cannot use {what} of another RemoteModel's session: server state belongs "
                "to the session that made it; fetch it with .cpu() and pass the tensor instead"
            )

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter shutdown nothing is left
            self._session.release(self._ref)


class RemoteTensor(_Handle):
    """A tensor that lives on the server. Shape and dtype are known here; values cross when read."""

    __slots__ = ("dtype", "shape")

    def __init__(
        self, session: RemoteSession, ref: Ref, shape: tuple[int, ...], dtype: torch.dtype
    ) -> None:
        super().__init__(session, ref)
        self.shape = torch.Size(shape)
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return len(self.shape)

    def size(self, dim: int | None = None) -> torch.Size | int:
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def cpu(self) -> torch.Tensor:
        """Fetch the values: one round trip moving `nbytes`."""
        return self._session.fetch(self._ref)

    def numpy(self) -> np.ndarray:
        return self.cpu().numpy()

    def tolist(self) -> Any:
        return self.cpu().tolist()

    def item(self) -> Any:
        if self.numel() != 1:
            raise UsageError(f"cannot call item() on a tensor of {self.numel()} elements")
        return self.cpu().item()

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.numpy()
        return array.astype(dtype) if dtype is not None else array

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        """torch.as_tensor(rt) and torch.asarray(rt) read the values through this."""
        return self.cpu().__dlpack__(*args, **kwargs)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU: fetched values arrive in host memory

    def __repr__(self) -> str:
        return f"RemoteTensor(shape={list(self.shape)}, dtype={self.dtype}, ref={self._ref.id})"

    # -- torch interop: reading into a local tensor ------------------------------

    @classmethod
    def __torch_function__(
        cls,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        if func in _MATERIALIZERS and args and isinstance(args[0], RemoteTensor):
            return func(args[0].cpu(), *args[1:], **(kwargs or {}))
        raise UsageError(
            f"cannot run {getattr(func, '__name__', func)} on a RemoteTensor here: "
            "read it with .cpu() first"
        )


_MATERIALIZERS = {torch.as_tensor, torch.tensor, torch.asarray}


class RemoteCache(_Handle):
    """A KV cache the server holds for its session; pass it back as `past_key_values`/`cache`."""

    __slots__ = ("_length",)

    def __init__(self, session: RemoteSession, ref: Ref, length: int) -> None:
        super().__init__(session, ref)
        self._length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens cached, as transformers' Cache.get_seq_length (no round trip)."""
        return self._length

    def _update(self, length: int) -> None:
        self._length = length

    def __repr__(self) -> str:
        return f"RemoteCache(tokens={self._length}, ref={self._ref.id})"
