"""The embedded store: stdlib sqlite3 in worker threads, WAL mode.

One connection writes (batches, room activation, runs); a small pool of connections
reads (history, resume, lookups), so reads never wait behind a commit or behind one
slow read. The one read every connect makes, the user's row, runs on the event loop's
own connection instead (``_read_inline``): one indexed lookup, cheaper than a thread
hop, at the price of the loop waiting for it (ARCHITECTURE.md, "An idle session").
``synchronous=FULL`` makes a commit survive power loss, not only a killed process: a
sent-ack promises the message is stored. An exclusive lock file keeps a second node
off the same database, because two sequencers on one room would reuse seqs.
"""

import fcntl
import itertools
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TypeVar, cast
from urllib.parse import urlsplit

import trio

from protocol.frames import Message, RoomKind, RoomState, Status
from storage.migrations import migrations_for
from storage.rows import (
    FEED_RECORDS,
    KV_COLUMNS,
    MESSAGE_COLUMNS,
    POST_READ,
    FeedRows,
    feed_profile_of,
    feed_rows,
    kv_change_of,
    kv_rows,
    likers_by_post,
    message_of,
    message_row,
    shard_snapshot,
    stored_post_of,
    toggle_runs,
)
from storage.store import (
    BlockChanged,
    Claim,
    FeedProfile,
    Fence,
    KvChange,
    KvCompacted,
    KvSnapshot,
    MemberChanged,
    PostCreated,
    ReceiptUpsert,
    Record,
    RoomCreated,
    RoomReleased,
    RoomSnapshot,
    RoomSummary,
    RunInfo,
    ShardSnapshot,
    StorageConfigError,
    StorageError,
    StorageUnavailable,
    StoredPost,
    StoredPresence,
    UserSeen,
    UserSnapshot,
    redact_url,
)

T = TypeVar("T")
BUSY_TIMEOUT_MS = 1000
_NO_BLOCKS: frozenset[str] = frozenset()
READERS = 3

_INSERT_MESSAGE = (
    "INSERT INTO messages (room, seq, ts, sender, cid, text, data) VALUES (?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (room, seq) DO NOTHING"
)
_UPSERT_RECEIPT = (
    "INSERT INTO receipts (room, user, delivered, read) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (room, user) DO UPDATE SET"
    " delivered = max(delivered, excluded.delivered), read = max(read, excluded.read)"
)
_ADD_MEMBER = "INSERT OR IGNORE INTO members (room, user, added_at) VALUES (?, ?, ?)"
_REMOVE_MEMBER = "DELETE FROM members WHERE room = ? AND user = ?"
_ADD_BLOCK = "INSERT OR IGNORE INTO blocks (user, other, created_at) VALUES (?, ?, ?)"
_REMOVE_BLOCK = "DELETE FROM blocks WHERE user = ? AND other = ?"
_UPSERT_KV = (
    "INSERT INTO kv (user, key, rev, hlc, dev, value, deleted, ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (user, key) DO UPDATE SET rev = excluded.rev, hlc = excluded.hlc,"
    " dev = excluded.dev, value = excluded.value, deleted = excluded.deleted, ts = excluded.ts"
    " WHERE excluded.rev > kv.rev"
)
_UPSERT_KV_HEAD = (
    "INSERT INTO kv_heads (user, rev, floor) VALUES (?, ?, ?) ON CONFLICT (user) DO UPDATE SET"
    " rev = max(rev, excluded.rev), floor = max(floor, excluded.floor)"
)
_UPSERT_USER = (
    "INSERT INTO users (id, status, last_seen) VALUES (?, ?, ?)"
    " ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
    " last_seen = coalesce(max(last_seen, excluded.last_seen), last_seen, excluded.last_seen)"
)

_INSERT_POST = (
    "INSERT INTO posts (id, shard, author, cid, ts, lat, lon, category, text, data)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"
)
_UPSERT_LAST_NUMBER = (
    "INSERT INTO feed_shards (shard, last_number) VALUES (?, ?) ON CONFLICT (shard)"
    " DO UPDATE SET last_number = max(last_number, excluded.last_number)"
)

_FEED_PROFILE = (
    "SELECT 0, author FROM follows WHERE user = ?1"
    " UNION ALL SELECT 1, category FROM interests WHERE user = ?1"
    " UNION ALL SELECT 2, user FROM blocks WHERE other = ?1"
)


def sqlite_path(url: str) -> Path:
    """``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db``
    absolute. Other spellings (``sqlite:/x.db``, ``sqlite:x.db``, a host, a query) are
    refused: each reads as something else to some other tool."""
    # The prefix first: with no host, urlsplit cannot fail on a bracket.
    if not url.lower().startswith("sqlite:///") or (parts := urlsplit(url)).query or parts.fragment:
        raise StorageConfigError(
            f"bad SQLite URL {redact_url(url)}: use sqlite:///relative.db (in the working "
            "directory) or sqlite:////absolute.db"
        )
    path = parts.path[1:]
    if not path or path == ":memory:":
        raise StorageConfigError("SQLite needs a file: the reader and writer share it")
    return Path(path)


def _connect(path: Path, *, readonly: bool, busy_ms: int = BUSY_TIMEOUT_MS) -> sqlite3.Connection:
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    conn.execute("PRAGMA synchronous = FULL")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        conn.execute("PRAGMA journal_mode = WAL")
    return conn


def _write_kv(conn: sqlite3.Connection, changes: Iterable[KvChange]) -> None:
    rows, heads = kv_rows(changes)
    conn.executemany(_UPSERT_KV, rows)
    conn.executemany(_UPSERT_KV_HEAD, [(user, rev, 0) for user, rev in heads.items()])


def _write_feed(conn: sqlite3.Connection, rows: FeedRows) -> None:
    conn.executemany(_INSERT_POST, rows.posts)
    conn.executemany(_UPSERT_LAST_NUMBER, rows.numbers)
    conn.executemany(
        "UPDATE posts SET deleted_at = ? WHERE id = ? AND deleted_at IS NULL", rows.deleted
    )
    conn.executemany(
        "INSERT OR IGNORE INTO likes (post, user, shard, ts) VALUES (?, ?, ?, ?)", rows.likes
    )
    conn.executemany("DELETE FROM likes WHERE post = ? AND user = ?", rows.unlikes)
    conn.executemany(
        "INSERT OR IGNORE INTO follows (user, author, ts) VALUES (?, ?, ?)", rows.follows
    )
    conn.executemany("DELETE FROM follows WHERE user = ? AND author = ?", rows.unfollows)
    conn.executemany("DELETE FROM interests WHERE user = ?", [(u,) for u in rows.interests])
    conn.executemany(
        "INSERT INTO interests (user, category) VALUES (?, ?)",
        [(u, c) for u, categories in rows.interests.items() for c in categories],
    )


def _translate(exc: sqlite3.Error) -> StorageError:
    if isinstance(exc, sqlite3.OperationalError):
        return StorageUnavailable(f"sqlite: {exc}")
    return StorageError(f"sqlite: {exc}")


class SqliteStore:
    """``storage.store.Store`` on one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._writer = _connect(path, readonly=False)
        self._write_limiter = trio.CapacityLimiter(1)
        self._readers = [_connect(path, readonly=True) for _ in range(READERS)]
        self._idle_send, self._idle = trio.open_memory_channel[sqlite3.Connection](READERS)
        for reader in self._readers:
            self._idle_send.send_nowait(reader)
        self._read_limiter = trio.CapacityLimiter(READERS)
        # The event loop's reader: it never waits for a lock (_read_inline).
        self._inline = _connect(path, readonly=True, busy_ms=0)

    def close(self) -> None:
        self._inline.close()
        for reader in self._readers:
            reader.close()
        self._writer.close()

    async def _run(self, fn: Callable[[], T], limiter: trio.CapacityLimiter) -> T:
        try:
            return await trio.to_thread.run_sync(fn, limiter=limiter)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` on an idle reader connection (each is used by one thread at a time)."""
        reader = await self._idle.receive()
        try:
            return await self._run(lambda: fn(reader), self._read_limiter)
        finally:
            self._idle_send.send_nowait(reader)

    async def _read_inline(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn``, a few indexed lookups, on the event loop's own reader connection,
        for the reads every connect makes: a thread hop cost more than the lookups, and
        its short-lived objects, made between each session's long-lived ones, kept 3 KiB
        of pymalloc pools alive per idle session (BENCHMARKS.md, "Connects and idle
        memory"). This connection never waits for a lock: locked (only while SQLite
        recovers a crashed writer's log: this node is the file's only writer) is
        ``StorageUnavailable`` at once, which callers retry."""
        await trio.lowlevel.checkpoint_if_cancelled()
        try:
            return fn(self._inline)
        except sqlite3.Error as exc:
            raise _translate(exc) from exc
        finally:
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> Callable[[], T]:
        def run() -> T:
            conn = self._writer
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return result

        return run

    # --- schema -----------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Apply pending migrations (blocking; called once at start)."""
        conn = self._writer
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at INTEGER NOT NULL)"
        )
        done = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
        applied = []
        for m in migrations_for("sqlite"):
            if m.version in done:
                continue
            record = (
                "INSERT INTO schema_migrations (version, name, applied_at)"
                f" VALUES ({m.version}, '{m.name}', {int(time.time())});"
            )
            try:
                conn.executescript(f"BEGIN IMMEDIATE;\n{m.sql}\n;{record}\nCOMMIT;")
            except sqlite3.Error:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            applied.append(f"{m.version:04d}_{m.name}")
        return applied

    # --- runs -------------------------------------------------------------------------

    async def begin_run(self, *, shared: bool = False) -> RunInfo:
        if shared:
            raise StorageConfigError("SQLite serves one node: a cluster needs PostgreSQL")

        def begin(conn: sqlite3.Connection) -> RunInfo:
            cur = conn.execute(
                "INSERT INTO runs (started_at) VALUES (?)", (int(time.time() * 1000),)
            )
            assert cur.lastrowid is not None
            # One node per file (the lock file), so any dirty room is a crashed run's.
            rotated = conn.execute(
                "UPDATE rooms SET epoch = lower(hex(randomblob(8))), dirty_run = NULL"
                " WHERE dirty_run IS NOT NULL"
            ).rowcount
            return RunInfo(run=cur.lastrowid, rotated_rooms=rotated)

        return await self._run(self._transaction(begin), self._write_limiter)

    async def end_run(self, run: int) -> None:
        def end(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE rooms SET dirty_run = NULL WHERE dirty_run = ?", (run,))
            conn.execute(
                "UPDATE runs SET stopped_at = ? WHERE id = ?", (int(time.time() * 1000), run)
            )

        await self._run(self._transaction(end), self._write_limiter)

    # --- rooms ------------------------------------------------------------------------

    async def load_room(self, room: str, run: int, recent: int) -> RoomSnapshot | None:
        def load(conn: sqlite3.Connection) -> RoomSnapshot | None:
            row = conn.execute(
                "SELECT kind, owner, epoch, dirty_run FROM rooms WHERE id = ?", (room,)
            ).fetchone()
            if row is None:
                return None
            kind, owner, epoch, dirty = row
            if dirty != run:
                conn.execute("UPDATE rooms SET dirty_run = ? WHERE id = ?", (run, room))
            members = frozenset(
                u for (u,) in conn.execute("SELECT user FROM members WHERE room = ?", (room,))
            )
            rows = conn.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = ? ORDER BY seq DESC LIMIT ?",
                (room, recent),
            ).fetchall()
            msgs = tuple(message_of(room, r) for r in reversed(rows))
            if msgs:
                seq = msgs[-1].seq
            else:
                (top,) = conn.execute(
                    "SELECT coalesce(max(seq), 0) FROM messages WHERE room = ?", (room,)
                ).fetchone()
                seq = top
            cursors = conn.execute(
                "SELECT r.user, r.delivered, r.read FROM receipts r JOIN members m"
                " ON m.room = r.room AND m.user = r.user WHERE r.room = ?",
                (room,),
            ).fetchall()
            return RoomSnapshot(
                room=room,
                kind=RoomKind(kind),
                owner=owner,
                epoch=epoch,
                members=members,
                seq=seq,
                recent=msgs,
                cursors=tuple(cursors),
            )

        return await self._run(self._transaction(load), self._write_limiter)

    async def claim(self, kind: str, key: str, run: int) -> Claim:
        # One node per file (the lock file): nobody else holds anything to fence off.
        return Claim(token=1, rotated=False)

    async def write_batch(
        self, records: Sequence[Record], fences: Sequence[Fence | None] = ()
    ) -> frozenset[Fence]:
        def write(conn: sqlite3.Connection) -> None:
            # Runs of one record type go through executemany; order across runs is kept
            # so that an add and a remove of the same member land in the order made.
            feed: list[Record] = []
            for kind, run in itertools.groupby(records, key=type):
                if kind in FEED_RECORDS:
                    feed.extend(run)  # written together, after (see FeedRows)
                elif kind is Message:
                    conn.executemany(_INSERT_MESSAGE, [message_row(cast(Message, m)) for m in run])
                elif kind is RoomCreated:
                    for r in run:
                        assert isinstance(r, RoomCreated)
                        conn.execute(
                            "INSERT INTO rooms (id, kind, owner, epoch, created_at, dirty_run)"
                            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                            (r.room, int(r.kind), r.owner, r.epoch, r.ts, r.run),
                        )
                        conn.executemany(_ADD_MEMBER, [(r.room, u, r.ts) for u in r.members])
                elif kind is MemberChanged:
                    for added, rows in toggle_runs(cast(Iterable[MemberChanged], run)):
                        conn.executemany(_ADD_MEMBER if added else _REMOVE_MEMBER, rows)
                elif kind is ReceiptUpsert:
                    receipts = cast(Iterable[ReceiptUpsert], run)
                    conn.executemany(
                        _UPSERT_RECEIPT, [(r.room, r.user, r.delivered, r.read) for r in receipts]
                    )
                elif kind is UserSeen:
                    seen = cast(Iterable[UserSeen], run)
                    conn.executemany(
                        _UPSERT_USER, [(r.user, int(r.status), r.last_seen) for r in seen]
                    )
                elif kind is BlockChanged:
                    for added, rows in toggle_runs(cast(Iterable[BlockChanged], run)):
                        conn.executemany(_ADD_BLOCK if added else _REMOVE_BLOCK, rows)
                elif kind is KvChange:
                    _write_kv(conn, cast(Iterable[KvChange], run))
                elif kind is KvCompacted:
                    for r in run:
                        assert isinstance(r, KvCompacted)
                        conn.execute(
                            "DELETE FROM kv WHERE user = ? AND deleted = 1 AND rev <= ?",
                            (r.user, r.floor),
                        )
                        conn.execute(_UPSERT_KV_HEAD, (r.user, r.floor, r.floor))
                        conn.execute(
                            "UPDATE kv_heads SET floor_hlc = ?, floor_dev = ? WHERE user = ?",
                            (r.floor_hlc, r.floor_dev, r.user),
                        )
                elif kind is RoomReleased:
                    conn.executemany(
                        "UPDATE rooms SET dirty_run = NULL WHERE id = ? AND dirty_run = ?",
                        [(r.room, r.run) for r in cast(Iterable[RoomReleased], run)],
                    )
                else:
                    raise TypeError(f"not a record: {kind!r}")
            if feed:
                _write_feed(conn, feed_rows(feed))

        await self._run(self._transaction(write), self._write_limiter)
        return frozenset()

    # --- reads ------------------------------------------------------------------------

    async def fetch_messages(self, room: str, lo: int, hi: int) -> list[Message]:
        def fetch(reader: sqlite3.Connection) -> list[Message]:
            rows = reader.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages"
                " WHERE room = ? AND seq BETWEEN ? AND ? ORDER BY seq",
                (room, lo, hi),
            ).fetchall()
            return [message_of(room, r) for r in rows]

        return await self._read(fetch)

    async def find_message(self, room: str, user: str | None, cid: str) -> Message | None:
        def find(reader: sqlite3.Connection) -> Message | None:
            row = reader.execute(
                f"SELECT {MESSAGE_COLUMNS} FROM messages"
                " WHERE room = ? AND sender IS ? AND cid = ? ORDER BY seq LIMIT 1",
                (room, user, cid),
            ).fetchone()
            return None if row is None else message_of(room, row)

        return await self._read(find)

    async def list_rooms(self, after: str | None, limit: int) -> list[RoomSummary]:
        def rooms(reader: sqlite3.Connection) -> list[RoomSummary]:
            rows = reader.execute(
                "SELECT r.id, r.kind, r.owner,"
                " (SELECT count(*) FROM members m WHERE m.room = r.id),"
                " (SELECT coalesce(max(seq), 0) FROM messages g WHERE g.room = r.id)"
                " FROM rooms r WHERE r.id > ? ORDER BY r.id LIMIT ?",
                (after or "", limit),
            ).fetchall()
            return [
                RoomSummary(room=i, kind=RoomKind(k), owner=o, members=n, seq=s)
                for i, k, o, n, s in rows
            ]

        return await self._read(rooms)

    async def rooms_of(self, user: str, after: str | None, limit: int) -> list[RoomState]:
        def rooms(reader: sqlite3.Connection) -> list[RoomState]:
            rows = reader.execute(
                "SELECT r.id, r.kind, r.owner, r.epoch,"
                " (SELECT coalesce(max(seq), 0) FROM messages g WHERE g.room = r.id)"
                " FROM members m JOIN rooms r ON r.id = m.room"
                " WHERE m.user = ? AND m.room > ? ORDER BY m.room LIMIT ?",
                (user, after or "", limit),
            ).fetchall()
            return [
                RoomState(room=i, kind=RoomKind(k), owner=o, epoch=e, seq=s)
                for i, k, o, e, s in rows
            ]

        return await self._read(rooms)

    async def load_user(self, user: str) -> UserSnapshot:
        def load(reader: sqlite3.Connection) -> UserSnapshot:
            row = reader.execute(
                "SELECT status, last_seen FROM users WHERE id = ?", (user,)
            ).fetchone()
            blocks = frozenset(
                o for (o,) in reader.execute("SELECT other FROM blocks WHERE user = ?", (user,))
            )
            blocks = blocks or _NO_BLOCKS  # one empty set for every user who blocks nobody
            if row is None:
                return UserSnapshot(blocks=blocks)
            return UserSnapshot(status=Status(row[0]), last_seen=row[1], blocks=blocks)

        return await self._read_inline(load)

    async def load_kv(self, user: str) -> KvSnapshot:
        def load(reader: sqlite3.Connection) -> KvSnapshot:
            # One read transaction for both reads: a head older than the entries would
            # give a revision out twice.
            reader.execute("BEGIN")
            try:
                return read(reader)
            finally:
                reader.execute("COMMIT")

        def read(reader: sqlite3.Connection) -> KvSnapshot:
            head = reader.execute(
                "SELECT rev, floor, floor_hlc, floor_dev FROM kv_heads WHERE user = ?", (user,)
            ).fetchone()
            if head is None:
                return KvSnapshot()
            rows = reader.execute(
                f"SELECT {KV_COLUMNS} FROM kv WHERE user = ? ORDER BY rev", (user,)
            )
            entries = tuple(kv_change_of(user, row) for row in rows)
            rev, floor, floor_hlc, floor_dev = head
            return KvSnapshot(
                rev=rev, floor=floor, floor_hlc=floor_hlc, floor_dev=floor_dev, entries=entries
            )

        return await self._read(load)

    async def room_exists(self, room: str) -> bool:
        def find(reader: sqlite3.Connection) -> bool:
            return (
                reader.execute("SELECT 1 FROM rooms WHERE id = ?", (room,)).fetchone() is not None
            )

        return await self._read(find)

    async def blockers(self, a: str, b: str) -> frozenset[str]:
        def find(reader: sqlite3.Connection) -> frozenset[str]:
            rows = reader.execute(
                "SELECT user FROM blocks"
                " WHERE (user = ? AND other = ?) OR (user = ? AND other = ?)",
                (a, b, b, a),
            )
            return frozenset(u for (u,) in rows)

        return await self._read(find)

    async def stored_presence(self, users: Sequence[str], viewer: str) -> list[StoredPresence]:
        def find(reader: sqlite3.Connection) -> list[StoredPresence]:
            marks = ", ".join("?" * len(users))
            hiding = {
                u
                for (u,) in reader.execute(
                    f"SELECT user FROM blocks WHERE other = ? AND user IN ({marks})",
                    (viewer, *users),
                )
            }
            rows = reader.execute(
                f"SELECT id, status, last_seen FROM users WHERE id IN ({marks})", tuple(users)
            )
            return [
                StoredPresence(user=u, status=Status(s), last_seen=t, hidden=u in hiding)
                for u, s, t in rows
            ]

        if not users:
            return []
        return await self._read(find)

    async def load_shard(self, shard: int, since: int) -> ShardSnapshot:
        def load(reader: sqlite3.Connection) -> ShardSnapshot:
            # One read transaction: the likers of exactly the posts loaded.
            reader.execute("BEGIN")
            try:
                return read(reader)
            finally:
                reader.execute("COMMIT")

        def read(reader: sqlite3.Connection) -> ShardSnapshot:
            last = reader.execute(
                "SELECT last_number FROM feed_shards WHERE shard = ?", (shard,)
            ).fetchone()
            posts = reader.execute(
                f"{POST_READ} WHERE p.shard = ? AND p.ts >= ? AND p.deleted_at IS NULL"
                " ORDER BY p.id",
                (shard, since),
            ).fetchall()
            likes = []
            if posts:
                likes = reader.execute(
                    "SELECT post, user FROM likes WHERE shard = ? AND post >= ?",
                    (shard, posts[0][0]),
                ).fetchall()
            return shard_snapshot(last and last[0], posts, likers_by_post(likes))

        return await self._read(load)

    async def load_post(self, post: int) -> StoredPost | None:
        def load(reader: sqlite3.Connection) -> StoredPost | None:
            row = reader.execute(f"{POST_READ} WHERE p.id = ?", (post,)).fetchone()
            if row is None:
                return None
            likers = reader.execute("SELECT user FROM likes WHERE post = ?", (post,))
            return stored_post_of(row, (u for (u,) in likers))

        return await self._read(load)

    async def find_post(self, author: str, cid: str) -> PostCreated | None:
        def find(reader: sqlite3.Connection) -> PostCreated | None:
            row = reader.execute(
                f"{POST_READ} WHERE p.author = ? AND p.cid = ?", (author, cid)
            ).fetchone()
            return None if row is None else stored_post_of(row, ()).created

        return await self._read(find)

    async def load_feed_profile(self, user: str) -> FeedProfile:
        def load(reader: sqlite3.Connection) -> FeedProfile:
            return feed_profile_of(reader.execute(_FEED_PROFILE, (user,)))

        return await self._read(load)

    async def ping(self) -> None:
        await self._read(lambda reader: reader.execute("SELECT 1").fetchone())


def _lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StorageConfigError(
            f"{path} is in use by another Parley node; SQLite serves one node"
        ) from None
    return fd


@asynccontextmanager
async def open_sqlite_store(url: str) -> AsyncIterator[SqliteStore]:
    """Open (creating if needed) and migrate the database at ``url``."""
    path = sqlite_path(url)
    if not path.parent.is_dir():
        raise StorageConfigError(f"directory {path.parent} for {path.name} does not exist")
    lock = _lock(path)
    try:
        try:
            store = await trio.to_thread.run_sync(SqliteStore, path)
        except sqlite3.Error as exc:
            raise StorageConfigError(f"cannot open {path}: {exc}") from exc
        try:
            await store._run(store.migrate, store._write_limiter)
            yield store
        finally:
            store.close()
    finally:
        os.close(lock)
