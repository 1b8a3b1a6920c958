"""The djinn server: `python -m djinn.server --help`."""

from djinn.server.app import Server, serve
from djinn.server.config import ServerConfig

__all__ = ["Server", "ServerConfig", "serve"]
