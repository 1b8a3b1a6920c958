"""The server process: listening socket, shared state, dispatch, shutdown."""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

import torch

import djinn
from djinn.errors import RemoteUsageError
from djinn.net.frame import PROTOCOL_VERSION
from djinn.net.protocol import new_event_loop
from djinn.server.config import ServerConfig
from djinn.server.connection import ServerConnection
from djinn.server.executor import Executor, resolve_device
from djinn.server.models import ModelStore
from djinn.server.sessions import Session, SessionRegistry

log = logging.getLogger("djinn.server")

# A handler takes the connection and the call's arguments. A plain function
# runs inline as the request is decoded (no task, no loop iteration); a
# coroutine function runs as a task so it can wait for the device.
Handler = Callable[..., Any]


def _arity(fn: Handler) -> tuple[int, int]:
    """How many arguments a handler takes after the connection: (least, most)."""
    params = list(inspect.signature(fn).parameters.values())[1:]
    return sum(p.default is inspect.Parameter.empty for p in params), len(params)


class Server:
    """Shared state of one server: config, device executor, model store, sessions."""

    def __init__(self, config: ServerConfig, handlers: Mapping[str, Handler] | None = None) -> None:
        from djinn.server.handlers import HANDLERS

        config.check()
        self.config = config
        self.executor = Executor(
            resolve_device(config.device), config.receive_budget_bytes, config.max_queued
        )
        self.models = ModelStore(config, self.executor)
        self.sessions = SessionRegistry(config)
        self.sessions.on_close = self._on_session_closed
        self.connections: set[ServerConnection] = set()
        self._handlers = dict(HANDLERS if handlers is None else handlers)
        self._arity = {name: _arity(fn) for name, fn in self._handlers.items()}
        self._listener: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.address: tuple[str, int] = (config.host, config.port)

    def _on_session_closed(self, session: Session) -> None:
        if session.model is not None:
            self.models.release(session.model)

    async def start(self) -> tuple[str, int]:
        """Bind and start accepting; returns the real (host, port)."""
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            self._accept, self.config.host, self.config.port, reuse_address=True
        )
        host, port = self._listener.sockets[0].getsockname()[:2]
        self.address = (host, port)
        self._sweeper = loop.create_task(self.sessions.sweep_forever())
        return self.address

    def _accept(self) -> Any:
        conn = ServerConnection(self)
        self.connections.add(conn)
        return conn.protocol

    def handler(self, method: str, args: tuple[Any, ...]) -> Handler:
        """The handler for a call, after checking it exists and takes these arguments."""
        handler = self._handlers.get(method)
        if handler is None:
            raise RemoteUsageError(f"cannot call {method!r}: the server has no such method")
        least, most = self._arity[method]
        if not least <= len(args) <= most:
            raise RemoteUsageError(
                f"cannot call {method}: it takes {least}..{most} arguments, got {len(args)}"
            )
        return handler

    def info(self) -> dict[str, Any]:
        """Facts a client learns in the handshake."""
        return {
            "version": djinn.__version__,
            "protocol": PROTOCOL_VERSION,
            "device": str(self.executor.device),
            "dtype": self.config.dtype,
            "trust_remote_code": self.config.trust_remote_code,
        }

    def stats(self) -> dict[str, Any]:
        return {
            **self.info(),
            "connections": len(self.connections),
            "sessions": len(self.sessions),
            "models": len(self.models),
            "resident_bytes": self.sessions.resident_bytes,
            "model_bytes": self.models.resident_bytes,
            "receive_in_use_bytes": self.executor.receive_pool.in_use_bytes,
            "queued_calls": self.executor.queued,
            "device_busy_s": self.executor.busy_s,
            "device_jobs": self.executor.jobs,
            **self.executor.memory(),
        }

    async def close(self) -> None:
        """Stop accepting, drop every connection and session, release the device."""
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.protocol.close()
        await asyncio.sleep(0)
        self.sessions.close_all()
        self.executor.shutdown()


def serve(config: ServerConfig) -> None:
    """Run a server until SIGINT or SIGTERM."""
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(config))
    finally:
        loop.close()


async def _serve(config: ServerConfig) -> None:
    server = Server(config)
    host, port = await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"djinn server {djinn.__version__} listening on {shown}:{port} "
        f"(device {server.executor.device}, torch {torch.__version__}, "
        f"auth {'token' if config.token else 'off'}, store {config.store})",
        flush=True,
    )
    await stop.wait()
    print("djinn server shutting down", file=sys.stderr, flush=True)
    await server.close()
