"""``parley bench fanout``: N receivers in one room, one publisher.

Receivers run in worker processes (``--workers``), each a trio loop of raw clients.
The publisher stamps every message with ``time.monotonic_ns()`` (one clock for every
process on the machine); each receiver checks seq order and records the
publish-to-deliver latency in a log-scale histogram (1 % resolution), which the workers
send back to be merged. Reported: deliveries/s, latency percentiles, lost/duplicate/
out-of-order deliveries, and, when the bench started the server itself, the server's
CPU time per delivery read from /proc. With ``--receipts`` every receiver acks every
message it gets (delivered and read up to its seq), and the run reports how many receipt
events that cost: the room's coalescing at work.
"""

import multiprocessing
import multiprocessing.connection
import time
from collections import Counter
from typing import Any

import attrs
import cbor2
import trio

from loadtests.loadgen import bucket, bucket_ms, percentile
from loadtests.proc import cpu_seconds, progress
from loadtests.rawclient import RawClient
from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.frames import FIELD_KEYS, TYPE_KEY, Create, Join, Pong, Receipt, Send
from protocol.wsframe import client_frame

JOINED = 20
MESSAGE = 22
PING = 2
SENT = 21
ERROR = 5
RECEIPT_EVENTS = (40, 41)  # receiptstate, receiptcounts
K_SEQ = FIELD_KEYS["seq"]
K_DATA = FIELD_KEYS["data"]
K_ROOM = FIELD_KEYS["room"]
K_CODE = FIELD_KEYS["code"]


@attrs.define
class Tally:
    """What one worker saw."""

    deliveries: int = 0
    lost: int = 0
    duplicates: int = 0
    reordered: int = 0
    receipts_sent: int = 0
    receipt_events: int = 0
    first_ns: int = 0
    last_ns: int = 0
    latency: Counter[int] = attrs.field(factory=Counter)

    def merge(self, other: "Tally") -> None:
        self.deliveries += other.deliveries
        self.lost += other.lost
        self.duplicates += other.duplicates
        self.reordered += other.reordered
        self.receipts_sent += other.receipts_sent
        self.receipt_events += other.receipt_events
        self.first_ns = min(x for x in (self.first_ns, other.first_ns) if x) or 0
        self.last_ns = max(self.last_ns, other.last_ns)
        self.latency.update(other.latency)

    def percentile(self, p: float) -> float:
        return percentile(self.latency, p)


@attrs.define
class _Start:
    """The seq after which the publisher starts; known once the main process says."""

    known: trio.Event = attrs.field(factory=trio.Event)
    base: int = 0


async def _receive(
    client: RawClient, room: str, messages: int, tally: Tally, start: _Start, receipts: bool
) -> None:
    """Check and time every message; answer the server's pings while waiting too."""
    expected = end = -1
    while expected <= end:
        acks: list[bytes] = []
        try:
            payloads = await client.receive()
        except EOFError:
            tally.lost += max(0, end - expected + 1)  # the connection ended early
            return
        now = time.monotonic_ns()
        for payload in payloads:
            frame = cbor2.loads(payload)
            t = frame.get(TYPE_KEY)
            if t == PING:
                await client.send(Pong())
                continue
            if t in RECEIPT_EVENTS:
                tally.receipt_events += 1
                continue
            if t != MESSAGE or frame.get(K_ROOM) != room:
                continue
            if expected < 0:  # the first message: the publisher has started
                await start.known.wait()
                expected, end = start.base + 1, start.base + messages
            seq = frame[K_SEQ]
            if seq == expected:
                expected += 1
            elif seq > expected:
                tally.lost += seq - expected
                tally.reordered += 1
                expected = seq + 1
            else:
                tally.duplicates += 1
                continue
            tally.deliveries += 1
            tally.latency[bucket(now - frame[K_DATA]["t"])] += 1
            if not tally.first_ns:
                tally.first_ns = now
            tally.last_ns = now
            if receipts:
                acks.append(client_frame(encode(Receipt(room=room, delivered=seq, read=seq))))
        if acks:
            tally.receipts_sent += len(acks)
            await client.stream.send_all(b"".join(acks))


async def _joined(client: RawClient, room: str) -> None:
    while True:
        for payload in await client.receive():
            frame = cbor2.loads(payload)
            if frame.get(TYPE_KEY) == JOINED and frame.get(K_ROOM) == room:
                return
            if frame.get(TYPE_KEY) == ERROR:
                raise ConnectionError(f"join refused: {frame}")


async def _worker(
    conn: multiprocessing.connection.Connection,
    host: str,
    port: int,
    tokens: list[str],
    room: str,
    messages: int,
    give_up_after: float,
    receipts: bool,
) -> None:
    clients: list[RawClient] = []
    limiter = trio.CapacityLimiter(50)

    async def connect(token: str) -> None:
        async with limiter:
            client = await RawClient.connect(host, port, token)
            await client.send(Join(id=1, room=room))
            await _joined(client, room)  # ready means subscribed, not asked
            clients.append(client)

    async with trio.open_nursery() as nursery:
        for token in tokens:
            nursery.start_soon(connect, token)
    tally = Tally()
    start = _Start()

    async def learn_start() -> None:
        conn.send(("ready", len(clients)))
        start.base = await trio.to_thread.run_sync(conn.recv)
        start.known.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(learn_start)
        for client in clients:
            nursery.start_soon(_receive, client, room, messages, tally, start, receipts)
        await start.known.wait()
        nursery.cancel_scope.deadline = trio.current_time() + give_up_after
    conn.send(("done", attrs.asdict(tally)))
    for client in clients:
        await client.aclose()


def _worker_main(conn: multiprocessing.connection.Connection, *args: Any) -> None:
    trio.run(_worker, conn, *args)


@attrs.frozen
class FanoutResult:
    receivers: int
    messages: int
    seconds: float
    deliveries: int
    lost: int
    duplicates: int
    reordered: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_s: float | None
    connect_s: float
    receipts_sent: int = 0
    receipt_events: int = 0
    ack_p50_ms: float = float("nan")
    ack_p99_ms: float = float("nan")

    @property
    def deliveries_per_s(self) -> float:
        return self.deliveries / self.seconds if self.seconds else 0.0

    def report(self) -> str:
        lines = [
            f"fan-out: {self.receivers} receivers (connected in {self.connect_s:.1f}s),"
            f" {self.messages} messages",
            f"  deliveries     {self.deliveries} in {self.seconds:.2f}s"
            f" = {self.deliveries_per_s:,.0f}/s",
            f"  latency        p50 {self.p50_ms:.1f} ms   p99 {self.p99_ms:.1f} ms"
            f"   max {self.max_ms:.1f} ms",
            f"  lost {self.lost}   duplicates {self.duplicates}   out of order {self.reordered}",
            f"  sent-ack       p50 {self.ack_p50_ms:.1f} ms   p99 {self.ack_p99_ms:.1f} ms",
        ]
        if self.receipts_sent:
            lines.append(
                f"  receipts       {self.receipts_sent} sent, {self.receipt_events} receipt events"
                f" received = {self.receipt_events / self.receipts_sent:.4f} events per receipt"
            )
        if self.server_cpu_s is not None and self.deliveries:
            per = self.server_cpu_s / self.deliveries * 1e6
            lines.append(f"  server CPU     {self.server_cpu_s:.2f}s = {per:.2f} µs/delivery")
        return "\n".join(lines)


async def run_fanout(
    host: str,
    port: int,
    token_for: Any,
    *,
    receivers: int,
    messages: int,
    size: int,
    workers: int,
    rate: float,
    window: int,
    server_pid: int | None,
    give_up_after: float,
    receipts: bool = False,
    room: str = "bench",
) -> FanoutResult:
    setup = await RawClient.connect(host, port, token_for("publisher"))
    await _enter(setup, room)  # the room must exist before receivers join it
    await setup.aclose()
    connecting = time.monotonic()
    ctx = multiprocessing.get_context("spawn")
    pipes = []
    procs = []
    for w in range(workers):
        tokens = [token_for(f"r{i}") for i in range(w, receivers, workers)]
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=_worker_main,
            args=(child, host, port, tokens, room, messages, give_up_after, receipts),
            daemon=True,
        )
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    ready = 0
    for pipe in pipes:
        _, n = await trio.to_thread.run_sync(pipe.recv)
        ready += n
    progress(f"{ready} receivers joined")
    connect_s = time.monotonic() - connecting
    # Connected only now: a client that sits silent while others connect gets pinged,
    # and this one does not read until it publishes.
    publisher = await RawClient.connect(host, port, token_for("publisher"))
    base = await _enter(publisher, room)
    for pipe in pipes:
        pipe.send(base)
    await trio.sleep(0.2)  # let every worker enter its receive loop
    cpu_before = cpu_seconds(server_pid) if server_pid else None
    started = time.monotonic_ns()
    progress(f"publishing {messages} messages from seq {base + 1}")
    acks = sorted(await _publish(publisher, room, messages, size, rate, window))
    progress("all published and acknowledged; waiting for the receivers")
    tally = Tally()
    for pipe in pipes:
        _, data = await trio.to_thread.run_sync(pipe.recv)
        data["latency"] = Counter({int(k): v for k, v in data["latency"].items()})
        tally.merge(Tally(**data))
    cpu = cpu_seconds(server_pid) - cpu_before if server_pid and cpu_before else None
    for proc in procs:
        proc.join(5)
    await publisher.aclose()
    seconds = (tally.last_ns - started) / 1e9 if tally.last_ns else 0.0
    return FanoutResult(
        receivers=ready,
        messages=messages,
        seconds=seconds,
        deliveries=tally.deliveries,
        lost=tally.lost + (ready * messages - tally.deliveries - tally.lost),
        duplicates=tally.duplicates,
        reordered=tally.reordered,
        p50_ms=tally.percentile(50),
        p99_ms=tally.percentile(99),
        max_ms=bucket_ms(max(tally.latency)) if tally.latency else float("nan"),
        server_cpu_s=cpu,
        connect_s=connect_s,
        receipts_sent=tally.receipts_sent,
        receipt_events=tally.receipt_events,
        ack_p50_ms=quantile(acks, 0.50) * 1000,
        ack_p99_ms=quantile(acks, 0.99) * 1000,
    )


def quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


async def _enter(client: RawClient, room: str) -> int:
    """Create the room, or join it if it exists; its head seq."""
    await client.send(Create(id=1, room=room))
    while True:
        for payload in await client.receive():
            frame = cbor2.loads(payload)
            if frame.get(TYPE_KEY) == JOINED and frame.get(K_ROOM) == room:
                return int(frame[K_SEQ])
            if frame.get(TYPE_KEY) == ERROR:
                if frame.get(K_CODE) != ErrorCode.ROOM_EXISTS:
                    raise ConnectionError(f"cannot enter {room}: {frame}")
                await client.send(Join(id=2, room=room))


async def _publish(
    client: RawClient, room: str, messages: int, size: int, rate: float, window: int
) -> list[float]:
    """Send ``messages`` with at most ``window`` awaiting their sent-ack; the ack
    latencies in seconds."""
    acked = trio.Semaphore(window)
    done = trio.Event()
    text = "x" * max(0, size - 40)  # the rest of the 100 bytes is the frame around it
    sent_at: dict[int, int] = {}
    latencies: list[float] = []

    async def count_acks() -> None:
        received = 0
        while received < messages:
            for payload in await client.receive():
                frame = cbor2.loads(payload)
                t = frame.get(TYPE_KEY)
                if t == SENT:
                    now = time.monotonic_ns()
                    latencies.append((now - sent_at.pop(frame[FIELD_KEYS["id"]])) / 1e9)
                    acked.release()
                    received += 1
                elif t == PING:
                    await client.send(Pong())
                elif t == ERROR:
                    raise RuntimeError(f"publish refused: {cbor2.loads(payload)}")
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(count_acks)
        interval = 1 / rate if rate else 0.0
        next_at = trio.current_time()
        for i in range(messages):
            await acked.acquire()
            if interval:
                next_at += interval
                await trio.sleep_until(next_at)
            now = time.monotonic_ns()
            send = Send(id=i + 2, room=room, cid=f"b{i}", text=text, data={"t": now})
            sent_at[i + 2] = now
            await client.send(send)
        await done.wait()
    return latencies
