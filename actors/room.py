"""The Room actor: membership, sequencing, recent history and fan-out of one room.

How this works: the room is the only sequencer of its messages. A ``Publish`` gets the
next ``seq``, is encoded and framed once, queued for storage, and the same ``bytes`` are
appended to every subscribed session's outbox without awaiting (DESIGN.md). The sender's
sent-ack waits for the commit of the batch holding the message (``Ticket.then``). The
room never awaits storage: everything it needs was loaded when it started.

The room keeps its newest messages in ``ring`` with their frames. An entry leaves the
ring only once stored, so storage plus ring always hold every seq: a resume or history
read takes the old part from storage and the rest from the ring. The same ring is the
idempotency window: a repeated client message id gets its original seq back; a
``retry`` that misses the window is looked up in storage before it is sequenced.

A crashed room is restarted by the directory: the new one waits until the write-behind
queue has stored everything the old one queued, reloads, takes over its subscribers and
sends them whatever the old one sequenced but did not deliver.
"""

import itertools
import logging
import secrets
from collections import deque

import attrs
import trio

from actors.directory import ActorKind
from actors.messages import (
    AddMember,
    Attach,
    Attached,
    AttachMode,
    CreateRoom,
    DescribeRoom,
    Detach,
    HistoryPlan,
    HistoryQuery,
    Publish,
    RemoveMember,
    RoomCommand,
    RoomDropped,
    RoomInfo,
    SessionLink,
)
from actors.outbox import Outbox
from actors.services import Services
from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.frames import Error, Frame, Member, MemberOp, Message, RoomKind, Sent
from protocol.limits import direct_room_users
from protocol.wsframe import server_frame
from storage.store import MemberChanged, RoomCreated, RoomSnapshot, StorageError
from storage.write_behind import COMMITTED, Ticket

log = logging.getLogger(__name__)

TURN = 64  # most commands a room handles before letting other tasks run
PRUNE_EVERY = 1024  # messages between sweeps for closed outboxes


class _Sub:
    """A subscribed session, and the seq after which it gets every message."""

    __slots__ = ("covered", "link")

    def __init__(self, link: SessionLink, covered: int) -> None:
        self.link = link
        self.covered = covered


class _Entry:
    __slots__ = ("frame", "message", "ticket")

    def __init__(self, message: Message, frame: bytes, ticket: Ticket) -> None:
        self.message = message
        self.frame = frame
        self.ticket = ticket


@attrs.frozen
class RoomStats:
    room: str
    subscribers: int
    members: int
    seq: int
    buffered: int


def new_epoch() -> str:
    return secrets.token_hex(8)


class Room:
    def __init__(self, key: str, services: Services, predecessor: "Room | None") -> None:
        self.key = key
        self._s = services
        # One that crashed while loading never took over: inherit what it would have.
        while predecessor is not None and not predecessor.loaded:
            predecessor = predecessor._predecessor
        self._predecessor: Room | None = predecessor
        self.loaded: bool = False
        self.exists = False
        self.kind = RoomKind.OPEN
        self.owner: str | None = None
        self.epoch = ""
        self.members: set[str] = set()
        self.seq = 0
        self.delivered = 0  # highest seq fanned out
        self.subs: dict[Outbox, _Sub] = {}
        self._ring: deque[_Entry] = deque()
        self._by_cid: dict[tuple[str | None, str], _Entry] = {}
        self._last_ticket = COMMITTED  # the newest record this room queued for storage

    def online_users(self) -> set[str]:
        """Users with a live subscribed session here."""
        return {sub.link.user for ob, sub in self.subs.items() if not ob.closed}

    def statistics(self) -> RoomStats:
        return RoomStats(self.key, len(self.subs), len(self.members), self.seq, len(self._ring))

    # --- lifecycle --------------------------------------------------------------------

    async def run(self, inbox: trio.MemoryReceiveChannel[RoomCommand]) -> None:
        await self._load()
        idle = self._s.settings.actor_idle
        while True:
            with trio.move_on_after(idle) as waiting:
                command = await inbox.receive()
            if waiting.cancelled_caught:
                if self._retire():
                    return
                continue
            # Handle what else is already queued before yielding (receive() is a
            # schedule point): the writers this turn woke then send many frames in one
            # syscall each, instead of one frame per wake-up (BENCHMARKS.md).
            self._dispatch(command)
            for _ in range(TURN - 1):
                try:
                    command = inbox.receive_nowait()
                except trio.WouldBlock:
                    break
                self._dispatch(command)

    def _dispatch(self, command: RoomCommand) -> None:
        if type(command) is Publish:
            self._publish(command)
        else:
            self._handle(command)

    async def _load(self) -> None:
        predecessor = self._predecessor
        if predecessor is not None:
            # Storage must hold all the crashed room sequenced before we read it back.
            await self._s.write_behind.wait_flushed()
        pause = 0.1
        while True:
            try:
                snapshot = await self._s.store.load_room(
                    self.key, self._s.run, self._s.settings.history_buffer
                )
                break
            except StorageError as exc:
                log.warning("room %r cannot load (%s); retrying in %.1fs", self.key, exc, pause)
                await trio.sleep(pause)
                pause = min(5.0, pause * 2)
        if snapshot is not None:
            self._adopt(snapshot)
        if predecessor is not None:
            self._take_over(predecessor)
        self._predecessor = None
        self.loaded = True

    def _adopt(self, snap: RoomSnapshot) -> None:
        self.exists = True
        self.kind = snap.kind
        self.owner = snap.owner
        self.epoch = snap.epoch
        self.members = set(snap.members)
        self.seq = self.delivered = snap.seq
        for m in snap.recent:
            entry = _Entry(m, server_frame(encode(m)), COMMITTED)
            self._ring.append(entry)
            self._by_cid[m.user, m.cid] = entry

    def _take_over(self, old: "Room") -> None:
        self.subs = {ob: sub for ob, sub in old.subs.items() if sub.link.user in self.members}
        missed = [e.frame for e in self._ring if e.message.seq > old.delivered]
        for frame in missed:
            self._fan_out(frame, Message)
        log.info("room %r restarted; %d subscribers kept", self.key, len(self.subs))

    def _prune(self) -> None:
        """Drop subscribers whose session ended without a Detach reaching us."""
        for outbox in [ob for ob in self.subs if ob.closed]:
            del self.subs[outbox]

    def _retire(self) -> bool:
        self._prune()
        self._trim()
        if self.subs or not self._last_ticket.committed:
            return False  # a reload now could miss records still queued
        return self._s.directory.try_retire(ActorKind.ROOM, self.key)

    # --- publishing (the hot path) ----------------------------------------------------

    def _publish(self, cmd: Publish) -> None:
        send = cmd.send
        user = cmd.user
        if not self.exists:
            return self._refuse(cmd, ErrorCode.NOT_FOUND, "no such room")
        if user is not None and user not in self.members:
            return self._refuse(cmd, ErrorCode.FORBIDDEN, "not a member of this room")
        entry = self._by_cid.get((user, send.cid))
        if entry is not None:
            return self._ack(cmd, entry.message, entry.ticket)
        write_behind = self._s.write_behind
        if not write_behind.has_capacity():
            return self._refuse(cmd, ErrorCode.TRY_LATER, "storage is behind; retry later")
        self.seq = seq = self.seq + 1
        message = Message(
            room=self.key,
            seq=seq,
            ts=self._s.now_ms(),
            cid=send.cid,
            user=user,
            text=send.text,
            data=send.data,
        )
        frame = server_frame(encode(message))
        ticket = self._last_ticket = write_behind.enqueue(message, len(frame) + 64)
        entry = _Entry(message, frame, ticket)
        self._ring.append(entry)
        self._by_cid[user, send.cid] = entry
        self._ack(cmd, message, ticket)
        self._fan_out(frame, Message)
        self.delivered = seq
        self._s.metrics.messages.inc()
        self._trim()
        if not seq % PRUNE_EVERY:  # a busy room never goes idle to prune
            self._prune()

    def _ack(self, cmd: Publish, message: Message, ticket: Ticket) -> None:
        if cmd.outbox is not None:
            sent = Sent(
                id=cmd.send.id, room=self.key, cid=message.cid, seq=message.seq, ts=message.ts
            )
            ack = server_frame(encode(sent))
            if self._s.settings.durable_acks:
                ticket.then(cmd.outbox.append, ack)
            else:
                cmd.outbox.append(ack)
            self._s.metrics.frames_out_by[Sent].inc()
        elif cmd.reply is not None:
            ticket.then(cmd.reply.set, (message.seq, message.ts))

    def _refuse(self, cmd: Publish, code: ErrorCode, message: str) -> None:
        if cmd.outbox is not None:
            frame = Error(code=code, msg=message, id=cmd.send.id, room=self.key)
            cmd.outbox.append(server_frame(encode(frame)))
            self._s.metrics.errors_by[code].inc()
            self._s.metrics.frames_out_by[Error].inc()
        elif cmd.reply is not None:
            cmd.reply.fail(code, message)

    def _fan_out(self, frame: bytes, kind: type[Frame]) -> None:
        subs = self.subs
        for outbox in subs:
            outbox.append(frame)
        n = len(subs)
        if n:
            metrics = self._s.metrics
            metrics.deliveries.inc(n)
            metrics.frames_out_by[kind].inc(n)

    def _trim(self) -> None:
        ring = self._ring
        excess = len(ring) - self._s.settings.history_buffer
        while excess > 0 and ring[0].ticket.committed:
            entry = ring.popleft()
            key = (entry.message.user, entry.message.cid)
            if self._by_cid.get(key) is entry:
                del self._by_cid[key]
            excess -= 1

    # --- everything else --------------------------------------------------------------

    def _handle(self, cmd: RoomCommand) -> None:
        if type(cmd) is Detach:
            sub = self.subs.get(cmd.link.outbox)
            if sub is not None and sub.link is cmd.link:
                del self.subs[cmd.link.outbox]
        elif type(cmd) is Attach:
            self._attach(cmd)
        elif type(cmd) is AddMember:
            self._add(cmd)
        elif type(cmd) is RemoveMember:
            self._remove(cmd)
        elif type(cmd) is HistoryQuery:
            self._history(cmd)
        elif type(cmd) is CreateRoom:
            self._admin_create(cmd)
        elif type(cmd) is DescribeRoom:
            self._describe(cmd)
        else:
            raise TypeError(f"room got {cmd!r}")

    def _attach(self, cmd: Attach) -> None:
        user = cmd.link.user
        ticket: Ticket = COMMITTED
        if cmd.mode is AttachMode.CREATE:
            if self.exists:
                return cmd.reply.fail(ErrorCode.ROOM_EXISTS, "a room with this id exists")
            ticket = self._create(cmd.kind, user, (user,))
        elif cmd.mode is AttachMode.DIRECT and not self.exists:
            pair = direct_room_users(self.key)
            if pair is None or user not in pair:
                return cmd.reply.fail(ErrorCode.FORBIDDEN, "not a direct room of yours")
            ticket = self._create(RoomKind.DIRECT, None, pair)
            peer = pair[1] if pair[0] == user else pair[0]
            self._notify(
                peer,
                Member(room=self.key, user=peer, op=MemberOp.ADDED, kind=RoomKind.DIRECT, by=user),
            )
        elif not self.exists:
            return cmd.reply.fail(ErrorCode.NOT_FOUND, "no such room")
        if user not in self.members:
            if cmd.mode is not AttachMode.JOIN or self.kind is not RoomKind.OPEN:
                return cmd.reply.fail(ErrorCode.FORBIDDEN, "not a member of this room")
            ticket = self._add_member(user, by=user)
        outbox = cmd.link.outbox
        sub = self.subs.get(outbox)
        attached = self._plan_attach(cmd, None if sub is None else sub.covered)
        if sub is None:
            replayed = attached.recovered and cmd.since is not None
            self.subs[outbox] = _Sub(cmd.link, cmd.since if replayed else self.seq)  # type: ignore[arg-type]
        ticket.then(cmd.reply.set, attached)

    def _plan_attach(self, cmd: Attach, covered: int | None) -> Attached:
        """What to replay. ``covered`` is set when the session is subscribed already: it
        gets every message after that seq, so nothing older can come in order."""
        head = self.seq
        since = cmd.since

        def attached(
            recovered: bool | None,
            ring: tuple[bytes, ...] = (),
            storage: tuple[int, int] | None = None,
        ) -> Attached:
            return Attached(
                kind=self.kind,
                owner=self.owner,
                seq=head,
                epoch=self.epoch,
                recovered=recovered,
                ring=ring,
                storage=storage,
            )

        if since is None:
            return attached(None)
        if cmd.epoch != self.epoch or since > head or head - since > self._s.settings.max_replay:
            return attached(False)
        if covered is not None:
            return attached(since >= covered)
        ring = self._ring
        start = ring[0].message.seq if ring else head + 1
        if since + 1 >= start:
            missed = itertools.islice(ring, since + 1 - start, None)
            return attached(True, tuple(e.frame for e in missed))
        return attached(True, tuple(e.frame for e in ring), (since + 1, start - 1))

    def _create(self, kind: RoomKind, owner: str | None, members: tuple[str, ...]) -> Ticket:
        self.exists = True
        self.kind = kind
        self.owner = owner
        self.epoch = new_epoch()
        self.members = set(members)
        record = RoomCreated(
            room=self.key,
            kind=kind,
            owner=owner,
            epoch=self.epoch,
            ts=self._s.now_ms(),
            members=members,
            run=self._s.run,
        )
        self._last_ticket = self._s.write_behind.enqueue(record)
        return self._last_ticket

    def _add_member(self, user: str, by: str | None) -> Ticket:
        self.members.add(user)
        record = MemberChanged(room=self.key, user=user, added=True, ts=self._s.now_ms())
        self._last_ticket = self._s.write_behind.enqueue(record)
        event = Member(room=self.key, user=user, op=MemberOp.ADDED, kind=self.kind, by=by)
        if self._small():
            self._fan_out(server_frame(encode(event)), Member)
        if by != user:
            self._notify(user, event)
        return self._last_ticket

    def _small(self) -> bool:
        """Members hear of each other's joins and leaves only in rooms this small: in a
        large room n joins would cost n² frames."""
        return len(self.members) <= self._s.settings.large_room

    def _add(self, cmd: AddMember) -> None:
        by = cmd.by
        if not self.exists:
            return cmd.reply.fail(ErrorCode.NOT_FOUND, "no such room")
        if self.kind is RoomKind.DIRECT:
            return cmd.reply.fail(ErrorCode.FORBIDDEN, "a direct room has exactly two members")
        if by is not None:
            if by not in self.members:
                return cmd.reply.fail(ErrorCode.FORBIDDEN, "not a member of this room")
            if self.kind is RoomKind.PRIVATE and by != self.owner:
                return cmd.reply.fail(ErrorCode.FORBIDDEN, "only the owner invites to this room")
        if cmd.user in self.members:
            return cmd.reply.set(None)
        self._add_member(cmd.user, by).then(cmd.reply.set, None)

    def _remove(self, cmd: RemoveMember) -> None:
        user = cmd.user
        if not self.exists:
            return cmd.reply.fail(ErrorCode.NOT_FOUND, "no such room")
        if self.kind is RoomKind.DIRECT:
            return cmd.reply.fail(ErrorCode.FORBIDDEN, "a direct room has exactly two members")
        if user not in self.members:
            return cmd.reply.set(None)
        self.members.discard(user)
        record = MemberChanged(room=self.key, user=user, added=False, ts=self._s.now_ms())
        ticket = self._last_ticket = self._s.write_behind.enqueue(record)
        event = Member(room=self.key, user=user, op=MemberOp.REMOVED, kind=self.kind, by=cmd.by)
        frame = server_frame(encode(event))
        if self._small():
            self._fan_out(frame, Member)
        for outbox, sub in list(self.subs.items()):
            link = sub.link
            if link.user == user:
                if not self._small():
                    outbox.append(frame)  # the one who left is told in any room
                del self.subs[outbox]
                try:
                    link.inbox.send_nowait(RoomDropped(self.key))
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    pass  # a session that cannot hear this is closing or being closed
        ticket.then(cmd.reply.set, None)

    def _history(self, cmd: HistoryQuery) -> None:
        if not self.exists:
            return cmd.reply.fail(ErrorCode.NOT_FOUND, "no such room")
        if cmd.user not in self.members:
            return cmd.reply.fail(ErrorCode.FORBIDDEN, "not a member of this room")
        q = cmd.query
        limit = q.limit or self._s.settings.limits.default_history_limit
        head = self.seq
        if q.after is not None:
            lo, hi = q.after + 1, min(head, q.after + limit)
            more = hi < head
        else:
            hi = head if q.before is None else min(head, q.before - 1)
            lo = max(1, hi - limit + 1)
            more = lo > 1
        if hi < lo:
            return cmd.reply.set(HistoryPlan(epoch=self.epoch, items=(), storage=None, more=False))
        ring = self._ring
        start = ring[0].message.seq if ring else head + 1
        storage = (lo, min(hi, start - 1)) if lo < start else None
        first = max(lo, start)  # the part in memory is first..hi, maybe empty
        in_memory = itertools.islice(ring, first - start, max(first, hi + 1) - start)
        items = tuple(e.message for e in in_memory)
        cmd.reply.set(HistoryPlan(epoch=self.epoch, items=items, storage=storage, more=more))

    def _admin_create(self, cmd: CreateRoom) -> None:
        if self.exists:
            return cmd.reply.fail(ErrorCode.ROOM_EXISTS, "a room with this id exists")
        ticket = self._create(cmd.kind, cmd.owner, cmd.members)
        for user in cmd.members:
            self._notify(user, Member(room=self.key, user=user, op=MemberOp.ADDED, kind=cmd.kind))
        ticket.then(cmd.reply.set, None)

    def _describe(self, cmd: DescribeRoom) -> None:
        if not self.exists:
            return cmd.reply.fail(ErrorCode.NOT_FOUND, "no such room")
        online = sorted(self.online_users())
        info = RoomInfo(
            room=self.key,
            kind=self.kind,
            owner=self.owner,
            epoch=self.epoch,
            seq=self.seq,
            members=tuple(sorted(self.members)),
            online=tuple(online),
        )
        cmd.reply.set(info)

    def _notify(self, user: str, event: Member) -> None:
        """Tell every session of ``user`` (subscribed here or not)."""
        self._s.bus.publish(f"user:{user}", server_frame(encode(event)))
