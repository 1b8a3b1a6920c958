"""`python -m djinn.server`: parse the command line, then serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from djinn.cli import HelpFormatter
from djinn.errors import UsageError
from djinn.server.config import DTYPES, ServerConfig, default_store


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m djinn.server",
        description="Serve PyTorch models to djinn clients over TCP.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind; non-loopback needs a token"
    )
    p.add_argument("--port", type=int, default=5556, help="port to bind; 0 picks a free one")
    p.add_argument(
        "--token", help="shared secret clients must prove (default: $DJINN_TOKEN, if set)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPES, help="dtype of models on the server")
    p.add_argument("--store", type=Path, default=default_store(), help="on-disk weight store")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accept pickled nn.Modules (runs client code: only with clients you trust)",
    )
    p.add_argument(
        "--session-lease", type=float, default=300.0, help="seconds an idle session is kept"
    )
    p.add_argument("--max-sessions", type=int, default=256, help="open sessions at most")
    p.add_argument(
        "--session-quota",
        type=float,
        default=8.0,
        help="GiB of server-held tensors (KV caches, results) per session",
    )
    p.add_argument(
        "--session-memory",
        type=float,
        default=32.0,
        help="GiB of server-held tensors of all sessions together; past it, calls get 'busy'",
    )
    p.add_argument(
        "--memory-budget", type=float, default=64.0, help="GiB of model weights held in memory"
    )
    p.add_argument(
        "--receive-budget",
        type=float,
        default=8.0,
        help="GiB of large receive buffers in use at once; past it, frames are refused",
    )
    p.add_argument(
        "--max-queued", type=int, default=256, help="calls waiting for the device; more get 'busy'"
    )
    p.add_argument(
        "--link-gbps", type=float, help="emulate a network: pace replies to this many Gb/s"
    )
    p.add_argument(
        "--link-latency-ms", type=float, default=0.0, help="one-way latency of the emulated link"
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    config = ServerConfig(
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("DJINN_TOKEN") or None,
        device=args.device,
        dtype=args.dtype,
        store=args.store,
        trust_remote_code=args.trust_remote_code,
        session_lease_s=args.session_lease,
        max_sessions=args.max_sessions,
        session_quota_bytes=int(args.session_quota * 1024**3),
        session_memory_bytes=int(args.session_memory * 1024**3),
        memory_budget_bytes=int(args.memory_budget * 1024**3),
        receive_budget_bytes=int(args.receive_budget * 1024**3),
        max_queued=args.max_queued,
        link_gbps=args.link_gbps,
        link_latency_s=args.link_latency_ms / 1e3,
    )
    from djinn.server.app import serve

    try:
        serve(config)
    except UsageError as exc:
        print(f"djinn server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"djinn server: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
