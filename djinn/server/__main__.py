"""`python -m djinn.server`: parse the command line, then serve."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from djinn.cli import HelpFormatter
from djinn.errors import UsageError
from djinn.server.config import COMPILE_MODES, DTYPES, GIB, ServerConfig, default_store


def _model(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, Path(path)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m djinn.server",
        description="Serve PyTorch models to djinn clients over TCP.",
        formatter_class=HelpFormatter,
    )
    net = p.add_argument_group("network")
    net.add_argument(
        "--host", default="127.0.0.1", help="address to bind; non-loopback needs a token"
    )
    net.add_argument("--port", type=int, default=5556, help="port to bind; 0 picks a free one")
    net.add_argument(
        "--token", help="shared secret clients must prove (default: $DJINN_TOKEN, if set)"
    )
    net.add_argument(
        "--max-connections", type=int, default=512, help="connections at once; more are refused"
    )
    net.add_argument(
        "--frame-timeout",
        type=float,
        default=10.0,
        help="seconds a frame's payload may take to arrive, plus 1 s per 8 MB of it",
    )
    net.add_argument(
        "--receive-budget",
        type=float,
        default=8.0,
        help="GiB of large receive buffers in use at once",
    )
    net.add_argument(
        "--link-gbps",
        type=float,
        help="emulate a network: pace replies to this many Gb/s (default: off)",
    )
    net.add_argument(
        "--link-latency-ms", type=float, default=0.0, help="one-way latency of the emulated link"
    )
    net.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on this port (needs prometheus_client; default: off)",
    )

    dev = p.add_argument_group("device and models")
    dev.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N"
    )
    dev.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="dtype of models on the server"
    )
    dev.add_argument(
        "--threads", type=int, help="torch threads for model work (default: torch's own)"
    )
    dev.add_argument("--store", type=Path, default=default_store(), help="on-disk weight store")
    dev.add_argument(
        "--model",
        type=_model,
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="hold the model in folder PATH under NAME from the start (repeatable)",
    )
    dev.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accept pickled nn.Modules (runs client code: only with clients you trust)",
    )
    dev.add_argument(
        "--memory-budget", type=float, default=64.0, help="GiB of model weights held in memory"
    )

    work = p.add_argument_group("sessions and work")
    work.add_argument(
        "--session-lease", type=float, default=300.0, help="seconds an idle session is kept"
    )
    work.add_argument("--max-sessions", type=int, default=256, help="open sessions at most")
    work.add_argument(
        "--max-sessions-per-connection", type=int, default=64, help="open sessions per connection"
    )
    work.add_argument(
        "--session-quota",
        type=float,
        default=8.0,
        help="GiB of server-held tensors (KV caches, results) per session",
    )
    work.add_argument(
        "--session-memory",
        type=float,
        default=32.0,
        help="GiB of server-held tensors of all sessions together",
    )
    work.add_argument(
        "--max-queued", type=int, default=256, help="calls waiting for the device; more get 'busy'"
    )
    work.add_argument(
        "--max-call-seconds", type=float, default=600.0, help="device time of one call"
    )
    work.add_argument(
        "--max-ops-per-call", type=int, default=4096, help="queued operations in one call"
    )
    work.add_argument(
        "--max-generate-tokens",
        type=int,
        default=1 << 20,
        help="batch x beams x new tokens of one generate",
    )
    work.add_argument(
        "--batching", default="on", choices=["on", "off"], help="batch decode steps across sessions"
    )
    work.add_argument(
        "--max-batch", type=int, default=64, help="decode rows in one batched forward"
    )
    work.add_argument(
        "--batch-wait-us", type=int, default=0, help="how long a lone decode step waits for company"
    )
    work.add_argument(
        "--prefill-chunk", type=int, default=512, help="prompt tokens per device turn"
    )
    work.add_argument(
        "--compile",
        default="off",
        choices=COMPILE_MODES,
        help="run decode steps under torch.compile, kept only where a warm-up at model load "
        "gives eager's greedy tokens; auto compiles on CUDA only, where it is faster",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="what the server log shows",
    )
    return p


def config_from(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        host=args.host,
        port=args.port,
        token=args.token or os.environ.get("DJINN_TOKEN") or None,
        device=args.device,
        dtype=args.dtype,
        store=args.store,
        trust_remote_code=args.trust_remote_code,
        models=tuple(args.model),
        session_lease_s=args.session_lease,
        max_sessions=args.max_sessions,
        max_sessions_per_connection=args.max_sessions_per_connection,
        session_quota_bytes=int(args.session_quota * GIB),
        session_memory_bytes=int(args.session_memory * GIB),
        memory_budget_bytes=int(args.memory_budget * GIB),
        max_connections=args.max_connections,
        receive_budget_bytes=int(args.receive_budget * GIB),
        frame_timeout_s=args.frame_timeout,
        link_gbps=args.link_gbps,
        link_latency_s=args.link_latency_ms / 1e3,
        max_queued=args.max_queued,
        max_call_s=args.max_call_seconds,
        max_ops_per_call=args.max_ops_per_call,
        max_generate_tokens=args.max_generate_tokens,
        batching=args.batching == "on",
        max_batch=args.max_batch,
        batch_wait_us=args.batch_wait_us,
        prefill_chunk=args.prefill_chunk,
        compile=args.compile,
        threads=args.threads,
        metrics_port=args.metrics_port,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from djinn.server.app import serve

    try:
        serve(config_from(args))
    except UsageError as exc:
        print(f"djinn server: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the store or a --model folder, as the server reads them
        print(f"djinn server: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
