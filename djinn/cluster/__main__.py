"""python -m djinn.cluster up|status|down: djinn servers as Ray actors.

    python -m djinn.cluster up --servers 2 [--address auto|HOST:PORT] [--gpus] \\
        [-- SERVER OPTIONS: --token ... --memory-budget ... --store ... --model NAME=PATH]
    python -m djinn.cluster status
    python -m djinn.cluster down [--stop-ray]

Without --address, `up` starts a Ray head on this machine (as `ray start --head`
would) unless one runs already. Across machines: `ray start --head` on one,
`ray start --address HEAD:6379` on the others, then `up --address HEAD:6379
--gpus --servers N -- --host 0.0.0.0 --token SECRET`.

Each server keeps its weights in a store of its own: server i uses the folder
server-i under the --store given (default: $DJINN_STORE, else
~/.cache/djinn/store).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from djinn.cli import HelpFormatter
from djinn.errors import DjinnError
from djinn.paths import cache_root

STATE = cache_root() / "cluster.json"


def free_ports(count: int) -> list[int]:
    """Ports free on this machine now, on every address 127.0.0.1 included (for servers
    on it; pass --port-base across machines)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray_cli() -> str:
    """Ray's command, from this Python's environment first."""
    found = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    if found is None:
        raise DjinnError("cannot run Ray: its `ray` command is not installed")
    return found


def _start_local_ray(cpus: int | None) -> str:
    command = [_ray_cli(), "start", "--head", "--include-dashboard=false", "--disable-usage-stats"]
    if cpus:
        command.append(f"--num-cpus={cpus}")
    subprocess.run(command, check=True, capture_output=True, text=True)
    STATE.parent.mkdir(parents=True, exist_ok=True)
    STATE.write_text(json.dumps({"started_ray": True}))
    return "auto"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    server_argv: list[str] = []
    if "--" in argv:
        server_argv = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    p = argparse.ArgumentParser(
        prog="python -m djinn.cluster",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    commands = p.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start N server actors", formatter_class=HelpFormatter)
    start.add_argument("--servers", type=int, default=1, help="server actors to start")
    start.add_argument(
        "--address", default="", help="the Ray cluster (HOST:PORT or auto); default: a local one"
    )
    start.add_argument("--gpus", action="store_true", help="one GPU per server (num_gpus=1)")
    start.add_argument("--cpus", type=int, help="CPUs of the local Ray head, if up starts one")
    start.add_argument(
        "--port-base", type=int, help="server i listens on PORT_BASE + i (default: free ports)"
    )
    show = commands.add_parser("status", help="servers, models, sessions, tokens/s")
    show.add_argument("--address", default="", help="the Ray cluster (default: auto)")
    stop = commands.add_parser("down", help="stop every server actor")
    stop.add_argument("--address", default="", help="the Ray cluster (default: auto)")
    stop.add_argument("--stop-ray", action="store_true", help="also stop the local Ray `up` began")
    args = p.parse_args(argv)

    from djinn.cluster import actors

    try:
        if args.command == "up":
            if args.servers < 1:
                raise DjinnError(f"cannot start {args.servers} servers: --servers must be >= 1")
            from djinn.server.__main__ import config_from, parser

            # bad server options fail here, before Ray starts, not in the actors
            config_from(parser().parse_args(server_argv)).check()
            address = args.address
            if not address:
                try:
                    actors.connect_ray("auto")
                except ConnectionError:
                    address = _start_local_ray(args.cpus)
            ports = (
                [args.port_base + i for i in range(args.servers)]
                if args.port_base
                else free_ports(args.servers)
            )
            addresses = actors.up(
                args.servers, server_argv, ports=ports, gpus=args.gpus, ray_address=address
            )
            ray = actors.ray_module()
            gcs = ray.get_runtime_context().gcs_address
            print(f"{len(addresses)} djinn servers up: {', '.join(addresses)}")
            print(
                f"clients connect to: djinn+ray://{gcs}  (or, without Ray: {','.join(addresses)})"
            )
        elif args.command == "status":
            rows = actors.status(args.address)
            if not rows:
                print("no djinn servers are up")
            for row in rows:
                if not row["alive"]:
                    print(f"{row['name']}: not answering (restarting?)")
                    continue
                held = ", ".join(
                    f"{m['name'] or m['fingerprint'][:12]}{'' if m['resident'] else ' (disk)'}"
                    for m in row["models"]
                )
                print(
                    f"{row['name']} {row['address']}: {row['sessions']} sessions, "
                    f"{row['queued_calls']} queued, {row['tokens_per_s']:.1f} tokens/s; "
                    f"models: {held or 'none'}"
                )
        else:
            print(f"stopped {actors.down(args.address)} djinn servers")
            if args.stop_ray:
                started = STATE.is_file() and json.loads(STATE.read_text()).get("started_ray")
                if started:
                    subprocess.run([_ray_cli(), "stop"], check=False, capture_output=True)
                    STATE.unlink()
                    print("stopped the local Ray that `up` started")
    except DjinnError as exc:
        print(f"djinn cluster: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:  # Ray's, when no cluster answers at the address
        if args.command == "down" and args.address in ("", "auto"):
            print("no Ray cluster is running here: nothing to stop")
            return 0
        where = args.address or "auto"
        print(f"djinn cluster: cannot reach a Ray cluster ({where}): {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
