"""Per-user quotas of one node: sessions open at once, rooms created over time, distinct
rooms named in requests per minute.

They are kept here rather than in the User actor because they are checked where a
session cannot wait for an actor: a hello, a request naming a room, a room creating
itself. Each check is a dict lookup, run on the node's trio thread. Refusals are counted
in ``parley_quota_refusals_total`` by quota. Rooms named are counted per user, not per
session: a client that reconnects (with a fresh resume list each time) must not get a
fresh allowance of storage lookups for rooms that do not exist.

A user's creation bucket is kept only while it is not full, and their rooms named only
for the current minute: a user who has not done either for a while costs nothing here
(``_sweep``). ``QuotaSettings`` also holds how many users one may block, which the User
actor checks.
"""

import attrs
import trio

from actors.metrics import Metrics
from actors.token_bucket import TokenBucket

SWEEP_EVERY = 1024  # creations (or new minutes of rooms named) between sweeps


@attrs.frozen(kw_only=True)
class QuotaSettings:
    max_sessions_per_user: int = 10  # 0: no limit
    room_creations_per_hour: float = 60.0  # create, and direct with someone new
    room_creation_burst: int = 30
    rooms_per_minute: int = 300  # distinct rooms one user may name in requests in a minute
    max_blocks_per_user: int = 1000


class UserQuotas:
    def __init__(self, settings: QuotaSettings, metrics: Metrics) -> None:
        self.settings = settings
        self._sessions: dict[str, int] = {}
        self._creations: dict[str, TokenBucket] = {}
        self._named: dict[str, tuple[float, set[str]]] = {}  # user -> (minute's end, rooms)
        self._since_sweep = 0
        refusals = metrics.quota_refusals
        self._sessions_refused = refusals.labels(quota="sessions_per_user")
        self._creations_refused = refusals.labels(quota="room_creations")
        self._named_refused = refusals.labels(quota="rooms_per_minute")

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

    def may_create_room(self, user: str) -> bool:
        """Whether ``user`` has a room creation left, without spending it."""
        bucket = self._creations.get(user)
        return bucket is None or bucket.tokens(trio.current_time()) >= 1

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

    def name_room(self, user: str, room: str) -> bool:
        """Count ``room`` among the distinct rooms ``user`` named this minute, unless
        that would be more than the quota."""
        named = self._named.get(user)
        if named is not None and room in named[1]:
            return True
        now = trio.current_time()
        if named is None or now >= named[0]:
            named = self._named[user] = (now + 60.0, set())
            self._since_sweep += 1
            if self._since_sweep >= SWEEP_EVERY:
                self._sweep(now)
        if len(named[1]) >= self.settings.rooms_per_minute:
            self._named_refused.inc()
            return False
        named[1].add(room)
        return True

    def _sweep(self, now: float) -> None:
        self._since_sweep = 0
        for user in [u for u, b in self._creations.items() if b.full(now)]:
            del self._creations[user]
        for user in [u for u, (ends, _) in self._named.items() if now >= ends]:
            del self._named[user]
