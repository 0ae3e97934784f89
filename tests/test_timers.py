"""actors/timers.py: one task runs every session's timers, in deadline order, exactly on
time in virtual time; cancelled timers never run and do not pile up."""

import functools

import trio
import trio.testing

from actors.timers import Timers


async def test_timers_run_in_deadline_order_on_time(autojump_clock: trio.abc.Clock) -> None:
    timers = Timers()
    ran: list[tuple[str, float]] = []
    start = trio.current_time()

    def note(name: str) -> None:
        ran.append((name, trio.current_time() - start))

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        timers.call_at(start + 5, lambda: note("b"))
        timers.call_at(start + 10, lambda: note("c"))
        timers.call_at(start + 5, lambda: note("b2"))  # a tie runs in scheduling order
        await trio.sleep(1)
        timers.call_at(start + 2, lambda: note("a"))  # earlier than the task's sleep
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert ran == [("a", 2.0), ("b", 5.0), ("b2", 5.0), ("c", 10.0)]


async def test_a_callback_may_schedule_and_a_failing_one_stops_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    timers = Timers()
    ran: list[float] = []
    start = trio.current_time()

    def again() -> None:
        ran.append(trio.current_time() - start)
        if len(ran) < 3:
            timers.call_at(trio.current_time() + 1, again)

    def fail() -> None:
        raise RuntimeError("a bug in one callback")

    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        timers.call_at(start + 1, fail)
        timers.call_at(start + 1, again)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert ran == [1.0, 2.0, 3.0]


async def test_cancelled_timers_never_run_and_are_dropped(autojump_clock: trio.abc.Clock) -> None:
    timers = Timers()
    ran: list[int] = []
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(timers.run)
        handles = [
            timers.call_at(start + 100 + i / 100, functools.partial(ran.append, i))
            for i in range(5000)
        ]
        for handle in handles[:4000]:
            handle.cancel()
            handle.cancel()  # twice is harmless
        assert len(timers) == 1000
        assert len(timers._heap) < 3000  # rebuilt without most of the cancelled ones
        await trio.sleep(200)
        nursery.cancel_scope.cancel()
    assert ran == list(range(4000, 5000))
    assert len(timers) == 0
