"""The store contract (storage/store.py), run against every backend."""

import socket
import sqlite3
from pathlib import Path

import cbor2
import pytest
import trio

from protocol.cbor import Raw
from protocol.frames import KvEntry, Message, RoomKind, Status
from storage.migrations import migrations_for
from storage.postgres import PostgresStore
from storage.sqlite import sqlite_path
from storage.store import (
    BlockChanged,
    KvChange,
    KvCompacted,
    KvSnapshot,
    MemberChanged,
    ReceiptUpsert,
    Record,
    RoomCreated,
    StorageConfigError,
    StorageUnavailable,
    Store,
    StoredPresence,
    UserSeen,
    UserSnapshot,
    open_store,
)


def msg(room: str, seq: int, user: str | None = "alice", **kw: object) -> Message:
    fields: dict[str, object] = {"text": f"m{seq}", "cid": f"c{seq}"}
    fields.update(kw)
    return Message(room=room, seq=seq, ts=1000 + seq, user=user, **fields)  # type: ignore[arg-type]


def created(room: str, *members: str, run: int, kind: RoomKind = RoomKind.OPEN) -> RoomCreated:
    return RoomCreated(
        room=room,
        kind=kind,
        owner=members[0] if members else None,
        epoch="e1",
        ts=1,
        members=members,
        run=run,
    )


async def test_room_round_trip(store: Store) -> None:
    run = (await store.begin_run()).run
    assert await store.load_room("lobby", run, 10) is None
    assert not await store.room_exists("lobby")
    await store.write_batch([created("lobby", "alice", "bob", run=run, kind=RoomKind.PRIVATE)])
    assert await store.room_exists("lobby")
    snap = await store.load_room("lobby", run, 10)
    assert snap is not None
    assert (snap.kind, snap.owner, snap.epoch, snap.seq, snap.recent) == (
        RoomKind.PRIVATE,
        "alice",
        "e1",
        0,
        (),
    )
    assert snap.members == {"alice", "bob"}


async def test_messages_keep_order_and_content(store: Store) -> None:
    run = (await store.begin_run()).run
    data = Raw(cbor2.dumps({"k": [1, 2.5, "x", None, True, b"\x00"]}))  # as clients send it
    batch: list[Record] = [created("r", "alice", run=run), *[msg("r", i) for i in range(1, 6)]]
    batch.append(msg("r", 6, user=None, text=None, data=data))
    await store.write_batch(batch)
    snap = await store.load_room("r", run, 3)
    assert snap is not None and snap.seq == 6
    assert [m.seq for m in snap.recent] == [4, 5, 6]
    assert snap.recent[-1] == msg("r", 6, user=None, text=None, data=data)
    assert [m.seq for m in await store.fetch_messages("r", 2, 4)] == [2, 3, 4]
    assert await store.fetch_messages("r", 7, 9) == []
    assert await store.fetch_messages("r", 1, 1) == [msg("r", 1)]


async def test_seq_survives_an_empty_recent_window(store: Store) -> None:
    run = (await store.begin_run()).run
    await store.write_batch([created("r", "alice", run=run), msg("r", 1), msg("r", 2)])
    snap = await store.load_room("r", run, 0)
    assert snap is not None and snap.seq == 2 and snap.recent == ()


async def test_a_retried_batch_stores_nothing_twice(store: Store) -> None:
    run = (await store.begin_run()).run
    batch: list[Record] = [created("r", "alice", run=run), msg("r", 1), msg("r", 2)]
    await store.write_batch(batch)
    await store.write_batch(batch)
    assert [m.seq for m in await store.fetch_messages("r", 1, 10)] == [1, 2]
    snap = await store.load_room("r", run, 10)
    assert snap is not None and snap.members == {"alice"}


async def test_member_changes_apply_in_order(store: Store) -> None:
    run = (await store.begin_run()).run
    await store.write_batch(
        [
            created("r", "alice", run=run),
            MemberChanged(room="r", user="bob", added=True, ts=2),
            MemberChanged(room="r", user="bob", added=False, ts=3),
            MemberChanged(room="r", user="carol", added=True, ts=4),
            MemberChanged(room="r", user="alice", added=False, ts=5),
            MemberChanged(room="r", user="alice", added=True, ts=6),
        ]
    )
    snap = await store.load_room("r", run, 10)
    assert snap is not None and snap.members == {"alice", "carol"}


async def test_find_message_by_sender_and_cid(store: Store) -> None:
    run = (await store.begin_run()).run
    await store.write_batch(
        [created("r", "alice", run=run), msg("r", 1, cid="x"), msg("r", 2, user=None, cid="x")]
    )
    found = await store.find_message("r", "alice", "x")
    assert found is not None and found.seq == 1
    server = await store.find_message("r", None, "x")
    assert server is not None and server.seq == 2
    assert await store.find_message("r", "bob", "x") is None
    assert await store.find_message("other", "alice", "x") is None


async def test_crashed_run_rotates_epochs_of_rooms_it_had_open(store: Store) -> None:
    setup = (await store.begin_run()).run
    await store.write_batch([created("loaded", "a", run=setup), created("idle", "a", run=setup)])
    await store.end_run(setup)
    crashed = (await store.begin_run()).run
    await store.load_room("loaded", crashed, 1)
    await store.write_batch([created("new", "a", run=crashed)])
    # no end_run: the node died
    after = await store.begin_run()
    assert after.rotated_rooms == 2
    epochs = {}
    for room in ("loaded", "idle", "new"):
        snap = await store.load_room(room, after.run, 1)
        assert snap is not None
        epochs[room] = snap.epoch
    assert epochs["idle"] == "e1" and epochs["loaded"] != "e1" and epochs["new"] != "e1"


async def test_clean_stop_keeps_epochs(store: Store) -> None:
    first = (await store.begin_run()).run
    await store.write_batch([created("r", "a", run=first)])
    await store.load_room("r", first, 1)
    await store.end_run(first)
    second = await store.begin_run()
    assert second.rotated_rooms == 0
    snap = await store.load_room("r", second.run, 1)
    assert snap is not None and snap.epoch == "e1"


async def test_list_rooms_pages_in_id_order(store: Store) -> None:
    run = (await store.begin_run()).run
    await store.write_batch([created(r, "alice", "bob", run=run) for r in ("c", "a", "b")])
    await store.write_batch([msg("b", 1), msg("b", 2)])
    first = await store.list_rooms(None, 2)
    assert [(r.room, r.members, r.seq) for r in first] == [("a", 2, 0), ("b", 2, 2)]
    assert [r.room for r in await store.list_rooms("b", 2)] == ["c"]


async def test_rooms_of_a_user(store: Store) -> None:
    run = (await store.begin_run()).run
    await store.write_batch(
        [
            created("c", "alice", "bob", run=run),
            created("a", "alice", run=run, kind=RoomKind.PRIVATE),
            created("b", "bob", run=run),
            msg("c", 1),
            msg("c", 2),
        ]
    )
    rooms = await store.rooms_of("alice", None, 10)
    assert [(r.room, r.kind, r.seq, r.owner, r.epoch) for r in rooms] == [
        ("a", RoomKind.PRIVATE, 0, "alice", "e1"),
        ("c", RoomKind.OPEN, 2, "alice", "e1"),
    ]
    assert [r.room for r in await store.rooms_of("alice", "a", 10)] == ["c"]
    assert [r.room for r in await store.rooms_of("alice", None, 1)] == ["a"]
    assert await store.rooms_of("nobody", None, 10) == []


# --- SQLite specifics -------------------------------------------------------------------


def test_sqlite_urls() -> None:
    assert sqlite_path("sqlite:///parley.db") == Path("parley.db")
    assert sqlite_path("sqlite:////var/lib/parley.db") == Path("/var/lib/parley.db")
    for bad in ("sqlite://host/x.db", "sqlite:///", "sqlite:///:memory:", "postgres:///x"):
        with pytest.raises(StorageConfigError):
            sqlite_path(bad)


async def test_sqlite_refuses_a_second_node_on_the_same_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'one.db'}"
    async with open_store(url):
        with pytest.raises(StorageConfigError, match="in use"):
            async with open_store(url):
                pass
    async with open_store(url):  # the lock went with the first node
        pass


async def test_unknown_database_url_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(StorageConfigError, match="unsupported"):
        async with open_store("mysql://localhost/parley"):
            pass
    with pytest.raises(StorageConfigError, match="does not exist"):
        async with open_store(f"sqlite:///{tmp_path / 'missing' / 'x.db'}"):
            pass


async def test_migrations_apply_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'm.db'}"
    async with open_store(url) as store:
        await store.begin_run()
    async with open_store(url) as store:  # a second start must not re-run them
        await store.begin_run()
    with sqlite3.connect(tmp_path / "m.db") as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations").fetchall()
    assert rows == [(m.version, m.name) for m in migrations_for("sqlite")]
    assert rows[:2] == [(1, "init"), (2, "receipts_presence_blocks")]


# --- receipts, presence, blocks -----------------------------------------------------


async def test_receipt_upserts_keep_the_maximum(store: Store) -> None:
    run = (await store.begin_run()).run
    await store.write_batch([created("r", "alice", "bob", run=run)])

    def up(user: str, delivered: int, read: int) -> ReceiptUpsert:
        return ReceiptUpsert(room="r", user=user, delivered=delivered, read=read)

    # A late batch with lower values (another node, a retry) must not go backwards.
    await store.write_batch([up("bob", 5, 3), up("alice", 2, 2)])
    await store.write_batch([up("bob", 4, 4), up("bob", 1, 0)])
    snap = await store.load_room("r", run, 10)
    assert snap is not None
    assert sorted(snap.cursors) == [("alice", 2, 2), ("bob", 5, 4)]
    # A member who left no longer counts.
    await store.write_batch([MemberChanged(room="r", user="alice", added=False, ts=2)])
    snap = await store.load_room("r", run, 10)
    assert snap is not None and snap.cursors == (("bob", 5, 4),)


async def test_user_state_and_blocks(store: Store) -> None:
    assert await store.load_user("alice") == UserSnapshot()
    await store.write_batch(
        [
            UserSeen(user="alice", status=Status.DND, last_seen=None),
            UserSeen(user="alice", status=Status.DND, last_seen=500),
            UserSeen(user="alice", status=Status.AWAY, last_seen=None),  # keeps last_seen
            UserSeen(user="bob", status=Status.ONLINE, last_seen=700),
            UserSeen(user="bob", status=Status.ONLINE, last_seen=600),  # never backwards
            BlockChanged(user="alice", other="bob", blocked=True, ts=1),
            BlockChanged(user="alice", other="carol", blocked=True, ts=1),
            BlockChanged(user="alice", other="carol", blocked=False, ts=2),
        ]
    )
    assert await store.load_user("alice") == UserSnapshot(
        status=Status.AWAY, last_seen=500, blocks=frozenset({"bob"})
    )
    assert await store.blockers("bob", "alice") == {"alice"}
    assert await store.blockers("alice", "carol") == frozenset()
    seen = await store.stored_presence(["alice", "bob", "nobody"], "bob")
    assert sorted(seen, key=lambda p: p.user) == [
        StoredPresence(user="alice", status=Status.AWAY, last_seen=500, hidden=True),
        StoredPresence(user="bob", status=Status.ONLINE, last_seen=700, hidden=False),
    ]
    assert await store.stored_presence([], "bob") == []


async def test_a_failed_sqlite_user_read_is_unavailable(tmp_path: Path) -> None:
    """The user's read runs on the event loop's own connection; an error there is typed
    like any other read's (callers retry ``StorageUnavailable``)."""
    path = tmp_path / "broken.db"
    async with open_store(f"sqlite:///{path}") as store:
        assert await store.load_user("alice") == UserSnapshot()
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("DROP TABLE blocks")
        other.close()
        with pytest.raises(StorageUnavailable, match="no such table: blocks"):
            await store.load_user("alice")


async def test_the_sqlite_user_read_takes_no_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connect reads its user: on SQLite that read runs on the event loop's own
    connection, with no thread hop (a hop per connect cost more than the lookup and
    fragmented the memory of idle sessions)."""
    async with open_store(f"sqlite:///{tmp_path / 'u.db'}") as store:
        await store.write_batch([UserSeen(user="alice", status=Status.DND, last_seen=7)])

        def no_thread(*args: object, **kwargs: object) -> None:
            raise AssertionError("load_user went to a thread")

        monkeypatch.setattr(trio.to_thread, "run_sync", no_thread)
        assert await store.load_user("alice") == UserSnapshot(status=Status.DND, last_seen=7)


# --- kv ---------------------------------------------------------------------------------


def kv(user: str, key: str, rev: int, value: object = None, *, deleted: bool = False) -> KvChange:
    """A change whose value is held as the server holds it: the CBOR a client sent."""
    raw = None if value is None else Raw(cbor2.dumps(value))
    entry = KvEntry(key=key, rev=rev, hlc=1000 + rev, dev="d", value=raw, deleted=deleted)
    return KvChange(user=user, entry=entry, ts=5000 + rev)


async def test_kv_round_trip_in_revision_order(store: Store) -> None:
    assert await store.load_kv("alice") == KvSnapshot()
    changes = [
        kv("alice", "b", 1, {"x": [1, 2.5, b"\x00"]}),
        kv("alice", "a", 2, None),  # a null value is a value
        kv("bob", "a", 1, "bob's"),
        kv("alice", "b", 3, deleted=True),
    ]
    await store.write_batch(changes)
    snap = await store.load_kv("alice")
    assert (snap.rev, snap.floor) == (3, 0)
    assert snap.entries == (changes[1], changes[3])  # b's rev 1 was overwritten by rev 3
    assert (await store.load_kv("bob")).entries == (changes[2],)


async def test_a_late_kv_batch_never_overwrites_a_newer_entry(store: Store) -> None:
    newer = kv("alice", "k", 7, "new")
    await store.write_batch([newer])
    await store.write_batch([kv("alice", "k", 4, "old"), kv("alice", "j", 5, "j")])  # replayed
    snap = await store.load_kv("alice")
    assert snap.rev == 7  # the head never goes back either
    assert {c.entry.key: c.entry.value.load() for c in snap.entries} == {"k": "new", "j": "j"}


async def test_kv_compaction_forgets_deletions_up_to_the_floor(store: Store) -> None:
    await store.write_batch(
        [
            kv("alice", "a", 1, deleted=True),
            kv("alice", "b", 2, 2),
            kv("alice", "c", 3, deleted=True),
        ]
    )
    await store.write_batch([KvCompacted(user="alice", floor=1, floor_hlc=1001, floor_dev="d")])
    snap = await store.load_kv("alice")
    assert (snap.rev, snap.floor, snap.floor_hlc, snap.floor_dev) == (3, 1, 1001, "d")
    assert [c.entry.key for c in snap.entries] == ["b", "c"]


async def test_a_batch_keeps_the_order_of_kv_changes_and_compactions(store: Store) -> None:
    """A compaction between two runs of kv changes in one batch: what it forgot stays
    forgotten, and messages and receipts interleaved with them are all stored."""
    tomb = kv("alice", "k", 5, deleted=True)
    await store.write_batch(
        [
            tomb,
            msg("r", 1),
            KvCompacted(user="alice", floor=5, floor_hlc=1005, floor_dev="d"),
            ReceiptUpsert(room="r", user="bob", delivered=1, read=0),
            kv("alice", "j", 6, "j"),
            msg("r", 2),
            ReceiptUpsert(room="r", user="bob", delivered=2, read=1),
        ]
    )
    snap = await store.load_kv("alice")
    assert (snap.rev, snap.floor, [c.entry.key for c in snap.entries]) == (6, 5, ["j"])
    assert [m.seq for m in await store.fetch_messages("r", 1, 10)] == [1, 2]


# --- PostgreSQL specifics ----------------------------------------------------------------


async def test_postgres_serves_one_node_per_database(postgres_url: str) -> None:
    async with open_store(postgres_url) as first, open_store(postgres_url) as second:
        await first.begin_run()
        with pytest.raises(StorageConfigError, match="another Parley node"):
            await second.begin_run()
    async with open_store(postgres_url) as third:  # the lock went with the first node
        await third.begin_run()


async def test_postgres_migrations_apply_once_when_nodes_start_together(
    postgres_url: str,
) -> None:
    async def start() -> None:
        async with open_store(postgres_url):
            pass

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(start)
    async with open_store(postgres_url) as store:
        assert isinstance(store, PostgresStore)
        rows = await store._read(
            lambda conn: conn.fetch("SELECT version, name FROM schema_migrations ORDER BY 1")
        )
    assert [tuple(r) for r in rows] == [(m.version, m.name) for m in migrations_for("postgres")]


async def test_postgres_unreachable_is_a_config_error_at_start() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here
    with pytest.raises(StorageConfigError, match="cannot use postgresql://parley:\\*\\*\\*@"):
        async with open_store(f"postgresql://parley:hunter2@127.0.0.1:{port}/x"):
            pass
