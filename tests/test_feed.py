"""Live ranked feeds end to end: posts, likes, comments, follows, interests, views."""

import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.directory import ActorKind
from actors.feed_cells import cell_of
from protocol.client import ParleyClient, ServerError
from protocol.errors import ErrorCode
from protocol.feed import FeedView
from protocol.frames import FeedChanged, FeedItem, FeedOpen, Post
from protocol.ranking import distance_m, parts_of, rank_key, score
from tests.helpers import RunningServer, actor_crashes, memory_node, run_server

PARIS = (48.8566, 2.3522)
NEAR = (48.8600, 2.3500)  # about 400 m from PARIS
FAR = (48.9500, 2.3522)  # about 10 km from PARIS


async def changed(client: ParleyClient, view: FeedView, until: int | None = None) -> None:
    """Apply ``view``'s changes until its page holds ``until`` (or one change)."""
    with trio.fail_after(10):
        while True:
            event: FeedChanged = await client.next_event(FeedChanged)
            if event.view != view.number:
                continue
            view.apply(event)
            if until is None or until in event.posts:
                return


async def next_change_without(client: ParleyClient, view: FeedView, post: int) -> None:
    with trio.fail_after(10):
        while post in view.posts:
            event: FeedChanged = await client.next_event(FeedChanged)
            if event.view == view.number:
                view.apply(event)


def item(view: FeedView, post: int) -> FeedItem:
    return next(i for i in view.items if i.post == post)


async def test_a_post_is_acked_stored_and_ranked_with_its_parts(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        posted = await alice.post(*NEAR, "food", "croissants", data={"photo": 1})
        view = await bob.feed_open(*PARIS, 1000)
        assert view.posts == [posted.post]
        got = view.items[0]
        assert (got.user, got.text, got.category, got.likes, got.comments) == (
            "alice",
            "croissants",
            "food",
            0,
            0,
        )
        assert got.data == {"photo": 1} and got.ts == posted.ts
        expected = parts_of(
            distance=distance_m(*PARIS, *NEAR),
            radius=1000,
            age_ms=view.ts - posted.ts,
            likes=0,
            comments=0,
            followed=False,
            interesting=False,
        )
        assert got.parts == pytest.approx(expected, abs=1e-12)
        assert got.score == pytest.approx(score(expected), abs=1e-12)
        assert view.ts % 60_000 == 0  # the ranking instant: whole steps


async def test_a_retried_post_gets_the_original_back(tmp_path: Path) -> None:
    async with run_server(tmp_path) as server, server.client("alice") as alice:
        first = await alice.post(*NEAR, "news", "once", cid="c-1")
        again = await alice.post(*NEAR, "news", "once", cid="c-1")
        assert (again.post, again.ts) == (first.post, first.ts)
    async with run_server(tmp_path) as server, server.client("alice") as alice:
        retried = await alice.post(*NEAR, "news", "once", cid="c-1", retry=True)
        assert (retried.post, retried.ts) == (first.post, first.ts)
        again = await alice.post(*NEAR, "news", "once", cid="c-1")  # live in the shard
        assert again.post == first.post
        async with server.client("bob") as bob:
            view = await bob.feed_open(*PARIS, 5000)
            assert view.posts == [first.post]
        await alice.unpost(first.post)
        after = await alice.post(*FAR, "news", "once", cid="c-1")  # deleted: still named
        assert (after.post, after.ts) == (first.post, first.ts)
        # The same cid at once from two sessions and two places (two shards): one post.
        async with server.client("alice") as phone:
            got: list[Any] = []
            async with trio.open_nursery() as nursery:
                for client, place in ((alice, PARIS), (phone, (-33.8688, 151.2093))):
                    nursery.start_soon(
                        lambda c, p: _append(got, c.post(*p, "news", "x", cid="c-2")), client, place
                    )
            assert got[0].post == got[1].post


async def _append(out: list[Any], awaitable: Any) -> None:
    out.append(await awaitable)


async def test_likes_count_once_per_user_and_reach_open_views_live(
    server: RunningServer,
) -> None:
    async with (
        server.client("alice") as alice,
        server.client("bob") as bob,
        server.client("carol") as carol,
        server.client("carol") as carol_too,
    ):
        quiet = await alice.post(*NEAR, "music", "quiet")
        loud = await alice.post(*NEAR, "music", "loud")
        view = await carol.feed_open(*PARIS, 2000)
        assert view.posts == [quiet.post, loud.post]  # equal scores: the lower id first
        top = await carol_too.feed_open(*PARIS, 2000, limit=1)  # own session: own events
        assert top.posts == [quiet.post]
        await bob.like(quiet.post)
        await bob.like(quiet.post)  # idempotent
        await changed(carol, view)
        assert item(view, quiet.post).likes == 1
        assert view.posts[0] == quiet.post  # the liked post leads
        for user in ("dave", "erin", "frank"):  # a burst on the other one
            async with server.client(user) as fan:
                await fan.like(loud.post)
        with trio.fail_after(10):
            while item(view, loud.post).likes < 3:
                await changed(carol, view)
        assert view.posts == [loud.post, quiet.post]
        await changed(carol_too, top, until=loud.post)  # it entered a page it was not on
        assert top.posts == [loud.post]
        await bob.unlike(quiet.post)
        await bob.unlike(quiet.post)
        while item(view, quiet.post).likes:
            await changed(carol, view)


async def test_a_new_post_enters_an_open_view_and_a_deleted_one_leaves(
    server: RunningServer,
) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        view = await bob.feed_open(*PARIS, 1000, limit=5)
        assert view.posts == []
        posted = await alice.post(*NEAR, "events", "tonight")
        await changed(bob, view, until=posted.post)
        assert item(view, posted.post).text == "tonight"
        outside = await alice.post(*FAR, "events", "too far")  # beyond the radius
        await alice.unpost(posted.post)
        await next_change_without(bob, view, posted.post)
        assert outside.post not in view.posts
        with pytest.raises(ServerError) as refused:
            await alice.unpost(posted.post)
        assert refused.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(ServerError) as refused:
            await bob.like(posted.post)
        assert refused.value.code is ErrorCode.NOT_FOUND


async def test_follows_and_interests_reorder_the_page_live(server: RunningServer) -> None:
    async with (
        server.client("alice") as alice,
        server.client("bob") as bob,
        server.client("viewer") as viewer,
    ):
        a = await alice.post(*NEAR, "art", "by alice")
        b = await bob.post(*NEAR, "tech", "by bob")
        view = await viewer.feed_open(*PARIS, 1000)
        await viewer.follow("bob")
        await changed(viewer, view)
        assert view.posts[0] == b.post and item(view, b.post).parts[3] == 1.0
        await viewer.set_interests("art")
        await changed(viewer, view)
        assert item(view, a.post).parts[4] == 1.0
        await viewer.unfollow("bob")
        await changed(viewer, view)
        assert view.posts[0] == a.post and item(view, b.post).parts[3] == 0.0
        with pytest.raises(ServerError) as refused:
            await viewer.follow("viewer")
        assert refused.value.code is ErrorCode.INVALID


async def test_blocks_hide_posts_both_ways(server: RunningServer) -> None:
    async with (
        server.client("alice") as alice,
        server.client("bob") as bob,
        server.client("carol") as carol,
    ):
        by_alice = await alice.post(*NEAR, "news", "a")
        by_carol = await carol.post(*NEAR, "news", "c")
        view = await bob.feed_open(*PARIS, 1000)
        assert set(view.posts) == {by_alice.post, by_carol.post}
        await bob.block("alice")  # the viewer blocks the author
        await next_change_without(bob, view, by_alice.post)
        await carol.block("bob")  # the author blocks the viewer
        await next_change_without(bob, view, by_carol.post)
        fresh = await bob.feed_open(*PARIS, 1000)
        assert fresh.posts == []
        await bob.unblock("alice")
        await changed(bob, view, until=by_alice.post)
        await bob.block("alice")
    async with server.client("bob") as bob:  # a new session's first page hides them too
        assert (await bob.feed_open(*PARIS, 1000)).posts == []


async def test_comments_are_a_room_and_count_toward_popularity(server: RunningServer) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        posted = await alice.post(*NEAR, "food", "thoughts?")
        view = await alice.feed_open(*PARIS, 1000)
        room = f"post:{posted.post}"
        joined = await bob.join(room)
        assert joined.owner == "alice"
        await bob.send(room, "first!")
        with trio.fail_after(10):
            while item(view, posted.post).comments < 1:
                await changed(alice, view)
        await alice.join(room)
        page = await alice.history(room)
        assert [m.text for m in page.items] == ["first!"]
        with pytest.raises(ServerError) as refused:
            await bob.join("post:999999999")
        assert refused.value.code is ErrorCode.NOT_FOUND
        with pytest.raises(ServerError) as refused:
            await bob.create("post:1")
        assert refused.value.code is ErrorCode.INVALID


async def test_paging_reads_a_snapshot(server: RunningServer) -> None:
    async with (
        server.client("alice") as alice,
        server.client("bob") as bob,
        server.client("carol") as carol,
    ):
        # Nearer first: geo orders them (all made within the same ranking step).
        posts = [
            await alice.post(PARIS[0] + i * 0.001, PARIS[1], "other", f"p{i}") for i in range(7)
        ]
        by_carol = await carol.post(PARIS[0] + 0.0095, PARIS[1], "other", "c")  # ranks last
        view = await bob.feed_open(*PARIS, 2000, limit=3)
        first = await bob.feed_more(view.number, 0, limit=3)
        assert [i.post for i in first.items] == view.posts == [p.post for p in posts[:3]]
        assert first.more
        for fan in ("f1", "f2", "f3", "f4", "f5"):  # the last of page 2 would now lead
            async with server.client(fan) as f:
                await f.like(posts[5].post)
        second = await bob.feed_more(view.number, 3, limit=3)
        assert [i.post for i in second.items] == [p.post for p in posts[3:6]]
        assert second.items[2].likes == 0  # as it was when the snapshot was taken
        await alice.unpost(posts[6].post)
        await bob.block("carol")
        third = await bob.feed_more(view.number, 6, limit=3)
        assert third.items == () and not third.more  # deleted, blocked: left out
        assert by_carol.post not in [i.post for i in third.items]
        await bob.feed_close(view.number)
        with pytest.raises(ServerError) as refused:
            await bob.feed_more(view.number, 0)
        assert refused.value.code is ErrorCode.NOT_FOUND


def post(request: int, **fields: Any) -> Post:
    values: dict[str, Any] = {"lat": 0.0, "lon": 0.0, "category": "news", "text": "t"}
    values.update(fields)
    return Post(id=request, cid="x", **values)


async def test_bad_feed_requests_get_clear_errors(server: RunningServer) -> None:
    async with server.client("bob") as bob:
        cases = [
            (FeedOpen(id=1, lat=91.0, lon=0.0, radius=1000), ErrorCode.INVALID, "lat"),
            (FeedOpen(id=2, lat=0.0, lon=181.0, radius=1000), ErrorCode.INVALID, "lon"),
            (FeedOpen(id=3, lat=0.0, lon=0.0, radius=10**7), ErrorCode.INVALID, "radius"),
            (FeedOpen(id=4, lat=0.0, lon=0.0, radius=1000, limit=101), ErrorCode.INVALID, "limit"),
            (
                Post(id=5, cid="x", lat=0.0, lon=0.0, category="nope", text="t"),
                ErrorCode.INVALID,
                "category",
            ),
            (
                Post(id=6, cid="x", lat=-91.0, lon=0.0, category="news", text="t"),
                ErrorCode.INVALID,
                "lat",
            ),
            (Post(id=7, cid="x", lat=0.0, lon=0.0, category="news"), ErrorCode.INVALID, "text"),
        ]
        for frame, code, word in cases:
            with pytest.raises(ServerError) as refused:
                await bob.request(frame, FeedChanged)
            assert refused.value.code is code and word in refused.value.error.msg
            assert refused.value.error.id == frame.id  # type: ignore[attr-defined]
        with pytest.raises(ServerError) as refused:
            await bob.feed_open(88.0, 10.0, 100_000)  # near a pole: too many shards
        assert refused.value.code is ErrorCode.INVALID
        assert "radius must be at most 27243 m" in refused.value.error.msg
        await bob.feed_open(88.0, 10.0, 27243)
        with pytest.raises(ServerError) as refused:
            await bob.feed_open(90.0, 0.0, 100)
        assert "pole" in refused.value.error.msg
        await bob.feed_close(1)
        views = [await bob.feed_open(0.0, 0.0, 1000) for _ in range(4)]
        with pytest.raises(ServerError) as refused:
            await bob.feed_open(0.0, 0.0, 1000)
        assert refused.value.code is ErrorCode.TOO_MANY_VIEWS
        await bob.feed_close(views[0].number)
        await bob.feed_open(0.0, 0.0, 1000)
        with pytest.raises(ServerError) as refused:
            await bob.like(12345)  # no post can have this id
        assert refused.value.code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_restarted_node_rebuilds_the_same_ranking(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    step: dict[str, Any] = {"feed_step": 86400.0}  # one ranking instant (unless midnight)
    if backend == "postgres":
        step["database_url"] = request.getfixturevalue("postgres_url")
    async with run_server(tmp_path, **step) as server, server.client("alice") as alice:
        async with server.client("bob") as bob:
            posts = [await alice.post(*NEAR, "sports", f"p{i}") for i in range(5)]
            await bob.like(posts[3].post)
            await bob.follow("alice")
            async with server.client("carol") as carol:
                await carol.like(posts[1].post)
                await carol.like(posts[3].post)
            before = await bob.feed_open(*PARIS, 1000)
    async with run_server(tmp_path, **step) as server, server.client("bob") as bob:
        after = await bob.feed_open(*PARIS, 1000)
        if after.ts == before.ts:
            assert after.items == before.items
        assert after.posts[:2] == [posts[3].post, posts[1].post]
        assert item(after, posts[3].post).likes == 2 and item(after, posts[3].post).parts[3] == 1


# --- the live page is the brute-force ranking ---------------------------------------------


def brute_force(
    posts: dict[int, tuple[str, int, float, float, str]],
    likes: dict[int, set[str]],
    center: tuple[float, float],
    radius: int,
    follows: set[str],
    interests: set[str],
    hidden: set[str],
    at: int,
    k: int,
) -> list[tuple[int, float]]:
    ranked = []
    for post, (author, ts, lat, lon, category) in posts.items():
        d = distance_m(*center, lat, lon)
        if d > radius or author in hidden:
            continue
        parts = parts_of(
            distance=d,
            radius=radius,
            age_ms=at - ts,
            likes=len(likes.get(post, ())),
            comments=0,
            followed=author in follows,
            interesting=category in interests,
        )
        ranked.append((post, score(parts)))
    ranked.sort(key=lambda r: rank_key(r[1], r[0]))
    return ranked[:k]


AUTHORS = ("a0", "a1", "a2", "a3")
FANS = ("f0", "f1", "f2")
CATEGORIES = ("art", "food", "news")
# On a cell boundary (longitude 2.0): a view near it merges two shards.
CENTER = (48.85, 2.0)
# On the antimeridian: posts on both sides, in two shards at the two ends of the grid.
FIJI = (-16.5, 179.99)

post_op = st.tuples(
    st.just("post"),
    st.sampled_from(AUTHORS),
    st.integers(-200, 200),  # offsets in 1e-4 degrees: up to 2.2 km
    st.integers(-200, 200),
    st.sampled_from(CATEGORIES),
)
op = st.one_of(
    post_op,
    post_op,
    st.tuples(st.sampled_from(("like", "unlike")), st.sampled_from(FANS), st.integers(0, 30)),
    st.tuples(
        st.sampled_from(("follow", "unfollow", "block", "unblock")), st.sampled_from(AUTHORS)
    ),
    st.tuples(st.just("delete"), st.integers(0, 30)),
    st.tuples(st.just("interests"), st.sets(st.sampled_from(CATEGORIES))),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ops=st.lists(op, min_size=8, max_size=40),
    k=st.integers(1, 5),
    radius=st.integers(500, 2500),
    open_first=st.booleans(),
    center=st.sampled_from([CENTER, FIJI]),
)
def test_the_live_page_is_the_brute_force_ranking(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[Any, ...]],
    k: int,
    radius: int,
    open_first: bool,
    center: tuple[float, float],
) -> None:
    path = tmp_path_factory.mktemp("live")
    trio.run(_live_page_scenario, path, ops, k, radius, open_first, center)


async def _live_page_scenario(
    path: Path,
    ops: list[tuple[Any, ...]],
    k: int,
    radius: int,
    open_first: bool,
    center: tuple[float, float],
) -> None:
    posts: dict[int, tuple[str, int, float, float, str]] = {}
    made: list[int] = []
    likes: dict[int, set[str]] = {}
    follows: set[str] = set()
    interests: set[str] = set()
    blocked: set[str] = set()
    async with run_server(path, feed_interval=0.02) as server, AsyncExitStack() as stack:
        clients = {
            user: await stack.enter_async_context(server.client(user))
            for user in (*AUTHORS, *FANS, "viewer")
        }
        viewer = clients["viewer"]
        view = await viewer.feed_open(*center, radius, limit=k) if open_first else None
        for o in ops:
            kind = o[0]
            if kind == "post":
                _, author, dlat, dlon, category = o
                lat, lon = center[0] + dlat / 1e4, center[1] + dlon / 1e4
                lon = lon - 360 if lon > 180 else lon
                p = await clients[author].post(lat, lon, category, "t")
                posts[p.post] = (author, p.ts, lat, lon, category)
                made.append(p.post)
            elif kind in ("like", "unlike") and made:
                post = made[o[2] % len(made)]
                try:
                    if kind == "like":
                        await clients[o[1]].like(post)
                        likes.setdefault(post, set()).add(o[1])
                    else:
                        await clients[o[1]].unlike(post)
                        likes.get(post, set()).discard(o[1])
                except ServerError as exc:
                    assert exc.code is ErrorCode.NOT_FOUND and post not in posts
            elif kind == "delete" and made:
                post = made[o[1] % len(made)]
                if post in posts:
                    await clients[posts.pop(post)[0]].unpost(post)
            elif kind in ("follow", "unfollow"):
                await (viewer.follow if kind == "follow" else viewer.unfollow)(o[1])
                (follows.add if kind == "follow" else follows.discard)(o[1])
            elif kind in ("block", "unblock"):
                await (viewer.block if kind == "block" else viewer.unblock)(o[1])
                (blocked.add if kind == "block" else blocked.discard)(o[1])
            elif kind == "interests":
                await viewer.set_interests(*sorted(o[1]))
                interests.clear()
                interests.update(o[1])
        if view is None:
            view = await viewer.feed_open(*center, radius, limit=k)

        def expected(at: int) -> list[tuple[int, float]]:
            return brute_force(posts, likes, center, radius, follows, interests, blocked, at, k)

        # Every change is acked: the view comes to the ranking, and stays there.
        with trio.fail_after(10):
            while [(i.post, i.score) for i in view.items] != expected(view.ts):
                event = await viewer.next_event(FeedChanged)
                view.apply(event)
        for i in view.items:
            assert i.likes == len(likes.get(i.post, ()))


async def test_the_admin_api_lists_shards_and_metrics_count_per_shard(
    server: RunningServer,
) -> None:
    async with server.client("alice") as alice, server.client("bob") as bob:
        for i in range(3):
            await alice.post(*NEAR, "news", f"p{i}")
        await alice.post(-33.8688, 151.2093, "news", "sydney")
        await bob.feed_open(*PARIS, 1000)
        async with server.http() as http:
            shards = (await http.get("/admin/feeds")).json()["shards"]
            metrics = (await http.get("/metrics")).text
            made = await http.post("/admin/rooms", json={"room": "post:16384"})
    paris = shards[0]
    assert (paris["posts"], paris["views"], paris["queries"]) == (3, 1, 1)
    assert paris["south"] <= PARIS[0] < paris["north"] and paris["west"] <= PARIS[1] < paris["east"]
    assert [s["posts"] for s in shards[1:]] == [1]
    assert f'parley_feed_shard_posts{{shard="{paris["shard"]}"}} 3.0' in metrics
    assert "parley_feed_posts_total 4.0" in metrics
    assert made.status_code == 400


async def test_posts_beyond_the_horizon_leave_the_feeds_but_not_storage(tmp_path: Path) -> None:
    async with run_server(tmp_path) as server, server.client("alice") as alice:
        old = await alice.post(*NEAR, "news", "old news")
    # A node whose horizon is a millisecond: the post is older than that.
    async with run_server(tmp_path, feed_horizon=0.001) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            view = await bob.feed_open(*PARIS, 1000)
            assert view.posts == []
            await bob.like(old.post)  # stored, not counted live
            await bob.like(old.post)
            with pytest.raises(ServerError) as refused:
                await bob.unpost(old.post)
            assert refused.value.code is ErrorCode.FORBIDDEN
            await alice.unpost(old.post)
            with pytest.raises(ServerError) as refused:
                await bob.like(old.post)
            assert refused.value.code is ErrorCode.NOT_FOUND
    async with run_server(tmp_path) as server, server.client("bob") as bob:
        assert (await bob.feed_open(*PARIS, 1000)).posts == []  # deleted for good


async def test_follows_are_bounded_and_others_posts_are_not_yours_to_delete(
    tmp_path: Path,
) -> None:
    async with run_server(tmp_path, max_follows=2) as server:
        async with server.client("alice") as alice, server.client("bob") as bob:
            await bob.follow("x")
            await bob.follow("y")
            await bob.follow("y")  # already: no quota spent
            with pytest.raises(ServerError) as refused:
                await bob.follow("z")
            assert refused.value.code is ErrorCode.QUOTA_EXCEEDED
            await bob.unfollow("x")
            await bob.follow("z")
            posted = await alice.post(*NEAR, "art", "mine")
            with pytest.raises(ServerError) as refused:
                await bob.unpost(posted.post)
            assert refused.value.code is ErrorCode.FORBIDDEN


async def test_the_horizon_sweep_takes_old_posts_out_of_open_views(
    tmp_path: Path, mock_clock: trio.testing.MockClock
) -> None:
    """Virtual time that moves only when the test says (storage works in threads)."""
    async with (
        memory_node(tmp_path, feed_horizon=0.001, feed_step=86400.0, ping_interval=1e6) as mem,
        mem.client("alice") as alice,
        mem.client("bob") as bob,
    ):
        posted = await alice.post(*NEAR, "news", "soon old")
        view = await bob.feed_open(*PARIS, 1000)
        assert view.posts == [posted.post]  # live until the next sweep
        await trio.to_thread.run_sync(time.sleep, 0.005)  # older than the horizon
        mock_clock.jump(61)  # a sweep runs every minute
        mock_clock.autojump_threshold = 0  # from here a wait that hangs times out
        await next_change_without(bob, view, posted.post)
        shards = mem.node.directory.actors(ActorKind.FEED)
        assert [len(s.index) for s in shards] == [0]


async def test_an_id_of_no_post_starts_no_shard(server: RunningServer) -> None:
    async with server.client("mallory") as mallory:
        for cell in (100, 2000, 9000):  # valid cells, never posted in
            fake = 7 * 16384 + cell
            for request in (mallory.like(fake), mallory.unpost(fake), mallory.join(f"post:{fake}")):
                with pytest.raises(ServerError) as refused:
                    await request
                assert refused.value.code is ErrorCode.NOT_FOUND
        assert list(server.node.directory.actors(ActorKind.FEED)) == []


async def test_a_crashed_profile_keeps_the_views_it_tells(server: RunningServer) -> None:
    """A bug crashes the viewer's Profile actor while a feed view of theirs is open. Its
    successor keeps the profile and whom to tell: a later unfollow still re-ranks the
    open view live."""
    async with server.client("bob") as bob, server.client("viewer") as viewer:
        b = await bob.post(*NEAR, "tech", "by bob")
        view = await viewer.feed_open(*PARIS, 1000)
        await viewer.follow("bob")
        await changed(viewer, view)
        assert item(view, b.post).parts[3] == 1.0
        server.node.directory.ref(ActorKind.PROFILE, "viewer").send_nowait(object())  # a bug
        await viewer.unfollow("bob")
        await changed(viewer, view)
        assert item(view, b.post).parts[3] == 0.0
        assert actor_crashes(server.node, "profile") == 1.0


async def test_a_crashed_shard_keeps_its_posts_views_and_cids(server: RunningServer) -> None:
    """A bug crashes a feed shard while a view watches it. Its successor keeps the views
    it was telling: a new post enters the open view live (a successor that reloaded from
    storage would not know the view). The post, its like and its cid are stored already,
    so they stay right either way: this checks the successor serves them, not that it
    inherited them."""
    async with server.client("alice") as alice, server.client("bob") as bob:
        first = await alice.post(*NEAR, "events", "tonight", cid="c-1")
        view = await bob.feed_open(*PARIS, 1000)
        assert view.posts == [first.post]
        await bob.like(first.post)
        await changed(bob, view)
        shard = str(cell_of(*NEAR))
        server.node.directory.ref(ActorKind.FEED, shard).send_nowait(object())  # a bug
        again = await alice.post(*NEAR, "events", "tonight", cid="c-1")
        assert (again.post, again.ts) == (first.post, first.ts)
        await bob.like(first.post)  # liked already: no second like
        second = await alice.post(*NEAR, "events", "tomorrow", cid="c-2")
        await changed(bob, view, until=second.post)
        assert item(view, first.post).likes == 1
        assert actor_crashes(server.node, "feed") == 1.0


@pytest.mark.parametrize(
    ("viewer", "radius", "near", "other_side", "outside"),
    [
        # Fiji, on the antimeridian: the other side is at -179.99, and 7.5 km away is
        # beyond the 5 km radius though within any box around it. It failed live before
        # the box took every longitude there.
        ((-16.5, 179.99), 5_000, (-16.5, 179.995), (-16.5, -179.99), (-16.5, -179.94)),
        # The far north: a view of more tiles than the shard follows one by one; the last
        # post is 105 km away, beyond the 100 km radius but within the view's box.
        ((82.5, 10.0), 100_000, (82.5, 10.5), (82.5, 15.0), (82.5, 17.2)),
    ],
)
async def test_views_at_the_edges_of_the_map_see_new_posts_live(
    server: RunningServer,
    viewer: tuple[float, float],
    radius: int,
    near: tuple[float, float],
    other_side: tuple[float, float],
    outside: tuple[float, float],
) -> None:
    """A view whose circle crosses the antimeridian, or spans more longitude than the
    shard's tiles follow one by one, still gets each new post within it live, from
    either side, and not one just beyond its radius."""
    assert distance_m(*viewer, *outside) > radius > distance_m(*viewer, *other_side)
    async with server.client("alice") as alice, server.client("bob") as bob:
        view = await bob.feed_open(*viewer, radius)
        here = await alice.post(*near, "news", "here")
        await changed(bob, view, until=here.post)
        there = await alice.post(*other_side, "news", "across")
        await changed(bob, view, until=there.post)
        beyond = await alice.post(*outside, "news", "just beyond")
        await alice.like(there.post)  # a change after that post: it would come first
        await changed(bob, view)
        assert sorted(view.posts) == sorted([here.post, there.post])
        assert beyond.post not in view.posts
