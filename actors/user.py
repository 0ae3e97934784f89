"""The User actor: one per online user, holding all of that user's sessions.

It subscribes to the bus channel ``user:<id>`` while it runs, so an event for the user
(an invitation, a new direct room) reaches every session of theirs, on whichever node
the event was raised.

It owns the user's presence: online from the first session; after the last one closes,
offline only once the grace period has passed without a new session, so a reconnect
(a phone switching networks) shows no offline/online flicker. Each change is published
once (``actors.presence``). It also owns the user's status and block list, loaded from
storage when it starts and written behind. It retires once offline and idle.

While it has nothing to do (loaded, online, every session connected, no grace period
running) it hibernates (``Directory.try_hibernate``): no task, no mailbox, its state
and its ``user:<id>`` subscription kept; the next command (a session opening or closing,
a status or block change) runs it again. Most online users are idle, and a task per
user was the largest part of an idle session's memory.
"""

import logging
from collections.abc import Callable

import trio

from actors.directory import ActorKind, Directory
from actors.feed_messages import BlockedBy
from actors.messages import (
    ActorMoved,
    BlocksChanged,
    ChangeBlock,
    ChangeStatus,
    ForUser,
    Moved,
    Reply,
    SessionClosed,
    SessionLink,
    SessionOpened,
    UserCommand,
    tell_session,
)
from actors.presence import presence_note
from actors.services import Services, claim_fence, read_until_stored, retire_refusing
from protocol.errors import ErrorCode
from protocol.frames import Status
from storage.store import BlockChanged, Fence, UserSeen
from storage.write_behind import COMMITTED, Ticket

log = logging.getLogger(__name__)


class User:
    __slots__ = (
        "_fence",
        "_hibernating",
        "_last_ticket",
        "_loaded",
        "_s",
        "_unsubscribe",
        "_waiting",
        "blocks",
        "grace_until",
        "key",
        "last_seen",
        "loaded",
        "online",
        "sessions",
        "status",
    )

    def __init__(self, key: str, services: Services, predecessor: "User | None") -> None:
        self.key = key
        self._s = services
        self.sessions: dict[str, SessionLink] = {}
        self.loaded = False
        self.status = Status.ONLINE
        self.blocks: frozenset[str] = frozenset()
        self.online = False
        self.grace_until: float | None = None  # offline is announced then, if still alone
        self.last_seen: int | None = None
        self._last_ticket: Ticket = COMMITTED
        self._loaded: trio.Event | None = None  # made if a command must wait for the load
        self._unsubscribe: Callable[[], None] | None = None  # kept while hibernating
        self._hibernating = False
        self._waiting: trio.CancelScope | None = None  # the serving loop's wait
        self._fence: Fence | None = None  # in a cluster, the claim on the user's rows
        if predecessor is not None:
            # Sessions outlive a crash of their user actor: the new one keeps them, and
            # what it knew (some of it not stored yet).
            self.sessions = predecessor.sessions
            if predecessor.loaded:
                self.loaded = True
                self.status = predecessor.status
                self.blocks = predecessor.blocks
                self.online = predecessor.online
                self.grace_until = predecessor.grace_until
                self.last_seen = predecessor.last_seen
                self._last_ticket = predecessor._last_ticket
                self._fence = predecessor._fence

    async def run(self, inbox: trio.MemoryReceiveChannel[UserCommand]) -> None:
        if self._unsubscribe is None:  # else woken from hibernation, still subscribed
            self._unsubscribe = self._s.bus.subscribe(f"user:{self.key}", self._deliver)
        self._hibernating = False
        try:
            if self.loaded:
                await self._serve(inbox)
                return
            async with trio.open_nursery() as nursery:
                # Sessions are registered at once, so events for the user reach them
                # while storage is read; presence waits for what storage says.
                nursery.start_soon(self._load_then_announce)
                await self._serve(inbox)
                nursery.cancel_scope.cancel()
        finally:
            if not self._hibernating:
                self._unsubscribe()
                self._unsubscribe = None

    async def _load_then_announce(self) -> None:
        await self._load()
        if self._loaded is not None:
            self._loaded.set()
        if self.sessions:
            self.online = True
            self._publish()
            for link in self.sessions.values():
                tell_session(link, BlocksChanged(self.blocks))
        if self._waiting is not None:
            self._waiting.cancel()  # the serving loop looks whether it may hibernate now

    async def _serve(self, inbox: trio.MemoryReceiveChannel[UserCommand]) -> None:
        idle = self._s.settings.actor_idle
        quiet_since = trio.current_time()
        while True:
            wake = quiet_since + idle
            if self.grace_until is not None:
                wake = min(wake, self.grace_until)
            command: UserCommand | None = None
            with trio.move_on_at(wake) as waiting:
                self._waiting = waiting
                command = await inbox.receive()
            self._waiting = None
            fence = self._fence
            if fence is not None and (fence.stale or type(command) is Moved):
                return await self._step_down(inbox)
            if not waiting.cancelled_caught:
                quiet_since = trio.current_time()
                if not self.loaded and type(command) in (ChangeStatus, ChangeBlock):
                    if self._loaded is None:
                        self._loaded = trio.Event()
                    await self._loaded.wait()
                assert command is not None
                self._handle(command)
                if self._may_hibernate(inbox) and self._s.directory.try_hibernate(
                    ActorKind.USER, self.key
                ):
                    self._hibernating = True
                    return
                continue
            now = trio.current_time()
            if now >= quiet_since + idle:
                quiet_since = now
                # A session that could not say goodbye leaves a closed outbox behind.
                for sid in [k for k, v in self.sessions.items() if v.outbox.closed]:
                    del self.sessions[sid]
                self._maybe_alone(now)
            if self.grace_until is not None and now >= self.grace_until:
                self._go_offline()
            if (
                self.loaded
                and not self.sessions
                and not self.online
                and self._last_ticket.committed
                and self._s.directory.try_retire(ActorKind.USER, self.key)
            ):
                self._s.presence.remove(self.key)  # storage has it all now
                return
            if self._may_hibernate(inbox) and self._s.directory.try_hibernate(
                ActorKind.USER, self.key
            ):
                self._hibernating = True
                return

    async def _step_down(self, inbox: trio.MemoryReceiveChannel[UserCommand]) -> None:
        """Another node runs this user now: their sessions resume there."""
        for link in self.sessions.values():
            tell_session(link, ActorMoved("user", self.key))
        self.sessions.clear()
        await retire_refusing(self._s, ActorKind.USER, self.key, inbox)
        self._s.presence.forget(self.key)

    def _may_hibernate(self, inbox: trio.MemoryReceiveChannel[UserCommand]) -> bool:
        """Nothing to do until the next command: no timer of ours is needed. A closed
        outbox is a session that may not say goodbye: the idle sweep removes it."""
        return (
            self.loaded
            and self.online
            and self.grace_until is None
            and not inbox.statistics().current_buffer_used
            and all(not link.outbox.closed for link in self.sessions.values())
        )

    async def _load(self) -> None:
        store = self._s.store
        if self._s.cluster is not None:
            self._fence, _ = await claim_fence(self._s, "user", self.key)
        snapshot = await read_until_stored(f"user {self.key!r}", lambda: store.load_user(self.key))
        self.status = snapshot.status
        self.blocks = snapshot.blocks
        self.last_seen = snapshot.last_seen
        self.loaded = True

    def _handle(self, command: UserCommand) -> None:
        if type(command) is SessionOpened:
            self.sessions[command.link.id] = command.link
            if not self.loaded:
                return  # _load_then_announce takes it from here
            self.grace_until = None  # back within the grace period: nobody hears a thing
            if not self.online:
                self.online = True
                self._publish()
            tell_session(command.link, BlocksChanged(self.blocks))
        elif type(command) is SessionClosed:
            self.sessions.pop(command.link.id, None)
            self._maybe_alone(trio.current_time())
        elif type(command) is ChangeStatus:
            self.status = command.status
            self._store(UserSeen(user=self.key, status=self.status, last_seen=None))
            if self.online:
                self._publish()
            self._last_ticket.then(command.reply.set, None)
            self._last_ticket.otherwise(_moved, command.reply)
        elif type(command) is ChangeBlock:
            self._block(command)
        elif type(command) is ForUser:
            self._append(command.frame)
        elif type(command) is Moved:
            pass  # not claimed yet (no fence): nothing of ours to give up
        else:
            raise TypeError(f"user got {command!r}")

    def _block(self, command: ChangeBlock) -> None:
        other = command.other
        limit = self._s.settings.quotas.max_blocks_per_user
        if command.blocked and other not in self.blocks and len(self.blocks) >= limit:
            # Each block copies the set and tells every session: bounded like the rest.
            self._s.metrics.quota_refusals.labels(quota="blocks").inc()
            return command.reply.fail(ErrorCode.QUOTA_EXCEEDED, f"at most {limit} blocks")
        if command.blocked:
            self.blocks = self.blocks | {other}
        else:
            self.blocks = self.blocks - {other}
        record = BlockChanged(
            user=self.key, other=other, blocked=command.blocked, ts=self._s.now_ms()
        )
        ticket = self._store(record)
        self._put_in_book()
        # The user concerned, if they follow us, sees us offline from now on (without a
        # last-seen time), or as we are again; nobody else hears of it. Later changes
        # are hidden from the blocked: an "offline" at each would tell them we are active.
        if command.blocked:
            note = presence_note(self.key, Status.OFFLINE, frozenset(), None, frozenset({other}))
        else:
            status, ts = (self.status, None) if self.online else (Status.OFFLINE, self.last_seen)
            note = presence_note(self.key, status, frozenset(), ts, frozenset({other}))
        self._s.bus.publish(f"presence:{self.key}", note)
        for link in self.sessions.values():
            tell_session(link, BlocksChanged(self.blocks))
        # The other's feeds lose (or regain) our posts once the block is stored.
        ticket.then(_tell_profile, (self._s.directory, other, BlockedBy(self.key, command.blocked)))
        command.reply.set(ticket)

    def _maybe_alone(self, now: float) -> None:
        if not self.sessions and self.online and self.grace_until is None:
            self.grace_until = now + self._s.settings.presence_grace

    def _go_offline(self) -> None:
        self.grace_until = None
        self.online = False
        self.last_seen = self._s.now_ms()
        self._store(UserSeen(user=self.key, status=self.status, last_seen=self.last_seen))
        self._publish()

    def _publish(self) -> None:
        """Tell every follower, once, whatever the number of rooms they share."""
        self._put_in_book()
        status, ts = (self.status, None) if self.online else (Status.OFFLINE, self.last_seen)
        note = presence_note(self.key, status, self.blocks, ts)
        self._s.bus.publish(f"presence:{self.key}", note)
        self._s.metrics.presence_changes.inc()

    def _put_in_book(self) -> None:
        if self.online:
            self._s.presence.put(self.key, self.status, self.blocks)
        else:
            self._s.presence.put(self.key, Status.OFFLINE, self.blocks, self.last_seen)

    def _store(self, record: UserSeen | BlockChanged) -> Ticket:
        self._last_ticket = self._s.write_behind.enqueue(record, fence=self._fence)
        return self._last_ticket

    def _deliver(self, frame: object) -> None:
        assert isinstance(frame, bytes)
        ref = self._s.directory.get(ActorKind.USER, self.key)  # woken if it hibernates
        if ref is not None:
            try:
                ref.send_nowait(ForUser(frame))
                return
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # a full mailbox: those registered get it now, and only they
        self._append(frame)

    def _append(self, frame: bytes) -> None:
        for link in self.sessions.values():
            link.outbox.append(frame)


def _tell_profile(args: tuple[Directory, str, BlockedBy]) -> None:
    directory, user, blocked_by = args
    try:
        directory.ref(ActorKind.PROFILE, user).send_nowait(blocked_by)
    except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
        # Read from storage by the Profile that starts next; a running one misses it.
        log.warning("%s's feeds not told of a block by %s: mailbox full", user, blocked_by.other)


def _moved(reply: Reply[None]) -> None:
    reply.fail(ErrorCode.TRY_LATER, "moved to another node; retry")
