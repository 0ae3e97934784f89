"""The PostgreSQL store: asyncpg, hosted in one trio-asyncio loop.

asyncio stays in this module: every method crosses the bridge once
(``loop.run_aio_coroutine``), with the whole operation on one pooled connection on the
asyncio side, so a write-behind batch is one crossing and one transaction, whatever its
size. Errors become the ``StorageError`` family here: a refused or lost connection, a
statement timeout or a server shutting down is ``StorageUnavailable`` (the write-behind
queue keeps the batch and retries); anything else is a ``StorageError``.

The schema is the SQLite one in PostgreSQL types (``storage/migrations/postgres``).
Migrations run under an advisory lock, so nodes (or ``parley migrate``) starting
together apply each once. A node alone on its database (no Redis) takes a second
advisory lock for its lifetime in ``begin_run``, and a second such node is refused, as
the SQLite lock file does. Nodes of a cluster share the database instead: each actor
is fenced (``claim``, and the token check in ``write_batch``), so a node that lost an
actor to another cannot write for it.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar, cast

import asyncpg  # type: ignore[import-untyped]
import trio
import trio_asyncio  # type: ignore[import-untyped]

from protocol.errors import sole_exception
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
    forget_tracebacks,
    redact_url,
)

T = TypeVar("T")
log = logging.getLogger(__name__)
Conn = Any  # asyncpg.Connection: untyped
MIGRATION_LOCK = 7_261_701  # pg_advisory_lock key for migrations
NODE_LOCK = 7_261_702  # held by the node that serves this database
MIGRATION_TIMEOUT = 86_400.0
# Connection-level trouble, the server going away, a statement timeout, no resources:
# retrying later may work.
_UNAVAILABLE_CLASSES = ("08", "53", "57")
# And a transaction rolled back by a serialization failure or a deadlock; not the rest of
# class 40 (an integrity violation at commit fails again; "completion unknown" may have
# been applied).
_UNAVAILABLE_STATES = ("40001", "40P01")

# Batches of the big kinds are COPYed into a temporary staging table (one per
# connection, emptied at commit), then moved with one INSERT ... SELECT that keeps the
# upsert rules. Within a batch, a key may come more than once (a receipt cursor moving
# twice, a kv key written twice): the SELECT keeps the one that wins.
_MESSAGE_ROW = ("room", "seq", "ts", "sender", "cid", "text", "data")
_MESSAGES_FROM_STAGING = (
    "INSERT INTO messages SELECT * FROM staging_messages ON CONFLICT (room, seq) DO NOTHING"
)
_RECEIPT_ROW = ("room", "user", "delivered", "read")
_RECEIPTS_FROM_STAGING = (
    'INSERT INTO receipts (room, "user", delivered, read)'
    ' SELECT room, "user", max(delivered), max(read) FROM staging_receipts'
    ' GROUP BY room, "user" ON CONFLICT (room, "user") DO UPDATE SET'
    " delivered = greatest(receipts.delivered, excluded.delivered),"
    " read = greatest(receipts.read, excluded.read)"
)
# (add, remove) of the pair tables, written as toggle_runs gives them.
_TOGGLES: dict[type, tuple[str, str]] = {
    MemberChanged: (
        'INSERT INTO members (room, "user", added_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING',
        'DELETE FROM members WHERE room = $1 AND "user" = $2',
    ),
    BlockChanged: (
        'INSERT INTO blocks ("user", other, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING',
        'DELETE FROM blocks WHERE "user" = $1 AND other = $2',
    ),
}
_UPSERT_USER = (
    "INSERT INTO users (id, status, last_seen) VALUES ($1, $2, $3)"
    " ON CONFLICT (id) DO UPDATE SET status = excluded.status,"
    " last_seen = coalesce(greatest(users.last_seen, excluded.last_seen), users.last_seen)"
)
# The revision order is the last-writer-wins order (the KV actor gives revisions to
# winning writes only), so a late or replayed batch never overwrites a newer entry.
_KV_ROW = ("user", "key", "rev", "hlc", "dev", "value", "deleted", "ts")
_KV_FROM_STAGING = (
    'INSERT INTO kv ("user", key, rev, hlc, dev, value, deleted, ts)'
    ' SELECT DISTINCT ON ("user", key) "user", key, rev, hlc, dev, value, deleted, ts'
    ' FROM staging_kv ORDER BY "user", key, rev DESC'
    ' ON CONFLICT ("user", key) DO UPDATE SET rev = excluded.rev, hlc = excluded.hlc,'
    " dev = excluded.dev, value = excluded.value, deleted = excluded.deleted,"
    " ts = excluded.ts WHERE excluded.rev > kv.rev"
)
_UPSERT_KV_HEAD = (
    'INSERT INTO kv_heads ("user", rev, floor) VALUES ($1, $2, $3) ON CONFLICT ("user")'
    " DO UPDATE SET rev = greatest(kv_heads.rev, excluded.rev),"
    " floor = greatest(kv_heads.floor, excluded.floor)"
)
_INSERT_POST = (
    "INSERT INTO posts (id, shard, author, cid, ts, lat, lon, category, text, data)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) ON CONFLICT DO NOTHING"
)
_UPSERT_LAST_NUMBER = (
    "INSERT INTO feed_shards (shard, last_number) VALUES ($1, $2) ON CONFLICT (shard)"
    " DO UPDATE SET last_number = greatest(feed_shards.last_number, excluded.last_number)"
)
_FEED_PROFILE = (
    'SELECT 0, author FROM follows WHERE "user" = $1'
    ' UNION ALL SELECT 1, category FROM interests WHERE "user" = $1'
    ' UNION ALL SELECT 2, "user" FROM blocks WHERE other = $1'
)


def _translate(exc: Exception) -> StorageError:
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        if sqlstate[:2] in _UNAVAILABLE_CLASSES or sqlstate in _UNAVAILABLE_STATES:
            return StorageUnavailable(f"PostgreSQL: {exc}")
        return StorageError(f"PostgreSQL: {type(exc).__name__}: {exc}")
    if isinstance(exc, TimeoutError):  # asyncio's has no text; a socket's has its errno
        return StorageUnavailable(
            "PostgreSQL did not answer in time (a statement, the wait for a pooled "
            f"connection, or the call as a whole timed out){f': {exc}' if str(exc) else ''}"
        )
    if isinstance(exc, _ERRORS) or type(exc).__module__.startswith("asyncpg"):
        # Refused or lost connections, timeouts, and the driver's own state errors
        # (its connection is dropped from the pool): retrying later may work.
        return StorageUnavailable(f"PostgreSQL unreachable: {type(exc).__name__}: {exc}")
    return StorageError(f"PostgreSQL: {type(exc).__name__}: {exc}")  # a bug of ours


_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError)


class PostgresStore:
    def __init__(self, loop: Any, pool: Any, url: str, timeout: float) -> None:
        self._loop = loop
        self._pool = pool
        self._url = url
        self._timeout = timeout
        self._holder: Any = None  # the connection holding NODE_LOCK, once serving

    async def _on_conn(
        self, fn: Callable[[Conn], Awaitable[T]], *, transaction: bool, bound: float | None = None
    ) -> T:
        """Run ``fn`` with a pooled connection on the asyncio side: one crossing, given
        ``bound`` seconds in all (default: three statement timeouts)."""

        async def run() -> T:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                if not transaction:
                    return await fn(conn)
                async with conn.transaction():
                    return await fn(conn)

        # Shielded: a trio cancellation arriving mid-query would cancel the asyncio task
        # under asyncpg at an arbitrary point and could leave a pooled connection busy.
        # The asyncio side bounds the call instead (statement, acquire and overall
        # timeouts), so a cancelled caller waits at most that long.
        with trio.CancelScope(shield=True):
            try:
                bounded = asyncio.wait_for(run(), bound or self._timeout * 3)
                result: T = await self._loop.run_aio_coroutine(bounded)
            except Exception as exc:  # the driver's, the socket's, or a timeout
                forget_tracebacks(exc)
                raise _translate(exc) from exc
        return result

    async def _read(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._on_conn(fn, transaction=False)

    async def _write(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        return await self._on_conn(fn, transaction=True)

    # --- runs -------------------------------------------------------------------------

    async def begin_run(self, *, shared: bool = False) -> RunInfo:
        if not shared:
            await self._take_node_lock()

        async def begin(conn: Conn) -> RunInfo:
            run = await conn.fetchval(
                "INSERT INTO runs (started_at) VALUES ($1) RETURNING id", _now_ms()
            )
            if shared:
                return RunInfo(run=run, rotated_rooms=0)  # claim() rotates, room by room
            # One node per database (NODE_LOCK), so any dirty room is a crashed run's.
            status = await conn.execute(
                f"UPDATE rooms SET epoch = {_NEW_EPOCH}, dirty_run = NULL"
                " WHERE dirty_run IS NOT NULL"
            )
            return RunInfo(run=run, rotated_rooms=int(status.split()[-1]))

        return await self._write(begin)

    async def claim(self, kind: str, key: str, run: int) -> Claim:
        async def take(conn: Conn) -> Claim:
            token = await conn.fetchval(_CLAIM, kind, key)
            rotated = False
            if kind == "room":
                status = await conn.execute(
                    f"UPDATE rooms SET epoch = {_NEW_EPOCH}, dirty_run = NULL"
                    " WHERE id = $1 AND dirty_run IS NOT NULL AND dirty_run <> $2",
                    key,
                    run,
                )
                rotated = status.split()[-1] != "0"
            return Claim(token=token, rotated=rotated)

        return await self._write(take)

    async def _take_node_lock(self) -> None:
        if self._holder is not None:
            return
        try:
            with trio.CancelScope(shield=True):  # a connection must not leak
                self._holder = await self._loop.run_aio_coroutine(_lock_holder(self._url))
        except Exception as exc:
            raise _translate(exc) from exc
        if self._holder is None:
            raise StorageConfigError(
                "another Parley node serves this database; PostgreSQL serves one node "
                "until rooms are sequenced in Redis"
            )

    async def _check_node_lock(self) -> None:
        """The lock lives in one session: a database restart ends it. Take it again,
        or say loudly that another node has it."""

        async def check() -> Any:
            holder = self._holder
            if not holder.is_closed():
                try:
                    if await holder.fetchval(_HOLDS_NODE_LOCK, NODE_LOCK, timeout=self._timeout):
                        return holder
                except Exception:
                    pass  # a dead session: replaced below
            holder.terminate()
            return await _lock_holder(self._url)

        try:
            with trio.CancelScope(shield=True):
                self._holder = await self._loop.run_aio_coroutine(check())
        except Exception as exc:
            self._holder = _Lost()
            raise _translate(exc) from exc
        if self._holder is None:
            self._holder = _Lost()
            log.error("the node lock of this database is held by another node")
            raise StorageUnavailable("another Parley node took this database's node lock")

    async def _close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), 4)
        except (TimeoutError, *_ERRORS):
            self._pool.terminate()
        if self._holder is not None:
            self._holder.terminate()

    async def end_run(self, run: int) -> None:
        async def end(conn: Conn) -> None:
            await conn.execute("UPDATE rooms SET dirty_run = NULL WHERE dirty_run = $1", run)
            await conn.execute("UPDATE runs SET stopped_at = $1 WHERE id = $2", _now_ms(), run)

        await self._write(end)

    # --- rooms ------------------------------------------------------------------------

    async def load_room(self, room: str, run: int, recent: int) -> RoomSnapshot | None:
        async def load(conn: Conn) -> RoomSnapshot | None:
            row = await conn.fetchrow(
                "SELECT kind, owner, epoch, dirty_run FROM rooms WHERE id = $1", room
            )
            if row is None:
                return None
            kind, owner, epoch, dirty = row
            if dirty != run:
                await conn.execute("UPDATE rooms SET dirty_run = $1 WHERE id = $2", run, room)
            members = frozenset(
                r[0] for r in await conn.fetch('SELECT "user" FROM members WHERE room = $1', room)
            )
            rows = await conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = $1"
                " ORDER BY seq DESC LIMIT $2",
                room,
                recent,
            )
            msgs = tuple(message_of(room, r) for r in reversed(rows))
            if msgs:
                seq = msgs[-1].seq
            else:
                seq = await conn.fetchval(
                    "SELECT coalesce(max(seq), 0) FROM messages WHERE room = $1", room
                )
            cursors = await conn.fetch(
                'SELECT r."user", r.delivered, r.read FROM receipts r JOIN members m'
                ' ON m.room = r.room AND m."user" = r."user" WHERE r.room = $1',
                room,
            )
            return RoomSnapshot(
                room=room,
                kind=RoomKind(kind),
                owner=owner,
                epoch=epoch,
                members=members,
                seq=seq,
                recent=msgs,
                cursors=tuple((u, d, r) for u, d, r in cursors),
            )

        return await self._write(load)

    async def write_batch(
        self, records: Sequence[Record], fences: Sequence[Fence | None] = ()
    ) -> frozenset[Fence]:
        distinct = {f for f in fences if f is not None}
        # Messages, receipts, last-seen rows and feed records touch nothing the other
        # kinds do, so each goes in once per batch, whatever it is interleaved with:
        # messages and receipts by COPY into a staging table, last-seen rows in one
        # executemany (in order: the last status wins), feed records as FeedRows. The
        # other kinds go in runs, in the order made, so that an add and a remove (or a
        # kv change and a compaction) do not swap.
        loose: dict[type, list[Any]] = {Message: [], ReceiptUpsert: [], UserSeen: []}
        loose.update((kind, []) for kind in FEED_RECORDS)
        ordered: list[Record] = []
        for record in records:
            bucket = loose.get(type(record))
            if bucket is None:
                ordered.append(record)
            else:
                bucket.append(record)

        async def write(conn: Conn) -> frozenset[Fence]:
            stale = await _stale_fences(conn, distinct) if distinct else frozenset()
            if stale:
                _leave_out(stale, records, fences, loose, ordered)
            if loose[Message]:
                rows = [message_row(m) for m in loose[Message]]
                await _copy_in(conn, "messages", _MESSAGE_ROW, rows, _MESSAGES_FROM_STAGING)
            if loose[ReceiptUpsert]:
                rows = [(r.room, r.user, r.delivered, r.read) for r in loose[ReceiptUpsert]]
                await _copy_in(conn, "receipts", _RECEIPT_ROW, rows, _RECEIPTS_FROM_STAGING)
            if loose[UserSeen]:
                rows = [(r.user, int(r.status), r.last_seen) for r in loose[UserSeen]]
                await conn.executemany(_UPSERT_USER, rows)
            feed = [r for kind in FEED_RECORDS for r in loose[kind]]
            if feed:
                await _write_feed(conn, feed_rows(feed))
            for kind, run in itertools.groupby(ordered, key=type):
                batch = list(run)
                if kind is RoomCreated:
                    await _rooms_created(conn, cast(list[RoomCreated], batch))
                elif kind is MemberChanged or kind is BlockChanged:
                    add, remove = _TOGGLES[kind]
                    pairs = cast(list[MemberChanged] | list[BlockChanged], batch)
                    for added, rows in toggle_runs(pairs):
                        await conn.executemany(add if added else remove, rows)
                elif kind is KvChange:
                    rows, heads = kv_rows(cast(list[KvChange], batch))
                    await _copy_in(conn, "kv", _KV_ROW, rows, _KV_FROM_STAGING)
                    await conn.executemany(_UPSERT_KV_HEAD, [(u, r, 0) for u, r in heads.items()])
                elif kind is KvCompacted:
                    await _kv_compacted(conn, cast(list[KvCompacted], batch))
                elif kind is RoomReleased:
                    await conn.executemany(
                        "UPDATE rooms SET dirty_run = NULL WHERE id = $1 AND dirty_run = $2",
                        [(r.room, r.run) for r in cast(list[RoomReleased], batch)],
                    )
                else:
                    raise TypeError(f"not a record: {kind!r}")
            return stale

        # A large batch (a backlog after an outage) may take longer than a statement.
        bound = self._timeout * (3 + len(records) / 1000)
        return await self._on_conn(write, transaction=True, bound=bound)

    # --- reads ------------------------------------------------------------------------

    async def fetch_messages(self, room: str, lo: int, hi: int) -> list[Message]:
        async def fetch(conn: Conn) -> list[Message]:
            rows = await conn.fetch(
                f"SELECT {MESSAGE_COLUMNS} FROM messages"
                " WHERE room = $1 AND seq BETWEEN $2 AND $3 ORDER BY seq",
                room,
                lo,
                hi,
            )
            return [message_of(room, r) for r in rows]

        return await self._read(fetch)

    async def find_message(self, room: str, user: str | None, cid: str) -> Message | None:
        async def find(conn: Conn) -> Message | None:
            row = await conn.fetchrow(
                f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE room = $1"
                " AND sender IS NOT DISTINCT FROM $2 AND cid = $3 ORDER BY seq LIMIT 1",
                room,
                user,
                cid,
            )
            return None if row is None else message_of(room, row)

        return await self._read(find)

    async def list_rooms(self, after: str | None, limit: int) -> list[RoomSummary]:
        async def rooms(conn: Conn) -> list[RoomSummary]:
            rows = await conn.fetch(
                "SELECT r.id, r.kind, r.owner,"
                " (SELECT count(*) FROM members m WHERE m.room = r.id),"
                " (SELECT coalesce(max(seq), 0) FROM messages g WHERE g.room = r.id)"
                ' FROM rooms r WHERE r.id > $1 COLLATE "C" ORDER BY r.id COLLATE "C" LIMIT $2',
                after or "",
                limit,
            )
            return [
                RoomSummary(room=i, kind=RoomKind(k), owner=o, members=n, seq=s)
                for i, k, o, n, s in rows
            ]

        return await self._read(rooms)

    async def rooms_of(self, user: str, after: str | None, limit: int) -> list[RoomState]:
        async def rooms(conn: Conn) -> list[RoomState]:
            rows = await conn.fetch(
                "SELECT r.id, r.kind, r.owner, r.epoch,"
                " (SELECT coalesce(max(seq), 0) FROM messages g WHERE g.room = r.id)"
                " FROM members m JOIN rooms r ON r.id = m.room"
                ' WHERE m."user" = $1 AND m.room > $2 COLLATE "C"'
                ' ORDER BY m.room COLLATE "C" LIMIT $3',
                user,
                after or "",
                limit,
            )
            return [
                RoomState(room=i, kind=RoomKind(k), owner=o, epoch=e, seq=s)
                for i, k, o, e, s in rows
            ]

        return await self._read(rooms)

    async def load_user(self, user: str) -> UserSnapshot:
        async def load(conn: Conn) -> UserSnapshot:
            row = await conn.fetchrow("SELECT status, last_seen FROM users WHERE id = $1", user)
            blocks = frozenset(
                r[0] for r in await conn.fetch('SELECT other FROM blocks WHERE "user" = $1', user)
            )
            if row is None:
                return UserSnapshot(blocks=blocks)
            return UserSnapshot(status=Status(row[0]), last_seen=row[1], blocks=blocks)

        return await self._read(load)

    async def load_kv(self, user: str) -> KvSnapshot:
        async def load(conn: Conn) -> KvSnapshot:
            head = await conn.fetchrow(
                'SELECT rev, floor, floor_hlc, floor_dev FROM kv_heads WHERE "user" = $1', user
            )
            if head is None:
                return KvSnapshot()
            rows = await conn.fetch(
                f'SELECT {KV_COLUMNS} FROM kv WHERE "user" = $1 ORDER BY rev', user
            )
            rev, floor, floor_hlc, floor_dev = head
            return KvSnapshot(
                rev=rev,
                floor=floor,
                floor_hlc=floor_hlc,
                floor_dev=floor_dev,
                entries=tuple(kv_change_of(user, r) for r in rows),
            )

        async def snapshot(conn: Conn) -> KvSnapshot:
            # One snapshot for both reads: a head older than the entries would give a
            # revision out twice.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await load(conn)

        return await self._read(snapshot)

    async def room_exists(self, room: str) -> bool:
        async def find(conn: Conn) -> bool:
            return await conn.fetchval("SELECT 1 FROM rooms WHERE id = $1", room) is not None

        return await self._read(find)

    async def blockers(self, a: str, b: str) -> frozenset[str]:
        async def find(conn: Conn) -> frozenset[str]:
            rows = await conn.fetch(
                'SELECT "user" FROM blocks'
                ' WHERE ("user" = $1 AND other = $2) OR ("user" = $2 AND other = $1)',
                a,
                b,
            )
            return frozenset(r[0] for r in rows)

        return await self._read(find)

    async def stored_presence(self, users: Sequence[str], viewer: str) -> list[StoredPresence]:
        async def find(conn: Conn) -> list[StoredPresence]:
            hiding = {
                r[0]
                for r in await conn.fetch(
                    'SELECT "user" FROM blocks WHERE other = $1 AND "user" = ANY($2::text[])',
                    viewer,
                    list(users),
                )
            }
            rows = await conn.fetch(
                "SELECT id, status, last_seen FROM users WHERE id = ANY($1::text[])", list(users)
            )
            return [
                StoredPresence(user=u, status=Status(s), last_seen=t, hidden=u in hiding)
                for u, s, t in rows
            ]

        if not users:
            return []
        return await self._read(find)

    async def load_shard(self, shard: int, since: int) -> ShardSnapshot:
        async def load(conn: Conn) -> ShardSnapshot:
            last = await conn.fetchval(
                "SELECT last_number FROM feed_shards WHERE shard = $1", shard
            )
            posts = await conn.fetch(
                f"{POST_READ} WHERE p.shard = $1 AND p.ts >= $2 AND p.deleted_at IS NULL"
                " ORDER BY p.id",
                shard,
                since,
            )
            likers: dict[int, list[str]] = {}
            if posts:
                # Grouped here: a row per post, not one per like.
                likes = await conn.fetch(
                    'SELECT post, array_agg("user") FROM likes WHERE shard = $1 AND post >= $2'
                    " GROUP BY post",
                    shard,
                    posts[0][0],
                )
                likers = dict(likes)
            return shard_snapshot(last, posts, likers)

        async def snapshot(conn: Conn) -> ShardSnapshot:
            # One snapshot: the likers of exactly the posts loaded.
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                return await load(conn)

        return await self._read(snapshot)

    async def load_post(self, post: int) -> StoredPost | None:
        async def load(conn: Conn) -> StoredPost | None:
            row = await conn.fetchrow(f"{POST_READ} WHERE p.id = $1", post)
            if row is None:
                return None
            likers = await conn.fetch('SELECT "user" FROM likes WHERE post = $1', post)
            return stored_post_of(row, (r[0] for r in likers))

        return await self._read(load)

    async def find_post(self, author: str, cid: str) -> PostCreated | None:
        async def find(conn: Conn) -> PostCreated | None:
            row = await conn.fetchrow(
                f"{POST_READ} WHERE p.author = $1 AND p.cid = $2", author, cid
            )
            return None if row is None else stored_post_of(row, ()).created

        return await self._read(find)

    async def load_feed_profile(self, user: str) -> FeedProfile:
        async def load(conn: Conn) -> FeedProfile:
            return feed_profile_of(await conn.fetch(_FEED_PROFILE, user))

        return await self._read(load)

    async def ping(self) -> None:
        async def one(conn: Conn) -> None:
            await conn.fetchval("SELECT 1")

        await self._read(one)
        if self._holder is not None:
            await self._check_node_lock()


async def _copy_in(
    conn: Conn, table: str, columns: tuple[str, ...], rows: list[tuple[Any, ...]], move: str
) -> None:
    staging = f"staging_{table}"
    await conn.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {staging}"
        f" (LIKE {table} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
    )
    await conn.copy_records_to_table(staging, records=rows, columns=list(columns))
    await conn.execute(move)
    # Emptied now, not only at commit: a later run of the same kind in this batch
    # must not move these rows again (after a compaction, say).
    await conn.execute(f"DELETE FROM {staging}")


async def _write_feed(conn: Conn, rows: FeedRows) -> None:
    # executemany pipelines its statements: a batch of likes is one round trip.
    writes: tuple[tuple[str, list[Any]], ...] = (
        (_INSERT_POST, rows.posts),
        (_UPSERT_LAST_NUMBER, rows.numbers),
        ("UPDATE posts SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL", rows.deleted),
        (
            'INSERT INTO likes (post, "user", shard, ts) VALUES ($1, $2, $3, $4)'
            " ON CONFLICT DO NOTHING",
            rows.likes,
        ),
        ('DELETE FROM likes WHERE post = $1 AND "user" = $2', rows.unlikes),
        (
            'INSERT INTO follows ("user", author, ts) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING',
            rows.follows,
        ),
        ('DELETE FROM follows WHERE "user" = $1 AND author = $2', rows.unfollows),
    )
    for sql, batch in writes:
        if batch:
            await conn.executemany(sql, batch)
    if rows.interests:
        await conn.execute(
            'DELETE FROM interests WHERE "user" = ANY($1::text[])', list(rows.interests)
        )
        await conn.executemany(
            'INSERT INTO interests ("user", category) VALUES ($1, $2)',
            [(u, c) for u, categories in rows.interests.items() for c in categories],
        )


async def _stale_fences(conn: Conn, fences: set[Fence]) -> frozenset[Fence]:
    """The fences of ``fences`` that a newer claim replaced. FOR SHARE: a claim of one
    of these actors waits until this transaction ends."""
    pairs = {(f.kind, f.key) for f in fences}
    rows = await conn.fetch(
        "SELECT f.kind, f.key, f.token FROM fences f"
        " JOIN unnest($1::text[], $2::text[]) AS u(kind, key) USING (kind, key)"
        " FOR SHARE OF f",
        [k for k, _ in pairs],
        [k for _, k in pairs],
    )
    current = {(kind, key): token for kind, key, token in rows}
    return frozenset(f for f in fences if current.get((f.kind, f.key)) != f.token)


def _leave_out(
    stale: frozenset[Fence],
    records: Sequence[Record],
    fences: Sequence[Fence | None],
    loose: dict[type, list[Any]],
    ordered: list[Record],
) -> None:
    """Sort the batch again without the records of ``stale`` fences."""
    for kept in loose.values():
        kept.clear()
    ordered.clear()
    for i, record in enumerate(records):
        if i < len(fences) and fences[i] in stale:
            continue
        bucket = loose.get(type(record))
        if bucket is None:
            ordered.append(record)
        else:
            bucket.append(record)


async def _rooms_created(conn: Conn, records: list[RoomCreated]) -> None:
    await conn.executemany(
        "INSERT INTO rooms (id, kind, owner, epoch, created_at, dirty_run)"
        " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
        [(r.room, int(r.kind), r.owner, r.epoch, r.ts, r.run) for r in records],
    )
    await conn.executemany(
        _TOGGLES[MemberChanged][0], [(r.room, u, r.ts) for r in records for u in r.members]
    )


async def _kv_compacted(conn: Conn, records: list[KvCompacted]) -> None:
    for r in records:
        await conn.execute(
            'DELETE FROM kv WHERE "user" = $1 AND deleted AND rev <= $2', r.user, r.floor
        )
        await conn.execute(_UPSERT_KV_HEAD, r.user, r.floor, r.floor)
        await conn.execute(
            'UPDATE kv_heads SET floor_hlc = $1, floor_dev = $2 WHERE "user" = $3',
            r.floor_hlc,
            r.floor_dev,
            r.user,
        )


_CLAIM = (
    "INSERT INTO fences (kind, key, token) VALUES ($1, $2, 1) ON CONFLICT (kind, key)"
    " DO UPDATE SET token = fences.token + 1 RETURNING token"
)
_NEW_EPOCH = "substr(md5(random()::text || clock_timestamp()::text), 1, 16)"
_HOLDS_NODE_LOCK = (
    "SELECT count(*) > 0 FROM pg_locks WHERE locktype = 'advisory' AND classid = 0"
    " AND objid = $1 AND objsubid = 1 AND pid = pg_backend_pid() AND granted"
)
# The database notices a node that vanished without closing its connection (a dead
# host) within about a minute, and frees its lock.
_KEEPALIVES = {
    "tcp_keepalives_idle": "30",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "3",
    "application_name": "parley-node-lock",
}


async def _lock_holder(url: str) -> Any:
    """A connection holding NODE_LOCK, or None if another session has it."""
    holder = await asyncpg.connect(url, server_settings=_KEEPALIVES, timeout=10)
    try:
        if await holder.fetchval("SELECT pg_try_advisory_lock($1)", NODE_LOCK):
            return holder
    except BaseException:
        holder.terminate()
        raise
    await holder.close()
    return None


class _Lost:
    """Stands for a node lock that could not be checked or taken back: the next probe
    tries again."""

    def is_closed(self) -> bool:
        return True

    def terminate(self) -> None:
        pass


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _migrate(conn: Conn) -> list[str]:
    """Apply pending migrations, one transaction each, under an advisory lock.

    Without the statement timeout: a migration of a large table, or waiting for
    another node's migrations, may take long; the operator runs it on purpose."""
    await conn.execute("SET statement_timeout = 0")
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK, timeout=MIGRATION_TIMEOUT)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations"
            " (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at BIGINT NOT NULL)"
        )
        done = {r[0] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        applied = []
        for m in migrations_for("postgres"):
            if m.version in done:
                continue
            name = f"{m.version:04d}_{m.name}"
            try:
                async with conn.transaction():
                    await conn.execute(m.sql, timeout=MIGRATION_TIMEOUT)
                    await conn.execute(
                        "INSERT INTO schema_migrations (version, name, applied_at)"
                        " VALUES ($1, $2, $3)",
                        m.version,
                        m.name,
                        int(time.time()),
                    )
            except asyncpg.PostgresError as exc:
                # The operator must know which one: it rolled back whole, and the ones
                # before it stay applied.
                raise StorageConfigError(f"migration {name} failed: {exc}") from exc
            applied.append(name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
        await conn.execute("RESET statement_timeout")  # the pool's setting again


@asynccontextmanager
async def open_postgres_store(
    url: str, *, pool_size: int = 10, statement_timeout: float = 5.0
) -> AsyncIterator[PostgresStore]:
    """Connect and migrate; the store is usable until the block ends."""
    with sole_exception():  # the loop is a nursery: what leaves it comes as a group
        async with trio_asyncio.open_loop() as loop:
            async with _store_in(loop, url, pool_size, statement_timeout) as store:
                yield store


@asynccontextmanager
async def _store_in(
    loop: Any, url: str, pool_size: int, statement_timeout: float
) -> AsyncIterator[PostgresStore]:
    async def connect() -> Any:
        settings = {
            "statement_timeout": str(round(statement_timeout * 1000)),
            "application_name": "parley",
        }
        pool = await asyncpg.create_pool(
            url,
            min_size=1,
            max_size=pool_size,
            command_timeout=statement_timeout,
            server_settings=settings,
            timeout=statement_timeout,
        )
        try:
            async with pool.acquire() as conn:
                await _migrate(conn)
        except BaseException:
            pool.terminate()
            raise
        return pool

    try:
        pool = await loop.run_aio_coroutine(connect())
    except (*_ERRORS, ValueError, StorageConfigError) as exc:
        raise StorageConfigError(f"cannot use {redact_url(url)}: {exc}") from exc
    store = PostgresStore(loop, pool, url, statement_timeout)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await loop.run_aio_coroutine(store._close())
