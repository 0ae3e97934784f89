"""A cluster node's presence book against a real, private Redis: what it reads of users
other nodes run, the mirrors it seeds for local followers, and what it does when Redis
holds an entry it cannot read or cannot be reached. Two books stand for two nodes."""

import logging

import pytest
import trio

from actors.cluster_presence import ClusterPresence, presence_key
from actors.presence import PresenceNote, presence_note
from protocol.frames import PresenceState, Status
from storage.redis_conn import open_redis
from tests.helpers import until
from tests.redis_server import PrivateRedis

LEASE = 10.0  # seconds: no renewal runs in these tests unless one starts it
NOBODY: frozenset[str] = frozenset()


async def test_who_reads_the_users_of_other_nodes_from_redis(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_redis(redis_url, timeout=2) as (redis, _):
        here, there = ClusterPresence(redis, LEASE), ClusterPresence(redis, LEASE)
        there.put("alice", Status.AWAY, frozenset({"mallory"}))
        there.put("olga", Status.OFFLINE, NOBODY, last_seen=1234)
        await redis.call("SET", presence_key("broken"), b"\xff")  # not CBOR
        users = ["alice", "olga", "broken", "nobody"]
        assert await here.known_anywhere(users, "bob") == {
            "alice": PresenceState(user="alice", status=Status.AWAY),
            "olga": PresenceState(user="olga", status=Status.OFFLINE, ts=1234),
        }
        # Alice blocks mallory: to him she looks offline, with no last-seen time.
        assert await here.known_anywhere(["alice"], "mallory") == {
            "alice": PresenceState(user="alice", status=Status.OFFLINE)
        }
        assert "presence of 'broken': unreadable entry in Redis" in caplog.text
        there.remove("alice")  # her actor stopped: her entry goes
        assert await here.known_anywhere(["alice"], "bob") == {}


async def test_a_followed_user_is_mirrored_from_redis_and_announced(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_redis(redis_url, timeout=2) as (redis, _):
        here, there = ClusterPresence(redis, LEASE), ClusterPresence(redis, LEASE)
        announced: list[PresenceNote] = []
        here.announce = announced.append
        there.put("alice", Status.DND, NOBODY)
        await redis.call("SET", presence_key("broken"), b"\x83\x01")  # a list cut short
        async with trio.open_nursery() as nursery:
            here.followed("alice", nursery)
            here.followed("broken", nursery)
            here.followed("ghost", nursery)  # in no book, not in Redis: offline
        assert [(n.user, n.status) for n in announced] == [("alice", Status.DND)]
        entry = here.get("alice")
        assert entry is not None and entry.status is Status.DND
        assert here.get("broken") is None and here.get("ghost") is None
        assert "presence of 'broken': unreadable entry in Redis" in caplog.text

        here.remove("alice")  # a mirror stays while a follower here wants it
        assert here.get("alice") is not None
        here.mirror(presence_note("alice", Status.AWAY, NOBODY, None))
        assert here.get("alice").status is Status.AWAY  # type: ignore[union-attr]
        here.unfollowed("alice")
        assert here.get("alice") is None
        here.mirror(presence_note("alice", Status.ONLINE, NOBODY, None))
        assert here.get("alice") is None  # nobody here follows her now

        # Dave's actor runs here: his own entry wins over a note from elsewhere.
        here.put("dave", Status.ONLINE, NOBODY)
        async with trio.open_nursery() as nursery:
            here.followed("dave", nursery)
        here.mirror(presence_note("dave", Status.AWAY, NOBODY, None))
        assert here.get("dave").status is Status.ONLINE  # type: ignore[union-attr]


async def test_without_redis_the_book_answers_what_it_knows_then_writes_again(
    own_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down: ``who`` answers from this node's own book, a follow seeds nothing,
    and nothing raises. Redis back, empty: the renewal writes this node's entries
    again within a lease."""
    caplog.set_level(logging.DEBUG, logger="actors.cluster_presence")
    async with open_redis(own_redis.url, timeout=0.3) as (redis, _):
        book = ClusterPresence(redis, lease=0.2)
        book.put("alice", Status.ONLINE, NOBODY)
        await until(lambda: own_redis.command("EXISTS", presence_key("alice")) == 1)
        await trio.to_thread.run_sync(own_redis.stop)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(book.run)
            found = await book.known_anywhere(["alice", "bob"], "carol")
            assert found == {"alice": PresenceState(user="alice", status=Status.ONLINE)}
            book.followed("bob", nursery)
            await until(lambda: "presence of 'bob' not seeded" in caplog.text)
            await until(lambda: "presence: renewal failed" in caplog.text)
            assert "presence: read failed" in caplog.text
            assert book.get("bob") is None
            await trio.to_thread.run_sync(own_redis.start)  # empty: no persistence
            await until(lambda: own_redis.command("EXISTS", presence_key("alice")) == 1)
            nursery.cancel_scope.cancel()
