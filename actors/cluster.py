"""The cluster: how actors and sessions on different nodes reach each other, through
Redis.

How this works: every node listens on its own inbox channel. A node that does not run an
actor holds a stand-in for it (``actors.remote.RemoteActor``), which packs each command
(``actors.wire``) and publishes it, once, to the inbox of the node that does. There the
command gets stand-ins too: a session's link becomes a ghost whose outbox sends frames
back to that session (``ToSession``) and whose inbox sends it events (``Notify``); a
reply becomes a ``RemoteReply`` that sends the answer back (``Answer``). So the actor
that handles it does not know that its caller is elsewhere.

A room's broadcasts (its messages, receipts, member events) do not go ghost by ghost:
the owner publishes each framed event once on the room's channel, and every node with
subscribers there relays the same bytes to its own sessions' outboxes (``Relay``). A
node subscribes to a room's channel only while it has subscribers in that room. Each
broadcast is numbered; a session that subscribes through another node is answered
with the number of the room's last broadcast before it, so the relay drops what it
buffered meanwhile up to that number: the same merge as on one node, where subscribing
and planning the replay are one step of the room.

All of a node's publishes go out on one connection, in order, and all it hears comes
in on one, in order: an answer and the broadcasts around it arrive in the order the
owner made them.
"""

import itertools
import logging
import weakref
from collections.abc import Callable
from typing import Any

import trio

from actors.directory import ActorKind, Directory
from actors.messages import (
    ActorMoved,
    Attached,
    Moved,
    Reply,
    RoomDropped,
    SessionLink,
    refuse,
)
from actors.metrics import Metrics
from actors.outbox import Sink
from actors.placement import PREFIX, Placement
from actors.wire import (
    Answer,
    Command,
    LinkRef,
    NotHere,
    Notify,
    ReplyRef,
    ToSession,
    WireError,
)
from actors.wire import pack as pack_record
from actors.wire import unpack as unpack_record
from protocol.errors import ErrorCode
from storage.redis_conn import Redis, RedisError, Subscriber
from storage.write_behind import Ticket

log = logging.getLogger(__name__)

WATCH_INTERVAL = 0.5  # seconds between checks of the nodes this one depends on
PUB_BYTES = 8  # a broadcast: its number (big-endian), then the frame


def inbox_channel(node: str) -> bytes:
    return f"{PREFIX}{{node:{node}}}:inbox".encode()


CREATED_CHANNEL = f"{PREFIX}{{rooms}}:created".encode()


def room_channel(room: str) -> bytes:
    return f"{PREFIX}{{room:{room}}}:events".encode()


class GhostOutbox:
    """On the owner's node: the outbox of a session on ``node``."""

    __slots__ = ("__weakref__", "_cluster", "closed", "node", "sid")

    def __init__(self, cluster: "Cluster", node: str, sid: str) -> None:
        self._cluster = cluster
        self.node = node
        self.sid = sid
        self.closed = False  # set when its node is gone

    def append(self, data: bytes) -> None:
        if not self.closed:
            self._cluster.send(self.node, ToSession(self.sid, data))


class RemoteReply(Reply[Any]):
    """On the owner's node: a reply whose answer goes back to the node that asked."""

    __slots__ = ("_cluster", "_sent", "ref")

    def __init__(self, cluster: "Cluster", ref: ReplyRef) -> None:
        super().__init__()
        self._cluster = cluster
        self.ref = ref
        self._sent = False

    def set(self, value: Any) -> None:
        ticket = value if type(value) is Ticket else getattr(value, "ticket", None)
        if type(ticket) is Ticket and not ticket.committed:
            # What waits on a record across nodes waits for it to be stored: the
            # other node cannot follow a ticket of ours (it arrives as a stored one).
            ticket.then(self.set, value)
            ticket.otherwise(lambda _: self.fail(ErrorCode.TRY_LATER, "moved; retry"), None)
            return
        if not self._sent:
            self._sent = True
            self._cluster.send(self.ref.node, Answer(self.ref.id, value))

    def fail(self, code: ErrorCode, message: str) -> None:
        if not self._sent:
            self._sent = True
            self._cluster.send(self.ref.node, Answer(self.ref.id, None, code, message))


class Relay:
    """On a node with subscribers in a room another node runs: the room's broadcasts to
    their outboxes. A session waiting for its ``Attached`` buffers what arrives."""

    __slots__ = ("delivered", "last", "links", "live", "pending", "room")

    def __init__(self, room: str) -> None:
        self.room = room
        self.live: dict[Sink, SessionLink] = {}
        self.pending: dict[Sink, list[tuple[int, bytes]]] = {}
        self.links: dict[Sink, SessionLink] = {}
        self.last = 0  # the number of the last broadcast heard
        self.delivered = 0  # frames appended to outboxes here, for the metrics

    def add(self, link: SessionLink) -> None:
        if link.outbox not in self.live:
            self.pending[link.outbox] = []
        self.links[link.outbox] = link

    def remove(self, outbox: Sink) -> None:
        self.live.pop(outbox, None)
        self.pending.pop(outbox, None)
        self.links.pop(outbox, None)

    def attached(self, outbox: Sink, pub: int) -> None:
        buffered = self.pending.pop(outbox, None)
        if buffered is None:
            return
        for number, frame in buffered:
            if number > pub:
                outbox.append(frame)
        self.live[outbox] = self.links[outbox]

    def deliver(self, payload: bytes) -> None:
        number = int.from_bytes(payload[:PUB_BYTES], "big")
        if self.last and number != self.last + 1:
            # Missed broadcasts (Redis dropped them, or the room restarted): what this
            # node's sessions have is no longer the room's history.
            self.lost("missed broadcasts")
        self.last = number
        frame = payload[PUB_BYTES:]
        for outbox in self.live:
            outbox.append(frame)
        self.delivered += len(self.live)
        if self.pending:
            for buffered in self.pending.values():
                buffered.append((number, frame))

    def lost(self, why: str) -> None:
        """Tell the sessions relayed here to resume: their room moved, in effect."""
        if self.links:
            log.warning("cluster: room %r: %s; %d sessions resume", self.room, why, len(self.links))
        for link in list(self.links.values()):
            link.inbox(ActorMoved("room", self.room))
        self.live.clear()
        self.pending.clear()
        self.links.clear()
        self.last = 0


class RelayReply(Reply[Attached]):
    """The reply to an ``Attach`` forwarded to another node: makes the session live in
    the relay the moment the answer arrives, in order with the broadcasts around it."""

    __slots__ = ("_inner", "_outbox", "_relay")

    def __init__(self, inner: Reply[Attached], relay: Relay, outbox: Sink) -> None:
        super().__init__()
        self._inner = inner
        self._relay = relay
        self._outbox = outbox

    def set(self, value: Attached) -> None:
        self._relay.attached(self._outbox, value.pub)
        self._inner.set(value)

    def fail(self, code: ErrorCode, message: str) -> None:
        self._relay.remove(self._outbox)
        self._inner.fail(code, message)


class _Exits:
    def __init__(self, cluster: "Cluster") -> None:
        self._c = cluster

    def link(self, link: SessionLink) -> LinkRef:
        outbox = link.outbox
        if type(outbox) is GhostOutbox:  # passed on: answers go to the session's node
            return LinkRef(outbox.node, link.id, link.user)
        self._c.sessions[link.id] = link
        return LinkRef(self._c.node, link.id, link.user)

    def reply(self, reply: Reply[Any]) -> ReplyRef:
        if type(reply) is RemoteReply:
            return reply.ref
        rid = next(self._c._ids)
        self._c.pending[rid] = (reply, trio.current_time())
        return ReplyRef(self._c.node, rid)


class _Entries:
    def __init__(self, cluster: "Cluster") -> None:
        self._c = cluster

    def link(self, ref: LinkRef) -> SessionLink:
        if ref.node == self._c.node:
            found = self._c.sessions.get(ref.id)
            if found is not None:
                return found
        key = (ref.node, ref.id)
        ghost = self._c.ghosts.get(key)
        if ghost is None:
            outbox = GhostOutbox(self._c, ref.node, ref.id)
            node, sid, cluster = ref.node, ref.id, self._c

            def inbox(event: object) -> None:
                if not outbox.closed:
                    cluster.send(node, Notify(sid, event))

            ghost = SessionLink(ref.id, ref.user, outbox, inbox)
            self._c.ghosts[key] = ghost
        return ghost

    def reply(self, ref: ReplyRef) -> Reply[Any]:
        return RemoteReply(self._c, ref)


class Cluster:
    def __init__(
        self,
        redis: Redis,
        subscriber: Subscriber,
        placement: Placement,
        directory: Directory,
        metrics: Metrics,
        nursery: trio.Nursery,
        *,
        request_timeout: float,
        actor_idle: float,
    ) -> None:
        self.redis = redis
        self.subscriber = subscriber
        self.placement = placement
        self.node = placement.node
        self.directory = directory
        self.metrics = metrics
        self.request_timeout = request_timeout
        # Sessions of this node known to other nodes, and ghosts of other nodes' sessions:
        # each lives as long as an actor holds it.
        self.sessions: weakref.WeakValueDictionary[str, SessionLink] = weakref.WeakValueDictionary()
        self.ghosts: weakref.WeakValueDictionary[tuple[str, str], SessionLink] = (
            weakref.WeakValueDictionary()
        )
        self.pending: dict[int, tuple[Reply[Any], float]] = {}
        self.relays: dict[str, Relay] = {}
        self.stubs: dict[tuple[str, str], Any] = {}  # (kind, key) -> RemoteActor
        self._ids = itertools.count(1)
        self._exits = _Exits(self)
        self._entries = _Entries(self)
        self.unreadable = 0
        self._gone: set[str] = set()  # nodes found gone (told once in the log)
        self.relayed_before = 0  # frames relayed by relays since dropped
        self.on_room_created: Callable[[str], None] | None = None
        self.actor_idle = actor_idle
        self._releasing: dict[tuple[ActorKind, str], trio.Event] = {}
        self._nursery: trio.Nursery = nursery

    # --- sending ----------------------------------------------------------------------

    def send(self, node: str, envelope: object) -> None:
        """Publish ``envelope`` to ``node``'s inbox; never blocks. Dropped (and counted by
        the client) while Redis is unreachable: requests time out, sessions resume."""
        self.redis.send("PUBLISH", inbox_channel(node), pack_record(envelope, self._exits))

    def forward(self, node: str, kind: str, key: str, record: object) -> None:
        """Hand ``record`` to actor ``(kind, key)`` on ``node``, or refuse it at once
        while Redis is unreachable."""
        if not self.redis.connected:
            refuse(record, ErrorCode.TRY_LATER, "the cluster is unreachable; retry", key)
            return
        self.send(node, Command(kind, key, record, origin=self.node))

    def broadcast(self, room: str, number: int, frame: bytes) -> None:
        """The owner's one publish of a room event, for every other node's relay."""
        self.redis.send("PUBLISH", room_channel(room), number.to_bytes(PUB_BYTES, "big") + frame)

    # --- relays -----------------------------------------------------------------------

    def relay(self, room: str) -> Relay:
        relay = self.relays.get(room)
        if relay is None:
            relay = self.relays[room] = Relay(room)
            self.subscriber.subscribe(room_channel(room), relay.deliver)
        return relay

    def drop_relay(self, room: str) -> None:
        relay = self.relays.pop(room, None)
        if relay is not None:
            self.relayed_before += relay.delivered
            self.subscriber.unsubscribe(room_channel(room))

    # --- receiving --------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on this node's inbox; watch the nodes this one depends on."""
        self.subscriber.on_reconnect = self._resync
        self.subscriber.subscribe(inbox_channel(self.node), self._on_inbox)
        self.subscriber.subscribe(CREATED_CHANNEL, self._on_created)
        with trio.fail_after(max(5.0, self.request_timeout)):
            await self.subscriber.subscribed(inbox_channel(self.node))
        task_status.started()
        while True:
            # Often, whatever the lease: a dead node is noticed this long after its lease.
            await trio.sleep(min(WATCH_INTERVAL, self.placement.lease / 4))
            self._sweep()
            try:
                await self._watch_nodes()
            except Exception as exc:  # RedisError: the next round tries again
                log.debug("cluster: node watch failed: %s", exc)

    def room_created(self, room: str) -> None:
        """Tell every node: one that remembers ``room`` as missing forgets it."""
        self.redis.send("PUBLISH", CREATED_CHANNEL, f"{self.node} {room}".encode())

    def _on_created(self, payload: bytes) -> None:
        node, _, room = payload.decode(errors="replace").partition(" ")
        if node != self.node and self.on_room_created is not None:
            self.on_room_created(room)

    def _resync(self) -> None:
        """Subscribed again after a reconnect: whatever was published meanwhile is lost,
        so sessions relayed here resume."""
        for relay in self.relays.values():
            relay.lost("Redis reconnected")

    def _on_inbox(self, payload: bytes) -> None:
        try:
            envelope = unpack_record(payload, self._entries)
        except WireError as exc:
            self.unreadable += 1
            log.error("cluster: unreadable envelope dropped: %s", exc)
            return
        kind = type(envelope)
        if kind is ToSession:
            link = self.sessions.get(envelope.id)
            if link is not None:
                link.outbox.append(envelope.frame)
        elif kind is Answer:
            waiting = self.pending.pop(envelope.id, None)
            if waiting is not None:
                reply = waiting[0]
                if envelope.code is None:
                    reply.set(envelope.value)
                else:
                    reply.fail(envelope.code, envelope.message)
        elif kind is Notify:
            link = self.sessions.get(envelope.id)
            if link is not None:
                if type(envelope.event) is RoomDropped:
                    # Out of the room: this node's stand-in stops relaying it to them.
                    stub = self.stubs.get((ActorKind.ROOM, envelope.event.room))
                    if stub is not None:
                        stub.forget(link.outbox)
                link.inbox(envelope.event)
        elif kind is Command:
            self._on_command(envelope)
        elif kind is NotHere:
            stub = self.stubs.get((ActorKind(envelope.kind), envelope.key))
            if stub is not None:
                stub.moved()
        else:
            self.unreadable += 1
            log.error("cluster: %s is not an envelope", kind.__name__)

    def _on_command(self, command: Command) -> None:
        kind, key, record = ActorKind(command.kind), command.key, command.record
        here = self.directory.actor(kind, key)
        runs_here = here is not None and getattr(here, "role", None) == "owner"
        if not runs_here and (command.kind, key) not in self.placement.owned:
            # The sender thinks this node runs it, and it does not (any more): refused,
            # never passed on, and the sender's stand-in steps down and looks again.
            refuse(record, ErrorCode.TRY_LATER, f"{kind} moved; retry", key)
            if command.origin:
                self.send(command.origin, NotHere(command.kind, key))
            return
        try:
            ref = self.directory.ref(kind, key)
        except RuntimeError:  # the node is stopping: its directory starts nothing more
            refuse(record, ErrorCode.TRY_LATER, "node stopping; retry", key)
            return
        try:
            ref.send_nowait(record)
        except trio.WouldBlock:
            refuse(record, ErrorCode.TRY_LATER, f"{kind} busy; retry", key)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            refuse(record, ErrorCode.TRY_LATER, f"{kind} stopped; retry", key)

    # --- failure ----------------------------------------------------------------------

    def _sweep(self) -> None:
        """Forget requests nobody waits for any more (their callers timed out)."""
        too_old = trio.current_time() - 2 * self.request_timeout
        for rid in [r for r, (_, at) in self.pending.items() if at < too_old]:
            reply, _ = self.pending.pop(rid)
            reply.fail(ErrorCode.TIMEOUT, "no answer in time")

    async def _watch_nodes(self) -> None:
        """Nodes whose heartbeat lapsed: their actors' stand-ins here step down, and
        their sessions' ghosts here close."""
        owners = {stub.owner for stub in self.stubs.values()}
        ghosts = {node for (node, _), link in self.ghosts.items() if not link.outbox.closed}
        nodes = sorted((owners | ghosts) - {self.node})
        if not nodes:
            return
        alive = await self.placement.alive(nodes)
        for node, up in alive.items():
            if up:
                self._gone.discard(node)
                continue
            if node not in self._gone:
                self._gone.add(node)
                log.warning("cluster: node %s is gone", node)
            for stub in [s for s in self.stubs.values() if s.owner == node]:
                stub.moved()
            for (ghost_node, _), link in list(self.ghosts.items()):
                if ghost_node == node:
                    link.outbox.closed = True  # type: ignore[misc]

    def lost(self, kind: str, key: str) -> None:
        """Placement found ``(kind, key)`` taken by another node while this one lapsed."""
        ref = self.directory.get(ActorKind(kind), key)
        if ref is not None:
            try:
                ref.send_nowait(Moved())
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass  # its next write is refused by storage: it steps down then

    def moved_later(self, kind: str, key: str) -> Callable[[], None]:
        """What tells actor ``(kind, key)`` that storage refused it: it steps down."""
        return lambda: self.lost(kind, key)

    # --- letting actors go -------------------------------------------------------------

    def release(self, kind: ActorKind, key: str, stored: Ticket) -> None:
        """Once ``stored`` is, let ``(kind, key)`` go (its owner retired)."""
        done = trio.Event()
        self._releasing[kind, key] = done

        async def release() -> None:
            try:
                with trio.move_on_after(self.request_timeout):
                    await self.placement.release(str(kind), key)
            except RedisError as exc:  # it lapses with this node, or is taken again here
                log.info("cluster: %s %r not let go: %s", kind, key, exc)
            finally:
                done.set()
                if self._releasing.get((kind, key)) is done:
                    del self._releasing[kind, key]

        def start(_: object) -> None:
            self._nursery.start_soon(release)

        stored.then(start, None)
        stored.otherwise(lambda _: done.set(), None)

    async def released(self, kind: ActorKind, key: str) -> None:
        """Wait until a release of ``(kind, key)`` under way is over."""
        done = self._releasing.get((kind, key))
        if done is not None:
            await done.wait()
