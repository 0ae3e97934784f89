"""protocol/ranking.py: the vectors of tests/feed_vectors.py, monotonicity, visibility."""

import math
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import ranking
from protocol.ranking import (
    EARTH_RADIUS_M,
    HALF_LIFE_MS,
    POPULARITY_NORM,
    Ranked,
    Viewer,
    brute_force_top,
    distance_m,
    freshness,
    geo,
    popularity,
    rank,
    score,
)
from tests.feed_vectors import VECTORS


@pytest.mark.parametrize("row", VECTORS, ids=lambda row: f"{row['function']}{row['args']}")
def test_vector(row: dict[str, Any]) -> None:
    function = getattr(ranking, row["function"])
    args = [tuple(a) if isinstance(a, list) else a for a in row["args"]]
    assert float(f"{function(*args):.12g}") == row["expected"]


def test_exact_values() -> None:
    assert freshness(HALF_LIFE_MS) == 0.5 and freshness(2 * HALF_LIFE_MS) == 0.25
    assert popularity(POPULARITY_NORM, 0) == 1.0
    assert geo(1234.5, 1234.5) == 0.0


def test_distance_agrees_with_the_law_of_cosines() -> None:
    # Paris to London by another formula: within a metre (it loses digits when short).
    p1, l1, p2, l2 = map(math.radians, (48.8566, 2.3522, 51.5074, -0.1278))
    cosine = math.sin(p1) * math.sin(p2) + math.cos(p1) * math.cos(p2) * math.cos(l2 - l1)
    assert (
        abs(distance_m(48.8566, 2.3522, 51.5074, -0.1278) - EARTH_RADIUS_M * math.acos(cosine)) < 1
    )


unit = st.floats(0, 1)


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 2e5), st.floats(0, 2e5), st.floats(1, 1e5))
def test_geo_falls_with_distance(a: float, b: float, radius: float) -> None:
    near, far = sorted((a, b))
    assert 1.0 >= geo(near, radius) >= geo(far, radius) >= 0.0


@settings(max_examples=300, deadline=None)
@given(st.integers(-(10**9), 10**10), st.integers(-(10**9), 10**10))
def test_freshness_falls_with_age(a: int, b: int) -> None:
    young, old = sorted((a, b))
    assert 1.0 >= freshness(young) >= freshness(old) >= 0.0


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 10**6))
def test_popularity_rises_with_the_count(likes: int, comments: int, more: int) -> None:
    assert 0.0 <= popularity(likes, comments) <= popularity(likes + more, comments) <= 1.0


@settings(max_examples=300, deadline=None)
@given(st.tuples(unit, unit, unit, unit, unit), st.integers(0, 4), unit)
def test_score_rises_with_each_part(parts: Any, i: int, other: float) -> None:
    higher = list(parts)
    higher[i] = max(parts[i], other)
    assert score(parts) <= score(tuple(higher))
    assert 0.0 <= score(parts) <= score((1.0, 1.0, 1.0, 1.0, 1.0))


@attrs.frozen
class Post:
    post: int
    author: str
    ts: int = 0
    lat: float = 0.0
    lon: float = 0.0
    category: str = "c"
    likes: int = 0
    comments: int = 0


def test_visibility_and_paging() -> None:
    viewer = Viewer(
        lat=0.0, lon=0.0, radius=1000.0, follows=frozenset({"b"}), hidden=frozenset({"h"})
    )
    posts = [
        Post(1, "me"),  # one's own posts are visible
        Post(2, "h"),  # hidden author
        Post(3, "a", lat=0.009),  # about 1001 m: beyond the radius
        Post(4, "b", lat=0.008),  # followed, 890 m
        Post(5, "a", ts=-HALF_LIFE_MS),  # the same score as 1 but for freshness
        Post(6, "a"),  # ties with 1: the lower id first
    ]
    assert rank(viewer, posts[1], 0) is None and rank(viewer, posts[2], 0) is None
    whole = brute_force_top(posts, viewer, 0, 10)
    assert [r.post for r in whole] == [1, 6, 5, 4]
    assert whole[0] == Ranked(1, score((1.0, 1.0, 0.0, 0.0, 0.0)), (1.0, 1.0, 0.0, 0.0, 0.0))
    assert brute_force_top(posts, viewer, 0, 2, after=(whole[0].score, 1)) == whole[1:3]
    assert brute_force_top(posts, viewer, 0, 0) == []
