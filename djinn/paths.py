"""Where djinn keeps files of its own on this machine: one root for the client's
fingerprints, the server's default store, the cluster's state and the presets' weights."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """djinn's folder in the user's cache: $XDG_CACHE_HOME/djinn, else ~/.cache/djinn."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "djinn"
