"""Hybrid logical clocks, as kv writes carry them.

An HLC is one unsigned integer: milliseconds since the Unix epoch, shifted left by
``COUNTER_BITS``, plus a counter that orders events within one millisecond. It fits
2**53 (a JavaScript number) until the year 2248. A clock never goes backwards, even if
the wall clock does, and moves past every timestamp it observes, so a write made after
seeing another always compares greater. Sans-IO: the caller passes the wall time.
"""

COUNTER_BITS = 10


def pack(ms: int, counter: int = 0) -> int:
    return (ms << COUNTER_BITS) + counter


def physical_ms(hlc: int) -> int:
    """The wall-clock part of ``hlc``, in milliseconds since the Unix epoch."""
    return hlc >> COUNTER_BITS


class Clock:
    """One device's (or the server's) HLC."""

    __slots__ = ("last",)

    def __init__(self, last: int = 0) -> None:
        self.last = last

    def now(self, wall_ms: int) -> int:
        """A timestamp for a local event: above every one given or observed before."""
        self.last = max(self.last + 1, pack(wall_ms))
        return self.last

    def observe(self, remote: int) -> None:
        """Take in a timestamp from elsewhere: the next ``now`` will be above it."""
        self.last = max(self.last, remote)
