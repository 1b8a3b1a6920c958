"""Server settings, checked once at start-up."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from djinn.errors import UsageError
from djinn.net.frame import DEFAULT_LIMITS, Limits

DTYPES = ("auto", "float32", "float16", "bfloat16")


def default_store() -> Path:
    """Where uploaded weights persist: $DJINN_STORE, else the user's cache dir."""
    if os.environ.get("DJINN_STORE"):
        return Path(os.environ["DJINN_STORE"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "djinn" / "store"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 5556
    token: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    store: Path = field(default_factory=default_store)
    trust_remote_code: bool = False
    session_lease_s: float = 300.0
    max_sessions: int = 256
    max_calls_per_connection: int = 1024
    session_quota_bytes: int = 8 * 1024**3
    memory_budget_bytes: int = 64 * 1024**3
    limits: Limits = DEFAULT_LIMITS

    def check(self) -> None:
        """Raise UsageError for settings the server must not start with."""
        if not is_loopback(self.host) and not self.token:
            raise UsageError(
                f"cannot listen on {self.host}: it is reachable from other machines and no token "
                "is set; pass --token (or set DJINN_TOKEN), or bind 127.0.0.1"
            )
        if not 0 <= self.port < 65536:
            raise UsageError(f"cannot listen on port {self.port}: ports run from 0 to 65535")
        if self.dtype not in DTYPES:
            raise UsageError(f"cannot use dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.session_lease_s <= 0 or self.max_sessions <= 0:
            raise UsageError("cannot start: --session-lease and --max-sessions must be positive")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: we cannot know where it resolves
