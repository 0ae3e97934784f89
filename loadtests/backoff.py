"""When a load-test session may reconnect (PROTOCOL.md sections 1, 5 and 13), sans-IO:
an exponential backoff with jitter, the server's own waits, and the closes after which
reconnecting cannot help. Times are ``time.monotonic()`` seconds, given by the caller."""

import random

import attrs

# Close codes after which reconnecting cannot help (PROTOCOL.md section 13).
FINAL_CLOSES = {4001: "UNAUTHORIZED", 4002: "UNSUPPORTED_VERSION", 4006: "TOO_MANY_ERRORS"}


@attrs.define
class Backoff:
    first: float = 0.5
    most: float = 30.0
    retry_at: float = 0.0  # not before this
    _next: float = attrs.field(default=0.0, init=False)
    rng: random.Random = attrs.field(factory=random.Random, repr=False)

    def __attrs_post_init__(self) -> None:
        self._next = self.first

    def failed(self, now: float) -> None:
        """A connection attempt failed: wait the next delay (jittered between half and
        all of it; it doubles up to ``most``), unless the server asked for longer."""
        self.retry_at = max(self.retry_at, now + self.rng.uniform(0.5, 1.0) * self._next)
        self._next = min(self.most, self._next * 2)

    def succeeded(self) -> None:
        self._next = self.first

    def server_asks(self, now: float, seconds: float) -> None:
        """``Retry-After`` or a ``goaway``'s ``delay``: that long at least, plus up to
        half again, so that a crowd told the same does not come back at one instant."""
        self.retry_at = max(self.retry_at, now + seconds * self.rng.uniform(1.0, 1.5))

    def wait(self, now: float) -> float:
        return max(0.0, self.retry_at - now)
