"""A session's outbox: framed bytes waiting for the session's one writer task.

How this works: producers (rooms fanning out, the write-behind releasing acks, the
session itself) call ``append`` with finished WebSocket frame bytes; it never awaits and
never copies. The writer task takes everything pending with ``next_batch`` and sends it
in one ``send_all``. The outbox is bounded in bytes: the append that overflows it drops
what is pending, marks the session a slow consumer and calls ``on_overflow`` at once:
the writer may be stuck in a send to a client that stopped reading, so the connection
must not wait for it to notice. The client resumes from history when it reconnects.

``hold``/``release`` park appends from other producers while the session writes a
room's replay (``append_direct``), so replayed messages come before live ones.
"""

from collections.abc import Callable

import trio


class Outbox:
    __slots__ = (
        "_final",
        "_held",
        "_holds",
        "_on_overflow",
        "_pending",
        "_wakeup",
        "closed",
        "limit",
        "nbytes",
        "overflowed",
    )

    def __init__(self, limit: int, on_overflow: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self._on_overflow = on_overflow
        self.nbytes = 0
        self.closed = False
        self.overflowed = False
        self._pending: list[bytes] = []
        self._held: list[bytes] = []
        self._holds = 0
        self._final: bytes | None = None
        self._wakeup: trio.Event | None = None

    def append(self, data: bytes) -> None:
        """Queue ``data``; dropped if the outbox is closed. Never blocks."""
        if self.closed:
            return
        if self._holds:
            self._held.append(data)
        else:
            self._pending.append(data)
        self.nbytes += len(data)
        if self.nbytes > self.limit:
            self._overflow()
        elif self._wakeup is not None and not self._holds:
            self._wakeup.set()
            self._wakeup = None

    def append_direct(self, data: bytes) -> None:
        """Queue ``data`` ahead of anything held."""
        if self.closed:
            return
        self._pending.append(data)
        self.nbytes += len(data)
        if self.nbytes > self.limit:
            self._overflow()
        else:
            self._wake()

    def hold(self) -> None:
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self._held:
            self._pending.extend(self._held)
            self._held = []
            self._wake()

    def close(self, final: bytes | None = None) -> None:
        """Accept nothing more; the writer sends what is pending, then ``final``."""
        if self.closed:
            return
        self.closed = True
        if self._held:
            self._pending.extend(self._held)
            self._held = []
        self._final = final
        self._wake()

    def _overflow(self) -> None:
        self._pending = []
        self._held = []
        self.nbytes = 0
        self.overflowed = True
        self.closed = True
        self._wake()
        if self._on_overflow is not None:
            self._on_overflow()

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None

    async def next_batch(self) -> list[bytes]:
        """Wait for frames to send. An empty list means: closed, nothing more will come."""
        while not self._pending:
            if self.closed:
                if self._final is not None:
                    final, self._final = self._final, None
                    return [final]
                return []
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        batch, self._pending = self._pending, []
        self.nbytes -= sum(map(len, batch))
        return batch
