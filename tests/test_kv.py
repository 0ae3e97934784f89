"""KV sync end to end: live sync, catch-up, conflicts, quotas, compaction, restart."""

import sqlite3
import time
from pathlib import Path

import pytest
import trio
import trio.testing

from actors.directory import ActorKind
from actors.kvmap import KvMap, KvQuota
from protocol.client import ParleyClient, ServerError
from protocol.errors import ErrorCode
from protocol.frames import KvChanged, KvEntry, KvWrite
from protocol.hlc import pack
from protocol.kv import KvReplica
from storage.store import KvSnapshot
from tests.helpers import RunningServer, actor_crashes, memory_node, pending_events, run_server


def ms() -> int:
    return time.time_ns() // 1_000_000


def live(replica: KvReplica) -> dict[str, object]:
    return {k: e.value for k, e in replica.synced().items()}


async def next_change(client: ParleyClient) -> KvChanged:
    with trio.fail_after(10):
        event: KvChanged = await client.next_event(KvChanged)
    return event


async def test_a_write_reaches_the_users_other_synced_sessions_only(
    server: RunningServer,
) -> None:
    async with (
        server.client("alice") as phone,
        server.client("alice") as tablet,
        server.client("alice") as web,
        server.client("bob") as bob,
    ):
        await tablet.kv_sync()
        await phone.kv_sync()
        await bob.kv_sync()
        now = ms()
        ack = await phone.kv_put(
            "phone",
            KvWrite(key="theme", hlc=pack(now), value="dark"),
            KvWrite(key="draft:r1", hlc=pack(now, 1), value={"text": "hel", "at": 3}),
        )
        assert [(r.key, r.rev, r.code) for r in ack.items] == [
            ("theme", 1, None),
            ("draft:r1", 2, None),
        ]
        assert ack.rev == 2 and ack.hlc > pack(now, 1)  # the server's clock saw the writes
        event = await next_change(tablet)
        assert event.rev == 2
        assert event.items == (
            KvEntry(key="theme", rev=1, hlc=pack(now), dev="phone", value="dark"),
            KvEntry(
                key="draft:r1", rev=2, hlc=pack(now, 1), dev="phone", value={"text": "hel", "at": 3}
            ),
        )
        # A marker through each other session: nothing for kv came before it.
        for client in (phone, web, bob):
            await client.create(f"marker-{id(client)}")
            await client.send(f"marker-{id(client)}", "m")
            assert not [e for e in pending_events(client) if isinstance(e, KvChanged)]
        assert (await bob.kv_sync()).items == ()  # another user's map is another map


async def test_an_offline_device_catches_up_in_pages_with_deletions(
    server: RunningServer,
) -> None:
    phone, tablet = KvReplica("phone"), KvReplica("tablet")
    async with server.client("alice") as c:
        for i in range(10):
            phone.set(f"k{i}", i, ms())
        assert await c.kv_push(phone) == []
    async with server.client("alice") as c:
        await c.kv_pull(tablet, limit=4)
    assert live(tablet) == {f"k{i}": i for i in range(10)}
    synced_at = tablet.rev

    async with server.client("alice") as c:  # the tablet is offline meanwhile
        for i in range(5):
            phone.delete(f"k{i}", ms())
        for i in range(10, 25):
            phone.set(f"k{i}", i, ms())
        phone.set("k9", "nine", ms())
        assert await c.kv_push(phone) == []

    async with server.client("alice") as c:
        pages = []
        while True:
            page = await c.kv_sync(tablet.sync_frame(0).after, limit=7)
            pages.append(page)
            tablet.on_changes(page)
            if not page.more:
                break
    assert [len(p.items) for p in pages] == [7, 7, 7]  # 5 deletions, 15 new keys, k9
    assert pages[0].items[0].rev == synced_at + 1
    assert sum(e.deleted for p in pages for e in p.items) == 5
    revs = [e.rev for p in pages for e in p.items]
    assert revs == sorted(revs) and len(set(revs)) == len(revs)  # no duplicate, in order
    expected = {f"k{i}": i for i in range(5, 25)} | {"k9": "nine"}
    assert live(tablet) == live(phone) == expected
    assert tablet.rev == pages[-1].rev == 31


async def test_last_writer_wins_by_clock_then_device(server: RunningServer) -> None:
    async with server.client("alice") as c:
        t = pack(ms())
        await c.kv_put("phone", KvWrite(key="k", hlc=t + 10, value="phone"))
        ack = await c.kv_put("tablet", KvWrite(key="k", hlc=t + 5, value="tablet"))
        (lost,) = ack.items
        assert lost.code == ErrorCode.KV_STALE  # older: answered with the current value
        assert (lost.rev, lost.hlc, lost.dev, lost.value) == (1, t + 10, "phone", "phone")
        # The same clock: the larger device id wins, whichever order they come in.
        ack = await c.kv_put("zz", KvWrite(key="k", hlc=t + 10, value="zz"))
        assert ack.items[0].code is None
        ack = await c.kv_put("aa", KvWrite(key="k", hlc=t + 10, value="aa"))
        assert ack.items[0].code == ErrorCode.KV_STALE and ack.items[0].value == "zz"
        # Newer wins and gets the next revision; the ack's clock is above it.
        ack = await c.kv_put("tablet", KvWrite(key="k", hlc=t + 20, deleted=True))
        assert (ack.items[0].code, ack.items[0].rev) == (None, 3)
        assert ack.hlc > t + 20


async def test_a_resent_write_gets_its_revision_back(server: RunningServer) -> None:
    async with server.client("alice") as c:
        assert (await c.kv_put("phone", KvWrite(key="x", hlc=1, value=0))).rev == 0  # unsynced
        await c.kv_sync()
        write = KvWrite(key="k", hlc=pack(ms()), value=1)
        first = await c.kv_put("phone", write)
        again = await c.kv_put("phone", write, KvWrite(key="j", hlc=pack(ms()) + 1, value=2))
        assert first.items[0].rev == again.items[0].rev == 2
        assert again.items[0].code is None
        assert again.items[1].rev == 3 and again.rev == 3  # no revision spent on the resend


async def test_compare_and_set(server: RunningServer) -> None:
    async with server.client("alice") as c:
        t = pack(ms())
        ack = await c.kv_put("phone", KvWrite(key="k", hlc=t, value="a", expect=0))
        assert ack.items[0].code is None  # 0: the key must not exist
        ack = await c.kv_put("tablet", KvWrite(key="k", hlc=t + 1, value="b", expect=0))
        assert ack.items[0].code == ErrorCode.KV_CONFLICT
        assert (ack.items[0].rev, ack.items[0].value) == (1, "a")
        ack = await c.kv_put("tablet", KvWrite(key="k", hlc=t + 2, value="b", expect=1))
        assert (ack.items[0].code, ack.items[0].rev) == (None, 2)
        # A stale device that read revision 1 cannot overwrite revision 2, even with a
        # newer clock.
        ack = await c.kv_put("phone", KvWrite(key="k", hlc=t + 9, value="c", expect=1))
        assert (ack.items[0].code, ack.items[0].value) == (ErrorCode.KV_CONFLICT, "b")
        ack = await c.kv_put("phone", KvWrite(key="new", hlc=t, value=1, expect=5))
        assert ack.items[0].code == ErrorCode.KV_CONFLICT and ack.items[0].rev == 0


async def test_a_clock_far_ahead_is_refused(tmp_path: Path) -> None:
    async with run_server(tmp_path, kv_clock_skew=60.0) as server, server.client("alice") as c:
        now = ms()
        ack = await c.kv_put(
            "broken",
            KvWrite(key="a", hlc=pack(now + 3_600_000), value="future"),
            KvWrite(key="b", hlc=pack(now + 30_000), value="soon"),
        )
        assert [r.code for r in ack.items] == [ErrorCode.CLOCK_SKEW, None]
        assert ack.items[0].msg
        # The server's clock now runs past the accepted write, so a device that
        # observes it writes after it; it never took the refused one in.
        assert pack(now + 30_000) < ack.hlc < pack(now + 3_600_000)


async def test_quotas_and_limits(tmp_path: Path) -> None:
    async with (
        run_server(tmp_path, kv_max_keys=3, kv_max_bytes=100, kv_value_bytes=64) as server,
        server.client("alice") as c,
    ):
        t = pack(ms())
        ack = await c.kv_put("d", *(KvWrite(key=f"k{i}", hlc=t + i, value=i) for i in range(4)))
        assert [r.code for r in ack.items] == [None, None, None, ErrorCode.KV_QUOTA]
        ack = await c.kv_put(
            "d",
            KvWrite(key="k0", hlc=t + 10, value="changed"),  # overwriting costs no key
            KvWrite(key="k1", hlc=t + 11, deleted=True),  # a deletion frees one
            KvWrite(key="k3", hlc=t + 12, value=3),
            KvWrite(key="k4", hlc=t + 13, value="x" * 60),  # over 100 bytes in all
        )
        assert [r.code for r in ack.items] == [None, None, None, ErrorCode.KV_QUOTA]
        with pytest.raises(ServerError) as info:
            await c.kv_put("d", KvWrite(key="big", hlc=t + 20, value="x" * 100))
        assert info.value.code == ErrorCode.TOO_LARGE
        with pytest.raises(ServerError) as info:
            await c.kv_put("d", KvWrite(key="k" * 300, hlc=t + 21, value=1))
        assert info.value.code == ErrorCode.INVALID
        with pytest.raises(ServerError) as info:
            await c.kv_put("no:colons", KvWrite(key="k", hlc=t + 22, value=1))
        assert info.value.code == ErrorCode.INVALID
        page = await c.kv_sync()
        assert {e.key: e.value for e in page.items} == {"k0": "changed", "k2": 2, "k3": 3}


async def test_compacted_deletions_make_a_late_device_start_over(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    wall = [ms()]
    phone, tablet = KvReplica("phone"), KvReplica("tablet")
    async with memory_node(tmp_path, kv_max_tombstones=4) as mem, mem.client("alice") as c:
        mem.node.services.now_ms = lambda: wall[0]
        for i in range(10):
            phone.set(f"k{i}", i, wall[0])
        await c.kv_push(phone)
        await c.kv_pull(tablet)
        assert tablet.rev == 10
        deleted_at = wall[0]
        for i in range(6):  # six deletions: over the cap of 4
            phone.delete(f"k{i}", deleted_at)
        await c.kv_push(phone)
        assert not (await c.kv_sync(10)).reset  # too young to be forgotten yet
        await mem.node.write_behind.wait_flushed()
        mock_clock.autojump_threshold = 0
        wall[0] += 601_000  # past --kv-tombstone-min-age
        await trio.sleep(61)  # and past the time between compactions
        phone.set("k9", "nine", wall[0])
        await c.kv_push(phone)  # the oldest three deletions are forgotten after it

        page = await c.kv_sync(tablet.rev)
        assert page.reset  # it cannot learn every deletion: the whole map instead
        assert not any(e.deleted for e in page.items)
        tablet.on_changes(page)
        assert live(tablet) == {"k6": 6, "k7": 7, "k8": 8, "k9": "nine"} == live(phone)
        assert tablet.rev == 17
        page = await c.kv_sync(16)  # a device that is not behind gets deltas
        assert not page.reset and [e.key for e in page.items] == ["k9"]
        # A write older than a forgotten deletion does not bring its key back...
        ack = await c.kv_put("laptop", KvWrite(key="k0", hlc=pack(deleted_at - 5000), value=0))
        assert (ack.items[0].code, ack.items[0].rev) == (ErrorCode.KV_STALE, 0)
        # ...a newer one does; and "expect 0" means absent or deleted.
        ack = await c.kv_put(
            "laptop",
            KvWrite(key="k1", hlc=pack(wall[0]), value="back"),
            KvWrite(key="k4", hlc=pack(wall[0]), value="new", expect=0),
        )
        assert [r.code for r in ack.items] == [None, None]
        await mem.node.write_behind.wait_flushed()
    async with memory_node(tmp_path, kv_max_tombstones=4) as mem, mem.client("alice") as c:
        assert (await c.kv_sync(10)).reset  # what was forgotten stays forgotten
        assert not (await c.kv_sync(16)).reset
        ack = await c.kv_put("laptop", KvWrite(key="k2", hlc=pack(deleted_at - 5000), value=0))
        assert ack.items[0].code == ErrorCode.KV_STALE


async def test_old_deletions_expire(tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    async with memory_node(tmp_path, kv_tombstone_ttl=3600.0) as mem, mem.client("alice") as c:
        wall = [1_800_000_000_000]
        mem.node.services.now_ms = lambda: wall[0]
        t = pack(wall[0])
        await c.kv_put("d", KvWrite(key="a", hlc=t, value=1), KvWrite(key="b", hlc=t + 1, value=2))
        await c.kv_put("d", KvWrite(key="a", hlc=t + 2, deleted=True))
        assert (await c.kv_sync(2)).items[0].deleted  # remembered for now
        await mem.node.write_behind.wait_flushed()
        mock_clock.autojump_threshold = 0
        wall[0] += 3_600_001
        await trio.sleep(61)  # the next write checks for expired deletions
        await c.kv_put("d", KvWrite(key="c", hlc=pack(wall[0]), value=3))
        page = await c.kv_sync(2)
        assert page.reset
        assert [(e.key, e.value) for e in page.items] == [("b", 2), ("c", 3)]


async def test_the_map_and_its_revisions_survive_a_restart(tmp_path: Path) -> None:
    phone = KvReplica("phone")
    async with run_server(tmp_path) as server, server.client("alice") as c:
        for i in range(5):
            phone.set(f"k{i}", {"n": i, "b": b"\x00\x01"}, ms())
        await c.kv_push(phone)
        phone.delete("k0", ms())
        await c.kv_push(phone)
    async with run_server(tmp_path) as server, server.client("alice") as c:
        tablet = KvReplica("tablet")
        await c.kv_pull(tablet)
        assert live(tablet) == live(phone)
        assert tablet.rev == 6
        phone.set("k1", "later", ms())
        ack_results = await c.kv_push(phone)
        assert ack_results == [] and phone.entries["k1"].rev == 7  # never a revision twice
        page = await c.kv_sync(5)
        assert [(e.key, e.deleted) for e in page.items] == [("k0", True), ("k1", False)]


async def test_the_ack_follows_the_commit(tmp_path: Path) -> None:
    async with run_server(tmp_path) as server, server.client("alice") as c:
        await c.kv_sync()
        write_behind = server.node.write_behind
        blocker = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        acked = trio.Event()
        synced: list[list[str]] = []
        try:
            async with trio.open_nursery() as nursery:

                async def put() -> None:
                    await c.kv_put("d", KvWrite(key="k", hlc=pack(ms()), value=1))
                    acked.set()

                async def sync() -> None:
                    synced.append([e.key for e in (await c.kv_sync()).items])

                nursery.start_soon(put)
                with trio.fail_after(10):
                    while not write_behind.statistics().depth:  # noqa: ASYNC110 - a message away
                        await trio.sleep(0.01)
                nursery.start_soon(sync)
                with trio.fail_after(10):
                    while write_behind.statistics().failing_since is None:  # noqa: ASYNC110 - SQLite's lock timeout
                        await trio.sleep(0.01)
                # A commit of the write has failed: it is not stored, so neither the ack
                # nor a sync that would show its revision may have answered.
                assert not acked.is_set() and synced == []
                blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert acked.is_set()
        assert synced == [["k"]]


async def test_a_full_write_queue_refuses_puts(tmp_path: Path) -> None:
    async with run_server(tmp_path, write_queue_records=2) as server, server.client("alice") as c:
        blocker = sqlite3.connect(tmp_path / "parley.db", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    c.kv_put, "d", *(KvWrite(key=f"k{i}", hlc=i + 1, value=i) for i in range(3))
                )
                with trio.fail_after(10):
                    while server.node.write_behind.statistics().depth < 3:  # noqa: ASYNC110 - a message away
                        await trio.sleep(0.01)
                with pytest.raises(ServerError) as info:
                    await c.kv_put("d", KvWrite(key="x", hlc=9, value=0))
                assert info.value.code == ErrorCode.TRY_LATER
                blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        assert len((await c.kv_sync()).items) == 3


async def test_a_session_that_closes_is_forgotten(server: RunningServer) -> None:
    async with server.client("alice") as phone:
        async with server.client("alice") as tablet:
            await tablet.kv_sync()
            kv = server.node.directory.actor(ActorKind.KV, "alice")
            assert len(kv.subs) == 1  # the tablet follows the map
        await phone.kv_put("phone", KvWrite(key="k", hlc=pack(ms()), value=1))
        with trio.fail_after(10):
            while kv.subs:  # noqa: ASYNC110 - the detach is a message away
                await trio.sleep(0.01)


async def test_metrics_count_writes_by_outcome(server: RunningServer) -> None:
    async with server.client("alice") as c:
        t = pack(ms())
        await c.kv_put("d", KvWrite(key="k", hlc=t + 1, value=1))
        await c.kv_put("d", KvWrite(key="k", hlc=t, value=0), KvWrite(key="k", hlc=t + 1, value=1))
        await c.kv_sync()
    async with server.http(admin=False) as http:
        text = (await http.get("/metrics")).text
    assert 'parley_kv_writes_total{outcome="applied"} 1.0' in text
    assert 'parley_kv_writes_total{outcome="stale"} 1.0' in text
    assert 'parley_kv_writes_total{outcome="resent"} 1.0' in text
    assert "parley_kv_sync_pages_total 1.0" in text
    assert 'parley_frames_in_total{type="kvput"} 2.0' in text


async def test_puts_are_refused_while_the_node_goes_away(tmp_path: Path) -> None:
    async with memory_node(tmp_path) as mem, mem.client("alice") as c:
        for conn in list(mem.node.connections):
            conn.session.goaway("draining", 1000)
        with pytest.raises(ServerError) as info:
            await c.kv_put("d", KvWrite(key="k", hlc=pack(ms()), value=1))
        assert info.value.code == ErrorCode.TRY_LATER


async def test_an_ack_shows_current_values_up_to_its_budget(server: RunningServer) -> None:
    async with server.client("alice") as c:
        t = pack(ms())
        for i in range(20):  # 20 values of 15 kB: 300 kB, over the 256 KiB an ack shows
            await c.kv_put("new", KvWrite(key=f"k{i}", hlc=t + 100, value="v" * 15_000))
        ack = await c.kv_put("old", *(KvWrite(key=f"k{i}", hlc=t, value=i) for i in range(20)))
        assert all(r.code == ErrorCode.KV_STALE for r in ack.items)
        assert [r.rev for r in ack.items] == list(range(1, 21))  # the revision always
        shown = [r.value is not None for r in ack.items]
        assert shown == [True] * 17 + [False] * 3  # kvsync has the rest


def test_pages_are_bounded_in_bytes_but_never_empty() -> None:
    store = KvMap("alice", KvSnapshot(), KvQuota())
    for i in range(10):
        store.write("d", KvWrite(key=f"k{i}", hlc=i + 1, value="v" * 1000), 0)
    page, more = store.changes(0, 100, max_bytes=2500, deletions=True)
    assert ([e.rev for e in page], more) == ([1, 2], True)
    page, more = store.changes(9, 100, max_bytes=10, deletions=True)
    assert ([e.rev for e in page], more) == ([10], False)  # one too big still goes


def test_a_replicas_values_are_the_servers_entries_under_its_pending_writes() -> None:
    phone = KvReplica("phone")
    phone.on_changed(
        KvChanged(
            rev=3,
            items=(
                KvEntry(key="theme", rev=1, hlc=1, dev="tablet", value="dark"),
                KvEntry(key="gone", rev=2, hlc=2, dev="tablet", deleted=True),
                KvEntry(key="lang", rev=3, hlc=3, dev="tablet", value="fr"),
            ),
        )
    )
    assert phone.values() == {"theme": "dark", "lang": "fr"}  # no deleted key
    phone.set("theme", "light", wall_ms=10)
    phone.delete("lang", wall_ms=11)
    phone.set("new", [1, 2], wall_ms=12)
    assert phone.values() == {"theme": "light", "new": [1, 2]}
    assert {k: e.value for k, e in phone.synced().items()} == {"theme": "dark", "lang": "fr"}


async def test_a_crashed_kv_actor_keeps_the_map_and_its_followers(server: RunningServer) -> None:
    """A bug crashes alice's kv actor while her tablet follows the map. Its successor
    keeps the map and the followers: the phone's next put reaches the tablet live, with
    the next revision."""
    async with server.client("alice") as phone, server.client("alice") as tablet:
        await tablet.kv_sync()  # the tablet follows the map
        await phone.kv_put("phone", KvWrite(key="a", hlc=pack(ms()), value=1))
        assert [e.rev for e in (await tablet.next_event(KvChanged)).items] == [1]
        server.node.directory.ref(ActorKind.KV, "alice").send_nowait(object())  # a bug
        await phone.kv_put("phone", KvWrite(key="b", hlc=pack(ms()), value=2))
        with trio.fail_after(10):
            changed = await tablet.next_event(KvChanged)
        assert [(e.key, e.rev) for e in changed.items] == [("b", 2)]
        assert actor_crashes(server.node, "kv") == 1.0
