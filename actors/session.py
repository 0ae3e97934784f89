"""The Session actor: one per client connection.

The connection (``server.connection``) feeds it each complete inbound message; the
session decodes it, enforces authentication, the rate limit and the error budget,
and turns it into commands for rooms and users. Requests are handled one at a time,
in arrival order, so a ``send`` that follows a ``join`` sees the join done. Replies go
into the session's outbox; a ``send`` does not wait for its room, whose sent-ack lands
in the outbox when the message is stored.

Subscribing (join, create, direct, resume) holds the outbox while the room's reply
and any replay are written, so the client reads: ``joined``, the messages it missed in
seq order, then live traffic, with no gap and no duplicate.
"""

import logging
import secrets
from collections.abc import Callable
from typing import Any

import trio

from actors.directory import ActorKind
from actors.messages import (
    AddMember,
    Attach,
    Attached,
    AttachMode,
    Detach,
    HistoryPlan,
    HistoryQuery,
    Publish,
    RemoveMember,
    Reply,
    RequestFailed,
    SessionClosed,
    SessionEvent,
    SessionLink,
    SessionOpened,
    answer_within,
    ask,
    deliver,
)
from actors.metrics import Metrics
from actors.outbox import Outbox
from actors.services import Services
from actors.token_bucket import TokenBucket
from protocol.codec import decode_client, encode
from protocol.errors import CloseCode, ErrorCode, RemoteProtocolError
from protocol.frames import (
    PROTOCOL_VERSION,
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
    Leave,
    Message,
    Ok,
    Page,
    Ping,
    Pong,
    Send,
    Unsubscribe,
    Welcome,
)
from protocol.limits import direct_room_id
from protocol.wsframe import server_frame
from storage.store import StorageError

log = logging.getLogger(__name__)

#: Closes the connection with a WebSocket close code and reason.
CloseFn = Callable[[CloseCode, str], None]


class Session:
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
        self.rooms: set[str] = set()
        self.closing = False
        self.going_away = False
        now = trio.current_time()
        self.opened_at = now
        self.last_inbound = now
        self._bucket = TokenBucket(self._settings.rate, self._settings.burst, now)
        self._errors = TokenBucket(self._settings.error_refill, self._settings.error_budget, now)
        self._events_send, self._events = trio.open_memory_channel[SessionEvent](64)

    # --- driven by the connection -----------------------------------------------------

    def on_activity(self) -> None:
        """Any bytes from the client count as a sign of life."""
        self.last_inbound = trio.current_time()

    async def on_message(self, payload: bytes) -> None:
        """Handle one complete binary WebSocket message."""
        if self.closing:
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
        if not self._bucket.take(trio.current_time()):
            self._error(ErrorCode.RATE_LIMITED, "slow down", request_id=getattr(frame, "id", None))
            return
        if self.user is None and kind is not Hello:
            self._error(ErrorCode.NOT_AUTHENTICATED, "send hello first")
            return
        try:
            await self._dispatch(frame)
        except RequestFailed as exc:
            self._error(
                exc.code,
                exc.message,
                request_id=getattr(frame, "id", None),
                room=getattr(frame, "room", None),
            )

    def on_text(self) -> None:
        self._error(ErrorCode.BAD_FRAME, "text messages are not part of the protocol")

    def goaway(self, message: str, delay_ms: int) -> None:
        """The node is draining: tell the client to reconnect elsewhere."""
        self.going_away = True
        self._send(Goaway(msg=message, delay=delay_ms))

    async def run(self) -> None:
        """Timers and events from other actors; runs until the connection cancels it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._keepalive)
            async with self._events:
                async for event in self._events:
                    self.rooms.discard(event.room)

    async def detach(self) -> None:
        """Leave every room and the user actor; called once the connection is over."""
        link = self.link
        if link is None:
            return
        self.link = None
        self._metrics.sessions.dec()
        targets: list[tuple[ActorKind, str, object]] = [
            (ActorKind.ROOM, room, Detach(link)) for room in self.rooms
        ]
        targets.append((ActorKind.USER, link.user, SessionClosed(link)))
        self.rooms.clear()
        for kind, key, command in targets:
            ref = self._s.directory.get(kind, key)
            if ref is None:
                continue
            with trio.move_on_after(self._settings.request_timeout, shield=True) as waited:
                try:
                    await deliver(ref, command)
                except RequestFailed:
                    pass  # the actor stopped: nothing to detach from
            if waited.cancelled_caught:
                # The actor prunes closed outboxes itself when it next goes idle.
                log.warning("session %s could not detach from %s %r", self.id, kind, key)

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
    ) -> None:
        self._send(Error(code=code, msg=message, id=request_id, room=room))
        self._metrics.errors_by[code].inc()
        if not self._errors.take(trio.current_time()):
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
        with answer_within(self._settings.request_timeout):
            await deliver(ref, command)

    async def _keepalive(self) -> None:
        s = self._settings
        await trio.sleep_until(self.opened_at + s.hello_timeout)
        if self.user is None:
            self.close(CloseCode.HELLO_TIMEOUT, "no hello")
            return
        while True:
            quiet_since = self.last_inbound
            await trio.sleep_until(quiet_since + s.ping_interval)
            if self.last_inbound != quiet_since:
                continue
            self._send(Ping())
            await trio.sleep_until(quiet_since + s.ping_interval + s.pong_timeout)
            if self.last_inbound == quiet_since:
                self.close(CloseCode.IDLE_TIMEOUT, "no pong")
                return

    # --- requests ---------------------------------------------------------------------

    async def _dispatch(self, frame: Frame) -> None:
        if type(frame) is Send:
            return await self._publish(frame)
        if type(frame) is Hello:
            return await self._hello(frame)
        if type(frame) is Ping:
            return self._send(Pong(id=frame.id))
        if type(frame) is Join:
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
            return await self._history(frame)
        if type(frame) is Leave:
            return await self._member(frame.id, frame.room, self.user, remove=True)
        if type(frame) is Invite:
            return await self._member(frame.id, frame.room, frame.user, remove=False)
        if type(frame) is Unsubscribe:
            return await self._unsubscribe(frame)
        raise AssertionError(f"no handler for {frame!r}")

    async def _hello(self, hello: Hello) -> None:
        if self.user is not None:
            raise RequestFailed(ErrorCode.ALREADY_AUTHENTICATED, "this session said hello")
        if hello.v != PROTOCOL_VERSION:
            self._error(ErrorCode.UNSUPPORTED_VERSION, f"this server speaks v{PROTOCOL_VERSION}")
            self.close(CloseCode.UNSUPPORTED_VERSION, "unsupported version")
            return
        try:
            user = self._s.verify_token(hello.token)
        except ValueError as exc:
            self._error(ErrorCode.UNAUTHORIZED, f"bad token: {exc}")
            self.close(CloseCode.UNAUTHORIZED, "bad token")
            return
        if self.going_away:
            raise RequestFailed(ErrorCode.TRY_LATER, "server is going away")
        self.user = user
        self.link = SessionLink(self.id, user, self.outbox, self._events_send)
        self._metrics.sessions.inc()
        await self._tell(self._s.directory.ref(ActorKind.USER, user), SessionOpened(self.link))
        self._send(
            Welcome(
                session=self.id,
                user=user,
                v=PROTOCOL_VERSION,
                ping=round(self._settings.ping_interval),
                ts=self._s.now_ms(),
                limits=self._settings.limits.announce(),
            )
        )
        for room, (seq, epoch) in (hello.resume or {}).items():
            try:
                await self._attach(None, room, AttachMode.RESUME, since=seq, epoch=epoch)
            except RequestFailed as exc:
                self._error(exc.code, exc.message, room=room)

    async def _publish(self, send: Send) -> None:
        if self.going_away:
            raise RequestFailed(ErrorCode.TRY_LATER, "server is going away; reconnect")
        ref = self._s.directory.ref(ActorKind.ROOM, send.room)
        command = Publish(user=self.user, send=send, outbox=self.outbox)
        await self._tell(ref, command)

    async def _attach(
        self,
        request_id: int | None,
        room: str,
        mode: AttachMode,
        **options: Any,
    ) -> None:
        assert self.link is not None
        limit = self._settings.limits.max_rooms_per_session
        if room not in self.rooms and len(self.rooms) >= limit:
            raise RequestFailed(ErrorCode.TOO_MANY_ROOMS, f"at most {limit} rooms per session")
        reply: Reply[Attached] = Reply()
        command = Attach(link=self.link, mode=mode, reply=reply, **options)
        outbox = self.outbox
        outbox.hold()  # live frames of the room wait until the replay is written
        try:
            try:
                attached: Attached = await self._ask(ActorKind.ROOM, room, command, reply)
            except RequestFailed as exc:
                if exc.code is ErrorCode.TIMEOUT:  # it may have subscribed us after all
                    ref = self._s.directory.get(ActorKind.ROOM, room)
                    if ref is not None:
                        await self._tell(ref, Detach(self.link))
                raise
            self.rooms.add(room)
            replay: list[Message] = []
            recovered = attached.recovered
            if attached.storage is not None:
                lo, hi = attached.storage
                try:
                    with trio.fail_after(self._settings.request_timeout):
                        replay = await self._s.store.fetch_messages(room, lo, hi)
                except (StorageError, trio.TooSlowError) as exc:
                    log.warning("replay of %r %d..%d failed: %s", room, lo, hi, exc)
                    recovered = False
            joined = Joined(
                id=request_id,
                room=room,
                kind=attached.kind,
                owner=attached.owner,
                seq=attached.seq,
                epoch=attached.epoch,
                recovered=recovered,
            )
            outbox.append_direct(server_frame(encode(joined)))  # ahead of the held live frames
            self._metrics.frames_out_by[Joined].inc()
            if recovered:
                for message in replay:
                    outbox.append_direct(server_frame(encode(message)))
                for frame in attached.ring:
                    outbox.append_direct(frame)
                count = len(replay) + len(attached.ring)
                self._metrics.frames_out_by[Message].inc(count)
        finally:
            outbox.release()

    async def _unsubscribe(self, frame: Unsubscribe) -> None:
        assert self.link is not None
        if frame.room in self.rooms:
            self.rooms.discard(frame.room)
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
            self.rooms.discard(room)
        self._send(Ok(id=request_id))

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
