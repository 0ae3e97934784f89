"""What actors send each other: small frozen records, and a one-shot reply.

Sessions and the admin API talk to rooms and users only through these. A command
that needs an answer carries a ``Reply``; the hot path (``Publish`` from a session)
carries the session's outbox instead, so the room can answer without a round trip.
"""

import enum
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

import attrs
import trio

from actors.directory import ActorKind, Directory
from actors.outbox import Sink
from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.frames import (
    FeedItem,
    Frame,
    History,
    KvPut,
    KvSync,
    Message,
    Receipt,
    Receipts,
    RoomKind,
    Send,
    Status,
    TypingOp,
)
from protocol.wsframe import server_frame
from storage.store import FeedProfile
from storage.write_behind import Ticket

T = TypeVar("T")
log = logging.getLogger(__name__)


class RequestFailed(Exception):
    """An actor refused a request; ``code`` goes into the error frame."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Reply(Generic[T]):
    """The answer to one request, set once by the actor that handles it."""

    __slots__ = ("_done", "_error", "_value")

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: RequestFailed | None = None

    def set(self, value: T) -> None:
        if not self._done.is_set():
            self._value = value
            self._done.set()

    def fail(self, code: ErrorCode, message: str) -> None:
        if not self._done.is_set():
            self._error = RequestFailed(code, message)
            self._done.set()

    async def wait(self) -> T:
        """The value, or ``RequestFailed``. Callers bound this with ``trio.fail_after``."""
        await self._done.wait()
        error = self._error
        if error is not None:
            # A new exception each time: raising the stored one would give it a traceback
            # through this frame, which holds the reply, which holds it (a cycle).
            raise RequestFailed(error.code, error.message)
        return self._value  # type: ignore[return-value]


async def deliver(ref: trio.MemorySendChannel[Any], command: object) -> None:
    """Queue ``command`` in an actor's mailbox, waiting while it is full.

    Callers bound the wait (``trio.fail_after``): a full mailbox is back-pressure."""
    try:
        ref.send_nowait(command)
        return
    except trio.WouldBlock:
        pass
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        raise RequestFailed(ErrorCode.TRY_LATER, "actor stopped; retry") from None
    try:
        await ref.send(command)
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        raise RequestFailed(ErrorCode.TRY_LATER, "actor stopped; retry") from None


async def ask(
    directory: Directory, kind: ActorKind, key: str, command: object, reply: Reply[T]
) -> T:
    """Send ``command`` (which carries ``reply``) to an actor and wait for the answer."""
    await deliver(directory.ref(kind, key), command)
    return await reply.wait()


@contextmanager
def answer_within(seconds: float) -> Iterator[None]:
    """``trio.fail_after`` for requests: a timeout becomes ``RequestFailed(TIMEOUT)``."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise RequestFailed(ErrorCode.TIMEOUT, "no answer in time") from None


# --- sessions -----------------------------------------------------------------------


@attrs.frozen(eq=False)
class SessionLink:
    """How other actors reach one session: its outbox, and its inbox for events.

    The inbox is a function (``Session.notify``), not a channel: a session handles each
    event synchronously without awaiting, so a task and a channel per session to carry
    them cost memory (3.4 KiB per idle session) and a task switch for nothing. The
    session still owns its state: the event is a frozen record, and the handler is the
    session's own code, run where trio lets no other code interleave."""

    id: str
    user: str
    outbox: Sink
    inbox: Callable[["SessionEvent"], None]


@attrs.frozen
class RoomDropped:
    """The session is no longer subscribed to ``room`` (the user left or was removed)."""

    room: str


@attrs.frozen
class Roster:
    """The members of a small room the session is subscribed to, whose presence it
    follows; None once the room is large (it then publishes an online count)."""

    room: str
    members: frozenset[str] | None


@attrs.frozen
class BlocksChanged:
    """The users this session's user blocks."""

    blocks: frozenset[str]


@attrs.frozen
class Refused:
    """An actor refused the session's request ``id`` (about ``room``): the session sends
    the error and counts it against the client's error budget, as its own."""

    code: ErrorCode
    message: str
    id: int | None
    room: str | None


@attrs.frozen
class ActorMoved:
    """An actor the session depends on (a room it subscribes to, its user, its kv map)
    now runs on another node, or its node is gone: the session ends with close code
    4009 and its client resumes, reaching the actor where it runs now."""

    kind: str
    key: str


@attrs.frozen
class FeedDirty:
    """A feed shard saw a change that may alter the page of the session's view ``view``."""

    view: int


@attrs.frozen
class FeedDelta:
    """Posts of feed shard ``shard`` rose for view ``view`` (its answer ``gen``): their
    new items, to merge into the page."""

    view: int
    shard: int
    gen: int
    items: tuple[FeedItem, ...]


@attrs.frozen
class ProfileChanged:
    """Whom the session's user follows, their interests, or who blocks them changed."""

    profile: FeedProfile


SessionEvent = (
    RoomDropped
    | Roster
    | BlocksChanged
    | Refused
    | ActorMoved
    | FeedDirty
    | FeedDelta
    | ProfileChanged
)


def tell_session(link: SessionLink, event: SessionEvent) -> None:
    """Hand ``event`` to a session; never blocks, and never raises into the caller (the
    session's handler is its own crash barrier). A session that has ended ignores it."""
    link.inbox(event)


# --- rooms --------------------------------------------------------------------------


class AttachMode(enum.Enum):
    JOIN = "join"  # subscribe; an open room makes the user a member first
    RESUME = "resume"  # subscribe; members only
    CREATE = "create"  # create the room, owned by the user, and subscribe
    DIRECT = "direct"  # find or create the direct room, and subscribe
    COMMENTS = "comments"  # find or create a post's comment room (open), and join it


@attrs.frozen(kw_only=True)
class Attach:
    link: SessionLink
    mode: AttachMode
    reply: "Reply[Attached]"
    kind: RoomKind = RoomKind.OPEN  # for CREATE
    owner: str | None = None  # for COMMENTS: the post's author
    since: int | None = None
    epoch: str | None = None


@attrs.frozen(kw_only=True)
class Attached:
    """The session is subscribed. It sends ``storage`` (a seq range to read), then the
    ``ring`` frames, then releases its outbox: every live frame is newer than ``seq``."""

    kind: RoomKind
    owner: str | None
    seq: int
    epoch: str
    recovered: bool | None
    ring: tuple[bytes, ...] = ()
    storage: tuple[int, int] | None = None
    cursor: tuple[int, int] = (0, 0)  # the user's own (delivered, read)
    state: tuple[bytes, ...] = ()  # frames after the replay: receipt state, online count
    members: frozenset[str] | None = None  # a small room's members (see Roster)
    pub: int = 0  # the room's broadcasts so far: another node relays only later ones


@attrs.frozen
class Detach:
    link: SessionLink


@attrs.frozen(kw_only=True)
class Publish:
    """Sequence and fan out a message. From a session (``link``): its outbox gets the
    sent-ack, its inbox a refusal. From the admin API (``user`` None): ``reply`` gets
    (seq, ts)."""

    user: str | None
    send: Send
    link: SessionLink | None = None
    reply: "Reply[tuple[int, int]] | None" = None


@attrs.frozen(kw_only=True)
class AddMember:
    """Invite (``by`` a member) or admin add (``by`` None)."""

    by: str | None
    user: str
    reply: Reply[None]


@attrs.frozen(kw_only=True)
class RemoveMember:
    """Leave (``by`` == ``user``) or admin removal (``by`` None)."""

    by: str | None
    user: str
    reply: Reply[None]


@attrs.frozen(kw_only=True)
class HistoryQuery:
    user: str
    query: History
    reply: "Reply[HistoryPlan]"


@attrs.frozen(kw_only=True)
class HistoryPlan:
    """Read ``storage`` (a seq range) and put it before ``items`` from memory."""

    epoch: str
    items: tuple[Message, ...]
    storage: tuple[int, int] | None
    more: bool


@attrs.frozen(kw_only=True)
class CreateRoom:
    """Admin API: create a room with its first members, subscribing nobody."""

    kind: RoomKind
    owner: str | None
    members: tuple[str, ...]
    reply: Reply[None]


@attrs.frozen(kw_only=True)
class RoomInfo:
    room: str
    kind: RoomKind
    owner: str | None
    epoch: str
    seq: int
    members: tuple[str, ...]
    online: tuple[str, ...]  # members with a subscribed session on this node


@attrs.frozen
class DescribeRoom:
    reply: "Reply[RoomInfo]"


@attrs.frozen(kw_only=True)
class MarkReceipt:
    """A receipt from a session: the ``ok`` goes to its outbox, a refusal to its inbox."""

    link: SessionLink
    receipt: Receipt


@attrs.frozen(kw_only=True)
class ReceiptQuery:
    user: str
    query: Receipts
    reply: "Reply[Frame]"


@attrs.frozen(kw_only=True)
class SetTyping:
    """The session's user starts or stops typing; nobody in ``hidden`` (whom they block)
    hears it. The ``ok`` goes to its outbox, a refusal to its inbox."""

    link: SessionLink
    op: TypingOp
    hidden: frozenset[str]
    id: int | None = None


@attrs.frozen(kw_only=True)
class SetBlock:
    """For a direct room: ``user`` blocks (or unblocks) the other member. ``ticket`` is
    the block's record: the room does not retire before it is stored. ``applied`` is set
    once the room refuses (or allows) accordingly, wherever it runs."""

    user: str
    blocked: bool
    ticket: Ticket
    applied: Reply[None] | None = None


@attrs.frozen
class FlushState:
    """Queue for storage what the room keeps for its next interval (a drain)."""

    reply: Reply[None]


@attrs.frozen
class Moved:
    """This node no longer runs the actor (placement gave it to another node)."""


RoomCommand = (
    Attach
    | Detach
    | Publish
    | AddMember
    | RemoveMember
    | HistoryQuery
    | CreateRoom
    | DescribeRoom
    | MarkReceipt
    | ReceiptQuery
    | SetTyping
    | SetBlock
    | FlushState
    | Moved
)

# --- users --------------------------------------------------------------------------


@attrs.frozen
class SessionOpened:
    """The user actor answers with ``BlocksChanged`` in the session's inbox."""

    link: SessionLink


@attrs.frozen
class SessionClosed:
    link: SessionLink


@attrs.frozen
class ChangeStatus:
    status: Status
    reply: Reply[None]


@attrs.frozen(kw_only=True)
class ChangeBlock:
    """Block or unblock ``other``; the reply is the record's ticket."""

    other: str
    blocked: bool
    reply: Reply[Ticket]


@attrs.frozen
class ForUser:
    """A frame published on ``user:<id>`` (a member event), for each of the user's
    sessions: through the mailbox, so a session that opened before it was published
    (its ``SessionOpened`` is queued ahead of it) gets it too."""

    frame: bytes


UserCommand = SessionOpened | SessionClosed | ChangeStatus | ChangeBlock | ForUser | Moved


# --- kv -------------------------------------------------------------------------------


@attrs.frozen
class KvRequest:
    """A ``kvput`` or ``kvsync`` from ``link``'s session, answered into its outbox."""

    link: SessionLink
    frame: KvPut | KvSync


KvCommand = KvRequest | Detach | Moved


def answer_once_stored(ticket: Ticket, link: SessionLink, frame: Frame) -> None:
    """``frame`` (an answer to request ``frame.id``) into ``link``'s outbox once ``ticket``
    is stored; TRY_LATER if storage refuses it (another node runs the actor now)."""
    ticket.then(link.outbox.append, server_frame(encode(frame)))
    refuse_if_moved(ticket, link, getattr(frame, "id", None))


def refuse_if_moved(ticket: Ticket, link: SessionLink, request: int | None) -> None:
    """TRY_LATER to request ``request`` if storage refuses ``ticket``'s records."""
    ticket.otherwise(_tell_moved, (link, request))


def _tell_moved(args: tuple[SessionLink, int | None]) -> None:
    link, request = args
    tell_session(link, Refused(ErrorCode.TRY_LATER, "moved to another node; retry", request, None))


def request_id(record: object) -> int | None:
    """The client's request id a command answers, for a refusal."""
    if type(record) is Publish:
        return record.send.id
    if type(record) is MarkReceipt:
        return record.receipt.id
    if type(record) is SetTyping:
        return record.id
    frame = getattr(record, "frame", None)  # kv and feed requests
    if isinstance(frame, Frame):
        rid: int | None = getattr(frame, "id", None)
        return rid
    return None


def refuse(record: object, code: ErrorCode, message: str, room: str | None = None) -> None:
    """Answer a command that cannot be handled, whichever way it expects its answer."""
    reply = getattr(record, "reply", None)
    if isinstance(reply, Reply):
        reply.fail(code, message)
        return
    link = getattr(record, "link", None)
    rid = request_id(record)
    if isinstance(link, SessionLink) and rid is not None:
        link.inbox(Refused(code, message, rid, room))
