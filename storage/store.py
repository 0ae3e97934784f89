"""The store interface every backend implements, and the records it persists.

Actors never call a store on the hot path: they hand records to the write-behind queue
(``storage.write_behind``), which calls ``write_batch``. The reads here serve room
activation, history and resume. Backends translate their own exceptions into the
``StorageError`` family at this boundary, so nothing above knows which database runs.
"""

import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import attrs

from protocol.cbor import Raw
from protocol.frames import KvEntry, Message, RoomKind, RoomState, Status


class StorageError(Exception):
    """A store operation failed."""


def forget_tracebacks(exc: BaseException) -> None:
    """Drop the tracebacks of ``exc`` and of what caused it (groups included).

    A failed call into a driver leaves a cycle: its task holds the exception, whose
    traceback holds the frames that hold the task. The node's garbage collector runs
    hourly (ARCHITECTURE.md, "Garbage collection"), so such cycles are cut here. The
    messages stay for the logs; the frames are not touched (clearing a frame that
    belongs to a suspended coroutine would close it)."""
    seen: set[int] = set()
    pending = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        current.__traceback__ = None
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)


class StorageUnavailable(StorageError):
    """The database cannot be reached or is busy; retrying later may work."""


class StorageConfigError(StorageError):
    """The database URL or file cannot be used at all."""


@attrs.frozen(kw_only=True)
class RoomCreated:
    room: str
    kind: RoomKind
    owner: str | None
    epoch: str
    ts: int
    members: tuple[str, ...]
    run: int  # the run creating it has it open, like one that loads it (Store.load_room)


@attrs.frozen(kw_only=True)
class MemberChanged:
    room: str
    user: str
    added: bool
    ts: int


@attrs.frozen(kw_only=True)
class ReceiptUpsert:
    """Stored as an upsert that keeps the maximum of each cursor."""

    room: str
    user: str
    delivered: int
    read: int


@attrs.frozen(kw_only=True)
class UserSeen:
    """A user's chosen status, and when they went offline (None: unchanged)."""

    user: str
    status: Status
    last_seen: int | None


@attrs.frozen(kw_only=True)
class BlockChanged:
    user: str
    other: str
    blocked: bool
    ts: int


@attrs.frozen(kw_only=True)
class KvChange:
    """A kv entry of ``user`` as accepted at ``ts`` (server time). Stored only if its
    revision is above the stored one, so a replayed batch changes nothing."""

    user: str
    entry: KvEntry
    ts: int


@attrs.frozen(kw_only=True)
class KvCompacted:
    """``user``'s deletions up to revision ``floor`` are forgotten; ``(floor_hlc,
    floor_dev)`` is the greatest write among all deletions forgotten so far."""

    user: str
    floor: int
    floor_hlc: int
    floor_dev: str


@attrs.frozen(kw_only=True)
class RoomReleased:
    """A cluster node let ``room`` go with everything it wrote stored: the next node to
    take it keeps its epoch (``Store.claim``)."""

    room: str
    run: int


@attrs.frozen(kw_only=True)
class PostCreated:
    """A feed post. ``post`` is its id (``actors.feed_cells``: the number within its
    shard and the shard); ``(author, cid)`` is unique, for idempotent retries."""

    post: int
    author: str
    cid: str
    ts: int  # when it was made, ms since the Unix epoch
    lat: float
    lon: float
    category: str
    text: str | None = None
    data: Raw | None = None


@attrs.frozen(kw_only=True)
class PostDeleted:
    """Its author deleted ``post``: it leaves every feed; its row stays, marked."""

    post: int
    ts: int


@attrs.frozen(kw_only=True)
class LikeChanged:
    """``user`` likes ``post`` (or no longer does); a user counts once per post."""

    post: int
    user: str
    liked: bool
    ts: int


@attrs.frozen(kw_only=True)
class FollowChanged:
    """``user`` follows ``author`` (or stops)."""

    user: str
    author: str
    following: bool
    ts: int


@attrs.frozen(kw_only=True)
class InterestsSet:
    """``user``'s interests are now exactly ``categories``."""

    user: str
    categories: tuple[str, ...]
    ts: int


#: What the write-behind queue persists. A message is stored as its own frame.
Record = (
    Message
    | PostCreated
    | PostDeleted
    | LikeChanged
    | FollowChanged
    | InterestsSet
    | RoomCreated
    | RoomReleased
    | MemberChanged
    | ReceiptUpsert
    | UserSeen
    | BlockChanged
    | KvChange
    | KvCompacted
)


@attrs.frozen(kw_only=True)
class RoomSnapshot:
    """A room as storage knows it, for a Room actor that starts."""

    room: str
    kind: RoomKind
    owner: str | None
    epoch: str
    members: frozenset[str]
    seq: int
    recent: tuple[Message, ...]  # the newest messages, ascending seq
    cursors: tuple[tuple[str, int, int], ...] = ()  # (user, delivered, read) of members


@attrs.frozen(kw_only=True)
class UserSnapshot:
    """A user as storage knows it, for a User actor that starts."""

    status: Status = Status.ONLINE
    last_seen: int | None = None
    blocks: frozenset[str] = frozenset()  # users this user blocks


@attrs.frozen(kw_only=True)
class KvSnapshot:
    """A user's kv map as storage knows it: entries (deletions included) in revision
    order, the newest revision given out, and the newest deletion forgotten."""

    rev: int = 0
    floor: int = 0
    floor_hlc: int = 0
    floor_dev: str = ""
    entries: tuple[KvChange, ...] = ()


@attrs.frozen(kw_only=True)
class StoredPost:
    """A post as storage knows it, with its counts."""

    created: PostCreated
    likers: frozenset[str] = frozenset()  # users who like it now
    comments: int = 0  # messages in its comment room ``post:<id>`` (its highest seq)
    deleted: bool = False


@attrs.frozen(kw_only=True)
class ShardSnapshot:
    """A feed shard as storage knows it, for a FeedShard actor that starts."""

    last_number: int = 0  # the highest post number the shard ever gave out (0: none)
    posts: tuple[StoredPost, ...] = ()  # undeleted posts made at or after ``since``, by id


@attrs.frozen(kw_only=True)
class FeedProfile:
    """What a viewer's ranking needs to know of them."""

    follows: frozenset[str] = frozenset()  # authors they follow
    interests: frozenset[str] = frozenset()  # categories
    blocked_by: frozenset[str] = frozenset()  # users who block them


@attrs.frozen(kw_only=True)
class StoredPresence:
    user: str
    status: Status  # the status the user chose; the user is offline
    last_seen: int | None
    hidden: bool  # the user blocks the viewer, who may not see their presence


@attrs.frozen(kw_only=True)
class RoomSummary:
    room: str
    kind: RoomKind
    owner: str | None
    members: int
    seq: int


@attrs.define(eq=False)
class Fence:
    """An actor's claim on its rows when several nodes share the database.

    ``Store.claim`` hands out a new ``token`` for ``(kind, key)`` each time a node takes
    the actor. ``write_batch`` refuses, in the batch's own transaction, every record
    written under a token that is no longer the newest, and names its fence: a stale
    owner's writes never land, whatever it still believes. ``stale`` is then set, for the
    actor to see."""

    kind: str
    key: str
    token: int
    stale: bool = False
    on_stale: Callable[[], None] | None = None  # called once, when it turns stale


@attrs.frozen
class Claim:
    token: int
    rotated: bool  # a room got a new epoch: its last holder never let it go cleanly


@attrs.frozen(kw_only=True)
class RunInfo:
    run: int
    rotated_rooms: int  # rooms whose epoch changed because a run before this one crashed


class Store(Protocol):
    """What Parley needs from a database. All methods may raise ``StorageError``."""

    async def begin_run(self, *, shared: bool = False) -> RunInfo:
        """Record that this node starts. Alone on the database (not ``shared``): give new
        epochs to rooms a crashed run wrote. Shared by a cluster: ``claim`` does that, room
        by room, as nodes take them."""

    async def claim(self, kind: str, key: str, run: int) -> Claim:
        """Take actor ``(kind, key)`` for ``run``: a new fencing token, after which every
        write under an older token is refused. A room still marked by another run, which
        may have delivered messages it never stored, gets a new epoch."""

    async def end_run(self, run: int) -> None:
        """Record a clean stop: everything ``run`` wrote is stored."""

    async def load_room(self, room: str, run: int, recent: int) -> RoomSnapshot | None:
        """The room and its ``recent`` newest messages, marking it written by ``run``."""

    async def room_exists(self, room: str) -> bool:
        """Whether ``room`` was created (a read with no side effect, unlike load_room)."""

    async def write_batch(
        self, records: Sequence[Record], fences: Sequence[Fence | None] = ()
    ) -> frozenset[Fence]:
        """Store ``records`` in one transaction, in order. Idempotent per message seq.

        ``fences[i]`` (if given) is the claim record ``i`` was written under: records of a
        stale fence are left out, and the stale fences returned."""

    async def fetch_messages(self, room: str, lo: int, hi: int) -> list[Message]:
        """Messages with ``lo <= seq <= hi``, ascending."""

    async def find_message(self, room: str, user: str | None, cid: str) -> Message | None:
        """The message ``user`` sent to ``room`` with client id ``cid``, if stored."""

    async def list_rooms(self, after: str | None, limit: int) -> list[RoomSummary]:
        """Rooms in id order, starting after ``after``."""

    async def rooms_of(self, user: str, after: str | None, limit: int) -> list[RoomState]:
        """The rooms ``user`` is a member of, in id order, starting after ``after``."""

    async def load_user(self, user: str) -> UserSnapshot:
        """What a User actor starts from (defaults for a user never seen)."""

    async def load_kv(self, user: str) -> KvSnapshot:
        """``user``'s kv map (empty for a user who never wrote one)."""

    async def blockers(self, a: str, b: str) -> frozenset[str]:
        """Which of ``a`` and ``b`` blocks the other."""

    async def stored_presence(self, users: Sequence[str], viewer: str) -> list[StoredPresence]:
        """Status and last seen of ``users`` that storage knows, as ``viewer`` may see them."""

    async def load_shard(self, shard: int, since: int) -> ShardSnapshot:
        """Feed shard ``shard``'s undeleted posts made at or after ``since`` (ms), with
        their likers and comment counts, and the highest post number it gave out."""

    async def load_post(self, post: int) -> StoredPost | None:
        """One post, deleted or not, with its counts (None if never made)."""

    async def find_post(self, author: str, cid: str) -> PostCreated | None:
        """The post ``author`` made with client id ``cid``, deleted or not, if stored."""

    async def load_feed_profile(self, user: str) -> FeedProfile:
        """Whom ``user`` follows, their interests, and who blocks them."""

    async def ping(self) -> None:
        """Raise ``StorageUnavailable`` unless the database answers."""


POSTGRES_SCHEMES = ("postgresql", "postgres")
_PASSWORD_PARAM = re.compile(r"([?&]password=)[^&#]*")


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``: for every message and log line.

    Everything between ``//`` and the last ``@`` counts as user information, so a
    password holding ``/``, ``?`` or ``@`` is hidden too (at worst, more is hidden)."""
    head, slashes, rest = url.partition("//")
    userinfo, at, hosts = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    if at and colon:
        rest = f"{user}:***@{hosts}"
    return head + slashes + _PASSWORD_PARAM.sub(r"\1***", rest)


def check_database_url(url: str) -> None:
    """Raise ``StorageConfigError`` unless ``url`` says plainly which database it means.

    A PostgreSQL URL without a database name would connect to the server's default
    database (the user's name, or ``PGDATABASE``) and create Parley's tables there."""
    scheme = _scheme(url)
    if scheme == "sqlite":
        from storage.sqlite import sqlite_path

        sqlite_path(url)
    elif scheme in POSTGRES_SCHEMES:
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise StorageConfigError(f"bad database URL {redact_url(url)}: {exc}") from exc
        query = parse_qs(parts.query)
        named = parts.path.strip("/") or query.get("dbname") or query.get("database")
        if not named:
            raise StorageConfigError(
                f"{redact_url(url)} names no database: add its name, as in "
                "postgresql://user:password@host:5432/parley"
            )
    else:
        raise StorageConfigError(
            f"unsupported database URL {redact_url(url)}: use sqlite:///relative.db, "
            "sqlite:////absolute.db or postgresql://user:password@host:5432/database"
        )


def _scheme(url: str) -> str:
    return url.partition(":")[0].lower()


@asynccontextmanager
async def open_store(
    url: str, *, pool_size: int = 10, statement_timeout: float = 5.0
) -> AsyncIterator[Store]:
    """Open the backend named by ``url``, with its migrations applied. ``pool_size``
    and ``statement_timeout`` (seconds) apply to PostgreSQL."""
    check_database_url(url)
    if _scheme(url) == "sqlite":
        from storage.sqlite import open_sqlite_store

        async with open_sqlite_store(url) as store:
            yield store
    else:
        from storage.postgres import open_postgres_store

        async with open_postgres_store(
            url, pool_size=pool_size, statement_timeout=statement_timeout
        ) as pg:
            yield pg
