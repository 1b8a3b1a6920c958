"""Server settings, checked once at start-up."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from djinn.errors import UsageError
from djinn.net.frame import DEFAULT_LIMITS, Limits
from djinn.paths import cache_root

DTYPES = ("auto", "float32", "float16", "bfloat16")
COMPILE_MODES = ("off", "auto", "on")  # see djinn/server/compiled.py
GIB = 1024**3


def default_store() -> Path:
    """Where uploaded weights persist: $DJINN_STORE, else the user's cache dir."""
    if os.environ.get("DJINN_STORE"):
        return Path(os.environ["DJINN_STORE"])
    return cache_root() / "store"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5556
    token: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    store: Path = field(default_factory=default_store)
    trust_remote_code: bool = False
    models: tuple[tuple[str, Path], ...] = ()  # (name, folder) held from the start
    # -- sessions and memory
    session_lease_s: float = 300.0
    max_sessions: int = 256
    max_sessions_per_connection: int = 64
    session_quota_bytes: int = 8 * GIB  # server-held tensors of one session
    session_memory_bytes: int = 32 * GIB  # ... of all sessions together
    memory_budget_bytes: int = 64 * GIB  # model weights held in memory
    # -- the network
    max_connections: int = 512
    max_calls_per_connection: int = 1024
    receive_budget_bytes: int = 8 * GIB  # large receive buffers in use at once
    connection_receive_share: float = 0.5  # ... of which one connection may hold
    frame_timeout_s: float = 10.0  # a frame's payload must arrive within this + 1 s per 8 MB
    limits: Limits = DEFAULT_LIMITS
    link_gbps: float | None = None  # emulate a link: pace replies to this bandwidth
    link_latency_s: float = 0.0
    # -- work
    max_queued: int = 256  # calls waiting for the device, across connections
    max_call_s: float = 600.0  # one call's device time, checked between steps and ops
    max_ops_per_call: int = 4096  # queued operations in one call
    max_generate_tokens: int = 1 << 20  # batch x beams x new tokens of one generate
    batching: bool = True
    max_batch: int = 64  # decode rows in one batched forward
    batch_wait_us: int = 0  # how long a lone decode step waits for company
    prefill_chunk: int = 512  # prompt tokens per device turn; longer prompts take several
    compile: str = "off"  # the decode step under torch.compile: off, auto (CUDA only), on
    threads: int | None = None  # torch threads; None leaves torch's default
    metrics_port: int | None = None

    def check(self) -> None:
        """Raise UsageError for settings the server must not start with."""
        if not is_loopback(self.host) and not self.token:
            raise UsageError(
                f"cannot listen on {self.host}: it is reachable from other machines and no token "
                "is set; pass --token (or set DJINN_TOKEN), or bind 127.0.0.1"
            )
        if not 0 <= self.port < 65536:
            raise UsageError(f"cannot listen on port {self.port}: ports run from 0 to 65535")
        if self.compile not in COMPILE_MODES:
            raise UsageError(
                f"cannot compile {self.compile!r}: choose one of {', '.join(COMPILE_MODES)}"
            )
        if self.dtype not in DTYPES:
            raise UsageError(f"cannot use dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.trust_remote_code and not self.token:
            raise UsageError(
                "cannot run client code unauthenticated: --trust-remote-code needs --token "
                "(or DJINN_TOKEN), so only clients holding it can send code"
            )
        if self.link_gbps is not None and (self.link_gbps <= 0 or self.link_latency_s < 0):
            raise UsageError("cannot emulate a link: --link-gbps must be > 0, latency >= 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            raise UsageError(
                f"cannot serve metrics on port {self.metrics_port}: ports run from 0 to 65535"
            )
        positive = {  # in the flags' own units
            "--session-lease": self.session_lease_s,
            "--max-sessions": self.max_sessions,
            "--max-sessions-per-connection": self.max_sessions_per_connection,
            "--session-quota": self.session_quota_bytes / GIB,
            "--session-memory": self.session_memory_bytes / GIB,
            "--memory-budget": self.memory_budget_bytes / GIB,
            "--max-connections": self.max_connections,
            "--receive-budget": self.receive_budget_bytes / GIB,
            "--frame-timeout": self.frame_timeout_s,
            "--max-call-seconds": self.max_call_s,
            "--max-ops-per-call": self.max_ops_per_call,
            "--max-generate-tokens": self.max_generate_tokens,
            "--max-batch": self.max_batch,
            "--max-queued": self.max_queued,
            "--prefill-chunk": self.prefill_chunk,
            "--threads": 1 if self.threads is None else self.threads,
        }
        for flag, value in positive.items():
            if not value > 0:
                raise UsageError(f"cannot start: {flag} must be positive, got {value}")
        if self.batch_wait_us < 0:
            raise UsageError("cannot start: --batch-wait-us must be >= 0")
        if self.store.exists() and not self.store.is_dir():
            raise UsageError(f"cannot use --store {self.store}: it is a file, not a folder")
        names = [name for name, _ in self.models]
        if len(set(names)) != len(names):
            raise UsageError(f"cannot start: --model names must differ, got {names}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: we cannot know where it resolves
