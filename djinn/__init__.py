"""Djinn: run PyTorch models on a remote GPU as if it were local.

Only what must cross the wire crosses it: weights are uploaded once and
cached by fingerprint, KV caches stay on the server, and outputs come back
when user code reads them.
"""

from djinn.client import AsyncClient, Client, connect
from djinn.errors import DjinnError
from djinn.model import RemoteModel
from djinn.tensor import RemoteTensor

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "Client",
    "DjinnError",
    "RemoteModel",
    "RemoteTensor",
    "__version__",
    "connect",
]
