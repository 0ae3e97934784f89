"""Placement: which node of a cluster runs each actor, kept in Redis.

How this works: every node registers itself under ``parley:{node:<id>}`` with a time to
live of one lease, and renews it every third of a lease (``run``). An actor's owner is
``parley:{<kind>:<key>}:owner``, holding a node id: valid while that node is
registered. The first node to ask for an actor nobody validly owns takes it (``owner``,
one Lua script): placement where first asked. It costs a hop for sends from other
nodes, but no actor moves when nodes join, and a room used by one node's clients
(a direct chat whose two users reach one node, a burst of new rooms) never leaves it.
So the per-actor leases are renewed together, by the node's one heartbeat, and lapse
together when the node stops renewing: a dead node's actors are taken over one by one
as other nodes ask for them.

A node that cannot renew stops acting as owner before its lease lapses: ``valid()`` is
False from a margin before the lapse, and owners check it before every change (a Room
before it sequences). After a lapse (Redis down, the node paused or cut off) the
heartbeat registers the node again, but ``valid()`` stays False until every actor the
node still runs is checked: those another node took meanwhile are ``lost``, and their
actors stop. Storage fences them in any case (``Store.claim``): this only keeps them
from delivering what storage would refuse.

Keys and channels carry hash tags, so a Redis Cluster could hold them (ARCHITECTURE.md).
"""

import logging
from collections.abc import Callable

import trio

from storage.redis_conn import Redis, RedisError, Script

log = logging.getLogger(__name__)

PREFIX = "parley:"

# KEYS[1]: the owner key. ARGV[1]: this node; ARGV[2]: the node key prefix.
_TAKE = Script(
    """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then return current end
if current and redis.call('EXISTS', ARGV[2] .. current .. '}') == 1 then return current end
if redis.call('EXISTS', ARGV[2] .. ARGV[1] .. '}') == 0 then return false end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""
)
# KEYS[1]: the owner key. ARGV[1]: this node.
_RELEASE = Script(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
)
# KEYS[1]: this node's key. ARGV[1]: lease ms. 1: renewed; 0: registered anew.
_HEARTBEAT = Script(
    """
if redis.call('PEXPIRE', KEYS[1], ARGV[1]) == 1 then return 1 end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 0
"""
)


def node_key(node: str) -> str:
    return f"{PREFIX}{{node:{node}}}"


def owner_key(kind: str, key: str) -> str:
    return f"{PREFIX}{{{kind}:{key}}}:owner"


class NotRegistered(Exception):
    """This node's own registration lapsed: it may take nothing until it renews."""


class Placement:
    def __init__(
        self,
        redis: Redis,
        node: str,
        *,
        lease: float = 5.0,
        on_lost: Callable[[str, str], None] | None = None,
    ) -> None:
        self.redis = redis
        self.node = node
        self.lease = lease
        self.margin = min(1.0, lease / 4)  # stop acting as owner this long before a lapse
        self.on_lost = on_lost or (lambda kind, key: None)
        self.owned: set[tuple[str, str]] = set()
        self._valid_until = float("-inf")
        self.error: str | None = None  # why the last heartbeat failed, while it fails
        self._unchecked = False  # registered anew; what it runs is not checked yet

    def valid(self) -> bool:
        """Whether this node may act as the owner of what it owns, now."""
        return trio.current_time() < self._valid_until

    async def owner(self, kind: str, key: str) -> str:
        """The node that runs actor ``(kind, key)``: this one if nobody validly does.

        Raises ``RedisError`` (Redis unreachable) or ``NotRegistered``."""
        found = await self.redis.evalsha(
            _TAKE, [owner_key(kind, key)], [self.node, f"{PREFIX}{{node:"]
        )
        if found is None:
            raise NotRegistered("this node's registration lapsed; retry")
        owner = found.decode() if isinstance(found, bytes) else str(found)
        if owner == self.node:
            self.owned.add((kind, key))
        return owner

    async def release(self, kind: str, key: str) -> None:
        """Let ``(kind, key)`` go, after everything its actor wrote is stored."""
        self.owned.discard((kind, key))
        await self.redis.evalsha(_RELEASE, [owner_key(kind, key)], [self.node])

    async def alive(self, nodes: list[str]) -> dict[str, bool]:
        """Which of ``nodes`` are registered."""
        replies = await self.redis.pipeline([("EXISTS", node_key(n)) for n in nodes])
        return {n: r == 1 for n, r in zip(nodes, replies, strict=True)}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Register and renew, for ever; cancel to stop (``leave`` first to hand over)."""
        started = False
        lease_ms = round(self.lease * 1000)
        while True:
            sent = trio.current_time()
            try:
                renewed = await self.redis.evalsha(_HEARTBEAT, [node_key(self.node)], [lease_ms])
                if not renewed and self.owned:
                    await self._check_owned()
                self._valid_until = sent + self.lease - self.margin
                if self.error is not None:
                    log.info("cluster: registered again (%s)", self.node)
                self.error = None
            except RedisError as exc:
                if self.error is None:
                    log.warning("cluster: heartbeat failed: %s", exc)
                self.error = f"heartbeat failed: {exc}"
            if not started:
                started = True
                task_status.started()
            await trio.sleep(self.lease / 3)

    async def _check_owned(self) -> None:
        """After a lapse: keep what nobody took meanwhile, give up the rest."""
        owned = sorted(self.owned)
        replies = await self.redis.pipeline([("GET", owner_key(k, key)) for k, key in owned])
        mine = self.node.encode()
        for (kind, key), owner in zip(owned, replies, strict=True):
            # None: Redis restarted empty. Taken again like any actor, unless another
            # node was quicker.
            if owner != mine and (owner is not None or await self.owner(kind, key) != self.node):
                log.warning("cluster: %s %r was taken over while this node lapsed", kind, key)
                self.owned.discard((kind, key))
                self.on_lost(kind, key)

    async def leave(self) -> None:
        """Deregister (a drain): other nodes take what this one ran at once."""
        self._valid_until = float("-inf")
        try:
            with trio.move_on_after(self.lease):
                await self.redis.call("DEL", node_key(self.node))
        except RedisError as exc:
            log.warning("cluster: could not deregister: %s", exc)
