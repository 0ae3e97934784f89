"""Fencing in a shared PostgreSQL database: a node that lost an actor to another cannot
write for it, and a room taken from a node that never let it go gets a new epoch."""

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import pytest
import trio

from protocol.frames import Message, RoomKind
from storage.store import (
    Fence,
    MemberChanged,
    RoomCreated,
    RoomReleased,
    StorageConfigError,
    Store,
    open_store,
)
from storage.write_behind import WriteBehind


def msg(seq: int, text: str) -> Message:
    return Message(room="r", seq=seq, ts=seq, cid=f"c{seq}-{text}", user="u", text=text)


def created(run: int) -> RoomCreated:
    return RoomCreated(
        room="r", kind=RoomKind.OPEN, owner="u", epoch="e0", ts=0, members=("u",), run=run
    )


@pytest.fixture
async def two_nodes(postgres_url: str) -> AsyncIterator[tuple[Store, Store]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_store(postgres_url))
        b = await stack.enter_async_context(open_store(postgres_url))
        yield a, b


async def test_a_stale_owner_cannot_write_and_is_told(two_nodes: tuple[Store, Store]) -> None:
    a, b = two_nodes
    run_a = (await a.begin_run(shared=True)).run
    run_b = (await b.begin_run(shared=True)).run
    claim_a = await a.claim("room", "r", run_a)
    fence_a = Fence("room", "r", claim_a.token)
    assert await a.write_batch([created(run_a), msg(1, "a")], [fence_a, fence_a]) == frozenset()
    await a.load_room("r", run_a, 10)  # marks it held by run_a

    claim_b = await b.claim("room", "r", run_b)
    assert claim_b.token > claim_a.token
    assert claim_b.rotated  # run_a never let it go: it may have delivered unstored messages
    fence_b = Fence("room", "r", claim_b.token)

    # The old owner's next batch: its records are refused, the rest of the batch lands.
    other = MemberChanged(room="elsewhere", user="x", added=True, ts=1)
    stale = await a.write_batch([msg(2, "stale"), other], [fence_a, None])
    assert stale == {fence_a}
    assert await b.write_batch([msg(2, "fresh")], [fence_b]) == frozenset()

    snapshot = await b.load_room("r", run_b, 10)
    assert snapshot is not None
    assert [m.text for m in snapshot.recent] == ["a", "fresh"]
    assert snapshot.epoch != "e0"
    assert await b.find_message("r", "u", "c2-stale") is None


async def test_a_room_let_go_cleanly_keeps_its_epoch(two_nodes: tuple[Store, Store]) -> None:
    a, b = two_nodes
    run_a = (await a.begin_run(shared=True)).run
    run_b = (await b.begin_run(shared=True)).run
    fence_a = Fence("room", "r", (await a.claim("room", "r", run_a)).token)
    await a.write_batch([created(run_a), RoomReleased(room="r", run=run_a)], [fence_a, fence_a])
    claim = await b.claim("room", "r", run_b)
    assert not claim.rotated
    snapshot = await b.load_room("r", run_b, 10)
    assert snapshot is not None and snapshot.epoch == "e0"


async def test_shared_nodes_take_no_node_lock(two_nodes: tuple[Store, Store]) -> None:
    a, b = two_nodes
    await a.begin_run(shared=True)
    await b.begin_run(shared=True)  # a lone node's lock would refuse this
    await a.ping()
    await b.ping()


async def test_refused_records_get_no_ack(two_nodes: tuple[Store, Store]) -> None:
    a, b = two_nodes
    run_a = (await a.begin_run(shared=True)).run
    run_b = (await b.begin_run(shared=True)).run
    fence_a = Fence("room", "r", (await a.claim("room", "r", run_a)).token)
    acked: list[str] = []
    refused: list[str] = []
    async with trio.open_nursery() as nursery:
        wb = WriteBehind(a)
        await nursery.start(wb.run)
        wb.enqueue(created(run_a), fence=fence_a)
        first = wb.enqueue(msg(1, "first"), fence=fence_a)
        first.then(acked.append, "first")
        await wb.wait_flushed()
        await b.claim("room", "r", run_b)
        second = wb.enqueue(msg(2, "second"), fence=fence_a)
        second.then(acked.append, "second")
        second.otherwise(refused.append, "second")
        unfenced = wb.enqueue(MemberChanged(room="x", user="y", added=True, ts=1))
        await wb.wait_flushed()
        nursery.cancel_scope.cancel()
    assert acked == ["first"]
    assert refused == ["second"]
    assert second.refused and not second.committed
    assert unfenced.committed
    assert fence_a.stale
    late: list[str] = []
    second.otherwise(late.append, "late")  # already refused: at once
    assert late == ["late"]


async def test_sqlite_refuses_to_be_shared(tmp_path: object) -> None:
    async with open_store(f"sqlite:///{tmp_path}/one.db") as store:
        with pytest.raises(StorageConfigError, match="PostgreSQL"):
            await store.begin_run(shared=True)
