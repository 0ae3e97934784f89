"""The node's timer task: one task and one heap for every session's keep-alive.

Why: each session has a timer running all its life (the hello deadline, then the
keep-alive: ping after a quiet interval, close if no pong). A task sleeping per session
cost 1.9 KiB for the sleep alone, plus the task, a nursery and a task switch per session
connect (BENCHMARKS.md, "Idle sessions"). Here a timer is one heap entry and a small
handle; the task sleeps until the earliest one and runs what is due.

A callback runs in the timer task: it must not await, and should be cheap (a session's
is a few comparisons, a ping append or a close). A callback that raises is logged and
does not stop the others. A cancelled timer stays in the heap until it is due, or until
cancelled ones are the majority and the heap is rebuilt without them, so cancelling is
O(1) and the heap stays bounded by about twice the live timers.
"""

import heapq
import itertools
import logging
import math
from collections.abc import Callable

import trio

log = logging.getLogger(__name__)

_COMPACT_MIN = 1024  # no rebuild below this many cancelled entries: not worth it


class Timer:
    """A scheduled call; ``cancel`` makes sure it will not happen."""

    __slots__ = ("_owner", "fn")

    def __init__(self, owner: "Timers", fn: Callable[[], None]) -> None:
        self._owner = owner
        self.fn: Callable[[], None] | None = fn

    def cancel(self) -> None:
        if self.fn is not None:
            self.fn = None
            self._owner._cancelled_one()


class Timers:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Timer]] = []
        self._order = itertools.count()  # ties run in scheduling order
        self._cancelled = 0
        self._sleep: trio.CancelScope | None = None  # the task's wait, while it waits

    def __len__(self) -> int:
        """Timers scheduled and not cancelled."""
        return len(self._heap) - self._cancelled

    def call_at(self, deadline: float, fn: Callable[[], None]) -> Timer:
        """Call ``fn()`` in the timer task once ``trio.current_time() >= deadline``."""
        timer = Timer(self, fn)
        heapq.heappush(self._heap, (deadline, next(self._order), timer))
        sleep = self._sleep
        if sleep is not None and deadline < sleep.deadline:
            sleep.deadline = deadline  # wakes the task earlier
        return timer

    def _cancelled_one(self) -> None:
        self._cancelled += 1
        if self._cancelled > _COMPACT_MIN and self._cancelled * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if entry[2].fn is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0
            if self._sleep is not None:
                self._sleep.deadline = self._heap[0][0] if self._heap else math.inf

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            with trio.CancelScope(deadline=self._heap[0][0] if self._heap else math.inf) as sleep:
                self._sleep = sleep
                try:
                    await trio.sleep_forever()
                finally:
                    self._sleep = None
            now = trio.current_time()
            heap = self._heap
            while heap and heap[0][0] <= now:
                timer = heapq.heappop(heap)[2]
                fn = timer.fn
                if fn is None:
                    self._cancelled -= 1
                    continue
                timer.fn = None
                try:
                    fn()
                except Exception:
                    log.exception("timer callback %r failed", fn)
                heap = self._heap  # a callback may have cancelled enough to rebuild it
