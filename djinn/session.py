"""The client's side of one server session: references, queued operations, traffic, decisions.

Work on server-held values is queued, not sent: operations ride along with
the session's next call (or the read that needs their result), so a chain
like `out.logits[:, -1].softmax(-1).topk(5)` costs one round trip. So do the
references the user has dropped. A failure in a queued operation is reported
at the line of user code that queued it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
from collections import deque
from dataclasses import dataclass
from typing import Any, Final

import torch

from djinn.client import Client
from djinn.errors import ConnectionLostError, ServerError, UsageError
from djinn.net.payload import Ref
from djinn.net.rpc import Meter
from djinn.semantics import DecisionLog, DecisionRecord, Policy

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

    def enqueue(self, wire: tuple[Any, ...], name: str) -> None:
        """Queue an operation for the next call; runs the queue if it is long."""
        self._queue.append(_Queued(wire, name, user_site()))
        if len(self._queue) >= QUEUE_LIMIT:
            self.call("release")

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
        prelude = (released, [q.wire for q in queue])
        try:
            return self.client.call(
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

    def fetch(self, refs: list[Ref]) -> list[torch.Tensor]:
        """The values of `refs`, after running the queue: one round trip."""
        values, _ = self.call("run", [r.id for r in refs])
        return [values[r.id] for r in refs]

    def describe(self) -> Any:
        """Run the queue now; returns the structures the server described, by queue position."""
        _, described = self.call("run", [])
        return described

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
        self._queue.clear()
        if self.client.is_open:
            # a lost connection's sessions are freed by the server itself
            with contextlib.suppress(ConnectionLostError):
                self.client.call("close_session", self.id, meter=self.meter)
