"""The server process: listening socket, shared state, shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import torch

import djinn
from djinn import messages
from djinn.net.frame import PROTOCOL_VERSION
from djinn.net.protocol import new_event_loop
from djinn.server.config import ServerConfig
from djinn.server.connection import Refusal, ServerConnection
from djinn.server.device import Device
from djinn.server.models import ModelStore
from djinn.server.sessions import Session, SessionRegistry

log = logging.getLogger("djinn.server")


class Server:
    """Shared state of one server: config, device, model store, sessions, connections."""

    def __init__(self, config: ServerConfig) -> None:
        config.check()
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.config = config
        self.device = Device(
            config.device,
            config.receive_budget_bytes,
            config.max_queued,
            batching=config.batching,
            max_batch=config.max_batch,
            batch_wait_us=config.batch_wait_us,
        )
        self.models = ModelStore(config, self.device)
        self.sessions = SessionRegistry(config)
        self.sessions.on_close = self._on_session_closed
        self.connections: set[ServerConnection] = set()
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
        if len(self.connections) >= self.config.max_connections:
            return Refusal(self.config.max_connections)
        conn = ServerConnection(self)
        self.connections.add(conn)
        return conn.protocol

    def info(self) -> messages.ServerInfo:
        """Facts a client learns in the handshake."""
        return messages.ServerInfo(
            version=djinn.__version__,
            protocol=PROTOCOL_VERSION,
            device=str(self.device.device),
            dtype=self.config.dtype,
            trust_remote_code=self.config.trust_remote_code,
        )

    def stats(self) -> dict[str, Any]:
        turn = self.device.turn
        return {
            "version": djinn.__version__,
            "device": str(self.device.device),
            "dtype": self.config.dtype,
            "connections": len(self.connections),
            "sessions": len(self.sessions),
            "models": len(self.models),
            "resident_bytes": self.sessions.resident_bytes,
            "model_bytes": self.models.resident_bytes,
            "receive_in_use_bytes": self.device.receive_pool.in_use_bytes,
            "queued_calls": self.device.queued,
            "device_busy_s": turn.held_s,
            "device_jobs": self.device.jobs,
            **self.device.batcher.stats(),
            **self.device.memory(),
        }

    async def close(self) -> None:
        """Stop accepting, drop every connection and session, release the device."""
        if self._listener is not None:
            self._listener.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        tasks = [task for conn in list(self.connections) for task in conn.close()]
        if tasks:
            await asyncio.wait(tasks, timeout=5.0)
        await asyncio.sleep(0)
        self.sessions.close_all()
        self.models.close()
        self.device.shutdown()


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
        f"(device {server.device.device}, torch {torch.__version__}, "
        f"auth {'token' if config.token else 'off'}, store {config.store})",
        flush=True,
    )
    await stop.wait()
    print("djinn server shutting down", file=sys.stderr, flush=True)
    await server.close()
