"""Every error djinn raises, under one base class, grouped by who is at fault.

- `UsageError`: the caller misused the API; the message says what to do instead.
- `ProtocolError`: bytes on the wire broke the protocol. `RemoteProtocolError`
  when the peer sent them, `LocalProtocolError` when this side tried to send
  them (or the peer reported that it did).
- `AuthenticationError`: the handshake refused the peer.
- `ServerError`: the server raised while handling a call; it carries the
  server's exception type and traceback. Its subclasses name the cases
  a caller may want to handle (a lost reference, a busy server, ...).
- `ConnectionLostError` and `DjinnTimeoutError`: the connection is gone or
  a call ran out of time; both also derive from the builtin they refine.

Messages read "cannot <verb>: <reason>".
"""

from __future__ import annotations


class DjinnError(Exception):
    """Base class of every error djinn raises."""


class UsageError(DjinnError):
    """The API was called in a way it does not support."""


class ProtocolError(DjinnError):
    """Bytes on the wire broke the protocol; the connection is closed after it."""


class LocalProtocolError(ProtocolError):
    """This side tried to send something the protocol forbids (or the peer said it did)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol."""


class VersionMismatchError(RemoteProtocolError):
    """The peer speaks another protocol version."""


class AuthenticationError(DjinnError):
    """The handshake failed: a missing or wrong token on one side."""


class ServerError(DjinnError):
    """The server raised while handling a call.

    `remote_type` names the server-side exception class and
    `remote_traceback` holds its formatted traceback (empty when the server
    chose not to share it). `op_index` is set when a queued RemoteTensor
    operation failed: its position in the batch the server ran.
    """

    code = "server"

    def __init__(
        self,
        message: str,
        remote_type: str = "",
        remote_traceback: str = "",
        op_index: int | None = None,
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.op_index = op_index

    def __str__(self) -> str:
        text = super().__str__()
        if self.remote_traceback:
            return f"{text}\n\n--- server traceback ---\n{self.remote_traceback.rstrip()}"
        return text


class LostReferenceError(ServerError):
    """A reference the server does not hold: released, expired, or another session's."""

    code = "lost_reference"


class RemoteCodeRefusedError(ServerError):
    """The server refuses pickled code because it runs without --trust-remote-code."""

    code = "remote_code_refused"


class ServerBusyError(ServerError):
    """The server is at a limit (sessions, memory) and rejects new work instead of queueing it."""

    code = "busy"


class QuotaExceededError(ServerError):
    """A session asked for more server memory than its quota allows."""

    code = "quota"


class DeviceOutOfMemoryError(ServerError):
    """The server's device ran out of memory for this call; other sessions are unaffected."""

    code = "device_oom"


class RemoteUsageError(ServerError):
    """The server judged the call's arguments invalid (wrong shape, unknown method, ...)."""

    code = "usage"


class ConnectionLostError(DjinnError, ConnectionError):
    """The connection closed, or could not be opened; pending calls fail with this."""


class DjinnTimeoutError(DjinnError, TimeoutError):
    """A call or a connection attempt ran out of time."""


_BY_CODE: dict[str, type[ServerError]] = {
    cls.code: cls
    for cls in (
        ServerError,
        LostReferenceError,
        RemoteCodeRefusedError,
        ServerBusyError,
        QuotaExceededError,
        DeviceOutOfMemoryError,
        RemoteUsageError,
    )
}

# Codes that are not ServerErrors: the server reports a broken protocol or a
# failed handshake on our side of the wire.
PROTOCOL_CODE = "protocol"
VERSION_CODE = "version"
AUTH_CODE = "auth"


def error_from_wire(
    code: str, message: str, remote_type: str, traceback: str, op_index: int | None = None
) -> DjinnError:
    """Rebuild the typed error a server reported in an ERROR frame."""
    if code == PROTOCOL_CODE:
        return LocalProtocolError(message)
    if code == VERSION_CODE:
        return VersionMismatchError(message)
    if code == AUTH_CODE:
        return AuthenticationError(message)
    return _BY_CODE.get(code, ServerError)(message, remote_type, traceback, op_index)
