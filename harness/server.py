"""A server in a child process: start it, learn its port, stop it for sure.

Used by the experiment, the benchmarks and the end-to-end tests, which all
need a real server process on 127.0.0.1 that goes away with them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO

import djinn
from djinn.errors import DjinnError

_READY = re.compile(r"listening on \[?([^\]\s]+?)\]?:(\d+)")
START_TIMEOUT_S = 60.0


def pin(pid: int, cpu: int) -> None:
    """Put every thread of process `pid` on one CPU (threads it starts later inherit it):
    a client and a server on one small machine, each with a core of its own, as on two
    machines, instead of evicting each other's caches between every round trip."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {cpu})


class ServerProcess:
    """`python -m djinn.server` on port 0, as a context manager.

    `args` are extra command-line arguments. The server's output is kept (the
    last lines) for error messages; `log` names a file to copy it to as well.
    """

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, log: str | None = None
    ) -> None:
        self.args = ["--host", "127.0.0.1", "--port", "0", *args]
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        # the child imports the same djinn as this process, installed or not
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(djinn.__file__)))
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, self.env.get("PYTHONPATH", "")) if p
        )
        self.log_path = log
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.lines: deque[str] = deque(maxlen=200)
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = START_TIMEOUT_S) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "djinn.server", *self.args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.proc.stdout:
            self._keep(line)
            match = _READY.search(line)
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                break
            if time.monotonic() > deadline:
                break
        if not self.port:
            self.stop()
            raise DjinnError(f"cannot start the djinn server:\n{self.output()}")
        self._reader = threading.Thread(target=self._drain, args=(self.proc.stdout,), daemon=True)
        self._reader.start()
        return self

    def _keep(self, line: str) -> None:
        self.lines.append(line)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(line)

    def _drain(self, stream: IO[str]) -> None:
        for line in stream:
            self._keep(line)

    def output(self) -> str:
        return "".join(self.lines)

    def kill(self) -> None:
        """SIGKILL: the server gets no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        if self._reader is not None:
            self._reader.join(timeout=timeout)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
