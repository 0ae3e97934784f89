"""The actor directory: spawn on demand, retire when idle, restart after a crash.

How this works: ``ref(kind, key)`` returns the send side of the actor's mailbox,
starting the actor in the directory's nursery if it is not running. An actor that has
been idle asks ``try_retire``; the directory agrees only while the mailbox is empty and
nobody is blocked sending to it. That check and the removal are one synchronous step,
so a message can never slip into a mailbox that is about to be abandoned. Callers look
the actor up for each send and never keep a ref across an await.

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


class Actor(Protocol):
    async def run(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        """Serve the mailbox; return only after ``Directory.try_retire`` agreed."""


#: Builds the actor for ``key``; the second argument is the actor that just crashed.
Factory = Callable[[str, Any], Actor]


@attrs.define
class _Entry:
    send: trio.MemorySendChannel[Any]
    receive: trio.MemoryReceiveChannel[Any]
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
        """The mailbox of actor ``(kind, key)``, started if needed."""
        entry = self._entries.get((kind, key))
        if entry is None:
            send, receive = trio.open_memory_channel[Any](self._mailbox_size)
            entry = self._entries[kind, key] = _Entry(send, receive)
            self._nursery.start_soon(self._supervise, kind, key, entry, name=f"{kind}:{key}")
        return entry.send

    def get(self, kind: ActorKind, key: str) -> trio.MemorySendChannel[Any] | None:
        """The mailbox of actor ``(kind, key)`` if it runs; never starts one."""
        entry = self._entries.get((kind, key))
        return None if entry is None else entry.send

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
        stats = entry.send.statistics()
        if stats.current_buffer_used or stats.tasks_waiting_send:
            return False
        del self._entries[kind, key]
        entry.send.close()
        return True

    async def _supervise(self, kind: ActorKind, key: str, entry: _Entry) -> None:
        crashes: deque[float] = deque(maxlen=CRASHES_BEFORE_PAUSE)
        predecessor: Actor | None = None
        pause = 0.5
        try:
            async with entry.receive:
                while True:
                    entry.actor = self._factories[kind](key, predecessor)
                    try:
                        await entry.actor.run(entry.receive)
                        return
                    except Exception:
                        log.exception("%s actor %r crashed; restarting it", kind, key)
                        self._metrics.actor_crashes.labels(kind=str(kind)).inc()
                    predecessor = entry.actor
                    crashes.append(trio.current_time())
                    if len(crashes) == crashes.maxlen and crashes[-1] - crashes[0] < CRASH_WINDOW:
                        log.error("%s actor %r keeps crashing; pausing %.1fs", kind, key, pause)
                        await trio.sleep(pause)
                        pause = min(MAX_PAUSE, pause * 2)
        finally:
            if self._entries.get((kind, key)) is entry:
                del self._entries[kind, key]
