"""SIGTERM drains: goaway, stored acks delivered, 1001, exit 0; the next start resumes."""

import logging
import signal
import sqlite3
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from protocol.client import Disconnected, ParleyClient, ServerError, open_client
from protocol.codec import encode
from protocol.errors import CloseCode, ErrorCode
from protocol.frames import Error, Frame, Goaway, Hello, Joined, KvWrite, Message, Welcome
from tests.helpers import next_frame, run_server, server_process

WINDOW = 16


async def test_sigterm_drains_and_a_clean_restart_resumes(tmp_path: Path) -> None:
    # No rate limit: the sender pipelines as fast as acks come, and what this test is
    # about is the drain, not error 104.
    async with server_process(tmp_path, "--rate", "100000", "--burst", "100000") as server:
        await server.start()
        acked: dict[str, int] = {}
        async with open_client(server.url, server.token("alice")) as alice:
            await alice.create("r")
            for i in range(5):
                await alice.send("r", "early", cid=f"early{i}")
            positions = dict(alice.positions)
        async with open_client(server.url, server.token("bob")) as bob:
            await bob.join("r")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_until_closed, bob, acked)
                with trio.fail_after(30):
                    while len(acked) < 40:  # noqa: ASYNC110 - counting acks
                        await trio.sleep(0.01)
                with trio.fail_after(30):
                    assert await server.signal(signal.SIGTERM) == 0
            goaways = [e for e in drain(bob) if isinstance(e, Goaway)]
            assert goaways and goaways[0].delay is not None
            assert bob.close_code == CloseCode.GOING_AWAY
        assert "stopped cleanly" in server.log()

        await server.start()
        async with open_client(server.url, server.token("alice"), resume=positions) as alice:
            joined = await alice.next_event(Joined)
            assert joined.recovered is True  # a clean stop keeps the epoch
            replay = [await alice.next_event(Message) for _ in range(joined.seq - 5)]
            assert [m.seq for m in replay] == list(range(6, joined.seq + 1))
            stored = {m.cid: m.seq for m in replay}
            assert all(stored[cid] == seq for cid, seq in acked.items())  # every ack kept


async def send_until_closed(client: ParleyClient, acked: dict[str, int]) -> None:
    """Pipelined sends, at most WINDOW awaiting their ack, until the server goes."""
    window = trio.Semaphore(WINDOW)

    async def one(cid: str) -> None:
        try:
            acked[cid] = (await client.send("r", "late", cid=cid)).seq
        except ServerError as exc:  # refused once the node is going away
            assert exc.code is ErrorCode.TRY_LATER
        except (Disconnected, ConnectionClosed):
            pass  # the connection closed before the answer
        finally:
            window.release()

    async with trio.open_nursery() as nursery:
        i = 0
        while client.close_code is None:
            await window.acquire()
            nursery.start_soon(one, f"late{i}")
            i += 1


def drain(client: ParleyClient) -> list[Frame]:
    events = []
    while True:
        try:
            events.append(client.events.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return events


async def test_a_drain_past_its_deadline_leaves_the_run_unclean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Storage never takes the last message before the drain's deadline: the sessions
    still close (1001) at the deadline, no ack was given for it, the run is not marked
    clean, and the next start gives the room a new epoch, so a client that saw the
    unstored message is told to start over rather than trust its seq."""
    caplog.set_level(logging.INFO)
    db = tmp_path / "parley.db"
    async with run_server(tmp_path, drain_timeout=1.0) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.create("r")
            await bob.join("r")
            await alice.send("r", "stored")
            assert (await bob.next_event(Message)).seq == 1
            lock = sqlite3.connect(db, isolation_level=None, timeout=10)
            lock.execute("BEGIN IMMEDIATE")  # nothing more is stored from here
            outcome: list[str] = []

            async def send_unstored() -> None:
                try:
                    await alice.send("r", "unstored")
                    outcome.append("acked")
                except (Disconnected, ConnectionClosed):
                    outcome.append("closed")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send_unstored)
                with trio.fail_after(10):
                    assert (await bob.next_event(Message)).seq == 2  # delivered live
                positions = dict(bob.positions)
                server.shutdown.set()
            assert outcome == ["closed"]
            assert (alice.close_code, bob.close_code) == (CloseCode.GOING_AWAY,) * 2
    lock.execute("ROLLBACK")
    lock.close()
    logged = [r.getMessage() for r in caplog.records]
    assert "drain: storage did not take 1 queued records in time" in logged
    assert "stopped with records unstored" in logged

    async with run_server(tmp_path) as server, server.client("bob", resume=positions) as bob:
        joined = await bob.next_event(Joined)
        assert (joined.recovered, joined.seq) == (False, 1)  # seq 2 was never stored
        assert joined.epoch != positions["r"][1]


async def test_a_second_signal_exits_at_once_while_a_drain_waits(tmp_path: Path) -> None:
    """While a drain waits for storage, readiness says so (and that the write-behind is
    half full); a second SIGTERM ends the process at once, with status 1, as a crash
    would."""
    db = tmp_path / "parley.db"
    flags = ("--drain-timeout", "60", "--write-queue-records", "2")
    async with server_process(tmp_path, *flags) as server:
        await server.start()
        async with open_client(server.url, server.token("alice")) as alice:
            await alice.create("r")
        lock = sqlite3.connect(db, isolation_level=None, timeout=10)
        try:
            lock.execute("BEGIN IMMEDIATE")
            async with open_client(server.url, server.token("alice")) as alice:
                with trio.move_on_after(0.5):
                    await alice.send("r", "queued")  # held: storage is locked
                assert server.proc is not None
                server.proc.send_signal(signal.SIGTERM)
                ops = f"http://127.0.0.1:{server.ops_port}"
                async with httpx.AsyncClient(base_url=ops) as http:
                    with trio.fail_after(30):
                        body = (await http.get("/readyz")).json()
                        while not body["checks"]["draining"]:
                            await trio.sleep(0.05)
                            body = (await http.get("/readyz")).json()
                assert body["status"] == "Failed"
                assert body["checks"]["write_behind"]["depth"] == 1
                assert body["reasons"][0] == "draining: the node is shutting down"
                assert "write-behind: backlog at 50% of capacity" in body["reasons"]
                assert await server.signal(signal.SIGTERM) == 1
        finally:
            lock.close()
        assert "second SIGTERM: exiting without draining" in server.log()


async def test_a_draining_node_takes_no_new_write_or_session(tmp_path: Path) -> None:
    """Between goaway and the close, a send, a kv put, a post and a follow are refused
    TRY_LATER (reconnect elsewhere), and so is a hello on a connection that had not said
    one; the drain holds open here because storage is locked and a message waits to be
    stored."""
    async with run_server(tmp_path, drain_timeout=30.0) as server:
        async with (
            server.client("alice") as alice,
            server.raw() as late,
        ):
            await alice.create("r")
            lock = sqlite3.connect(tmp_path / "parley.db", isolation_level=None, timeout=10)
            lock.execute("BEGIN IMMEDIATE")
            acks: list[int] = []
            try:
                async with trio.open_nursery() as nursery:

                    async def queued() -> None:
                        acks.append((await alice.send("r", "queued")).seq)

                    nursery.start_soon(queued)
                    with trio.fail_after(10):
                        while not server.node.write_behind.statistics().depth:  # noqa: ASYNC110 - a message away
                            await trio.sleep(0.01)
                    server.shutdown.set()
                    with trio.fail_after(10):
                        await alice.next_event(Goaway)
                    refusals = []
                    for write in (
                        lambda: alice.send("r", "later"),
                        lambda: alice.kv_put("d", KvWrite(key="k", hlc=1, value=1)),
                        lambda: alice.post(48.86, 2.35, "news", "later"),
                        lambda: alice.follow("bob"),
                    ):
                        with pytest.raises(ServerError) as refused:
                            await write()
                        refusals.append((refused.value.code, refused.value.error.msg))
                    assert (
                        refusals == [(ErrorCode.TRY_LATER, "server is going away; reconnect")] * 4
                    )
                    await late.send_message(encode(Hello(v=1, token=server.token("bob"))))
                    with trio.fail_after(10):
                        while not isinstance(frame := await next_frame(late), Error):
                            assert not isinstance(frame, Welcome)
                    assert (frame.code, frame.msg) == (ErrorCode.TRY_LATER, "server is going away")
                    lock.execute("ROLLBACK")
            finally:
                lock.close()
            assert acks == [1]  # stored in the end, and acked before the close
            with trio.fail_after(10):
                while alice.close_code is None:  # noqa: ASYNC110 - the close is a network event
                    await trio.sleep(0.01)
            assert alice.close_code == CloseCode.GOING_AWAY
