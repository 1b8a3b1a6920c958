"""The client's side of one server session: references, queued operations, reads, decisions.

Work on server-held values is queued, not sent: operations ride along with
the session's next call, so a chain like
`out.logits[:, -1].softmax(-1).topk(5).values.tolist()` costs one round
trip, and a decode loop that only passes each token back costs none until
it reads. A read brings back what the planner chose (the value, and the
small ones of the same line the caller still holds). Dropped references
ride along the same way. A failure in a queued operation is reported at
the line of user code that queued it.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import os
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec
import torch

from djinn import messages
from djinn.client import Client
from djinn.errors import ConnectionLostError, DjinnError, ReplayError, ServerError, UsageError
from djinn.net.codec import Ref
from djinn.net.core import Meter
from djinn.semantics import (
    DecisionLog,
    DecisionRecord,
    Lifecycle,
    Phase,
    Plan,
    Policy,
    Value,
    plan_read,
)

# Reference ids are unique across every session of the process, so a
# reference used with the wrong session is refused, never mistaken.
_REF_IDS = itertools.count(1)
# Released references ride along with the next call; past this many they go at once.
RELEASE_BATCH: Final = 1024
# Queued operations wait for a call at most this deep.
QUEUE_LIMIT: Final = 256
# A session keeps the calls that built its state, to replay them on a new server when
# it loses its own, up to this many bytes sent (a semantic_blind loop, which sends its
# KV cache every step, outgrows it: such a session cannot be resumed).
REPLAY_LOG_BYTES: Final = 64 << 20
REPLAY_TIMEOUT_S: Final = 3600.0  # per replayed call: a generate may take long

log = logging.getLogger("djinn")
Build = Callable[[messages.Prelude], messages.Message]

_OWN_CODE: Final = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(torch.__file__))


def user_site() -> str:
    """file:line of the innermost caller outside djinn and torch: where the user asked."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_CODE):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "?"
    return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"


@dataclass(frozen=True, slots=True)
class _Queued:
    op: messages.Op
    name: str
    site: str


class Readable(Protocol):
    """A handle whose value a read may bring back (a RemoteTensor)."""

    @property
    def nbytes(self) -> int: ...

    def _arrived(self, value: torch.Tensor) -> None: ...


class _Keeper:
    """Where a read's value lands."""

    value: Any = None
    nbytes = 0

    def _arrived(self, value: Any) -> None:
        self.value = value


@dataclass(slots=True)
class _Unread:
    """A value the caller holds and has not read: where it was made, and its size."""

    handle: weakref.ref[Any]
    site: str
    name: str
    nbytes: int


class RemoteSession:
    """Calls scoped to one server session, each carrying what was queued since the last."""

    def __init__(
        self,
        client: Client,
        model: str | None,
        meter: Meter,
        policy: Policy,
        describe: bool = False,
        recover: Callable[[], tuple[Client, str]] | None = None,
    ) -> None:
        self.client = client
        self.meter = meter
        self.policy = policy
        self.decisions = DecisionLog()
        opened = client.request(
            messages.OpenSession(model, describe), messages.SessionOpened, meter=meter
        )
        self.id = opened.session
        self.fingerprint = opened.fingerprint
        self.card = opened.card
        # `recover` connects to a server holding the model (the same one restarted, or
        # another): (its client, the model's id there). None: a lost server is final.
        self.recover = recover
        self.recoveries: list[float] = []  # seconds each resume took, loss to state rebuilt
        self._log: list[list[Any]] = []  # [build, prelude]; build None: a stream in flight
        self._log_bytes = 0
        self._unreplayable = ""  # why this session cannot be resumed, once it cannot
        self.device = torch.device(client.server_info["device"])
        self._released: deque[int] = deque()
        self._queue: list[_Queued] = []
        self._unread: dict[int, _Unread] = {}
        self._closed = False
        self.phase = Phase.PREFILL  # of the last model call: the operations after it share it

    # -- references -------------------------------------------------------------------

    def new_ref(self) -> Ref:
        return Ref(next(_REF_IDS))

    def release(self, ref: Ref) -> None:
        """Forget a reference; the server frees it with the next call. Safe from finalizers."""
        if not self._closed:
            self._released.append(ref.id)
            self._unread.pop(ref.id, None)

    def track(self, ref: Ref, handle: Readable, site: str, name: str) -> None:
        """A value the caller may read later, made at `site`."""
        self._unread[ref.id] = _Unread(weakref.ref(handle), site, name, handle.nbytes)

    def record(self, plan: Plan) -> None:
        self.decisions.extend(plan.records())

    # -- queued work ------------------------------------------------------------------

    def enqueue(self, op: messages.Op, name: str, site: str | None = None, room: int = 1) -> int:
        """Queue an operation for the next call; returns its index in that call. With
        `room`, the queue first makes space for that many operations to go together."""
        if self._closed:
            raise UsageError(f"cannot run {name}: this RemoteModel is closed")
        if len(self._queue) + room > QUEUE_LIMIT:
            self.run()
        self._queue.append(_Queued(op, name, site or user_site()))
        return len(self._queue) - 1

    @property
    def queued(self) -> int:
        return len(self._queue)

    def run(self, fetch: list[messages.Fetch] | None = None) -> messages.Ran:
        """Send what is queued (and released), bring back `fetch`: one round trip."""
        ran: messages.Ran = self._call(
            lambda prelude: messages.Run(self.id, prelude), messages.Ran, fetch
        )
        return ran

    def generate(
        self,
        args: messages.GenerateArgs,
        on_partial: Callable[[messages.Streamed], None] | None,
        timeout: float | None = None,
    ) -> messages.Generated:
        generated: messages.Generated = self._call(
            lambda prelude: messages.Generate(self.id, prelude, args),
            messages.Generated,
            None,
            on_partial,
            timeout,
        )
        return generated

    def send_generate(
        self, args: messages.GenerateArgs
    ) -> tuple[int, list[_Queued], Callable[[str], None]]:
        """Start a generate without waiting for it (a stream): its request id, the
        operations that went with it (to name one that fails), and what to call when it
        ends ("completed", "stopped" or "refused"), so the replay log knows what it
        changed. Its place in the log is taken now, in the order calls were sent."""
        prelude, released, queue = self._prelude(None)
        request = messages.Generate(self.id, prelude, args)
        conn = self.client.connection
        try:
            request_id = conn.send(request, meter=self.meter, timeout=self.client.timeout)
        except BaseException:  # nothing went out: the work stays queued
            self._queue[:0] = queue
            self._released.extendleft(reversed(released))
            raise
        entry = self._remember(None, prelude, messages.Generated, 0)

        def ended(how: str) -> None:
            if how == "refused":
                self._refused()
            elif entry is not None and how == "completed":  # its kept outputs are state now
                entry[0] = lambda p: messages.Generate(self.id, p, args)
            elif entry is not None:  # stopped early: only the operations that rode along ran
                entry[0] = lambda p: messages.Run(self.id, p)

        return request_id, queue, ended

    def _prelude(
        self, fetch: list[messages.Fetch] | None
    ) -> tuple[messages.Prelude, list[int], list[_Queued]]:
        if self._closed:
            raise UsageError("cannot call the server: this RemoteModel is closed")
        released = list(self._released)
        self._released.clear()
        queue, self._queue = self._queue, []
        prelude = messages.Prelude(released, [q.op for q in queue], fetch or [])
        return prelude, released, queue

    def _call(
        self,
        build: Build,
        kind: type[Any],
        fetch: list[messages.Fetch] | None,
        on_partial: Callable[[messages.Streamed], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        prelude, released, queue = self._prelude(fetch)
        sent = self.meter.bytes_sent
        seen = 0  # partials delivered, which a retry after a resume must not repeat

        def partial(streamed: messages.Streamed, skip: int = 0) -> None:
            nonlocal seen
            seen += 1
            if seen > skip and on_partial is not None:
                on_partial(streamed)

        watch = partial if on_partial is not None else None
        try:
            try:
                reply = self.client.request(
                    build(prelude), kind, meter=self.meter, on_partial=watch, timeout=timeout
                )
            except ConnectionLostError as lost:
                if self.recover is None:
                    raise
                self._resume(lost)  # then the call once more; a second loss is final
                sent, shown, seen = self.meter.bytes_sent, seen, 0
                again = functools.partial(partial, skip=shown) if watch is not None else None
                reply = self.client.request(
                    build(prelude), kind, meter=self.meter, on_partial=again, timeout=timeout
                )
        except ServerError as exc:
            self._released.extendleft(reversed(released))  # releasing twice is harmless
            if prelude.ops or kind is messages.Generated:
                self._refused()
            located = self.located(exc, queue)
            if located is exc:
                raise
            raise located from exc
        except BaseException:
            self._released.extendleft(reversed(released))
            raise
        self._remember(build, prelude, kind, self.meter.bytes_sent - sent)
        self.deliver(reply.values)
        return reply

    # -- surviving a lost server --------------------------------------------------------

    def _remember(
        self, build: Build | None, prelude: messages.Prelude, kind: type[Any], nbytes: int
    ) -> list[Any] | None:
        """Log a call that changed the session's state, for a replay; returns its entry
        ([build, prelude]; build None while a stream has not ended)."""
        if self.recover is None or self._unreplayable:
            return None
        self._log_bytes += nbytes
        if self._log_bytes > REPLAY_LOG_BYTES:
            self._unreplayable_because(
                f"it sent more than {REPLAY_LOG_BYTES >> 20} MiB since it opened, too much "
                f"to keep for a replay (policy {self.policy.name!r}; semantic_blind and "
                "partially_aware send the KV cache every step)"
            )
            return None
        if not (prelude.ops or prelude.released or kind is messages.Generated):
            return None
        entry = [build, messages.Prelude(prelude.released, prelude.ops, [])]
        self._log.append(entry)
        return entry

    def _refused(self) -> None:
        """A call failed on the server: what ran of it before the failure, and the ids
        it used, are more than a replay can know."""
        self._unreplayable_because(
            "a call of it failed on the server after part of it may have run"
        )

    def _unreplayable_because(self, why: str) -> None:
        if self.recover is not None and not self._unreplayable:
            self._log.clear()
            self._unreplayable = why

    def _resume(self, lost: ConnectionLostError) -> None:
        """Rebuild this session on a server reached through `recover`: open a session
        there and replay, in order, every call that built this one's state. References
        keep their ids (the client chose them; the server counts its own from the same
        start in every session), so every handle the user holds stays good, and
        deterministic operations rebuild the same values, KV caches included. The
        session moves to the new server only once all of it is rebuilt."""
        if self._unreplayable:
            raise ReplayError(f"cannot resume the session: {self._unreplayable}") from lost
        assert self.recover is not None
        began = time.perf_counter()
        client, model = self.recover()
        old = self.id
        try:
            opened = client.request(
                messages.OpenSession(model), messages.SessionOpened, meter=self.meter
            )
            if opened.fingerprint != self.fingerprint:
                raise ReplayError(
                    f"{client.address} serves {model!r} as model "
                    f"{str(opened.fingerprint)[:12]}, not {str(self.fingerprint)[:12]}"
                )
            self.id = opened.session  # the log's messages are built for it
            for build, prelude in self._log:
                if build is None:  # a stream in flight when the server went: not sent again
                    continue
                message = build(prelude)
                if isinstance(message, messages.Generate) and message.args.stream:
                    args = msgspec.structs.replace(message.args, stream=False)
                    message = msgspec.structs.replace(message, args=args)
                kind = (
                    messages.Generated if isinstance(message, messages.Generate) else messages.Ran
                )
                client.request(message, kind, meter=self.meter, timeout=REPLAY_TIMEOUT_S)
        except (DjinnError, OSError) as exc:
            self.id = old
            self._unreplayable_because(f"its replay on {client.address} failed: {exc}")
            client.close()
            raise ReplayError(f"cannot resume the session on {client.address}: {exc}") from exc
        self.client = client
        self.device = torch.device(client.server_info["device"])
        seconds = time.perf_counter() - began
        self.recoveries.append(seconds)
        log.warning(
            "session resumed on %s after losing its server: %d calls replayed in %.2f s",
            client.address,
            len(self._log),
            seconds,
        )

    def located(self, exc: BaseException, queue: list[_Queued]) -> BaseException:
        """A failed queued operation's error, naming the line of user code that queued it."""
        if isinstance(exc, ServerError) and exc.op_index is not None and exc.op_index < len(queue):
            failed = queue[exc.op_index]
            message = f"{exc.args[0]}\n  (queued by {failed.name} at {failed.site})"
            return type(exc)(message, exc.remote_type, exc.op_index)
        return exc

    def deliver(self, values: dict[int, Any]) -> None:
        """Hand fetched values to the handles that wait for them."""
        for ref_id, value in values.items():
            entry = self._unread.pop(ref_id, None)
            handle = entry.handle() if entry is not None else None
            if handle is not None:
                handle._arrived(value)

    # -- reads ------------------------------------------------------------------------

    def read(self, ref: Ref, handle: Readable, name: str) -> Any:
        """The value of `ref` (running what is queued), and with it the small values
        of the same line the caller still holds: one round trip."""
        entry = self._unread.get(ref.id)
        site = entry.site if entry is not None else ""
        series: list[tuple[int, _Unread]] = []
        if site:
            series = [
                (ref_id, other)
                for ref_id, other in self._unread.items()
                if ref_id != ref.id and other.site == site and other.handle() is not None
            ]
        value = Value(name, Lifecycle.OUTPUT, handle.nbytes, read=True)
        plan, chosen = plan_read(
            value, [Value(other.name, Lifecycle.OUTPUT, other.nbytes) for _, other in series]
        )
        keeper = _Keeper()
        self._unread[ref.id] = _Unread(weakref.ref(keeper), site, name, handle.nbytes)
        fetch = [messages.Fetch(ref.id)] + [
            messages.Fetch(ref_id) for (ref_id, _), take in zip(series, chosen, strict=True) if take
        ]
        try:
            self.run(fetch)
        finally:
            self._unread.pop(ref.id, None)
        self.record(plan)
        return keeper.value

    def flush(self) -> None:
        """Send pending releases now, if enough have piled up to be worth a call."""
        if len(self._released) >= RELEASE_BATCH:
            self.run()

    def record_one(self, record: DecisionRecord) -> None:
        self.decisions.add(record)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._released.clear()
        self._queue.clear()
        self._unread.clear()
        if self.client.is_open:
            # a lost connection's sessions are freed by the server itself
            with contextlib.suppress(ConnectionLostError):
                self.client.request(messages.CloseSession(self.id), messages.Done, meter=self.meter)
