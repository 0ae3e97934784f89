"""storage/write_behind.py against a real SQLite database, outages included."""

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
import trio.testing

from protocol.frames import Message, RoomKind
from storage.store import RoomCreated, Store, open_store
from storage.write_behind import Ticket, WriteBehind


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(f"sqlite:///{tmp_path / 'wb.db'}") as opened:
        await opened.begin_run()
        yield opened


def msg(seq: int) -> Message:
    return Message(room="r", seq=seq, ts=seq, cid=f"c{seq}", user="u", text="x")


ROOM = RoomCreated(room="r", kind=RoomKind.OPEN, owner="u", epoch="e", ts=0, members=("u",), run=1)


async def test_tickets_complete_in_order_after_commit(store: Store) -> None:
    wb = WriteBehind(store, batch_records=3)
    done: list[int] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        wb.enqueue(ROOM)
        tickets = [wb.enqueue(msg(i)) for i in range(1, 8)]
        for i, ticket in enumerate(tickets, 1):
            ticket.then(done.append, i)
        assert done == []  # nothing is acknowledged before its commit
        await wb.wait_flushed()
        assert done == list(range(1, 8))
        assert all(t.committed for t in tickets)
        assert [m.seq for m in await store.fetch_messages("r", 1, 10)] == list(range(1, 8))
        stats = wb.statistics()
        assert stats.depth == 0 and stats.flushed_records == 8 and stats.flushes >= 3
        nursery.cancel_scope.cancel()


async def test_a_failing_callback_does_not_stop_the_flusher(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    wb = WriteBehind(store)
    done: list[int] = []

    def broken(_: object) -> None:
        raise RuntimeError("a bug in a waiter")

    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        wb.enqueue(ROOM).then(broken, None)
        wb.enqueue(msg(1)).then(done.append, 1)
        await wb.wait_flushed()
        wb.enqueue(msg(2)).then(done.append, 2)
        await wb.wait_flushed()
        nursery.cancel_scope.cancel()
    assert done == [1, 2]
    assert "a commit callback failed" in caplog.text


async def test_then_on_a_committed_ticket_calls_at_once() -> None:
    ticket = Ticket(committed=True)
    seen: list[str] = []
    ticket.then(seen.append, "now")
    assert seen == ["now"]


async def test_capacity_bounds(store: Store) -> None:
    wb = WriteBehind(store, max_records=2, max_bytes=1000)
    assert wb.has_capacity()
    wb.enqueue(msg(1), 10)
    wb.enqueue(msg(2), 10)
    assert not wb.has_capacity() and wb.fill_ratio() == 1.0
    big = WriteBehind(store, max_records=100, max_bytes=100)
    big.enqueue(msg(1), 100)
    assert not big.has_capacity()


async def test_outage_keeps_everything_and_recovers(store: Store, tmp_path: Path) -> None:
    """Another connection holds the write lock: flushes fail, nothing is lost or acked
    early, and all of it lands once the lock goes."""
    wb = WriteBehind(store)
    acked: list[int] = []
    blocker = sqlite3.connect(tmp_path / "wb.db", isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    async with trio.open_nursery() as nursery:
        await nursery.start(wb.run)
        wb.enqueue(ROOM)
        for i in range(1, 51):
            wb.enqueue(msg(i)).then(acked.append, i)
        with trio.fail_after(30):
            while wb.statistics().failing_since is None:  # noqa: ASYNC110 - no event for it
                await trio.sleep(0.01)
        stats = wb.statistics()
        assert stats.depth == 51 and "locked" in (stats.last_error or "")
        assert acked == []
        blocker.execute("ROLLBACK")
        with trio.fail_after(30):
            await wb.wait_flushed()
        assert acked == list(range(1, 51))
        assert wb.statistics().failing_since is None
        assert len(await store.fetch_messages("r", 1, 100)) == 50
        nursery.cancel_scope.cancel()
    blocker.close()


async def test_wait_flushed_waits_for_the_commit(store: Store) -> None:
    wb = WriteBehind(store)
    await wb.wait_flushed()  # nothing queued: returns at once
    wb.enqueue(ROOM)
    waited = trio.Event()

    async def waiter() -> None:
        await wb.wait_flushed()
        waited.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not waited.is_set()  # no flusher yet, so no commit
        await nursery.start(wb.run)
        with trio.fail_after(10):
            await waited.wait()
        nursery.cancel_scope.cancel()
