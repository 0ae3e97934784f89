"""A token bucket, sans-IO: the caller passes the time."""


class TokenBucket:
    """Allows ``rate`` events per second on average and ``burst`` at once."""

    __slots__ = ("_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if there are that many; a refusal spends nothing."""
        tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if tokens < cost:
            self._tokens = tokens
            return False
        self._tokens = tokens - cost
        return True

    def tokens(self, now: float) -> float:
        """Tokens there are now, without taking any."""
        return min(self.burst, self._tokens + (now - self._stamp) * self.rate)

    def full(self, now: float) -> bool:
        """Whether the bucket holds its whole burst (forgetting it would change nothing)."""
        return self.tokens(now) >= self.burst
