"""The frames of the Parley protocol, version 1.

Every WebSocket binary message is one CBOR map. Key 0 holds the frame type; every
other key is a field number from one table shared by all frames (``FIELD_KEYS``), so a
client needs one dictionary, and a load generator can pick ``seq`` (3) out of any frame
without knowing its type. Unknown keys are ignored. PROTOCOL.md is the reference for
mobile developers; the classes here are its executable form.
"""

from enum import IntEnum
from typing import Any, ClassVar

import attrs

from protocol.cbor import Raw

PROTOCOL_VERSION = 1

#: Field name -> CBOR map key. Never renumber: clients in the field depend on it.
FIELD_KEYS: dict[str, int] = {
    "id": 1,
    "room": 2,
    "seq": 3,
    "ts": 4,
    "user": 5,
    "cid": 6,
    "text": 7,
    "data": 8,
    "token": 9,
    "v": 10,
    "resume": 11,
    "code": 12,
    "msg": 13,
    "before": 14,
    "after": 15,
    "limit": 16,
    "items": 17,
    "kind": 18,
    "epoch": 19,
    "recovered": 20,
    "session": 21,
    "ping": 22,
    "limits": 23,
    "more": 24,
    "retry": 25,
    "op": 26,
    "by": 27,
    "owner": 28,
    "delay": 29,
    "delivered": 30,
    "read": 31,
    "status": 32,
    "users": 33,
    "count": 34,
    "members": 35,
    "key": 36,
    "value": 37,
    "hlc": 38,
    "dev": 39,
    "rev": 40,
    "deleted": 41,
    "expect": 42,
    "reset": 43,
    "expires": 44,
    "post": 45,
    "lat": 46,
    "lon": 47,
    "radius": 48,
    "category": 49,
    "score": 50,
    "parts": 51,
    "likes": 52,
    "comments": 53,
    "view": 54,
    "rank": 55,
    "interests": 56,
    "posts": 57,
}
FIELD_NAMES: dict[int, str] = {key: name for name, key in FIELD_KEYS.items()}
TYPE_KEY = 0


class RoomKind(IntEnum):
    OPEN = 0  # any authenticated user may join
    PRIVATE = 1  # members only, added by the owner or the admin API
    DIRECT = 2  # exactly two users, found-or-created with a ``direct`` frame


class MemberOp(IntEnum):
    ADDED = 0
    REMOVED = 1


class TypingOp(IntEnum):
    START = 0
    STOP = 1


class Status(IntEnum):
    """A user's presence. A client sets online, away or dnd; offline is the server's."""

    OFFLINE = 0
    ONLINE = 1
    AWAY = 2
    DND = 3


class Frame:
    """Base of all frames; ``TYPE`` is the value of key 0."""

    TYPE: ClassVar[int]
    __slots__ = ()


# --- either direction -------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Ping(Frame):
    """Keep-alive. The server pings an idle client; a client may ping to measure RTT."""

    TYPE = 2
    id: int | None = None


@attrs.frozen(kw_only=True)
class Pong(Frame):
    """Answer to ``ping``, echoing its ``id``."""

    TYPE = 3
    id: int | None = None


# --- client to server ---------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Hello(Frame):
    """First frame of a session: authenticate, pick the version, resume rooms.

    ``resume`` maps a room to ``[last seen seq, epoch]``.
    """

    TYPE = 1
    v: int
    token: str
    resume: dict[str, tuple[int, str]] | None = None


@attrs.frozen(kw_only=True)
class Refresh(Frame):
    """Go on with a new token for the same user before the current one expires;
    answered ``ok`` with its ``expires``, or an error (the session keeps the old one)."""

    TYPE = 8
    id: int
    token: str


@attrs.frozen(kw_only=True)
class Create(Frame):
    """Create an open or private room; the creator owns it, joins it and subscribes."""

    TYPE = 10
    id: int
    room: str
    kind: RoomKind = RoomKind.OPEN


@attrs.frozen(kw_only=True)
class Join(Frame):
    """Subscribe this session to a room, becoming a member of an open room.

    With ``seq`` and ``epoch`` the server first replays what came after ``seq``.
    """

    TYPE = 11
    id: int
    room: str
    seq: int | None = None
    epoch: str | None = None


@attrs.frozen(kw_only=True)
class Leave(Frame):
    """Stop being a member of the room (every session of the user is unsubscribed)."""

    TYPE = 12
    id: int
    room: str


@attrs.frozen(kw_only=True)
class Invite(Frame):
    """Add ``user`` as a member of ``room``."""

    TYPE = 13
    id: int
    room: str
    user: str


@attrs.frozen(kw_only=True)
class Direct(Frame):
    """Find or create the direct room with ``user``, and subscribe to it."""

    TYPE = 14
    id: int
    user: str


@attrs.frozen(kw_only=True)
class Send(Frame):
    """Post a message. ``cid`` makes it idempotent; ``retry`` marks a resend."""

    TYPE = 15
    id: int
    room: str
    cid: str
    text: str | None = None
    data: dict[str, Any] | Raw | None = None  # Raw: as the server holds it
    retry: bool = False


@attrs.frozen(kw_only=True)
class History(Frame):
    """Fetch a page of a room's messages, newest first below ``before``, or oldest
    first above ``after``."""

    TYPE = 16
    id: int
    room: str
    before: int | None = None
    after: int | None = None
    limit: int | None = None


@attrs.frozen(kw_only=True)
class Rooms(Frame):
    """List the rooms the user is a member of, after ``room`` in id order."""

    TYPE = 18
    id: int
    room: str | None = None
    limit: int | None = None


@attrs.frozen(kw_only=True)
class Unsubscribe(Frame):
    """Stop receiving a room's events in this session; membership is kept."""

    TYPE = 17
    id: int
    room: str


@attrs.frozen(kw_only=True)
class Receipt(Frame):
    """This user has received (``delivered``) or read (``read``) ``room`` up to a seq.

    Each is a monotonic maximum per user (all devices together): a lower or repeated
    value changes nothing. ``read`` implies ``delivered``. With an ``id`` the server
    answers ``ok``; without one, only errors are answered.
    """

    TYPE = 30
    room: str
    delivered: int | None = None
    read: int | None = None
    id: int | None = None


@attrs.frozen(kw_only=True)
class Receipts(Frame):
    """Ask a room's receipt state. With ``limit``: counts for ``limit`` seqs from
    ``seq`` (``receiptcounts``). Without: the cursors of the members who have received
    ``seq`` (all members if ``seq`` is absent) (``receiptstate``)."""

    TYPE = 31
    id: int
    room: str
    seq: int | None = None
    limit: int | None = None


@attrs.frozen(kw_only=True)
class Typing(Frame):
    """Client to server: this user starts or stops typing in ``room`` (no ``user``).
    Server to client: ``user`` does. A start lasts a few seconds unless refreshed."""

    TYPE = 32
    room: str
    op: TypingOp = TypingOp.START
    user: str | None = None
    id: int | None = None


@attrs.frozen(kw_only=True)
class SetStatus(Frame):
    """Set this user's presence status: online, away or dnd."""

    TYPE = 33
    status: Status
    id: int | None = None


@attrs.frozen(kw_only=True)
class Who(Frame):
    """Ask the presence and last-seen time of ``users`` (answered by ``presencelist``)."""

    TYPE = 34
    id: int
    users: tuple[str, ...]


@attrs.frozen(kw_only=True)
class Watch(Frame):
    """Subscribe to the presence of ``users``; answered by ``presencelist``."""

    TYPE = 35
    id: int
    users: tuple[str, ...]


@attrs.frozen(kw_only=True)
class Unwatch(Frame):
    TYPE = 36
    id: int
    users: tuple[str, ...]


@attrs.frozen(kw_only=True)
class Block(Frame):
    """Block ``user``: no direct messages either way, no presence or typing of ours."""

    TYPE = 37
    id: int
    user: str


@attrs.frozen(kw_only=True)
class Unblock(Frame):
    TYPE = 38
    id: int
    user: str


@attrs.frozen(kw_only=True)
class Blocks(Frame):
    """List the users this user blocks (answered by ``blocklist``)."""

    TYPE = 39
    id: int


# --- server to client ---------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Welcome(Frame):
    """``expires``: when the token expires (ms since the Unix epoch); None: it does not."""

    TYPE = 4
    session: str
    user: str
    v: int
    ping: int
    ts: int
    limits: dict[str, int]
    expires: int | None = None


@attrs.frozen(kw_only=True)
class Error(Frame):
    TYPE = 5
    code: int
    msg: str
    id: int | None = None
    room: str | None = None


@attrs.frozen(kw_only=True)
class Goaway(Frame):
    """The server is going away: reconnect (elsewhere) after ``delay`` ms."""

    TYPE = 6
    msg: str
    delay: int | None = None


@attrs.frozen(kw_only=True)
class Ok(Frame):
    """Success. Answering ``refresh``: ``expires`` is when the new token expires."""

    TYPE = 7
    id: int
    expires: int | None = None


@attrs.frozen(kw_only=True)
class Joined(Frame):
    """The session is subscribed to ``room``; ``seq`` is the room's head when it was.

    Without ``id`` it reports the outcome of a room named in ``hello``'s ``resume``.
    """

    TYPE = 20
    room: str
    kind: RoomKind
    seq: int
    epoch: str
    id: int | None = None
    owner: str | None = None
    recovered: bool | None = None
    delivered: int | None = None  # this user's receipt cursor in the room, if not 0
    read: int | None = None


@attrs.frozen(kw_only=True)
class Sent(Frame):
    """Durable acknowledgement of a ``send``."""

    TYPE = 21
    id: int
    room: str
    cid: str
    seq: int
    ts: int


@attrs.frozen(kw_only=True)
class Message(Frame):
    """A message in a room. ``user`` is absent for messages the server published."""

    TYPE = 22
    room: str
    seq: int
    ts: int
    cid: str
    user: str | None = None
    text: str | None = None
    data: dict[str, Any] | Raw | None = None  # Raw: as the server holds it


@attrs.frozen(kw_only=True)
class Page(Frame):
    """Answer to ``history``: messages in ascending ``seq``."""

    TYPE = 23
    id: int
    room: str
    epoch: str
    items: tuple[Message, ...]
    more: bool = False


@attrs.frozen(kw_only=True)
class RoomState:
    """One room in a ``roomlist``; encoded as a map with the shared field keys."""

    room: str
    kind: RoomKind
    seq: int
    epoch: str
    owner: str | None = None


@attrs.frozen(kw_only=True)
class RoomList(Frame):
    """Answer to ``rooms``: the user's rooms in id order."""

    TYPE = 25
    id: int
    items: tuple[RoomState, ...]
    more: bool = False


@attrs.frozen(kw_only=True)
class Member(Frame):
    """``user`` was added to or removed from ``room`` (``by`` whom, if a user)."""

    TYPE = 24
    room: str
    user: str
    op: MemberOp
    kind: RoomKind | None = None
    by: str | None = None


@attrs.frozen(kw_only=True)
class Cursor:
    """One member's receipt position in a room; an item of ``receiptstate``."""

    user: str
    delivered: int = 0
    read: int = 0


@attrs.frozen(kw_only=True)
class ReceiptState(Frame):
    """Members' receipt cursors. As an event (no ``id``): the latest values of those
    that changed, at most one per room per receipt interval."""

    TYPE = 40
    room: str
    items: tuple[Cursor, ...]
    id: int | None = None
    more: bool = False


@attrs.frozen(kw_only=True)
class SeqCount:
    """How many members have received and read ``seq``; an item of ``receiptcounts``."""

    seq: int
    delivered: int = 0
    read: int = 0


@attrs.frozen(kw_only=True)
class ReceiptCounts(Frame):
    """Per-message counts out of ``members``: the receipt event of a large room, and the
    answer to ``receipts`` with a ``limit``."""

    TYPE = 41
    room: str
    members: int
    items: tuple[SeqCount, ...]
    id: int | None = None


@attrs.frozen(kw_only=True)
class Presence(Frame):
    """``user``'s presence changed. ``ts`` is their last-seen time when offline."""

    TYPE = 42
    user: str
    status: Status
    ts: int | None = None


@attrs.frozen(kw_only=True)
class PresenceState:
    """An item of ``presencelist``."""

    user: str
    status: Status
    ts: int | None = None


@attrs.frozen(kw_only=True)
class PresenceList(Frame):
    """Presence of several users: the answer to ``who`` and ``watch``, and, without
    ``id``, the online members of a room a session subscribes to."""

    TYPE = 43
    items: tuple[PresenceState, ...]
    id: int | None = None


@attrs.frozen(kw_only=True)
class Online(Frame):
    """How many members of a large room are online (instead of each one's presence)."""

    TYPE = 44
    room: str
    count: int


@attrs.frozen(kw_only=True)
class BlockList(Frame):
    TYPE = 45
    id: int
    users: tuple[str, ...]


@attrs.frozen(kw_only=True)
class KvWrite:
    """One change in a ``kvput``: set ``key`` to ``value`` (any CBOR item), or delete it.
    ``hlc`` is the device's hybrid logical clock (``protocol.hlc``); ``expect`` makes it
    a compare-and-set on the key's revision (0: the key must never have been written)."""

    key: str
    hlc: int
    value: Any = None
    deleted: bool = False
    expect: int | None = None


@attrs.frozen(kw_only=True)
class KvPut(Frame):
    """Write one or more keys of the user's map, as device ``dev``."""

    TYPE = 50
    id: int
    dev: str
    items: tuple[KvWrite, ...]


@attrs.frozen(kw_only=True)
class KvSync(Frame):
    """Changes with a revision above ``after``, oldest first; the first one also starts
    live ``kvchanged`` events for this session. ``reset``: the next page of a full
    listing, which began with a ``kvchanges`` of revision ``rev``."""

    TYPE = 51
    id: int
    after: int = 0
    limit: int | None = None
    reset: bool = False
    rev: int | None = None


@attrs.frozen(kw_only=True)
class KvEntry:
    """A key as the server keeps it: the winning write and the revision it got."""

    key: str
    rev: int
    hlc: int
    dev: str
    value: Any = None
    deleted: bool = False


@attrs.frozen(kw_only=True)
class KvResult:
    """The outcome of one ``kvwrite``. Applied (no ``code``): ``rev`` is its revision.
    Stale or conflict: the key's current entry, ``rev`` 0 if it has none. Refused:
    ``code`` and ``msg`` only."""

    key: str
    rev: int = 0
    code: int | None = None
    msg: str | None = None
    hlc: int | None = None
    dev: str | None = None
    value: Any = None
    deleted: bool = False


@attrs.frozen(kw_only=True)
class KvAck(Frame):
    """Answer to ``kvput`` once its changes are stored: one result per item, in order.
    ``hlc`` is the server's clock, for the device to observe; ``rev`` the map's revision
    if this session has synced (0 otherwise)."""

    TYPE = 52
    id: int
    hlc: int
    items: tuple[KvResult, ...]
    rev: int = 0


@attrs.frozen(kw_only=True)
class KvChanges(Frame):
    """Answer to ``kvsync``: entries in ascending ``rev``; ``rev`` is the map's revision.
    ``reset``: this begins a full listing of the map from revision 0 (the client asked
    from 0, or the changes since ``after`` are forgotten): drop what you have first."""

    TYPE = 53
    id: int
    rev: int
    items: tuple[KvEntry, ...]
    more: bool = False
    reset: bool = False


@attrs.frozen(kw_only=True)
class KvChanged(Frame):
    """Live: another session of the user changed these keys (stored already)."""

    TYPE = 54
    rev: int
    items: tuple[KvEntry, ...]


# --- feeds (PROTOCOL.md section "Feeds") --------------------------------------------


@attrs.frozen(kw_only=True)
class Post(Frame):
    """Make a feed post at ``(lat, lon)`` (degrees); ``cid`` makes it idempotent per
    author. Answered by ``posted`` once stored."""

    TYPE = 60
    id: int
    cid: str
    lat: float
    lon: float
    category: str
    text: str | None = None
    data: dict[str, Any] | Raw | None = None
    retry: bool = False


@attrs.frozen(kw_only=True)
class Unpost(Frame):
    """Delete one's own post: it leaves every feed (its comment room stays)."""

    TYPE = 61
    id: int
    post: int


@attrs.frozen(kw_only=True)
class Like(Frame):
    """Like ``post`` (idempotent: a user counts once)."""

    TYPE = 62
    id: int
    post: int


@attrs.frozen(kw_only=True)
class Unlike(Frame):
    TYPE = 63
    id: int
    post: int


@attrs.frozen(kw_only=True)
class Follow(Frame):
    """Follow ``user``'s posts (the subscription component of the ranking)."""

    TYPE = 64
    id: int
    user: str


@attrs.frozen(kw_only=True)
class Unfollow(Frame):
    TYPE = 65
    id: int
    user: str


@attrs.frozen(kw_only=True)
class Interests(Frame):
    """Set this user's interests: exactly these categories (the category component)."""

    TYPE = 66
    id: int
    interests: tuple[str, ...]


@attrs.frozen(kw_only=True)
class FeedOpen(Frame):
    """Open a feed view of the posts within ``radius`` metres of ``(lat, lon)``: answered
    by its first ``feedpage``, then ``feedchanged`` events."""

    TYPE = 67
    id: int
    lat: float
    lon: float
    radius: int
    limit: int | None = None


@attrs.frozen(kw_only=True)
class FeedMore(Frame):
    """The items of a view's snapshot after the first ``rank`` ones."""

    TYPE = 68
    id: int
    view: int
    rank: int
    limit: int | None = None


@attrs.frozen(kw_only=True)
class FeedClose(Frame):
    TYPE = 69
    id: int
    view: int


@attrs.frozen(kw_only=True)
class Posted(Frame):
    """Durable acknowledgement of a ``post``: its id and time."""

    TYPE = 70
    id: int
    post: int
    cid: str
    ts: int


@attrs.frozen(kw_only=True)
class FeedItem:
    """A post in a feed, as one viewer ranks it: ``score`` and its five ``parts`` (geo,
    freshness, popularity, subscription, category) at the page's ``ts``."""

    post: int
    user: str
    ts: int
    lat: float
    lon: float
    category: str
    likes: int
    comments: int
    score: float
    parts: tuple[float, ...]
    text: str | None = None
    data: dict[str, Any] | Raw | None = None


@attrs.frozen(kw_only=True)
class FeedPage(Frame):
    """A page of view ``view`` ranked at instant ``ts``: the answer to ``feedopen`` (the
    live page) and to ``feedmore`` (from the snapshot)."""

    TYPE = 71
    id: int
    view: int
    ts: int
    items: tuple[FeedItem, ...]
    more: bool = False


@attrs.frozen(kw_only=True)
class FeedChanged(Frame):
    """The live page of ``view`` changed: ``posts`` is the whole new page, in rank order;
    ``items`` are those of its posts that entered or changed (score, counts)."""

    TYPE = 72
    view: int
    ts: int
    posts: tuple[int, ...]
    items: tuple[FeedItem, ...] = ()


CLIENT_FRAMES: tuple[type[Frame], ...] = (
    Hello,
    Refresh,
    Ping,
    Pong,
    Create,
    Join,
    Leave,
    Invite,
    Direct,
    Send,
    History,
    Unsubscribe,
    Rooms,
    Receipt,
    Receipts,
    Typing,
    SetStatus,
    Who,
    Watch,
    Unwatch,
    Block,
    Unblock,
    Blocks,
    KvPut,
    KvSync,
    Post,
    Unpost,
    Like,
    Unlike,
    Follow,
    Unfollow,
    Interests,
    FeedOpen,
    FeedMore,
    FeedClose,
)
SERVER_FRAMES: tuple[type[Frame], ...] = (
    Welcome,
    Ping,
    Pong,
    Error,
    Goaway,
    Ok,
    Joined,
    Sent,
    Message,
    Page,
    RoomList,
    Member,
    ReceiptState,
    ReceiptCounts,
    Typing,
    Presence,
    PresenceList,
    Online,
    BlockList,
    KvAck,
    KvChanges,
    KvChanged,
    Posted,
    FeedPage,
    FeedChanged,
)
