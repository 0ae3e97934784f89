"""``parley bench cluster``: a cluster's figures, nodes through Redis (issue 13).

It starts a private PostgreSQL and a private redis-server (the test suite's helpers),
then node processes (``parley serve --redis-url ... --database-url ...``), and runs:

  fanout    1,000 receivers x 1,000 messages as fast as acked, in ``--layouts``: the
            room created by the publisher's node (node0), so owned there; ``three``:
            500 receivers on each of node1 and node2; ``two``: 500 on node0, 500 on
            node1; ``one``: one node without Redis holding everything (``one+redis``:
            the same with ``--redis-url``). Server CPU per delivery over every node
            process, Redis's CPU per message, and Redis's commands per message.
  latency   the same layouts at a fixed rate (``--rates``, 10 s each): publish-to-deliver
            percentiles.
  chat      1:1 chat between users on node0 and node2: Redis commands per message
            (``INFO commandstats`` deltas, an idle period's background subtracted).
  failover  SIGKILL the node that owns a room while a client on another node keeps
            sending (the same cid again after TRY_LATER or a 4009 close, reconnecting to
            a surviving node): SIGKILL to the first accepted send, over ``--trials``.
  storm     ``--sessions`` sessions on one node, in rooms owned by another, lose their
            node; they reconnect and rejoin on the two others: the time until every
            ``joined`` came.
  connect   a connect storm: ``--sessions`` sessions (one user each) connect and say
            hello, ``--handshakes`` in flight, to each of ``--layouts`` (``w1``, ``w2``
            and the others; on a layout of several nodes, all to node0): sessions/s, and
            p50/p99 of each session's connect to its hello answered.

Layouts ``w1`` and ``w2`` are ONE ``parley serve --workers 1`` or ``--workers 2``
process (the supervisor and its workers, which share the client port), with Redis and
PostgreSQL either way; the room is owned by whichever worker took the publisher's
``create``, and the kernel spreads the receivers over the workers. Their CPU is the
supervisor's plus its workers'. ``--server-cpu`` would pin the workers too, all to one
core: run them unpinned.

CPU is read from ``/proc/<pid>/stat`` around the measured phase only. ``--server-cpu``
pins the nodes and redis-server to that core; run the command itself under ``taskset``
on another, as the load generator's processes and PostgreSQL inherit its affinity.
"""

import argparse
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from loadtests.cli import free_port, server_command, wait_for_port
from loadtests.loadgen import Plan, Tally, bucket_ms, percentile
from loadtests.proc import cpu_times, progress
from loadtests.scenarios import Workers, workers
from loadtests.wire import Ident
from server.tokens import issue_token

SCENARIOS = ("fanout", "latency", "chat", "failover", "storm", "connect")


class Node:
    """One ``parley serve`` process of the cluster; can be killed and started again on
    its port (as a new node: a node's name includes its pid)."""

    def __init__(
        self,
        name: str,
        secret: str,
        database_url: str,
        flags: Sequence[str],
        cpu: int | None,
        workers: int = 0,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.workers = workers  # 0: a plain node; N: ``--workers N``, a supervisor
        if workers:
            flags = [*flags, "--workers", str(workers)]
        self.command = server_command(self.port, secret, database_url, flags)
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def start(self) -> None:
        command = self.command
        if self.cpu is not None:
            command = ["taskset", "-c", str(self.cpu), *command]
        self.proc = subprocess.Popen(command)
        wait_for_port(self.port, self.proc)
        if self.workers > 1:
            # The supervisor holds the port without listening: wait for every worker.
            deadline = time.monotonic() + 60
            while _listeners(self.port) < self.workers:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name}: not {self.workers} workers listening")
                time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL: no goodbye to Redis, its clients or its leases."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@attrs.define
class Backends:
    """The private PostgreSQL and Redis every cluster of a run shares."""

    postgres: Any
    redis: Any

    def reset_redis(self) -> None:
        """Nothing of the last cluster left: owner keys, node keys."""
        self.redis.command("FLUSHALL")

    def redis_pid(self) -> int:
        pid: int = self.redis.process.pid
        return pid

    def commandstats(self) -> dict[str, int]:
        """Calls per command since the last ``CONFIG RESETSTAT``."""
        info = self.redis.command("INFO", "commandstats")
        assert isinstance(info, bytes)
        calls = {}
        for line in info.decode().splitlines():
            if line.startswith("cmdstat_"):
                name, _, fields = line.partition(":")
                stats = dict(f.split("=") for f in fields.split(","))
                calls[name.removeprefix("cmdstat_")] = int(stats["calls"])
        calls.pop("config|resetstat", None)  # ours, not the cluster's
        return calls

    def reset_stats(self) -> None:
        self.redis.command("CONFIG", "RESETSTAT")


@contextmanager
def backends(cpu: int | None) -> Iterator[Backends]:
    # The suite's own helpers: a private server each, on no shared port or directory.
    # ``tests`` is not installed with the package, so reach it from this checkout.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.append(root)
    from tests.postgres import private_postgres
    from tests.redis_server import private_redis

    with private_postgres() as postgres, private_redis() as redis:
        if cpu is not None:
            assert redis.process is not None
            os.sched_setaffinity(redis.process.pid, {cpu})
        redis.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 0 0 0")
        yield Backends(postgres, redis)


def _listeners(port: int) -> int:
    """Sockets listening on ``port`` (127.0.0.1), from ``/proc/net/tcp``."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return sum(1 for r in rows if r[1] == f"0100007F:{port:04X}" and r[3] == "0A")


def _cpu_of(nodes: list[Node]) -> tuple[float, float]:
    """(user, system) of every node process and, under ``--workers``, its workers
    (``cpu_times`` counts descendants): a worker restarted during the measurement would
    be missed, and is not expected."""
    user = system = 0.0
    for node in nodes:
        u, s = cpu_times(node.pid)
        user, system = user + u, system + s
    return user, system


@attrs.define
class Cluster:
    nodes: list[Node]
    secret: str
    redis: Backends | None  # None: one node without Redis

    def token(self, user: str) -> str:
        return issue_token(self.secret, user, 3600)

    def cpu(self) -> tuple[float, float]:
        """(user, system) seconds of every node process, summed."""
        return _cpu_of(self.nodes)

    def redis_cpu(self) -> float:
        return sum(cpu_times(self.redis.redis_pid())) if self.redis else 0.0


@contextmanager
def cluster(
    b: Backends,
    size: int,
    cpu: int | None,
    lease: float | None = None,
    redis: bool = True,
    workers: int = 0,
) -> Iterator[Cluster]:
    """``size`` nodes on one fresh database; without ``redis``, one plain node;
    ``workers``: each node is ``parley serve --workers`` that many."""
    b.reset_redis()
    secret = secrets.token_urlsafe(32)
    database = b.postgres.new_database()
    flags: list[str] = []
    if redis:
        flags += ["--redis-url", b.redis.url]
        if lease is not None:
            flags += ["--cluster-lease", str(lease)]
    nodes = [Node(f"node{i}", secret, database, flags, cpu, workers) for i in range(size)]
    try:
        for node in nodes:
            node.start()
        yield Cluster(nodes, secret, b if redis else None)
    finally:
        for node in nodes:
            node.stop()


def _plan(c: Cluster, node: Node, idents: list[Ident], **kw: Any) -> Plan:
    for ident in idents:
        ident.token = c.token(ident.user)
    return Plan(wire="parley", host="127.0.0.1", port=node.port, idents=idents, **kw)


async def _create(url: str, token: str, room: str) -> None:
    from protocol.client import open_client

    async with open_client(url, token) as client:
        await client.create(room)


def create_room(c: Cluster, node: Node, room: str, user: str = "publisher") -> None:
    """Create ``room`` through ``node``, which is where it is then placed."""
    trio.run(_create, node.url, c.token(user), room)


# --- fan-out and latency ------------------------------------------------------------------


@attrs.frozen
class Layout:
    name: str
    nodes: int
    redis: bool
    publisher: int  # the node the publisher is on, which also owns the room
    receivers: tuple[int, ...]  # the nodes the receivers are spread over, evenly
    workers: int = 0  # each node is ``parley serve --workers`` this many

    def describe(self) -> str:
        if self.workers:
            return f"one parley serve --workers {self.workers}, Redis and PostgreSQL"
        if not self.redis:
            return "one node, no Redis"
        on = "+".join(f"node{i}" for i in self.receivers)
        return f"{self.nodes} nodes: room and publisher on node0, receivers on {on}"


LAYOUTS = {
    "one": Layout("one", 1, False, 0, (0, 0)),
    "one+redis": Layout("one+redis", 1, True, 0, (0, 0)),
    "two": Layout("two", 2, True, 0, (0, 1)),
    "three": Layout("three", 3, True, 0, (1, 2)),
    "w1": Layout("w1", 1, True, 0, (0, 0), workers=1),
    "w2": Layout("w2", 1, True, 0, (0, 0), workers=2),
}


def _redis_calls(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def broadcast(
    c: Cluster,
    layout: Layout,
    *,
    receivers: int,
    messages: int,
    rate: float,
    window: int = 2048,
    timeout: float = 120,
) -> dict[str, Any]:
    room = f"fan-{time.monotonic_ns()}"
    create_room(c, c.nodes[layout.publisher], room)
    idents = [Ident(user=f"r{i}", room=room, src=i + 1) for i in range(receivers)]
    parts = len(layout.receivers)
    plans = [
        _plan(c, c.nodes[n], idents[k::parts], expect=messages, timeout=timeout)
        for k, n in enumerate(layout.receivers)
    ]
    publisher = _plan(
        c,
        c.nodes[layout.publisher],
        [Ident(user="publisher", room=room, src=0)],
        publish=messages,
        publishers=1,
        window=10**9 if rate else window,
        rate=rate,
        timeout=timeout,
    )
    with workers([*plans, publisher]) as w:
        progress(f"{layout.name}: connecting {receivers} receivers")
        connected = w.gather("ready")
        if connected.failed:
            progress(f"{connected.failed} failed to connect: {connected.errors[:3]}")
        time.sleep(0.5)
        return _measure(w, c, layout.name, receivers * messages, connected, rate)


def _measure(
    w: Workers, c: Cluster, name: str, expected: int, connected: Tally, rate: float
) -> dict[str, Any]:
    if c.redis:
        c.redis.reset_stats()
    user, system = c.cpu()
    redis_cpu = c.redis_cpu()
    started = time.monotonic_ns()
    w.tell("go")
    tally = w.gather("done")
    user_after, system_after = c.cpu()
    redis_cpu = c.redis_cpu() - redis_cpu
    calls = c.redis.commandstats() if c.redis else {}
    seconds = (tally.last_ns - started) / 1e9 if tally.last_ns else 0.0
    cpu = user_after - user + system_after - system
    row = {
        "layout": name,
        "offered": rate,
        "connected": connected.connected,
        "failed": connected.failed,
        "messages": tally.acked,
        "deliveries": tally.deliveries,
        "lost": max(0, expected - tally.deliveries),
        "gaps": tally.gaps,
        "reordered": tally.reordered,
        "duplicates": tally.duplicates,
        "seconds": round(seconds, 3),
        "deliveries_per_s": round(tally.deliveries / seconds) if seconds else 0,
        "p50_ms": round(percentile(tally.latency, 50), 2),
        "p90_ms": round(percentile(tally.latency, 90), 2),
        "p99_ms": round(percentile(tally.latency, 99), 2),
        "max_ms": round(bucket_ms(max(tally.latency)), 2) if tally.latency else None,
        "ack_p50_ms": round(percentile(tally.ack_latency, 50), 2),
        "ack_p99_ms": round(percentile(tally.ack_latency, 99), 2),
        "server_cpu_s": round(cpu, 3),
        "server_system_s": round(system_after - system, 3),
        "us_per_delivery": round(cpu / tally.deliveries * 1e6, 3) if tally.deliveries else None,
        "redis_cpu_s": round(redis_cpu, 3),
        "redis_us_per_message": (
            round(redis_cpu / tally.acked * 1e6, 2) if tally.acked and c.redis else None
        ),
        "redis_calls": calls,
        "redis_calls_per_message": (
            round(sum(calls.values()) / tally.acked, 2) if tally.acked and c.redis else None
        ),
        "loadgen_cpu_s": round(tally.cpu_s, 3),
        "errors": tally.errors[:5],
    }
    progress(json.dumps(row))
    return row


# --- 1:1 chat: Redis commands per message --------------------------------------------------


def chat(
    c: Cluster,
    *,
    pairs: int,
    messages: int,
    rate: float,
    receipts: bool,
    window: int = 4,
    timeout: float = 120,
) -> dict[str, Any]:
    """``pairs`` direct rooms, one user of each on node0 and the other on the last node (on a
    one-node cluster, both on node0), each sending ``messages``; ``rate`` is the total
    messages/s (0: as fast as acked)."""
    tag = time.monotonic_ns() % 10**8
    left, right = [], []
    for k in range(pairs):
        a, b = f"c{tag}a{k}", f"c{tag}b{k}"
        left.append(Ident(user=a, room="", src=2 * k + 1, peer=b))
        right.append(Ident(user=b, room="", src=2 * k + 2, peer=a))
    per_user = rate / (2 * pairs) if rate else 0.0
    plans = [
        _plan(
            c,
            c.nodes[n],
            idents,
            publish=messages,
            publishers=len(idents),
            expect=messages,
            window=window,
            rate=per_user,
            receipts=receipts,
            timeout=timeout,
        )
        for n, idents in ((0, left), (len(c.nodes) - 1, right))
    ]
    with workers(plans) as w:
        progress(f"chat: {pairs} pairs on {len(c.nodes)} node(s)")
        connected = w.gather("ready")
        background = 0.0
        if c.redis:
            # The background (heartbeats, lease checks) over as long as the run takes.
            idle = max(2.0, 2 * pairs * messages / rate) if rate else 5.0
            c.redis.reset_stats()
            time.sleep(idle)
            background = sum(c.redis.commandstats().values()) / idle
        name = "chat" if c.redis else "chat, one node"
        row = _measure(w, c, name, 2 * pairs * messages, connected, rate)
    busy = sum(row["redis_calls"].values()) - background * row["seconds"]
    row["background_calls_per_s"] = round(background, 1)
    row["redis_calls_per_message_net"] = round(busy / row["messages"], 2) if row["messages"] else 0
    row["receipts"] = receipts
    return row


# --- failover: SIGKILL of a room's owner ---------------------------------------------------


@attrs.frozen
class Trial:
    kill_to_send: float  # SIGKILL to the first send accepted after it
    kill_to_close: float  # SIGKILL to the first error or close the sender saw


async def _failover_trial(c: Cluster, room: str, victim: Node, home: Node, lease: float) -> Trial:
    """SIGKILL ``victim`` (the room's owner) while a client on ``home`` keeps sending,
    at a random point of the victim's heartbeat and the survivors' node watch (both
    periodic, so a fixed point would time one phase of them only)."""
    from trio_websocket import ConnectionClosed, HandshakeError

    from protocol.client import Disconnected, ServerError, open_client

    kill_at = trio.current_time() + 0.3 + random.uniform(0, lease)
    killed_at: float | None = None
    closed_at: float | None = None
    attempted: set[str] = set()
    survivors = [n for n in c.nodes if n is not victim]
    i = tries = 0
    with trio.fail_after(120):
        while True:
            # Reconnect alternately to its own node and the other survivor.
            node = home if tries % 2 == 0 or killed_at is None else survivors[tries % 2]
            try:
                async with open_client(node.url, c.token("sender")) as client:
                    await client.join(room, resume=False)
                    while True:
                        cid = f"s{i}"
                        retry = cid in attempted
                        attempted.add(cid)
                        with trio.fail_after(30):
                            await client.send(room, "x", cid=cid, retry=retry)
                        if killed_at is not None:
                            now = trio.current_time()
                            return Trial(now - killed_at, (closed_at or now) - killed_at)
                        i += 1
                        if trio.current_time() >= kill_at:
                            victim.kill()
                            killed_at = trio.current_time()
                        await trio.sleep(0.01)
            except (ServerError, Disconnected, ConnectionClosed, HandshakeError, OSError):
                pass  # TRY_LATER, 4009 (the room moved), a node gone: again, same cid
            except trio.TooSlowError:
                pass
            tries += 1
            if killed_at is not None and closed_at is None:
                closed_at = trio.current_time()
            await trio.sleep(0.05)


def failover(b: Backends, lease: float, trials: int, cpu: int | None) -> dict[str, Any]:
    results = []
    with cluster(b, 3, cpu, lease=lease) as c:
        victim, home = c.nodes[0], c.nodes[1]
        for t in range(trials):
            room = f"fo-{t}-{time.monotonic_ns()}"
            create_room(c, victim, room)
            trial = trio.run(_failover_trial, c, room, victim, home, lease)
            results.append(trial)
            progress(
                f"lease {lease:g}: trial {t + 1}: SIGKILL to accepted send "
                f"{trial.kill_to_send:.3f} s (to the first close or error "
                f"{trial.kill_to_close:.3f} s)"
            )
            victim.start()  # a fresh node on the same port, owning nothing
    times = [r.kill_to_send for r in results]
    closes = [r.kill_to_close for r in results]
    row = {
        "lease": lease,
        "trials": trials,
        "p50_s": round(statistics.median(times), 3),
        "max_s": round(max(times), 3),
        "min_s": round(min(times), 3),
        "all_s": [round(t, 3) for t in times],
        "close_p50_s": round(statistics.median(closes), 3),
        "close_to_send_p50_s": round(
            statistics.median(r.kill_to_send - r.kill_to_close for r in results), 3
        ),
    }
    progress(json.dumps(row))
    return row


# --- the reconnect storm -------------------------------------------------------------------


def storm(
    b: Backends, sessions: int, rooms: int, lease: float, cpu: int | None, handshakes: int
) -> dict[str, Any]:
    """``sessions`` on node0 in ``rooms`` owned by node1; node0 is killed, and they
    reconnect and rejoin, half on node1 and half on node2."""
    with cluster(b, 3, cpu, lease=lease) as c:
        victim, survivors = c.nodes[0], c.nodes[1:]
        tag = time.monotonic_ns() % 10**8
        names = [f"st{tag}-{k}" for k in range(rooms)]
        for name in names:
            create_room(c, survivors[0], name, user="owner")
        idents = [Ident(user=f"u{tag}-{i}", room=names[i % rooms], src=i) for i in range(sessions)]
        before = [
            _plan(c, victim, idents[k::2], handshakes=handshakes // 2, timeout=120)
            for k in range(2)
        ]
        again = [
            _plan(
                c,
                node,
                [attrs.evolve(ident) for ident in idents[k::2]],
                handshakes=handshakes // 2,
                timeout=120,
                connect_on_signal=True,
            )
            for k, node in enumerate(survivors)
        ]
        with ExitStack() as stack:
            first = stack.enter_context(workers(before))
            progress(f"storm: {sessions} sessions onto node0, in {rooms} rooms owned by node1")
            on_victim = first.gather("ready")
            progress(
                f"{on_victim.connected} connected ({on_victim.failed} failed"
                + (f": {on_victim.errors[:3]})" if on_victim.failed else ")")
            )
            later = stack.enter_context(workers(again))
            later.gather("started")
            time.sleep(2.0)
            user, system = _cpu_of(survivors)
            b.reset_stats()
            redis_cpu = sum(cpu_times(b.redis_pid()))
            killed = time.monotonic()
            victim.kill()
            # The sessions on node0 learn it at once (their sockets reset); a client
            # reconnects without waiting, so the storm starts at the kill.
            later.tell("connect")
            tally = later.gather("ready")
            took = time.monotonic() - killed
            user_after, system_after = _cpu_of(survivors)
            redis_cpu = sum(cpu_times(b.redis_pid())) - redis_cpu
            calls = b.commandstats()
    row = {
        "sessions": sessions,
        "rooms": rooms,
        "lease": lease,
        "on_victim": on_victim.connected,
        "rejoined": tally.connected,
        "failed": tally.failed,
        "kill_to_all_joined_s": round(took, 3),
        "storm_s": round(tally.connect_s, 3),
        "per_s": round(tally.connected / tally.connect_s) if tally.connect_s else 0,
        "survivors_cpu_s": round(user_after - user + system_after - system, 3),
        "us_per_session": round((user_after - user + system_after - system) / sessions * 1e6),
        "redis_cpu_s": round(redis_cpu, 3),
        "redis_calls": calls,
        "redis_calls_per_session": round(sum(calls.values()) / sessions, 2),
        "errors": tally.errors[:5],
    }
    progress(json.dumps(row))
    return row


# --- a connect storm -----------------------------------------------------------------------


def connect_storm(c: Cluster, name: str, sessions: int, handshakes: int) -> dict[str, Any]:
    """``sessions`` sessions, one user each, connect to node0 and say hello (no room),
    ``handshakes`` in flight over two load-generator processes; 50 sessions first to
    warm the server up."""
    tag = time.monotonic_ns() % 10**8
    node = c.nodes[0]
    warm = [Ident(user=f"w{tag}-{i}", room="", src=i) for i in range(50)]
    idents = [Ident(user=f"h{tag}-{i}", room="", src=i) for i in range(sessions)]
    with workers([_plan(c, node, warm, timeout=60)]) as warm_up:
        warm_up.gather("ready")
        time.sleep(1.0)
        plans = [
            _plan(
                c,
                node,
                idents[k::2],
                handshakes=max(1, handshakes // 2),
                timeout=120,
                connect_on_signal=True,
            )
            for k in range(2)
        ]
        with workers(plans) as w:
            w.gather("started")
            time.sleep(0.5)
            progress(f"{name}: {sessions} sessions, {handshakes} handshakes in flight")
            user, system = c.cpu()
            w.tell("connect")
            tally = w.gather("ready")
            user_after, system_after = c.cpu()
    cpu = user_after - user + system_after - system
    row = {
        "layout": name,
        "sessions": sessions,
        "handshakes": handshakes,
        "connected": tally.connected,
        "failed": tally.failed,
        "connect_s": round(tally.connect_s, 3),
        "per_s": round(tally.connected / tally.connect_s) if tally.connect_s else 0,
        "connect_p50_ms": round(percentile(tally.connect_latency, 50), 2),
        "connect_p99_ms": round(percentile(tally.connect_latency, 99), 2),
        "connect_max_ms": (
            round(bucket_ms(max(tally.connect_latency)), 2) if tally.connect_latency else None
        ),
        "server_cpu_s": round(cpu, 3),
        "server_system_s": round(system_after - system, 3),
        "us_per_session": round(cpu / tally.connected * 1e6) if tally.connected else None,
        "loadgen_cpu_s": round(tally.cpu_s, 3),
        "errors": tally.errors[:5],
    }
    progress(json.dumps(row))
    return row


# --- the command ---------------------------------------------------------------------------


def _round(b: Backends, args: argparse.Namespace, scenario: str) -> list[dict[str, Any]]:
    """One round of ``scenario``: its rows."""
    cpu = args.server_cpu
    rows = []
    if scenario in ("fanout", "latency"):
        rates = [0.0] if scenario == "fanout" else [float(x) for x in args.rates.split(",")]
        for rate in rates:
            for name in args.layouts.split(","):
                layout = LAYOUTS[name]
                messages = int(rate * args.seconds) if rate else args.messages
                with cluster(b, layout.nodes, cpu, redis=layout.redis, workers=layout.workers) as c:
                    rows.append(
                        broadcast(c, layout, receivers=args.receivers, messages=messages, rate=rate)
                    )
    elif scenario == "chat":
        for receipts in (False, True):
            with cluster(b, args.chat_nodes, cpu, redis=args.chat_nodes > 1) as c:
                rows.append(
                    chat(
                        c,
                        pairs=args.pairs,
                        messages=args.chat_messages,
                        rate=args.chat_rate,
                        receipts=receipts,
                    )
                )
    elif scenario == "failover":
        for lease in (float(x) for x in args.leases.split(",")):
            rows.append(failover(b, lease, args.trials, cpu))
    elif scenario == "storm":
        rows.append(storm(b, args.sessions, args.rooms, args.storm_lease, cpu, args.handshakes))
    elif scenario == "connect":
        for name in args.layouts.split(","):
            layout = LAYOUTS[name]
            with cluster(b, layout.nodes, cpu, redis=layout.redis, workers=layout.workers) as c:
                rows.append(connect_storm(c, name, args.sessions, args.handshakes))
    else:
        raise SystemExit(f"unknown scenario {scenario!r}; one of {', '.join(SCENARIOS)}")
    return rows


def run(args: argparse.Namespace) -> int:
    rows: list[dict[str, Any]] = []
    with backends(args.server_cpu) as b:
        for number in range(1, args.rounds + 1):
            for scenario in args.scenarios.split(","):
                for row in _round(b, args, scenario):
                    row = {"scenario": scenario, "round": number, **row}
                    rows.append(row)
                    if args.json:
                        with args.json.open("a") as f:
                            f.write(json.dumps(row) + "\n")
    print(summarize(rows))
    return 0


def _median(rows: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def summarize(rows: list[dict[str, Any]]) -> str:
    """Medians over the rounds, one line per (scenario, setting)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        setting = str(row.get("layout", ""))
        if row.get("offered"):
            setting += f" @{row['offered']:g}/s"
        if row["scenario"] == "chat":
            setting = row["layout"] + (", receipts" if row["receipts"] else ", no receipts")
        if row["scenario"] == "failover":
            setting = f"lease {row['lease']:g}"
        groups.setdefault((row["scenario"], setting), []).append(row)
    lines = ["medians over rounds:"]
    for (scenario, setting), group in groups.items():
        n = len(group)
        if scenario in ("fanout", "latency", "chat"):
            calls: dict[str, int] = {}
            for row in group:
                for k, v in row["redis_calls"].items():
                    calls[k] = calls.get(k, 0) + v
            per = {k: round(v / sum(r["messages"] for r in group), 2) for k, v in calls.items()}
            lines.append(
                f"{scenario} {setting} (n={n}): {_median(group, 'deliveries_per_s'):,.0f} "
                f"deliveries/s, p50/p99 {_median(group, 'p50_ms'):.2f}/"
                f"{_median(group, 'p99_ms'):.2f} ms, server "
                f"{_median(group, 'us_per_delivery'):.3f} µs/delivery, Redis "
                f"{_median(group, 'redis_us_per_message'):.2f} µs/message, "
                f"{_median(group, 'redis_calls_per_message'):.2f} commands/message {per}"
                + (
                    f" (net of background {_median(group, 'redis_calls_per_message_net'):.2f})"
                    if scenario == "chat"
                    else ""
                )
            )
        elif scenario == "failover":
            every = sorted(t for row in group for t in row["all_s"])
            lines.append(
                f"failover {setting}: {len(every)} trials, p50 {statistics.median(every):.3f} s, "
                f"max {max(every):.3f} s"
            )
        elif scenario == "connect":
            lines.append(
                f"connect {setting} (n={n}): {_median(group, 'per_s'):,.0f} sessions/s, "
                f"connect p50/p99 {_median(group, 'connect_p50_ms'):.2f}/"
                f"{_median(group, 'connect_p99_ms'):.2f} ms, "
                f"{_median(group, 'us_per_session'):,.0f} µs server CPU per session"
            )
        else:
            lines.append(
                f"storm (n={n}): kill to all joined {_median(group, 'kill_to_all_joined_s'):.2f} s,"
                f" storm {_median(group, 'storm_s'):.2f} s, {_median(group, 'per_s'):,.0f}/s, "
                f"{_median(group, 'us_per_session'):,.0f} µs survivors' CPU per session"
            )
    return "\n".join(lines)


def add_parser(kinds: "argparse._SubParsersAction[Any]", formatter: Any) -> None:
    p = kinds.add_parser(
        "cluster",
        help="a cluster's figures: fan-out, latency, Redis commands, failover, reconnect storm",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=formatter,
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated")
    p.add_argument(
        "--layouts",
        default="one,three",
        help=f"fan-out and latency layouts, comma-separated: {', '.join(LAYOUTS)}",
    )
    p.add_argument("--rounds", type=int, default=1, help="repeat every scenario this often")
    p.add_argument("--receivers", type=int, default=1000, help="fan-out receivers")
    p.add_argument("--messages", type=int, default=1000, help="fan-out messages")
    p.add_argument("--rates", default="200", help="latency: messages/s, comma-separated")
    p.add_argument("--seconds", type=float, default=10, help="latency: seconds per rate")
    p.add_argument("--pairs", type=int, default=100, help="chat: direct rooms")
    p.add_argument("--chat-messages", type=int, default=50, help="chat: messages per user")
    p.add_argument("--chat-rate", type=float, default=1000, help="chat: total msg/s; 0 = full")
    p.add_argument(
        "--chat-nodes", type=int, default=3, help="chat: nodes; 1 = one node without Redis"
    )
    p.add_argument("--leases", default="5,1", help="failover: --cluster-lease values")
    p.add_argument("--trials", type=int, default=20, help="failover: kills per lease")
    p.add_argument(
        "--sessions", type=int, default=5000, help="storm, connect: sessions (on the killed node)"
    )
    p.add_argument("--rooms", type=int, default=5, help="storm: rooms they are in")
    p.add_argument("--storm-lease", type=float, default=5, help="storm: --cluster-lease")
    p.add_argument(
        "--handshakes", type=int, default=200, help="storm, connect: handshakes in flight"
    )
    p.add_argument(
        "--server-cpu",
        type=int,
        metavar="CORE",
        help="pin the nodes and redis-server to this core (run the command under taskset "
        "on another)",
    )
    p.add_argument("--json", type=Path, help="append every row to this JSON-lines file")
    p.set_defaults(func=run)
