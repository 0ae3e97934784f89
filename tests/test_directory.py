"""actors/directory.py: spawning, retiring, supervising, with small test actors."""

from typing import Any, ClassVar

import pytest
import trio
import trio.testing

from actors.directory import CRASHES_BEFORE_PAUSE, ActorKind, Directory
from actors.metrics import Metrics


class Recorder:
    """Records what it receives; ``"crash"`` raises; retires when idle for 1 s."""

    instances: ClassVar[list["Recorder"]] = []

    def __init__(self, key: str, predecessor: "Recorder | None", directory: Directory) -> None:
        self.key = key
        self.predecessor = predecessor
        self.directory = directory
        self.seen: list[Any] = []
        self.started = trio.current_time()
        Recorder.instances.append(self)

    async def run(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        while True:
            with trio.move_on_after(1.0) as idle:
                message = await inbox.receive()
            if idle.cancelled_caught:
                if self.directory.try_retire(ActorKind.USER, self.key):
                    return
                continue
            if message == "crash":
                raise RuntimeError("asked to crash")
            self.seen.append(message)


@pytest.fixture
def recorders() -> list[Recorder]:
    Recorder.instances = []
    return Recorder.instances


async def make(nursery: trio.Nursery, mailbox_size: int = 8) -> tuple[Directory, Metrics]:
    metrics = Metrics()
    directory = Directory(nursery, metrics, mailbox_size=mailbox_size)
    directory.register(ActorKind.USER, lambda key, prev: Recorder(key, prev, directory))
    return directory, metrics


async def test_spawn_on_demand_and_reuse(
    recorders: list[Recorder], autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        directory, _ = await make(nursery)
        assert directory.get(ActorKind.USER, "a") is None
        directory.ref(ActorKind.USER, "a").send_nowait(1)
        directory.ref(ActorKind.USER, "a").send_nowait(2)
        await trio.testing.wait_all_tasks_blocked()
        assert len(recorders) == 1 and recorders[0].seen == [1, 2]
        assert directory.count(ActorKind.USER) == 1
        nursery.cancel_scope.cancel()


async def test_idle_actor_retires_and_a_new_one_starts_later(
    recorders: list[Recorder], autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        directory, _ = await make(nursery)
        directory.ref(ActorKind.USER, "a").send_nowait("x")
        await trio.sleep(1.5)
        assert directory.get(ActorKind.USER, "a") is None
        assert directory.count(ActorKind.USER) == 0
        directory.ref(ActorKind.USER, "a").send_nowait("y")
        await trio.testing.wait_all_tasks_blocked()
        assert [r.seen for r in recorders] == [["x"], ["y"]]
        nursery.cancel_scope.cancel()


async def test_retire_is_refused_while_mail_waits(autojump_clock: trio.abc.Clock) -> None:
    async with trio.open_nursery() as nursery:
        metrics = Metrics()
        directory = Directory(nursery, metrics, mailbox_size=4)
        parked = trio.Event()

        class Stuck:
            async def run(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
                await parked.wait()
                assert not directory.try_retire(ActorKind.ROOM, "r")  # "m" is waiting
                assert await inbox.receive() == "m"
                assert directory.try_retire(ActorKind.ROOM, "r")

        directory.register(ActorKind.ROOM, lambda key, prev: Stuck())
        ref = directory.ref(ActorKind.ROOM, "r")
        ref.send_nowait("m")
        parked.set()
        await trio.testing.wait_all_tasks_blocked()
        assert directory.get(ActorKind.ROOM, "r") is None
        with pytest.raises(trio.ClosedResourceError):
            ref.send_nowait("too late: callers look actors up for each send")


async def test_crash_restarts_with_the_mailbox_and_the_predecessor(
    recorders: list[Recorder], autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        directory, metrics = await make(nursery)
        ref = directory.ref(ActorKind.USER, "a")
        for message in (1, "crash", 2, 3):
            ref.send_nowait(message)
        await trio.testing.wait_all_tasks_blocked()
        first, second = recorders
        assert first.seen == [1] and second.seen == [2, 3]
        assert second.predecessor is first
        assert directory.ref(ActorKind.USER, "a") is ref  # same mailbox
        crashes = metrics.registry.get_sample_value("parley_actor_crashes_total", {"kind": "user"})
        assert crashes == 1.0
        nursery.cancel_scope.cancel()


async def test_a_crash_loop_is_slowed_down(
    recorders: list[Recorder], autojump_clock: trio.abc.Clock
) -> None:
    async with trio.open_nursery() as nursery:
        directory, _ = await make(nursery)
        ref = directory.ref(ActorKind.USER, "a")
        for _ in range(CRASHES_BEFORE_PAUSE + 2):
            ref.send_nowait("crash")
        ref.send_nowait("finally")
        await trio.sleep(10)
        starts = [r.started for r in recorders]
        # Three quick crashes restart at once; then pauses double: 0.5 s, 1 s, 2 s.
        assert starts == [0.0, 0.0, 0.0, 0.5, 1.5, 3.5]
        assert recorders[-1].seen == ["finally"]
        nursery.cancel_scope.cancel()


class Sleeper:
    """Hibernates after each message; counts its runs."""

    def __init__(self, key: str, directory: Directory) -> None:
        self.key = key
        self.directory = directory
        self.seen: list[Any] = []
        self.runs = 0

    async def run(self, inbox: trio.MemoryReceiveChannel[Any]) -> None:
        self.runs += 1
        while True:
            self.seen.append(await inbox.receive())
            if self.directory.try_hibernate(ActorKind.USER, self.key):
                return


async def test_a_hibernating_actor_keeps_its_object_and_wakes_on_the_next_message(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with trio.open_nursery() as nursery:
        directory, _ = await make(nursery)
        directory.register(ActorKind.USER, lambda key, prev: Sleeper(key, directory))
        directory.ref(ActorKind.USER, "a").send_nowait(1)
        await trio.testing.wait_all_tasks_blocked()
        actor = directory.actor(ActorKind.USER, "a")
        assert actor.seen == [1] and directory.count(ActorKind.USER) == 1
        ref = directory.get(ActorKind.USER, "a")  # wakes it: a new mailbox
        assert ref is not None
        ref.send_nowait(2)
        directory.ref(ActorKind.USER, "a").send_nowait(3)  # queued behind 2: no new task
        await trio.testing.wait_all_tasks_blocked()
        assert directory.actor(ActorKind.USER, "a") is actor
        assert actor.seen == [1, 2, 3] and actor.runs == 2
        # Woken again before the last run's supervisor has finished: the entry stays.
        directory.ref(ActorKind.USER, "a").send_nowait(4)
        directory.ref(ActorKind.USER, "a")
        await trio.testing.wait_all_tasks_blocked()
        directory.ref(ActorKind.USER, "a").send_nowait(5)
        await trio.testing.wait_all_tasks_blocked()
        assert actor.seen == [1, 2, 3, 4, 5] and directory.actor(ActorKind.USER, "a") is actor
        nursery.cancel_scope.cancel()
