"""Actors in a cluster: the directory's actor is either the real one or a stand-in.

How this works: in a cluster the directory starts a ``Placed`` actor for every
``(kind, key)`` asked for. It asks placement (``actors.placement``) which node runs
it: this one, and it runs the real actor (a Room, a User, a Kv map) on the same
mailbox; another, and it runs a ``RemoteActor``, which forwards every command there
(``actors.cluster``). Sessions hold the mailbox either way.

A stand-in keeps the links of the local sessions that depend on the actor (subscribers
of a room, the sessions of a user). When the actor moves, because its node is gone or it
lost the actor to another, those sessions are told (``ActorMoved``: they close with 4009
and their clients resume, reaching the actor where it runs now), the stand-in refuses
what is left in its mailbox and retires, and the next command starts a new ``Placed``.

An owner that retires lets the actor go once what it wrote is stored, so the next node
to take it starts from storage without a new epoch.
"""

import logging
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import trio

from actors.cluster import Cluster, RelayReply, room_channel
from actors.directory import Actor, ActorKind
from actors.feed_messages import RankQuery, WatchProfile
from actors.messages import (
    ActorMoved,
    Attach,
    Detach,
    FlushState,
    KvRequest,
    SessionClosed,
    SessionLink,
    SessionOpened,
    SetBlock,
    refuse,
)
from actors.outbox import Sink
from protocol.errors import ErrorCode
from storage.redis_conn import RedisError
from storage.write_behind import COMMITTED, Ticket

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT = 5.0


class _Unplaced:
    """What a ``Placed`` actor looks like before it knows where it runs."""

    exists = False
    sessions: ClassVar[dict[str, Any]] = {}

    def online_users(self) -> set[str]:
        return set()


class Placed:
    def __init__(
        self,
        kind: ActorKind,
        key: str,
        cluster: Cluster,
        make_owner: Callable[[str, Any], Actor],
        predecessor: "Placed | None",
    ) -> None:
        self.kind = kind
        self.key = key
        self._cluster = cluster
        self._make_owner = make_owner
        self._predecessor = predecessor
        self.inner: Any = None
        self.role: str | None = None  # "owner" or "stub", once placed

    def __getattr__(self, name: str) -> Any:
        # Statistics and the admin API read the actor through the directory.
        inner = self.__dict__.get("inner")
        return getattr(_Unplaced() if inner is None else inner, name)

    async def run(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        if self.inner is None:
            owner = await self._resolve(inbox)
            if owner is None:
                return
            if owner == self._cluster.node:
                old = self._predecessor
                crashed = old.inner if old is not None and old.role == "owner" else None
                self.inner = self._make_owner(self.key, crashed)
                self.role = "owner"
            else:
                self.inner = RemoteActor(self.kind, self.key, owner, self._cluster)
                self.role = "stub"
            self._predecessor = None
        await self.inner.run(inbox)
        if self.role == "owner" and not self._cluster.directory.has(self.kind, self.key):
            self._cluster.release(self.kind, self.key, getattr(self.inner, "released", COMMITTED))

    async def _resolve(self, inbox: trio.MemoryReceiveChannel[Any]) -> str | None:
        """The owner's node; None if placement cannot say (Redis unreachable): then what
        waits is refused, and the actor retires."""
        try:
            with trio.fail_after(RESOLVE_TIMEOUT):
                await self._cluster.released(self.kind, self.key)
                return await self._cluster.placement.owner(str(self.kind), self.key)
        except (RedisError, trio.TooSlowError) as exc:
            log.warning("cluster: where %s %r runs is unknown: %s", self.kind, self.key, exc)
        # Retiring fails only while something is queued or being sent: receive it.
        while not self._cluster.directory.try_retire(self.kind, self.key):
            command = await inbox.receive()
            refuse(command, ErrorCode.TRY_LATER, "the cluster is unreachable; retry", self.key)
        return None


class RemoteActor:
    """The stand-in for an actor another node runs."""

    exists = False

    def __init__(self, kind: ActorKind, key: str, owner: str, cluster: Cluster) -> None:
        self.kind = kind
        self.key = key
        self.owner = owner
        self._cluster = cluster
        self.links: dict[Sink, SessionLink] = {}  # local sessions that depend on it
        self._moved = False
        self._relay = cluster.relay(key) if kind is ActorKind.ROOM else None
        self.sessions: dict[str, Any] = {}  # a User actor's, for statistics: none here

    def online_users(self) -> set[str]:
        return {link.user for link in self.links.values() if not link.outbox.closed}

    def moved(self) -> None:
        """The actor is no longer where this stand-in sends: tell its sessions; the rest
        is refused until the stand-in retires."""
        if self._moved:
            return
        self._moved = True
        log.info("cluster: %s %r moved from %s", self.kind, self.key, self.owner)
        for link in list(self.links.values()):
            link.inbox(ActorMoved(str(self.kind), self.key))
        self.links.clear()
        ref = self._cluster.directory.get(self.kind, self.key)
        if ref is not None:
            try:
                ref.send_nowait(_WAKE)
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # busy: it finds out with its next command

    async def run(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        cluster = self._cluster
        cluster.stubs[self.kind, self.key] = self
        idle = cluster.actor_idle
        try:
            while True:
                command: Any = None
                try:  # what is queued first: a wait with a deadline costs a cancel scope
                    command = inbox.receive_nowait()
                except trio.WouldBlock:
                    pass  # not waited for in here: the WouldBlock would live as long
                if command is None:
                    with trio.move_on_after(idle):
                        command = await inbox.receive()
                if command is None or self._moved:
                    if command is not None and command is not _WAKE:
                        refuse(command, ErrorCode.TRY_LATER, f"{self.kind} moved; retry", self.key)
                    if (self._moved or not self._depended_on()) and cluster.directory.try_retire(
                        self.kind, self.key
                    ):
                        return
                    continue
                if command is not _WAKE:
                    await self._forward(command)
        finally:
            if cluster.stubs.get((self.kind, self.key)) is self:
                del cluster.stubs[self.kind, self.key]
            if self._relay is not None and cluster.relays.get(self.key) is self._relay:
                cluster.drop_relay(self.key)

    def _depended_on(self) -> bool:
        for outbox in [ob for ob in self.links if ob.closed]:
            self.forget(outbox)
        return bool(self.links)

    def forget(self, outbox: Sink) -> None:
        """A local session no longer depends on the actor (it left, or closed)."""
        self.links.pop(outbox, None)
        if self._relay is not None:
            self._relay.remove(outbox)

    async def _forward(self, command: Any) -> None:
        kind = type(command)
        if kind is FlushState:  # a drain: nothing of this actor's is stored here
            command.reply.set(None)
            return
        if kind is SetBlock and command.ticket is not COMMITTED:
            # Told once the block is stored, like a room that starts after it.
            ticket: Ticket = command.ticket
            ticket.then(self._tell, attrs.evolve(command, ticket=COMMITTED))
            return
        if kind is Attach:
            link = command.link
            self.links[link.outbox] = link
            if self._relay is not None:
                self._relay.add(link)
                command = attrs.evolve(
                    command, reply=RelayReply(command.reply, self._relay, link.outbox)
                )
                # Subscribed before the room plans the replay: nothing falls between.
                try:
                    with trio.fail_after(self._cluster.request_timeout):
                        await self._cluster.subscriber.subscribed(room_channel(self.key))
                except (RedisError, trio.TooSlowError):
                    self.forget(link.outbox)
                    refuse(command, ErrorCode.TRY_LATER, "the cluster is unreachable; retry")
                    return
        elif kind is Detach or kind is SessionClosed:
            self.forget(command.link.outbox)
        elif (
            kind is SessionOpened
            or kind is KvRequest
            or kind is WatchProfile
            or (kind is RankQuery and command.watch)
        ):
            self.links[command.link.outbox] = command.link
        self._tell(command)

    def _tell(self, command: Any) -> None:
        self._cluster.forward(self.owner, str(self.kind), self.key, command)


class _Wake:
    """Wakes a stand-in whose actor moved, to refuse and retire."""


_WAKE = _Wake()
