"""``parley bench``: benchmarks, run by hand; figures go into BENCHMARKS.md."""

import argparse
import os
import secrets
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from server.tokens import issue_token
from storage.store import redact_url


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except an absent one ("default: None" says nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def add_bench_parser(sub: "argparse._SubParsersAction[Any]") -> None:
    bench = sub.add_parser(
        "bench",
        help="run a benchmark (see BENCHMARKS.md)",
        description="Benchmarks, run by hand; never part of the test suite. Record what they "
        "measure in BENCHMARKS.md with the command that produced it.",
    )
    kinds = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    fanout = kinds.add_parser(
        "fanout",
        help="N receivers in one room, one publisher",
        description="Fan-out benchmark: deliveries/s, publish-to-deliver latency, losses, and "
        "the server's CPU per delivery. Without --url it starts its own server (SQLite in a "
        "temporary directory, durable acks).",
        formatter_class=_Help,
    )
    fanout.add_argument("--receivers", type=int, default=1000, help="connections in the room")
    fanout.add_argument("--messages", type=int, default=2000, help="messages to publish")
    fanout.add_argument("--size", type=int, default=100, help="approximate message bytes")
    fanout.add_argument("--workers", type=int, default=2, help="receiver processes")
    fanout.add_argument("--rate", type=float, default=0, help="messages/s; 0 = as fast as acked")
    fanout.add_argument("--window", type=int, default=256, help="sends awaiting their ack")
    fanout.add_argument("--timeout", type=float, default=120, help="seconds receivers wait")
    fanout.add_argument(
        "--receipts",
        action="store_true",
        help="every receiver acks every message (delivered and read)",
    )
    _target_options(fanout)
    fanout.set_defaults(func=cmd_fanout)

    kv = kinds.add_parser(
        "kv",
        help="kv writes/s and catch-up time",
        description="KV benchmark: stored kv writes per second with ack latency and server "
        "CPU per write, then the time a device takes to catch up on --catchup-keys changed "
        "keys. Without --url it starts its own server (SQLite in a temporary directory).",
        formatter_class=_Help,
    )
    kv.add_argument("--users", type=int, default=20, help="writing connections, one user each")
    kv.add_argument("--batches", type=int, default=200, help="kvput frames per connection")
    kv.add_argument("--batch", type=int, default=50, help="writes per kvput")
    kv.add_argument("--keys", type=int, default=1000, help="distinct keys per user")
    kv.add_argument("--size", type=int, default=100, help="approximate value bytes")
    kv.add_argument("--window", type=int, default=4, help="kvputs awaiting their ack")
    kv.add_argument("--catchup-keys", type=int, default=10_000, help="keys the late device gets")
    _target_options(kv)
    kv.set_defaults(func=cmd_kv)

    idle = kinds.add_parser(
        "idle",
        help="memory per idle session, and the connect rate",
        description="Idle benchmark: --sessions authenticated sessions connect (a connect "
        "storm) and stay silent; reports sessions/s and the server's RSS per session. "
        "It starts its own server (SQLite in a temporary directory). Mind the open-file "
        "limit: both sides hold one descriptor per session.",
        formatter_class=_Help,
    )
    idle.add_argument("--sessions", type=int, default=5000, help="sessions to open")
    idle.add_argument("--window", type=int, default=200, help="handshakes in flight")
    idle.add_argument(
        "--server-cpu", type=int, metavar="CORE", help="pin the started server to this CPU core"
    )
    idle.set_defaults(func=cmd_idle)

    compare = kinds.add_parser(
        "compare",
        help="the standard scenarios (fan-out, latency, 1:1 chat, idle, connect storm) "
        "against Parley and its peers, side by side",
        description="Runs each scenario against each target in turn, a fresh server per "
        "run pinned to --server-cpu, the load generator's processes on the other cores. "
        "Installs the peers (Node Socket.IO, Node ws, python-socketio on uvicorn, websockets, "
        "and the rulers floor, a raw epoll loop with a write per delivery, and trio-floor, "
        "the same as a task per connection on trio) under "
        "$PARLEY_BENCH_CACHE (default ~/.cache/parley-bench) the first time. Scenarios: "
        "a fan-out 1000 receivers; b 100 receivers x 20000 messages; c 1000 receivers at "
        "each --rates msg/s for 10 s; k the same at --keep-rates, where every receiver keeps "
        "up and each delivery is its own write; d 1:1 chat (2000 users, acks and receipts) at full "
        "speed; d-rate the same at --chat-rate; e/f idle sessions and the connect storm. "
        "Mind the open-file limit (ulimit -n) for e/f.",
        formatter_class=_Help,
    )
    compare.add_argument(
        "--targets",
        default="parley,ws-node,websockets,socketio-node,python-socketio",
        help="comma-separated: parley and peers",
    )
    compare.add_argument("--scenarios", default="a,b,c,k,d,d-rate,e/f", help="comma-separated")
    compare.add_argument("--rates", default="200", help="scenario c: messages/s, comma-separated")
    compare.add_argument(
        "--keep-rates", default="20,200", help="scenario k: messages/s, comma-separated"
    )
    compare.add_argument("--scale", type=float, default=1.0, help="multiply message counts")
    compare.add_argument("--sessions", type=int, default=10_000, help="scenario e/f sessions")
    compare.add_argument("--chat-rate", type=float, default=10_000, help="d-rate: total msg/s")
    compare.add_argument("--chat-users", type=int, default=2000, help="d-rate: users, in pairs")
    compare.add_argument("--chat-window", type=int, default=4, help="d: sends awaiting ack")
    compare.add_argument(
        "--processes",
        type=int,
        default=0,
        help="load generator processes; 0: one per CPU this command may use",
    )
    compare.add_argument("--timeout", type=float, default=120, help="seconds per run at most")
    compare.add_argument(
        "--server-cpu",
        type=int,
        metavar="CORE",
        help="pin each server to this CPU (run the command itself under taskset on another)",
    )
    compare.add_argument("--json", type=Path, help="append every row to this JSON-lines file")
    compare.add_argument("--plot", type=Path, help="draw latency against offered load (PNG)")
    compare.add_argument(
        "--trace",
        type=Path,
        metavar="FILE",
        help="append Parley's event-loop waits, task steps and GC pauses to FILE every 4 s "
        "(slows the server a little: for diagnosis, not for the tables)",
    )
    compare.set_defaults(func=cmd_compare)

    store = kinds.add_parser(
        "store",
        help="rows/s and flush latency per record kind, straight into a store",
        description="Store benchmark: batches of records of each kind (messages, receipts, "
        "kv changes, last-seen) written with Store.write_batch one after another, timed. "
        "Without --database-url, a SQLite file in a temporary directory. Use an empty "
        "database: the benchmark writes rows it does not remove.",
        formatter_class=_Help,
    )
    store.add_argument("--database-url", help="sqlite:///... or postgresql://...")
    store.add_argument("--rows", type=int, default=100_000, help="rows per kind")
    store.add_argument("--batch", type=int, default=5000, help="records per write_batch")
    store.set_defaults(func=cmd_store)

    decode = kinds.add_parser(
        "decode",
        help="what decoding a client frame costs, per frame and per byte",
        description="Decoder benchmark: every client frame of PROTOCOL.md's vectors, and the "
        "costliest frames of the largest size an attacker can build, each decoded as the "
        "server does: microseconds per frame, nanoseconds per byte, and the peak memory of "
        "one decode against the frame's size.",
        formatter_class=_Help,
    )
    decode.add_argument("--rounds", type=int, default=5, help="rounds per frame; the median")
    decode.set_defaults(func=cmd_decode)

    from loadtests.clusterbench import add_parser as add_cluster_parser

    add_cluster_parser(kinds, _Help)

    from loadtests.feedbench import add_parser as add_feed_parser

    add_feed_parser(kinds, _Help)


def _target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="an existing server, ws://host:port/ws")
    parser.add_argument(
        "--secret",
        help="that server's token secret (default: the one `serve --dev` keeps in the "
        "working directory)",
    )
    parser.add_argument(
        "--server-cpu", type=int, metavar="CORE", help="pin the started server to this CPU core"
    )
    parser.add_argument(
        "--database-url",
        help="the started server's database (default: SQLite in a temporary directory)",
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def _target(
    args: argparse.Namespace, extra_flags: Sequence[str] = ()
) -> Iterator[tuple[str, int, str, int | None]]:
    """(host, port, secret, server pid): the server at --url, or one started here with
    ``extra_flags``."""
    if getattr(args, "url", None):
        from server.cli import resolve_secrets
        from server.config import Config

        hostport = args.url.split("//", 1)[-1].split("/", 1)[0]
        host, _, port = hostport.rpartition(":")
        yield (
            host,
            int(port),
            resolve_secrets(args.secret, None, Config().database_url).secret,
            None,
        )
        return
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        port = free_port()
        secret = secrets.token_urlsafe(32)
        url = getattr(args, "database_url", None) or f"sqlite:///{Path(tmp) / 'bench.db'}"
        with start_server(port, secret, url, args.server_cpu, extra_flags) as pid:
            yield "127.0.0.1", port, secret, pid


def server_command(
    port: int, secret: str, database_url: str, extra_flags: Sequence[str] = ()
) -> list[str]:
    """``parley serve`` as the benchmarks run it, on 127.0.0.1:``port``."""
    flags = f"--host 127.0.0.1 --port {port} --ops-port {free_port()} --log-level warning"
    flags += " --rate 1000000 --burst 1000000"  # the publisher is not rate-limited
    flags += " --max-connections-per-address 0"  # every load client is on 127.0.0.1
    command = [sys.executable, "-m", "server.cli", "serve", *flags.split(), f"--secret={secret}"]
    return [*command, "--database-url", database_url, *extra_flags]


@contextmanager
def start_server(
    port: int,
    secret: str,
    database_url: str,
    cpu: int | None,
    extra_flags: Sequence[str] = (),
    trace: Path | None = None,
) -> Iterator[int]:
    """A Parley server on 127.0.0.1:``port``, pinned to ``cpu``; yields its pid once it
    listens, and stops it at exit. ``trace``: append the event loop's and the garbage
    collector's counts to this file (``loadtests/servertrace``)."""
    command = server_command(port, secret, database_url, extra_flags)
    if cpu is not None:
        command = ["taskset", "-c", str(cpu), *command]
    env = None
    if trace is not None:
        hook = str(Path(__file__).parent / "servertrace")
        path = os.pathsep.join(p for p in (hook, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "PARLEY_BENCH_TRACE": str(trace.resolve())}
    server = subprocess.Popen(command, env=env)
    try:
        wait_for_port(port, server)
        yield server.pid
    finally:
        server.terminate()
        server.wait(30)


def cmd_fanout(args: argparse.Namespace) -> int:
    from loadtests.fanout import run_fanout

    with _target(args) as (host, port, secret, pid):

        def token_for(user: str) -> str:
            return issue_token(secret, user, 3600)

        result = trio.run(
            lambda: run_fanout(
                host,
                port,
                token_for,
                receivers=args.receivers,
                messages=args.messages,
                size=args.size,
                workers=args.workers,
                rate=args.rate,
                window=args.window,
                server_pid=pid,
                give_up_after=args.timeout,
                receipts=args.receipts,
            )
        )
    print(result.report())
    return 0


def cmd_kv(args: argparse.Namespace) -> int:
    from loadtests.kvbench import run_kv

    with _target(args) as (host, port, secret, pid):
        result = trio.run(
            lambda: run_kv(
                f"ws://{host}:{port}/ws",
                lambda user: issue_token(secret, user, 3600),
                users=args.users,
                batches=args.batches,
                batch=args.batch,
                keys=args.keys,
                size=args.size,
                window=args.window,
                catchup_keys=args.catchup_keys,
                server_pid=pid,
            )
        )
    print(result.report())
    return 0


def cmd_idle(args: argparse.Namespace) -> int:
    from loadtests.idle import run_idle

    no_pings = ("--ping-interval", "3600")  # none during the measurement
    with _target(args, no_pings) as (host, port, secret, pid):
        assert pid is not None
        result = trio.run(
            lambda: run_idle(
                host,
                port,
                lambda user: issue_token(secret, user, 3600),
                sessions=args.sessions,
                window=args.window,
                server_pid=pid,
            )
        )
    print(result.report())
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from loadtests.compare import compare

    return compare(args)


def cmd_store(args: argparse.Namespace) -> int:
    from loadtests.storebench import run_store_bench

    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        url = args.database_url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        results = trio.run(run_store_bench, url, args.rows, args.batch)
    print(f"store: {redact_url(url)}, batches of {args.batch}")
    for result in results:
        print(result.line())
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from loadtests.decodebench import Cost, run_decode_bench

    groups = run_decode_bench(args.rounds, progress=lambda m: print(m, file=sys.stderr))
    for group, costs in groups.items():
        print(f"{group}:\n{Cost.HEADER}")
        for cost in costs:
            print(cost.line())
    every = [c for costs in groups.values() for c in costs]
    worst = max(every, key=lambda c: c.ns_per_byte if c.size > 4096 else 0)
    print(f"worst per byte (frames over 4 KiB): {worst.name}, {worst.ns_per_byte:.0f} ns/byte")
    return 0


def wait_for_port(port: int, server: subprocess.Popen[bytes], seconds: float = 30) -> None:
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"server exited with {server.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start listening")
