"""Token authentication by HMAC challenge-response; the token never crosses the wire.

Both sides are state machines with no I/O: frames in, frames out. Until the
client has proven its token, every field has a fixed size and is read by
slicing bytes, so nothing a stranger sends is decoded by any parser:

    client -> HELLO      client nonce (32 bytes)
    server -> CHALLENGE  server nonce (32) | auth flag (1) | server proof (32, if auth)
    client -> AUTH       client proof (32), or nothing when the server needs no token
    server -> WELCOME    ServerInfo (MessagePack)        or ERROR, then close

proof(role) = HMAC-SHA256(token, role "\\0" client nonce server nonce). Both
nonces are fresh per connection, so a recorded proof is useless on another
connection; the server's proof lets a client with a token know it reached a
server that holds the same token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
from typing import Final

from djinn import messages
from djinn.errors import AuthenticationError, RemoteProtocolError
from djinn.net import codec
from djinn.net.frame import Frame, FrameKind

NONCE_BYTES: Final = 32
PROOF_BYTES: Final = 32
# A peer that has not finished the handshake by then is dropped.
HANDSHAKE_TIMEOUT_S: Final = 10.0
# Request id 0 belongs to the handshake and to connection-level errors.
HANDSHAKE_ID: Final = 0


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(token: str, role: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What `role` ("client" or "server") sends to show it holds `token`."""
    message = role.encode() + b"\0" + client_nonce + server_nonce
    return hmac.new(token.encode(), message, hashlib.sha256).digest()


def _check(token: str, role: str, client: bytes, server: bytes, received: bytes) -> bool:
    return hmac.compare_digest(proof(token, role, client, server), received)


class ClientHandshake:
    """The client's side: `hello()`, then `answer(challenge)`, then `welcome(frame)`."""

    def __init__(self, token: str | None, address: str) -> None:
        self._token = token
        self._address = address
        self._nonce = new_nonce()

    def hello(self) -> Frame:
        return Frame(FrameKind.HELLO, HANDSHAKE_ID, self._nonce)

    def answer(self, frame: Frame) -> Frame:
        """The AUTH frame for a CHALLENGE; raises when the server cannot be trusted."""
        body = bytes(frame.control)
        if frame.kind is not FrameKind.CHALLENGE or len(body) not in (
            NONCE_BYTES + 1,
            NONCE_BYTES + 1 + PROOF_BYTES,
        ):
            raise RemoteProtocolError("cannot connect: malformed challenge from the server")
        server_nonce, needs_token, server_proof = (
            body[:NONCE_BYTES],
            body[NONCE_BYTES],
            body[NONCE_BYTES + 1 :],
        )
        if not needs_token:
            return Frame(FrameKind.AUTH, HANDSHAKE_ID, b"")
        if self._token is None:
            raise AuthenticationError(
                f"cannot connect to {self._address}: the server requires a token; "
                "pass token=... or set DJINN_TOKEN"
            )
        if len(server_proof) != PROOF_BYTES or not _check(
            self._token, "server", self._nonce, server_nonce, server_proof
        ):
            raise AuthenticationError(
                f"cannot connect to {self._address}: the server does not hold the same token"
            )
        answer = proof(self._token, "client", self._nonce, server_nonce)
        return Frame(FrameKind.AUTH, HANDSHAKE_ID, answer)

    def welcome(self, frame: Frame) -> messages.ServerInfo:
        if frame.kind is not FrameKind.WELCOME:
            raise RemoteProtocolError("cannot connect: malformed welcome from the server")
        return codec.decode(frame.control, frame.buffers, messages.ServerInfo)


class _Stage(enum.Enum):
    HELLO = 1
    AUTH = 2
    READY = 3
    FAILED = 4


class ServerHandshake:
    """The server's side: feed each frame to `receive`, send back what it returns.

    Raises RemoteProtocolError for a frame out of turn or of the wrong size,
    AuthenticationError for a wrong or missing proof; the connection closes
    after either.
    """

    def __init__(self, token: str | None, info: messages.ServerInfo) -> None:
        self._token = token
        self._info = info
        self._stage = _Stage.HELLO
        self._client_nonce = b""
        self._server_nonce = new_nonce()

    @property
    def ready(self) -> bool:
        return self._stage is _Stage.READY

    def receive(self, frame: Frame) -> Frame:
        try:
            if self._stage is _Stage.HELLO and frame.kind is FrameKind.HELLO:
                return self._on_hello(bytes(frame.control))
            if self._stage is _Stage.AUTH and frame.kind is FrameKind.AUTH:
                return self._on_auth(bytes(frame.control))
            raise RemoteProtocolError(
                f"cannot accept frame: unexpected {frame.kind.name} frame during the handshake"
            )
        except BaseException:
            self._stage = _Stage.FAILED
            raise

    def _on_hello(self, nonce: bytes) -> Frame:
        if len(nonce) != NONCE_BYTES:
            raise RemoteProtocolError("cannot accept HELLO: malformed handshake")
        self._client_nonce = nonce
        self._stage = _Stage.AUTH
        body = self._server_nonce + bytes([self._token is not None])
        if self._token is not None:
            body += proof(self._token, "server", nonce, self._server_nonce)
        return Frame(FrameKind.CHALLENGE, HANDSHAKE_ID, body)

    def _on_auth(self, answer: bytes) -> Frame:
        if self._token is not None and not (
            len(answer) == PROOF_BYTES
            and _check(self._token, "client", self._client_nonce, self._server_nonce, answer)
        ):
            raise AuthenticationError("cannot authenticate: wrong or missing token")
        self._stage = _Stage.READY
        control, _ = codec.encode(self._info)
        return Frame(FrameKind.WELCOME, HANDSHAKE_ID, control)
