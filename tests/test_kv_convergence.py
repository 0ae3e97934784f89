"""KV convergence, property-based: devices write the same keys concurrently, on clocks
that disagree, over connections that drop; the server takes their frames in any
interleaving. Whatever happens, every device ends with the server's map, the server's
map holds the (hlc, device)-greatest write of each key it received, and storage holds
that map too.

The devices are ``protocol.kv.KvReplica`` (what a client runs) and the server is
``actors.kvmap.KvMap`` (what the KV actor runs), joined by in-order queues that model
one WebSocket connection each; only the network and the actor's mailbox are simulated.
"""

import tempfile
from collections import deque
from pathlib import Path

import attrs
import trio
from hypothesis import example, given, settings
from hypothesis import strategies as st

from actors.kvmap import KvMap, KvQuota
from protocol.cbor import Raw
from protocol.errors import ErrorCode
from protocol.frames import Frame, KvAck, KvChanged, KvChanges, KvEntry, KvPut, KvSync
from protocol.hlc import Clock
from protocol.kv import KvReplica
from storage.sqlite import open_sqlite_store
from storage.store import KvSnapshot, Record

DEVICES = ("phone", "tablet", "web")
KEYS = ("theme", "draft", "day", "a", "b", "c")
BASE_MS = 1_800_000_000_000


class World:
    def __init__(self, offsets: list[int]) -> None:
        self.server = KvMap(
            "alice", KvSnapshot(), KvQuota(max_tombstones=1, min_tombstone_age_ms=0)
        )
        self.clock = Clock()
        self.now = BASE_MS
        self.offsets = offsets  # each device's wall clock error, in ms
        self.replicas = [KvReplica(dev) for dev in DEVICES]
        self.up: list[deque[Frame]] = [deque() for _ in DEVICES]  # device -> server
        self.down: list[deque[Frame]] = [deque() for _ in DEVICES]  # server -> device
        self.live: set[int] = set()  # devices the server pushes changes to
        self.sent: dict[int, KvPut] = {}  # request id -> put, per device's requests
        self.received: list[tuple[int, str, str, object, bool]] = []  # what the server took
        self.stored: list[Record] = []
        self.ids = iter(range(1, 10**9))

    def wall(self, d: int) -> int:
        return self.now + self.offsets[d]

    def sync(self, d: int) -> None:
        self.up[d].append(self.replicas[d].sync_frame(next(self.ids), limit=2))

    def push(self, d: int) -> None:
        put = self.replicas[d].put_frame(next(self.ids))
        if put.items:
            self.sent[put.id] = put
            self.up[d].append(put)

    def serve(self, d: int) -> None:
        """The server takes the next frame of device ``d``."""
        frame = self.up[d].popleft()
        if isinstance(frame, KvSync):
            self.live.add(d)
            self.down[d].append(self.server.answer(frame, 2, 10**6))
            return
        assert isinstance(frame, KvPut)
        results, applied = [], []
        for w in frame.items:
            result, change = self.server.write(frame.dev, w, self.now)
            if result.code == ErrorCode.KV_STALE and result.hlc is None:
                # Refused for being older than a forgotten deletion (of any key): the
                # one departure from plain last-writer-wins, and only for such writes.
                assert (w.hlc, frame.dev) <= self.server.floor_write
            else:
                self.received.append((w.hlc, frame.dev, w.key, w.value, w.deleted))
            results.append(result)
            if change is not None:
                applied.append(change.entry)
                self.stored.append(change)
        if applied:
            self.clock.observe(max(e.hlc for e in applied))
        rev = self.server.rev if d in self.live else 0  # as the KV actor does
        ack = KvAck(id=frame.id, hlc=self.clock.now(self.now), rev=rev, items=tuple(results))
        self.down[d].append(ack)
        compacted = self.server.compact(self.now)
        if compacted is not None:
            self.stored.append(compacted)
        if applied:
            event = KvChanged(rev=self.server.rev, items=tuple(applied))
            for other in self.live - {d}:
                self.down[other].append(event)

    def deliver(self, d: int) -> None:
        """Device ``d`` reads its next frame."""
        frame = self.down[d].popleft()
        replica = self.replicas[d]
        if isinstance(frame, KvAck):
            replica.on_ack(self.sent.pop(frame.id), frame)
        elif isinstance(frame, KvChanges):
            replica.on_changes(frame)
            if frame.more:
                self.up[d].appendleft(replica.sync_frame(next(self.ids), limit=2))
        else:
            assert isinstance(frame, KvChanged)
            replica.on_changed(frame)

    def drop(self, d: int, server_took: int) -> None:
        """Device ``d``'s connection drops; the server had taken ``server_took`` of the
        frames in flight. It reconnects at once, and syncs when the plan says."""
        for _ in range(min(server_took, len(self.up[d]))):
            self.serve(d)
        self.up[d].clear()
        self.down[d].clear()
        self.live.discard(d)


@st.composite
def steps(draw: st.DrawFn) -> list[tuple[str, int, int, int]]:
    step = st.tuples(
        st.sampled_from(
            ["set", "set", "delete", "push", "serve", "serve", "deliver", "drop", "sync", "tick"]
        ),
        st.integers(0, len(DEVICES) - 1),
        st.integers(0, len(KEYS) - 1),
        st.integers(0, 3),
    )
    return draw(st.lists(step, max_size=120))


def plan(text: str) -> list[tuple[str, int, int, int]]:
    """``"serve 0, set 0 1, drop 1"``: op, device, key (default 0), x (default 0)."""
    steps = []
    for step in text.split(","):
        op, *numbers = step.split()
        d, k, x = [*map(int, numbers), 0, 0, 0][:3]
        steps.append((op, d, k, x))
    return steps


# Every device is live first (its sync served and its empty page read).
LIVE = "serve 0, serve 1, serve 2, deliver 0, deliver 1, deliver 2, "
# A device offline while deletions it has not seen are compacted away must start over.
LATE_DEVICE = plan(
    LIVE + "set 0 0, set 0 1, push 0, serve 0, deliver 1, drop 1, delete 0 0, delete 0 1,"
    " push 0, serve 0, sync 1"
)
# A device back online pushes its offline writes before it syncs: the ack must not move
# its sync position past the changes it missed.
PUSH_BEFORE_PULL = plan(
    LIVE + "drop 0, set 1 1, push 1, serve 1, set 0 0, push 0, serve 0, deliver 0, sync 0"
)
# A full listing cut by a disconnect goes on where it was: a key it listed before may
# have been deleted meanwhile, and that deletion may even be forgotten already.
LISTING_RESUMED = plan(
    "serve 0, deliver 0, set 0 0, set 0 1, set 0 2, push 0, serve 0, serve 1, deliver 1,"
    " drop 1, delete 0 0, push 0, serve 0, sync 1, serve 1"
)
LISTING_RESUMED_AFTER_COMPACTION = plan(
    "serve 0, deliver 0, set 0 0, set 0 1, set 0 2, push 0, serve 0, serve 1, deliver 1,"
    " drop 1, delete 0 0, delete 0 1, push 0, serve 0, sync 1, serve 1"
)
# An old write must not bring back a key whose deletion was forgotten (web's clock is
# 3 s behind).
RESURRECTION = plan(
    LIVE + "set 0 0, set 0 1, push 0, serve 0, delete 0 0, delete 0 1, push 0, serve 0,"
    " set 2 0, push 2, serve 2"
)


@settings(max_examples=150, deadline=None)
@example(offsets=[0, 0, 0], plan=LATE_DEVICE)
@example(offsets=[0, 0, 0], plan=PUSH_BEFORE_PULL)
@example(offsets=[0, 0, 0], plan=LISTING_RESUMED)
@example(offsets=[0, 0, 0], plan=LISTING_RESUMED_AFTER_COMPACTION)
@example(offsets=[0, 0, -3000], plan=RESURRECTION)
@given(offsets=st.lists(st.integers(-5000, 5000), min_size=3, max_size=3), plan=steps())
def test_every_device_and_storage_converge(
    offsets: list[int], plan: list[tuple[str, int, int, int]]
) -> None:
    world = World(offsets)
    for d in range(len(DEVICES)):
        world.sync(d)
    for n, (op, d, k, x) in enumerate(plan):
        replica = world.replicas[d]
        if op == "set":
            replica.set(KEYS[k], n, world.wall(d))
        elif op == "delete":
            replica.delete(KEYS[k], world.wall(d))
        elif op == "push":
            world.push(d)
        elif op == "serve" and world.up[d]:
            world.serve(d)
        elif op == "deliver" and world.down[d]:
            world.deliver(d)
        elif op == "drop":
            world.drop(d, x)
        elif op == "sync" and d not in world.live and not world.up[d]:
            world.sync(d)
        elif op == "tick":
            world.now += x * 7
    # Quiesce: every device syncs and sends what it has; everything is served and read.
    for d in range(len(DEVICES)):
        if d not in world.live and not any(isinstance(f, KvSync) for f in world.up[d]):
            world.sync(d)
    for _ in range(50):
        for d in range(len(DEVICES)):
            world.push(d)
        while any(world.up) or any(world.down):
            for d in range(len(DEVICES)):
                while world.up[d]:
                    world.serve(d)
                while world.down[d]:
                    world.deliver(d)
        if not any(r.pending for r in world.replicas):
            break
    else:
        raise AssertionError("pending writes never drained")

    server = {e.key: e for e in world.server.changes(0, 100, max_bytes=10**6, deletions=False)[0]}
    # Last writer wins, by (hlc, device), whatever order the writes came in.
    winners: dict[str, tuple[int, str, object, bool]] = {}
    for hlc, dev, key, value, deleted in world.received:
        if key not in winners or (hlc, dev) > winners[key][:2]:
            winners[key] = (hlc, dev, value, deleted)
    assert {k: (e.hlc, e.dev, e.value) for k, e in server.items()} == {
        k: (h, dv, v) for k, (h, dv, v, deleted) in winners.items() if not deleted
    }
    for replica in world.replicas:
        assert replica.synced() == server
        assert replica.rev == world.server.rev
    assert stored_map(world.stored) == (world.server.rev, world.server.floor, server)


def _loaded(entry: KvEntry) -> KvEntry:
    return attrs.evolve(entry, value=entry.value.load()) if type(entry.value) is Raw else entry


def stored_map(changes: list[Record]) -> tuple[int, int, dict[str, object]]:
    """Write ``changes`` through the SQLite store (half of them twice, as a retried
    batch would be: it changes nothing), then load the map back."""

    async def main() -> tuple[int, int, dict[str, object]]:
        with tempfile.TemporaryDirectory() as tmp:
            async with open_sqlite_store(f"sqlite:///{Path(tmp) / 'kv.db'}") as store:
                half = len(changes) // 2
                await store.write_batch(changes[:half])
                await store.write_batch(changes)
                snapshot = await store.load_kv("alice")
        loaded = KvMap("alice", snapshot, KvQuota())
        items = loaded.changes(0, 100, max_bytes=10**6, deletions=False)[0]
        # Storage gives values back as the CBOR they were stored in (Raw), as a client
        # sent them; these were written as Python objects.
        return snapshot.rev, snapshot.floor, {e.key: _loaded(e) for e in items}

    return trio.run(main)
