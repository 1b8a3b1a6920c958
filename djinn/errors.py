"""Every error djinn raises, under one base class, grouped by who is at fault,
and both directions of their trip over the wire.

- `UsageError`: the caller misused the API; the message says what to do instead.
- `ProtocolError`: bytes on the wire broke the protocol. `RemoteProtocolError`
  when the peer sent them, `LocalProtocolError` when this side tried to send
  them (or the peer reported that it did).
- `AuthenticationError`: the handshake refused the peer.
- `ServerError`: the server refused or failed a call. Its subclasses name the
  cases a caller may want to handle (a lost reference, a busy server, a quota).
  The server never sends its tracebacks or paths: an unexpected failure
  arrives as an `InternalServerError` naming an incident id in the server's log.
- `ConnectionLostError` and `DjinnTimeoutError`: the connection is gone or
  a call ran out of time; both also derive from the builtin they refine.

Messages read "cannot <verb>: <reason>".
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Final


class DjinnError(Exception):
    """Base class of every error djinn raises."""


class UsageError(DjinnError, ValueError):
    """The API was called in a way it does not support. A ValueError, as transformers'
    refusal of a bad setting is, so a drop-in `except ValueError` catches both."""


class ProtocolError(DjinnError):
    """Bytes on the wire broke the protocol."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol forbids (or the peer said it did)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol."""


class VersionMismatchError(RemoteProtocolError):
    """The peer speaks another protocol version."""


class AuthenticationError(DjinnError):
    """The handshake failed: a missing or wrong token on one side."""


class ReplayError(DjinnError):
    """A session's state could not be rebuilt on a new server; the message says why."""


class ServerError(DjinnError):
    """The server refused or failed a call.

    `remote_type` names the server-side exception class. `op_index` is set
    when a queued RemoteTensor operation failed: its position in the batch.
    """

    code = "server"

    def __init__(self, message: str, remote_type: str = "", op_index: int | None = None) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.op_index = op_index


class InternalServerError(ServerError):
    """The server failed unexpectedly; its log has the details under the incident id."""

    code = "internal"


class LostReferenceError(ServerError):
    """A reference the server does not hold: released, expired, or another session's."""

    code = "lost_reference"


class RemoteCodeRefusedError(ServerError):
    """The server refuses pickled code because it runs without --trust-remote-code."""

    code = "remote_code_refused"


class ServerBusyError(ServerError):
    """The server is at a shared limit (sessions, connections, memory) and refuses new
    work instead of queueing it; retrying later can succeed."""

    code = "busy"


class QuotaExceededError(ServerError):
    """The call needs more server memory than a quota or budget allows; the message
    names the sizes and the flag that sets the limit."""

    code = "quota"


class LimitExceededError(ServerError):
    """The call ran past a per-call limit (time, operations, tokens); the message
    names the flag that sets it."""

    code = "limit"


class DeviceOutOfMemoryError(ServerError):
    """The server's device ran out of memory for this call; other sessions are unaffected."""

    code = "device_oom"


class RemoteUsageError(ServerError, ValueError, RuntimeError):
    """The server judged the call's arguments invalid (wrong shape, unknown method, ...);
    a ValueError and a RuntimeError, as transformers' and torch's refusals of them are."""

    code = "usage"


class StoreCorruptError(ServerError):
    """A model in the server's store failed its integrity check and was quarantined;
    registering the model again uploads it again."""

    code = "store_corrupt"


class CancelledError(ServerError):
    """The server stopped the call because it was cancelled or its connection closed."""

    code = "cancelled"


class ConnectionLostError(DjinnError, ConnectionError):
    """The connection closed, or could not be opened; pending calls fail with this."""


class DjinnTimeoutError(DjinnError, TimeoutError):
    """A call or a connection attempt ran out of time."""


_SERVER_ERRORS: Final[dict[str, type[ServerError]]] = {
    cls.code: cls
    for cls in (
        ServerError,
        InternalServerError,
        LostReferenceError,
        RemoteCodeRefusedError,
        ServerBusyError,
        QuotaExceededError,
        LimitExceededError,
        DeviceOutOfMemoryError,
        RemoteUsageError,
        StoreCorruptError,
        CancelledError,
    )
}
# Codes that are not ServerErrors: the server reports a broken protocol or a
# failed handshake on our side of the wire.
PROTOCOL_CODE: Final = "protocol"
VERSION_CODE: Final = "version"
AUTH_CODE: Final = "auth"

# What torch raises for a wrong shape, dtype or index in a user's operation.
USER_MISTAKES: Final = (RuntimeError, TypeError, ValueError, IndexError, KeyError)

log = logging.getLogger("djinn.server")
# Unexpected failures are logged with their traceback at most this often; the
# rest get one line each, so a client cannot flood the log.
_TRACEBACK_INTERVAL_S: Final = 10.0
_last_traceback = [0.0]


def to_wire(exc: BaseException, user_code: bool = False) -> tuple[str, str, str]:
    """(code, message, type name) for an exception raised while serving a call.

    `user_code`: it came from running the user's own operation, where torch's
    RuntimeError and friends mean bad arguments, not a server fault. Anything
    unexpected is logged here under an incident id, which is all the client
    learns of it.
    """
    import torch  # the wire module must not pull torch in at import: the CLI parses first

    kind = type(exc).__name__
    if isinstance(exc, ServerError):
        return exc.code, str(exc.args[0]) if exc.args else "", exc.remote_type or kind
    if isinstance(exc, VersionMismatchError):
        return VERSION_CODE, str(exc), kind
    if isinstance(exc, ProtocolError):
        return PROTOCOL_CODE, str(exc), kind
    if isinstance(exc, AuthenticationError):
        return AUTH_CODE, str(exc), kind
    if isinstance(exc, UsageError):
        return RemoteUsageError.code, str(exc), kind
    if isinstance(exc, torch.OutOfMemoryError):
        return (
            DeviceOutOfMemoryError.code,
            "cannot finish the call: the device is out of memory",
            kind,
        )
    if user_code and isinstance(exc, USER_MISTAKES):
        return RemoteUsageError.code, f"{kind}: {_first_line(exc)}", kind
    incident = secrets.token_hex(4)
    now = time.monotonic()
    if now - _last_traceback[0] >= _TRACEBACK_INTERVAL_S:
        _last_traceback[0] = now
        log.error("incident %s: unexpected %s", incident, kind, exc_info=exc)
    else:
        log.error("incident %s: unexpected %s: %s", incident, kind, _first_line(exc))
    return (
        InternalServerError.code,
        f"cannot finish the call: the server failed unexpectedly (incident {incident}; "
        "its log has the details)",
        kind,
    )


class _Lines:
    """At most `limit` log lines per `window_s`; the next line after a quiet spell
    says how many were left out, so a client cannot flood the server's log."""

    def __init__(self, limit: int = 20, window_s: float = 10.0) -> None:
        self._limit = limit
        self._window_s = window_s
        self._start = 0.0
        self._count = 0
        self._dropped = 0

    def __call__(self, text: str) -> None:
        now = time.monotonic()
        if now - self._start >= self._window_s:
            self._start, self._count = now, 0
        self._count += 1
        if self._count > self._limit:
            self._dropped += 1
            return
        if self._dropped:
            text += f" ({self._dropped} more failures not logged)"
            self._dropped = 0
        log.info(text)


failed_call = _Lines()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:500] if text else ""


def from_wire(code: str, message: str, remote_type: str, op_index: int | None) -> DjinnError:
    """The typed error a server reported in an ERROR frame."""
    if code == PROTOCOL_CODE:
        return LocalProtocolError(message)
    if code == VERSION_CODE:
        return VersionMismatchError(message)
    if code == AUTH_CODE:
        return AuthenticationError(message)
    return _SERVER_ERRORS.get(code, ServerError)(message, remote_type, op_index)
