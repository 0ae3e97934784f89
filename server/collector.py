"""How the node runs CPython's cyclic garbage collector: not during the load, but in rare
passes of its own.

Why: a collector pass stops the whole node while it walks the objects it collects. With
CPython's generations, a node stopped for 35 to 130 ms in young passes and 400 ms in an
older one under load (BENCHMARKS.md, "Stalls"). Young passes cannot be made short: every
connection that waited for its socket since the last pass holds a fresh chain of about
a dozen objects (trio's coroutines for the wait), so a pass walks every recently active
connection, 17 ms for 2,000 chatting sessions, whatever the thresholds. Yet a node makes
next to no cyclic garbage: messages, frames and requests are freed by reference
counting, and a session breaks its own cycles when it ends (``Session.release``;
tests/test_collector.py keeps it so). So the automatic collector is off, and the node's
collector task runs a pass:

- every ``sweep_interval`` seconds (``--gc-sweep-interval``, an hour by default), over
  every object: about 0.8 µs each on our reference machine, 0.55 to 0.66 s for 10,000
  idle sessions (700,000 objects);
- and, between those, over the objects made since the last pass once they grew by
  ``GROWTH``, in case something leaks cycles faster than expected: a pause of about a
  second (1.0 and 1.26 s measured as 10,000 sessions closed), at most once per million
  new objects (some 12,000 sessions).

After a pass, what survived is frozen (``gc.freeze``), so a growth pass walks only what
is new. Each pass logs what it freed: a few dozen objects in our measurements; a
warning above ``LEAK_WARNING`` says a cycle-maker needs finding.
"""

import gc
import logging
import time

import trio

log = logging.getLogger(__name__)

GROWTH = 1_000_000  # more tracked objects than at the last pass: pass now
CHECK_EVERY = 10.0  # seconds between looks at that growth
LEAK_WARNING = 10_000  # freed objects that make the pass's log line a warning

_installed = False


def install() -> None:
    """Turn the automatic collector off for this process; the node's ``run`` task
    collects instead. Call once, before serving."""
    global _installed
    gc.freeze()  # the modules imported so far live as long as the process
    gc.disable()
    _installed = True


def sweep(*, everything: bool) -> tuple[int, float]:
    """One pass, over every object or only those made since the last pass: (objects
    freed, seconds it took). Survivors are frozen: the next growth pass skips them."""
    started = time.perf_counter()
    if everything:
        gc.unfreeze()
    freed = gc.collect()
    gc.freeze()
    return freed, time.perf_counter() - started


async def run(sweep_interval: float) -> None:
    """The node's collector task, once ``install`` has run (else it returns at once)."""
    if not _installed:
        return
    last = trio.current_time()
    while True:
        await trio.sleep(CHECK_EVERY)
        due = sweep_interval > 0 and trio.current_time() - last >= sweep_interval
        if not due and gc.get_count()[0] < GROWTH:
            continue
        freed, took = sweep(everything=due)
        if due:
            last = trio.current_time()
        level = logging.WARNING if freed > LEAK_WARNING else logging.INFO
        what = "full" if due else "growth"
        log.log(
            level, "%s garbage collection: %d objects freed in %.0f ms", what, freed, took * 1e3
        )
