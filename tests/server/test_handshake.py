"""The server's front door: tokens, handshake order, versions, bad bytes, bad messages."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import djinn
from djinn import messages
from djinn.errors import AuthenticationError
from djinn.net.frame import MAGIC, PROTOCOL_VERSION, FrameKind
from harness.server import ServerProcess
from tests.helpers import RawPeer

pytestmark = pytest.mark.timeout(60)
TOKEN = "s3cret-for-tests"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("store")
    with ServerProcess("--store", str(store), "--token", TOKEN, "--device", "cpu") as proc:
        yield proc


def error_of(peer: RawPeer) -> messages.Failure:
    return peer.failure()


def test_right_token_connects(secured: ServerProcess) -> None:
    with djinn.connect(secured.address, token=TOKEN) as client:
        assert client.ping() > 0


def test_token_from_the_environment(
    secured: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DJINN_TOKEN", TOKEN)
    with djinn.connect(secured.address) as client:
        assert client.ping() > 0


def test_missing_token_is_refused_with_advice(secured: ServerProcess) -> None:
    with pytest.raises(AuthenticationError, match=r"requires a token.*DJINN_TOKEN"):
        djinn.connect(secured.address)


def test_wrong_token_is_refused(secured: ServerProcess) -> None:
    with pytest.raises(AuthenticationError, match="does not hold the same token"):
        djinn.connect(secured.address, token="wrong")


def test_wrong_proof_gets_an_error_and_nothing_else(secured: ServerProcess) -> None:
    peer = RawPeer(secured.address)
    peer.send_frame(FrameKind.HELLO, os.urandom(32))
    challenge = peer.read_frame()
    assert challenge is not None and challenge.kind is FrameKind.CHALLENGE
    peer.send_frame(FrameKind.AUTH, b"\0" * 32)
    body = error_of(peer)
    assert body.code == "auth" and "wrong or missing token" in body.message
    assert peer.read_frame() is None  # closed


def test_the_token_never_crosses_the_wire(secured: ServerProcess) -> None:
    peer = RawPeer(secured.address)
    peer.send_frame(FrameKind.HELLO, os.urandom(32))
    challenge = peer.read_frame()
    assert challenge is not None
    assert TOKEN.encode() not in challenge.control


def test_request_before_handshake_is_refused_and_closed(server: ServerProcess) -> None:
    peer = RawPeer(server.address)
    peer.request(messages.Stats())
    body = error_of(peer)
    assert body.code == "protocol" and "unexpected REQUEST" in body.message
    assert peer.read_frame() is None


def test_request_after_hello_without_auth_is_refused(secured: ServerProcess) -> None:
    peer = RawPeer(secured.address)
    peer.send_frame(FrameKind.HELLO, os.urandom(32))
    peer.read_frame()
    peer.request(messages.Echo(1))
    assert error_of(peer).code == "protocol"
    assert peer.read_frame() is None


def test_handshake_frames_may_not_carry_buffers(server: ServerProcess) -> None:
    peer = RawPeer(server.address)
    header = struct.pack("!4sBBHQII", MAGIC, PROTOCOL_VERSION, FrameKind.HELLO, 0, 0, 0, 1)
    peer.send_raw(header + struct.pack("!Q", 1 << 30))
    assert "1 buffers exceed the limit of 0" in error_of(peer).message
    assert peer.read_frame() is None


def test_other_protocol_version_gets_a_clear_error(server: ServerProcess) -> None:
    peer = RawPeer(server.address)
    header = struct.pack("!4sBBHQII", MAGIC, PROTOCOL_VERSION + 1, FrameKind.HELLO, 0, 0, 0, 0)
    peer.send_raw(header)
    body = error_of(peer)
    assert body.code == "version"
    assert f"version {PROTOCOL_VERSION + 1}" in body.message
    assert peer.read_frame() is None


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        os.urandom(4096),
        struct.pack("!4sBBHQII", MAGIC, PROTOCOL_VERSION, 99, 0, 0, 0, 0),
        struct.pack("!4sBBHQII", MAGIC, PROTOCOL_VERSION, FrameKind.HELLO, 0, 0, 2**32 - 1, 0),
    ],
    ids=["http", "random", "unknown-kind", "huge-control"],
)
def test_garbage_gets_an_error_and_the_server_serves_others(
    server: ServerProcess, data: bytes
) -> None:
    peer = RawPeer(server.address)
    peer.send_raw(data)
    assert error_of(peer).code == "protocol"
    assert peer.read_frame() is None
    with djinn.connect(server.address) as other:
        assert other.echo("still here") == "still here"


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_calls_os_system_runs_nothing(server: ServerProcess, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    peer = RawPeer(server.address)
    peer.handshake()
    peer.send_frame(FrameKind.REQUEST, pickle.dumps(("echo", (_Evil(marker),))), request_id=7)
    frame = peer.read_frame()
    assert frame is not None and frame.kind is FrameKind.ERROR and frame.request_id == 7
    assert not marker.exists()
    peer.request(messages.Ping(), request_id=8)  # the connection serves on
    reply = peer.read_frame()
    assert reply is not None and reply.kind is FrameKind.RESPONSE and reply.request_id == 8
    with djinn.connect(server.address) as other:
        assert other.ping() > 0


def _hash_bomb() -> bytes:
    """What froze the old server in a HELLO: tuples sharing their children through the
    pickle memo (2^60 leaves in a few hundred bytes), which it decoded before auth."""
    shared: object = ()
    for _ in range(60):
        shared = (shared, shared)
    return pickle.dumps(shared, protocol=5)  # the memo keeps it linear; hashing it would not


def test_a_hash_bomb_hello_is_refused_at_once(server: ServerProcess) -> None:
    peer = RawPeer(server.address)
    start = time.perf_counter()
    peer.send_frame(FrameKind.HELLO, _hash_bomb()[:128])
    body = error_of(peer)
    assert body.code == "protocol" and "malformed handshake" in body.message
    assert time.perf_counter() - start < 2.0
    with djinn.connect(server.address) as other:
        assert other.ping() < 1.0


def test_help_lists_the_options_and_never_the_token() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "djinn.server", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "DJINN_TOKEN": TOKEN},
    ).stdout
    for option in ("--host", "--port", "--token", "--device", "--store", "--trust-remote-code"):
        assert option in out
    assert TOKEN not in out and "(default: None)" not in out
    assert "(default: 5556)" in out


def test_server_takes_its_token_from_the_environment(tmp_path: Path) -> None:
    env = {"DJINN_TOKEN": TOKEN}
    with ServerProcess("--store", str(tmp_path), "--device", "cpu", env=env) as proc:
        with pytest.raises(AuthenticationError, match="does not hold the same token"):
            djinn.connect(proc.address, token="wrong")
        with djinn.connect(proc.address, token=TOKEN) as client:
            assert client.ping() > 0


def refused(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Start a server that must refuse to start; no token in its environment."""
    env = {k: v for k, v in os.environ.items() if k != "DJINN_TOKEN"}
    command = [sys.executable, "-m", "djinn.server", "--port", "0", "--store", str(tmp_path), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)


def test_refuses_a_public_bind_without_a_token(tmp_path: Path) -> None:
    result = refused("--host", "0.0.0.0", tmp_path=tmp_path)
    assert result.returncode == 2
    assert "--token" in result.stderr and "0.0.0.0" in result.stderr


def test_trust_remote_code_needs_a_token(tmp_path: Path) -> None:
    result = refused("--trust-remote-code", tmp_path=tmp_path)
    assert result.returncode == 2 and "--trust-remote-code needs --token" in result.stderr


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    proc = ServerProcess("--store", str(tmp_path), "--device", "cpu").start()
    assert proc.port > 0
    assert proc.stop() == 0
    assert "shutting down" in proc.output()
