"""Sessions and the references they hold.

A session belongs to one connection and holds the objects its client
refers to by number: KV caches, tensors left on the server. A reference is
only ever looked up inside its own session, so one client can never read,
use or free another's objects. A session ends, and its memory goes, when
its client closes it, when its connection drops, or when it sits idle
longer than its lease.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from djinn.errors import LostReferenceError, QuotaExceededError, RemoteUsageError, ServerBusyError
from djinn.net.payload import Ref

if TYPE_CHECKING:
    from djinn.server.config import ServerConfig
    from djinn.server.models import LoadedModel

log = logging.getLogger("djinn.server")

# How often idle sessions are looked for; a lease ends at most this late.
SWEEP_INTERVAL_S = 1.0


def nbytes_of(obj: Any) -> int:
    """Memory held by a session object: a tensor, a KV cache, or containers of them."""
    if isinstance(obj, torch.Tensor):
        return obj.nbytes
    if isinstance(obj, (list, tuple)):
        return sum(nbytes_of(item) for item in obj)
    layers = getattr(obj, "layers", None)  # a transformers Cache
    if layers is not None:
        return sum(
            nbytes_of(getattr(layer, "keys", None)) + nbytes_of(getattr(layer, "values", None))
            for layer in layers
        )
    return 0


class Session:
    def __init__(
        self, owner: object, model: LoadedModel | None, quota: int, registry: SessionRegistry
    ) -> None:
        self.id = secrets.token_urlsafe(16)
        self.owner = owner
        self.model = model
        self.quota = quota
        self._registry = registry
        self.last_used = time.monotonic()
        self.busy = 0
        self.closed = False
        self.lock = asyncio.Lock()  # a session's calls run one at a time
        self._objects: dict[int, Any] = {}
        self._sizes: dict[int, int] = {}
        self.resident_bytes = 0

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, ref: Ref) -> Any:
        try:
            return self._objects[ref.id]
        except KeyError:
            raise LostReferenceError(
                f"cannot use reference {ref.id}: this session does not hold it "
                "(released, expired, or from another session)"
            ) from None

    def put(self, ref: Ref, obj: Any) -> None:
        """Hold `obj` under the client-chosen `ref`; replacing is refused."""
        if self.closed:
            raise LostReferenceError(f"cannot hold reference {ref.id}: the session is closed")
        if ref.id in self._objects:
            raise RemoteUsageError(f"cannot hold reference {ref.id}: it is already in use")
        self._objects[ref.id] = obj
        self._sizes[ref.id] = 0
        self.resize(ref)

    def resize(self, ref: Ref) -> None:
        """Recount an object that grew in place (a KV cache after a step)."""
        new = nbytes_of(self._objects[ref.id])
        old = self._sizes[ref.id]
        if new > old and self.resident_bytes + new - old > self.quota:
            self.release([ref.id])
            raise QuotaExceededError(
                f"cannot hold {new} bytes for reference {ref.id}: the session would exceed "
                f"its quota of {self.quota} bytes; release references or close sessions"
            )
        budget = self._registry.budget
        if new > old and self._registry.resident_bytes + new - old > budget:
            self.release([ref.id])
            raise ServerBusyError(
                f"cannot hold {new} bytes for reference {ref.id}: the server's sessions "
                f"would exceed their shared {budget}-byte budget; retry later"
            )
        self._sizes[ref.id] = new
        self.resident_bytes += new - old

    def release(self, ids: Iterable[int]) -> None:
        """Drop references; unknown ones are ignored (a release may race a close)."""
        for ref_id in ids:
            if self._objects.pop(ref_id, None) is not None:
                self.resident_bytes -= self._sizes.pop(ref_id)

    def clear(self) -> None:
        self._objects.clear()
        self._sizes.clear()
        self.resident_bytes = 0


class SessionRegistry:
    """Every open session of the server, with the limits that apply across them."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._sessions: dict[str, Session] = {}
        self.on_close: Callable[[Session], None] = lambda session: None

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def resident_bytes(self) -> int:
        return sum(s.resident_bytes for s in self._sessions.values())

    @property
    def budget(self) -> int:
        return self._config.session_memory_bytes

    def open(self, owner: Any, model: LoadedModel | None) -> Session:
        if len(self._sessions) >= self._config.max_sessions:
            raise ServerBusyError(
                f"cannot open a session: the server holds its maximum of "
                f"{self._config.max_sessions}; try again later"
            )
        session = Session(owner, model, self._config.session_quota_bytes, self)
        self._sessions[session.id] = session
        owner.sessions[session.id] = session
        return session

    def find(self, owner: Any, session_id: object) -> Session:
        """The caller's own open session, touched; LostReferenceError otherwise."""
        session: Session | None = (
            owner.sessions.get(session_id) if isinstance(session_id, str) else None
        )
        if session is None:
            raise LostReferenceError(
                f"cannot use session {session_id!r:.40}: it is closed, expired, "
                "or belongs to another connection"
            )
        session.last_used = time.monotonic()
        return session

    def close(self, session: Session, reason: str) -> None:
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.id, None)
        session.owner.sessions.pop(session.id, None)  # type: ignore[attr-defined]
        freed = session.resident_bytes
        session.clear()
        self.on_close(session)
        log.info("session %s closed (%s), freed %d bytes", session.id[:8], reason, freed)

    def close_all(self) -> None:
        for session in list(self._sessions.values()):
            self.close(session, reason="server shutting down")

    def expire(self, now: float) -> None:
        lease = self._config.session_lease_s
        for session in list(self._sessions.values()):
            if not session.busy and now - session.last_used > lease:
                self.close(session, reason=f"idle for more than {lease:g}s")

    async def sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_INTERVAL_S, self._config.session_lease_s))
            self.expire(time.monotonic())
