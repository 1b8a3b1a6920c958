"""The client's side of one server session: references, queued operations, traffic, decisions.

Work on server-held values is queued, not sent: operations ride along with
the session's next call, or the read that needs one of their results, so a
chain like `out.logits[:, -1].softmax(-1).topk(5).values.tolist()` costs one
round trip, and a decode loop that only passes each token back costs none
until it reads. The small results of queued work come back as data with
that call, all of them, so reading any of them later costs nothing more.
Dropped references ride along the same way. A failure in a queued
operation is reported at the line of user code that queued it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Final, Protocol

import torch

from djinn.client import Client
from djinn.errors import ConnectionLostError, ServerError, UsageError
from djinn.net.payload import Ref
from djinn.net.rpc import Meter
from djinn.semantics import Decision, DecisionLog, DecisionRecord, Lifecycle, Policy

# Reference ids are unique across every session of the process, so a
# reference used with the wrong session is refused, never mistaken.
_REF_IDS = itertools.count(1)
# Released references ride along with the next call; past this many they go at once.
RELEASE_BATCH: Final = 1024
# Queued operations wait for a call at most this deep.
QUEUE_LIMIT: Final = 256

_OWN_CODE: Final = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))


def user_site() -> str:
    """file:line of the innermost caller outside djinn and torch: where the user asked."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_CODE):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


@dataclass(frozen=True)
class _Queued:
    wire: tuple[Any, ...]
    name: str
    site: str


class Prefetched(Protocol):
    """A handle whose value the session fetches with its next call (a small RemoteTensor)."""

    def _arrived(self, value: torch.Tensor) -> None: ...


class _Keeper:
    """Where a read's value lands."""

    value: torch.Tensor

    def _arrived(self, value: torch.Tensor) -> None:
        self.value = value


class RemoteSession:
    """Calls scoped to one server session, each carrying what was queued since the last."""

    def __init__(
        self, client: Client, fingerprint: str | None, meter: Meter, policy: Policy
    ) -> None:
        self.client = client
        self.meter = meter
        self.policy = policy
        self.decisions = DecisionLog()
        self.id: str = client.call("open_session", fingerprint, meter=meter)
        self._released: deque[int] = deque()
        self._queue: list[_Queued] = []
        self._wanted: dict[int, tuple[weakref.ref[Prefetched], str]] = {}
        self._closed = False

    def new_ref(self) -> Ref:
        return Ref(next(_REF_IDS))

    def release(self, ref: Ref) -> None:
        """Forget a reference; the server frees it with the next call. Safe from finalizers."""
        if not self._closed:
            self._released.append(ref.id)

    def enqueue(self, wire: tuple[Any, ...], name: str) -> None:
        """Queue an operation for the next call; runs the queue if it is long."""
        self._queue.append(_Queued(wire, name, user_site()))
        if len(self._queue) >= QUEUE_LIMIT:
            self.call("run")

    def want(self, ref: Ref, handle: Prefetched, name: str) -> None:
        """Bring `ref`'s value back with the next call (the policy wants it as data)."""
        self._wanted[ref.id] = (weakref.ref(handle), name)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """Run `method` after the queued operations. Raises UsageError once closed, else
        what the call raises, a failed queued operation naming the line that queued it."""
        if self._closed:
            raise UsageError(f"cannot call {method}: this RemoteModel is closed")
        released = [self._released.popleft() for _ in range(len(self._released))]
        queue, self._queue = self._queue, []
        wanted, self._wanted = self._wanted, {}
        fetch = [ref_id for ref_id, (handle, _) in wanted.items() if handle() is not None]
        prelude = (released, [q.wire for q in queue], fetch)
        try:
            values, result = self.client.call(
                method, self.id, prelude, *args, timeout=timeout, meter=self.meter
            )
        except ServerError as exc:
            self._released.extend(released)  # releasing twice is harmless; losing one leaks
            if exc.op_index is not None and exc.op_index < len(queue):
                failed = queue[exc.op_index]
                message = f"{exc.args[0]}\n  (queued by {failed.name} at {failed.site})"
                raise type(exc)(
                    message, exc.remote_type, exc.remote_traceback, exc.op_index
                ) from exc
            raise
        except BaseException:
            self._released.extend(released)
            raise
        for ref_id, value in values.items():
            handle, name = wanted[ref_id]
            target = handle()
            if target is not None:
                target._arrived(value)
                record = DecisionRecord(
                    name, "output", Lifecycle.OUTPUT, Decision.DATA, value.nbytes
                )
                self.record(record)
        return result

    def fetch(self, refs: list[Ref]) -> list[torch.Tensor]:
        """The values of `refs` (and of everything wanted), after running the queue:
        one round trip."""
        keepers = [_Keeper() for _ in refs]
        for ref, keeper in zip(refs, keepers, strict=True):
            name = self._wanted[ref.id][1] if ref.id in self._wanted else "read"
            self._wanted[ref.id] = (weakref.ref(keeper), name)
        self.call("run")
        return [keeper.value for keeper in keepers]

    def describe(self) -> Any:
        """Run the queue now; returns the structures the server described, by queue position."""
        return self.call("run")

    def flush(self) -> None:
        """Send pending releases now, if enough have piled up to be worth a call."""
        if len(self._released) >= RELEASE_BATCH:
            self.call("run")

    def record(self, record: DecisionRecord) -> None:
        self.decisions.add(record)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._released.clear()
        self._queue.clear()
        self._wanted.clear()
        if self.client.is_open:
            # a lost connection's sessions are freed by the server itself
            with contextlib.suppress(ConnectionLostError):
                self.client.call("close_session", self.id, meter=self.meter)
