"""Per-user quotas of one node: sessions open at once, rooms created over time.

Both are kept here rather than in the User actor because they are checked where a
session cannot wait for an actor: a hello, and a room creating itself. Each check is
a dict lookup, run on the node's trio thread. Refusals are counted in
``parley_quota_refusals_total`` by quota.

A user's creation bucket is kept only while it is not full: a user who has not created
a room for a while costs nothing here (``_sweep``).
"""

import attrs
import trio

from actors.metrics import Metrics
from actors.token_bucket import TokenBucket

SWEEP_EVERY = 1024  # creations between sweeps of the full buckets


@attrs.frozen(kw_only=True)
class QuotaSettings:
    max_sessions_per_user: int = 10  # 0: no limit
    room_creations_per_hour: float = 60.0  # create, and direct with someone new
    room_creation_burst: int = 30
    rooms_per_minute: int = 300  # distinct rooms one session may name in a minute


class UserQuotas:
    def __init__(self, settings: QuotaSettings, metrics: Metrics) -> None:
        self.settings = settings
        self._sessions: dict[str, int] = {}
        self._creations: dict[str, TokenBucket] = {}
        self._since_sweep = 0
        refusals = metrics.quota_refusals
        self._sessions_refused = refusals.labels(quota="sessions_per_user")
        self._creations_refused = refusals.labels(quota="room_creations")

    def open_session(self, user: str) -> bool:
        """Count a session of ``user``, unless they have the most already."""
        n = self._sessions.get(user, 0)
        limit = self.settings.max_sessions_per_user
        if limit and n >= limit:
            self._sessions_refused.inc()
            return False
        self._sessions[user] = n + 1
        return True

    def close_session(self, user: str) -> None:
        n = self._sessions.pop(user, 0) - 1
        if n > 0:
            self._sessions[user] = n

    def sessions(self, user: str) -> int:
        return self._sessions.get(user, 0)

    def create_room(self, user: str) -> bool:
        """Spend one of ``user``'s room creations, if they have one left."""
        now = trio.current_time()
        bucket = self._creations.get(user)
        if bucket is None:
            s = self.settings
            bucket = TokenBucket(s.room_creations_per_hour / 3600, s.room_creation_burst, now)
            self._creations[user] = bucket
        if not bucket.take(now):
            self._creations_refused.inc()
            return False
        self._since_sweep += 1
        if self._since_sweep >= SWEEP_EVERY:
            self._sweep(now)
        return True

    def _sweep(self, now: float) -> None:
        self._since_sweep = 0
        for user in [u for u, b in self._creations.items() if b.full(now)]:
            del self._creations[user]
