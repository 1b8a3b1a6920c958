"""One client connection on the server: handshake, then requests dispatched as tasks.

Requests run concurrently and answer in whatever order they finish, so a
slow call never holds up a fast one. A peer that breaks the protocol gets
an ERROR frame and a closed connection; nothing it sends reaches another
connection. When the connection ends, its sessions are freed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import traceback
from typing import TYPE_CHECKING, Any

import torch

from djinn.errors import (
    AUTH_CODE,
    PROTOCOL_CODE,
    VERSION_CODE,
    ProtocolError,
    RemoteProtocolError,
    RemoteUsageError,
    ServerBusyError,
    ServerError,
    UsageError,
    VersionMismatchError,
)
from djinn.net import handshake, payload
from djinn.net.frame import DEFAULT_LIMITS, HANDSHAKE_LIMITS, Frame, FrameKind, wire_size
from djinn.net.link import Link
from djinn.net.protocol import FrameProtocol
from djinn.server.inference import OpFailed

if TYPE_CHECKING:
    from djinn.server.app import Handler, Server
    from djinn.server.models import Upload
    from djinn.server.sessions import Session

log = logging.getLogger("djinn.server")


class ServerConnection:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.protocol = FrameProtocol(
            self, server.executor.allocate, HANDSHAKE_LIMITS, backpressure=True
        )
        self.protocol.peer_limits = DEFAULT_LIMITS
        self.peer = "?"
        self.sessions: dict[str, Session] = {}
        self.uploads: dict[str, Upload] = {}
        self._ready = False
        self._client_nonce = b""
        self._server_nonce = b""
        self._tasks: set[asyncio.Task[None]] = set()
        config = server.config
        self._link = Link(config.link_gbps, config.link_latency_s) if config.link_gbps else None
        self._timer = asyncio.get_running_loop().call_later(
            handshake.HANDSHAKE_TIMEOUT_S, self._on_handshake_timeout
        )

    # -- Peer interface ----------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        if self._ready and frame.kind is FrameKind.REQUEST:
            self._on_request(frame)
        elif not self._ready and frame.kind is FrameKind.HELLO and not self._client_nonce:
            self._on_hello(frame)
        elif not self._ready and frame.kind is FrameKind.AUTH and self._client_nonce:
            self._on_auth(frame)
        else:
            self.on_protocol_error(
                RemoteProtocolError(f"cannot accept frame: unexpected {frame.kind.name} frame")
            )

    def on_protocol_error(self, exc: ProtocolError) -> None:
        log.warning("%s: protocol error: %s", self.peer, exc)
        code = VERSION_CODE if isinstance(exc, VersionMismatchError) else PROTOCOL_CODE
        self._send_error(0, exc, code=code)
        self.protocol.close()

    def on_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        for task in self._tasks:
            task.cancel()
        for session in list(self.sessions.values()):
            self.server.sessions.close(session, reason="connection closed")
        self.server.models.abandon(self.uploads)
        self.server.connections.discard(self)
        log.info("%s: disconnected%s", self.peer, f" ({exc})" if exc else "")

    # -- handshake -----------------------------------------------------------------

    def _on_hello(self, frame: Frame) -> None:
        hello = self._decode_handshake(frame)
        if hello is None:
            return
        self.peer = _peer_name(self.protocol)
        self._client_nonce = hello["nonce"]
        self._server_nonce = handshake.new_nonce()
        token = self.server.config.token
        proof = (
            handshake.proof(token, "server", self._client_nonce, self._server_nonce)
            if token
            else None
        )
        reply = {"nonce": self._server_nonce, "auth": token is not None, "proof": proof}
        self._send(Frame(FrameKind.CHALLENGE, 0, payload.dumps(reply)[0]))

    def _on_auth(self, frame: Frame) -> None:
        auth = self._decode_handshake(frame, field="proof")
        if auth is None:
            return
        token = self.server.config.token
        if token and not handshake.check(
            token, "client", self._client_nonce, self._server_nonce, auth["proof"]
        ):
            log.warning("%s: authentication failed", self.peer)
            self._send_error(
                0, UsageError("cannot authenticate: wrong or missing token"), AUTH_CODE
            )
            self.protocol.close()
            return
        self._timer.cancel()
        self._ready = True
        self.protocol.decoder.limits = self.server.config.limits
        self._send(Frame(FrameKind.WELCOME, 0, payload.dumps({"server": self.server.info()})[0]))
        log.info("%s: connected", self.peer)

    def _decode_handshake(self, frame: Frame, field: str = "nonce") -> dict[str, Any] | None:
        try:
            message = payload.loads(frame.control, frame.buffers)
        except RemoteProtocolError as exc:
            self.on_protocol_error(exc)
            return None
        if (
            not isinstance(message, dict)
            or field not in message
            or (field == "nonce" and not handshake.is_nonce(message["nonce"]))
        ):
            self.on_protocol_error(
                RemoteProtocolError(f"cannot accept {frame.kind.name}: malformed handshake")
            )
            return None
        return message

    def _on_handshake_timeout(self) -> None:
        if not self._ready:
            log.warning("%s: no handshake within %gs", self.peer, handshake.HANDSHAKE_TIMEOUT_S)
            self.protocol.abort(RemoteProtocolError("handshake timed out"))

    # -- requests --------------------------------------------------------------------

    def _on_request(self, frame: Frame) -> None:
        try:
            request = payload.loads(frame.control, frame.buffers)
            if (
                not isinstance(request, tuple)
                or len(request) != 2
                or not isinstance(request[0], str)
                or not isinstance(request[1], tuple)
            ):
                raise RemoteProtocolError("cannot accept request: expected (method, args)")
            method, args = request
            handler = self.server.handler(method, args)
            if not inspect.iscoroutinefunction(handler):
                self._reply(frame.request_id, handler(self, *args))
                return
            if len(self._tasks) >= self.server.config.max_calls_per_connection:
                raise ServerBusyError(
                    f"cannot accept call: {len(self._tasks)} calls already in flight on "
                    "this connection; wait for some to finish"
                )
        except Exception as exc:
            self._send_error(frame.request_id, exc)
            return
        task = asyncio.get_running_loop().create_task(self._serve(frame.request_id, handler, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, request_id: int, handler: Handler, args: tuple[Any, ...]) -> None:
        try:
            self._reply(request_id, await handler(self, *args))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._send_error(request_id, exc)

    def _reply(self, request_id: int, result: Any) -> None:
        try:
            control, buffers = payload.dumps(result)
        except Exception as exc:
            self._send_error(request_id, exc)
            return
        self._send(Frame(FrameKind.RESPONSE, request_id, control, buffers))

    def _send(self, frame: Frame) -> None:
        if self._link is not None:
            size = wire_size(frame)
            loop = asyncio.get_running_loop()
            loop.call_later(self._link.delay(size), self._send_now, frame)
        else:
            self._send_now(frame)

    def _send_now(self, frame: Frame) -> None:
        if self.protocol.is_open:
            self.protocol.send(frame)

    def _send_error(self, request_id: int, exc: BaseException, code: str | None = None) -> None:
        op = exc.index if isinstance(exc, OpFailed) else None
        message, remote_type, trace = str(exc), type(exc).__name__, ""
        if isinstance(exc, OpFailed):
            remote_type = type(exc.cause).__name__
            code, trace = _classify(exc.cause)
            if code == ServerError.code and isinstance(exc.cause, _USER_MISTAKES):
                code, trace = RemoteUsageError.code, ""  # torch refusing the user's shapes
        elif code is None:
            code, trace = _classify(exc)
        if isinstance(exc, ServerError):
            message = exc.args[0] if exc.args else ""
        body = {"code": code, "message": message, "type": remote_type, "traceback": trace, "op": op}
        try:
            self._send(Frame(FrameKind.ERROR, request_id, payload.dumps(body)[0]))
        except ProtocolError:  # the message itself is too large: send its head
            body["message"], body["traceback"] = message[:4096], ""
            self._send(Frame(FrameKind.ERROR, request_id, payload.dumps(body)[0]))


# What torch raises for a wrong shape, dtype or index in a user's operation.
_USER_MISTAKES = (RuntimeError, TypeError, ValueError, IndexError)


def _classify(exc: BaseException) -> tuple[str, str]:
    """The wire code of an exception raised while serving, and its traceback if unexpected."""
    if isinstance(exc, ServerError):
        return exc.code, ""
    if isinstance(exc, UsageError):
        return RemoteUsageError.code, ""
    if isinstance(exc, ProtocolError):
        return PROTOCOL_CODE, ""
    if isinstance(exc, torch.OutOfMemoryError):
        return "device_oom", ""
    log.exception("unexpected error while serving a call", exc_info=exc)
    return ServerError.code, "".join(traceback.format_exception(exc))


def _peer_name(protocol: FrameProtocol) -> str:
    if protocol.transport is None:
        return "?"
    peer = protocol.transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
