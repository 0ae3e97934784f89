"""``parley serve --workers N``: N node processes on one machine, one supervisor.

One Parley process uses one core; a machine with more runs several. Each worker is a
full cluster node (``parley serve --worker I``, a hidden flag), sharing Redis and
PostgreSQL with every other node, so a worker needs nothing from its siblings.

Process tree::

    supervisor (run_workers)                 SIGTERM/SIGINT -> forward SIGTERM, wait, kill
    ├── ops HTTP (server/workers_ops.py)     --ops-host/--ops-port: aggregated over workers
    ├── signal watcher
    └── workers nursery: one task per worker, restarting it when it exits
        └── parley serve --worker I          client port shared (SO_REUSEPORT),
                                             ops endpoint on a Unix socket of its own

**The shared port.** The supervisor binds the client address with SO_REUSEPORT and
never listens on it: it learns the port (``--port 0`` picks one for all) and holds it
for the workers that restart later. Each worker binds the same address with
SO_REUSEPORT and listens; the kernel spreads new connections over the listening
sockets, and a dead worker's socket leaves the group with it (connections it had
accepted, or that were queued for it, are lost; clients reconnect and resume).

**Options.** A worker gets every option through its ``PARLEY_*`` variable, built from
the supervisor's resolved ``Config`` (secrets included, so they never show in ``ps``),
with ``--workers 1`` and its own ops socket; inherited ``PARLEY_*`` variables are
dropped. ``--pin-workers`` pins worker I to the I-th CPU (modulo) of those the
supervisor may use; the worker pins itself before it starts (``pin_to_cpu``).

**Supervision.** A worker that exits while the supervisor is not stopping is logged and
restarted after a pause that doubles with each quick exit (0.5 s up to 30 s) and starts
over once a run lasted a minute. Workers run in sessions of their own, so a Ctrl-C in
the terminal reaches only the supervisor, which forwards one SIGTERM to each: they drain
(goaway, flush, close with 1001) and exit. The supervisor waits ``--drain-timeout`` plus
a margin for them, then kills what remains; it exits 0 if every worker exited 0. A
second signal forwards SIGKILL. A worker whose supervisor is gone (SIGKILL) drains by
itself (``watch_supervisor``).
"""

import functools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path

import attrs
import trio

from server.config import SERVE_OPTIONS, Config

log = logging.getLogger("parley.workers")

RESTART_PAUSE = 0.5  # seconds before restarting a worker that exited; doubled each time
RESTART_PAUSE_MAX = 30.0
STABLE_RUN = 60.0  # seconds a worker ran after which its next restart is quick again
STOP_MARGIN = 5.0  # beyond --drain-timeout: a drain closes connections after its deadline
PARENT_POLL = 1.0  # seconds between a worker's looks at its supervisor
BACKLOG = 0xFFFF  # like trio.open_tcp_listeners: the kernel clips it to somaxconn


# --- the shared client port ---------------------------------------------------------


async def bind_shared(host: str, port: int) -> list[trio.socket.SocketType]:
    """Sockets bound to ``host``:``port`` with SO_REUSEPORT, not listening. With port 0
    the first address picks the port and the others take the same one."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[trio.socket.SocketType] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await sock.bind((address[0], port, *address[2:]))
            port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def shared_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """A worker's client listeners: ``bind_shared`` sockets, listening."""
    sockets = await bind_shared(host, port)
    for sock in sockets:
        sock.listen(BACKLOG)
    return [trio.SocketListener(sock) for sock in sockets]


async def watch_supervisor(shutdown: trio.Event) -> None:
    """Drain once the supervisor is gone (SIGKILL, a crash): an orphaned worker would
    hold the port and serve on, out of anyone's control."""
    parent = os.getppid()
    while os.getppid() == parent:  # noqa: ASYNC110 (no event tells of a parent's death)
        await trio.sleep(PARENT_POLL)
    log.warning("the supervisor (pid %d) is gone: draining", parent)
    shutdown.set()


def pin_to_cpu(index: int) -> int:
    """Pin this process (a worker, before it starts threads) to the index-th CPU, modulo,
    of those it may use; returns the CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu


# --- the supervisor -----------------------------------------------------------------


@attrs.define(eq=False)
class Worker:
    index: int
    ops: str  # its ops endpoint: "unix:PATH"
    proc: trio.Process | None = None
    restarts: int = 0
    stopped_with: int | None = None  # exit status, if it exited after the stop began

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.running else None


def _as_text(value: object) -> str:
    if value is None:
        return ""  # the options that may be unset read "" as unset
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def _exit_text(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"with status {status}"


async def _kill(proc: trio.Process) -> None:
    proc.kill()  # only once the stop's deadline passed: it had its SIGTERM


@attrs.define(eq=False)
class Supervisor:
    config: Config  # the machine's: its port resolved, its secrets given
    workers: list[Worker]
    stopping: trio.Event = attrs.field(factory=trio.Event)
    admin_turn: int = 0  # which worker the next admin request goes to
    _scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def command(self, worker: Worker) -> list[str]:
        return [sys.executable, "-m", "server.cli", "serve", "--worker", str(worker.index)]

    def environment(self, worker: Worker) -> dict[str, str]:
        config = attrs.evolve(self.config, workers=1, ops_host=worker.ops, ops_port=0, dev=False)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
        env.update({opt.env: _as_text(getattr(config, opt.dest)) for opt in SERVE_OPTIONS})
        return env

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> int:
        """Run the workers until a signal stops them; 0 if every one drained."""
        from server.ops import ops_url, serve_http
        from server.workers_ops import supervisor_app

        config = self.config
        async with trio.open_nursery() as nursery:
            await nursery.start(self._watch_signals)
            start = functools.partial(
                serve_http, supervisor_app(self), config.ops_host, config.ops_port
            )
            ops: tuple[str, int] = await nursery.start(start)
            log.info(
                "parley serving ws://%s:%d/ws with %d workers; ops on %s",
                config.host,
                config.port,
                len(self.workers),
                ops_url(ops),
            )
            if config.dev:
                log.warning("dev mode: admin token %s", config.admin_token)
            task_status.started(ops)
            with self._scope:
                async with trio.open_nursery() as workers:
                    for worker in self.workers:
                        workers.start_soon(self._keep_running, worker)
            nursery.cancel_scope.cancel()
        stopped = [w.stopped_with for w in self.workers]
        log.info("workers stopped: %s", ", ".join(map(str, stopped)))
        return 0 if all(s in (None, 0) for s in stopped) else 1

    def stop(self) -> None:
        """Drain every worker: SIGTERM now, SIGKILL after the drain timeout and a margin."""
        self.stopping.set()
        self._signal_all(signal.SIGTERM)
        self._scope.deadline = trio.current_time() + self.config.drain_timeout + STOP_MARGIN

    def _signal_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.proc is not None and worker.running:
                worker.proc.send_signal(signum)

    async def _watch_signals(self, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping.is_set():
                    log.warning("second %s: killing the workers", name)
                    self._signal_all(signal.SIGKILL)
                else:
                    log.info("%s received: draining %d workers", name, len(self.workers))
                    self.stop()

    async def _keep_running(self, worker: Worker) -> None:
        pause = RESTART_PAUSE
        while not self.stopping.is_set():
            began = trio.current_time()
            status = await self._run_once(worker)
            if self.stopping.is_set():
                break
            if trio.current_time() - began >= STABLE_RUN:
                pause = RESTART_PAUSE
            worker.restarts += 1
            log.error(
                "worker %d (pid %s) exited %s; restarting it in %.1f s",
                worker.index,
                worker.proc.pid if worker.proc else "?",
                _exit_text(status),
                pause,
            )
            with trio.move_on_after(pause):
                await self.stopping.wait()
            pause = min(pause * 2, RESTART_PAUSE_MAX)

    async def _run_once(self, worker: Worker) -> int:
        start = functools.partial(
            trio.run_process,
            self.command(worker),
            env=self.environment(worker),
            check=False,
            start_new_session=True,  # a terminal's Ctrl-C is the supervisor's to forward
            deliver_cancel=_kill,
        )
        try:
            async with trio.open_nursery() as nursery:
                proc: trio.Process = await nursery.start(start)
                worker.proc = proc
                log.info("worker %d started: pid %d", worker.index, proc.pid)
                if self.stopping.is_set():  # the stop came while it was starting
                    proc.send_signal(signal.SIGTERM)
        finally:
            if worker.proc is not None and self.stopping.is_set():
                worker.stopped_with = worker.proc.returncode
        assert proc.returncode is not None
        return proc.returncode


async def run_workers(
    config: Config, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
) -> int:
    """Hold the client port, run ``config.workers`` workers on it until a signal."""
    try:
        reserved = await bind_shared(config.host, config.port)
    except OSError as exc:
        raise OSError(
            f"cannot listen for clients on {config.host}:{config.port}: {exc.strerror}; "
            "another port: --port N (or PARLEY_PORT)"
        ) from exc
    folder = Path(tempfile.mkdtemp(prefix="parley-workers-"))  # 0700: the workers' sockets
    try:
        port = reserved[0].getsockname()[1]
        workers = [Worker(i, f"unix:{folder / f'w{i}.sock'}") for i in range(config.workers)]
        supervisor = Supervisor(attrs.evolve(config, port=port), workers)
        return await supervisor.run(task_status=task_status)
    finally:
        for sock in reserved:
            sock.close()
        shutil.rmtree(folder, ignore_errors=True)
