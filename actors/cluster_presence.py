"""The presence book of a cluster node.

How this works: a node's book holds two kinds of entries. Those of users whose User
actor runs here are written through to Redis (``parley:{presence:<user>}``) with a
time to live of three leases, renewed every lease while the actor runs: a node that
dies takes its users' entries with it. The others are mirrors of users this node's
sessions follow: seeded from Redis when the first local session follows the user, kept
by the user's presence notes (``storage.redis_bus`` hands each note from another node
here before its followers), dropped when the last follower here stops. A seeded user
who is online is announced to the followers with a note of the seed's own, so a
session that followed before the seed arrived learns of them too.

Sessions read the book without awaiting, as on one node; ``who`` and ``watch`` also
ask Redis for users the book does not hold (``known_anywhere``).
"""

import logging
from collections.abc import Callable

import cbor2
import trio

from actors.presence import PresenceBook, PresenceNote, presence_note
from protocol.frames import PresenceState, Status
from storage.redis_conn import Redis, RedisError

log = logging.getLogger(__name__)


def _nobody(note: PresenceNote) -> None:
    pass


def presence_key(user: str) -> str:
    return f"parley:{{presence:{user}}}"


class ClusterPresence(PresenceBook):
    def __init__(self, redis: Redis, lease: float) -> None:
        super().__init__()
        self._redis = redis
        self._lease = lease
        self._ttl_ms = round(3 * lease * 1000)
        self._mirrors: set[str] = set()
        self._followed: set[str] = set()
        self.announce: Callable[[PresenceNote], None] = _nobody  # the bus's local delivery

    # --- entries of this node's users -------------------------------------------------

    def put(
        self, user: str, status: Status, blocks: frozenset[str], last_seen: int | None = None
    ) -> None:
        super().put(user, status, blocks, last_seen)
        self._mirrors.discard(user)
        self._redis.send(*self._set(user))

    def _set(self, user: str) -> tuple[str | bytes | int, ...]:
        entry = self._online[user]
        value = cbor2.dumps([int(entry.status), sorted(entry.blocks), entry.last_seen])
        return ("SET", presence_key(user), value, "PX", self._ttl_ms)

    def remove(self, user: str) -> None:
        if user in self._mirrors:
            return  # a mirror goes when its last follower here does
        super().remove(user)
        self._redis.send("DEL", presence_key(user))

    def forget(self, user: str) -> None:
        # Another node runs the user now, and writes the entry in Redis.
        self._mirrors.discard(user)
        PresenceBook.remove(self, user)

    async def run(self) -> None:
        """Write this node's entries again every lease (so a Redis restarted empty has
        them back); a dead node's lapse."""
        while True:
            await trio.sleep(self._lease)
            owned = [u for u in self._online if u not in self._mirrors]
            if not owned:
                continue
            try:
                await self._redis.pipeline([self._set(u) for u in owned])
            except RedisError as exc:
                log.debug("presence: renewal failed: %s", exc)

    # --- mirrors of users followed here -----------------------------------------------

    def mirror(self, note: PresenceNote) -> None:
        """A presence note from the node that runs ``note.user``."""
        if note.only is not None or note.user not in self._followed:
            return  # for one follower only (a block): not the user's state for others
        if note.user in self._online and note.user not in self._mirrors:
            return  # its actor runs here after all (it moved): its own entry wins
        last_seen = note.ts if note.status is Status.OFFLINE else None
        PresenceBook.put(self, note.user, note.status, note.hidden, last_seen)
        self._mirrors.add(note.user)

    def followed(self, user: str, nursery: trio.Nursery) -> None:
        self._followed.add(user)
        if user not in self._online:
            nursery.start_soon(self._seed, user)

    def unfollowed(self, user: str) -> None:
        self._followed.discard(user)
        if user in self._mirrors:
            self._mirrors.discard(user)
            PresenceBook.remove(self, user)

    async def _seed(self, user: str) -> None:
        try:
            with trio.fail_after(self._lease):
                raw = await self._redis.call("GET", presence_key(user))
        except (RedisError, trio.TooSlowError) as exc:
            log.debug("presence of %r not seeded: %s", user, exc)
            return
        if raw is None or user not in self._followed or user in self._online:
            return  # offline (storage says since when), unfollowed, or known meanwhile
        try:
            status, blocks, last_seen = cbor2.loads(raw)
            status = Status(status)
        except (ValueError, TypeError, cbor2.CBORDecodeError) as exc:
            log.error("presence of %r: unreadable entry in Redis: %s", user, exc)
            return
        note = presence_note(user, Status(status), frozenset(blocks), last_seen)
        self.mirror(note)
        if note.status is not Status.OFFLINE:
            self.announce(note)

    async def known_anywhere(self, users: list[str], viewer: str) -> dict[str, PresenceState]:
        found = self.known(users, viewer)
        missing = [u for u in users if u not in found]
        if not missing:
            return found
        try:
            with trio.fail_after(self._lease):
                raws = await self._redis.call("MGET", *[presence_key(u) for u in missing])
        except (RedisError, trio.TooSlowError) as exc:
            log.debug("presence: read failed: %s", exc)
            return found  # storage's answer stands for the rest
        for user, raw in zip(missing, raws, strict=True):
            if raw is None:
                continue
            try:
                status, blocks, last_seen = cbor2.loads(raw)
                Status(status)
            except (ValueError, TypeError, cbor2.CBORDecodeError) as exc:
                log.error("presence of %r: unreadable entry in Redis: %s", user, exc)
                continue
            if viewer in blocks:
                found[user] = PresenceState(user=user, status=Status.OFFLINE)
            elif Status(status) is Status.OFFLINE:
                found[user] = PresenceState(user=user, status=Status.OFFLINE, ts=last_seen)
            else:
                found[user] = PresenceState(user=user, status=Status(status))
        return found
