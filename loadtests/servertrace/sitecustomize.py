"""Loaded into the Parley server under test by ``parley bench compare --trace FILE``
(this directory goes first on the server's PYTHONPATH; nothing else imports it).

Every ``INTERVAL`` seconds it appends to FILE what the benchmark tables cannot show:
how often the event loop waited for I/O and how many task steps ran, by task (rooms and
users summed), the longest task step (the longest the loop ran nothing else: the stall a
client feels, garbage-collector passes included), and the cyclic garbage collector's
passes and pauses per generation.
Divided by the messages of that interval, these say how much work one message costs
the loop, which is what separates the cost of a message at a fixed rate from its cost
at full speed (BENCHMARKS.md). Adds a few µs per task step: for diagnosis, not for the
figures in the tables.
"""

import gc
import os
import time
from collections import Counter
from typing import Any

INTERVAL = 4.0
_path = os.environ.get("PARLEY_BENCH_TRACE")


def _group(name: str) -> str:
    for actor in ("room:", "user:", "kv:", "feed:"):
        if name.startswith(actor):
            return actor.rstrip(":")
    return ".".join(name.split(" ")[0].split(".")[-2:])  # Class.method or module.function


class _Gc:
    def __init__(self) -> None:
        self.started = 0.0
        self.reset()

    def reset(self) -> None:
        self.passes = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]

    def callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        g, took = info["generation"], time.perf_counter() - self.started
        self.passes[g] += 1
        self.seconds[g] += took
        self.longest[g] = max(self.longest[g], took)

    def line(self) -> str:
        parts = [
            f"gen{g} {n} passes {s * 1e3:.0f} ms, longest {m * 1e3:.1f} ms"
            for g, (n, s, m) in enumerate(zip(self.passes, self.seconds, self.longest, strict=True))
        ]
        self.reset()
        return "gc: " + "; ".join(parts) + f"; tracked now {len(gc.get_objects())}"


def _install(path: str) -> None:
    import trio

    collector = _Gc()
    gc.callbacks.append(collector.callback)

    class Trace(trio.abc.Instrument):
        def __init__(self) -> None:
            self.steps: Counter[str] = Counter()
            self.waits = 0
            self.since = time.monotonic()
            self.step_started = 0.0
            self.longest = (0.0, "")  # the longest task step: the loop ran nothing else
            self.over = 0  # steps of 20 ms or more

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            self.steps[task.name] += 1
            self.step_started = time.perf_counter()

        def after_task_step(self, task: trio.lowlevel.Task) -> None:
            took = time.perf_counter() - self.step_started
            if took >= 0.02:
                self.over += 1
            if took > self.longest[0]:
                self.longest = (took, task.name)

        def before_io_wait(self, timeout: float) -> None:
            self.waits += 1
            now = time.monotonic()
            if now - self.since < INTERVAL:
                return
            by: Counter[str] = Counter()
            for name, n in self.steps.items():
                by[_group(name)] += n
            with open(path, "a") as f:
                f.write(
                    f"--- {now - self.since:.1f} s: {self.waits} waits for I/O, "
                    f"{sum(by.values())} task steps; longest step {self.longest[0] * 1e3:.1f} ms "
                    f"({_group(self.longest[1])}), {self.over} of 20 ms or more\n"
                )
                f.writelines(f"{n:9d} {name}\n" for name, n in by.most_common(10))
                f.write(collector.line() + "\n")
            self.steps.clear()
            self.longest = (0.0, "")
            self.over = 0
            self.waits = 0
            self.since = now

    run = trio.run

    def traced_run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), Trace()]
        return run(*args, **kwargs)

    trio.run = traced_run  # type: ignore[assignment]  # the server calls trio.run at start


if _path:
    _install(_path)
