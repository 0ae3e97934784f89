"""Three nodes sharing a private PostgreSQL and a private Redis: clients spread over them
chat as on one node (order, no gap, no duplicate, idempotent retries on any node) and
resume on whichever node they reach."""

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from actors.cluster import inbox_channel
from actors.directory import ActorKind
from protocol.client import Disconnected, ServerError
from protocol.errors import ErrorCode
from protocol.frames import (
    FeedChanged,
    Joined,
    KvChanged,
    KvWrite,
    Message,
    Presence,
    PresenceList,
    ReceiptState,
    Send,
    Sent,
    Status,
    Typing,
)
from protocol.hlc import pack as hlc
from protocol.limits import direct_room_id
from storage.store import open_store
from tests.helpers import RunningServer, events_until, pending_events, run_server, until_status
from tests.redis_server import PrivateRedis


@asynccontextmanager
async def cluster(
    tmp_path: Path, database_url: str, redis_url: str, n: int = 3, **overrides: Any
) -> AsyncIterator[list[RunningServer]]:
    async with AsyncExitStack() as stack:
        nodes = []
        for i in range(n):
            folder = tmp_path / f"node{i}"
            folder.mkdir()
            nodes.append(
                await stack.enter_async_context(
                    run_server(folder, database_url=database_url, redis_url=redis_url, **overrides)
                )
            )
        yield nodes


@pytest.fixture
async def nodes(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> AsyncIterator[list[RunningServer]]:
    async with cluster(tmp_path, postgres_url, redis_url) as started:
        yield started


async def test_chat_across_three_nodes_keeps_order(nodes: list[RunningServer]) -> None:
    a, b, c = nodes
    async with a.client("alice") as alice, b.client("bob") as bob, c.client("carol") as carol:
        await alice.create("r")
        await bob.join("r")
        await carol.join("r")
        sent: list[Sent] = []

        async def talk(client: Any, who: str) -> None:
            for i in range(15):
                sent.append(await client.send("r", f"{who}{i}", cid=f"{who}{i}"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(talk, alice, "a")
            nursery.start_soon(talk, bob, "b")
            nursery.start_soon(talk, carol, "c")
        assert sorted(s.seq for s in sent) == list(range(1, 46))
        roles = [n.node.directory.actor(ActorKind.ROOM, "r").role for n in nodes]
        assert roles == ["owner", "stub", "stub"]  # placed where first asked
        for client in (alice, bob, carol):
            got = await events_until(client, Message, 45)
            assert [m.seq for m in got] == list(range(1, 46))  # gap-free, in order, once
            by_seq = {s.seq: s.cid for s in sent}
            assert all(by_seq[m.seq] == m.cid for m in got)
    async with b.http(admin=False) as http:
        metrics = (await http.get("/metrics")).text
    assert "parley_cluster_redis_up 1.0" in metrics
    relayed = next(
        ln for ln in metrics.splitlines() if ln.startswith("parley_cluster_relayed_deliveries")
    )
    assert float(relayed.split()[-1]) >= 45  # what bob got, relayed by his node


async def test_a_retry_on_another_node_gets_the_same_seq(nodes: list[RunningServer]) -> None:
    a, b, c = nodes
    async with a.client("alice") as alice, c.client("carol") as carol:
        await alice.create("r")
        await carol.join("r")
        first = await alice.send("r", "hello", cid="once")
    async with b.client("alice") as again:
        retried = await again.request(
            Send(id=again.next_id(), room="r", cid="once", text="hello", retry=True), Sent
        )
        assert retried.seq == first.seq
        await again.join("r")
        page = await again.history("r", limit=10)
        assert [m.cid for m in page.items] == ["once"]


async def test_receipts_and_typing_cross_nodes(nodes: list[RunningServer]) -> None:
    a, b, _ = nodes
    async with a.client("alice") as alice, b.client("bob") as bob:
        await alice.create("r")
        await bob.join("r")
        sent = await alice.send("r", "hi", cid="x")
        await bob.next_event(Message)
        await bob.typing("r")
        typing = await alice.next_event(Typing)
        assert typing.user == "bob"
        await bob.receipt("r", read=sent.seq)
        with trio.fail_after(10):
            while True:
                state = await alice.next_event(ReceiptState)
                if any(c.user == "bob" and c.read == sent.seq for c in state.items):
                    break


async def test_resume_on_another_node_replays_what_was_missed(
    nodes: list[RunningServer],
) -> None:
    a, b, c = nodes
    async with a.client("alice") as alice:
        await alice.create("r")
        async with b.client("bob") as bob:
            await bob.join("r")
            await alice.send("r", "seen", cid="s")
            await bob.next_event(Message)
            positions = dict(bob.positions)
        for i in range(5):
            await alice.send("r", f"missed{i}", cid=f"m{i}")
        async with c.client("bob", resume=positions) as bob:
            joined = await bob.next_event(Joined)
            assert joined.recovered is True
            replayed = await events_until(bob, Message, 5)
            assert [m.text for m in replayed] == [f"missed{i}" for i in range(5)]
            await alice.send("r", "live", cid="l")
            live = await bob.next_event(Message)
            assert (live.text, live.seq) == ("live", 7)


async def test_the_admin_api_works_on_any_node(nodes: list[RunningServer]) -> None:
    a, _, c = nodes
    async with a.client("alice") as alice:
        await alice.create("r")
        async with c.http() as http:
            response = await http.post("/admin/rooms/r/messages", json={"text": "from ops"})
            assert response.status_code == 201, response.text
            info = (await http.get("/admin/rooms/r")).json()
        message = await alice.next_event(Message)
        assert message.text == "from ops"
        assert info["seq"] == 1


async def test_a_redis_restart_degrades_then_recovers_losing_nothing_acked(
    tmp_path: Path, postgres_url: str, own_redis: PrivateRedis
) -> None:
    async with cluster(tmp_path, postgres_url, own_redis.url, n=2, cluster_lease=1.0) as nodes:
        a, b = nodes
        acked: dict[str, int] = {}
        async with a.client("alice") as alice, b.client("bob") as bob:
            await alice.create("r")
            await bob.join("r")
            for i in range(3):
                acked[f"m{i}"] = (await alice.send("r", f"m{i}", cid=f"m{i}")).seq
            await events_until(bob, Message, 3)

            await trio.to_thread.run_sync(own_redis.stop)
            for node in nodes:
                body = await until_status(node, "Degraded")
                assert any(r.startswith("bus:") for r in body["reasons"]), body
                assert body["checks"]["bus"]["ok"] is False
            # The room's node goes on until it can no longer be sure it owns the room
            # (a lease); what it acks meanwhile is stored, but bob's node never hears it.
            i = 3
            with trio.fail_after(10):
                while True:
                    try:
                        acked[f"m{i}"] = (await alice.send("r", f"m{i}", cid=f"m{i}")).seq
                    except ServerError as exc:
                        assert exc.code is ErrorCode.TRY_LATER
                        break
                    i += 1
                    await trio.sleep(0.05)  # within the rate limit
            assert bob.close_code is None  # sessions stay connected through the outage
            # A room no node runs yet cannot be placed: refused, and nothing waits.
            with pytest.raises(ServerError) as unplaced:
                await bob.create("new")
            assert unplaced.value.code is ErrorCode.TRY_LATER
            assert unplaced.value.error.msg == "the cluster is unreachable; retry"
            await trio.to_thread.run_sync(own_redis.start)  # empty: it keeps nothing
            for node in nodes:
                await until_status(node, "OK")
            positions = dict(bob.positions)
        # Bob's node lost broadcasts: its sessions resume (4009), and get them replayed.
        async with a.client("alice") as alice, b.client("bob", resume=positions) as bob:
            await alice.join("r", resume=False)
            with trio.fail_after(30):
                while True:
                    try:
                        sent = await alice.send("r", "after", cid="after")
                        break
                    except ServerError as exc:
                        assert exc.code is ErrorCode.TRY_LATER
                        await trio.sleep(0.1)
            acked["after"] = sent.seq
            seen = [3]
            with trio.fail_after(30):
                while seen[-1] != sent.seq:
                    seen.append((await bob.next_event(Message)).seq)
            assert seen == list(range(3, sent.seq + 1))  # no gap, no duplicate
    async with open_store(postgres_url) as store:
        stored = {m.cid: m.seq for m in await store.fetch_messages("r", 1, 100)}
    assert all(stored.get(cid) == seq for cid, seq in acked.items()), (acked, stored)


async def next_presence(client: Any, user: str, status: Status) -> Presence:
    """The first presence of ``user`` with ``status`` (the same state may come twice:
    a node that starts following a user on another node announces what it learns)."""
    with trio.fail_after(15):
        while True:
            event = await client.next_event()
            found = []
            if isinstance(event, Presence):
                found = [event]
            elif isinstance(event, PresenceList):
                found = [Presence(user=i.user, status=i.status, ts=i.ts) for i in event.items]
            for presence in found:
                if presence.user == user and presence.status is status:
                    return presence


async def test_presence_with_grace_across_nodes(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    async with cluster(tmp_path, postgres_url, redis_url, presence_grace=0.5) as nodes:
        a, b, c = nodes
        async with a.client("bob") as bob:
            await bob.create("r")
            await bob.invite("r", "alice")
            async with b.client("alice") as alice:
                await alice.join("r")
                # Bob's node follows alice, whose user actor runs on her node.
                await next_presence(bob, "alice", Status.ONLINE)
                async with c.client("carol") as carol:
                    seen = await carol.who("alice", "bob")
                    assert seen["alice"].status is Status.ONLINE
                    assert seen["bob"].status is Status.ONLINE
                    watched = await carol.watch("alice")
                    assert watched["alice"].status is Status.ONLINE
                    await alice.set_status(Status.AWAY)
                    await next_presence(carol, "alice", Status.AWAY)
                    await next_presence(bob, "alice", Status.AWAY)
            # Alice is gone from every node: offline after the grace, with a last-seen time.
            gone = await next_presence(bob, "alice", Status.OFFLINE)
            assert gone.ts is not None


async def test_kv_from_two_devices_on_two_nodes_converges(nodes: list[RunningServer]) -> None:
    a, b, _ = nodes
    async with a.client("alice") as phone, b.client("alice") as laptop:
        await phone.kv_sync()
        await laptop.kv_sync()
        await phone.kv_put("phone", KvWrite(key="theme", hlc=hlc(1), value="dark"))
        await laptop.kv_put("laptop", KvWrite(key="theme", hlc=hlc(2), value="light"))
        await laptop.kv_put("laptop", KvWrite(key="lang", hlc=hlc(3), value="fr"))
        for device in (phone, laptop):
            changes = await device.kv_sync()
            state = {e.key: e.value for e in changes.items}
            assert state == {"theme": "light", "lang": "fr"}
        pushed = await events_until(phone, KvChanged, 1)  # live, from the other node
        assert pushed


async def test_blocks_hold_across_nodes(nodes: list[RunningServer]) -> None:
    a, b, _ = nodes
    async with a.client("alice") as alice, b.client("bob") as bob:
        await alice.direct("bob")
        await bob.direct("alice")
        room = direct_room_id("alice", "bob")
        await alice.send(room, "hi", cid="1")
        await bob.block("alice")
        with pytest.raises(ServerError) as refused:
            await alice.send(room, "still there?", cid="2")
        assert refused.value.code is ErrorCode.BLOCKED
        assert await bob.blocks() == ("alice",)


async def test_a_stale_kv_or_user_owner_acks_nothing(nodes: list[RunningServer]) -> None:
    a, b, _ = nodes
    async with a.client("alice") as alice:
        await alice.kv_put("phone", KvWrite(key="k", hlc=hlc(1), value="v1"))
        await alice.set_status(Status.AWAY)
        # Another node claims the map and the user in storage, as a node that took them
        # over would: what the first node writes from now on is refused, not acked.
        for kind in ("kv", "user"):
            await b.node.store.claim(kind, "alice", b.node.services.run)
        with pytest.raises(ServerError) as refused:
            await alice.kv_put("phone", KvWrite(key="k", hlc=hlc(2), value="v2"))
        assert refused.value.code is ErrorCode.TRY_LATER
        # The retry finds the map where placement says it runs, loaded from storage.
        await alice.kv_put("phone", KvWrite(key="k", hlc=hlc(3), value="v3"))
        changes = await alice.kv_sync()
        assert [(e.key, e.value, e.rev) for e in changes.items] == [("k", "v3", 2)]
        with pytest.raises((ServerError, Disconnected)) as refused_too:
            await alice.set_status(Status.DND)
        if isinstance(refused_too.value, ServerError):
            assert refused_too.value.code is ErrorCode.TRY_LATER
        with trio.fail_after(10):  # the user's state is no longer this node's to tell
            while alice.close_code is None:  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert alice.close_code == 4009


async def test_a_room_created_elsewhere_is_known_at_once(nodes: list[RunningServer]) -> None:
    a, b, _ = nodes
    async with b.client("bob") as bob:
        with pytest.raises(ServerError) as missing:
            await bob.join("later")
        assert missing.value.code is ErrorCode.NOT_FOUND  # and b remembers it as missing
        async with a.client("alice") as alice:
            await alice.create("later")
        with trio.fail_after(10):
            while True:  # the note crosses Redis: a moment, not the cache's minute
                try:
                    await bob.join("later")
                    break
                except ServerError as exc:
                    assert exc.code is ErrorCode.NOT_FOUND
                    await trio.sleep(0.05)


async def test_leaving_through_another_node_stops_the_relay(
    nodes: list[RunningServer],
) -> None:
    a, b, c = nodes
    async with a.client("alice") as alice, b.client("bob") as bob, c.client("carol") as carol:
        await alice.create("r")
        await bob.join("r")
        await carol.join("r")
        await bob.leave("r")
        await alice.send("r", "after bob left", cid="x")
        await carol.next_event(Message)  # delivered to those still in the room
        await bob.ping()  # anything relayed to bob would have come before the pong
        assert not [e for e in pending_events(bob) if isinstance(e, Message)]


async def test_a_block_through_a_session_whose_user_runs_elsewhere(
    nodes: list[RunningServer],
) -> None:
    a, b, _ = nodes
    async with a.client("bob") as first:  # bob's user actor is placed on a
        await first.who("alice")
        async with b.client("bob") as bob, a.client("alice") as alice:
            await bob.block("alice")  # from b, through a's user actor
            assert await bob.blocks() == ("alice",)
            await alice.ping()


async def test_feeds_across_nodes(nodes: list[RunningServer]) -> None:
    """A post made on one node, liked on another, reaches a view opened on a third;
    follows and comments made elsewhere reorder it; the shard runs on one node."""
    a, b, c = nodes
    paris, near = (48.8566, 2.3522), (48.8600, 2.3500)
    async with (
        a.client("alice") as alice,
        b.client("bob") as bob,
        c.client("carol") as carol,
    ):
        view = await carol.feed_open(*paris, 1000, limit=5)  # the shard is placed on c
        first = await alice.post(*near, "food", "one")
        second = await alice.post(*near, "news", "two")
        with trio.fail_after(10):
            while len(view.posts) < 2:
                view.apply(await carol.next_event(FeedChanged))
        again = await alice.post(*near, "food", "one", cid=first.cid)  # idempotent via a stub
        assert again.post == first.post
        await bob.like(first.post)
        await bob.join(f"post:{second.post}")
        await bob.send(f"post:{second.post}", "nice")
        await carol.follow("alice")
        with trio.fail_after(10):
            while not (
                {i.post: (i.likes, i.comments, i.parts[3]) for i in view.items}
                == {first.post: (1, 0, 1.0), second.post: (0, 1, 1.0)}
            ):
                view.apply(await carol.next_event(FeedChanged))
        roles = [n.node.directory.actor(ActorKind.FEED, str(first.post % 16384)) for n in nodes]
        assert [getattr(r, "role", None) for r in roles] == ["stub", "stub", "owner"]
        async with a.client("carol") as elsewhere:  # the same viewer on another node
            fresh = await elsewhere.feed_open(*paris, 1000, limit=5)
        assert fresh.items == view.items or fresh.ts != view.ts


async def test_a_refusal_crosses_nodes_with_its_code(nodes: list[RunningServer]) -> None:
    """Bob, on another node than alice's private room, is refused with the room's own
    code; once invited he joins through the same node and is relayed its messages."""
    a, b, _ = nodes
    async with a.client("alice") as alice, b.client("bob") as bob:
        await alice.create("secret", private=True)
        with pytest.raises(ServerError) as refused:
            await bob.join("secret")
        assert refused.value.code is ErrorCode.FORBIDDEN
        relay = b.node.services.cluster.relays.get("secret")  # type: ignore[union-attr]
        assert relay is None or not relay.links  # nothing of bob's left behind
        await alice.invite("secret", "bob")
        await bob.join("secret")
        sent = await alice.send("secret", "welcome")
        got = await bob.next_event(Message)
        assert (got.seq, got.text) == (sent.seq, "welcome")


async def test_a_retired_room_is_taken_by_the_next_node_with_its_epoch(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    """A room with nobody left retires on its node once what it wrote is stored, and lets
    the room go: the next node to be asked runs it from storage, with the same epoch (no
    crash to recover from), and the seq goes on."""
    async with cluster(tmp_path, postgres_url, redis_url, n=2, actor_idle=0.2) as (a, b):
        async with a.client("alice") as alice:
            joined = await alice.create("r")
            for i in range(3):
                await alice.send("r", f"m{i}")
        with trio.fail_after(15):
            while a.node.directory.actor(ActorKind.ROOM, "r") is not None:  # noqa: ASYNC110 - it retires when idle
                await trio.sleep(0.05)
        async with b.client("bob") as bob, b.client("alice") as alice:
            again = await alice.join("r")
            assert (again.epoch, again.seq) == (joined.epoch, 3)
            assert b.node.directory.actor(ActorKind.ROOM, "r").role == "owner"
            await bob.join("r")
            sent = await alice.send("r", "m3")
            assert sent.seq == 4
            assert (await bob.next_event(Message)).seq == 4


async def test_an_unreadable_envelope_is_dropped_counted_and_the_node_goes_on(
    nodes: list[RunningServer], redis_server: PrivateRedis
) -> None:
    a, b, _ = nodes
    cluster = a.node.services.cluster
    assert cluster is not None
    for garbage in (b"\xff\x00not cbor", b""):
        redis_server.command("PUBLISH", inbox_channel(cluster.node), garbage)
    registry = a.node.services.metrics.registry
    with trio.fail_after(10):
        while registry.get_sample_value("parley_cluster_unreadable_total") != 2:  # noqa: ASYNC110 - a message away
            await trio.sleep(0.02)
    async with a.client("alice") as alice, b.client("bob") as bob:  # still one cluster
        await alice.create("r")
        await bob.join("r")
        await alice.send("r", "still here")
        assert (await bob.next_event(Message)).text == "still here"
