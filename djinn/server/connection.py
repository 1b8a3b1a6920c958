"""One client connection on the server: the handshake, then requests dispatched.

Until the handshake is done the peer may send only tiny fixed-layout frames
(djinn.net.handshake). After it, each REQUEST is decoded into a typed
message and handed to its handler; handlers that wait for the device run
as tasks and answer in whatever order they finish. A CANCEL stops the
request it names; a dropped connection stops all of its requests and
frees its sessions. A peer that breaks the framing gets an ERROR frame and
a closed connection; a request that fails to decode gets an error reply.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any

from djinn import messages
from djinn.errors import (
    AuthenticationError,
    InternalServerError,
    ProtocolError,
    RemoteProtocolError,
    ServerBusyError,
    failed_call,
    to_wire,
)
from djinn.net import codec, handshake
from djinn.net.buffers import Share
from djinn.net.frame import HANDSHAKE_LIMITS, Frame, FrameKind, encode_frame, wire_size
from djinn.net.link import Link
from djinn.net.protocol import FrameProtocol
from djinn.server.device import Job
from djinn.server.dispatch import HANDLERS, Call, Owner
from djinn.server.inference import OpFailed

if TYPE_CHECKING:
    from djinn.server.app import Server

log = logging.getLogger("djinn.server")
REQUEST: Any = messages.Request  # a union: what codec.decode takes as the kind


class ServerConnection:
    def __init__(self, server: Server) -> None:
        self.server = server
        config = server.config
        share = Share(
            server.device.receive_pool,
            int(config.receive_budget_bytes * config.connection_receive_share),
        )
        self.protocol = FrameProtocol(
            self,
            share,
            HANDSHAKE_LIMITS,
            backpressure=True,
            frame_timeout_s=config.frame_timeout_s,
        )
        self.owner = Owner(peer="?")
        self._shake = handshake.ServerHandshake(config.token, server.info())
        self._running: dict[int, tuple[asyncio.Task[None], Job]] = {}
        self._link = Link(config.link_gbps, config.link_latency_s) if config.link_gbps else None
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(
            handshake.HANDSHAKE_TIMEOUT_S, self._on_handshake_timeout
        )

    @property
    def peer(self) -> str:
        return self.owner.peer

    # -- Peer interface ----------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        if not self._shake.ready:
            self._on_handshake(frame)
        elif frame.kind is FrameKind.REQUEST:
            self._on_request(frame)
        elif frame.kind is FrameKind.CANCEL:
            self._cancel(frame.request_id, "cancelled by the client")
        else:
            self.on_protocol_error(
                RemoteProtocolError(f"cannot accept frame: unexpected {frame.kind.name} frame")
            )

    def on_protocol_error(self, exc: ProtocolError) -> None:
        log.warning("%s: protocol error: %s", self.peer, exc)
        self._send_error(handshake.HANDSHAKE_ID, exc)
        self.protocol.close()

    def on_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        for request_id in list(self._running):
            self._cancel(request_id, "the connection closed")
        for session in list(self.owner.sessions.values()):
            self.server.sessions.close(session, reason="connection closed")
        self.server.models.abandon(self.owner)
        self.server.connections.discard(self)
        self.server.closed_traffic.update(
            sent=self.protocol.counters.bytes_sent, received=self.protocol.counters.bytes_received
        )
        log.info("%s: disconnected%s", self.peer, f" ({exc})" if exc else "")

    # -- handshake -----------------------------------------------------------------

    def _on_handshake(self, frame: Frame) -> None:
        if frame.kind is FrameKind.HELLO:
            self.owner.peer = _peer_name(self.protocol)
        try:
            reply = self._shake.receive(frame)
        except (RemoteProtocolError, AuthenticationError) as exc:
            log.warning("%s: handshake failed: %s", self.peer, exc)
            self._send_error(handshake.HANDSHAKE_ID, exc)
            self.protocol.close()
            return
        self._send(reply)
        if self._shake.ready:
            self._timer.cancel()
            self.protocol.decoder.limits = self.server.config.limits
            log.info("%s: connected", self.peer)

    def _on_handshake_timeout(self) -> None:
        if not self._shake.ready:
            log.warning("%s: no handshake within %gs", self.peer, handshake.HANDSHAKE_TIMEOUT_S)
            self.protocol.abort(RemoteProtocolError("handshake timed out"))

    # -- requests --------------------------------------------------------------------

    def _on_request(self, frame: Frame) -> None:
        request_id = frame.request_id
        try:
            message: messages.Message = codec.decode(frame.control, frame.buffers, REQUEST)
            handler = HANDLERS[type(message)]
            self.server.calls[type(message).__name__] += 1
            call = Call(
                self.server,
                self.owner,
                request_id,
                Job(type(message).__name__.lower(), self.server.config.max_call_s),
                lambda msg: self._stream(request_id, msg),
            )
            if not inspect.iscoroutinefunction(handler):
                self._reply(request_id, handler(call, message))
                return
            if len(self._running) >= self.server.config.max_calls_per_connection:
                raise ServerBusyError(
                    f"cannot accept call: {len(self._running)} calls already in flight on "
                    "this connection; wait for some to finish"
                )
            if request_id in self._running:
                raise RemoteProtocolError(f"cannot accept call: request id {request_id} is in use")
        except Exception as exc:
            self._send_error(request_id, exc)
            return
        task = self._loop.create_task(self._serve(call, handler, message))
        self._running[request_id] = (task, call.job)
        task.add_done_callback(lambda _: self._running.pop(request_id, None))

    async def _serve(self, call: Call, handler: Any, message: messages.Message) -> None:
        try:
            self._reply(call.request_id, await handler(call, message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._send_error(call.request_id, exc)

    def _cancel(self, request_id: int, reason: str) -> None:
        entry = self._running.get(request_id)
        if entry is not None:
            # the device thread stops at the job's next step, and the call ends then,
            # releasing its session: a call that ended at once could leave the job
            # still running on the session's state while the next call starts
            entry[1].cancel(reason)

    def close(self) -> list[asyncio.Task[None]]:
        """The server is shutting down: stop every call and close; returns the calls' tasks."""
        tasks = []
        for task, job in list(self._running.values()):
            job.cancel("the server is shutting down")
            task.cancel()
            tasks.append(task)
        self.protocol.close()
        return tasks

    def _stream(self, request_id: int, message: messages.Message) -> None:
        """From a device thread: send a STREAM frame for a running request."""
        control, buffers = codec.encode(message)
        frame = Frame(FrameKind.STREAM, request_id, control, buffers)
        self._loop.call_soon_threadsafe(self._send, frame)

    def _reply(self, request_id: int, reply: messages.Message) -> None:
        try:
            control, buffers = codec.encode(reply)
        except Exception as exc:
            self._send_error(request_id, exc)
            return
        self._send(Frame(FrameKind.RESPONSE, request_id, control, buffers))

    def _send(self, frame: Frame) -> None:
        if self._link is not None:
            self._loop.call_later(self._link.delay(wire_size(frame)), self._send_now, frame)
        else:
            self._send_now(frame)

    def _send_now(self, frame: Frame) -> None:
        if self.protocol.is_open:
            self.protocol.send(frame)

    def _send_error(self, request_id: int, exc: BaseException) -> None:
        op = exc.index if isinstance(exc, OpFailed) else None
        if isinstance(exc, OpFailed):
            code, message, kind = to_wire(exc.cause, user_code=True)
            message = f"cannot run {exc.name}: {message}"
        else:
            code, message, kind = to_wire(exc)
        failure = messages.Failure(code, message[:4096], kind, op)
        self.server.errors[code] += 1
        if code != InternalServerError.code:  # those are logged with their incident id
            failed_call(
                f"{self.peer}: call failed: {code}: {(message.splitlines() or [''])[0][:200]}"
            )
        self._send(Frame(FrameKind.ERROR, request_id, codec.encode(failure)[0]))


class Refusal(asyncio.Protocol):
    """What a connection past --max-connections gets: an ERROR frame, then a close."""

    def __init__(self, limit: int) -> None:
        self._limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        busy = ServerBusyError(
            f"cannot connect: the server holds its maximum of {self._limit} connections "
            "(--max-connections); retry later"
        )
        code, message, kind = to_wire(busy)
        control, _ = codec.encode(messages.Failure(code, message, kind))
        frame = Frame(FrameKind.ERROR, handshake.HANDSHAKE_ID, control)
        transport.write(b"".join(encode_frame(frame)))  # type: ignore[attr-defined]
        transport.close()


def _peer_name(protocol: FrameProtocol) -> str:
    if protocol.transport is None:
        return "?"
    peer = protocol.transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
