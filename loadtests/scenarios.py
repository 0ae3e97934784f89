"""The issue-6 scenarios, each run against one target server (see ``loadtests.compare``).

Each target server runs alone, pinned to its core; the load generator's worker processes
(``loadtests.loadgen``) run on the cores left. Server CPU comes from /proc, so it counts
the server's work whatever the load generator's speed; the generator reports its own
CPU so a reader can tell when it, not the server, was the limit.

Scenarios (issue 6):
  a  fan-out: 1,000 receivers in one room, one publisher, as fast as acked
  b  100 receivers, 20,000 messages
  c  latency at a fixed load: 1,000 receivers, N messages/s for 10 s (``--rates``)
  k  receivers that keep up: as c, at rates where each delivery is its own write
     (``--keep-rates``), for the server's user and system CPU per delivery
  d  1:1 chat: 2,000 users in 1,000 direct rooms, acks and receipts; at full speed
     (``d``) and at a fixed total rate (``d-rate``)
  e  idle: server memory per authenticated idle session, 10,000 sessions
  f  connect storm: authenticated sessions per second (measured during ``e``)
"""

import multiprocessing
import multiprocessing.connection
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs

from loadtests.loadgen import Plan, Tally, bucket_ms, percentile, worker_main
from loadtests.proc import cpu_times, progress, status_kib
from loadtests.wire import Ident


@attrs.frozen
class Target:
    """A running server under test."""

    name: str
    wire: str
    host: str
    port: int
    pid: int
    version: str
    token_for: Callable[[str], str] = lambda user: ""


@attrs.frozen
class Row:
    """One scenario against one target."""

    scenario: str
    target: str
    tally: Tally
    seconds: float
    server_cpu_s: float
    peak_rss_kib: int
    expected: int = 0  # deliveries that should have arrived
    offered: float = 0.0  # messages/s offered, for fixed-rate runs
    idle_kib: float = float("nan")
    server_system_s: float = 0.0  # of server_cpu_s, in the kernel

    @property
    def deliveries_per_s(self) -> float:
        return self.tally.deliveries / self.seconds if self.seconds else 0.0

    @property
    def messages_per_s(self) -> float:
        return self.tally.acked / self.seconds if self.seconds else 0.0

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.tally.deliveries)

    @property
    def cpu_per_delivery_us(self) -> float:
        return self.server_cpu_s / self.tally.deliveries * 1e6 if self.tally.deliveries else 0.0

    @property
    def system_per_delivery_us(self) -> float:
        n = self.tally.deliveries
        return self.server_system_s / n * 1e6 if n else 0.0

    def as_dict(self) -> dict[str, Any]:
        t = self.tally
        return {
            "scenario": self.scenario,
            "target": self.target,
            "offered": self.offered,
            "seconds": round(self.seconds, 3),
            "deliveries": t.deliveries,
            "deliveries_per_s": round(self.deliveries_per_s),
            "messages_per_s": round(self.messages_per_s),
            "p50_ms": percentile(t.latency, 50),
            "p90_ms": percentile(t.latency, 90),
            "p99_ms": percentile(t.latency, 99),
            "max_ms": bucket_ms(max(t.latency)) if t.latency else float("nan"),
            "ack_p50_ms": percentile(t.ack_latency, 50),
            "ack_p99_ms": percentile(t.ack_latency, 99),
            "lost": self.lost,
            "gaps": t.gaps,
            "reordered": t.reordered,
            "duplicates": t.duplicates,
            "receipts_sent": t.receipts_sent,
            "receipt_events": t.receipt_events,
            "server_cpu_s": round(self.server_cpu_s, 3),
            "server_system_s": round(self.server_system_s, 3),
            "server_us_per_delivery": round(self.cpu_per_delivery_us, 3),
            "server_system_us_per_delivery": round(self.system_per_delivery_us, 3),
            "peak_rss_mib": round(self.peak_rss_kib / 1024, 1),
            "loadgen_cpu_s": round(t.cpu_s, 3),
            "connected": t.connected,
            "failed": t.failed,
            "connect_s": round(t.connect_s, 3),
            "idle_kib": self.idle_kib,
            "errors": t.errors[:5],
        }


class Workers:
    """Load-generator processes, one per plan, stepped together."""

    def __init__(self, plans: list[Plan]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[multiprocessing.connection.Connection] = []
        self.procs = []
        for plan in plans:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(child, plan), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def gather(self, what: str) -> Tally:
        tally = Tally()
        for pipe in self.pipes:
            kind, part = pipe.recv()
            assert kind == what, (kind, what)
            tally.merge(part)
        return tally

    def tell(self, word: str) -> None:
        for pipe in self.pipes:
            pipe.send(word)

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send("close")
            except OSError:
                pass
        for proc in self.procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()


@contextmanager
def workers(plans: list[Plan]) -> Iterator[Workers]:
    w = Workers(plans)
    try:
        yield w
    finally:
        w.close()


def _split(idents: list[Ident], parts: int) -> list[list[Ident]]:
    return [idents[i::parts] for i in range(parts) if idents[i::parts]]


def _plan(target: Target, idents: list[Ident], **kw: Any) -> Plan:
    for ident in idents:
        ident.token = target.token_for(ident.user)
    return Plan(wire=target.wire, host=target.host, port=target.port, idents=idents, **kw)


def run_broadcast(
    target: Target,
    scenario: str,
    *,
    receivers: int,
    messages: int,
    rate: float,
    processes: int,
    size: int = 100,
    window: int = 2048,
    timeout: float = 120.0,
) -> Row:
    """One publisher, ``receivers`` in one room."""
    room = f"bench-{scenario}-{time.monotonic_ns()}"
    idents = [Ident(user=f"r{i}", room=room, src=i + 1, create=True) for i in range(receivers)]
    plans = [
        _plan(target, part, expect=messages, timeout=timeout) for part in _split(idents, processes)
    ]
    publisher = _plan(
        target,
        [Ident(user="publisher", room=room, src=0, create=True)],
        publish=messages,
        publishers=1,
        window=10**9 if rate else window,
        rate=rate,
        size=size,
        timeout=timeout,
    )
    with workers([*plans, publisher]) as w:
        progress(f"{target.name} {scenario}: connecting {receivers} receivers")
        connected = w.gather("ready")
        return _measure(w, target, scenario, receivers * messages, connected, offered=rate)


def run_chat(
    target: Target,
    scenario: str,
    *,
    users: int,
    messages: int,
    rate: float,
    window: int,
    processes: int,
    size: int = 100,
    timeout: float = 120.0,
) -> Row:
    """``users`` / 2 pairs, each user sending ``messages`` to the other with receipts on;
    ``rate`` is the total messages/s over all users (0: as fast as acked)."""
    tag = time.monotonic_ns() % 10**8
    idents = []
    for k in range(users // 2):
        a, b = f"c{tag}a{k}", f"c{tag}b{k}"
        room = f"dm{tag}-{k}"
        idents.append(Ident(user=a, room=room, src=2 * k + 1, peer=b))
        idents.append(Ident(user=b, room=room, src=2 * k + 2, peer=a))
    if target.wire != "parley":
        for ident in idents:
            ident.peer = None
    plans = [
        _plan(
            target,
            part,
            publish=messages,
            publishers=len(part),
            expect=messages,
            window=window,
            rate=rate / users if rate else 0.0,
            size=size,
            receipts=True,
            timeout=timeout,
        )
        for part in _split(idents, processes)
    ]
    with workers(plans) as w:
        progress(f"{target.name} {scenario}: connecting {users} users")
        connected = w.gather("ready")
        return _measure(w, target, scenario, users * messages, connected, offered=rate)


def _measure(
    w: Workers, target: Target, scenario: str, expected: int, connected: Tally, offered: float
) -> Row:
    if connected.failed:
        progress(f"{connected.failed} failed to connect: {connected.errors[:3]}")
    time.sleep(0.3)
    user, system = cpu_times(target.pid)
    started = time.monotonic_ns()
    w.tell("go")
    tally = w.gather("done")
    user_after, system_after = cpu_times(target.pid)
    cpu = user_after - user + system_after - system
    tally.connected, tally.failed = connected.connected, connected.failed
    tally.connect_s = connected.connect_s
    seconds = (tally.last_ns - started) / 1e9 if tally.last_ns else 0.0
    row = Row(
        scenario=scenario,
        target=target.name,
        tally=tally,
        seconds=seconds,
        server_cpu_s=cpu,
        peak_rss_kib=status_kib(target.pid, "VmHWM"),
        expected=expected,
        offered=offered,
        server_system_s=system_after - system,
    )
    progress(summary(row))
    return row


def run_idle(target: Target, *, sessions: int, processes: int, handshakes: int) -> Row:
    """Warm up with a few sessions, then a connect storm of ``sessions`` that stay idle."""
    tag = time.monotonic_ns() % 10**8
    warm = [Ident(user=f"w{tag}-{i}", room="", src=i) for i in range(50)]
    idents = [Ident(user=f"i{tag}-{i}", room="", src=i) for i in range(sessions)]
    if target.wire != "parley":
        for ident in [*warm, *idents]:
            ident.room = "idle"
    with workers([_plan(target, warm, timeout=60)]) as warm_up:
        warm_up.gather("ready")
        time.sleep(1.0)
        before = status_kib(target.pid, "VmRSS")
        progress(f"{target.name} e/f: {sessions} sessions, {handshakes} handshakes in flight")
        plans = [
            _plan(target, part, handshakes=max(1, handshakes // processes), timeout=120)
            for part in _split(idents, processes)
        ]
        user, system = cpu_times(target.pid)
        with workers(plans) as w:
            tally = w.gather("ready")
            user_after, system_after = cpu_times(target.pid)
            time.sleep(2.0)  # let the server settle: actors started, buffers freed
            after = status_kib(target.pid, "VmRSS")
            row = Row(
                scenario="e/f",
                target=target.name,
                tally=tally,
                seconds=tally.connect_s,
                server_cpu_s=user_after - user + system_after - system,
                server_system_s=system_after - system,
                peak_rss_kib=status_kib(target.pid, "VmHWM"),
                idle_kib=(after - before) / max(1, tally.connected),
            )
    progress(summary(row))
    return row


def summary(row: Row) -> str:
    d = row.as_dict()
    if row.scenario == "e/f":
        rate = d["connected"] / d["connect_s"] if d["connect_s"] else 0
        return (
            f"{row.target} e/f: {d['connected']} sessions ({d['failed']} failed) in "
            f"{d['connect_s']:.2f} s = {rate:,.0f}/s, server {d['server_cpu_s']:.2f} s CPU "
            f"({d['server_system_s']:.2f} s system); {d['idle_kib']:.1f} KiB per idle session; "
            f"load generator {d['loadgen_cpu_s']:.2f} s CPU"
        )
    return (
        f"{row.target} {row.scenario}: {d['deliveries']:,} deliveries in {d['seconds']:.2f} s "
        f"= {d['deliveries_per_s']:,}/s, {d['messages_per_s']:,} msg/s acked; "
        f"p50/p90/p99/max {d['p50_ms']:.1f}/{d['p90_ms']:.1f}/{d['p99_ms']:.1f}/"
        f"{d['max_ms']:.1f} ms; ack p50/p99 {d['ack_p50_ms']:.1f}/{d['ack_p99_ms']:.1f} ms; "
        f"lost {d['lost']} gaps {d['gaps']} reordered {d['reordered']} dup {d['duplicates']}; "
        f"server {d['server_cpu_s']:.2f} s ({d['server_system_s']:.2f} s system) = "
        f"{d['server_us_per_delivery']:.2f} µs/delivery, "
        f"peak RSS {d['peak_rss_mib']} MiB; load generator {d['loadgen_cpu_s']:.2f} s CPU"
        + (f"; errors {d['errors']}" if d["errors"] else "")
    )
