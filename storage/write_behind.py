"""Write-behind queue with group commit.

How this works: actors ``enqueue`` records without awaiting and get a ``Ticket``. One
flusher task takes everything queued (up to ``batch_records``), writes it in one store
transaction, and then completes the tickets in order; whoever waits on a record (a
sent-ack, a join reply) registered a callback with ``Ticket.then``. Batches form by
themselves: while one commits, the next accumulates, so a busy node commits large
batches and an idle one commits at once.

A failed batch stays at the head of the queue and is retried with backoff; nothing is
dropped. The queue is bounded in records and bytes: when ``has_capacity`` is False,
actors refuse new writes with a "try later" error instead of growing without limit.
"""

import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio
from prometheus_client import Histogram

from storage.store import Record, StorageError, Store

log = logging.getLogger(__name__)


class Ticket:
    """The fate of one queued record: ``committed`` once its batch is stored."""

    __slots__ = ("_callbacks", "committed")

    def __init__(self, committed: bool = False) -> None:
        self.committed = committed
        self._callbacks: list[tuple[Callable[[Any], None], Any]] | None = None

    def then(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Call ``fn(arg)`` once the record is committed (now, if it already is)."""
        if self.committed:
            fn(arg)
        elif self._callbacks is None:
            self._callbacks = [(fn, arg)]
        else:
            self._callbacks.append((fn, arg))

    def _commit(self) -> None:
        self.committed = True
        callbacks, self._callbacks = self._callbacks, None
        if callbacks:
            for fn, arg in callbacks:
                try:
                    fn(arg)
                except Exception:
                    # A bug in whoever waited must not stop the flusher, and with it
                    # every other ack on the node.
                    log.exception("write-behind: a commit callback failed")


#: The ticket of anything read back from storage.
COMMITTED = Ticket(committed=True)


@attrs.frozen
class WriteBehindStats:
    depth: int
    bytes: int
    max_records: int
    max_bytes: int
    failing_since: float | None
    last_error: str | None
    flushed_records: int
    flushes: int


class WriteBehind:
    def __init__(
        self,
        store: Store,
        *,
        max_records: int = 100_000,
        max_bytes: int = 64 * 2**20,
        batch_records: int = 5000,
        flush_seconds: Histogram | None = None,
    ) -> None:
        self._store = store
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.batch_records = batch_records
        self._flush_seconds = flush_seconds
        self._queue: deque[tuple[Record, Ticket, int]] = deque()
        self._bytes = 0
        self._enqueued = 0  # records ever enqueued
        self._committed = 0  # records ever committed; the queue holds the difference
        self._wakeup = trio.Event()
        self._flushed_waiters: list[tuple[int, trio.Event]] = []
        self._failing_since: float | None = None
        self._last_error: str | None = None
        self._flushes = 0

    def has_capacity(self) -> bool:
        return len(self._queue) < self.max_records and self._bytes < self.max_bytes

    def enqueue(self, record: Record, size: int = 128) -> Ticket:
        """Queue ``record`` (about ``size`` bytes). Never blocks; check ``has_capacity``."""
        ticket = Ticket()
        self._queue.append((record, ticket, size))
        self._bytes += size
        self._enqueued += 1
        self._wakeup.set()
        return ticket

    async def wait_flushed(self) -> None:
        """Return once everything enqueued before this call is committed."""
        target = self._enqueued
        if self._committed >= target:
            return
        event = trio.Event()
        self._flushed_waiters.append((target, event))
        await event.wait()

    def statistics(self) -> WriteBehindStats:
        return WriteBehindStats(
            depth=len(self._queue),
            bytes=self._bytes,
            max_records=self.max_records,
            max_bytes=self.max_bytes,
            failing_since=self._failing_since,
            last_error=self._last_error,
            flushed_records=self._committed,
            flushes=self._flushes,
        )

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Flush forever; cancel to stop (call ``wait_flushed`` first to lose nothing)."""
        task_status.started()
        backoff = 0.0
        while True:
            if not self._queue:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            batch = list(itertools.islice(self._queue, self.batch_records))
            started = trio.current_time()
            try:
                await self._store.write_batch([record for record, _, _ in batch])
            except Exception as exc:  # StorageError, or a bug: either way, keep the data
                backoff = min(5.0, max(0.1, backoff * 2))
                self._note_failure(exc, backoff)
                await trio.sleep(backoff)
                continue
            backoff = 0.0
            if self._flush_seconds is not None:
                self._flush_seconds.observe(trio.current_time() - started)
            self._complete(len(batch))

    def _note_failure(self, exc: Exception, retry_in: float) -> None:
        if self._failing_since is None:
            self._failing_since = trio.current_time()
        self._last_error = f"{type(exc).__name__}: {exc}"
        log.warning(
            "write-behind flush of %d records failed (%s); %d queued; retrying in %.1fs",
            min(len(self._queue), self.batch_records),
            self._last_error,
            len(self._queue),
            retry_in,
            exc_info=not isinstance(exc, StorageError),  # a bug deserves its traceback
        )

    def _complete(self, n: int) -> None:
        if self._failing_since is not None:
            log.info(
                "write-behind recovered after %.1fs", trio.current_time() - self._failing_since
            )
        self._failing_since = None
        self._last_error = None
        self._flushes += 1
        queue = self._queue
        for _ in range(n):
            _, ticket, size = queue.popleft()
            self._bytes -= size
            ticket._commit()
        self._committed += n
        if self._flushed_waiters:
            still = []
            for target, event in self._flushed_waiters:
                if self._committed >= target:
                    event.set()
                else:
                    still.append((target, event))
            self._flushed_waiters = still

    def fill_ratio(self) -> float:
        """How full the queue is, 0..1, by the tighter of its two bounds."""
        return min(1.0, max(len(self._queue) / self.max_records, self._bytes / self.max_bytes))
