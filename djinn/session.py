"""The client's side of one server session: its id, references, traffic and decisions."""

from __future__ import annotations

import contextlib
import itertools
from collections import deque
from typing import Any, Final

import torch

from djinn.client import Client
from djinn.errors import ConnectionLostError, UsageError
from djinn.net.payload import Ref
from djinn.net.rpc import Meter
from djinn.semantics import DecisionLog, DecisionRecord

# Reference ids are unique across every session of the process, so a
# reference used with the wrong session is refused, never mistaken.
_REF_IDS = itertools.count(1)
# Released references ride along with the next call; past this many they go at once.
RELEASE_BATCH: Final = 1024


class RemoteSession:
    """Calls scoped to one server session, each carrying the references freed since the last."""

    def __init__(self, client: Client, fingerprint: str | None, meter: Meter) -> None:
        self.client = client
        self.meter = meter
        self.decisions = DecisionLog()
        self.id: str = client.call("open_session", fingerprint, meter=meter)
        self._released: deque[int] = deque()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def new_ref(self) -> Ref:
        return Ref(next(_REF_IDS))

    def release(self, ref: Ref) -> None:
        """Forget a reference; the server frees it with the next call. Safe from finalizers."""
        if not self._closed:
            self._released.append(ref.id)

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Raises UsageError once closed, else whatever the call raises."""
        if self._closed:
            raise UsageError(f"cannot call {method}: this RemoteModel is closed")
        released = [self._released.popleft() for _ in range(len(self._released))]
        try:
            return self.client.call(
                method, self.id, released, *args, timeout=timeout, meter=self.meter
            )
        except BaseException:
            self._released.extend(released)  # releasing twice is harmless; losing one leaks
            raise

    def fetch(self, ref: Ref) -> torch.Tensor:
        tensor: torch.Tensor = self.call("fetch", ref)
        return tensor

    def flush(self) -> None:
        """Send pending releases now, if enough have piled up to be worth a call."""
        if len(self._released) >= RELEASE_BATCH:
            self.call("release")

    def record(self, record: DecisionRecord) -> None:
        self.decisions.add(record)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._released.clear()
        if self.client.is_open:
            # a lost connection's sessions are freed by the server itself
            with contextlib.suppress(ConnectionLostError):
                self.client.call("close_session", self.id, meter=self.meter)
