"""server/collector.py runs with CPython's automatic collector off, which is safe only
while the node makes no cyclic garbage: these tests keep it that way for sessions, and
check the collector task's full passes."""

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from actors.messages import Reply, RequestFailed
from actors.outbox import Outbox
from actors.session import Session
from protocol.client import ServerError
from server import collector
from server.connection import Connection
from tests.helpers import RunningServer, run_server

SERVER_TYPES = (Connection, Session, Outbox, Reply, RequestFailed)


@contextmanager
def saved_garbage() -> Iterator[list[object]]:
    """Cyclic garbage made inside the block, kept for inspection instead of freed."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    found: list[object] = []
    try:
        yield found
    finally:
        gc.collect()
        found.extend(gc.garbage)
        gc.garbage.clear()
        gc.set_debug(0)
        gc.collect()  # what DEBUG_SAVEALL kept


def sessions(server: RunningServer) -> float:
    registry = server.node.services.metrics.registry
    return registry.get_sample_value("parley_sessions") or 0.0


async def test_a_session_that_ends_leaves_no_cycle_behind(tmp_path: Path) -> None:
    async with run_server(tmp_path) as server:
        with saved_garbage() as garbage:
            for n in range(3):
                async with server.client(f"u{n}") as client:
                    if n == 0:
                        await client.create("lobby")
                    else:
                        await client.join("lobby")
                    await client.send("lobby", "hello")
                    with pytest.raises(ServerError):
                        await client.create("lobby")  # refused by the room: Reply.fail
                with trio.fail_after(5):
                    while sessions(server):  # noqa: ASYNC110  # a gauge: no event to wait on
                        await trio.sleep(0.01)
        left = [type(o).__name__ for o in garbage if isinstance(o, SERVER_TYPES)]
        assert left == []
        assert sessions(server) == 0  # the loop above ended because they did end


class Cycle:
    def __init__(self) -> None:
        self.me = self


async def test_the_collector_task_sweeps_when_objects_grow(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(collector, "GROWTH", 1000)
    monkeypatch.setattr(collector, "_installed", False)  # restored after the test
    collector.install()
    try:
        assert not gc.isenabled()
        cycle = Cycle()
        gone = trio.Event()
        ref = weakref.ref(cycle, lambda _: gone.set())
        del cycle
        keep: list[list[int]] = [[] for _ in range(2000)]  # growth past GROWTH
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.run, 0.0)
            with trio.fail_after(collector.CHECK_EVERY * 2):
                await gone.wait()
            nursery.cancel_scope.cancel()
        assert ref() is None and len(keep) == 2000
    finally:
        gc.unfreeze()
        gc.enable()


async def test_the_collector_task_sweeps_on_its_interval(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    monkeypatch.setattr(collector, "_installed", False)  # restored after the test
    collector.install()
    try:
        frozen = Cycle()  # older than the last pass: only the full sweep walks it
        frozen_ref = weakref.ref(frozen)
        del frozen
        gc.freeze()
        cycle = Cycle()
        ref = weakref.ref(cycle)
        del cycle
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.run, 60.0)
            await trio.sleep(55)
            assert ref() is not None  # no growth, not yet due: no pass
            await trio.sleep(10)
            assert ref() is None and frozen_ref() is None
            nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()
        gc.enable()


def test_forget_tracebacks_cuts_the_cycle_of_a_failed_driver_call() -> None:
    from storage.store import forget_tracebacks

    class Task:  # as an asyncio task keeps the exception it ended with
        exception: BaseException | None = None

    def driver(task: Task) -> None:
        try:
            raise ConnectionResetError("gone")
        except ConnectionResetError as exc:
            task.exception = exc  # task -> exception -> traceback -> this frame -> task
            raise

    def call(forget: bool) -> int:
        gc.collect()
        task = Task()
        try:
            driver(task)
        except OSError as exc:
            if forget:
                forget_tracebacks(exc)
        del task
        return gc.collect()

    gc.disable()
    try:
        assert call(forget=False) > 0
        assert call(forget=True) == 0
    finally:
        gc.enable()
