"""The Room actor: membership, sequencing, recent history and fan-out of one room.

How this works: the room is the only sequencer of its messages. A ``Publish`` gets the
next ``seq``, is encoded and framed once, queued for storage, and the same ``bytes`` are
appended to every subscribed session's outbox without awaiting. The sender's
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

Receipts, online counts and typing are the room's other signals. Receipts and the online
count are coalesced: the room announces and stores them at most once per receipt
interval (``actors.receipts``). Typing is never stored; a start expires by itself. The
room's timers (that interval, typing expiry, retiring when idle) live in the node's timer
task (``actors.timers``), which sends the room a tick when one is due: a mailbox wait
with a deadline cost a cancel scope per wake-up and an exception per expiry, 15 % of
the server's time in the 1:1 chat benchmark (BENCHMARKS.md).
"""

import contextlib
import itertools
import logging
import secrets
from collections import deque

import attrs
import trio

from actors.cluster import GhostOutbox
from actors.directory import ActorKind
from actors.feed_cells import cell_of_post
from actors.feed_messages import CommentCount
from actors.messages import (
    ActorMoved,
    AddMember,
    Attach,
    Attached,
    AttachMode,
    CreateRoom,
    DescribeRoom,
    Detach,
    FlushState,
    HistoryPlan,
    HistoryQuery,
    MarkReceipt,
    Moved,
    Publish,
    ReceiptQuery,
    Refused,
    RemoveMember,
    RoomCommand,
    RoomDropped,
    RoomInfo,
    Roster,
    SessionLink,
    SetBlock,
    SetTyping,
    refuse,
    tell_session,
)
from actors.outbox import Sink, write_through
from actors.receipts import RoomReceipts
from actors.services import Services, claim_fence, read_until_stored
from actors.timers import Timer
from protocol.codec import encode
from protocol.errors import ErrorCode
from protocol.frames import (
    Cursor,
    Frame,
    Member,
    MemberOp,
    Message,
    Ok,
    Online,
    ReceiptCounts,
    ReceiptState,
    RoomKind,
    Sent,
    Typing,
    TypingOp,
)
from protocol.limits import MAX_CURSORS, MAX_RECEIPT_RANGE, POST_PREFIX, direct_room_users
from protocol.wsframe import server_frame
from storage.store import Fence, MemberChanged, RoomCreated, RoomReleased, RoomSnapshot
from storage.write_behind import COMMITTED, Ticket

log = logging.getLogger(__name__)

TURN = 64  # most messages a room publishes before letting other tasks run
# Members a fan-out writes itself, one step of ~4 to 12 ms; more go to the pump, which
# writes 256 per step (actors.pump: a step is the loop's stall).
WRITE_THROUGH_MAX = 1024
DELIVERIES_PER_TURN = 16_384  # appends a turn makes at most (the message that crosses it ends it)
LIGHT_PER_TURN = 16  # a receipt or any other command costs 1/16 of a publish
PRUNE_EVERY = 1024  # messages between sweeps for closed outboxes


class _Sub:
    """A subscribed session, and the seq after which it gets every message."""

    __slots__ = ("covered", "link")

    def __init__(self, link: SessionLink, covered: int) -> None:
        self.link = link
        self.covered = covered


class _Tick:
    """Sent by the node's timer task when one of the room's timers is due."""


TICK = _Tick()


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
        self.subs: dict[Sink, _Sub] = {}
        self._ring: deque[_Entry] = deque()
        self._by_cid: dict[tuple[str | None, str], _Entry] = {}
        self._last_ticket = COMMITTED  # the newest record this room queued for storage
        self._block_ticket = COMMITTED  # the newest block between a direct room's users
        self.receipts = RoomReceipts(key)
        self.blockers: frozenset[str] = frozenset()  # direct room: who blocks the other
        self._user_subs: dict[str, int] = {}  # subscribed sessions per user
        self._online_dirty = False  # the online count may have changed (large rooms)
        self._online_sent = -1
        self._flush_due: float | None = None  # when receipts and the count go out
        self._store_due: float | None = None  # when moved cursors go to storage
        self._typers: dict[str, tuple[float, frozenset[str]]] = {}  # user -> (expiry, hidden)
        self._counts_cache: tuple[int, int, bytes] | None = None  # (seq, version, frame)
        self._timer: Timer | None = None  # the tick the node's timer task will send
        self._timer_at = 0.0
        # In a cluster: the room's claim on its rows, the subscribers of this node (the
        # fan-out loop), how many subscribe through other nodes (they get each event
        # from one publish, ``actors.cluster``), and how many such publishes so far.
        self._fence: Fence | None = None
        self._locals = self.subs if services.cluster is None else {}
        self._alone = False  # the command being handled has nothing queued behind it
        self._remote = 0
        self._pub = 0
        self.released = COMMITTED  # the record that lets the room go, once retired
        self._moved = False  # placement gave the room to another node

    def online_users(self) -> set[str]:
        """Users with a live subscribed session here."""
        return {sub.link.user for ob, sub in self.subs.items() if not ob.closed}

    def statistics(self) -> RoomStats:
        return RoomStats(self.key, len(self.subs), len(self.members), self.seq, len(self._ring))

    # --- lifecycle --------------------------------------------------------------------

    async def run(self, inbox: trio.MemoryReceiveChannel[RoomCommand | _Tick]) -> None:
        try:
            await self._load()
            idle = self._s.settings.actor_idle
            quiet_since = trio.current_time()
            while True:
                self._arm(self._wake_at(quiet_since + idle))
                command = await inbox.receive()
                now = trio.current_time()
                if self._fence is not None and (self._fence.stale or type(command) is Moved):
                    return await self._step_down(command, inbox)
                if self._turn(command, inbox):
                    quiet_since = now
                if self._moved or (self._fence is not None and self._fence.stale):
                    return await self._step_down(TICK, inbox)
                self._on_timer(now)
                if not self.exists and self._retire():
                    return  # asked about a room there is not (a refused create): no idling
                if now >= quiet_since + idle:
                    if self._retire():
                        return
                    quiet_since = now
        finally:
            if self._timer is not None:
                self._timer.cancel()

    def _turn(
        self, command: RoomCommand | _Tick, inbox: trio.MemoryReceiveChannel[RoomCommand | _Tick]
    ) -> bool:
        """Handle ``command`` and what else is already queued, before yielding
        (receive() is a schedule point): the pump then writes many frames per socket in
        one syscall, instead of one frame per wake-up (BENCHMARKS.md). Receipts are
        cheap and come from every member at once: a turn that stopped at 64 of them
        would leave a thousand sessions blocked on a full mailbox. A large room's turn
        also ends after ``DELIVERIES_PER_TURN`` appends: 64 messages to 1,000 members held
        the loop 20 to 30 ms (BENCHMARKS.md, "Stalls"). False if there were only ticks."""
        budget = TURN * LIGHT_PER_TURN
        deliveries = DELIVERIES_PER_TURN
        handled = False
        while True:
            if not isinstance(command, _Tick):
                if type(command) is Publish:
                    budget -= LIGHT_PER_TURN
                    deliveries -= len(self._locals)
                    if deliveries < 0:
                        budget = 0
                else:
                    budget -= 1
                # Nothing queued behind it: its frames go straight to the sockets.
                self._alone = inbox.statistics().current_buffer_used == 0
                try:
                    self._dispatch(command)
                finally:
                    self._alone = False
                handled = True
            if budget <= 0:
                return handled
            try:
                command = inbox.receive_nowait()
            except trio.WouldBlock:
                return handled

    def _dispatch(self, command: RoomCommand) -> None:
        if type(command) is Publish:
            self._publish(command)
        elif type(command) is MarkReceipt:
            self._receipt(command)
        else:
            self._handle(command)

    async def _load(self) -> None:
        predecessor = self._predecessor
        if predecessor is not None:
            # Storage must hold all the crashed room sequenced before we read it back.
            await self._s.write_behind.wait_flushed()
        store, run, recent = self._s.store, self._s.run, self._s.settings.history_buffer
        if self._s.cluster is not None:
            # Before reading: whatever a former owner stored is then in the snapshot, and
            # whatever it still tries to store is refused.
            self._fence, claim = await claim_fence(self._s, "room", self.key)
            if claim.rotated:
                log.warning(
                    "room %r: its last node stopped without letting it go: new epoch", self.key
                )
        snapshot = await read_until_stored(
            f"room {self.key!r}", lambda: store.load_room(self.key, run, recent)
        )
        if snapshot is not None:
            self._adopt(snapshot)
        pair = direct_room_users(self.key)
        if pair is not None:
            what = f"blocks of room {self.key!r}"
            self.blockers = await read_until_stored(what, lambda: store.blockers(*pair))
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
        self.receipts = RoomReceipts(self.key, snap.cursors)
        for m in snap.recent:
            entry = _Entry(m, server_frame(encode(m)), COMMITTED)
            self._ring.append(entry)
            self._by_cid[m.user, m.cid] = entry

    def _take_over(self, old: "Room") -> None:
        for ob, sub in old.subs.items():
            if sub.link.user in self.members:
                self._subscribe(ob, sub)
        # Receipts not stored yet live only in the old room's memory.
        for cursor in old.receipts.all():
            if cursor.user in self.members:
                self.receipts.mark(cursor.user, cursor.delivered, cursor.read, self.seq)
        if self.receipts.unsaved:
            self._schedule(store=True)
        self.blockers = old.blockers | self.blockers
        missed = [e.frame for e in self._ring if e.message.seq > old.delivered]
        for frame in missed:
            self._fan_out(frame, Message)
        log.info("room %r restarted; %d subscribers kept", self.key, len(self.subs))

    async def _step_down(
        self, command: object, inbox: trio.MemoryReceiveChannel[RoomCommand | _Tick]
    ) -> None:
        """Another node runs the room now: its subscribers resume there; what is queued
        here is refused; then the room retires, whatever it still has unstored (storage
        refuses it anyway)."""
        log.warning("room %r: another node took it; stepping down", self.key)
        for sub in self.subs.values():
            tell_session(sub.link, ActorMoved("room", self.key))
        self.subs.clear()
        self._locals.clear()
        self._remote = 0
        while True:
            if not isinstance(command, (_Tick, Moved)):
                refuse(
                    command, ErrorCode.TRY_LATER, "the room moved to another node; retry", self.key
                )
            if self._s.directory.try_retire(ActorKind.ROOM, self.key):
                return
            command = await inbox.receive()

    def _prune(self) -> None:
        """Drop subscribers whose session ended without a Detach reaching us."""
        for outbox in [ob for ob in self.subs if ob.closed]:
            self._unsubscribe(outbox)

    def _retire(self) -> bool:
        self._prune()
        self._trim()
        if self.receipts.unsaved:
            self._store_receipts()
        if (
            self.subs
            or not self._last_ticket.committed
            or not self._block_ticket.committed
            or self.receipts.unsaved
        ):
            return False  # a reload now could miss records still queued
        if not self._s.directory.try_retire(ActorKind.ROOM, self.key):
            return False
        if self._fence is not None:
            record = RoomReleased(room=self.key, run=self._s.run)
            self.released = self._s.write_behind.enqueue(record, fence=self._fence)
        return True

    def _subscribe(self, outbox: Sink, sub: _Sub) -> None:
        self.subs[outbox] = sub
        if self._locals is not self.subs:
            if type(outbox) is GhostOutbox:
                self._remote += 1
            else:
                self._locals[outbox] = sub
        user = sub.link.user
        self._user_subs[user] = self._user_subs.get(user, 0) + 1
        self._online_changed()

    def _unsubscribe(self, outbox: Sink) -> None:
        sub = self.subs.pop(outbox)
        if self._locals is not self.subs:
            if type(outbox) is GhostOutbox:
                self._remote -= 1
            else:
                del self._locals[outbox]
        user = sub.link.user
        left = self._user_subs[user] - 1
        if left:
            self._user_subs[user] = left
        else:
            del self._user_subs[user]
            self._online_changed()

    def _online_changed(self) -> None:
        if not self._small():
            self._online_dirty = True
            self._schedule()

    # --- timers -----------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        """Have the node's timer task tick this room at ``when``, unless an earlier tick
        is already set (a tick that finds nothing due just re-arms)."""
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._s.timers.call_at(when, self._tick)

    def _tick(self) -> None:
        """In the timer task: wake the room. A full mailbox needs no tick: the room is
        busy, and checks its timers after every turn."""
        self._timer = None
        inbox = self._s.directory.get(ActorKind.ROOM, self.key)
        if inbox is not None:
            with contextlib.suppress(
                trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError
            ):
                inbox.send_nowait(TICK)

    def _wake_at(self, idle_at: float) -> float:
        wake = idle_at
        if self._flush_due is not None and self._flush_due < wake:
            wake = self._flush_due
        if self._store_due is not None and self._store_due < wake:
            wake = self._store_due
        if self._typers:
            wake = min(wake, min(expiry for expiry, _ in self._typers.values()))
        return wake

    def _schedule(self, *, store: bool = False) -> None:
        if self._flush_due is None:
            self._flush_due = trio.current_time() + self._s.settings.receipt_interval
        if store and self._store_due is None:
            self._store_due = trio.current_time() + self._s.settings.receipt_store_interval

    def _on_timer(self, now: float) -> None:
        if self._flush_due is not None and now >= self._flush_due:
            self._flush()
        if self._store_due is not None and now >= self._store_due:
            self._store_receipts()
        if self._typers:
            for user in [u for u, (expiry, _) in self._typers.items() if expiry <= now]:
                _, hidden = self._typers.pop(user)
                self._typing_event(user, TypingOp.STOP, hidden)

    def _store_receipts(self) -> None:
        """Queue one upsert per cursor that moved since the last time. Less often than
        the announcements: with every member acking every message, storing each
        interval cost more server CPU than the fan-out (BENCHMARKS.md)."""
        self._store_due = None
        if not self.receipts.unsaved:
            return
        write_behind = self._s.write_behind
        if write_behind.has_capacity():
            for record in self.receipts.take_unsaved():
                self._last_ticket = write_behind.enqueue(record, fence=self._fence)
        else:
            self._schedule(store=True)  # storage is behind: keep them for later

    def _flush(self) -> None:
        """Announce what accumulated over the interval."""
        self._flush_due = None
        changes = self.receipts.take_changes()
        if changes is not None:
            self._announce_receipts(changes.cursors, changes.lo, changes.hi)
        if self._online_dirty:
            self._online_dirty = False
            count = len(self._user_subs)
            if count != self._online_sent and not self._small():
                self._online_sent = count
                self._fan_out(server_frame(encode(Online(room=self.key, count=count))), Online)

    def _announce_receipts(self, cursors: tuple[Cursor, ...], lo: int, hi: int) -> None:
        if self._small():
            frame = server_frame(encode(ReceiptState(room=self.key, items=cursors)))
            self._fan_out(frame, ReceiptState)
            return
        # A large room announces counts: n members' cursors to n sessions would be n².
        items = self.receipts.counts(max(lo, hi - MAX_RECEIPT_RANGE + 1), hi)
        counts = ReceiptCounts(room=self.key, members=len(self.members), items=items)
        self._fan_out(server_frame(encode(counts)), ReceiptCounts)
        # A user's other devices still learn how far the user has read: one frame per
        # such user, encoded once for all their sessions.
        own = {
            c.user: server_frame(encode(ReceiptState(room=self.key, items=(c,))))
            for c in cursors
            if self._user_subs.get(c.user, 0) > 1
        }
        if own:
            for outbox, sub in self.subs.items():
                mine = own.get(sub.link.user)
                if mine is not None:
                    outbox.append(mine)
                    self._s.metrics.frames_out_by[ReceiptState].inc()

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
        if self.blockers and user is not None:
            return self._refuse(cmd, ErrorCode.BLOCKED, _blocked_message(user, self.blockers))
        write_behind = self._s.write_behind
        if not write_behind.has_capacity():
            return self._refuse(cmd, ErrorCode.TRY_LATER, "storage is behind; retry later")
        if self._fence is not None and not self._s.cluster.placement.valid():  # type: ignore[union-attr]
            return self._refuse(cmd, ErrorCode.TRY_LATER, "the cluster is unreachable; retry")
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
        ticket = self._last_ticket = write_behind.enqueue(message, len(frame) + 64, self._fence)
        entry = _Entry(message, frame, ticket)
        self._ring.append(entry)
        self._by_cid[user, send.cid] = entry
        self._ack(cmd, message, ticket)
        self._fan_out(frame, Message)
        self.delivered = seq
        self._s.metrics.messages.inc()
        if self.key.startswith(POST_PREFIX):
            self._count_comments(seq)
        if self._typers and user in self._typers:
            # A message ends its sender's typing; clients clear it when it arrives.
            del self._typers[user]
        self._trim()
        if not seq % PRUNE_EVERY:  # a busy room never goes idle to prune
            self._prune()

    def _count_comments(self, seq: int) -> None:
        """A post's comments count toward its popularity: tell its shard. Lost if the
        shard's mailbox is full: the next comment, or a reload, brings the count."""
        number = self.key[len(POST_PREFIX) :]
        cell = cell_of_post(int(number)) if number.isdigit() else None
        if cell is None:
            return  # a room the admin API named so: no post of ours
        post = int(number)
        ref = self._s.directory.ref(ActorKind.FEED, str(cell))
        try:
            ref.send_nowait(CommentCount(post, seq))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            pass

    def _ack(self, cmd: Publish, message: Message, ticket: Ticket) -> None:
        if cmd.link is not None:
            sent = Sent(
                id=cmd.send.id, room=self.key, cid=message.cid, seq=message.seq, ts=message.ts
            )
            ack = server_frame(encode(sent))
            if self._s.settings.durable_acks:
                ticket.then(cmd.link.outbox.append, ack)
            else:
                cmd.link.outbox.append(ack)
            self._s.metrics.frames_out_by[Sent].inc()
        elif cmd.reply is not None:
            ticket.then(cmd.reply.set, (message.seq, message.ts))
        if self._fence is not None:
            # Refused by storage: another node took the room. The sender retries there.
            ticket.otherwise(self._refuse_moved, cmd)

    def _refuse(self, cmd: Publish, code: ErrorCode, message: str) -> None:
        if cmd.link is not None:
            self._error_to(cmd.link, code, message, cmd.send.id)
        elif cmd.reply is not None:
            cmd.reply.fail(code, message)

    def _refuse_moved(self, cmd: Publish) -> None:
        self._refuse(cmd, ErrorCode.TRY_LATER, "the room moved to another node; retry")

    def _error_to(self, link: SessionLink, code: ErrorCode, message: str, id: int | None) -> None:
        """Through the session, which counts it against the client's error budget."""
        tell_session(link, Refused(code, message, id, self.key))

    # --- receipts and typing ----------------------------------------------------------

    def _refusal(self, user: str, *, reading: bool = False) -> tuple[ErrorCode, str] | None:
        """Why ``user`` may not act in this room (or, ``reading``, read its history), if
        they may not. In a direct room where one blocks the other, only reading is left."""
        if not self.exists:
            return ErrorCode.NOT_FOUND, "no such room"
        if user not in self.members:
            return ErrorCode.FORBIDDEN, "not a member of this room"
        if self.blockers and not reading:
            return ErrorCode.BLOCKED, _blocked_message(user, self.blockers)
        return None

    def _ok_to(self, outbox: Sink, id: int | None) -> None:
        if id is not None:
            outbox.append(server_frame(encode(Ok(id=id))))
            self._s.metrics.frames_out_by[Ok].inc()

    def _receipt(self, cmd: MarkReceipt) -> None:
        receipt = cmd.receipt
        user = cmd.link.user
        refusal = self._refusal(user)
        if refusal is not None:
            return self._error_to(cmd.link, *refusal, receipt.id)
        if self.receipts.mark(user, receipt.delivered, receipt.read, self.seq):
            self._schedule(store=True)
        self._ok_to(cmd.link.outbox, receipt.id)

    def _receipt_query(self, cmd: ReceiptQuery) -> None:
        refusal = self._refusal(cmd.user)
        if refusal is not None:
            return cmd.reply.fail(*refusal)
        q = cmd.query
        if q.limit is not None:
            assert q.seq is not None  # the codec checks it
            items = self.receipts.counts(q.seq, min(self.seq, q.seq + q.limit - 1))
            frame: Frame = ReceiptCounts(
                id=q.id, room=self.key, members=len(self.members), items=items
            )
        else:
            found, more = self.receipts.who(self.members, q.seq, MAX_CURSORS)
            frame = ReceiptState(id=q.id, room=self.key, items=tuple(found), more=more)
        cmd.reply.set(frame)

    def _typing(self, cmd: SetTyping) -> None:
        user = cmd.link.user
        refusal = self._refusal(user)
        if refusal is not None:
            return self._error_to(cmd.link, *refusal, cmd.id)
        if cmd.op is TypingOp.START:
            expiry = trio.current_time() + self._s.settings.typing_timeout
            if self._typers.get(user) is None:
                self._typing_event(user, TypingOp.START, cmd.hidden)
            self._typers[user] = (expiry, cmd.hidden)
        elif self._typers.pop(user, None) is not None:
            self._typing_event(user, TypingOp.STOP, cmd.hidden)
        self._ok_to(cmd.link.outbox, cmd.id)

    def _typing_event(self, user: str, op: TypingOp, hidden: frozenset[str]) -> None:
        """To every subscribed session but the typer's and those of users they block."""
        frame = server_frame(encode(Typing(room=self.key, user=user, op=op)))
        n = 0
        for outbox, sub in self.subs.items():
            recipient = sub.link.user
            if recipient != user and recipient not in hidden:
                outbox.append(frame)
                n += 1
        self._s.metrics.frames_out_by[Typing].inc(n)

    def _set_block(self, cmd: SetBlock) -> None:
        if cmd.applied is not None:
            cmd.applied.set(None)  # before a later request of either user is handled
        pair = direct_room_users(self.key)
        if pair is None or cmd.user not in pair:
            return
        # Not retired (and reloaded) before the block is stored; kept apart from the
        # room's own newest record, which may be newer than the block's.
        self._block_ticket = cmd.ticket
        if cmd.blocked:
            self.blockers = self.blockers | {cmd.user}
            self._typers.clear()
        else:
            self.blockers = self.blockers - {cmd.user}

    def _fan_out(self, frame: bytes, kind: type[Frame]) -> None:
        subs = self._locals
        if self._alone and len(subs) <= WRITE_THROUGH_MAX:
            write_through(subs, frame)
        else:
            for outbox in subs:
                outbox.append(frame)
        if self._remote:
            self._pub += 1
            self._s.cluster.broadcast(self.key, self._pub, frame)  # type: ignore[union-attr]
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
                self._unsubscribe(cmd.link.outbox)
        elif type(cmd) is SetTyping:
            self._typing(cmd)
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
        elif type(cmd) is ReceiptQuery:
            self._receipt_query(cmd)
        elif type(cmd) is SetBlock:
            self._set_block(cmd)
        elif type(cmd) is FlushState:
            self._flush()
            self._store_receipts()
            cmd.reply.set(None)
        elif type(cmd) is Moved:
            self._moved = True  # mid-turn: the room steps down once the turn ends
        else:
            raise TypeError(f"room got {cmd!r}")

    def _attach(self, cmd: Attach) -> None:
        user = cmd.link.user
        ticket: Ticket = COMMITTED
        if cmd.mode is AttachMode.CREATE:
            if self.exists:
                return cmd.reply.fail(ErrorCode.ROOM_EXISTS, "a room with this id exists")
            if not self._s.quotas.create_room(user):
                return cmd.reply.fail(*self._creations_used_up())
            ticket = self._create(cmd.kind, user, (user,))
        elif cmd.mode is AttachMode.DIRECT and not self.exists:
            pair = direct_room_users(self.key)
            if pair is None or user not in pair:
                return cmd.reply.fail(ErrorCode.FORBIDDEN, "not a direct room of yours")
            if self.blockers:  # either way: the other is not even told of the attempt
                return cmd.reply.fail(ErrorCode.BLOCKED, _blocked_message(user, self.blockers))
            if not self._s.quotas.create_room(user):
                return cmd.reply.fail(*self._creations_used_up())
            ticket = self._create(RoomKind.DIRECT, None, pair)
            peer = pair[1] if pair[0] == user else pair[0]
            self._notify(
                peer,
                Member(room=self.key, user=peer, op=MemberOp.ADDED, kind=RoomKind.DIRECT, by=user),
            )
        elif cmd.mode is AttachMode.COMMENTS and not self.exists:
            ticket = self._create(RoomKind.OPEN, cmd.owner, (user,))
        elif not self.exists:
            return cmd.reply.fail(ErrorCode.NOT_FOUND, "no such room")
        if self.blockers:  # a direct room in which one of the two blocks the other
            return cmd.reply.fail(ErrorCode.BLOCKED, _blocked_message(user, self.blockers))
        if user not in self.members:
            joins = cmd.mode is AttachMode.JOIN or cmd.mode is AttachMode.COMMENTS
            if not joins or self.kind is not RoomKind.OPEN:
                return cmd.reply.fail(ErrorCode.FORBIDDEN, "not a member of this room")
            ticket = self._add_member(user, by=user)
        outbox = cmd.link.outbox
        sub = self.subs.get(outbox)
        attached = self._plan_attach(cmd, None if sub is None else sub.covered)
        if sub is None:
            replayed = attached.recovered and cmd.since is not None
            self._subscribe(outbox, _Sub(cmd.link, cmd.since if replayed else self.seq))  # type: ignore[arg-type]
        attached = attrs.evolve(
            attached,
            pub=self._pub,
            cursor=self.receipts.cursor(user),
            state=self._state_frames(),
            members=frozenset(self.members) if self._small() else None,
        )
        ticket.then(cmd.reply.set, attached)

    def _state_frames(self) -> tuple[bytes, ...]:
        """What a session that subscribes learns after its replay: the receipt state and,
        in a large room, the online count."""
        if self._small():
            cursors = self.receipts.all()
            if not cursors:
                return ()
            return (server_frame(encode(ReceiptState(room=self.key, items=cursors))),)
        head = self.seq
        cache = self._counts_cache
        if cache is None or cache[0] != head or cache[1] != self.receipts.version:
            items = self.receipts.counts(head - MAX_RECEIPT_RANGE + 1, head)
            counts = ReceiptCounts(room=self.key, members=len(self.members), items=items)
            cache = self._counts_cache = (head, self.receipts.version, server_frame(encode(counts)))
        online = Online(room=self.key, count=len(self._user_subs))
        return (cache[2], server_frame(encode(online)))

    def _plan_attach(self, cmd: Attach, covered: int | None) -> Attached:
        """What to replay. ``covered`` is set when the session is subscribed already: it
        gets every message after that seq; nothing is replayed to it."""
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
            # Subscribed already: what came after ``since`` went out live on this
            # connection (before this ``joined``), or, older than ``covered``, cannot
            # come in order. Recovered only if there is nothing after it to replay.
            return attached(since == head)
        ring = self._ring
        start = ring[0].message.seq if ring else head + 1
        if since + 1 >= start:
            missed = itertools.islice(ring, since + 1 - start, None)
            return attached(True, tuple(e.frame for e in missed))
        return attached(True, tuple(e.frame for e in ring), (since + 1, start - 1))

    def _creations_used_up(self) -> tuple[ErrorCode, str]:
        q = self._s.settings.quotas
        message = (
            f"rooms created: {q.room_creation_burst} at once, "
            f"{q.room_creations_per_hour:g} per hour; try later"
        )
        return ErrorCode.QUOTA_EXCEEDED, message

    def _create(self, kind: RoomKind, owner: str | None, members: tuple[str, ...]) -> Ticket:
        self._s.rooms.created(self.key)
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
        self._last_ticket = self._s.write_behind.enqueue(record, fence=self._fence)
        return self._last_ticket

    def _add_member(self, user: str, by: str | None) -> Ticket:
        was_small = self._small()
        self.members.add(user)
        record = MemberChanged(room=self.key, user=user, added=True, ts=self._s.now_ms())
        self._last_ticket = self._s.write_behind.enqueue(record, fence=self._fence)
        event = Member(room=self.key, user=user, op=MemberOp.ADDED, kind=self.kind, by=by)
        if self._small():
            self._fan_out(server_frame(encode(event)), Member)
        # After the fan-out: sessions handle the roster at once (tell_session), and their
        # clients should read of the new member before of the member's presence.
        self._roster_changed(was_small)
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
        was_small = self._small()
        self.members.discard(user)
        self.receipts.forget(user)
        self._typers.pop(user, None)
        record = MemberChanged(room=self.key, user=user, added=False, ts=self._s.now_ms())
        ticket = self._last_ticket = self._s.write_behind.enqueue(record, fence=self._fence)
        event = Member(room=self.key, user=user, op=MemberOp.REMOVED, kind=self.kind, by=cmd.by)
        frame = server_frame(encode(event))
        if self._small():
            self._fan_out(frame, Member)
        for outbox, sub in list(self.subs.items()):
            link = sub.link
            if link.user == user:
                if not self._small():
                    outbox.append(frame)  # the one who left is told in any room
                self._unsubscribe(outbox)
                tell_session(link, RoomDropped(self.key))
        self._roster_changed(was_small)
        ticket.then(cmd.reply.set, None)

    def _roster_changed(self, was_small: bool) -> None:
        """Subscribed sessions follow the presence of a small room's members."""
        if self._small():
            event = Roster(self.key, frozenset(self.members))
        elif was_small:
            event = Roster(self.key, None)
            self._online_changed()
        else:
            return
        for sub in self.subs.values():
            tell_session(sub.link, event)

    def _history(self, cmd: HistoryQuery) -> None:
        refusal = self._refusal(cmd.user, reading=True)
        if refusal is not None:
            return cmd.reply.fail(*refusal)
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


def _blocked_message(user: str, blockers: frozenset[str]) -> str:
    if user in blockers:
        return "you block this user; unblock them first"
    return "this user does not accept your messages"
