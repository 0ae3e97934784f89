"""Typing indicators and blocking, end to end."""

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing

from actors.directory import ActorKind
from actors.messages import SetBlock
from actors.session import _tell_a_newer_room
from protocol.client import ParleyClient, ServerError
from protocol.errors import ErrorCode
from protocol.frames import Member, Message, Presence, Status, Typing, TypingOp
from storage.write_behind import COMMITTED
from tests.helpers import RunningServer, memory_node, run_server


async def events_before(client: ParleyClient, seq: int) -> list[object]:
    """Events until the message ``seq`` arrives (a marker: what came before it)."""
    seen: list[object] = []
    with trio.fail_after(10):
        while not (isinstance(event := await client.next_event(), Message) and event.seq == seq):
            seen.append(event)
    return seen


def typing_of(events: list[object]) -> list[tuple[str | None, TypingOp]]:
    return [(e.user, e.op) for e in events if isinstance(e, Typing)]


async def test_typing_reaches_the_others_only(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        await alice.create("r")
        await bob.join("r")
        await alice.typing("r")
        await alice.typing("r")  # a refresh is not announced again
        await alice.typing("r", stop=True)
        await alice.typing("r", stop=True)  # nor a second stop
        sent = await alice.send("r", "marker")
        assert typing_of(await events_before(bob, sent.seq)) == [
            ("alice", TypingOp.START),
            ("alice", TypingOp.STOP),
        ]
        assert typing_of(await events_before(alice, sent.seq)) == []  # not to the typer


async def test_typing_expires_without_a_refresh(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with (
        memory_node(tmp_path, typing_timeout=6.0) as mem,
        mem.client("alice") as alice,
        mem.client("bob") as bob,
    ):
        await alice.create("r")
        await bob.join("r")
        await mem.node.write_behind.wait_flushed()
        mock_clock.autojump_threshold = 0  # nothing below waits for storage
        start = trio.current_time()
        await alice.typing("r")
        await trio.sleep(4)
        await alice.typing("r")  # refreshed at 4 s: now ends at 10 s
        with trio.fail_after(60):
            first = await bob.next_event(Typing)
            stop = await bob.next_event(Typing)
        assert (first.op, stop.op, stop.user) == (TypingOp.START, TypingOp.STOP, "alice")
        assert trio.current_time() - start == pytest.approx(10.0)


async def test_typing_in_a_room_one_is_not_in_is_refused(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("eve") as eve:
        await alice.create("r", private=True)
        with pytest.raises(ServerError) as refused:
            await eve.typing("r")
        assert refused.value.code is ErrorCode.FORBIDDEN


async def test_blocking_closes_the_direct_room_both_ways(tmp_path: Path) -> None:
    async with run_server(tmp_path) as server:
        async with server.client("alice") as alice, server.client("mallory") as mallory:
            room = (await mallory.direct("alice")).room
            await alice.next_event(Member)
            await alice.direct("mallory")
            await mallory.send(room, "hello")
            await alice.block("mallory")
            assert await alice.blocks() == ("mallory",)
            for client in (mallory, alice):
                with pytest.raises(ServerError) as refused:
                    await client.send(room, "still there?")
                assert refused.value.code is ErrorCode.BLOCKED
            with pytest.raises(ServerError) as refused:
                await mallory.typing(room)
            assert refused.value.code is ErrorCode.BLOCKED
        async with server.client("mallory") as mallory:  # a new session: still blocked
            with pytest.raises(ServerError) as refused:
                await mallory.direct("alice")
            assert refused.value.code is ErrorCode.BLOCKED
    async with run_server(tmp_path) as server:  # the block is stored
        async with server.client("alice") as alice, server.client("mallory") as mallory:
            assert await alice.blocks() == ("mallory",)
            with pytest.raises(ServerError) as refused:
                await mallory.direct("alice")
            assert refused.value.code is ErrorCode.BLOCKED
            await alice.unblock("mallory")
            assert await alice.blocks() == ()
            room = (await mallory.direct("alice")).room
            await mallory.send(room, "thanks")


async def test_a_new_direct_room_with_a_blocker_is_refused(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("mallory") as mallory:
        await alice.block("mallory")  # no room between them yet
        with pytest.raises(ServerError) as refused:
            await mallory.direct("alice")
        assert refused.value.code is ErrorCode.BLOCKED
        with pytest.raises(ServerError) as refused:
            await alice.block("alice")
        assert refused.value.code is ErrorCode.INVALID


async def test_a_blocked_user_sees_neither_presence_nor_typing(server: RunningServer) -> None:
    async with (
        server.client("alice") as alice,
        server.client("bob") as bob,
        server.client("mallory") as mallory,
    ):
        await alice.create("g")
        await bob.join("g")
        await mallory.join("g")
        await alice.block("mallory")
        # alice is online, but not to mallory
        assert (await mallory.who("alice"))["alice"].status is Status.OFFLINE
        assert (await mallory.who("alice"))["alice"].ts is None
        assert (await bob.who("alice"))["alice"].status is Status.ONLINE
        await alice.set_status(Status.AWAY)
        await alice.typing("g")
        sent = await alice.send("g", "marker")
        for_bob = await events_before(bob, sent.seq)
        for_mallory = await events_before(mallory, sent.seq)
        assert typing_of(for_bob) == [("alice", TypingOp.START)]
        assert Presence(user="alice", status=Status.AWAY) in for_bob
        assert typing_of(for_mallory) == []
        # At the block alice went offline to mallory (no last seen), and no change since
        # reached her: not even an "offline" each time, which would tell her of activity.
        of_alice = [e for e in for_mallory if isinstance(e, Presence) and e.user == "alice"]
        assert of_alice == [Presence(user="alice", status=Status.OFFLINE)]
        await mallory.send("g", "group rooms are not affected")
        await alice.unblock("mallory")
        with trio.fail_after(10):
            assert await mallory.next_event(Presence) == Presence(user="alice", status=Status.AWAY)


async def test_the_blocker_cannot_open_the_direct_room_and_the_blocked_hears_nothing(
    server: RunningServer,
) -> None:
    async with (
        server.client("alice") as alice,
        server.client("bob") as bob,
        server.client("mallory") as mallory,
    ):
        await alice.block("mallory")
        with pytest.raises(ServerError) as refused:
            await alice.direct("mallory")
        assert refused.value.code is ErrorCode.BLOCKED
        await bob.create("marker")
        await bob.invite("marker", "mallory")  # mallory hears of this, and of nothing before
        with trio.fail_after(10):
            heard = await mallory.next_event(Member)
        assert heard.room == "marker"


async def test_in_a_blocked_direct_room_only_history_is_left(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("mallory") as mallory:
        room = (await mallory.direct("alice")).room
        sent = await mallory.send(room, "hello")
        await alice.block("mallory")
        for client in (alice, mallory):
            for request in (
                client.receipt(room, read=sent.seq),
                client.receipt_state(room),
                client.typing(room),
                client.join(room),
                client.send(room, "still there?"),
            ):
                with pytest.raises(ServerError) as refused:
                    await request
                assert refused.value.code is ErrorCode.BLOCKED
            page = await client.history(room)
            assert [m.text for m in page.items] == ["hello"]


async def test_a_block_never_lets_a_room_retire_with_a_message_unstored(tmp_path: Path) -> None:
    """A block reaches a running direct room with its own record's ticket, which may
    be older than (or, told after its commit, already past) a message the room has
    queued: that message must still hold the room until it is stored."""
    async with run_server(tmp_path, actor_idle=0.05) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            room = (await alice.direct("bob")).room
            await bob.next_event(Member)
            await bob.unsubscribe(room)
            await alice.unsubscribe(room)
            blocker = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")  # storage stalls: the message stays queued
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(alice.send, room, "queued")
                    live = server.node.directory.actor(ActorKind.ROOM, room)
                    with trio.fail_after(10):
                        while live.seq < 1:  # noqa: ASYNC110 - the room's own progress
                            await trio.sleep(0.01)
                    ref = server.node.directory.get(ActorKind.ROOM, room)
                    assert ref is not None
                    await ref.send(SetBlock(user="alice", blocked=True, ticket=COMMITTED))
                    await trio.sleep(0.5)  # ten idle periods of the room
                    assert server.node.directory.actor(ActorKind.ROOM, room) is live
                    blocker.execute("ROLLBACK")
            finally:
                blocker.close()


async def test_a_room_started_while_a_block_was_stored_is_told_at_the_commit(
    server: RunningServer,
) -> None:
    """A direct room whose actor started between a block and its commit read storage
    without the block: the commit tells it (``_tell_a_newer_room``), and only it."""
    async with server.client("alice") as alice, server.client("mallory") as mallory:
        room = (await mallory.direct("alice")).room
        directory = server.node.directory
        running = directory.get(ActorKind.ROOM, room)
        block = SetBlock(user="alice", blocked=True, ticket=COMMITTED)
        _tell_a_newer_room((directory, room, block, running))  # the same actor: told already
        await mallory.send(room, "still open")
        _tell_a_newer_room((directory, room, block, None))  # started since: told now
        with pytest.raises(ServerError) as refused:
            await mallory.send(room, "blocked")
        assert refused.value.code is ErrorCode.BLOCKED
        await alice.history(room)
