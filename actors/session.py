"""The Session actor: one per client connection.

The connection (``server.connection``) feeds it each complete inbound message; the
session decodes it, enforces authentication, the rate limit and the error budget,
and turns it into commands for rooms and users. Requests are handled one at a time,
in arrival order, so a ``send`` that follows a ``join`` sees the join done. Replies go
into the session's outbox; a ``send`` does not wait for its room, whose sent-ack lands
in the outbox when the message is stored.

Subscribing (join, create, direct, resume) holds the outbox while the room's reply
and any replay are written, so the client reads: ``joined``, the messages it missed in
seq order, the room's receipt state, then live traffic, with no gap and no duplicate.

The session follows the presence of the members of its small rooms and of the users it
watches: one bus subscription per user however many rooms they share (``_follow``),
kept current by the rooms' ``Roster`` events.
"""

import logging
import math
import secrets
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import trio

from actors.directory import ActorKind
from actors.messages import (
    ActorMoved,
    AddMember,
    Attach,
    Attached,
    AttachMode,
    BlocksChanged,
    ChangeBlock,
    ChangeStatus,
    Detach,
    FeedDelta,
    FeedDirty,
    HistoryPlan,
    HistoryQuery,
    KvRequest,
    MarkReceipt,
    ProfileChanged,
    Publish,
    ReceiptQuery,
    Refused,
    RemoveMember,
    Reply,
    RequestFailed,
    RoomDropped,
    Roster,
    SessionClosed,
    SessionEvent,
    SessionLink,
    SessionOpened,
    SetBlock,
    SetTyping,
    answer_within,
    ask,
    deliver,
)
from actors.metrics import Metrics
from actors.outbox import Outbox
from actors.presence import PresenceNote
from actors.services import TOKEN_LEEWAY, Services
from actors.session_feeds import FEED_FRAMES, SessionFeeds
from actors.timers import Timer
from actors.token_bucket import TokenBucket
from protocol.codec import decode_client, encode, peek
from protocol.errors import CloseCode, ErrorCode, RemoteProtocolError
from protocol.frames import (
    PROTOCOL_VERSION,
    Block,
    BlockList,
    Blocks,
    Create,
    Direct,
    Error,
    Frame,
    Goaway,
    Hello,
    History,
    Invite,
    Join,
    Joined,
    KvPut,
    KvSync,
    Leave,
    Message,
    Ok,
    Page,
    Ping,
    Pong,
    Presence,
    PresenceList,
    PresenceState,
    Receipt,
    Receipts,
    Refresh,
    RoomList,
    Rooms,
    Send,
    Sent,
    SetStatus,
    Status,
    Typing,
    Unblock,
    Unsubscribe,
    Unwatch,
    Watch,
    Welcome,
    Who,
)
from protocol.limits import POST_PREFIX, ROOM_PAGE, direct_room_id
from protocol.wsframe import server_frame
from storage.store import StorageError
from storage.write_behind import Ticket

log = logging.getLogger(__name__)

REPLAY_CHUNK = 200  # messages read from storage at a time while replaying
BUSY_RECHECK = 1.0  # seconds between keep-alive checks while a request is running
# A frame costs one rate token, and one more per full RATE_BYTES: reading a frame is
# linear in its bytes (BENCHMARKS.md, "Decoding"), and a session sending the largest
# frames at the frame rate would hold most of a core.
RATE_BYTES = 4096


def frame_cost(size: int) -> int:
    """Rate tokens a client frame of ``size`` bytes takes."""
    return 1 + size // RATE_BYTES


# One empty set for every session that watches nobody: frozenset() makes a new one.
_NOBODY: frozenset[str] = frozenset()

# Keep-alive states (Session._on_timer).
_HELLO, _QUIET, _BUSY, _PINGED = range(4)

#: Closes the connection with a WebSocket close code and reason.
CloseFn = Callable[[CloseCode, str], None]


def _closed(code: CloseCode, reason: str) -> None:
    """A released session's close: its connection is over already."""


class Session:
    # Slots: a session has over 30 attributes, past which CPython's instance dicts stop
    # sharing their keys: 1.4 KiB more per idle session (BENCHMARKS.md, "Idle sessions").
    __slots__ = (
        "_alive_state",
        "_blocks_known",
        "_bucket",
        "_close_connection",
        "_due",
        "_errors",
        "_expires",
        "_feeds",
        "_following",
        "_kv",
        "_metrics",
        "_quiet_since",
        "_rosters",
        "_s",
        "_settings",
        "_timer",
        "_unfollow_fns",
        "_watched",
        "blocks",
        "busy",
        "closing",
        "ended",
        "going_away",
        "id",
        "last_inbound",
        "link",
        "opened_at",
        "outbox",
        "peer",
        "rooms",
        "user",
    )

    def __init__(self, services: Services, outbox: Outbox, close: CloseFn, peer: str) -> None:
        self._s = services
        self._settings = services.settings
        self._metrics: Metrics = services.metrics
        self.outbox = outbox
        self._close_connection = close
        self.peer = peer
        self.id = secrets.token_hex(8)
        self.user: str | None = None
        self.link: SessionLink | None = None
        # An ordered set: an empty dict is 64 B, an empty set 216 B, and most of a
        # node's sessions idle in few rooms or none.
        self.rooms: dict[str, None] = {}
        self.closing = False
        self.going_away = False
        self.busy = False  # a request is being handled
        self.ended = False  # the connection is over: no timers, no events
        now = trio.current_time()
        self.opened_at = now
        self.last_inbound = now
        self._bucket = TokenBucket(self._settings.rate, self._settings.burst, now)
        self._errors = TokenBucket(self._settings.error_refill, self._settings.error_budget, now)
        # Keep-alive: a timer on the node's timer task (actors.timers), not a task of
        # our own. _quiet_since is the last_inbound the running wait started from.
        self._alive_state = _HELLO
        self._quiet_since = now
        self._due = now + self._settings.hello_timeout
        self._expires = math.inf  # when the token expires, on the trio clock, leeway added
        self._timer: Timer = services.timers.call_at(self._due, self._on_timer)
        self.blocks: frozenset[str] | None = None  # whom the user blocks; None: not known yet
        self._blocks_known: trio.Event | None = None  # made when a request waits for it
        self._following: dict[str, int] = {}  # user -> reasons (rooms, a watch) to follow
        self._unfollow_fns: dict[str, Callable[[], None]] = {}
        self._rosters: dict[str, frozenset[str]] = {}  # small room -> members followed
        self._watched = _NOBODY  # replaced, not mutated: most sessions watch nobody
        self._kv = False  # has spoken to the user's kv actor, which may follow it
        self._feeds: SessionFeeds | None = None  # made by the first feed frame or event

    # --- driven by the connection -----------------------------------------------------

    def on_activity(self) -> None:
        """A complete frame from the client, of any kind, is a sign of life."""
        self.last_inbound = trio.current_time()

    async def on_message(self, payload: bytes) -> None:
        """Handle one complete binary WebSocket message."""
        if self.closing:
            return
        # Every frame counts against the rate limit, before anything is decoded; before
        # hello nothing but a hello is decoded at all. The type and id are read alone
        # (peek) to answer the others.
        if not self._bucket.take(trio.current_time(), frame_cost(len(payload))):
            self._error(ErrorCode.RATE_LIMITED, "slow down", request_id=peek(payload)[1])
            return
        if self.user is None:
            peeked, request_id = peek(payload)
            if peeked != Hello.TYPE:
                if peeked is None:
                    self._error(ErrorCode.BAD_FRAME, "not a frame", request_id=request_id)
                else:
                    self._error(
                        ErrorCode.NOT_AUTHENTICATED, "send hello first", request_id=request_id
                    )
                return
        try:
            frame = decode_client(payload, self._settings.limits)
        except RemoteProtocolError as exc:
            self._error(exc.code, exc.message, request_id=exc.request_id)
            return
        kind = type(frame)
        self._metrics.frames_in_by[kind].inc()
        if kind is Pong:
            return
        # While a request runs, the reader reads nothing (pongs included): the
        # keep-alive must not count that time as client silence.
        self.busy = True
        try:
            await self._dispatch(frame)
        except RequestFailed as exc:
            self._error(
                exc.code,
                exc.message,
                request_id=getattr(frame, "id", None),
                room=getattr(frame, "room", None),
            )
        finally:
            self.busy = False
            self.last_inbound = trio.current_time()
            if self._alive_state == _HELLO and self.user is not None:
                self._start_keepalive()

    def allow_control_frame(self) -> bool:
        """Whether a WebSocket ping may be answered: it takes a rate token."""
        return self._bucket.take(trio.current_time())

    def on_text(self, size: int) -> None:
        """A text message: refused, after it takes its rate tokens like any frame."""
        if not self._bucket.take(trio.current_time(), frame_cost(size)):
            self._error(ErrorCode.RATE_LIMITED, "slow down")
        else:
            self._error(ErrorCode.BAD_FRAME, "text messages are not part of the protocol")

    def goaway(self, message: str, delay_ms: int) -> None:
        """The node is draining: tell the client to reconnect elsewhere."""
        self.going_away = True
        self._send(Goaway(msg=message, delay=delay_ms))

    def notify(self, event: SessionEvent) -> None:
        """An event from another actor (the session's inbox, ``SessionLink.inbox``): called
        synchronously by the sender, so it never awaits. A bug here closes this session,
        never the sender."""
        if self.ended:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("session %s of %r failed on %r; closing it", self.id, self.user, event)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _on_event(self, event: SessionEvent) -> None:
        if type(event) is RoomDropped:
            self.rooms.pop(event.room, None)
            self._set_roster(event.room, None)
        elif type(event) is Roster:
            if event.room in self.rooms:
                added = self._set_roster(event.room, event.members)
                self._send_presence(added)
        elif type(event) is BlocksChanged:
            self.blocks = event.blocks
            if self._blocks_known is not None:
                self._blocks_known.set()
            if self._feeds is not None:
                self._feeds.blocks_changed(event.blocks)
        elif type(event) is FeedDelta or type(event) is FeedDirty or type(event) is ProfileChanged:
            self._feed_side().on_event(event)
        elif type(event) is Refused:
            self._error(event.code, event.message, request_id=event.id, room=event.room)
        elif type(event) is ActorMoved:
            # Its client resumes, and reaches the actor on the node that runs it now.
            self.close(CloseCode.MOVED, f"{event.kind} {event.key} moved; reconnect and resume")

    async def detach(self) -> None:
        """Leave every room and the user actor; called once the connection is over, under
        a shielded deadline. An actor not told (mailbox full until then) drops the closed
        outbox itself."""
        self.ended = True
        self._timer.cancel()
        link = self.link
        if link is None:
            return
        self.link = None
        self._metrics.sessions.dec()
        self._s.quotas.close_session(link.user)
        for unfollow in self._unfollow_fns.values():
            unfollow()
        self._unfollow_fns.clear()
        self._following.clear()
        targets: list[tuple[ActorKind, str, object]] = [
            (ActorKind.ROOM, room, Detach(link)) for room in self.rooms
        ]
        targets.append((ActorKind.USER, link.user, SessionClosed(link)))
        if self._kv:
            targets.append((ActorKind.KV, link.user, Detach(link)))
        self.rooms.clear()
        feeds, self._feeds = self._feeds, None
        if feeds is not None:
            await feeds.detach(link)
        for kind, key, command in targets:
            ref = self._s.directory.get(kind, key)
            if ref is None:
                continue
            try:
                await deliver(ref, command)
            except RequestFailed:
                pass  # the actor stopped: nothing to detach from

    # --- plumbing ---------------------------------------------------------------------

    def _send(self, frame: Frame) -> None:
        self.outbox.append(server_frame(encode(frame)))
        self._metrics.frames_out_by[type(frame)].inc()

    def _error(
        self,
        code: ErrorCode,
        message: str,
        *,
        request_id: int | None = None,
        room: str | None = None,
        charge: bool = True,
    ) -> None:
        self._send(Error(code=code, msg=message, id=request_id, room=room))
        self._metrics.errors_by[code].inc()
        # 3xx errors are the server's doing (draining, storage down): not the client's.
        if charge and code < 300 and not self._errors.take(trio.current_time()):
            self.close(CloseCode.TOO_MANY_ERRORS, "too many errors")

    def close(self, code: CloseCode, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self._metrics.closes_by[code].inc()
            self._close_connection(code, reason)

    async def _ask(self, kind: ActorKind, key: str, command: object, reply: Reply[Any]) -> Any:
        with answer_within(self._settings.request_timeout):
            return await ask(self._s.directory, kind, key, command, reply)

    async def _tell(self, ref: trio.MemorySendChannel[Any], command: object) -> None:
        try:
            ref.send_nowait(command)  # the usual case: no timeout scope to set up
            return
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        with answer_within(self._settings.request_timeout):
            await deliver(ref, command)

    # --- rooms named --------------------------------------------------------------------

    def _room_known(self, room: str) -> bool | None:
        """Count ``room`` among the rooms named this minute (refused beyond the quota);
        whether it exists, if known without a lookup: True when its actor runs, the
        usual case."""
        self._name_room(room)
        return self._s.rooms.known(room)

    async def _look_up(self, room: str, known: bool | None) -> None:
        """Refuse a request about a room that does not exist, which must cost no actor
        (actors.room_lookup); ``known`` is what ``_room_known`` said."""
        if known is None:
            known = await self._exists(room)
        if not known:
            raise RequestFailed(ErrorCode.NOT_FOUND, "no such room")

    async def _room_exists(self, room: str) -> bool:
        known = self._s.rooms.known(room)
        return known if known is not None else await self._exists(room)

    async def _exists(self, room: str) -> bool:
        try:
            with trio.fail_after(self._settings.request_timeout):
                return await self._s.rooms.exists(room)
        except (StorageError, trio.TooSlowError) as exc:
            raise RequestFailed(ErrorCode.TRY_LATER, "storage unavailable; retry") from exc

    def _name_room(self, room: str) -> None:
        """Count ``room`` among the distinct rooms the user named this minute."""
        assert self.user is not None
        if not self._s.quotas.name_room(self.user, room):
            limit = self._settings.quotas.rooms_per_minute
            raise RequestFailed(ErrorCode.QUOTA_EXCEEDED, f"over {limit} rooms named in a minute")

    # --- presence -----------------------------------------------------------------------

    def _follow(self, users: Iterable[str]) -> list[str]:
        """Count one more reason to follow each of ``users``; those newly followed."""
        added = []
        for user in users:
            if user == self.user:
                continue
            n = self._following.get(user, 0)
            if not n:
                channel = f"presence:{user}"
                self._unfollow_fns[user] = self._s.bus.subscribe(channel, self._on_presence)
                added.append(user)
            self._following[user] = n + 1
        return added

    def _unfollow(self, users: Iterable[str]) -> None:
        for user in users:
            n = self._following.get(user, 0) - 1
            if n > 0:
                self._following[user] = n
            elif n == 0:
                del self._following[user]
                self._unfollow_fns.pop(user)()

    def _set_roster(self, room: str, members: frozenset[str] | None) -> list[str]:
        old = self._rosters.pop(room, frozenset())
        new = members or frozenset()
        if members is not None:
            self._rosters[room] = members
        added = self._follow(new - old)
        self._unfollow(old - new)
        return added

    def _on_presence(self, note: object) -> None:
        assert isinstance(note, PresenceNote)
        if self.user in note.hidden or (note.only is not None and self.user not in note.only):
            return
        self.outbox.append(note.frame)
        self._metrics.frames_out_by[Presence].inc()

    def _presence_frame(self, users: Iterable[str]) -> bytes | None:
        """The online ones of ``users``, as one ``presencelist``; None if none is."""
        assert self.user is not None
        items = self._s.presence.visible(users, self.user)
        if not items:
            return None
        self._metrics.frames_out_by[PresenceList].inc()
        return server_frame(encode(PresenceList(items=tuple(items))))

    def _send_presence(self, users: list[str]) -> None:
        frame = self._presence_frame(users) if users else None
        if frame is not None:
            self.outbox.append(frame)

    # --- keep-alive -------------------------------------------------------------------
    #
    # The states of one wait, each with one timer armed (_arm):
    #   _HELLO     until opened_at + hello_timeout: no hello by then closes 4003;
    #   _QUIET     until _quiet_since + ping_interval: still quiet then, we ping;
    #   _BUSY      a request ran when the ping was due: look again a second later;
    #   _PINGED    until _quiet_since + ping_interval + pong_timeout: still quiet, close.
    # Any complete inbound frame moves last_inbound; a wait that ends finds it moved and starts
    # over from it, so nothing is rescheduled per inbound frame.
    # The same timer ends the session when its token expires (_expires): it is armed for
    # whichever comes first, and a wake-up before the state's deadline (_due) is one for
    # an expiry that a refresh has moved since.

    def _arm(self, deadline: float, state: int) -> None:
        self._alive_state = state
        self._due = deadline
        self._timer = self._s.timers.call_at(min(deadline, self._expires), self._on_timer)

    def _start_keepalive(self) -> None:
        """The hello is done: pings start from here, not from the hello deadline."""
        self._timer.cancel()
        self._wait_quiet()

    def _wait_quiet(self) -> None:
        self._quiet_since = self.last_inbound
        self._arm(self._quiet_since + self._settings.ping_interval, _QUIET)

    def _on_timer(self) -> None:
        if self.ended or self.closing:
            return
        now = trio.current_time()
        if now >= self._expires:
            self._error(ErrorCode.UNAUTHORIZED, "token expired", charge=False)
            self.close(CloseCode.TOKEN_EXPIRED, "token expired")
            return
        if now < self._due:
            self._timer = self._s.timers.call_at(min(self._due, self._expires), self._on_timer)
            return
        state = self._alive_state
        if state == _HELLO:
            if self.user is None:
                self.close(CloseCode.HELLO_TIMEOUT, "no hello")
            else:  # the hello is still being handled; its end starts the keep-alive
                self._arm(trio.current_time() + BUSY_RECHECK, _HELLO)
            return
        quiet = self.last_inbound == self._quiet_since
        if state == _QUIET and quiet:
            if self.busy:
                self._arm(trio.current_time() + BUSY_RECHECK, _BUSY)
            else:
                self._send(Ping())
                s = self._settings
                self._arm(self._quiet_since + s.ping_interval + s.pong_timeout, _PINGED)
        elif state == _PINGED and quiet and not self.busy:
            self.close(CloseCode.IDLE_TIMEOUT, "no pong")
        else:
            self._wait_quiet()

    # --- requests ---------------------------------------------------------------------

    async def _dispatch(self, frame: Frame) -> None:
        if type(frame) is Send:
            return await self._publish(frame)
        if type(frame) is Hello:
            return await self._hello(frame)
        if type(frame) is Ping:
            return self._send(Pong(id=frame.id))
        if type(frame) is Refresh:
            return self._refresh(frame)
        if type(frame) is Join:
            if frame.room.startswith(POST_PREFIX) and not await self._room_exists(frame.room):
                return await self._join_comments(frame)
            return await self._attach(
                frame.id, frame.room, AttachMode.JOIN, since=frame.seq, epoch=frame.epoch
            )
        if type(frame) is Create:
            return await self._attach(frame.id, frame.room, AttachMode.CREATE, kind=frame.kind)
        if type(frame) is Direct:
            assert self.user is not None
            if frame.user == self.user:
                raise RequestFailed(ErrorCode.INVALID, "a direct room needs another user")
            room = direct_room_id(self.user, frame.user)
            return await self._attach(frame.id, room, AttachMode.DIRECT)
        if type(frame) is History:
            if (known := self._room_known(frame.room)) is not True:
                await self._look_up(frame.room, known)
            return await self._history(frame)
        if type(frame) is Leave:
            if (known := self._room_known(frame.room)) is not True:
                await self._look_up(frame.room, known)
            return await self._member(frame.id, frame.room, self.user, remove=True)
        if type(frame) is Invite:
            if (known := self._room_known(frame.room)) is not True:
                await self._look_up(frame.room, known)
            return await self._member(frame.id, frame.room, frame.user, remove=False)
        if type(frame) is Unsubscribe:
            return await self._unsubscribe(frame)
        if type(frame) is Rooms:
            return await self._rooms(frame)
        if type(frame) is Receipt:
            assert self.link is not None
            if (known := self._room_known(frame.room)) is not True:
                await self._look_up(frame.room, known)
            command = MarkReceipt(link=self.link, receipt=frame)
            return await self._tell(self._s.directory.ref(ActorKind.ROOM, frame.room), command)
        if type(frame) is Typing:
            if (known := self._room_known(frame.room)) is not True:
                await self._look_up(frame.room, known)
            return await self._typing(frame)
        if type(frame) is KvPut or type(frame) is KvSync:
            assert self.user is not None and self.link is not None
            if self.going_away and type(frame) is KvPut:
                raise RequestFailed(ErrorCode.TRY_LATER, "server is going away; reconnect")
            self._kv = True
            ref = self._s.directory.ref(ActorKind.KV, self.user)
            return await self._tell(ref, KvRequest(self.link, frame))
        if type(frame) is Receipts:
            if (known := self._room_known(frame.room)) is not True:
                await self._look_up(frame.room, known)
            return await self._receipts(frame)
        if type(frame) is Who:
            items = await self._presence_of(frame.users)
            return self._send(PresenceList(id=frame.id, items=items))
        if type(frame) is Watch:
            return await self._watch(frame)
        if type(frame) is Unwatch:
            gone = self._watched.intersection(frame.users)
            self._watched = self._watched - gone
            self._unfollow(gone)
            return self._send(Ok(id=frame.id))
        if type(frame) is SetStatus:
            return await self._set_status(frame)
        if type(frame) is Block or type(frame) is Unblock:
            return await self._block(frame)
        if type(frame) is Blocks:
            blocks = await self.known_blocks()
            return self._send(BlockList(id=frame.id, users=tuple(sorted(blocks))))
        if type(frame) in FEED_FRAMES:
            return await self._feed_side().handle(frame)
        raise AssertionError(f"no handler for {frame!r}")

    def _feed_side(self) -> SessionFeeds:
        feeds = self._feeds
        if feeds is None:
            feeds = self._feeds = SessionFeeds(self)
        return feeds

    def release(self) -> None:
        """The connection is over and detached: drop what refers back to it, so that the
        connection and this session are freed by reference counting as soon as they are
        let go, not left to the cyclic collector (whose passes are the server's longest
        stalls: BENCHMARKS.md, "Stalls")."""
        self._close_connection = _closed
        self._timer.cancel()
        self._feeds = None
        self.link = None

    async def known_blocks(self) -> frozenset[str]:
        """Whom the user blocks, once the user actor has said (it may still be loading)."""
        with answer_within(self._settings.request_timeout):
            while self.blocks is None:
                if self._blocks_known is None:
                    self._blocks_known = trio.Event()
                await self._blocks_known.wait()
        return self.blocks

    async def _join_comments(self, frame: Join) -> None:
        """A post's comment room is made by the first to join it, if the post exists."""
        number = frame.room[len(POST_PREFIX) :]
        if not number.isdigit() or number != str(int(number)):
            raise RequestFailed(ErrorCode.NOT_FOUND, "no such room")
        author = await self._feed_side().post_author(int(number))
        await self._attach(
            frame.id,
            frame.room,
            AttachMode.COMMENTS,
            owner=author,
            since=frame.seq,
            epoch=frame.epoch,
        )

    async def _hello(self, hello: Hello) -> None:
        if self.user is not None:
            raise RequestFailed(ErrorCode.ALREADY_AUTHENTICATED, "this session said hello")
        if hello.v != PROTOCOL_VERSION:
            self._error(ErrorCode.UNSUPPORTED_VERSION, f"this server speaks v{PROTOCOL_VERSION}")
            self.close(CloseCode.UNSUPPORTED_VERSION, "unsupported version")
            return
        try:
            claims = self._s.verify_token(hello.token)
        except ValueError as exc:
            self._error(ErrorCode.UNAUTHORIZED, f"bad token: {exc}")
            self.close(CloseCode.UNAUTHORIZED, "bad token")
            return
        user = claims.user
        if self.going_away:
            raise RequestFailed(ErrorCode.TRY_LATER, "server is going away")
        if not self._s.quotas.open_session(user):
            limit = self._s.quotas.settings.max_sessions_per_user
            self._error(ErrorCode.QUOTA_EXCEEDED, f"at most {limit} sessions per user")
            self.close(CloseCode.TOO_MANY_SESSIONS, "too many sessions")
            return
        self.user = user
        self._set_expiry(claims.exp)
        self.link = SessionLink(self.id, user, self.outbox, self.notify)
        self._metrics.sessions.inc()
        # Told, not asked: a user actor that loads from storage first must not delay the
        # welcome. It sends the block list as soon as it has it.
        await self._tell(self._s.directory.ref(ActorKind.USER, user), SessionOpened(self.link))
        self._send(
            Welcome(
                session=self.id,
                user=user,
                v=PROTOCOL_VERSION,
                ping=round(self._settings.ping_interval),
                ts=self._s.now_ms(),
                limits=self._settings.limits.announce(),
                expires=None if claims.exp is None else claims.exp * 1000,
            )
        )
        for room, (seq, epoch) in (hello.resume or {}).items():
            try:
                await self._attach(None, room, AttachMode.RESUME, since=seq, epoch=epoch)
            except RequestFailed as exc:
                # Not the client's fault (it left, was removed): no charge to its budget.
                self._error(exc.code, exc.message, room=room, charge=False)

    def _set_expiry(self, exp: int | None) -> None:
        """The session ends at the token's expiry (Unix seconds), plus the leeway."""
        if exp is None:
            self._expires = math.inf
        else:
            left = exp - self._s.now_ms() / 1000
            self._expires = trio.current_time() + left + TOKEN_LEEWAY

    def _refresh(self, frame: Refresh) -> None:
        try:
            claims = self._s.verify_token(frame.token)
        except ValueError as exc:
            raise RequestFailed(ErrorCode.UNAUTHORIZED, f"bad token: {exc}") from None
        if claims.user != self.user:
            raise RequestFailed(ErrorCode.UNAUTHORIZED, "the token is for another user")
        self._set_expiry(claims.exp)
        self._timer.cancel()
        self._timer = self._s.timers.call_at(min(self._due, self._expires), self._on_timer)
        expires = None if claims.exp is None else claims.exp * 1000
        self._send(Ok(id=frame.id, expires=expires))

    async def _publish(self, send: Send) -> None:
        if self.going_away:
            raise RequestFailed(ErrorCode.TRY_LATER, "server is going away; reconnect")
        if (known := self._room_known(send.room)) is not True:
            await self._look_up(send.room, known)
        if send.retry and await self._ack_stored(send):
            return
        ref = self._s.directory.ref(ActorKind.ROOM, send.room)
        command = Publish(user=self.user, send=send, link=self.link)
        await self._tell(ref, command)

    async def _ack_stored(self, send: Send) -> bool:
        """Acknowledge a resend whose original is stored; False if it is not.

        Done here, not in the room, so a room never waits for storage. An original that
        is not stored yet is still in the room's window, which the room checks next."""
        try:
            with trio.fail_after(self._settings.request_timeout):
                found = await self._s.store.find_message(send.room, self.user, send.cid)
        except (StorageError, trio.TooSlowError) as exc:
            raise RequestFailed(ErrorCode.TRY_LATER, "storage unavailable; retry") from exc
        if found is None:
            return False
        self._send(Sent(id=send.id, room=send.room, cid=send.cid, seq=found.seq, ts=found.ts))
        return True

    async def _attach(
        self,
        request_id: int | None,
        room: str,
        mode: AttachMode,
        **options: Any,
    ) -> None:
        assert self.link is not None
        if mode is AttachMode.JOIN or mode is AttachMode.RESUME:
            if (known := self._room_known(room)) is not True:
                await self._look_up(room, known)
        elif mode is AttachMode.COMMENTS:
            self._name_room(room)  # made with its post: no creation quota
        elif (known := self._room_known(room)) is not True and not (
            self._s.quotas.may_create_room(self.link.user)
        ):
            # Out of creations: no actor is started for a room that would be a new one.
            if known is False or not await self._exists(room):
                self._metrics.quota_refusals.labels(quota="room_creations").inc()
                q = self._settings.quotas
                raise RequestFailed(
                    ErrorCode.QUOTA_EXCEEDED,
                    f"rooms created: {q.room_creation_burst} at once, "
                    f"{q.room_creations_per_hour:g} per hour; try later",
                )
        limit = self._settings.limits.max_rooms_per_session
        new = room not in self.rooms
        if new and len(self.rooms) >= limit:
            raise RequestFailed(ErrorCode.TOO_MANY_ROOMS, f"at most {limit} rooms per session")
        reply: Reply[Attached] = Reply()
        command = Attach(link=self.link, mode=mode, reply=reply, **options)
        self.rooms[room] = None  # first: if the session ends mid-request, detach() covers it
        outbox = self.outbox
        outbox.hold()  # live frames of the room wait until the replay is written
        try:
            try:
                attached: Attached = await self._ask(ActorKind.ROOM, room, command, reply)
            except RequestFailed as exc:
                if new:
                    self.rooms.pop(room, None)
                    ref = self._s.directory.get(ActorKind.ROOM, room)
                    if exc.code is ErrorCode.TIMEOUT and ref is not None:
                        await self._tell(ref, Detach(self.link))  # it may have subscribed us
                raise
            replay = await self._replay(room, attached)
            delivered, read = attached.cursor
            joined = Joined(
                id=request_id,
                room=room,
                kind=attached.kind,
                owner=attached.owner,
                seq=attached.seq,
                epoch=attached.epoch,
                recovered=attached.recovered if replay is not None else False,
                delivered=delivered or None,
                read=read or None,
            )
            outbox.append_direct(server_frame(encode(joined)))  # ahead of the held live frames
            self._metrics.frames_out_by[Joined].inc()
            if replay:
                for frame in replay:
                    outbox.append_direct(frame)
                self._metrics.frames_out_by[Message].inc(len(replay))
            for frame in attached.state:
                outbox.append_direct(frame)
            self._set_roster(room, attached.members)
            # Every online member, even one followed already (another room, a watch):
            # a client may keep who is online per room.
            others = attached.members - {self.link.user} if attached.members else None
            presence = self._presence_frame(others) if others else None
            if presence is not None:
                outbox.append_direct(presence)
        finally:
            outbox.release()

    async def _replay(self, room: str, attached: Attached) -> list[bytes] | None:
        """The frames of what the client missed, or None when they cannot be sent: storage
        failed, or they would not fit in the outbox, which would close the client as a
        slow consumer and do so again on every reconnect."""
        if not attached.recovered:
            return []
        budget = self._settings.outbox_bytes // 2
        size = sum(map(len, attached.ring))
        frames: list[bytes] = []
        if attached.storage is not None:
            lo, hi = attached.storage
            try:
                with trio.fail_after(self._settings.request_timeout):
                    while lo <= hi and size <= budget:
                        chunk = await self._s.store.fetch_messages(
                            room, lo, min(hi, lo + REPLAY_CHUNK - 1)
                        )
                        for message in chunk:
                            frames.append(server_frame(encode(message)))
                            size += len(frames[-1])
                        lo += REPLAY_CHUNK
            except (StorageError, trio.TooSlowError) as exc:
                log.warning("replay of %r failed: %s", room, exc)
                return None
        if size > budget:
            log.info("replay of %r is over %d bytes: the client refetches instead", room, budget)
            return None
        frames.extend(attached.ring)
        return frames

    async def _unsubscribe(self, frame: Unsubscribe) -> None:
        assert self.link is not None
        if frame.room in self.rooms:
            self.rooms.pop(frame.room, None)
            self._set_roster(frame.room, None)
            ref = self._s.directory.get(ActorKind.ROOM, frame.room)
            if ref is not None:
                await self._tell(ref, Detach(self.link))
        self._send(Ok(id=frame.id))

    async def _member(self, request_id: int, room: str, user: str | None, *, remove: bool) -> None:
        assert self.user is not None and user is not None
        reply: Reply[None] = Reply()
        command: RemoveMember | AddMember
        if remove:
            command = RemoveMember(by=self.user, user=user, reply=reply)
        else:
            command = AddMember(by=self.user, user=user, reply=reply)
        await self._ask(ActorKind.ROOM, room, command, reply)
        if remove:
            self.rooms.pop(room, None)
            self._set_roster(room, None)
        self._send(Ok(id=request_id))

    async def _rooms(self, query: Rooms) -> None:
        assert self.user is not None
        limit = query.limit or ROOM_PAGE
        try:
            with trio.fail_after(self._settings.request_timeout):
                found = await self._s.store.rooms_of(self.user, query.room, limit + 1)
        except (StorageError, trio.TooSlowError) as exc:
            raise RequestFailed(ErrorCode.TRY_LATER, "room list unavailable") from exc
        items = []
        for state in found[:limit]:
            # Storage trails a running room by what is still queued for it.
            live = self._s.directory.actor(ActorKind.ROOM, state.room)
            if live is not None and live.exists:
                state = attrs.evolve(state, seq=live.seq, epoch=live.epoch)
            items.append(state)
        self._send(RoomList(id=query.id, items=tuple(items), more=len(found) > limit))

    async def _history(self, query: History) -> None:
        assert self.user is not None
        reply: Reply[HistoryPlan] = Reply()
        command = HistoryQuery(user=self.user, query=query, reply=reply)
        plan: HistoryPlan = await self._ask(ActorKind.ROOM, query.room, command, reply)
        items = plan.items
        if plan.storage is not None:
            lo, hi = plan.storage
            try:
                with trio.fail_after(self._settings.request_timeout):
                    stored = await self._s.store.fetch_messages(query.room, lo, hi)
            except (StorageError, trio.TooSlowError) as exc:
                raise RequestFailed(ErrorCode.TRY_LATER, "history storage unavailable") from exc
            items = (*stored, *items)
        self._send(
            Page(id=query.id, room=query.room, epoch=plan.epoch, items=items, more=plan.more)
        )

    async def _typing(self, frame: Typing) -> None:
        assert self.user is not None
        if self.blocks is None:
            # In the first instant of a session, before the block list came: nobody must
            # see typing they should not, and typing is ephemeral, so let it go.
            if frame.id is not None:
                self._send(Ok(id=frame.id))
            return
        assert self.link is not None
        command = SetTyping(link=self.link, op=frame.op, hidden=self.blocks, id=frame.id)
        await self._tell(self._s.directory.ref(ActorKind.ROOM, frame.room), command)

    async def _receipts(self, query: Receipts) -> None:
        assert self.user is not None
        reply: Reply[Frame] = Reply()
        command = ReceiptQuery(user=self.user, query=query, reply=reply)
        self._send(await self._ask(ActorKind.ROOM, query.room, command, reply))

    async def _presence_of(self, users: Iterable[str]) -> tuple[PresenceState, ...]:
        """What this user may see of ``users``' presence: read storage first, then the
        presence book, so a change published meanwhile is not answered with older news."""
        assert self.user is not None
        wanted = list(dict.fromkeys(users))
        try:
            with trio.fail_after(self._settings.request_timeout):
                stored = await self._s.store.stored_presence(wanted, self.user)
        except (StorageError, trio.TooSlowError) as exc:
            raise RequestFailed(ErrorCode.TRY_LATER, "presence unavailable") from exc
        last_seen = {p.user: p.last_seen for p in stored if not p.hidden}
        fresh = await self._s.presence.known_anywhere(wanted, self.user)  # newer than storage
        return tuple(
            fresh.get(u) or PresenceState(user=u, status=Status.OFFLINE, ts=last_seen.get(u))
            for u in wanted
        )

    async def _watch(self, frame: Watch) -> None:
        new = set(frame.users) - self._watched - {self.user}
        limit = self._settings.max_watches
        if len(self._watched) + len(new) > limit:
            raise RequestFailed(ErrorCode.TOO_MANY_WATCHES, f"at most {limit} watched users")
        self._watched = self._watched | new
        self._follow(new)  # first, so no change falls between the answer and the events
        items = await self._presence_of(frame.users)
        self._send(PresenceList(id=frame.id, items=items))

    async def _set_status(self, frame: SetStatus) -> None:
        assert self.user is not None
        reply: Reply[None] = Reply()
        await self._ask(ActorKind.USER, self.user, ChangeStatus(frame.status, reply), reply)
        if frame.id is not None:
            self._send(Ok(id=frame.id))

    async def _block(self, frame: Block | Unblock) -> None:
        assert self.user is not None
        if frame.user == self.user:
            raise RequestFailed(ErrorCode.INVALID, "one cannot block oneself")
        blocked = type(frame) is Block
        reply: Reply[Ticket] = Reply()
        command = ChangeBlock(other=frame.user, blocked=blocked, reply=reply)
        ticket: Ticket = await self._ask(ActorKind.USER, self.user, command, reply)
        # Their direct room must refuse from now on, and none is started for it: one
        # running is told at once; one that starts once the block is stored reads it; one
        # that started in between (and read storage without it) is told after the commit.
        room = direct_room_id(self.user, frame.user)
        applied: Reply[None] = Reply()
        block = SetBlock(user=self.user, blocked=blocked, ticket=ticket, applied=applied)
        before = self._s.directory.get(ActorKind.ROOM, room)
        if before is not None:
            await self._tell(before, block)
        # At the commit, whether or not this session is still there to see it.
        ticket.then(_tell_a_newer_room, (self._s.directory, room, block, before))
        stored: Reply[None] = Reply()
        ticket.then(stored.set, None)
        with answer_within(self._settings.request_timeout):
            await stored.wait()
        if before is not None:
            # A room on another node hears of the block through Redis, apart from the
            # other user's requests: "ok" waits until it refuses them. Bounded: a room
            # that stopped meanwhile reads the stored block when it starts again.
            with trio.move_on_after(self._settings.request_timeout):
                try:
                    await applied.wait()
                except RequestFailed:
                    pass  # the block is stored; a room that moved reads it when it starts
        self._send(Ok(id=frame.id))


def _tell_a_newer_room(args: tuple[Any, str, SetBlock, object]) -> None:
    """A block is stored: tell the direct room if an actor for it started since the block
    was made (it may have read storage without the block). Runs in the write-behind's
    commit; a room whose mailbox is full this instant misses it until it restarts."""
    directory, room, block, before = args
    after = directory.get(ActorKind.ROOM, room)
    if after is not None and after is not before:
        try:
            after.send_nowait(block)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            log.warning("block of %s not told to room %r: its mailbox is full", block.user, room)
