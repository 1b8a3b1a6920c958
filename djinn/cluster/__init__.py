"""Many djinn servers as one: Ray actors that each run a server (`python -m djinn.cluster
up`), and the client's router that places sessions on them (`RemoteModel(model,
server="djinn+ray://...")`). Only `actors` imports Ray (pip install 'djinn[cluster]');
the router works without it for a plain list of addresses.
"""

from djinn.cluster.router import SCHEME, Router, is_cluster

__all__ = ["SCHEME", "Router", "is_cluster"]
