"""The node's write pump: one task that writes every ready outbox to its socket.

Why: at a steady rate (200 messages/s to 1,000 members), each message reaches each
outbox alone, and a writer task per connection meant one task switch plus the trio
socket machinery per recipient: 4.75 µs of server CPU per delivery, which saturated a
core (py-spy: 70 % of the main thread in ``Connection._write``/``send_all``). The pump
is woken once per fan-out and writes each dirty outbox with one non-blocking
``os.write``, which is the system call and little else. A socket that cannot take
everything goes back to its connection's writer task (``Outbox.blocked``), which waits
for it with ``send_all``, so a slow client never holds the pump up.

A room's fan-out with nothing queued behind it writes idle outboxes itself
(``actors.outbox.write_through``); the pump has the rest. The pump and that fan-out write
only to outboxes in pump mode, and a connection leaves pump mode
(``Outbox.close``) before its socket is closed, so a file descriptor number reused by a
newer connection is never written by mistake.
"""

import trio

from actors.outbox import Outbox, write_ready

CHUNK = 256  # outboxes written per step: about 1 to 3 ms of system calls


class WritePump:
    def __init__(self) -> None:
        self._dirty: list[Outbox] = []
        self._wakeup = trio.Event()
        self.writes = 0  # system calls made, for tests and metrics

    def mark(self, outbox: Outbox) -> None:
        self._dirty.append(outbox)
        if len(self._dirty) == 1:
            self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            dirty, self._dirty = self._dirty, []
            # A few ms of writes per step at most: 2,000 outboxes in one step held the
            # loop for 26 ms (BENCHMARKS.md, "Stalls"). An outbox appended to meanwhile
            # is written with its chunk or marked again.
            for start in range(0, len(dirty), CHUNK):
                if start:
                    await trio.lowlevel.checkpoint()
                self.write(dirty[start : start + CHUNK])

    def write(self, outboxes: list[Outbox]) -> None:
        self.writes += write_ready(outboxes)
