"""The load generator's worker: many WebSocket clients in one process on one epoll loop.

Built to cost the load side as little as possible per frame: no event-loop framework, no
WebSocket library after the handshake, no decoding of delivered messages (the marker is
found in the raw bytes, see ``loadtests.wire``). A worker connects its share of the
clients, reports ready, publishes and receives on ``go``, reports what it saw, and holds
its connections open until told to close (so the idle benchmark can read the server's
memory with every session up).
"""

import errno
import heapq
import math
import multiprocessing.connection
import resource
import select
import socket
import time
from array import array
from collections import Counter, deque
from typing import Any

import attrs

from loadtests.wire import WIRES, Control, Ident, Wire
from protocol.wsframe import parse_server_frames

RECV_BYTES = 1 << 18
IN, OUT, ERR = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR | select.EPOLLHUP


@attrs.define
class Plan:
    """What one worker does (sent to it, so plain data)."""

    wire: str
    host: str
    port: int
    idents: list[Ident]
    handshakes: int = 100  # in flight at once
    publish: int = 0  # messages each publishing connection sends
    publishers: int = 0  # the first this many connections publish
    window: int = 256  # publishes awaiting their ack, per connection
    rate: float = 0.0  # messages/s per publishing connection; 0 = as fast as acked
    size: int = 100
    expect: int = 0  # messages each connection should receive from its sender(s)
    receipts: bool = False  # answer every delivery with a receipt
    timeout: float = 120.0
    # Connect only when told "connect": a reconnect storm's processes are started (and
    # their imports done) before the node they replace is killed.
    connect_on_signal: bool = False


@attrs.define
class Tally:
    """What one worker saw; ``merge`` adds another's."""

    connected: int = 0
    failed: int = 0
    connect_s: float = 0.0
    deliveries: int = 0
    duplicates: int = 0
    lost: int = 0
    gaps: int = 0
    reordered: int = 0
    published: int = 0
    acked: int = 0
    receipts_sent: int = 0
    receipt_events: int = 0
    first_ns: int = 0
    last_ns: int = 0
    cpu_s: float = 0.0
    errors: list[str] = attrs.field(factory=list)
    latency: Counter[int] = attrs.field(factory=Counter)  # log buckets, see ``bucket``
    ack_latency: Counter[int] = attrs.field(factory=Counter)
    # connect() to the last frame of the opening (hello, and join if any), per session
    connect_latency: Counter[int] = attrs.field(factory=Counter)

    def merge(self, other: "Tally") -> None:
        for field in attrs.fields(Tally):
            mine, theirs = getattr(self, field.name), getattr(other, field.name)
            if field.name == "first_ns":
                self.first_ns = min(x for x in (mine, theirs) if x) if mine or theirs else 0
            elif field.name == "last_ns":
                self.last_ns = max(mine, theirs)
            elif field.name == "connect_s":
                self.connect_s = max(mine, theirs)
            elif field.name == "errors":
                self.errors = (mine + theirs)[:20]
            elif isinstance(mine, Counter):
                mine.update(theirs)
            else:
                setattr(self, field.name, mine + theirs)


# Latencies go into buckets 1 % wide on a log scale from 1 µs: exact enough, and the
# histogram of millions of deliveries stays a few hundred entries.
_LOG_STEP = math.log(1.01)


def bucket(latency_ns: int) -> int:
    return int(math.log(max(latency_ns, 1000) / 1000) / _LOG_STEP)


def bucket_ms(index: int) -> float:
    return math.exp((index + 0.5) * _LOG_STEP) / 1000


def percentile(hist: Counter[int], p: float) -> float:
    total = sum(hist.values())
    if not total:
        return float("nan")
    rank, seen = p / 100 * total, 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return bucket_ms(index)
    return bucket_ms(max(hist))


def _histogram(values: array) -> Counter[int]:  # type: ignore[type-arg]
    return Counter(bucket(v) for v in values)


class Conn:
    __slots__ = (
        "buf",
        "connect_ns",
        "expected",
        "fd",
        "fifo",
        "ident",
        "inflight",
        "mine",
        "next_at",
        "opening",
        "out",
        "publishing",
        "seen",
        "sent",
        "sent_at",
        "sock",
        "state",
    )

    def __init__(self, ident: Ident, expect: int) -> None:
        self.ident = ident
        self.mine = str(ident.src).encode()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()
        self.connect_ns = 0
        self.buf = b""
        self.out = bytearray()
        self.state = 0  # 0 connecting, 1 upgrading, 2 opening, 3 ready, -1 gone
        self.opening: Any = None
        self.expected = 1
        self.seen = bytearray(expect + 1)
        self.sent = 0
        self.inflight = 0
        self.sent_at: dict[int, int] = {}
        self.fifo: deque[int] = deque()
        self.next_at = 0
        self.publishing = False


class Worker:
    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.wire: Wire = WIRES[plan.wire]()
        self.conns = [Conn(ident, plan.expect) for ident in plan.idents]
        self.by_fd: dict[int, Conn] = {}
        self.ep = select.epoll()
        self.tally = Tally()
        self.latencies = array("q")
        self.ack_latencies = array("q")
        self.receiving = 0  # connections still waiting for their last expected message
        self.unacked = 0  # publishes not yet acked, over all connections
        self.running = False

    # --- sending ------------------------------------------------------------------------

    def send(self, c: Conn, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            self.fail(c, f"send: {exc}")
            return
        if n < len(data):
            c.out += data[n:]
            self.ep.modify(c.fd, IN | OUT)

    def flush(self, c: Conn) -> None:
        try:
            n = c.sock.send(c.out)
        except BlockingIOError:
            return
        except OSError as exc:
            self.fail(c, f"send: {exc}")
            return
        del c.out[:n]
        if not c.out:
            self.ep.modify(c.fd, IN)

    def fail(self, c: Conn, why: str) -> None:
        if c.state == -1:
            return
        if len(self.tally.errors) < 20:
            self.tally.errors.append(f"{c.ident.user}: {why}")
        if c.state != 3:
            self.tally.failed += 1
        elif self.running:  # stop waiting for what this connection will never see
            if self.plan.expect and c.expected <= self.plan.expect and not c.seen[-1]:
                self.receiving -= 1
            if c.publishing:
                self.unacked -= len(c.sent_at) + max(0, self.plan.publish - c.sent)
        c.state = -1
        self.by_fd.pop(c.fd, None)
        try:
            self.ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()

    # --- connecting ---------------------------------------------------------------------

    def connect(self) -> None:
        plan, started = self.plan, time.monotonic()
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        deadline = started + plan.timeout
        waiting = deque(self.conns)
        opening = 0
        connect_times = array("q")
        host = f"{plan.host}:{plan.port}"
        while (waiting or opening) and time.monotonic() < deadline:
            while waiting and opening < plan.handshakes:
                c = waiting.popleft()
                c.connect_ns = time.monotonic_ns()
                err = c.sock.connect_ex((plan.host, plan.port))
                if err not in (0, errno.EINPROGRESS):
                    self.fail(c, f"connect: {errno.errorcode.get(err, err)}")
                    continue
                self.by_fd[c.fd] = c
                self.ep.register(c.fd, OUT | ERR)
                opening += 1
            for fd, events in self.ep.poll(0.5):
                conn = self.by_fd.get(fd)
                if conn is None:
                    continue
                c = conn
                before = c.state
                if c.state == 0:
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        self.fail(c, f"connect: {errno.errorcode.get(err, err)}")
                    else:
                        c.state = 1
                        self.ep.modify(fd, IN)
                        self.send(c, self.wire.request(c.ident, host))
                elif events & OUT and c.out:
                    self.flush(c)
                else:
                    self.read_opening(c)
                if before != c.state and c.state in (3, -1):
                    opening -= 1
                    if c.state == 3:
                        connect_times.append(time.monotonic_ns() - c.connect_ns)
        for c in waiting:
            self.fail(c, "not connected before the timeout")
        for c in self.conns:
            if c.state in (0, 1, 2):
                self.fail(c, "handshake not finished before the timeout")
        self.tally.connected = sum(1 for c in self.conns if c.state == 3)
        self.tally.connect_s = time.monotonic() - started
        self.tally.connect_latency = _histogram(connect_times)
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.tally.cpu_s = after.ru_utime - cpu.ru_utime + after.ru_stime - cpu.ru_stime

    def read_opening(self, c: Conn) -> None:
        data = self._recv(c, "closed while opening")
        if data is None:
            return
        if c.state == 1:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                c.buf = data
                return
            status = data[: data.find(b"\r\n")]
            if b" 101 " not in status:
                self.fail(c, f"upgrade refused: {status.decode(errors='replace')}")
                return
            data = data[end + 4 :]
            c.state = 2
            c.opening = self.wire.opening(c.ident)
            try:
                for frame in next(c.opening):
                    self.send(c, frame)
            except StopIteration:
                c.state = 3
        frames, used = parse_server_frames(data)
        c.buf = data[used:]
        for opcode, payload in frames:
            if c.state != 2:
                break
            try:
                for out in c.opening.send((opcode, payload)):
                    self.send(c, out)
            except StopIteration:
                c.state = 3
                c.opening = None
            except ConnectionError as exc:
                self.fail(c, str(exc))

    # --- publishing and receiving -------------------------------------------------------

    def publish_one(self, c: Conn) -> None:
        c.sent += 1
        c.inflight += 1
        now = time.monotonic_ns()
        c.sent_at[c.sent] = now
        if self.wire.acks_receipts:
            c.fifo.append(c.sent)
        self.send(c, self.wire.publish(c.ident, c.sent, now, self.plan.size))

    def on_control(self, c: Conn, ctl: Control, now: int) -> None:
        if ctl.reply is not None:
            self.send(c, ctl.reply)
        if ctl.receipt_event:
            self.tally.receipt_events += 1
        if ctl.error is not None:
            self.fail(c, ctl.error)
        seq = ctl.ack
        if seq is None:
            return
        if seq == 0:
            if not c.fifo:
                return
            seq = c.fifo.popleft()
            if seq == 0:  # a receipt's ack
                return
        sent = c.sent_at.pop(seq, None)
        if sent is None:
            return
        self.ack_latencies.append(now - sent)
        c.inflight -= 1
        self.unacked -= 1
        if not self.plan.rate and c.sent < self.plan.publish:
            self.publish_one(c)

    def run(self) -> None:
        plan, tally = self.plan, self.tally
        ready = [c for c in self.conns if c.state == 3]
        publishers = ready[: plan.publishers]
        for c in publishers:
            c.publishing = True
        self.unacked = plan.publish * len(publishers)
        self.receiving = len(ready) if plan.expect else 0
        self.running = True
        cpu = resource.getrusage(resource.RUSAGE_SELF)
        started = time.monotonic_ns()
        deadline = time.monotonic() + plan.timeout
        timers: list[tuple[int, int, Conn]] = []
        interval = int(1e9 / plan.rate) if plan.rate else 0
        for i, c in enumerate(publishers):
            if interval:
                c.next_at = started + interval * i // max(1, len(publishers))
                timers.append((c.next_at, i, c))
            else:
                for _ in range(min(plan.window, plan.publish)):
                    self.publish_one(c)
        heapq.heapify(timers)
        while (self.receiving > 0 or self.unacked > 0) and time.monotonic() < deadline:
            timeout = self._publish_due(timers, interval) if timers else 0.1
            for fd, events in self.ep.poll(timeout):
                conn = self.by_fd.get(fd)
                if conn is None:
                    continue
                if events & OUT and conn.out:
                    self.flush(conn)
                if events & (IN | ERR):
                    data = self._recv(conn, "closed by the server")
                    if data:
                        now = time.monotonic_ns()
                        self._take_frames(conn, data, now)
                        if not tally.first_ns:
                            tally.first_ns = now
                        tally.last_ns = now
        after = resource.getrusage(resource.RUSAGE_SELF)
        tally.cpu_s = after.ru_utime - cpu.ru_utime + after.ru_stime - cpu.ru_stime
        tally.published = sum(c.sent for c in publishers)
        tally.acked = tally.published - sum(c.inflight for c in publishers)
        tally.lost = sum(plan.expect - c.seen.count(1) for c in ready) if plan.expect else 0
        tally.latency = _histogram(self.latencies)
        tally.ack_latency = _histogram(self.ack_latencies)

    def _publish_due(self, timers: list[tuple[int, int, "Conn"]], interval: int) -> float:
        """Publish what the fixed rate says is due; seconds until the next is."""
        now = time.monotonic_ns()
        while timers and timers[0][0] <= now:
            _, i, c = heapq.heappop(timers)
            if c.state == 3 and c.inflight < self.plan.window:
                self.publish_one(c)
            if c.sent < self.plan.publish:
                c.next_at += interval
                heapq.heappush(timers, (c.next_at, i, c))
        return max(0.0, (timers[0][0] - time.monotonic_ns()) / 1e9) if timers else 0.1

    def _recv(self, c: Conn, closed: str) -> bytes | None:
        """What the socket has, after what was left of the last read; None if nothing
        (the connection failed if it is gone)."""
        try:
            data = c.sock.recv(RECV_BYTES)
        except BlockingIOError:
            return None
        except OSError as exc:
            self.fail(c, f"recv: {exc}")
            return None
        if not data:
            self.fail(c, closed)
            return None
        return c.buf + data if c.buf else data

    def _take_frames(self, c: Conn, data: bytes, now: int) -> None:
        """Count and time every delivery in ``data``; keep an incomplete frame in
        ``c.buf``. The frame headers are read here rather than with
        ``protocol.wsframe.parse_server_frames``, which copies every payload: this loop
        is the load generator's whole cost per delivery."""
        wire, tally, expect = self.wire, self.tally, self.plan.expect
        mine, seen = c.mine, c.seen
        pos, end = 0, len(data)
        while end - pos >= 2:
            n = data[pos + 1] & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 4], "big")
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            start, stop = pos + head, pos + head + n
            if stop > end:
                break
            pos = stop
            found = None
            i = data.find(b"~@", start, stop)
            if i >= 0:  # the usual case inline; _find_marker says why every part is checked
                j = data.find(b"@~", i + 2, stop)
                parts = data[i + 2 : j].split(b".") if j > 0 else []
                if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                    if parts[2].isdigit():
                        found = parts[0], int(parts[1]), int(parts[2])
                if found is None:
                    found = _find_marker(data, i + 1, stop)
            if found is None:
                self.on_control(c, wire.control(data[start - head] & 0x0F, data[start:stop]), now)
                continue
            src, seq, sent_ns = found
            if src == mine:
                continue  # our own message back (Parley sends it to every subscriber)
            self.latencies.append(now - sent_ns)
            if seq > expect or seen[seq]:
                tally.duplicates += 1
                if len(tally.errors) < 20:
                    tally.errors.append(f"{c.ident.user}: seq {seq} of {src!r} again")
                continue
            seen[seq] = 1
            tally.deliveries += 1
            if seq == c.expected:
                c.expected += 1
            elif seq > c.expected:
                tally.gaps += 1
                c.expected = seq + 1
            else:
                tally.reordered += 1
            if seq == expect:
                self.receiving -= 1
            if self.plan.receipts:
                receipt = wire.receipt(c.ident, data[start:stop])
                if receipt is not None:
                    tally.receipts_sent += 1
                    if wire.acks_receipts:
                        c.fifo.append(0)
                    self.send(c, receipt)
        c.buf = data[pos:] if pos < end else b""

    def close(self) -> None:
        for c in self.conns:
            if c.state != -1:
                c.sock.close()
        self.ep.close()


def _find_marker(data: bytes, start: int, stop: int) -> tuple[bytes, int, int] | None:
    """The first well-formed marker in ``data[start:stop]``: its sender number (as
    bytes), sequence number and send time; None if there is none. Every part must be
    digits: a message's binary header can hold "~@" by chance (its ``ts``, a CBOR uint64
    of milliseconds, has 7e 40 as its two low bytes for one millisecond in every
    65.536 s), and the bytes from there to the real marker must not pass for a sender:
    that made a user's own echoed message count as its peer's, once, as a duplicate."""
    while (i := data.find(b"~@", start, stop)) >= 0:
        end = data.find(b"@~", i + 2, stop)
        if end < 0:
            return None
        parts = data[i + 2 : end].split(b".")
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit() and parts[2].isdigit():
            return parts[0], int(parts[1]), int(parts[2])
        start = i + 1
    return None


def worker_main(pipe: multiprocessing.connection.Connection, plan: Plan) -> None:
    """A worker process: connect (on ``connect`` if the plan says so), say ready, run on
    ``go``, say done, close on ``close``."""
    worker = Worker(plan)
    try:
        if plan.connect_on_signal:
            pipe.send(("started", worker.tally))
            if pipe.recv() != "connect":
                return
        worker.connect()
        pipe.send(("ready", worker.tally))
        if pipe.recv() == "go":
            worker.run()
            pipe.send(("done", worker.tally))
            pipe.recv()
    finally:
        worker.close()
