"""Which rooms exist, found without starting an actor for one that does not.

A frame naming a room no actor runs for used to start one, with its storage read, and
an actor for a made-up name then idled for 30 s: 200 hellos resuming 100 made-up rooms
each made 20,504 actors and 210 MB that never came back. Now a room command reaches the
directory only for a room that exists. ``RoomLookup`` answers from, in order: a running
actor (yes); a bounded cache of names known not to exist (no); else a storage read, at
most ``concurrent_reads`` of them at once, whose "no" goes into the cache. Creating a room
(``create``, ``direct``, the admin API) does not ask, and drops the name from the cache.

A "no" read while a room was being created could be stale, so one is cached only if no
room was created during the read. Entries also expire (``ttl``); in a cluster the node
where a room is created tells the others at once (``on_created``).
"""

from collections import OrderedDict
from collections.abc import Callable

import trio

from actors.directory import ActorKind, Directory
from actors.metrics import Metrics
from storage.store import Store


class RoomLookup:
    def __init__(
        self,
        directory: Directory,
        store: Store,
        metrics: Metrics,
        *,
        cache_size: int = 100_000,
        concurrent_reads: int = 16,
        ttl: float = 60.0,
    ) -> None:
        self._directory = directory
        self._store = store
        self._cache_size = cache_size
        self._ttl = ttl
        self._missing: OrderedDict[str, float] = OrderedDict()  # room -> when it expires
        self._reads = trio.CapacityLimiter(concurrent_reads)
        self._creations = 0  # rooms created so far: a read that saw one change is not kept
        self.on_created: Callable[[str], None] | None = None  # tells the other nodes
        lookups = metrics.room_lookups
        self._running = lookups.labels(result="running")
        self._cached = lookups.labels(result="cached_missing")
        self._stored = lookups.labels(result="stored")
        self._not_stored = lookups.labels(result="missing")

    def __len__(self) -> int:
        """Names cached as missing."""
        return len(self._missing)

    def known(self, room: str) -> bool | None:
        """Whether ``room`` exists, if that is known without reading storage."""
        if self._directory.has(ActorKind.ROOM, room):
            self._running.inc()
            return True
        expires = self._missing.get(room)
        if expires is None:
            return None
        if trio.current_time() < expires:
            self._cached.inc()
            return False
        del self._missing[room]
        return None

    async def exists(self, room: str) -> bool:
        """Whether ``room`` exists; raises ``StorageError`` if storage cannot say.
        Callers bound the wait (the read waits its turn among ``concurrent_reads``)."""
        known = self.known(room)
        if known is not None:
            return known
        creations = self._creations
        async with self._reads:
            found = await self._store.room_exists(room)
        if found or self._directory.has(ActorKind.ROOM, room):
            self._stored.inc()
            return True
        self._not_stored.inc()
        if creations == self._creations:
            self._missing[room] = trio.current_time() + self._ttl
            self._missing.move_to_end(room)
            if len(self._missing) > self._cache_size:
                self._missing.popitem(last=False)
        return False

    def created(self, room: str, *, here: bool = True) -> None:
        """``room`` was just created (its actor calls this; in a cluster, also each node
        told by the one where it was, ``here`` False)."""
        self._creations += 1
        self._missing.pop(room, None)
        if here and self.on_created is not None:
            self.on_created(room)
