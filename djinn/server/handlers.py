"""The dispatch table: every method a client may call, with its arguments checked.

Each handler runs on the event loop and sends model work to the device
thread. Session-scoped calls take the session id first, then a prelude:
the references the client has dropped, the operations it has queued since
its last call, and the small results of those operations it wants back, so
none of these costs a round trip of its own. They answer (those results'
values, the call's own result).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import torch

from djinn.errors import LostReferenceError, RemoteUsageError
from djinn.generation import GenerationParams
from djinn.net.payload import Ref
from djinn.server import inference
from djinn.server.sessions import Session
from djinn.tree import map_tree

if TYPE_CHECKING:
    from djinn.server.connection import ServerConnection


def ping(conn: ServerConnection) -> None:
    return None


def echo(conn: ServerConnection, obj: Any) -> Any:
    return obj


def server_stats(conn: ServerConnection) -> dict[str, Any]:
    return conn.server.stats()


# -- models ------------------------------------------------------------------------


async def register(conn: ServerConnection, spec: Any) -> dict[str, Any]:
    return await conn.server.models.register(conn.uploads, spec)


async def upload(conn: ServerConnection, fingerprint: Any, start: Any, tensors: Any) -> None:
    await conn.server.models.upload(conn.uploads, fingerprint, start, tensors)


async def commit(conn: ServerConnection, fingerprint: Any) -> dict[str, Any]:
    return await conn.server.models.commit(conn.uploads, fingerprint)


# -- sessions ----------------------------------------------------------------------


async def open_session(conn: ServerConnection, fingerprint: Any) -> str:
    server = conn.server
    model = await server.models.load(fingerprint) if fingerprint is not None else None
    if model is not None:
        server.models.acquire(model.fingerprint)
    try:
        return server.sessions.open(conn, model).id
    except BaseException:
        if model is not None:
            server.models.release(model)
        raise


def close_session(conn: ServerConnection, session_id: Any) -> None:
    with contextlib.suppress(LostReferenceError):  # closing twice is fine
        session = conn.server.sessions.find(conn, session_id)
        conn.server.sessions.close(session, reason="closed by the client")


@contextlib.asynccontextmanager
async def _in_session(
    conn: ServerConnection, session_id: Any, prelude: Any
) -> AsyncIterator[tuple[Session, inference.Batch]]:
    """Enter a session call: its queued operations run first, its releases last.

    The prelude is (released reference ids, queued operations, reference ids
    to fetch). The fetched values come to the host in the same device job as
    the operations (one thread hop, one stream sync). Releases go after the
    call because a queued operation may still read a value the client has
    already dropped. Calls of one session run one at a time.
    """
    session = conn.server.sessions.find(conn, session_id)
    if not (
        isinstance(prelude, tuple)
        and len(prelude) == 3
        and isinstance(prelude[0], list)
        and all(type(i) is int for i in prelude[0])
        and isinstance(prelude[1], list)
        and isinstance(prelude[2], list)
        and all(type(i) is int for i in prelude[2])
    ):
        raise RemoteUsageError("cannot call: malformed session prelude")
    released, ops, fetch = prelude
    async with session.lock:
        session.busy += 1
        try:
            batch = inference.Batch()
            if ops or fetch:
                executor = conn.server.executor
                try:
                    batch = await executor.run(inference.run_ops, executor, session, ops, fetch)
                except inference.OpFailed as failed:
                    _keep(session, failed.done)  # what ran before the failure stays usable
                    raise
                _keep(session, batch)
            yield session, batch
        finally:
            session.busy -= 1
            session.release(released)


def _keep(session: Session, batch: inference.Batch) -> None:
    for ref_id, value in batch.produced.items():
        session.put(Ref(ref_id), value)
    for ref in batch.grown:
        session.resize(ref)


def _model(session: Session) -> Any:
    if session.model is None:
        raise RemoteUsageError("cannot run a model: this session has none")
    return session.model


def _tensor(session: Session, value: Any, name: str) -> torch.Tensor:
    if isinstance(value, Ref):
        value = session.get(value)
    if not isinstance(value, torch.Tensor):
        raise RemoteUsageError(f"cannot run the model: {name} must be a tensor")
    return value


Fetched = dict[int, torch.Tensor]


async def run(conn: ServerConnection, session_id: Any, prelude: Any) -> tuple[Fetched, Any]:
    """Run the queued operations (and releases, and fetches); answer with the output
    structure of operations the client could not infer, by queue position."""
    async with _in_session(conn, session_id, prelude) as (_, batch):
        return batch.fetched, batch.described


async def forward(
    conn: ServerConnection,
    session_id: Any,
    prelude: Any,
    input_ids: Any,
    cache: Any,
    attention_mask: Any,
    want: Any,
) -> tuple[Fetched, tuple[Any, Any, int]]:
    """One model call. want = (logits mode, logits ref id, cache mode, cache ref id).

    Returns (logits, cache, cache length): logits as data or as (shape, dtype)
    when kept under its reference; the cache as a list of (k, v) pairs or None.
    """
    if not (
        isinstance(want, tuple)
        and len(want) == 4
        and want[0] in inference.LOGITS_MODES
        and want[2] in inference.CACHE_MODES
        and all(type(i) is int for i in (want[1], want[3]))
    ):
        raise RemoteUsageError("cannot run the model: malformed output modes")
    logits_mode, logits_ref, cache_mode, cache_ref = want
    async with _in_session(conn, session_id, prelude) as (session, batch):
        model = _model(session)
        ids = _tensor(session, input_ids, "input_ids")
        mask = (
            None if attention_mask is None else _tensor(session, attention_mask, "attention_mask")
        )
        cache_in = inference.resolve_cache(session, cache)
        executor = conn.server.executor
        result = await executor.run(
            inference.forward, executor, model, ids, cache_in, mask, logits_mode, cache_mode
        )
        logits: Any = result.logits
        if logits_mode == "ref":
            session.put(Ref(logits_ref), logits)
            logits = (tuple(logits.shape), logits.dtype)
        if cache_mode == "ref" and result.cache is not None:
            if isinstance(cache, Ref):
                session.resize(cache)  # the cache grew in place
            else:
                session.put(Ref(cache_ref), result.cache)
        return batch.fetched, (logits, result.cache_data, result.cache_len)


async def generate(
    conn: ServerConnection,
    session_id: Any,
    prelude: Any,
    input_ids: Any,
    attention_mask: Any,
    params: Any,
) -> tuple[Fetched, torch.Tensor]:
    """A whole generation on the server; returns only the new tokens."""
    parsed = GenerationParams.from_wire(params)
    async with _in_session(conn, session_id, prelude) as (session, batch):
        model = _model(session)
        ids = _tensor(session, input_ids, "input_ids")
        mask = (
            None if attention_mask is None else _tensor(session, attention_mask, "attention_mask")
        )
        executor = conn.server.executor
        tokens = await executor.run(inference.run_generate, executor, model, ids, mask, parsed)
        return batch.fetched, tokens


async def call(
    conn: ServerConnection,
    session_id: Any,
    prelude: Any,
    args: Any,
    kwargs: Any,
    keep_over: Any,
    ref_ids: Any,
) -> tuple[Fetched, tuple[Any, dict[int, tuple[torch.Size, torch.dtype]]]]:
    """Call a plain module. Outputs over `keep_over` bytes stay under `ref_ids`;
    returns the outputs (kept ones as Refs) and the shape and dtype of each kept one."""
    if not isinstance(args, tuple) or not isinstance(kwargs, dict) or type(keep_over) is not int:
        raise RemoteUsageError("cannot call the module: malformed arguments")
    if not isinstance(ref_ids, list) or not all(type(i) is int for i in ref_ids):
        raise RemoteUsageError("cannot call the module: malformed reference ids")
    async with _in_session(conn, session_id, prelude) as (session, batch):
        model = _model(session)
        resolve = lambda x: session.get(x) if isinstance(x, Ref) else x  # noqa: E731
        args, kwargs = map_tree(args, resolve), map_tree(kwargs, resolve)
        executor = conn.server.executor
        out, kept = await executor.run(
            inference.call_module, executor, model, args, kwargs, keep_over, ref_ids
        )
        for ref_id, tensor in kept.items():
            session.put(Ref(ref_id), tensor)
        return batch.fetched, (out, {ref_id: (t.shape, t.dtype) for ref_id, t in kept.items()})


HANDLERS = {
    fn.__name__: fn
    for fn in (
        ping,
        echo,
        server_stats,
        register,
        upload,
        commit,
        open_session,
        close_session,
        run,
        forward,
        generate,
        call,
    )
}
