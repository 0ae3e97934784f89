"""How many chatting sessions one Locust worker drives before it saturates, and what
Parley answers at that load (BENCHMARKS.md, "Locust").

    ulimit -n 20000; .venv/bin/python -m loadtests.locust_capacity --users 2000,4000,8000

For each user count: a fresh server pinned to ``--server-cpu`` (SQLite in a temporary
folder), a Locust master and one worker pinned to ``--locust-cpu``, ``SmallRoomChatter``
users only, spawned at ``--spawn-rate``; statistics are reset once all are spawned
(``--reset-stats``), and the worker's and the server's CPU are read from /proc over the
last ``--measure`` seconds. Prints a row per count: users, messages/s, deliveries/s, the
worker's and the server's CPU, and p50/p99 of each request type.
"""

import argparse
import csv
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadtests.cli import free_port, start_server
from loadtests.proc import cpu_seconds, progress

ADMIN = "locust-capacity-admin-token"


def run(users: int, args: argparse.Namespace, out: Path) -> dict[str, object]:
    secret = secrets.token_urlsafe(32)
    port, ops = free_port(), free_port()
    flags = ["--ops-port", str(ops), "--admin-token", ADMIN]
    spawn = users / args.spawn_rate
    duration = spawn + args.warm + args.measure
    with (
        tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp,
        start_server(
            port, secret, f"sqlite:///{tmp}/bench.db", args.server_cpu, flags, args.trace
        ) as pid,
    ):
        # start_server gives the server its own --ops-port; ours comes last and wins.
        pin = ["taskset", "-c", str(args.locust_cpu)]
        locust = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py"]
        master_port = free_port()
        prefix = out / f"u{users}"
        worker = subprocess.Popen(
            [*pin, *locust, "--worker", "--master-port", str(master_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        command = [
            *pin,
            *locust,
            "SmallRoomChatter",
            *("--master", "--master-bind-port", str(master_port), "--expect-workers", "1"),
            *("--host", f"ws://127.0.0.1:{port}", "--headless", "--reset-stats"),
            *("-u", str(users), "-r", str(args.spawn_rate), "-t", f"{duration:.0f}s"),
            *("--parley-secret", secret, "--parley-admin-token", ADMIN),
            *("--parley-admin-url", f"http://127.0.0.1:{ops}", "--csv", str(prefix)),
            *("--parley-think", str(args.think), "--only-summary"),
            # Rooms enough for pairs and groups of four (loadtests/README.md).
            *("--parley-pairs", str(users // 4 + 1), "--parley-groups", str(users // 8 + 1)),
        ]
        master = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        time.sleep(spawn + args.warm)
        worker_cpu, server_cpu, t0 = cpu_seconds(worker.pid), cpu_seconds(pid), time.monotonic()
        time.sleep(args.measure - 2)
        elapsed = time.monotonic() - t0
        worker_cpu = (cpu_seconds(worker.pid) - worker_cpu) / elapsed
        server_cpu = (cpu_seconds(pid) - server_cpu) / elapsed
        output, _ = master.communicate(timeout=300)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()  # a worker still busy with its users when the master quit
    with open(f"{prefix}_stats.csv") as f:
        rows = list(csv.DictReader(f))
    total_seconds = args.warm + args.measure  # stats were reset once all were spawned
    figures: dict[str, object] = {
        "users": users,
        "worker_cpu": worker_cpu,
        "server_cpu": server_cpu,
        "exit": master.returncode,
        "summary": [line for line in output.decode().splitlines() if "parley" in line],
    }
    for row in rows:
        if row["Name"] == "Aggregated":
            continue
        key = f"{row['Type']} {row['Name']}"
        figures[key] = (
            int(row["Request Count"]),
            int(row["Failure Count"]),
            row["50%"],
            row["99%"],
        )
    sent = figures.get("chat send→sent", (0,))
    figures["messages_per_s"] = sent[0] / total_seconds  # type: ignore[index]
    deliveries = figures.get("deliver message: small rooms", (0,))
    figures["deliveries_per_s"] = deliveries[0] / total_seconds  # type: ignore[index]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="2000,4000,8000", help="comma-separated counts")
    parser.add_argument("--spawn-rate", type=float, default=200)
    parser.add_argument("--think", type=float, default=1.0, help="--parley-think")
    parser.add_argument("--warm", type=float, default=10, help="seconds after spawning")
    parser.add_argument("--measure", type=float, default=40, help="seconds measured")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--locust-cpu", type=int, default=1)
    parser.add_argument("--out", default="", help="folder for Locust's CSV files")
    parser.add_argument(
        "--trace",
        type=Path,
        default=None,
        help="append the server's loop waits and GC pauses to this file every 4 s",
    )
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="parley-locust-"))
    out.mkdir(parents=True, exist_ok=True)
    for users in (int(u) for u in args.users.split(",")):
        progress(f"{users} users")
        figures = run(users, args, out)
        print(
            f"{users} users: {figures['messages_per_s']:.0f} msg/s, "
            f"{figures['deliveries_per_s']:.0f} deliveries/s; worker CPU "
            f"{figures['worker_cpu']:.0%}, server CPU {figures['server_cpu']:.0%}; "
            f"exit {figures['exit']}"
        )
        for key, value in figures.items():
            if isinstance(value, tuple):
                count, failures, p50, p99 = value
                print(f"    {key:32} {count:8} ({failures} failed)  p50 {p50} ms  p99 {p99} ms")
        for line in figures["summary"]:  # type: ignore[attr-defined]
            print("    " + line)
    print(f"CSV files in {out}")


if __name__ == "__main__":
    main()
