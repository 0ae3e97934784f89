"""Presence end to end: grace periods in virtual time, multi-device, watch, large rooms."""

import math
from pathlib import Path

import pytest
import trio
import trio.testing

from actors.directory import ActorKind
from protocol.client import ParleyClient, ServerError
from protocol.errors import ErrorCode
from protocol.frames import (
    Member,
    Message,
    Online,
    Presence,
    PresenceList,
    PresenceState,
    Status,
)
from tests.helpers import (
    RunningServer,
    actor_crashes,
    memory_node,
    pending_events,
    run_server,
)


async def next_presence(client: ParleyClient) -> Presence:
    with trio.fail_after(30):
        event: Presence = await client.next_event(Presence)
    return event


async def until_seen(client: ParleyClient, user: str, status: Status) -> None:
    """Read events until one says ``user`` has ``status`` (a list or a change: which
    one comes depends on whether ``user``'s actor published before we followed)."""
    with trio.fail_after(30):
        while True:
            event = await client.next_event()
            if isinstance(event, Presence) and (event.user, event.status) == (user, status):
                return
            if isinstance(event, PresenceList) and PresenceState(user=user, status=status) in (
                event.items
            ):
                return


async def test_grace_period_hides_a_reconnect_then_announces_offline(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with memory_node(tmp_path, presence_grace=5.0) as mem, mem.client("bob") as bob:
        await bob.create("r")
        async with mem.client("alice") as alice:
            await alice.join("r")
            await until_seen(bob, "alice", Status.ONLINE)  # bob now follows alice
            await mem.node.write_behind.wait_flushed()
            # From here on nothing waits for storage, so virtual time can run freely.
            mock_clock.autojump_threshold = 0
        async with mem.client("alice"):  # back within the grace period
            await trio.sleep(20)  # well past when the offline would have come
        assert [e for e in pending_events(bob) if isinstance(e, Presence)] == []  # no flicker

        left_at = trio.current_time()
        offline = await next_presence(bob)
        assert trio.current_time() - left_at == pytest.approx(5.0)
        assert (offline.user, offline.status) == ("alice", Status.OFFLINE)
        assert offline.ts is not None


async def test_a_crashed_user_actor_keeps_the_sessions_and_the_presence(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """A bug crashes alice's User actor while she is online and do-not-disturb. Its
    successor keeps her session and what the actor knew: followers see no change, and
    her going offline still waits for her to leave and then for the grace period."""
    async with memory_node(tmp_path, presence_grace=5.0) as mem, mem.client("bob") as bob:
        await bob.create("r")
        async with mem.client("alice") as alice:
            await alice.join("r")
            await alice.set_status(Status.DND)
            await until_seen(bob, "alice", Status.DND)
            await mem.node.write_behind.wait_flushed()
            mem.node.directory.ref(ActorKind.USER, "alice").send_nowait(object())  # a bug
            assert (await bob.who("alice"))["alice"].status is Status.DND
            assert actor_crashes(mem.node, "user") == 1.0
            mock_clock.autojump_threshold = 0  # nothing waits for storage from here
            await trio.sleep(60)  # past many grace periods and idle sweeps
            assert [e for e in pending_events(bob) if isinstance(e, Presence)] == []
            # The successor serves her session. A status change waits for storage (a
            # thread, in real time): no virtual jumps meanwhile.
            mock_clock.autojump_threshold = math.inf
            await alice.set_status(Status.AWAY)
            await until_seen(bob, "alice", Status.AWAY)
            await mem.node.write_behind.wait_flushed()
            mock_clock.autojump_threshold = 0
        left_at = trio.current_time()
        offline = await next_presence(bob)
        assert (offline.user, offline.status) == ("alice", Status.OFFLINE)
        assert trio.current_time() - left_at == pytest.approx(5.0)


async def test_online_while_any_device_is(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    async with (
        memory_node(tmp_path, presence_grace=5.0) as mem,
        mem.client("bob") as bob,
        mem.client("alice") as phone,
    ):
        await bob.create("r")
        await phone.join("r")
        async with mem.client("alice") as tablet:
            await tablet.join("r")
        await until_seen(bob, "alice", Status.ONLINE)
        await mem.node.write_behind.wait_flushed()
        mock_clock.autojump_threshold = 0  # nothing waits for storage from here
        await trio.sleep(50)  # ten grace periods after the tablet left
        assert (await bob.who("alice"))["alice"].status is Status.ONLINE
        assert [e for e in pending_events(bob) if isinstance(e, Presence)] == []


async def test_status_last_seen_and_who_survive_a_restart(tmp_path: Path) -> None:
    async with run_server(tmp_path, presence_grace=0.01) as server:
        async with server.client("bob") as bob:
            await bob.create("r")
            async with server.client("alice") as alice:
                await alice.join("r")
                await until_seen(bob, "alice", Status.ONLINE)
                await alice.set_status(Status.AWAY)
                away = await next_presence(bob)
                assert (away.user, away.status, away.ts) == ("alice", Status.AWAY, None)
            offline = await next_presence(bob)
            assert offline.status is Status.OFFLINE and offline.ts is not None
            seen = await bob.who("alice", "nobody")
            assert seen["alice"] == PresenceState(
                user="alice", status=Status.OFFLINE, ts=offline.ts
            )
            assert seen["nobody"] == PresenceState(user="nobody", status=Status.OFFLINE)
    async with run_server(tmp_path) as server, server.client("bob") as bob:
        assert (await bob.who("alice"))["alice"].ts == offline.ts
        await bob.join("r")
        async with server.client("alice"):
            back = await next_presence(bob)
            assert (back.user, back.status) == ("alice", Status.AWAY)  # her chosen status


async def test_one_event_per_change_however_many_rooms_are_shared(
    server: RunningServer,
) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        for room in ("r1", "r2", "r3"):
            await alice.create(room)
            await bob.join(room)
        await alice.set_status(Status.DND)
        sent = await alice.send("r1", "marker")
        events = []
        with trio.fail_after(10):
            while not (
                isinstance(event := await bob.next_event(), Message) and event.seq == sent.seq
            ):
                events.append(event)
        changes = [e for e in events if isinstance(e, Presence)]
        assert changes == [Presence(user="alice", status=Status.DND)]


async def test_watch_follows_users_outside_any_room(tmp_path: Path) -> None:
    async with (
        run_server(tmp_path, max_watches=2, presence_grace=0.01) as server,
        server.client("carol") as carol,
    ):
        assert (await carol.watch("alice"))["alice"].status is Status.OFFLINE
        async with server.client("alice"):
            assert (await next_presence(carol)).status is Status.ONLINE
        assert (await next_presence(carol)).status is Status.OFFLINE
        await carol.watch("alice", "dave")  # alice again counts once
        with pytest.raises(ServerError) as refused:
            await carol.watch("erin")
        assert refused.value.code is ErrorCode.TOO_MANY_WATCHES
        await carol.unwatch("alice")
        async with server.client("alice") as alice:
            await alice.ping()
        await carol.watch("erin")  # room again, and a round trip after alice's visit
        assert [e for e in pending_events(carol) if isinstance(e, Presence)] == []


async def test_large_rooms_publish_an_online_count(tmp_path: Path) -> None:
    async with (
        run_server(tmp_path, large_room=2) as server,
        server.client("alice") as alice,
        server.client("bob") as bob,
    ):
        await alice.create("big")
        await bob.join("big")
        async with server.client("carol") as carol:
            await carol.join("big")  # three members: large
            with trio.fail_after(10):
                while (await alice.next_event(Online)).count != 3:
                    pass
        with trio.fail_after(10):
            while (await alice.next_event(Online)).count != 2:
                pass
        assert not any(
            isinstance(e, Presence) and e.user == "carol" for e in pending_events(alice)
        )  # carol is not followed in a large room


async def test_a_member_added_later_is_followed(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("carol") as carol:
        await alice.create("team", private=True)
        await carol.set_status(Status.DND)  # carol is online, in no room with alice
        await alice.invite("team", "carol")
        # alice's session follows the new member at once: her state, then her changes.
        await until_seen(alice, "carol", Status.DND)
        await carol.set_status(Status.AWAY)
        await until_seen(alice, "carol", Status.AWAY)


async def test_subscribing_lists_every_online_member(server: RunningServer) -> None:
    """Even members whose presence the session follows already (a room shared before):
    the list is the room's, so a client may keep who is online per room."""
    async with (
        server.client("x") as x,
        server.client("y") as y,
        server.client("z") as z,
    ):
        await x.create("r1")
        await y.join("r1")
        await x.create("r2")
        await z.join("r2")
        await y.join("r2")
        with trio.fail_after(10):
            listed = await y.next_event(PresenceList)
            while {p.user for p in listed.items} != {"x", "z"}:  # the one for r2
                listed = await y.next_event(PresenceList)
        assert {p.status for p in listed.items} == {Status.ONLINE}


async def test_an_idle_users_actor_hibernates_and_presence_stays_right(
    tmp_path: Path,
) -> None:
    """A user whose sessions are connected and idle has no actor task; each command
    wakes the same actor, with its state, and events for the user still reach them."""
    async with run_server(tmp_path, presence_grace=0.05) as server:
        directory = server.node.directory

        async def hibernating() -> bool:
            await trio.testing.wait_all_tasks_blocked()
            return directory._entries[ActorKind.USER, "alice"].send is None

        async with server.client("carol") as carol:
            await carol.watch("alice")
            async with server.client("alice") as alice:
                await alice.blocks()  # answered once the actor has loaded
                assert await hibernating()
                actor = directory.actor(ActorKind.USER, "alice")
                await alice.set_status(Status.DND)  # wakes it; it hibernates again after
                assert await hibernating()
                assert directory.actor(ActorKind.USER, "alice") is actor  # same state
                async with server.client("bob") as bob:
                    assert (await bob.watch("alice"))["alice"].status == Status.DND
                    await bob.create("r")
                    await bob.invite("r", "alice")  # on user:alice, to a hibernating actor
                    with trio.fail_after(10):
                        await alice.next_event(Member)
                    async with server.client("alice") as second:  # a second device
                        await second.ping()
                    await bob.ping()
                    assert [e for e in pending_events(bob) if isinstance(e, Presence)] == []
            await until_seen(carol, "alice", Status.DND)
            offline = await next_presence(carol)  # after the last session, and the grace
            assert (offline.user, offline.status) == ("alice", Status.OFFLINE)
