"""Sessions and the references they hold, with their memory counted by storage.

A session belongs to one connection and holds the objects its client
refers to by number: KV caches, tensors left on the server. A reference is
only ever looked up inside its own session, so one client can never read,
use or free another's objects. A session ends, and its memory goes, when
its client closes it, when its connection drops, or when it sits idle
longer than its lease.

Memory is what keeps storage alive: a view is charged for the whole
storage it keeps (once, however many views share it), and every reference
costs REF_OVERHEAD_BYTES of bookkeeping besides. Work is checked against
the quota before it allocates (`reserve`), with sizes known from shapes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final

import torch

from djinn.errors import (
    LostReferenceError,
    QuotaExceededError,
    RemoteUsageError,
    ServerBusyError,
)

if TYPE_CHECKING:
    from djinn.server.config import ServerConfig
    from djinn.server.models import LoadedModel

log = logging.getLogger("djinn.server")

# Ids the server gives outputs the client could not name in advance.
SERVER_IDS_START: Final = 1 << 62
# How often idle sessions are looked for; a lease ends at most this late.
SWEEP_INTERVAL_S: Final = 1.0
# What one held reference costs the server beyond its tensors' storage (its
# dict entries and objects; measured at about 850 bytes for a view).
REF_OVERHEAD_BYTES: Final = 1024

Storages = list[tuple[tuple[str, int], int]]  # ((device, data pointer), bytes)


def storages_of(obj: Any) -> Storages:
    """The storages an object keeps alive: a tensor's, a KV cache's, or a container's."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        return [((str(obj.device), storage.data_ptr()), storage.nbytes())]
    if isinstance(obj, (list, tuple)):
        return [s for item in obj for s in storages_of(item)]
    layers = getattr(obj, "layers", None)  # a transformers Cache
    if layers is not None:
        found: Storages = []
        for layer in layers:
            for name in ("keys", "values"):
                tensor = getattr(layer, name, None)
                if isinstance(tensor, torch.Tensor):
                    found.extend(storages_of(tensor))
        return found
    return []


class Session:
    def __init__(
        self, owner: Any, model: LoadedModel | None, quota: int, registry: SessionRegistry
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
        # ids for outputs the client could not name in advance (its own count up from 1)
        self.server_ids = itertools.count(SERVER_IDS_START)
        self._objects: dict[int, Any] = {}
        self._held: dict[int, Storages] = {}
        self._storages: dict[tuple[str, int], list[int]] = {}  # key -> [bytes, holders]
        self.resident_bytes = 0

    def __len__(self) -> int:
        return len(self._objects)

    def __iter__(self) -> Iterator[int]:
        return iter(list(self._objects))

    def get(self, ref_id: int) -> Any:
        try:
            return self._objects[ref_id]
        except KeyError:
            raise LostReferenceError(
                f"cannot use reference {ref_id}: this session does not hold it "
                "(released, expired, or from another session)"
            ) from None

    def holds(self, ref_id: int) -> bool:
        return ref_id in self._objects

    def reserve(self, nbytes: int, what: str) -> None:
        """Refuse work that would take the session past its quota, or the server's
        sessions past their shared budget, before it allocates anything."""
        if nbytes <= 0:
            return
        if self.resident_bytes + nbytes > self.quota:
            raise QuotaExceededError(
                f"cannot {what}: it needs {nbytes:,} bytes and the session holds "
                f"{self.resident_bytes:,} of its {self.quota:,}-byte quota (--session-quota); "
                "release references (drop RemoteTensors, close models) or ask for less"
            )
        registry = self._registry
        if registry.resident_bytes + nbytes > registry.budget:
            raise ServerBusyError(
                f"cannot {what}: it needs {nbytes:,} bytes and the server's sessions hold "
                f"{registry.resident_bytes:,} of their shared {registry.budget:,}-byte budget "
                "(--session-memory); retry later"
            )

    def put(self, ref_id: int, obj: Any) -> None:
        """Hold `obj` under the client-chosen id; replacing is refused."""
        if self.closed:
            raise LostReferenceError(f"cannot hold reference {ref_id}: the session is closed")
        if ref_id in self._objects:
            raise RemoteUsageError(f"cannot hold reference {ref_id}: it is already in use")
        self._objects[ref_id] = obj
        self._held[ref_id] = []
        self._charge(REF_OVERHEAD_BYTES)
        self.recount(ref_id)

    def recount(self, ref_id: int) -> None:
        """Count an object again after it changed in place (a KV cache after a step)."""
        self._forget_storages(ref_id)
        storages = storages_of(self._objects[ref_id])
        self._held[ref_id] = storages
        for key, nbytes in storages:
            entry = self._storages.get(key)
            if entry is None:
                self._storages[key] = [nbytes, 1]
                self._charge(nbytes)
            else:
                entry[1] += 1

    def _forget_storages(self, ref_id: int) -> None:
        for key, _ in self._held.get(ref_id, ()):
            entry = self._storages[key]
            entry[1] -= 1
            if not entry[1]:
                del self._storages[key]
                self._charge(-entry[0])

    def _charge(self, nbytes: int) -> None:
        self.resident_bytes += nbytes
        self._registry.resident_bytes += nbytes

    def release(self, ids: Iterable[int]) -> None:
        """Drop references; unknown ones are ignored (a release may race a close)."""
        for ref_id in ids:
            if self._objects.pop(ref_id, None) is not None:
                self._forget_storages(ref_id)
                del self._held[ref_id]
                self._charge(-REF_OVERHEAD_BYTES)

    def clear(self) -> None:
        self.release(list(self._objects))


class SessionRegistry:
    """Every open session of the server, with the limits that apply across them."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._sessions: dict[str, Session] = {}
        self.resident_bytes = 0
        self.on_close: Callable[[Session], None] = lambda session: None

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    @property
    def budget(self) -> int:
        return self._config.session_memory_bytes

    def open(self, owner: Any, model: LoadedModel | None) -> Session:
        """A new session for a connection; ServerBusyError at the server's or the
        connection's limit."""
        config = self._config
        if len(self._sessions) >= config.max_sessions:
            raise ServerBusyError(
                f"cannot open a session: the server holds its maximum of "
                f"{config.max_sessions} (--max-sessions); try again later"
            )
        if len(owner.sessions) >= config.max_sessions_per_connection:
            raise ServerBusyError(
                f"cannot open a session: this connection holds its maximum of "
                f"{config.max_sessions_per_connection}; close some first"
            )
        session = Session(owner, model, config.session_quota_bytes, self)
        self._sessions[session.id] = session
        owner.sessions[session.id] = session
        model_id = model.fingerprint[:12] if model is not None else "none"
        log.info("session %s opened by %s (model %s)", session.id[:8], owner.peer, model_id)
        return session

    def find(self, owner: Any, session_id: str) -> Session:
        """The caller's own open session, touched; LostReferenceError otherwise."""
        session: Session | None = owner.sessions.get(session_id)
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
        freed = session.resident_bytes
        session.clear()
        session.closed = True
        self._sessions.pop(session.id, None)
        session.owner.sessions.pop(session.id, None)
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
