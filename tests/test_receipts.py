"""Delivery and read receipts end to end: real listener, real SQLite, the Python client."""

from pathlib import Path

import pytest
import trio
import trio.testing

from protocol.client import ParleyClient, ServerError
from protocol.errors import ErrorCode
from protocol.frames import Cursor, Joined, Member, ReceiptCounts, ReceiptState, SeqCount
from tests.helpers import RunningServer, memory_node, pending_events, run_server


async def next_receipts(client: ParleyClient) -> ReceiptState:
    with trio.fail_after(10):
        event: ReceiptState = await client.next_event(ReceiptState)
    return event


async def test_a_direct_message_goes_sent_delivered_read(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        room = (await alice.direct("bob")).room
        await bob.next_event(Member)  # bob hears of the new room
        await bob.direct("alice")
        sent = await alice.send(room, "hi bob")  # state 1: sent (stored)
        state = await alice.receipt_state(room)
        assert state.items == (Cursor(user="alice"), Cursor(user="bob"))

        await bob.receipt(room, delivered=sent.seq)
        event = await next_receipts(alice)  # state 2: delivered
        assert event.room == room
        assert event.items == (Cursor(user="bob", delivered=sent.seq),)

        await bob.receipt(room, read=sent.seq)
        event = await next_receipts(alice)  # state 3: read
        assert event.items == (Cursor(user="bob", delivered=sent.seq, read=sent.seq),)
        # bob's own session hears it too: his other devices clear their unread count.
        assert (await next_receipts(bob)).items[-1].read == 0
        assert (await next_receipts(bob)).items[-1].read == sent.seq


async def test_group_rooms_count_per_message(server: RunningServer) -> None:
    async with (
        server.client("alice") as alice,
        server.client("bob") as bob,
        server.client("carol") as carol,
    ):
        await alice.create("g")
        await bob.join("g")
        await carol.join("g")
        for i in range(3):
            await alice.send("g", f"m{i}")
        await bob.receipt("g", read=2)
        await carol.receipt("g", delivered=3)
        counts = await alice.receipt_counts("g", 1, limit=5)  # clipped to the head
        assert counts.members == 3
        assert counts.items == (
            SeqCount(seq=1, delivered=2, read=1),
            SeqCount(seq=2, delivered=2, read=1),
            SeqCount(seq=3, delivered=1, read=0),
        )
        who = await alice.receipt_state("g", 2)  # who has received seq 2, and read it
        assert who.items == (
            Cursor(user="bob", delivered=2, read=2),
            Cursor(user="carol", delivered=3, read=0),
        )


async def test_receipts_are_monotonic_and_clamped(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.create("r")
        await bob.join("r")
        for i in range(5):
            await alice.send("r", str(i))
        await bob.receipt("r", delivered=4, read=3)
        assert (await next_receipts(alice)).items == (Cursor(user="bob", delivered=4, read=3),)
        await bob.receipt("r", delivered=2, read=1)  # lower: accepted, changes nothing
        await bob.receipt("r", delivered=4, read=3)  # repeated
        await bob.receipt("r", read=99)  # beyond the head: the head
        event = await next_receipts(alice)
        assert event.items == (Cursor(user="bob", delivered=5, read=5),)
        state = await alice.receipt_state("r")
        assert Cursor(user="bob", delivered=5, read=5) in state.items


async def test_only_members_send_or_read_receipts(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("eve") as eve:
        await alice.create("r", private=True)
        await alice.send("r", "secret")
        with pytest.raises(ServerError) as refused:
            await eve.receipt("r", read=1)
        assert refused.value.code is ErrorCode.FORBIDDEN
        with pytest.raises(ServerError) as refused:
            await eve.receipt_counts("r", 1)
        assert refused.value.code is ErrorCode.FORBIDDEN
        with pytest.raises(ServerError) as refused:
            await eve.receipt("nowhere", read=1)
        assert refused.value.code is ErrorCode.NOT_FOUND


async def test_receipt_state_survives_a_restart_and_reaches_a_new_session(
    tmp_path: Path,
) -> None:
    async with run_server(tmp_path) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            await alice.create("r")
            await bob.join("r")
            for i in range(4):
                await alice.send("r", str(i))
            await bob.receipt("r", delivered=4, read=2)
            await alice.receipt("r", read=4)
    async with run_server(tmp_path) as server:  # the drain stored the last interval
        async with server.client("bob") as bob:
            joined = await bob.join("r")
            assert (joined.delivered, joined.read) == (4, 2)  # his own cursors
            state = await next_receipts(bob)  # then everyone's, after the replay
            assert state.items == (
                Cursor(user="alice", delivered=4, read=4),
                Cursor(user="bob", delivered=4, read=2),
            )
            counts = await bob.receipt_counts("r", 3, limit=2)
            assert counts.items == (
                SeqCount(seq=3, delivered=2, read=1),
                SeqCount(seq=4, delivered=2, read=1),
            )


async def test_large_rooms_announce_counts(tmp_path: Path) -> None:
    async with (
        run_server(tmp_path, large_room=2) as server,
        server.client("alice") as alice,
        server.client("bob") as bob,
        server.client("carol") as carol,
    ):
        await alice.create("big")
        await bob.join("big")
        await carol.join("big")
        sent = await alice.send("big", "hello all")
        await bob.receipt("big", read=sent.seq)
        with trio.fail_after(10):
            counts = await alice.next_event(ReceiptCounts)
        assert counts.members == 3
        assert counts.items == (SeqCount(seq=sent.seq, delivered=1, read=1),)


async def test_a_burst_of_receipts_is_one_event(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """In virtual time: the room coalesces everything in one interval into one event."""
    async with (
        memory_node(tmp_path, receipt_interval=0.5) as mem,
        mem.client("alice") as alice,
        mem.client("bob") as bob,
        mem.client("carol") as carol,
    ):
        await alice.create("r")
        await bob.join("r")
        await carol.join("r")
        for i in range(30):
            await alice.send("r", str(i))
        for client in (bob, carol):
            for seq in range(1, 31):  # each acks as the messages come: 60 receipts
                await client.receipt("r", delivered=seq, read=seq - 1)
        # Time has not moved: nothing announced yet.
        await trio.testing.wait_all_tasks_blocked()
        assert [e for e in pending_events(alice) if isinstance(e, ReceiptState)] == []
        mock_clock.jump(0.5)
        event = await next_receipts(alice)
        assert event.items == (
            Cursor(user="bob", delivered=30, read=29),
            Cursor(user="carol", delivered=30, read=29),
        )
        mock_clock.jump(5)
        await trio.testing.wait_all_tasks_blocked()
        assert [e for e in pending_events(alice) if isinstance(e, ReceiptState)] == []  # one event


async def test_joined_reports_own_cursor_on_resume(server: RunningServer) -> None:
    async with server.client("alice") as alice:
        await alice.create("r")
        await alice.send("r", "x")
        await alice.receipt("r", read=1)
        positions = dict(alice.positions)
    async with server.client("alice", resume=positions) as again:
        with trio.fail_after(10):
            joined = await again.next_event(Joined)
        assert (joined.recovered, joined.delivered, joined.read) == (True, 1, 1)


async def test_in_a_large_room_a_users_other_devices_get_their_cursor(tmp_path: Path) -> None:
    async with (
        run_server(tmp_path, large_room=2) as server,
        server.client("alice") as alice,
        server.client("bob") as phone,
        server.client("bob") as tablet,
        server.client("carol") as carol,
    ):
        await alice.create("big")
        for client in (phone, tablet, carol):
            await client.join("big")
        sent = await alice.send("big", "hello")
        await phone.receipt("big", read=sent.seq)
        mine = await next_receipts(tablet)  # counts go to all; bob's cursor to bob only
        assert mine.items == (Cursor(user="bob", delivered=sent.seq, read=sent.seq),)
        with trio.fail_after(10):
            await carol.next_event(ReceiptCounts)
        assert not any(isinstance(e, ReceiptState) for e in pending_events(carol))
