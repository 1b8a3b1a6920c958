"""The dispatch table: one handler per request message, given a call context.

A handler takes the `Call` (the server's shared state, the caller, its
request's job ticket, a way to stream partial results) and the decoded
message, and returns the reply message. Plain functions answer inline as
the request is decoded; coroutines run as tasks so they can wait for the
device. Session calls run their prelude (queued operations) first and
release the client's dropped references last.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from djinn import messages
from djinn.errors import LimitExceededError, LostReferenceError, RemoteUsageError
from djinn.net.codec import Ref, wire_value
from djinn.server import inference
from djinn.server.bounds import Deferred
from djinn.server.device import Job
from djinn.server.generate import run_generate
from djinn.server.sessions import Session

if TYPE_CHECKING:
    from djinn.server.app import Server


@dataclass
class Owner:
    """A connection, as handlers see it: its sessions, and an identity for its uploads."""

    peer: str
    sessions: dict[str, Session] = field(default_factory=dict)


@dataclass
class Call:
    server: Server
    owner: Owner
    request_id: int
    job: Job
    stream: Callable[[messages.Message], None]  # thread-safe: sends a STREAM frame


Handler = Callable[[Call, Any], Any]


def ping(call: Call, msg: messages.Ping) -> messages.Done:
    return messages.Done()


def echo(call: Call, msg: messages.Echo) -> messages.Echoed:
    return messages.Echoed(wire_value(msg.value))


def stats(call: Call, msg: messages.Stats) -> messages.StatsReply:
    return messages.StatsReply(call.server.stats())


def models(call: Call, msg: messages.Models) -> messages.ModelsReply:
    return messages.ModelsReply(call.server.models.listing())


async def register(call: Call, msg: messages.Register) -> messages.Registered:
    return await call.server.models.register(call.owner, msg.spec)


async def upload(call: Call, msg: messages.Upload) -> messages.Done:
    await call.server.models.upload(call.owner, msg.fingerprint, msg.start, msg.tensors)
    return messages.Done()


async def commit(call: Call, msg: messages.Commit) -> messages.Registered:
    return await call.server.models.commit(call.owner, msg.fingerprint)


async def open_session(call: Call, msg: messages.OpenSession) -> messages.SessionOpened:
    server = call.server
    model = None
    if msg.model is not None:
        fingerprint = server.models.resolve(msg.model)
        await server.models.load(fingerprint)
        model = server.models.acquire(fingerprint)
    try:
        card = server.models.card(model) if model is not None and msg.describe else None
        session = server.sessions.open(call.owner, model)
    except BaseException:
        if model is not None:
            server.models.release(model)
        raise
    return messages.SessionOpened(session.id, model.fingerprint if model else None, card)


def close_session(call: Call, msg: messages.CloseSession) -> messages.Done:
    with contextlib.suppress(LostReferenceError):  # closing twice is fine
        session = call.server.sessions.find(call.owner, msg.session)
        call.server.sessions.close(session, reason="closed by the client")
    return messages.Done()


@contextlib.asynccontextmanager
async def _in_session(
    call: Call, session_id: str, prelude: messages.Prelude
) -> AsyncIterator[Session]:
    """A session call: one at a time per session; the client's releases go last,
    since a queued operation may still read a value the client already dropped."""
    session = call.server.sessions.find(call.owner, session_id)
    limit = call.server.config.max_ops_per_call
    if len(prelude.ops) > limit:
        raise LimitExceededError(
            f"cannot run {len(prelude.ops)} queued operations in one call: the server takes "
            f"{limit} at most (--max-ops-per-call)"
        )
    async with session.lock:
        session.busy += 1
        try:
            yield session
        finally:
            session.busy -= 1
            session.release(prelude.released)


def _commit(session: Session, batch: inference.Batch) -> None:
    for ref_id, value in batch.produced.items():
        session.put(ref_id, value)
    for ref_id in batch.grown:
        if session.holds(ref_id):
            session.recount(ref_id)


async def _run_device(
    call: Call, session: Session, work: Callable[..., Any], *args: Any, short: bool = False
) -> Any:
    server = call.server
    try:
        return await server.device.run(call.job, work, session, *args, short=short)
    except inference.OpFailed as failed:
        _commit(session, failed.done)  # what ran before the failure stays usable
        raise


def _prelude_job(
    job: Job, session: Session, call: Call, prelude: messages.Prelude
) -> inference.Batch:
    config = call.server.config
    return inference.run_ops(
        job, call.server.device, session, prelude, session.server_ids, config.prefill_chunk
    )


async def run(call: Call, msg: messages.Run) -> messages.Ran:
    async with _in_session(call, msg.session, msg.prelude) as session:
        if not msg.prelude.ops and not msg.prelude.fetch:
            return messages.Ran()
        short = _is_step(msg.prelude)
        batch = await _run_device(call, session, _prelude_job, call, msg.prelude, short=short)
        _commit(session, batch)
        return messages.Ran(wire_value(batch.values), _wired(batch.described))


# A call this small is one decode step of a user's loop: a forward of a token or
# two and the operations that pick the next one.
_STEP_OPS = 4
_STEP_TOKENS = 8


def _is_step(prelude: messages.Prelude) -> bool:
    if len(prelude.ops) > _STEP_OPS:
        return False
    for op in prelude.ops:
        if isinstance(op, messages.CallOp):
            return False
        if isinstance(op, messages.ForwardOp):
            ids = op.input_ids
            if op.labels is not None or op.output_hidden_states or op.output_attentions:
                return False
            if not isinstance(ids, Ref) and not (
                isinstance(ids, torch.Tensor) and ids.numel() <= _STEP_TOKENS
            ):
                return False
    return True


def _generate_job(
    job: Job, session: Session, call: Call, msg: messages.Generate
) -> tuple[inference.Batch, Any]:
    batch = inference.Batch()
    config = call.server.config
    ctx = inference.Context(
        job,
        call.server.device,
        session,
        session.server_ids,
        batch,
        Deferred(),
        config.prefill_chunk,
    )

    def send(tokens: torch.Tensor) -> None:
        call.stream(messages.Streamed(tokens))

    result = run_generate(ctx, msg.args, send, config.max_generate_tokens)
    return batch, result


async def generate(call: Call, msg: messages.Generate) -> messages.Generated:
    if msg.args.cache and not isinstance(msg.args.cache, int):
        raise RemoteUsageError("cannot generate: malformed cache reference")
    async with _in_session(call, msg.session, msg.prelude) as session:
        # the queued work first, kept whatever generate then does: its values are the
        # client's, and the cache generate continues may be one of them
        values: dict[int, Any] = {}
        if msg.prelude.ops or msg.prelude.fetch:
            prelude = await _run_device(call, session, _prelude_job, call, msg.prelude)
            _commit(session, prelude)
            values = prelude.values
        cancelled = False
        try:
            batch, result = await _run_device(call, session, _generate_job, call, msg)
        except asyncio.CancelledError:  # its connection is gone, and the session with it;
            cancelled = True  # the job may still be growing the cache on its thread
            raise
        finally:
            if not cancelled and msg.args.cache and session.holds(msg.args.cache):
                session.recount(msg.args.cache)  # grown in place, however generate ended
        _commit(session, batch)
        outputs = result.outputs
        if outputs is not None:
            outputs = messages.Described(wire_value(outputs.structure), outputs.metas)
        return messages.Generated(wire_value(values), result.tokens, outputs)


def _wired(described: dict[int, messages.Described]) -> dict[int, messages.Described]:
    """Structures as they travel: tuples stay tuples (see codec.wire_value)."""
    return {i: messages.Described(wire_value(d.structure), d.metas) for i, d in described.items()}


HANDLERS: dict[type[messages.Message], Handler] = {
    messages.Ping: ping,
    messages.Echo: echo,
    messages.Stats: stats,
    messages.Models: models,
    messages.Register: register,
    messages.Upload: upload,
    messages.Commit: commit,
    messages.OpenSession: open_session,
    messages.CloseSession: close_session,
    messages.Run: run,
    messages.Generate: generate,
}
