"""actors/feed_index.py: top-k equals the brute force exactly, under any updates."""

import math
import random
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.feed_grid import grid_key, lower_bound, point_lower_bound
from actors.feed_index import FeedIndex, LivePost, Viewer, brute_force_top
from protocol.ranking import distance_m

HOUR = 3_600_000
AUTHORS = ["ann", "bob", "cy", "dee", "eve"]
CATEGORIES = ["music", "food", "news"]
# Where the tests put posts: a city, the antimeridian, near a pole.
CENTRES = [(41.0, -3.0), (-33.9, 151.2), (1.0, 179.95), (89.2, 0.0)]

offsets = st.one_of(st.sampled_from([0.0, 0.001, -0.02]), st.floats(-0.6, 0.6))


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[FeedIndex, list[Viewer], int, int]:
    lat0, lon0 = draw(st.sampled_from(CENTRES))

    def place() -> tuple[float, float]:
        lat = max(-90.0, min(90.0, lat0 + draw(offsets)))
        lon = (lon0 + draw(offsets) + 180) % 360 - 180
        return lat, lon

    index = FeedIndex(draw(st.sampled_from([(2,), (16, 64), (1, 8, 32, 64)])))
    for number in range(draw(st.integers(0, 40))):
        lat, lon = place()
        index.add(
            LivePost(
                post=number * 16384 + 7,
                author=draw(st.sampled_from(AUTHORS)),
                cid=f"c{number}",
                ts=draw(st.sampled_from([0, HOUR]) | st.integers(0, 48 * HOUR)),
                lat=lat,
                lon=lon,
                category=draw(st.sampled_from(CATEGORIES)),
                comments=draw(st.sampled_from([0, 0, 2, 40, 2000])),
            )
        )
    ids = [p.post for p in index] or [7]
    for _ in range(draw(st.integers(0, 60))):
        op = draw(st.sampled_from(["like", "like", "unlike", "comments", "remove", "evict"]))
        post, user = draw(st.sampled_from(ids)), draw(st.sampled_from(AUTHORS))
        if op == "like":
            index.like(post, user)
        elif op == "unlike":
            index.unlike(post, user)
        elif op == "comments":
            index.set_comments(post, draw(st.integers(0, 3000)))
        elif op == "remove":
            index.remove(post)
        else:
            index.evict_older_than(draw(st.integers(0, 10 * HOUR)))
    people = st.frozensets(st.sampled_from(AUTHORS), max_size=3)
    viewers = []
    for _ in range(3):
        lat, lon = place()
        viewers.append(
            Viewer(
                lat=lat,
                lon=lon,
                radius=draw(st.sampled_from([100.0, 5000.0, 100_000.0]) | st.floats(1.0, 1e5)),
                follows=draw(people),
                interests=draw(st.frozensets(st.sampled_from(CATEGORIES), max_size=2)),
                hidden=draw(people),
            )
        )
    return index, viewers, draw(st.integers(-HOUR, 50 * HOUR)), draw(st.integers(1, 8))


@settings(max_examples=300, deadline=None)
@given(scenarios())
def test_top_and_paging_equal_the_brute_force(scenario: Any) -> None:
    index, viewers, at, k = scenario
    for viewer in viewers:
        assert index.top(viewer, at, k) == brute_force_top(index, viewer, at, k)
        everything = brute_force_top(index, viewer, at, len(index))
        walked, after = [], None
        while page := index.top(viewer, at, k, after):
            walked += page
            after = (page[-1].score, page[-1].post)
        assert walked == everything


@settings(max_examples=2000, deadline=None)
@given(
    st.floats(-90, 90),
    st.floats(-180, 180),
    st.one_of(st.floats(-0.5, 0.5), st.integers(-8, 8).map(lambda n: n / 16)),
    st.one_of(st.floats(-0.5, 0.5), st.integers(-8, 8).map(lambda n: n / 16), st.floats(-180, 180)),
    st.sampled_from([1, 2, 16, 64]),
)
def test_the_distance_lower_bound_never_exceeds_the_distance(
    lat: float, lon: float, dlat: float, dlon: float, scale: int
) -> None:
    lat2 = max(-90.0, min(90.0, lat + dlat))
    lon2 = (lon + dlon + 180) % 360 - 180
    distance = distance_m(lat, lon, lat2, lon2)
    assert lower_bound(lat, lon, grid_key(lat2, lon2, scale), scale) <= distance
    assert point_lower_bound(lat, math.cos(math.radians(lat)), lon, lat2, lon2) <= distance


def clustered(n: int, seed: int) -> tuple[FeedIndex, random.Random]:
    """``n`` posts around three towns of one shard's cell, over a week."""
    rng = random.Random(seed)
    towns = [(40.42, -3.70, 0.08), (41.1, -2.4, 0.04), (40.6, -3.2, 0.03)]
    index = FeedIndex()
    for number in range(1, n + 1):
        lat, lon, spread = rng.choices(towns, weights=[6, 3, 1])[0]
        index.add(
            LivePost(
                post=number * 16384 + 7,
                author=f"u{int(rng.paretovariate(1.0)) % 300}",
                cid=str(number),
                ts=rng.randrange(168 * HOUR),
                lat=rng.gauss(lat, spread),
                lon=rng.gauss(lon, spread),
                category=f"k{int(rng.paretovariate(1.0)) % 50}",
                comments=int(rng.paretovariate(1.2)) - 1,
            )
        )
    return index, rng


def test_top_reads_a_small_part_of_a_large_index() -> None:
    index, rng = clustered(20_000, seed=14)
    at = 168 * HOUR
    for _ in range(30):
        post = index.get(rng.randrange(1, 20_001) * 16384 + 7)
        assert post is not None
        viewer = Viewer(
            lat=post.lat,
            lon=post.lon,
            radius=rng.uniform(5000, 50_000),
            follows=frozenset(f"u{rng.randrange(300)}" for _ in range(20)),
            interests=frozenset({"k1", "k7"}),
        )
        top = index.top(viewer, at, 20)
        assert top == brute_force_top(index, viewer, at, 20)
        assert index.examined < 0.01 * len(index)  # scored
        assert index.seen < 0.1 * len(index)  # read
