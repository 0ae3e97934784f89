"""The actor directory: spawn on demand, retire when idle, restart after a crash.

How this works: ``ref(kind, key)`` returns the send side of the actor's mailbox,
starting the actor in the directory's nursery if it is not running. An actor that has
been idle asks ``try_retire``; the directory agrees only while the mailbox is empty and
nobody is blocked sending to it. That check and the removal are one synchronous step,
so a message can never slip into a mailbox that is about to be abandoned. Callers look
the actor up for each send and never keep a ref across an await.

An actor with state but nothing to do (a User actor whose sessions are all connected
and idle) may ask ``try_hibernate`` instead: same check, but the directory keeps the
actor object and drops only its task and mailbox; the next ``ref`` or ``get`` gives it a
new mailbox and runs the same object again. A task, its mailbox and its wait cost about
7 KiB per online user, which was most of an idle session's memory (BENCHMARKS.md, "Idle
sessions").

When ``run`` raises, the supervisor logs it, counts it, and starts a fresh actor on
the same mailbox, passing it the crashed one so it can reload from storage and take
over what must survive (a room's subscribers). Messages already queued are kept. A
crash loop is slowed down with a growing pause, never allowed to take the node down.
"""

import enum
import logging
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import attrs
import trio

from actors.metrics import Metrics

log = logging.getLogger(__name__)

CRASH_WINDOW = 10.0  # seconds
CRASHES_BEFORE_PAUSE = 3
MAX_PAUSE = 5.0


class ActorKind(enum.StrEnum):
    ROOM = "room"
    USER = "user"
    KV = "kv"
    FEED = "feed"  # a feed shard, by cell
    PROFILE = "profile"  # a user's follows, interests and who blocks them
    VIEWS = "views"  # a session's feed views, on the session's node


class Actor(Protocol):
    async def run(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        """Serve the mailbox; return only after ``Directory.try_retire`` agreed."""


#: Builds the actor for ``key``; the second argument is the actor that just crashed.
Factory = Callable[[str, Any], Actor]


@attrs.define
class _Entry:
    send: trio.MemorySendChannel[Any] | None  # None while the actor hibernates
    receive: trio.MemoryReceiveChannel[Any] | None
    actor: Actor | None = None


class Directory:
    def __init__(self, nursery: trio.Nursery, metrics: Metrics, *, mailbox_size: int) -> None:
        self._nursery = nursery
        self._metrics = metrics
        self._mailbox_size = mailbox_size
        self._factories: dict[ActorKind, Factory] = {}
        self._entries: dict[tuple[ActorKind, str], _Entry] = {}

    def register(self, kind: ActorKind, factory: Factory) -> None:
        self._factories[kind] = factory

    def ref(self, kind: ActorKind, key: str) -> trio.MemorySendChannel[Any]:
        """The mailbox of actor ``(kind, key)``, started (or woken) if needed."""
        entry = self._entries.get((kind, key))
        if entry is None:
            entry = self._entries[kind, key] = _Entry(None, None)
        if entry.send is None:
            return self._start(kind, key, entry)
        return entry.send

    def get(self, kind: ActorKind, key: str) -> trio.MemorySendChannel[Any] | None:
        """The mailbox of actor ``(kind, key)`` if it exists (woken if it hibernates);
        never starts a new one."""
        entry = self._entries.get((kind, key))
        if entry is None:
            return None
        if entry.send is None:
            return self._start(kind, key, entry)
        return entry.send

    def _start(self, kind: ActorKind, key: str, entry: _Entry) -> trio.MemorySendChannel[Any]:
        send, receive = trio.open_memory_channel[Any](self._mailbox_size)
        entry.send, entry.receive = send, receive
        self._nursery.start_soon(self._supervise, kind, key, entry, receive, name=f"{kind}:{key}")
        return send

    def has(self, kind: ActorKind, key: str) -> bool:
        """Whether actor ``(kind, key)`` is running (or hibernating)."""
        return (kind, key) in self._entries

    def actor(self, kind: ActorKind, key: str) -> Any:
        """The running actor object, for read-only statistics (or None)."""
        entry = self._entries.get((kind, key))
        return None if entry is None else entry.actor

    def actors(self, kind: ActorKind) -> Iterator[Any]:
        for (k, _), entry in list(self._entries.items()):
            if k is kind and entry.actor is not None:
                yield entry.actor

    def count(self, kind: ActorKind) -> int:
        return sum(1 for k, _ in self._entries if k is kind)

    def try_retire(self, kind: ActorKind, key: str) -> bool:
        """Remove an idle actor if nothing waits for it; the actor then returns."""
        entry = self._entries.get((kind, key))
        if entry is None:
            return True
        if not self._idle(entry):
            return False
        del self._entries[kind, key]
        assert entry.send is not None
        entry.send.close()
        return True

    def try_hibernate(self, kind: ActorKind, key: str) -> bool:
        """Keep an idle actor's object but not its task and mailbox, if nothing waits for
        it; the actor then returns from ``run``, and runs again on the next message."""
        entry = self._entries.get((kind, key))
        if entry is None or not self._idle(entry):
            return False
        assert entry.send is not None
        entry.send.close()
        entry.send = entry.receive = None
        return True

    @staticmethod
    def _idle(entry: _Entry) -> bool:
        assert entry.send is not None
        stats = entry.send.statistics()
        return not (stats.current_buffer_used or stats.tasks_waiting_send)

    async def _supervise(
        self,
        kind: ActorKind,
        key: str,
        entry: _Entry,
        receive: trio.MemoryReceiveChannel[Any],
    ) -> None:
        # Created lazily: most actors never crash, and a deque costs 760 bytes.
        crashes: deque[float] | None = None
        pause = 0.5
        try:
            async with receive:
                if entry.actor is None:
                    entry.actor = self._factories[kind](key, None)
                # else: a hibernating actor, woken
                while True:
                    try:
                        await entry.actor.run(receive)
                        return
                    except Exception:
                        log.exception("%s actor %r crashed; restarting it", kind, key)
                        self._metrics.actor_crashes.labels(kind=str(kind)).inc()
                    if crashes is None:
                        crashes = deque(maxlen=CRASHES_BEFORE_PAUSE)
                    crashes.append(trio.current_time())
                    if len(crashes) == crashes.maxlen and crashes[-1] - crashes[0] < CRASH_WINDOW:
                        log.error("%s actor %r keeps crashing; pausing %.1fs", kind, key, pause)
                        await trio.sleep(pause)
                        pause = min(MAX_PAUSE, pause * 2)
                    entry.actor = self._factories[kind](key, entry.actor)
        finally:
            # Unless it retired (gone), hibernates (no mailbox) or was woken again
            # meanwhile (another mailbox, another supervisor).
            if self._entries.get((kind, key)) is entry and entry.receive is receive:
                del self._entries[kind, key]
