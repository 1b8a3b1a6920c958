"""Token authentication by HMAC challenge-response; the token never crosses the wire.

    client -> HELLO      {"nonce": c}
    server -> CHALLENGE  {"nonce": s, "auth": bool, "proof": HMAC(token, "server" c s) | None}
    client -> AUTH       {"proof": HMAC(token, "client" c s) | None}
    server -> WELCOME    {"server": facts}      or ERROR, then close

Both nonces are fresh per connection, so a recorded proof is useless on
another connection; the server's proof lets a client with a token know it
reached a server that holds the same token.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Final

from djinn.errors import AuthenticationError, RemoteProtocolError

NONCE_BYTES: Final = 32
# A peer that has not finished the handshake by then is dropped.
HANDSHAKE_TIMEOUT_S: Final = 10.0


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_BYTES)


def proof(token: str, role: str, client_nonce: bytes, server_nonce: bytes) -> bytes:
    """What `role` ("client" or "server") sends to show it holds `token`."""
    message = role.encode() + b"\0" + client_nonce + server_nonce
    return hmac.new(token.encode(), message, hashlib.sha256).digest()


def check(
    token: str, role: str, client_nonce: bytes, server_nonce: bytes, received: object
) -> bool:
    """True when `received` is the proof `role` must send; constant time."""
    if not isinstance(received, bytes):
        return False
    return hmac.compare_digest(proof(token, role, client_nonce, server_nonce), received)


def is_nonce(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == NONCE_BYTES


class ClientHandshake:
    """The client's side of the exchange, with no I/O: messages in, messages out."""

    def __init__(self, token: str | None, address: str) -> None:
        self._token = token
        self._address = address
        self._nonce = new_nonce()
        self._server_nonce = b""

    def hello(self) -> dict[str, object]:
        return {"nonce": self._nonce}

    def answer(self, challenge: object) -> dict[str, object]:
        """The AUTH message for a CHALLENGE; raises when the server cannot be trusted."""
        if not isinstance(challenge, dict) or not is_nonce(challenge.get("nonce")):
            raise RemoteProtocolError("cannot connect: malformed challenge from the server")
        self._server_nonce = challenge["nonce"]
        if not challenge.get("auth"):
            return {"proof": None}
        if self._token is None:
            raise AuthenticationError(
                f"cannot connect to {self._address}: the server requires a token; "
                "pass token=... or set DJINN_TOKEN"
            )
        if not check(
            self._token, "server", self._nonce, self._server_nonce, challenge.get("proof")
        ):
            raise AuthenticationError(
                f"cannot connect to {self._address}: the server does not hold the same token"
            )
        return {"proof": proof(self._token, "client", self._nonce, self._server_nonce)}

    def welcome(self, message: object) -> dict[str, object]:
        """The server facts from a WELCOME message."""
        server = message.get("server") if isinstance(message, dict) else None
        if not isinstance(server, dict):
            raise RemoteProtocolError("cannot connect: malformed welcome from the server")
        return server
