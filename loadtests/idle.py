"""``parley bench idle``: what an idle authenticated session costs, and how fast
sessions connect.

``--sessions`` clients (one user each) connect, say hello and stay silent, ``--window``
handshakes in flight at a time. Reported: authenticated sessions per second during the
storm, and the server's resident memory before and after, per session. The server's
ping interval is set long enough that no ping falls inside the measurement.
"""

import time
from collections.abc import Callable

import attrs
import trio

from loadtests.proc import cpu_seconds, progress, status_kib
from loadtests.rawclient import RawClient


@attrs.frozen
class IdleResult:
    sessions: int
    seconds: float
    rss_before_kib: int
    rss_after_kib: int
    server_cpu_s: float

    def report(self) -> str:
        per = (self.rss_after_kib - self.rss_before_kib) / self.sessions
        return "\n".join(
            [
                f"idle: {self.sessions} sessions connected and authenticated in "
                f"{self.seconds:.2f} s = {self.sessions / self.seconds:,.0f} sessions/s "
                f"(server CPU {self.server_cpu_s:.2f} s = "
                f"{self.server_cpu_s / self.sessions * 1e6:.0f} µs per session)",
                f"  server RSS {self.rss_before_kib / 1024:.1f} MiB -> "
                f"{self.rss_after_kib / 1024:.1f} MiB = {per:.1f} KiB per idle session",
            ]
        )


async def run_idle(
    host: str,
    port: int,
    token_for: Callable[[str], str],
    *,
    sessions: int,
    window: int,
    server_pid: int,
) -> IdleResult:
    clients: list[RawClient] = []
    tokens = [token_for(f"idle{i}") for i in range(sessions)]
    for i in range(10):  # warm the server up: first-use allocations are not per session
        clients.append(await RawClient.connect(host, port, token_for(f"warm{i}")))
    await trio.sleep(0.5)
    before = status_kib(server_pid, "VmRSS")
    limiter = trio.Semaphore(window)

    async def one(token: str) -> None:
        async with limiter:
            clients.append(await RawClient.connect(host, port, token))

    progress(f"connecting {sessions} sessions, {window} at a time")
    started = time.monotonic()
    cpu = cpu_seconds(server_pid)
    async with trio.open_nursery() as nursery:
        for token in tokens:
            nursery.start_soon(one, token)
    seconds = time.monotonic() - started
    cpu = cpu_seconds(server_pid) - cpu
    await trio.sleep(1.0)  # let the user actors settle
    after = status_kib(server_pid, "VmRSS")
    for client in clients:
        await client.aclose()
    return IdleResult(sessions, seconds, before, after, cpu)
