"""``parley bench kv``: kv writes per second, and how long a device takes to catch up.

Writes: ``--users`` connections (one device of one user each) send ``kvput`` frames of
``--batch`` writes, ``--window`` frames in flight each; every ack comes after the
commit, so this is stored writes per second. Catch-up: a device synced at revision R
goes offline, another device of the same user writes ``--keys`` distinct keys, a third
one follows live; then the first asks for everything since R, page by page.
"""

import statistics
import time
from collections.abc import Callable

import attrs
import trio

from loadtests.proc import cpu_seconds, progress
from protocol.client import ParleyClient, open_client
from protocol.frames import KvChanged, KvChanges, KvWrite
from protocol.hlc import Clock
from protocol.kv import KvReplica


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


@attrs.frozen
class KvBenchResult:
    users: int
    batch: int
    writes: int
    seconds: float
    p50_ms: float
    p99_ms: float
    server_cpu_s: float | None
    catchup_keys: int
    catchup_s: float
    catchup_pages: int
    live_received: int

    def report(self) -> str:
        lines = [
            f"writes:   {self.users} connections x kvput of {self.batch}: {self.writes} writes "
            f"in {self.seconds:.2f} s = {self.writes / self.seconds:,.0f} writes/s stored",
            f"          ack latency p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms",
        ]
        if self.server_cpu_s is not None:
            per = self.server_cpu_s / self.writes * 1e6
            lines.append(f"          server CPU {self.server_cpu_s:.2f} s = {per:.1f} us/write")
        lines += [
            f"catch-up: {self.catchup_keys} changed keys in {self.catchup_pages} pages, "
            f"{self.catchup_s * 1000:.0f} ms from the first kvsync to the last page",
            f"          live follower received {self.live_received} of {self.catchup_keys}",
        ]
        return "\n".join(lines)


async def _writer(
    client: ParleyClient,
    dev: str,
    batches: int,
    batch: int,
    keys: int,
    size: int,
    window: int,
    latencies: list[float],
) -> None:
    clock = Clock()
    value = "x" * size
    limiter = trio.Semaphore(window)

    async def one(n: int) -> None:
        try:
            writes = [
                KvWrite(key=f"k{(n * batch + i) % keys}", hlc=clock.now(wall_ms()), value=value)
                for i in range(batch)
            ]
            started = time.monotonic()
            ack = await client.kv_put(dev, *writes)
            latencies.append(time.monotonic() - started)
            assert all(r.code is None for r in ack.items), ack.items[:3]
        finally:
            limiter.release()

    async with trio.open_nursery() as nursery:
        for n in range(batches):
            await limiter.acquire()
            nursery.start_soon(one, n)


async def run_kv(
    url: str,
    token_for: Callable[[str], str],
    *,
    users: int,
    batches: int,
    batch: int,
    keys: int,
    size: int,
    window: int,
    catchup_keys: int,
    server_pid: int | None,
) -> KvBenchResult:
    latencies: list[float] = []
    progress(f"writes: {users} users, {batches} kvputs of {batch} each")
    async with trio.open_nursery() as nursery:
        clients = []
        for u in range(users):
            clients.append(await nursery.start(_connected, url, token_for(f"kvbench{u}")))
        cpu_before = cpu_seconds(server_pid) if server_pid else None
        started = time.monotonic()
        async with trio.open_nursery() as writers:
            for u, client in enumerate(clients):
                writers.start_soon(
                    _writer, client, f"dev{u}", batches, batch, keys, size, window, latencies
                )
        seconds = time.monotonic() - started
        cpu = None
        if server_pid is not None and cpu_before is not None:
            cpu = cpu_seconds(server_pid) - cpu_before
        nursery.cancel_scope.cancel()
    latencies.sort()
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else [0.0] * 99

    progress(f"catch-up: {catchup_keys} keys")
    user = "kvcatchup"
    late = KvReplica("late")
    async with open_client(url, token_for(user)) as c:
        await c.kv_pull(late)  # synced at R, then offline
    async with (
        open_client(url, token_for(user)) as follower,
        open_client(url, token_for(user)) as writer,
    ):
        await follower.kv_sync()
        writing = KvReplica("writer")
        for start in range(0, catchup_keys, 200):
            for i in range(start, min(catchup_keys, start + 200)):
                writing.set(f"key{i}", {"n": i, "pad": "x" * size}, wall_ms())
            await writer.kv_push(writing)
        received = 0
        with trio.move_on_after(30):
            while received < catchup_keys:
                event = await follower.next_event(KvChanged)
                received += len(event.items)
    async with open_client(url, token_for(user)) as c:
        pages = 0
        started = time.monotonic()
        while True:
            page = await c.request(late.sync_frame(c.next_id(), limit=1000), KvChanges)
            late.on_changes(page)
            pages += 1
            if not page.more:
                break
        catchup_s = time.monotonic() - started
    assert len(late.synced()) == catchup_keys, len(late.synced())
    return KvBenchResult(
        users=users,
        batch=batch,
        writes=users * batches * batch,
        seconds=seconds,
        p50_ms=quantiles[49] * 1000,
        p99_ms=quantiles[98] * 1000,
        server_cpu_s=cpu,
        catchup_keys=catchup_keys,
        catchup_s=catchup_s,
        catchup_pages=pages,
        live_received=received,
    )


async def _connected(
    url: str, token: str, *, task_status: trio.TaskStatus[ParleyClient] = trio.TASK_STATUS_IGNORED
) -> None:
    async with open_client(url, token) as client:
        task_status.started(client)
        await trio.sleep_forever()
