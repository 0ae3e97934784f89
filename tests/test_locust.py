"""The Locust scenarios: the delivery check on its own, then `locust --headless` with every
user class against a real server, alone and as a master with two workers."""

import contextlib
import csv
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Request

from loadtests.backoff import Backoff
from loadtests.cli import free_port
from loadtests.delivery import MAX_MISSING, Counts, DeliveryCheck, Verdict
from protocol.codec import encode
from protocol.frames import (
    Frame,
    Hello,
    History,
    Join,
    Joined,
    Message,
    Ok,
    Page,
    RoomKind,
    Send,
    Sent,
    Welcome,
)
from tests.helpers import ADMIN, SECRET, server_process

ROOT = Path(__file__).resolve().parent.parent

# Every request the scenarios make, as Locust's CSV names them ("Type", "Name").
REQUESTS = {
    ("session", "connect"),
    ("session", "hello→welcome"),
    ("session", "resume→joined"),
    ("chat", "join→joined"),
    ("chat", "send→sent"),
    ("chat", "receipt→ok"),
    ("chat", "history→page"),
    ("presence", "watch→presencelist"),
    ("presence", "setstatus→ok"),
    ("presence", "who→presencelist"),
    ("kv", "kvput→kvack"),
    ("kv", "kvsync→kvchanges"),
    ("kv", "devices converge"),
    ("deliver", "message: small rooms"),
    ("deliver", "message: large room"),
    ("deliver", "message: resumed"),
    ("replay", "message: resumed"),
}


# --- the delivery check -------------------------------------------------------------------


def test_in_order_deliveries_are_counted_and_nothing_else() -> None:
    check = DeliveryCheck()
    check.joined("r", 5, None)
    assert [check.message("r", s) for s in (6, 7, 8)] == [Verdict.IN_ORDER] * 3
    assert check.finish("r", 8) == 0
    assert check.counts == Counts(delivered=3)


def test_a_gap_then_its_late_seq_is_reordered_and_the_rest_lost_at_the_end() -> None:
    check = DeliveryCheck()
    check.joined("r", 0, None)
    assert check.message("r", 1) is Verdict.IN_ORDER
    assert check.message("r", 4) is Verdict.GAP  # 2 and 3 missing
    assert check.message("r", 3) is Verdict.REORDERED
    assert check.message("r", 3) is Verdict.DUPLICATE
    assert check.message("r", 4) is Verdict.DUPLICATE
    assert not check.caught_up("r", 4)  # 2 is still missing
    assert check.finish("r", 6) == 3  # 2, and the tail 5 and 6
    assert check.counts == Counts(delivered=3, duplicated=2, reordered=1, lost=3)
    assert check.message("r", 7) is Verdict.UNTRACKED  # finished: no longer checked


def test_resumes_keep_the_position_or_skip_what_they_cannot_replay() -> None:
    check = DeliveryCheck()
    check.joined("r", 10, None)
    check.message("r", 11)
    assert check.positions() == {"r": 11}
    check.joined("r", 15, True)  # recovered: 12..15 replayed next
    assert [check.message("r", s) for s in range(12, 16)] == [Verdict.IN_ORDER] * 4
    check.joined("r", 40, False)  # not recovered: 16..40 skipped, live from 41
    assert check.message("r", 41) is Verdict.IN_ORDER
    assert check.counts == Counts(delivered=6, unrecovered=25)


def test_a_huge_gap_is_counted_lost_without_remembering_each_seq() -> None:
    check = DeliveryCheck()
    check.joined("r", 0, None)
    assert check.message("r", MAX_MISSING + 10) is Verdict.GAP
    assert check.counts.lost == MAX_MISSING + 9
    assert check.finish("r", MAX_MISSING + 10) == 0


def test_counts_add_up_and_take_resets() -> None:
    a = Counts(delivered=2, lost=1)
    b = a.take()
    assert a == Counts() and b == Counts(delivered=2, lost=1) and b.faults == 1
    a.add(b)
    a.add(Counts(duplicated=4))
    assert a == Counts(delivered=2, duplicated=4, lost=1) and a.faults == 5


@given(st.lists(st.integers(1, 40), max_size=80), st.integers(0, 45))
def test_check_matches_a_brute_force_count(arrivals: list[int], newest: int) -> None:
    """Whatever order seqs arrive in: each seq is delivered once or is lost, every arrival
    of a seq seen already is a duplicate, and one that came after a higher seq (while
    missing) is reordered."""
    check = DeliveryCheck()
    check.joined("r", 0, None)
    for seq in arrivals:
        check.message("r", seq)
    newest = max([newest, *arrivals])
    lost = check.finish("r", newest)
    distinct = set(arrivals)
    assert check.counts.delivered == len(distinct)
    assert check.counts.duplicated == len(arrivals) - len(distinct)
    assert lost == check.counts.lost == newest - len(distinct)
    reordered = 0
    highest = 0
    seen: set[int] = set()
    for seq in arrivals:
        if seq not in seen and seq < highest:
            reordered += 1
        seen.add(seq)
        highest = max(highest, seq)
    assert check.counts.reordered == reordered


# --- when a session may reconnect ----------------------------------------------------------


def test_backoff_doubles_with_jitter_up_to_its_ceiling_and_resets() -> None:
    backoff = Backoff(rng=random.Random(7))
    waits = []
    for _ in range(10):
        backoff.failed(now=0.0)
        waits.append(backoff.wait(0.0))
        backoff.retry_at = 0.0  # as if the wait had passed
    nominal = [min(30.0, 0.5 * 2**i) for i in range(10)]
    assert all(n / 2 <= w <= n for w, n in zip(waits, nominal, strict=True)), waits
    assert max(waits) > 15  # it reached the ceiling's range
    backoff.succeeded()
    backoff.failed(now=100.0)
    assert 100.25 <= backoff.retry_at <= 100.5


def test_the_servers_wait_is_kept_and_spread() -> None:
    backoff = Backoff(rng=random.Random(1))
    backoff.server_asks(now=0.0, seconds=10)  # Retry-After: 10, or a goaway's delay
    assert 10 <= backoff.retry_at <= 15
    asked = backoff.retry_at
    backoff.failed(now=0.0)  # a failed attempt does not shorten it
    assert backoff.retry_at == asked and backoff.wait(asked - 4) == pytest.approx(4)
    assert backoff.wait(asked + 1) == 0


# --- Locust against a real server ---------------------------------------------------------


def locust(server_port: int, ops_port: int, *extra: str, files: str = "") -> list[str]:
    """The Locust command line of these tests; ``extra`` may name the tokens."""
    tokens = () if "--parley-token-file" in extra else ("--parley-secret", SECRET)
    return [
        sys.executable,
        "-m",
        "locust",
        "-f",
        "loadtests/locustfile.py" + files,
        "--host",
        f"ws://127.0.0.1:{server_port}",
        *tokens,
        "--parley-admin-token",
        ADMIN,
        "--parley-admin-url",
        f"http://127.0.0.1:{ops_port}",
        "--parley-prefix",
        "t",
        "--parley-pairs",
        "4",
        "--parley-groups",
        "2",
        "--parley-think",
        "0.1",
        "--parley-storm-every",
        "2",
        "--parley-drain",
        "3",
        "--only-summary",
        *extra,
    ]


def stats_rows(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv") as f:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}
    rows.pop(("", "Aggregated"))
    return rows


def parley_counts(prefix: Path) -> dict[str, int]:
    with open(f"{prefix}_parley.csv") as f:
        return {k: int(v) for k, v in next(csv.DictReader(f)).items()}


async def run(command: list[str]) -> str:
    with trio.fail_after(60):
        done = await trio.run_process(
            command, cwd=ROOT, capture_stdout=True, capture_stderr=True, check=False
        )
    out = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, out
    return out


@pytest.mark.slow
async def test_every_scenario_runs_clean_against_a_real_server(tmp_path: Path) -> None:
    async with server_process(tmp_path) as server:
        await server.start()
        prefix = tmp_path / "run"
        out = await run(
            [
                *locust(server.port, server.ops_port),
                *("--headless", "-u", "14", "-r", "14", "-t", "8s", "--csv", str(prefix)),
            ]
        )
    rows = stats_rows(prefix)
    succeeded = {k for k, r in rows.items() if int(r["Request Count"]) > int(r["Failure Count"])}
    assert REQUESTS - succeeded == set(), out
    assert sum(int(r["Failure Count"]) for r in rows.values()) == 0, out
    counts = parley_counts(prefix)
    assert counts["delivered"] > 0
    assert counts["lost"] == counts["duplicated"] == counts["reordered"] == 0
    assert counts["unrecovered"] == 0
    assert "parley deliveries:" in out


@pytest.mark.slow
async def test_a_master_adds_up_its_workers(tmp_path: Path) -> None:
    async with server_process(tmp_path) as server, trio.open_nursery() as nursery:
        await server.start()
        prefix = tmp_path / "dist"
        master_port = free_port()
        outputs: list[str] = []

        async def worker() -> None:
            # A worker takes the run's options from the master.
            command = [sys.executable, "-m", "locust", "-f", "loadtests/locustfile.py"]
            outputs.append(await run([*command, "--worker", "--master-port", str(master_port)]))

        for _ in range(2):
            nursery.start_soon(worker)
        # Tokens from a file this time; the workers read the path from the master.
        token_file = tmp_path / "tokens"
        token_file.write_text("".join(f"u{i} {server.token(f'u{i}')}\n" for i in range(40)))
        master = [
            *locust(server.port, server.ops_port, "--parley-token-file", str(token_file)),
            *("--master", "--master-bind-port", str(master_port), "--expect-workers", "2"),
            *("--headless", "-u", "14", "-r", "14", "-t", "6s", "--csv", str(prefix)),
        ]
        master_out = await run(master)
    assert len(outputs) == 2
    totals = [
        json.loads(m.group(1))
        for out in outputs
        for m in re.finditer(r"parley worker totals: (\{.*\})", out)
    ]
    assert len(totals) == 2, outputs
    assert all(t["requests"] for t in totals), totals  # both workers ran users
    rows = stats_rows(prefix)
    master_requests = {f"{t} {n}": int(r["Request Count"]) for (t, n), r in rows.items()}
    worker_requests: dict[str, int] = {}
    for t in totals:
        for key, n in t["requests"].items():
            worker_requests[key] = worker_requests.get(key, 0) + n
    assert master_requests == worker_requests, master_out
    counts = parley_counts(prefix)
    for key, value in counts.items():
        assert value == sum(t["counts"][key] for t in totals), key
    assert counts["delivered"] > 0 and counts["lost"] == 0


@pytest.mark.slow
async def test_the_step_and_spike_shapes_run_their_course(tmp_path: Path) -> None:
    """The shapes end the run themselves and log each step's (each phase's) p99; the
    target is out of reach here, so the step shape runs to its last step."""
    async with server_process(tmp_path) as server, trio.open_nursery() as nursery:
        await server.start()
        logs: dict[str, str] = {}

        async def shape(name: str, *options: str) -> None:
            command = locust(server.port, server.ops_port, files=f",loadtests/{name}.py")
            logs[name] = await run([*command, "--headless", "SmallRoomChatter", *options])

        nursery.start_soon(
            shape, "step_shape", "--step-users", "2", "--step-seconds", "2", "--step-max", "6",
            "--step-p99-ms", "1000000",
        )  # fmt: skip
        nursery.start_soon(
            shape, "spike_shape", "--spike-base", "1", "--spike-peak", "4", "--spike-at", "2",
            "--spike-seconds", "2", "--spike-rate", "10",
        )  # fmt: skip
    step = logs["step_shape"]
    assert [int(n) for n in re.findall(r"step \d+: (\d+) users: worst p99", step)] == [2, 4, 6]
    assert "every step up to 6 users met the target" in step
    spike = logs["spike_shape"]
    assert re.findall(r"spike, (\w+): worst p99", spike) == ["before", "during", "after"]


# --- a server that loses and repeats messages: the run must fail ------------------------


class FaultyRoomServer:
    """Just enough of Parley for ``SmallRoomChatter``, over real sockets, with two faults:
    every third message gets a seq one past the next (the skipped seq is never sent:
    lost), and every fifth is delivered twice (duplicated). Its admin endpoint answers
    every request 201."""

    def __init__(self) -> None:
        self.seqs: dict[str, int] = {}
        self.members: dict[str, list[tuple[trio.abc.Stream, WSConnection]]] = {}
        self.locks: dict[trio.abc.Stream, trio.Lock] = {}  # a room's sends reach any stream
        self.sent = 0

    async def admin(self, stream: trio.abc.Stream) -> None:
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buffer += chunk
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                while len(buffer) < length:
                    buffer += await stream.receive_some(65536)
                buffer = buffer[length:]
                await stream.send_all(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n")

    async def client(self, stream: trio.abc.Stream) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self.session(stream)

    async def session(self, stream: trio.abc.Stream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        async with stream:
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                ws.receive_data(bytes(data))
                for event in ws.events():
                    if isinstance(event, Request):
                        accept = AcceptConnection(subprotocol="parley.v1")
                        await stream.send_all(ws.send(accept))
                    elif isinstance(event, BytesMessage):
                        await self.frame(stream, ws, cbor2.loads(event.data))
                    elif isinstance(event, CloseConnection):
                        await stream.send_all(ws.send(event.response()))
                        return

    async def frame(self, stream: trio.abc.Stream, ws: WSConnection, f: dict[int, Any]) -> None:
        async def out(frame: Frame, to: tuple[trio.abc.Stream, WSConnection] = (stream, ws)):
            async with self.locks.setdefault(to[0], trio.Lock()):
                await to[0].send_all(to[1].send(BytesMessage(data=encode(frame))))

        kind = f[0]
        rid: Any = f.get(1)
        room: Any = f.get(2)
        if kind == Hello.TYPE:
            await out(Welcome(session="s", user="u", v=1, ping=25, ts=0, limits={}))
        elif kind == Join.TYPE:
            self.members.setdefault(room, []).append((stream, ws))
            seq = self.seqs.get(room, 0)
            await out(Joined(id=rid, room=room, kind=RoomKind.OPEN, seq=seq, epoch="e"))
        elif kind == Send.TYPE:
            self.sent += 1
            seq = self.seqs[room] = self.seqs.get(room, 0) + (2 if self.sent % 3 == 0 else 1)
            message = Message(room=room, seq=seq, ts=0, cid=f[6], user="u", text=f.get(7))
            for member in self.members[room] * (2 if self.sent % 5 == 0 else 1):
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await out(message, member)
            await out(Sent(id=rid, room=room, cid=f[6], seq=seq, ts=0))
        elif kind == History.TYPE:
            seq = self.seqs.get(room, 0)
            items = (Message(room=room, seq=seq, ts=0, cid="c", text="t"),) if seq else ()
            await out(Page(id=rid, room=room, epoch="e", items=items))
        elif rid is not None:
            await out(Ok(id=rid))


@pytest.mark.slow
async def test_a_server_that_loses_and_repeats_messages_fails_the_run(tmp_path: Path) -> None:
    server = FaultyRoomServer()
    async with trio.open_nursery() as nursery:
        ws_port, admin_port = free_port(), free_port()
        await nursery.start(trio.serve_tcp, server.client, ws_port)
        await nursery.start(trio.serve_tcp, server.admin, admin_port)
        prefix = tmp_path / "faulty"
        command = [
            *locust(ws_port, admin_port),
            *("--headless", "SmallRoomChatter", "-u", "4", "-r", "4", "-t", "4s"),
            *("--csv", str(prefix)),
        ]
        with trio.fail_after(60):
            done = await trio.run_process(command, cwd=ROOT, capture_stdout=True, check=False)
        nursery.cancel_scope.cancel()
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 1, out
    assert "parley: FAILED" in out
    counts = parley_counts(prefix)
    assert counts["lost"] > 0 and counts["duplicated"] > 0, counts
    failures = stats_rows(prefix)[("deliver", "message: small rooms")]["Failure Count"]
    assert int(failures) >= counts["lost"] + counts["duplicated"]
