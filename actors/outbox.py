"""A session's outbox: framed bytes waiting to be written to the session's socket.

How this works: producers (rooms fanning out, the write-behind releasing acks, the
session itself) call ``append`` with finished WebSocket frame bytes; it never awaits and
never copies. Who writes them depends on the socket:

- While the socket takes everything at once (the usual case), the node's write pump
  (``actors.pump``) does: the first append to an empty outbox marks it dirty, and the
  pump, woken once for all the outboxes a fan-out touched, writes each one's pending
  bytes with one non-blocking system call, in one task, with no task switch per
  recipient. A room's fan-out with nothing queued behind it skips even that for an
  outbox with nothing pending (``write_through``): it makes the system call itself,
  which is in order since nothing is ahead of that frame.
- When a write would block (a slow client, a big backlog), or the connection is
  closing, or there is no socket (a memory stream in tests), the outbox belongs to its
  connection's writer task, which waits with ``next_batch`` and sends with ``send_all``
  until nothing is pending, then hands the outbox back to the pump (``written``).
  The writer task runs only while it has such work: ``start_writer`` is called whenever
  there is some and no writer waits for it, and the writer ends once ``written`` says the
  pump has the outbox again. An idle connection has no writer task (it cost 2.3 KiB and
  a task spawn per connection, BENCHMARKS.md "Idle sessions").

The outbox is bounded in bytes: the append that overflows it drops what is pending,
marks the session a slow consumer and calls ``on_overflow`` at once: the writer may be
stuck in a send to a client that stopped reading, so the connection must not wait for it
to notice. The client resumes from history when it reconnects.

``hold``/``release`` park appends from other producers while the session writes a
room's replay (``append_direct``), so replayed messages come before live ones.
"""

import os
from collections.abc import Callable, Iterable
from typing import Protocol

import trio


class Pump(Protocol):
    def mark(self, outbox: "Outbox") -> None:
        """Write ``outbox``'s pending bytes soon."""


class Sink(Protocol):
    """Where actors put a session's frames: its ``Outbox``, or on another node's actor a
    stand-in that sends them there (``actors.cluster.GhostOutbox``)."""

    @property
    def closed(self) -> bool: ...

    def append(self, data: bytes) -> None: ...


class Outbox:
    __slots__ = (
        "_final",
        "_held",
        "_holds",
        "_on_broken",
        "_on_overflow",
        "_partial",
        "_pending",
        "_pump",
        "_start_writer",
        "_wakeup",
        "closed",
        "fd",
        "limit",
        "nbytes",
        "overflowed",
    )

    def __init__(
        self,
        limit: int,
        on_overflow: Callable[[], None] | None = None,
        *,
        pump: Pump | None = None,
        fd: int | None = None,
        on_broken: Callable[[], None] | None = None,
        start_writer: Callable[[], None] | None = None,
    ) -> None:
        self.limit = limit
        self._on_overflow = on_overflow
        self._on_broken = on_broken
        # Called when the writer has work and none waits for it (None: a writer always
        # waits in next_batch, as in tests that run their own).
        self._start_writer = start_writer
        # The unsent tail of a frame the client has begun to receive: whatever else is
        # dropped (overflow), this goes out first, or the stream would be torn.
        self._partial: bytes | None = None
        self.nbytes = 0
        self.closed = False
        self.overflowed = False
        self._pending: list[bytes] = []
        self._held: list[bytes] = []
        self._holds = 0
        self._final: bytes | None = None
        self._wakeup: trio.Event | None = None
        # The pump writes while this is set: a socket that took everything so far.
        self._pump = pump if fd is not None else None
        self.fd = fd

    def append(self, data: bytes) -> None:
        """Queue ``data``; dropped if the outbox is closed. Never blocks."""
        # Every fan-out's hot path, once per recipient: kept to one call and no allocation
        # (BENCHMARKS.md, "Receivers that keep up").
        if self.closed:
            return
        if self._holds:
            self._held.append(data)
            self.nbytes += len(data)
            if self.nbytes > self.limit:
                self._overflow()
            return
        pending = self._pending
        pending.append(data)
        self.nbytes += len(data)
        if self.nbytes > self.limit:
            self._overflow()
        elif len(pending) == 1:
            pump = self._pump
            if pump is not None:
                pump.mark(self)
            else:
                self._wake()

    def append_direct(self, data: bytes) -> None:
        """Queue ``data`` ahead of anything held."""
        if self.closed:
            return
        was_empty = not self._pending
        self._pending.append(data)
        self.nbytes += len(data)
        if self.nbytes > self.limit:
            self._overflow()
        elif was_empty:
            self._notify()

    def hold(self) -> None:
        self._holds += 1

    def release(self) -> None:
        self._holds -= 1
        if self._holds == 0 and self._held:
            was_empty = not self._pending
            self._pending.extend(self._held)
            self._held = []
            if was_empty:
                self._notify()

    def close(self, final: bytes | None = None) -> None:
        """Accept nothing more; the writer sends what is pending, then ``final``."""
        if self.closed:
            return
        self.closed = True
        self._pump = None  # from now on only the writer writes
        if self._held:
            self._pending.extend(self._held)
            self._held = []
        self._final = final
        self._wake()

    def _overflow(self) -> None:
        self._pending = []
        self._held = []
        self.nbytes = 0 if self._partial is None else len(self._partial)
        self.overflowed = True
        self.closed = True
        self._pump = None
        self._wake()
        if self._on_overflow is not None:
            self._on_overflow()

    def _notify(self) -> None:
        if self._pump is not None:
            self._pump.mark(self)
        else:
            self._wake()

    def _wake(self) -> None:
        """The writer has work: wake it, or have it started."""
        if self._wakeup is not None:
            self._wakeup.set()
            self._wakeup = None
        elif self._start_writer is not None:
            self._start_writer()  # idempotent: a writer that runs but does not wait is busy

    # --- the pump's side ------------------------------------------------------------

    def blocked(self, rest: bytes) -> None:
        """The socket took only part of what the pump wrote: the writer task sends
        ``rest`` (ahead of anything appended since) once the socket can take it."""
        self._pump = None
        self._partial = rest
        self.nbytes += len(rest)
        self._wake()

    @property
    def torn(self) -> bool:
        """Part of a frame is still to be sent: nothing else may be written first."""
        return self._partial is not None

    def broken(self) -> None:
        """The socket failed (the client reset it): nothing more can be written. The
        reader finds the connection gone and ends it."""
        self.closed = True
        self._pump = None
        self._pending = []
        self._held = []
        self._partial = None
        self.nbytes = 0
        self._wake()
        if self._on_broken is not None:
            self._on_broken()

    def disown(self) -> None:
        """The connection is over: drop the callbacks into it, which are the cycle
        connection -> outbox -> connection (see ``Session.release``)."""
        self._on_overflow = self._on_broken = self._start_writer = None

    # --- the writer's side ----------------------------------------------------------

    async def next_batch(self) -> list[bytes]:
        """Wait for frames the writer must send. An empty list means: closed, nothing
        more will come."""
        while True:
            if self._pump is None:
                if self._partial is not None:
                    batch = [self._partial, *self._pending]
                    self._partial, self._pending = None, []
                    break
                if self._pending:
                    batch, self._pending = self._pending, []
                    break
                if self.closed:
                    if self._final is not None:
                        final, self._final = self._final, None
                        return [final]
                    return []
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        self.nbytes -= sum(map(len, batch))
        return batch

    def written(self, pump: Pump | None) -> bool:
        """The writer sent everything it had: back to the pump, unless closing. True if
        the writer has nothing more to do until it is started again (``start_writer``)."""
        if self.closed:
            return False  # the rest and the final frame are the writer's
        if self.fd is None or pump is None:
            return not self._pending and self._partial is None
        self._pump = pump
        if self._pending:
            pump.mark(self)
        return True


def write_ready(outboxes: list[Outbox]) -> int:
    """The pump's side: write each outbox's pending bytes to its socket with one
    non-blocking ``os.write``, skipping those the pump may not write (closing, or the
    writer task has them). Returns the system calls made.

    This loop runs once per delivery, so it reads the outboxes' fields directly instead
    of calling a method per outbox (BENCHMARKS.md, "Receivers that keep up")."""
    writes = 0
    for outbox in outboxes:
        pending = outbox._pending
        if outbox._pump is None or not pending:
            continue
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        outbox.nbytes -= len(data)  # held frames stay counted
        writes += _write(outbox, data)
    return writes


def write_through(sinks: Iterable[Sink], data: bytes) -> None:
    """``append(data)`` to each sink, but write it at once to the sockets of outboxes
    that hold nothing and are the pump's: one ``os.write`` each, with no pending list,
    no pump wake-up and no task switch. For a fan-out that nothing else is queued
    behind (receivers that keep up: each delivery is its own write whoever makes it);
    when more is queued, ``append`` lets the pump write several frames per call
    (BENCHMARKS.md, "Receivers that keep up")."""
    # _write's body, inlined: a call per delivery was 0.15 µs of 0.8 (user time per
    # delivery to 1,000 sockets every 10 ms, a microbenchmark; BENCHMARKS.md).
    write = os.write
    for sink in sinks:
        if type(sink) is not Outbox or sink._pump is None or sink._pending or sink._holds:
            sink.append(data)
            continue
        try:
            n = write(sink.fd, data)  # type: ignore[arg-type]  # in pump mode: a socket
        except BlockingIOError:
            n = 0
        except OSError:
            sink.broken()
            continue
        if n < len(data):
            sink.blocked(data[n:])


def _write(outbox: Outbox, data: bytes) -> bool:
    """One non-blocking write of ``data``, which nothing may precede. A socket that takes
    only part goes to the outbox's writer task; one that fails is ``broken``. True if
    the system call was made and did not fail."""
    try:
        n = os.write(outbox.fd, data)  # type: ignore[arg-type]  # in pump mode: a socket
    except BlockingIOError:
        n = 0
    except OSError:
        outbox.broken()
        return False
    if n < len(data):
        outbox.blocked(data[n:])
    return True
