"""Zero copy, measured: echoing 256 MiB grows the client's peak RSS by about one payload.

The peak is reset just before the echo (Linux's /proc/self/clear_refs), so
only the echo's own memory counts.

The received tensor needs one payload of memory; any extra copy on the way
out or in (a `tobytes()`, a `b"".join`, a bytes object built from the
receive buffer) shows up as a second payload. The control case sends the
same bytes as a `bytes` object, whose decoder does copy, to show the
measurement sees a copy when there is one.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from harness.server import ServerProcess

pytestmark = pytest.mark.timeout(120)

PAYLOAD_MIB = 256

SCRIPT = r"""
import sys, torch, djinn
MIB = int(sys.argv[3])
client = djinn.connect(sys.argv[1], timeout=60)
client.echo(torch.ones(1000))
if sys.argv[2] == "bytes":
    data = b"\x07" * (MIB * 2**20)
else:
    data = torch.full((MIB * 2**20 // 4,), 7.0)
def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current RSS: an older, higher peak would hide growth
before = status("VmRSS:")
back = client.echo(data)
growth = status("VmHWM:") - before
size = len(data) if sys.argv[2] == "bytes" else data.nbytes
assert back == data if sys.argv[2] == "bytes" else torch.equal(back, data)
print(growth / size)
"""


def peak_growth(address: str, kind: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, address, kind, str(PAYLOAD_MIB)],
        capture_output=True,
        text=True,
        timeout=100,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def test_tensor_echo_adds_one_payload_of_peak_memory(server: ServerProcess) -> None:
    growth = peak_growth(server.address, "tensor")
    assert 0.9 <= growth <= 1.5, f"peak RSS grew by {growth:.2f}x the payload"


def test_a_copying_path_is_caught_by_the_same_measurement(server: ServerProcess) -> None:
    growth = peak_growth(server.address, "bytes")
    assert growth >= 1.9, f"expected an extra copy to show, peak grew by {growth:.2f}x"
