"""The client against real servers: calls, traffic counts, timeouts, dead servers."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import djinn
from djinn import messages
from djinn.client import AsyncClient, parse_address
from djinn.errors import (
    ConnectionLostError,
    DjinnTimeoutError,
    LocalProtocolError,
    UsageError,
    VersionMismatchError,
)
from djinn.net.frame import PROTOCOL_VERSION, Frame, FrameKind, encode_frame
from djinn.server.dispatch import Call
from harness.server import ServerProcess
from tests.helpers import InProcessServer, RawPeer

pytestmark = pytest.mark.timeout(60)


def test_public_api_is_pinned() -> None:
    assert sorted(djinn.__all__) == sorted(
        [
            "AsyncClient",
            "Client",
            "DjinnError",
            "RemoteModel",
            "RemoteTensor",
            "__version__",
            "connect",
        ]
    )


@pytest.mark.parametrize(
    "value",
    [
        torch.randn(3, 4),
        torch.randn(2, 3, dtype=torch.bfloat16),
        torch.tensor(True),
        torch.empty(0),
        np.arange(6).reshape(2, 3),
        b"\x00" * 100_000,
        "text",
        42,
        2.5,
        None,
        {"a": [1, (2, 3)], "t": torch.ones(2), "n": np.zeros(3)},
    ],
    ids=[
        "f32",
        "bf16",
        "bool-0d",
        "empty",
        "numpy",
        "bytes",
        "str",
        "int",
        "float",
        "none",
        "nested",
    ],
)
def test_echo_returns_what_was_sent(client: djinn.Client, value: Any) -> None:
    back = client.echo(value)
    if isinstance(value, dict):
        assert torch.equal(back["t"], value["t"]) and back["a"] == value["a"]
        np.testing.assert_array_equal(back["n"], value["n"])
    elif isinstance(value, torch.Tensor):
        assert back.dtype == value.dtype and torch.equal(back, value)
    elif isinstance(value, np.ndarray):
        np.testing.assert_array_equal(back, value)
    else:
        assert back == value


def test_ping_and_traffic_counters(client: djinn.Client) -> None:
    assert 0 < client.ping() < 5
    before = client.stats()
    client.echo(torch.zeros(250_000))  # 1 MB each way
    after = client.stats()
    assert 1_000_000 < after["bytes_sent"] - before["bytes_sent"] < 1_001_000
    assert 1_000_000 < after["bytes_received"] - before["bytes_received"] < 1_001_000
    assert after["frames_sent"] - before["frames_sent"] == 1
    assert after["calls_in_flight"] == 0


def test_server_info_from_the_handshake(client: djinn.Client) -> None:
    assert client.server_info["protocol"] == PROTOCOL_VERSION
    assert client.server_info["device"] == "cpu"


@pytest.mark.parametrize(
    "control",
    [b"\x91\xabformat_disk", b"\x93\xa4echo\x01\x02", b"\x91\xa4echo"],
    ids=["unknown-kind", "extra-field", "missing-field"],
)
def test_unknown_and_malformed_requests_get_an_error_reply(
    server: ServerProcess, control: bytes
) -> None:
    peer = RawPeer(server.address)
    peer.handshake()
    peer.send_frame(FrameKind.REQUEST, control, request_id=3)
    failure = peer.failure()
    assert failure.code == "protocol" and "cannot decode" in failure.message
    peer.request(messages.Ping(), request_id=4)
    reply = peer.read_frame()
    assert reply is not None and reply.request_id == 4  # the connection survives


def test_a_protocol_error_reply_reaches_the_caller_typed(client: djinn.Client) -> None:
    class Unknown(messages.Message, tag="unknown"):
        pass

    with pytest.raises(LocalProtocolError, match="another version"):
        client.request(Unknown(), messages.Done)
    assert client.ping() > 0


def test_unsendable_argument_fails_before_sending(client: djinn.Client) -> None:
    sent = client.stats()["frames_sent"]
    with pytest.raises(UsageError, match="cannot send"):
        client.echo(object())
    assert client.stats()["frames_sent"] == sent


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9", ("::1", 9)), ("host", ("host", 5556))],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", ":80", "host:x", "host:70000"])
def test_parse_address_refuses_garbage(text: str) -> None:
    with pytest.raises(UsageError, match="cannot parse server address"):
        parse_address(text)


def test_connecting_to_a_closed_port_fails_at_once() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(ConnectionLostError, match="cannot connect"):
        djinn.connect(f"127.0.0.1:{port}")
    assert time.monotonic() - start < 2


def test_client_refuses_a_server_of_another_protocol_version() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            conn.recv(4096)
            head = encode_frame(Frame(FrameKind.CHALLENGE, 0, bytes(33)))[0]
            conn.sendall(head[:4] + bytes([PROTOCOL_VERSION + 1]) + head[5:])
            time.sleep(0.5)
            conn.close()

        threading.Thread(target=serve, daemon=True).start()
        with pytest.raises(VersionMismatchError, match=f"version {PROTOCOL_VERSION + 1}"):
            djinn.connect(f"127.0.0.1:{listener.getsockname()[1]}", connect_timeout=5)


def test_connect_times_out_on_a_silent_server() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # accepts in the kernel, never answers
        start = time.monotonic()
        with pytest.raises(DjinnTimeoutError, match="cannot"):
            djinn.connect(f"127.0.0.1:{listener.getsockname()[1]}", connect_timeout=0.5)
        assert time.monotonic() - start < 3


async def _slow(call: Call, msg: messages.Echo) -> messages.Echoed:
    seconds, tag = msg.value
    await asyncio.sleep(seconds)
    return messages.Echoed(tag)


SLOW = {messages.Echo: _slow}


def test_calls_time_out_and_the_connection_stays_usable(tmp_path: Path) -> None:
    with InProcessServer(tmp_path, SLOW) as srv, djinn.connect(srv.address) as client:
        start = time.monotonic()
        with pytest.raises(DjinnTimeoutError, match=r"no answer .* within 0\.2s.*timeout="):
            client.echo((1.0, "late"), timeout=0.2)
        assert time.monotonic() - start < 1.0
        assert client.echo((0.0, "next")) == "next"  # the late answer is skipped


def test_many_calls_in_flight_answer_in_any_order(tmp_path: Path) -> None:
    async def main(address: str) -> None:
        async with await AsyncClient.connect(address) as client:
            done: list[str] = []

            async def call(seconds: float, tag: str) -> None:
                assert await client.echo((seconds, tag)) == tag
                done.append(tag)

            slow = asyncio.ensure_future(call(1.0, "slow"))
            await asyncio.sleep(0.05)
            start = time.monotonic()
            await asyncio.gather(*(call(0.0, f"fast{i}") for i in range(50)))
            assert time.monotonic() - start < 0.8  # the slow call held none of them
            assert client.stats()["calls_in_flight"] == 1
            await slow
            assert done[-1] == "slow" and len(done) == 51

    with InProcessServer(tmp_path, SLOW) as srv:
        asyncio.run(main(srv.address))


def test_pending_calls_fail_at_once_when_the_server_goes(tmp_path: Path) -> None:
    async def main(address: str, stop: Any) -> None:
        client = await AsyncClient.connect(address, timeout=30)
        pending = [asyncio.ensure_future(client.echo((20.0, i))) for i in range(5)]
        await asyncio.sleep(0.2)
        start = time.monotonic()
        stop()
        for call in pending:
            with pytest.raises(ConnectionLostError):
                await call
        assert time.monotonic() - start < 5
        with pytest.raises(ConnectionLostError):
            await client.ping()

    srv = InProcessServer(tmp_path, SLOW).__enter__()
    asyncio.run(main(srv.address, lambda: srv.__exit__(None, None, None)))


def test_a_killed_server_raises_connection_lost_not_a_hang(tmp_path: Path) -> None:
    with ServerProcess("--store", str(tmp_path), "--device", "cpu") as proc:
        client = djinn.connect(proc.address, timeout=30)
        client.ping()
        proc.kill()
        start = time.monotonic()
        with pytest.raises(ConnectionLostError):
            client.ping()
        assert time.monotonic() - start < 2
        with pytest.raises(ConnectionLostError):
            client.ping()  # and it stays failed, without hanging


def test_echo_from_many_threads_on_one_client(client: djinn.Client) -> None:
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(20):
                t = torch.full((100,), float(i))
                assert torch.equal(client.echo(t), t)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
