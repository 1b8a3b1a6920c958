"""Test helpers: an in-process server on its own event loop thread, and raw-socket peers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from djinn import messages
from djinn.net import codec
from djinn.net.frame import NEED_DATA, Frame, FrameDecoder, FrameKind, encode_frame
from djinn.net.protocol import new_event_loop
from djinn.server.app import Server
from djinn.server.config import ServerConfig
from djinn.server.dispatch import HANDLERS, Handler


def eventually(check: Callable[[], bool], seconds: float = 10.0) -> bool:
    """Whether `check()` comes true within `seconds` (polled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


class InProcessServer:
    """A djinn Server on a background event loop, for tests that inject handlers."""

    def __init__(
        self,
        store: Path,
        handlers: Mapping[type[messages.Message], Handler] | None = None,
        **config: Any,
    ) -> None:
        self.config = ServerConfig(port=0, device="cpu", store=store, **config)
        self.handlers = handlers
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: Server | None = None
        self.address = ""

    def __enter__(self) -> InProcessServer:
        self.thread.start()

        async def start() -> None:
            self.server = Server(self.config)
            host, port = await self.server.start()
            self.address = f"{host}:{port}"

        asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)

        self._saved = {kind: HANDLERS[kind] for kind in self.handlers or {}}
        HANDLERS.update(self.handlers or {})
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        HANDLERS.update(self._saved)
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class RawPeer:
    """A client that speaks frames by hand, to send what a real client never would."""

    def __init__(self, address: str, timeout: float = 10.0) -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.decoder = FrameDecoder()

    def send_frame(self, kind: FrameKind, control: bytes, request_id: int = 0) -> None:
        self.sock.sendall(b"".join(encode_frame(Frame(kind, request_id, control))))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self) -> Frame | None:
        """The next frame, or None when the server closed the connection."""
        while True:
            frame = self.decoder.next_frame()
            if frame is not NEED_DATA:
                assert isinstance(frame, Frame)
                return frame
            data = self.sock.recv(65536)
            if not data:
                return None
            self.decoder.receive_data(data)

    def handshake(self) -> messages.ServerInfo:
        self.send_frame(FrameKind.HELLO, os.urandom(32))
        challenge = self.read_frame()
        assert challenge is not None and challenge.kind is FrameKind.CHALLENGE
        self.send_frame(FrameKind.AUTH, b"")
        welcome = self.read_frame()
        assert welcome is not None and welcome.kind is FrameKind.WELCOME, welcome
        return codec.decode(welcome.control, welcome.buffers, messages.ServerInfo)

    def request(self, message: messages.Message, request_id: int = 1) -> None:
        control, buffers = codec.encode(message)
        self.sock.sendall(
            b"".join(
                bytes(memoryview(b))
                for b in encode_frame(Frame(FrameKind.REQUEST, request_id, control, buffers))
            )
        )

    def failure(self) -> messages.Failure:
        """The next frame, which must be an ERROR."""
        frame = self.read_frame()
        assert frame is not None and frame.kind is FrameKind.ERROR, frame
        return codec.decode(frame.control, frame.buffers, messages.Failure)

    def is_closed(self) -> bool:
        """True once the server has closed its side (reads return EOF)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class FaultProxy:
    """A TCP proxy between a client and a server that misbehaves on request.

    `delay_s` holds every chunk back that long; `cut_up_after` / `cut_down_after`
    drop both connections once that many bytes have gone towards the server /
    back to the client (mid-frame if that is where the count falls). It counts
    what it forwarded each way.
    """

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.delay_s = 0.0
        self.cut_up_after: int | None = None
        self.cut_down_after: int | None = None
        self.up = 0
        self.down = 0
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            pair = (client, server)
            threading.Thread(
                target=self._pump, args=(client, server, True, pair), daemon=True
            ).start()
            threading.Thread(
                target=self._pump, args=(server, client, False, pair), daemon=True
            ).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, up: bool, pair: tuple[socket.socket, ...]
    ) -> None:
        try:
            while data := src.recv(65536):
                if self.delay_s:
                    time.sleep(self.delay_s)
                limit = self.cut_up_after if up else self.cut_down_after
                done = self.up if up else self.down
                if limit is not None and done + len(data) >= limit:
                    dst.sendall(data[: max(0, limit - done)])
                    self._count(up, max(0, limit - done))
                    break
                dst.sendall(data)
                self._count(up, len(data))
        except OSError:
            pass
        for sock in pair:  # a cut drops the whole connection, both ways
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _count(self, up: bool, n: int) -> None:
        if up:
            self.up += n
        else:
            self.down += n

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
