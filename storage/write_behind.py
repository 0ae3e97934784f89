"""Write-behind queue with group commit.

How this works: actors ``enqueue`` records without awaiting and get a ``Ticket``. One
flusher task takes everything queued (up to ``batch_records``), writes it in one store
transaction, and then completes the tickets in order; whoever waits on a record (a
sent-ack, a join reply) registered a callback with ``Ticket.then``. Batches form by
themselves: while one commits, the next accumulates, so a busy node commits large
batches and an idle one commits at once.

A failed batch stays at the head of the queue and is retried with backoff; nothing is
dropped. In a cluster a record may carry its actor's ``Fence``: storage refuses the
records of a fence a newer owner replaced, and their tickets are refused instead of
committed (``Ticket.otherwise``), so no ack is ever given for them.

The queue is bounded in records and bytes: when ``has_capacity`` is False, actors
refuse new writes with a "try later" error instead of growing without limit.
"""

import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
import trio
from prometheus_client import Histogram

from storage.store import Fence, Record, StorageError, Store

log = logging.getLogger(__name__)


Callback = tuple[Callable[[Any], None], Any]


class Ticket:
    """The fate of one queued record: ``committed`` once its batch is stored, or
    ``refused`` if storage turned it down (its actor's fence went stale)."""

    __slots__ = ("_callbacks", "_fallbacks", "committed", "refused")

    def __init__(self, committed: bool = False) -> None:
        self.committed = committed
        self.refused = False
        self._callbacks: list[Callback] | None = None
        self._fallbacks: list[Callback] | None = None

    def then(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Call ``fn(arg)`` once the record is committed (now, if it already is)."""
        if self.committed:
            fn(arg)
        elif self.refused:
            return
        elif self._callbacks is None:
            self._callbacks = [(fn, arg)]
        else:
            self._callbacks.append((fn, arg))

    def otherwise(self, fn: Callable[[Any], None], arg: Any) -> None:
        """Call ``fn(arg)`` if the record is refused (now, if it already was)."""
        if self.refused:
            fn(arg)
        elif self.committed:
            return
        elif self._fallbacks is None:
            self._fallbacks = [(fn, arg)]
        else:
            self._fallbacks.append((fn, arg))

    def _commit(self) -> None:
        self.committed = True
        callbacks, self._callbacks = self._callbacks, None
        self._fallbacks = None
        _call(callbacks)

    def _refuse(self) -> None:
        self.refused = True
        fallbacks, self._fallbacks = self._fallbacks, None
        self._callbacks = None
        _call(fallbacks)


def _call(callbacks: list[Callback] | None) -> None:
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
        self._queue: deque[tuple[Record, Ticket, int, Fence | None]] = deque()
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

    def enqueue(self, record: Record, size: int = 128, fence: Fence | None = None) -> Ticket:
        """Queue ``record`` (about ``size`` bytes), written under ``fence`` if given.
        Never blocks; check ``has_capacity``."""
        ticket = Ticket()
        self._queue.append((record, ticket, size, fence))
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
            fences = [fence for _, _, _, fence in batch]
            try:
                stale = await self._store.write_batch(
                    [record for record, _, _, _ in batch],
                    fences if any(fences) else (),
                )
            except Exception as exc:  # StorageError, or a bug: either way, keep the data
                backoff = min(5.0, max(0.1, backoff * 2))
                self._note_failure(exc, backoff)
                await trio.sleep(backoff)
                continue
            backoff = 0.0
            if self._flush_seconds is not None:
                self._flush_seconds.observe(trio.current_time() - started)
            self._complete(len(batch), stale)

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

    def _complete(self, n: int, stale: frozenset[Fence]) -> None:
        if self._failing_since is not None:
            log.info(
                "write-behind recovered after %.1fs", trio.current_time() - self._failing_since
            )
        self._failing_since = None
        self._last_error = None
        self._flushes += 1
        queue = self._queue
        for lost in stale:
            if lost.stale:
                continue
            log.warning("%s %r: another node took it; writes refused", lost.kind, lost.key)
            lost.stale = True
            if lost.on_stale is not None:
                try:
                    lost.on_stale()
                except Exception:
                    log.exception("write-behind: a stale fence's callback failed")
        for _ in range(n):
            _, ticket, size, fence = queue.popleft()
            self._bytes -= size
            if fence is not None and fence.stale:
                ticket._refuse()
            else:
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
