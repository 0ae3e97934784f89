"""``parley bench compare``: Parley and its peers through the same scenarios, one run.

Every (scenario, target) pair gets a fresh server, so peak RSS belongs to that scenario
alone. Results print as they come, then as one Markdown table per scenario; ``--json``
keeps every row, and ``--plot`` draws scenario c's latency against offered load with
matplotlib from the peers' virtualenv (installed there, never into the project's).
"""

import argparse
import json
import math
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loadtests import peers
from loadtests.proc import progress
from loadtests.scenarios import Row, Target, run_broadcast, run_chat, run_idle

SCENARIOS = ("a", "b", "c", "k", "d", "d-rate", "e/f")


def _parley_version() -> str:
    import platform

    import trio

    return f"Parley (this checkout) on CPython {platform.python_version()}, trio {trio.__version__}"


@contextmanager
def parley_target(cpu: int | None, extra: list[str], trace: Path | None = None) -> Iterator[Target]:
    from loadtests.cli import free_port, start_server
    from server.tokens import issue_token

    secret = secrets.token_urlsafe(32)
    with tempfile.TemporaryDirectory(prefix="parley-bench-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bench.db'}"
        port = free_port()
        with start_server(port, secret, url, cpu, extra, trace) as pid:
            yield Target(
                name="parley",
                wire="parley",
                host="127.0.0.1",
                port=port,
                pid=pid,
                version=_parley_version(),
                token_for=lambda user: issue_token(secret, user, 3600),
            )


@contextmanager
def peer_target(name: str, cpu: int | None) -> Iterator[Target]:
    from loadtests.cli import free_port

    port = free_port()
    with peers.start(name, port, cpu) as pid:
        yield Target(
            name=name,
            wire=peers.PEERS[name].kind,
            host="127.0.0.1",
            port=port,
            pid=pid,
            version=peers.versions(name),
        )


def target(name: str, cpu: int | None, scenario: str, trace: Path | None = None) -> Any:
    if name == "parley":
        # No pings inside the idle measurement; the publisher is not rate-limited.
        extra = ["--ping-interval", "3600"] if scenario == "e/f" else []
        return parley_target(cpu, extra, trace)
    return peer_target(name, cpu)


def run_one(t: Target, scenario: str, args: argparse.Namespace, procs: int) -> list[Row]:
    scale = args.scale
    if scenario == "a":
        n = int(1000 * scale)
        return [
            run_broadcast(
                t, "a", receivers=1000, messages=n, rate=0, processes=procs, timeout=args.timeout
            )
        ]
    if scenario == "b":
        n = int(20_000 * scale)
        return [
            run_broadcast(
                t, "b", receivers=100, messages=n, rate=0, processes=procs, timeout=args.timeout
            )
        ]
    if scenario in ("c", "k"):
        rows = []
        rates = args.rates if scenario == "c" else args.keep_rates
        for rate in (float(r) for r in rates.split(",")):
            rows.append(
                run_broadcast(
                    t,
                    scenario,
                    receivers=1000,
                    messages=int(rate * 10),
                    rate=rate,
                    processes=procs,
                    timeout=args.timeout,
                )
            )
        return rows
    if scenario == "d":
        return [
            run_chat(
                t,
                "d",
                users=2000,
                messages=int(50 * scale),
                rate=0,
                window=args.chat_window,
                processes=procs,
                timeout=args.timeout,
            )
        ]
    if scenario == "d-rate":
        per_user_s = 10  # seconds of load
        n = max(1, int(args.chat_rate / args.chat_users * per_user_s))
        return [
            run_chat(
                t,
                "d-rate",
                users=args.chat_users,
                messages=n,
                rate=args.chat_rate,
                window=64,
                processes=procs,
                timeout=args.timeout,
            )
        ]
    if scenario == "e/f":
        return [run_idle(t, sessions=args.sessions, processes=procs, handshakes=200)]
    raise ValueError(scenario)


def compare(args: argparse.Namespace) -> int:
    targets = [name.strip() for name in args.targets.split(",") if name.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    unknown += [t for t in targets if t != "parley" and t not in peers.PEERS]
    if unknown:
        print(f"unknown: {', '.join(unknown)}", file=sys.stderr)
        return 2
    procs = args.processes or len(os.sched_getaffinity(0))
    peers.ensure_installed([t for t in targets if t != "parley"])
    versions: dict[str, str] = {}
    rows: list[Row] = []
    for scenario in scenarios:
        for name in targets:
            with target(name, args.server_cpu, scenario, args.trace) as t:
                versions[name] = t.version
                for row in run_one(t, scenario, args, procs):
                    rows.append(row)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(row.as_dict()) + "\n")
    print(report(rows, versions, procs))
    if args.plot:
        plot([r.as_dict() for r in rows if r.scenario == "c"], args.plot)
    return 0


def _ms(x: float) -> str:
    return "—" if math.isnan(x) else f"{x:,.1f}"


def report(rows: list[Row], versions: dict[str, str], procs: int) -> str:
    lines = [f"load generator: {procs} process(es) on CPUs {sorted(os.sched_getaffinity(0))}"]
    lines += [f"- {name}: {v}" for name, v in versions.items()]
    broadcast = [r for r in rows if r.scenario in ("a", "b", "c", "k")]
    if broadcast:
        lines += [
            "",
            "| scenario | server | offered msg/s | deliveries/s | server µs/delivery "
            "(user + system) | p50 | p90 | p99 | max (ms) | lost / gaps / reordered / dup "
            "| peak RSS | load-gen CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in broadcast:
            d = r.as_dict()
            total, system = d["server_us_per_delivery"], d["server_system_us_per_delivery"]
            lines.append(
                f"| {r.scenario} | {r.target} | {d['offered'] or 'max'} | "
                f"{d['deliveries_per_s']:,} | {total:.2f} ({total - system:.2f} + {system:.2f}) | "
                f"{_ms(d['p50_ms'])} | {_ms(d['p90_ms'])} | {_ms(d['p99_ms'])} | "
                f"{_ms(d['max_ms'])} | {d['lost']} / {d['gaps']} / {d['reordered']} / "
                f"{d['duplicates']} | {d['peak_rss_mib']} MiB | {_load(d)} |"
            )
    chat = [r for r in rows if r.scenario in ("d", "d-rate")]
    if chat:
        lines += [
            "",
            "| scenario | server | offered msg/s | messages/s acked | ack p50 / p99 (ms) "
            "| delivery p50 / p99 (ms) | receipt events / receipts | lost / gaps / reordered "
            "/ dup | server µs/message | load-gen CPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in chat:
            d = r.as_dict()
            per = d["server_cpu_s"] / r.tally.acked * 1e6 if r.tally.acked else 0.0
            lines.append(
                f"| {r.scenario} | {r.target} | {d['offered'] or 'max'} | "
                f"{d['messages_per_s']:,} | {_ms(d['ack_p50_ms'])} / {_ms(d['ack_p99_ms'])} | "
                f"{_ms(d['p50_ms'])} / {_ms(d['p99_ms'])} | "
                f"{d['receipt_events']:,} / {d['receipts_sent']:,} | {d['lost']} / {d['gaps']} / "
                f"{d['reordered']} / {d['duplicates']} | {per:.1f} | {_load(d)} |"
            )
    idle = [r for r in rows if r.scenario == "e/f"]
    if idle:
        lines += [
            "",
            "| server | sessions | connect storm (sessions/s) | server µs per connect "
            "(user + system) | KiB per idle session | peak RSS | load-gen CPU |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in idle:
            d = r.as_dict()
            n = d["connected"]
            rate = n / d["connect_s"] if d["connect_s"] else 0.0
            lines.append(
                f"| {r.target} | {n:,} ({d['failed']} failed) | {rate:,.0f} | "
                f"{d['server_cpu_s'] / max(1, n) * 1e6:,.0f} "
                f"({(d['server_cpu_s'] - d['server_system_s']) / max(1, n) * 1e6:,.0f} + "
                f"{d['server_system_s'] / max(1, n) * 1e6:,.0f}) | {d['idle_kib']:.1f} | "
                f"{d['peak_rss_mib']} MiB | {_load(d)} |"
            )
    return "\n".join(lines)


def _load(d: dict[str, Any]) -> str:
    busy = d["loadgen_cpu_s"] / d["seconds"] if d["seconds"] else 0.0
    return f"{d['loadgen_cpu_s']:.1f} s ({busy:.0%})"


PLOT = """
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = [json.loads(line) for line in sys.stdin]
fig, ax = plt.subplots(figsize=(8, 5))
for name in dict.fromkeys(r["target"] for r in rows):
    mine = sorted((r for r in rows if r["target"] == name), key=lambda r: r["offered"])
    x = [r["offered"] * 1000 for r in mine]
    line, = ax.plot(x, [r["p99_ms"] for r in mine], marker="o", label=name + " p99")
    ax.plot(x, [r["p50_ms"] for r in mine], marker=".", linestyle="--",
            color=line.get_color(), label=name + " p50")
ax.set_xscale("log"); ax.set_yscale("log")
ax.set_xlabel("offered deliveries/s (1,000 receivers)")
ax.set_ylabel("publish-to-deliver latency (ms)")
ax.axhline(10, color="grey", linewidth=0.8, linestyle=":")
ax.set_title("Latency against offered load (scenario c)")
ax.grid(True, which="both", alpha=0.3); ax.legend(fontsize=8)
fig.tight_layout(); fig.savefig(sys.argv[1], dpi=110)
"""


def _plotting_python() -> Path:
    """The peers' virtualenv's python, with matplotlib installed there on first use."""
    python = peers.CACHE / "venv" / "bin" / "python"
    if subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True).returncode:
        progress("installing matplotlib into the peers' virtualenv for the plot")
        subprocess.run([str(python), "-m", "pip", "install", "-q", "matplotlib"], check=True)
    return python


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    python = _plotting_python()
    data = "".join(json.dumps(r) + "\n" for r in rows)
    subprocess.run([str(python), "-c", PLOT, str(out)], input=data, text=True, check=True)
    progress(f"plot written to {out}")
