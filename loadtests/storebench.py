"""``parley bench store``: rows per second the store takes, per record kind.

Batches of ``--batch`` records go straight to ``Store.write_batch``, one after the
other, as the write-behind flusher sends them; each batch is timed. This is the
storage half of the write path, without the actors and sockets in front of it.
"""

import time
from collections.abc import Callable

import attrs

from loadtests.fanout import quantile
from loadtests.proc import progress
from protocol.frames import KvEntry, Message, RoomKind, Status
from storage.store import (
    KvChange,
    ReceiptUpsert,
    Record,
    RoomCreated,
    Store,
    UserSeen,
    open_store,
)

ROOMS = 100


@attrs.frozen
class KindResult:
    kind: str
    rows: int
    seconds: float
    p50_ms: float
    p99_ms: float

    def line(self) -> str:
        return (
            f"  {self.kind:<10} {self.rows / self.seconds:>10,.0f} rows/s"
            f"   flush p50 {self.p50_ms:6.1f} ms   p99 {self.p99_ms:6.1f} ms"
        )


def _messages(n: int, base: int) -> list[Record]:
    return [
        Message(
            room=f"room{i % ROOMS}",
            seq=base + i // ROOMS + 1,
            ts=1,
            user=f"u{i % 1000}",
            cid=f"c{base}-{i}",
            text="x" * 60,
        )
        for i in range(n)
    ]


def _receipts(n: int, base: int) -> list[Record]:
    return [
        ReceiptUpsert(room=f"room{i % ROOMS}", user=f"u{i % 1000}", delivered=base + i, read=base)
        for i in range(n)
    ]


def _kv(n: int, base: int) -> list[Record]:
    return [
        KvChange(
            user=f"u{i % 1000}",
            entry=KvEntry(
                key=f"k{i % 5000}", rev=base + i + 1, hlc=base + i, dev="d", value="v" * 60
            ),
            ts=1,
        )
        for i in range(n)
    ]


def _seen(n: int, base: int) -> list[Record]:
    return [
        UserSeen(user=f"u{i % 10_000}", status=Status.ONLINE, last_seen=base + i) for i in range(n)
    ]


KINDS: dict[str, Callable[[int, int], list[Record]]] = {
    "message": _messages,
    "receipt": _receipts,
    "kv": _kv,
    "last_seen": _seen,
}


async def _one_kind(store: Store, kind: str, rows: int, batch: int) -> KindResult:
    make = KINDS[kind]
    timings = []
    started = time.monotonic()
    for base in range(0, rows, batch):
        records = make(batch, base)
        t = time.monotonic()
        await store.write_batch(records)
        timings.append(time.monotonic() - t)
    seconds = time.monotonic() - started
    timings.sort()
    return KindResult(
        kind, rows, seconds, quantile(timings, 0.5) * 1000, quantile(timings, 0.99) * 1000
    )


async def run_store_bench(url: str, rows: int, batch: int) -> list[KindResult]:
    results = []
    async with open_store(url) as store:
        run = (await store.begin_run()).run
        rooms: list[Record] = [
            RoomCreated(
                room=f"room{i}",
                kind=RoomKind.OPEN,
                owner=None,
                epoch="e",
                ts=1,
                members=(),
                run=run,
            )
            for i in range(ROOMS)
        ]
        await store.write_batch(rooms)
        for kind in KINDS:
            progress(f"{kind}: {rows} rows in batches of {batch}")
            results.append(await _one_kind(store, kind, rows, batch))
        await store.end_run(run)
    return results
