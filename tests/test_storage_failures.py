"""A session's reads from storage that fail answer that request alone, and the session
goes on: history, a resend's lookup, the room list, a room's existence and presence get
TRY_LATER, a resume whose replay cannot be read gets ``joined`` with ``recovered: false``
(PROTOCOL.md), and the same connections are served again once storage is back. SQLite's
tables are renamed away from under the node by another connection, then renamed back.
And writes, while the write queue is full, are refused TRY_LATER."""

import sqlite3
from pathlib import Path

import pytest
import trio

from protocol.client import ServerError
from protocol.errors import ErrorCode
from protocol.frames import Joined, KvWrite, Message, Status
from tests.helpers import rename_table, run_server


async def test_failed_reads_answer_try_later_and_the_session_goes_on(tmp_path: Path) -> None:
    db = tmp_path / "parley.db"
    async with run_server(tmp_path, history_buffer=2) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            joined = await alice.create("r")
            for i in range(5):
                await alice.send("r", f"m{i}", cid=f"c{i}")
            with trio.fail_after(10):
                await server.node.write_behind.wait_flushed()
            await trio.to_thread.run_sync(rename_table, db, "messages", "messages_away")

            # Older than the room's ring (the last 2): read from storage, which fails.
            with pytest.raises(ServerError) as history:
                await alice.history("r", after=0)
            # A resend is looked up in storage first.
            with pytest.raises(ServerError) as resend:
                await alice.send("r", "m0", cid="c0", retry=True)
            # A resume from seq 1 would replay 2 and 3 from storage: not recovered.
            bob.positions["r"] = (1, joined.epoch)
            assert (await bob.join("r")).recovered is False
            assert {history.value.code, resend.value.code} == {ErrorCode.TRY_LATER}

            assert await alice.ping() >= 0 and await bob.ping() >= 0  # both sessions go on
            await trio.to_thread.run_sync(rename_table, db, "messages_away", "messages")
            page = await alice.history("r", after=0)
            assert [m.text for m in page.items] == [f"m{i}" for i in range(5)]
            assert (await alice.send("r", "m0", cid="c0", retry=True)).seq == 1
            # Bob again, on a second connection: his resume replays from storage now.
            async with server.client("bob", resume={"r": (1, joined.epoch)}) as again:
                resumed = await again.next_event(Joined)
                assert (resumed.recovered, resumed.seq) == (True, 5)
                replayed = [await again.next_event(Message) for _ in range(4)]
                assert [m.seq for m in replayed] == [2, 3, 4, 5]
            assert alice.close_code is None and bob.close_code is None

            # The room list, whether a room exists, and presence: each read fails alone.
            for table in ("rooms", "users"):
                await trio.to_thread.run_sync(rename_table, db, table, f"{table}_away")
            refusals = {}
            for name, read in {
                "rooms": alice.rooms,
                "join": lambda: alice.join("elsewhere"),
                "who": lambda: alice.who("bob"),
            }.items():
                with pytest.raises(ServerError) as refused:
                    await read()
                refusals[name] = (refused.value.code, refused.value.error.msg)
            assert refusals == {
                "rooms": (ErrorCode.TRY_LATER, "room list unavailable"),
                "join": (ErrorCode.TRY_LATER, "storage unavailable; retry"),
                "who": (ErrorCode.TRY_LATER, "presence unavailable"),
            }
            for table in ("rooms", "users"):
                await trio.to_thread.run_sync(rename_table, db, f"{table}_away", table)
            assert [r.room for r in (await alice.rooms()).items] == ["r"]
            with pytest.raises(ServerError) as missing:
                await alice.join("elsewhere")
            assert missing.value.code is ErrorCode.NOT_FOUND
            assert (await alice.who("bob"))["bob"].status is Status.ONLINE


async def test_every_write_is_refused_while_the_write_queue_is_full(tmp_path: Path) -> None:
    """Storage is behind (the database held locked by another connection, the queue full
    of puts that wait): a message, a post, a like, a follow and an interests change are
    each answered TRY_LATER, change nothing, and pass once the queue drains."""
    near = (48.86, 2.35)
    async with run_server(tmp_path, write_queue_records=2) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.create("r")
            post = (await alice.post(*near, "food", "bread")).post
            await server.node.write_behind.wait_flushed()
            blocker = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                async with trio.open_nursery() as nursery:
                    puts = [KvWrite(key=f"k{i}", hlc=i + 1, value=i) for i in range(3)]
                    nursery.start_soon(alice.kv_put, "d", *puts)
                    with trio.fail_after(10):
                        while server.node.write_behind.statistics().depth < 3:  # noqa: ASYNC110 - a message away
                            await trio.sleep(0.01)
                    writes = {
                        "send": lambda: alice.send("r", "hello", cid="c1"),
                        "post": lambda: alice.post(*near, "food", "cake", cid="p2"),
                        "like": lambda: bob.like(post),
                        "follow": lambda: bob.follow("alice"),
                        "interests": lambda: bob.set_interests("food"),
                    }
                    refusals = {}
                    for name, write in writes.items():
                        with pytest.raises(ServerError) as refused:
                            await write()
                        refusals[name] = refused.value.code
                        assert refused.value.error.msg.startswith("storage is behind")
                    assert refusals == dict.fromkeys(writes, ErrorCode.TRY_LATER)
                    blocker.execute("ROLLBACK")
            finally:
                blocker.close()
            view = await bob.feed_open(*near, 1000)
            assert [(i.post, i.likes) for i in view.items] == [(post, 0)]  # the like undone
            assert (await alice.send("r", "hello", cid="c1")).seq == 1
            assert (await alice.post(*near, "food", "cake", cid="p2")).post != post
            await bob.like(post)
            await bob.follow("alice")
            await bob.set_interests("food")
            await server.node.write_behind.wait_flushed()
        profile = await server.node.store.load_feed_profile("bob")
        assert (profile.follows, profile.interests) == (frozenset({"alice"}), frozenset({"food"}))
        async with server.client("carol") as carol:
            view = await carol.feed_open(*near, 1000)
            assert sorted(i.likes for i in view.items) == [0, 1]
