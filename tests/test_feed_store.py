"""The feed part of the store contract (posts, likes, follows, interests), run against
every backend (the ``store`` fixture)."""

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import cbor2
import pytest

from actors.feed_cells import post_id
from protocol.cbor import Raw
from protocol.frames import Message
from storage.store import (
    BlockChanged,
    FeedProfile,
    Fence,
    FollowChanged,
    InterestsSet,
    LikeChanged,
    PostCreated,
    PostDeleted,
    Record,
    ShardSnapshot,
    Store,
    StoredPost,
    open_store,
)

SHARD = 8145


def made(number: int, ts: int = 1_000, shard: int = SHARD, **kw: object) -> PostCreated:
    fields: dict[str, object] = {
        "author": "alice",
        "cid": f"c{number}-{shard}",
        "lat": 48.8566,
        "lon": 2.3522,
        "category": "food",
        "text": f"post {number}",
    }
    fields.update(kw)
    return PostCreated(post=post_id(number, shard), ts=ts, **fields)  # type: ignore[arg-type]


def like(post: PostCreated, user: str, liked: bool = True, ts: int = 2_000) -> LikeChanged:
    return LikeChanged(post=post.post, user=user, liked=liked, ts=ts)


def comment(post: PostCreated, seq: int) -> Message:
    return Message(room=f"post:{post.post}", seq=seq, ts=3_000 + seq, user="bob", cid=f"k{seq}")


async def test_a_post_round_trips_with_every_field(store: Store) -> None:
    data = Raw(cbor2.dumps({"photo": b"\x00\xff", "tags": ["a", 1, 2.5, None]}))
    full = made(1, lat=0.1 + 0.2, lon=-122.41941550000001, text="hi é", data=data)
    bare = made(2, author="bob", lat=-89.999, lon=179.9999999999, text=None)
    await store.write_batch([full, bare])

    assert await store.load_post(full.post) == StoredPost(created=full)
    assert await store.load_post(bare.post) == StoredPost(created=bare)
    loaded = await store.find_post("alice", full.cid)
    assert loaded == full
    assert loaded is not None and loaded.data == data and loaded.lat == 0.30000000000000004
    assert await store.find_post("bob", bare.cid) == bare
    assert await store.load_shard(SHARD, 0) == ShardSnapshot(
        last_number=2, posts=(StoredPost(created=full), StoredPost(created=bare))
    )


async def test_a_shard_loads_its_recent_undeleted_posts_in_id_order(store: Store) -> None:
    old, kept, gone, late, newest = (made(n, ts) for n, ts in enumerate([10, 50, 60, 40, 70], 1))
    elsewhere = made(9, ts=100, shard=SHARD + 1)
    await store.write_batch([newest, old, elsewhere, late, kept, gone])
    await store.write_batch([PostDeleted(post=gone.post, ts=80)])

    snapshot = await store.load_shard(SHARD, since=40)
    assert snapshot.last_number == 5
    assert [p.created for p in snapshot.posts] == [kept, late, newest]
    assert [p.created for p in (await store.load_shard(SHARD, since=51)).posts] == [newest]
    assert (await store.load_shard(SHARD, since=71)).posts == ()
    assert await store.load_shard(SHARD + 1, since=0) == ShardSnapshot(
        last_number=9, posts=(StoredPost(created=elsewhere),)
    )
    assert await store.load_shard(SHARD + 2, since=0) == ShardSnapshot()


async def test_the_last_number_counts_old_and_deleted_posts(store: Store) -> None:
    first, second = made(1, ts=10), made(2, ts=20)
    await store.write_batch([first, second, PostDeleted(post=second.post, ts=30)])
    assert await store.load_shard(SHARD, since=15) == ShardSnapshot(last_number=2)
    assert await store.load_shard(SHARD, since=0) == ShardSnapshot(
        last_number=2, posts=(StoredPost(created=first),)
    )


async def test_likes_apply_in_order_within_and_across_batches(store: Store) -> None:
    a, b = made(1), made(2)
    await store.write_batch(
        [
            a,
            b,
            like(a, "u1"),
            like(a, "u1", False),
            like(a, "u1"),  # like, unlike, like: liked
            like(a, "u2"),
            like(a, "u2", False),  # like, unlike: not
            like(a, "u3"),
            like(a, "u3"),  # twice: once
            like(b, "u1"),
        ]
    )
    assert (await store.load_post(a.post)) == StoredPost(created=a, likers=frozenset({"u1", "u3"}))
    await store.write_batch([like(a, "u1", False), like(b, "u2"), like(a, "u2")])
    await store.write_batch([like(b, "u2", False), like(b, "u2")])

    snapshot = await store.load_shard(SHARD, since=0)
    assert [(p.created.post, p.likers) for p in snapshot.posts] == [
        (a.post, frozenset({"u2", "u3"})),
        (b.post, frozenset({"u1", "u2"})),
    ]


async def test_a_large_batch_of_likes(store: Store) -> None:
    post = made(1)
    likes: list[Record] = [like(post, f"u{i}") for i in range(2_000)]
    likes += [like(post, f"u{i}", False) for i in range(0, 2_000, 2)]
    await store.write_batch([post, *likes])
    stored = await store.load_post(post.post)
    assert stored is not None and stored.likers == {f"u{i}" for i in range(1, 2_000, 2)}


async def test_a_replayed_batch_changes_nothing(store: Store) -> None:
    a, b = made(1), made(2)
    batch: list[Record] = [
        a,
        b,
        like(a, "u1"),
        like(b, "u1"),
        like(b, "u1", False),
        PostDeleted(post=b.post, ts=5_000),
        FollowChanged(user="u1", author="alice", following=True, ts=1),
        InterestsSet(user="u1", categories=("food", "art"), ts=1),
    ]
    await store.write_batch(batch)
    await store.write_batch([like(a, "u2")])
    before = (await store.load_shard(SHARD, 0), await store.load_post(b.post))
    await store.write_batch(batch)
    after = (await store.load_shard(SHARD, 0), await store.load_post(b.post))
    assert before == after
    assert after[0] == ShardSnapshot(
        last_number=2, posts=(StoredPost(created=a, likers=frozenset({"u1", "u2"})),)
    )
    assert await store.load_feed_profile("u1") == FeedProfile(
        follows=frozenset({"alice"}), interests=frozenset({"food", "art"})
    )


async def test_an_author_posts_once_per_client_id(store: Store) -> None:
    first = made(1, cid="same")
    retry = made(2, cid="same", text="again")
    other = made(3, cid="same", author="bob")
    await store.write_batch([first, retry, other])
    assert await store.find_post("alice", "same") == first
    assert await store.find_post("bob", "same") == other
    assert await store.find_post("alice", "other") is None
    assert await store.load_post(retry.post) is None
    posts = (await store.load_shard(SHARD, 0)).posts
    assert [p.created for p in posts] == [first, other]


async def test_comments_count_the_messages_of_the_post_room(store: Store) -> None:
    a, b, c = made(1), made(2), made(3)
    await store.write_batch(
        [a, b, c, comment(a, 1), comment(a, 2), like(a, "u1"), comment(a, 3), comment(c, 1)]
    )
    # Not a post room: "post:<id>" with a longer id must not count.
    await store.write_batch([Message(room=f"post:{b.post}0", seq=7, ts=1, user="x", cid="x")])
    assert [p.comments for p in (await store.load_shard(SHARD, 0)).posts] == [3, 0, 1]
    assert await store.load_post(a.post) == StoredPost(
        created=a, likers=frozenset({"u1"}), comments=3
    )


async def test_deleted_and_unknown_posts(store: Store) -> None:
    post = made(1)
    await store.write_batch(
        [post, like(post, "u1"), comment(post, 1), PostDeleted(post=post.post, ts=9)]
    )
    await store.write_batch([PostDeleted(post=post.post, ts=10)])  # twice: still deleted
    assert await store.load_post(post.post) == StoredPost(
        created=post, likers=frozenset({"u1"}), comments=1, deleted=True
    )
    assert await store.find_post("alice", post.cid) == post
    assert await store.load_post(post_id(2, SHARD)) is None
    await store.write_batch([PostDeleted(post=post_id(5, SHARD), ts=1)])  # unknown: no-op
    assert await store.load_shard(SHARD, 0) == ShardSnapshot(last_number=1)


async def test_feed_profile(store: Store) -> None:
    assert await store.load_feed_profile("me") == FeedProfile()

    def follow(author: str, following: bool = True) -> FollowChanged:
        return FollowChanged(user="me", author=author, following=following, ts=1)

    def block(user: str, other: str, blocked: bool = True) -> BlockChanged:
        return BlockChanged(user=user, other=other, blocked=blocked, ts=1)

    await store.write_batch(
        [
            follow("a"),
            follow("b"),
            follow("c"),
            follow("c", False),
            InterestsSet(user="me", categories=("food", "art"), ts=1),
            InterestsSet(user="me", categories=("music", "art", "music"), ts=2),
            InterestsSet(user="you", categories=("sport",), ts=2),
            block("x", "me"),
            block("y", "me"),
            block("me", "z"),  # the other way: not in blocked_by
            FollowChanged(user="you", author="a", following=True, ts=1),
        ]
    )
    await store.write_batch([follow("a", False), block("y", "me", False), follow("d")])
    assert await store.load_feed_profile("me") == FeedProfile(
        follows=frozenset({"b", "d"}),
        interests=frozenset({"music", "art"}),
        blocked_by=frozenset({"x"}),
    )
    await store.write_batch([InterestsSet(user="me", categories=(), ts=3)])
    profile = await store.load_feed_profile("me")
    assert profile.interests == frozenset() and profile.follows == {"b", "d"}
    assert await store.load_feed_profile("you") == FeedProfile(
        follows=frozenset({"a"}), interests=frozenset({"sport"})
    )


@pytest.fixture
async def two_nodes(postgres_url: str) -> AsyncIterator[tuple[Store, Store]]:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_store(postgres_url))
        b = await stack.enter_async_context(open_store(postgres_url))
        yield a, b


async def test_a_stale_shard_owner_cannot_post(two_nodes: tuple[Store, Store]) -> None:
    a, b = two_nodes
    run_a = (await a.begin_run(shared=True)).run
    run_b = (await b.begin_run(shared=True)).run
    fence_a = Fence("feed", str(SHARD), (await a.claim("feed", str(SHARD), run_a)).token)
    first = made(1)
    assert await a.write_batch([first], [fence_a]) == frozenset()
    fence_b = Fence("feed", str(SHARD), (await b.claim("feed", str(SHARD), run_b)).token)

    stale_post = made(2)
    follow = FollowChanged(user="u", author="alice", following=True, ts=1)
    refused = await a.write_batch([stale_post, like(first, "u1"), follow], [fence_a, fence_a])
    assert refused == {fence_a}
    fresh = made(2, cid="fresh")
    assert await b.write_batch([fresh], [fence_b]) == frozenset()

    assert await b.find_post("alice", stale_post.cid) is None
    assert await b.load_shard(SHARD, 0) == ShardSnapshot(
        last_number=2, posts=(StoredPost(created=first), StoredPost(created=fresh))
    )
    assert (await b.load_feed_profile("u")).follows == {"alice"}  # unfenced: landed
