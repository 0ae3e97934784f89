"""The feed ranking, exactly as PROTOCOL.md defines it: pure functions, no clock.

A post's score for a viewer at instant ``at`` (ms since the Unix epoch) is

    score = 0.4·geo + 0.25·freshness + 0.2·popularity + 0.1·subscription + 0.05·category

evaluated in IEEE double precision, left to right, by ``score``. Each component is in
[0, 1]. The server, the Python client, the benchmark and the tests share these, so a
client author can check the vectors in PROTOCOL.md against one reference.

Every component is monotone in its input (geo falls with distance, freshness with age,
popularity rises with the count), and float rounding is monotone too: a bound computed
with these functions from bounds of the inputs is a bound of the score. The threshold
algorithm of ``actors.feed_index`` relies on it.
"""

import math
from collections.abc import Iterable
from typing import Protocol

import attrs

WEIGHTS = (0.4, 0.25, 0.2, 0.1, 0.05)  # geo, freshness, popularity, subscription, category
EARTH_RADIUS_M = 6_371_008.8  # the mean radius (IUGG)
HALF_LIFE_MS = 6 * 3600 * 1000  # freshness halves every 6 hours
POPULARITY_NORM = 1000  # likes + comments at which popularity reaches 1
STEP_MS = 60_000  # the ranking instant advances in whole steps of this (``ranking_instant``)

Parts = tuple[float, float, float, float, float]


def ranking_instant(now_ms: int, step_ms: int = STEP_MS) -> int:
    """The instant a ranking is computed at: ``now`` rounded down to a whole step, so
    that scores change only at step boundaries or when a post's counts change."""
    return now_ms - now_ms % step_ms


def distance_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres (haversine, on a sphere of ``EARTH_RADIUS_M``)."""
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(min(1.0, h)))


def geo(distance: float, radius: float) -> float:
    """1 at the viewer's location, falling linearly to 0 at ``radius`` (metres). A post
    farther than the radius is not in the feed at all."""
    return max(0.0, 1.0 - distance / radius)


def freshness(age_ms: int) -> float:
    """1 for a post made at (or after) the ranking instant, halving every half-life."""
    return math.pow(2.0, -max(0, age_ms) / HALF_LIFE_MS)


def popularity(likes: int, comments: int) -> float:
    """log(1 + likes + comments) / log(1 + POPULARITY_NORM), capped at 1."""
    return min(1.0, math.log1p(likes + comments) / math.log1p(POPULARITY_NORM))


def score(parts: Parts) -> float:
    g, f, p, s, c = parts
    return 0.4 * g + 0.25 * f + 0.2 * p + 0.1 * s + 0.05 * c


def parts_of(
    *,
    distance: float,
    radius: float,
    age_ms: int,
    likes: int,
    comments: int,
    followed: bool,
    interesting: bool,
) -> Parts:
    return (
        geo(distance, radius),
        freshness(age_ms),
        popularity(likes, comments),
        1.0 if followed else 0.0,
        1.0 if interesting else 0.0,
    )


def rank_key(score_: float, post: int) -> tuple[float, int]:
    """Sort key of the ranking: higher score first; equal scores, lower post id first."""
    return (-score_, post)


@attrs.frozen
class Viewer:
    """What a ranking depends on besides the posts."""

    lat: float
    lon: float
    radius: float  # metres, 0 < radius <= actors.feed_cells.MAX_RADIUS_M
    follows: frozenset[str] = frozenset()  # authors the viewer follows
    interests: frozenset[str] = frozenset()  # categories
    hidden: frozenset[str] = frozenset()  # authors never shown (blocks, both ways)


@attrs.frozen
class Ranked:
    post: int
    score: float
    parts: Parts


class Rankable(Protocol):
    """What ranking a post reads of it."""

    @property
    def post(self) -> int: ...
    @property
    def author(self) -> str: ...
    @property
    def ts(self) -> int: ...
    @property
    def lat(self) -> float: ...
    @property
    def lon(self) -> float: ...
    @property
    def category(self) -> str: ...
    @property
    def likes(self) -> int: ...
    @property
    def comments(self) -> int: ...


def visible_parts(viewer: Viewer, post: Rankable, at: int) -> Parts | None:
    """The parts of ``post``'s score, or None if ``viewer`` does not see it: beyond the
    radius, or by a hidden author. A viewer's own posts are visible."""
    if post.author in viewer.hidden:
        return None
    distance = distance_m(viewer.lat, viewer.lon, post.lat, post.lon)
    if distance > viewer.radius:
        return None
    return parts_of(
        distance=distance,
        radius=viewer.radius,
        age_ms=at - post.ts,
        likes=post.likes,
        comments=post.comments,
        followed=post.author in viewer.follows,
        interesting=post.category in viewer.interests,
    )


def rank(viewer: Viewer, post: Rankable, at: int) -> Ranked | None:
    parts = visible_parts(viewer, post, at)
    return None if parts is None else Ranked(post.post, score(parts), parts)


def brute_force_top(
    posts: Iterable[Rankable],
    viewer: Viewer,
    at: int,
    k: int,
    after: tuple[float, int] | None = None,
) -> list[Ranked]:
    """The reference feed: the ``k`` best posts ``viewer`` sees at ``at``, by
    ``rank_key``; with ``after=(score, post)``, only those ranking strictly after it.
    Every post is scored: the index must give exactly this, faster."""
    ranked = [r for p in posts if (r := rank(viewer, p, at)) is not None]
    if after is not None:
        last = rank_key(*after)
        ranked = [r for r in ranked if rank_key(r.score, r.post) > last]
    ranked.sort(key=lambda r: rank_key(r.score, r.post))
    return ranked[: max(0, k)]
