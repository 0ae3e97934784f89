"""A feed shard's live posts, and the exact top-k of a viewer's ranking over them.

Pure: no I/O, no clock. The FeedShard actor calls it on its event loop, so a ranking
must not score every post. Posts are kept in lists, each with an upper bound of the
score of any post still unread in it, for one viewer at one instant; ``top`` reads
the list of the highest bound, newest post first, and stops once the k-th best post
scored ranks strictly before every bound left: a best-first branch and bound, which is
Fagin's threshold algorithm with lists that each bound every component at once.

The lists: posts are binned in grid cells (``actors.feed_grid``), several grids from
coarse to fine, and a ranking reads the one that suits its radius; in a cell, posts
are in lists by popularity tier (likes + comments between ``2^t - 1`` and
``2^(t+1) - 2``), sorted by time. A list's bound is the weighted sum of: ``geo`` of a
lower bound of the distance to its cell, the freshness of its next post (rounded to a
whole minute of age, up), the popularity of its tier's largest count, and 1 for
subscription and category if the viewer follows anyone, has interests. Every component
is monotone and rounding is monotone (``protocol.ranking``), so no unread post scores
above the bound; with the strict test, equal scores ordered by post id are safe too. A
cell is opened into its lists when its own bound (its newest post, its top tier) comes
first. Only cells whose distance bound is within the radius are looked at: every
visible post is in one. Before a post is scored, its own bound (a cheap distance
bound, whether it is followed, interesting) often shows that it cannot make the top k.

Why not global lists by time, popularity, author, category: in a shard's 2° cell they
are mostly posts beyond a 5 to 50 km radius, and the geo bound of unread posts stays
high until the geo list ends. Lists of followed authors' and interesting posts per
cell were tried: fewer posts scored, but opening a cell cost more than they saved.
``loadtests/feedindexbench.py`` measures this design.
"""

import bisect
import heapq
import math
from collections.abc import Iterator
from operator import attrgetter

import attrs

from actors.feed_grid import Key, grid_key, point_lower_bound, within
from protocol.ranking import (
    Parts,
    Ranked,
    Viewer,
    brute_force_top,
    freshness,
    geo,
    popularity,
    rank_key,
    score,
    visible_parts,
)
from protocol.ranking import rank as rank_post

__all__ = ["GRID_SCALES", "FeedIndex", "LivePost", "Ranked", "Viewer", "brute_force_top"]

# Grids of 1/8 to 1/64 degree (1/64: 1.7 km north-south, 1.2 km east-west at 45°). A
# ranking reads the finest grid whose scale times the radius (m) is at most
# SCALE_RADIUS, about 11 cells across the circle: a finer grid bounds distances more
# tightly, so fewer posts are read, but has more cells to bound (measured).
GRID_SCALES = (8, 16, 32, 64)
SCALE_RADIUS = 600_000
TOP_TIER = 10  # counts from 2^10 - 1 share a tier: popularity is 1 from 1000
_POP_BOUND = (*(popularity(2 ** (t + 1) - 2, 0) for t in range(TOP_TIER)), 1.0)
# freshness of whole minutes: bounds of the freshness of any age within the minute,
# without a pow per bound.
_MINUTE = 60_000
_FRESH = [freshness(m * _MINUTE) for m in range(7 * 24 * 60)]
_FRESH_MS = len(_FRESH) * _MINUTE
# A bound is summed here, not by ``score``, to save a call per post read; ``score``'s
# own weights, and a margin far above the few ulps the order of the sum can change.
_WG, _WF, _WP, _WS, _WC = (
    score(unit)
    for unit in (
        (1, 0, 0, 0, 0),
        (0, 1, 0, 0, 0),
        (0, 0, 1, 0, 0),
        (0, 0, 0, 1, 0),
        (0, 0, 0, 0, 1),
    )
)
_MARGIN = 1e-12

_order = attrgetter("ts", "post")
_ts = attrgetter("ts")


def fresh_bound(age: int) -> float:
    """``freshness(age)``, or a little more."""
    minutes = max(0, age) // _MINUTE
    return _FRESH[minutes] if minutes < len(_FRESH) else freshness(minutes * _MINUTE)


@attrs.define(slots=True, eq=False)
class LivePost:
    """A live post; the counts change, the rest is fixed."""

    post: int
    author: str
    cid: str
    ts: int  # ms since epoch
    lat: float
    lon: float
    category: str
    text: str | None = None
    data: object = None  # a protocol.cbor.Raw or None; opaque to the index
    likers: set[str] = attrs.field(factory=set)
    comments: int = 0

    @property
    def likes(self) -> int:
        return len(self.likers)

    @property
    def count(self) -> int:
        return len(self.likers) + self.comments


def tier(count: int) -> int:
    return min(TOP_TIER, (count + 1).bit_length() - 1)


@attrs.define(slots=True, eq=False)
class _Cell:
    """One grid cell's posts by popularity tier, each list ascending by (ts, post)."""

    tiers: dict[int, list[LivePost]] = attrs.field(factory=dict)
    newest: int = 0  # the largest ts of its posts, and their highest tier: its bound
    top: int = 0

    def put(self, live: LivePost, t: int) -> None:
        bisect.insort(self.tiers.setdefault(t, []), live, key=_order)
        self.newest = max(self.newest, live.ts)
        self.top = max(self.top, t)

    def take(self, live: LivePost, t: int) -> None:
        posts = self.tiers[t]
        i = bisect.bisect_left(posts, _order(live), key=_order)
        assert posts[i] is live
        del posts[i]
        if not posts:
            del self.tiers[t]
        self._refresh()

    def cut(self, ts: int) -> list[LivePost]:
        """Remove and return the posts made before ``ts``."""
        cut: list[LivePost] = []
        for t, posts in list(self.tiers.items()):
            end = bisect.bisect_left(posts, ts, key=_ts)
            cut += posts[:end]
            del posts[:end]
            if not posts:
                del self.tiers[t]
        self._refresh()
        return cut

    def _refresh(self) -> None:
        if self.tiers:
            self.newest = max(posts[-1].ts for posts in self.tiers.values())
            self.top = max(self.tiers)


# A list being read: (-bound, tie, posts or a cell, index of the next post or -1 for an
# unopened cell, the base of its bound, its geo bound).
_Entry = tuple[float, int, object, int, float, float]


class _Grid:
    """The posts in cells of ``1/scale`` degree."""

    def __init__(self, scale: int) -> None:
        self.scale = scale
        self.cells: dict[Key, _Cell] = {}

    def put(self, live: LivePost, t: int) -> None:
        key = grid_key(live.lat, live.lon, self.scale)
        cell = self.cells.get(key)
        if cell is None:
            cell = self.cells[key] = _Cell(newest=live.ts)
        cell.put(live, t)

    def take(self, live: LivePost, t: int) -> None:
        key = grid_key(live.lat, live.lon, self.scale)
        cell = self.cells[key]
        cell.take(live, t)
        if not cell.tiers:
            del self.cells[key]

    def cut(self, ts: int) -> list[LivePost]:
        cut: list[LivePost] = []
        for key, cell in list(self.cells.items()):
            cut += cell.cut(ts)
            if not cell.tiers:
                del self.cells[key]
        return cut

    def reachable(self, viewer: Viewer) -> Iterator[tuple[float, _Cell]]:
        """``(geo bound, cell)`` of every cell whose distance bound is within the
        radius."""
        rows, columns = within(viewer.lat, viewer.lon, viewer.radius, self.scale)
        radius = viewer.radius
        if len(rows) * len(columns) <= len(self.cells):
            for row, row_bound in rows.items():
                for column, column_bound in columns.items():
                    cell = self.cells.get((row, column))
                    if cell is not None:
                        yield geo(max(row_bound, column_bound), radius), cell
        else:  # few posts, or a pole within reach
            for (row, column), cell in self.cells.items():
                if row in rows and column in columns:
                    yield geo(max(rows[row], columns[column]), radius), cell


class FeedIndex:
    """One shard's live posts by id and in lists (module docstring)."""

    def __init__(self, scales: tuple[int, ...] = GRID_SCALES) -> None:
        self.examined = 0  # posts whose score the last ``top`` computed
        self.seen = 0  # posts it read, visible or not
        self._posts: dict[int, LivePost] = {}
        self._grids = sorted((_Grid(scale) for scale in scales), key=lambda grid: grid.scale)

    def __len__(self) -> int:
        return len(self._posts)

    def __iter__(self) -> Iterator[LivePost]:
        return iter(self._posts.values())

    def get(self, post: int) -> LivePost | None:
        return self._posts.get(post)

    def add(self, post: LivePost) -> None:
        """Add ``post``, replacing one of the same id."""
        self.remove(post.post)
        self._posts[post.post] = post
        for grid in self._grids:
            grid.put(post, tier(post.count))

    def remove(self, post: int) -> LivePost | None:
        live = self._posts.pop(post, None)
        if live is not None:
            for grid in self._grids:
                grid.take(live, tier(live.count))
        return live

    def like(self, post: int, user: str) -> bool:
        live = self._posts.get(post)
        if live is None or user in live.likers:
            return False
        was = live.count
        live.likers.add(user)
        self._retier(live, was)
        return True

    def unlike(self, post: int, user: str) -> bool:
        live = self._posts.get(post)
        if live is None or user not in live.likers:
            return False
        was = live.count
        live.likers.remove(user)
        self._retier(live, was)
        return True

    def set_comments(self, post: int, comments: int) -> bool:
        """Raise the comment count (a room's highest seq: never lowered, so a late
        report cannot undo a newer one)."""
        live = self._posts.get(post)
        if live is None or comments <= live.comments:
            return False
        was = live.count
        live.comments = comments
        self._retier(live, was)
        return True

    def evict_older_than(self, ts: int) -> list[LivePost]:
        """Remove and return the posts made before ``ts``."""
        cuts = [grid.cut(ts) for grid in self._grids]  # each holds every post
        evicted = cuts[0]
        for live in evicted:
            del self._posts[live.post]
        return evicted

    def rank(self, viewer: Viewer, post: LivePost, at: int) -> Ranked | None:
        """``post``'s place in ``viewer``'s ranking at ``at``; None if not visible."""
        return rank_post(viewer, post, at)

    def top(
        self, viewer: Viewer, at: int, k: int, after: tuple[float, int] | None = None
    ) -> list[Ranked]:
        """Exactly ``brute_force_top(self, viewer, at, k, after)``: the ``k`` best posts
        ``viewer`` sees at ``at`` (ms), by ``rank_key``; with ``after=(score, post)``,
        only those ranking strictly after that key (keyset paging)."""
        self.examined = self.seen = 0
        if k <= 0:
            return []
        last = None if after is None else rank_key(*after)
        follows, interests = viewer.follows, viewer.interests
        # Each bound is base + _WF * freshness + extra: base for the list's geo and
        # popularity, extra for subscription and category if the viewer has any.
        extra = (_WS if follows else 0.0) + (_WC if interests else 0.0) + _MARGIN
        lat, lon, radius = viewer.lat, viewer.lon, viewer.radius
        cos_lat = math.cos(math.radians(lat))
        lists: list[_Entry] = []
        for g, cell in self._grid(radius).reachable(viewer):
            base = _WG * g + _WP * _POP_BOUND[cell.top]
            bound = base + _WF * fresh_bound(at - cell.newest) + extra
            lists.append((-bound, len(lists), cell, -1, base, g))
        heapq.heapify(lists)
        tie = len(lists)
        best: list[tuple[float, int, Parts]] = []  # (score, -post, parts), worst first
        examined = seen = 0
        while lists:
            negative, _, block, i, base, g = lists[0]
            if len(best) == k and best[0][0] > -negative:
                break  # the k-th best ranks before every post not yet read
            if i < 0:  # a cell: open its tiers
                assert isinstance(block, _Cell)
                heapq.heappop(lists)
                floor = best[0][0] if len(best) == k else -1.0
                for t, posts in block.tiers.items():
                    base = _WG * g + _WP * _POP_BOUND[t]
                    bound = base + _WF * fresh_bound(at - posts[-1].ts) + extra
                    if bound >= floor:  # else it would never be read
                        heapq.heappush(lists, (-bound, tie, posts, len(posts) - 1, base, g))
                        tie += 1
                continue
            assert isinstance(block, list)
            live: LivePost = block[i]
            if i:
                age = at - block[i - 1].ts
                f = _FRESH[age // _MINUTE] if 0 <= age < _FRESH_MS else fresh_bound(age)
                heapq.heapreplace(lists, (-(base + _WF * f + extra), tie, block, i - 1, base, g))
                tie += 1
            else:
                heapq.heappop(lists)
            seen += 1
            # A post's own bound, cheaper than its score, often shows that it is beyond
            # the radius or cannot make the top k: most posts read are neither followed
            # nor interesting, and a grid cell's distance bound is loose.
            near = point_lower_bound(lat, cos_lat, lon, live.lat, live.lon)
            if near > radius:
                continue
            if len(best) == k:
                own = -negative - _WG * max(0.0, g - (1.0 - near / radius))
                if follows and live.author not in follows:
                    own -= _WS
                if interests and live.category not in interests:
                    own -= _WC
                if (own, -live.post) < best[0][:2]:
                    continue
            parts = visible_parts(viewer, live, at)
            if parts is None:
                continue
            examined += 1
            s_ = score(parts)
            if last is not None and (-s_, live.post) <= last:
                continue
            scored = (s_, -live.post, parts)
            if len(best) < k:
                heapq.heappush(best, scored)
            elif scored > best[0]:
                heapq.heapreplace(best, scored)
        self.examined, self.seen = examined, seen
        best.sort(reverse=True)
        return [Ranked(-negative_post, s_, parts) for s_, negative_post, parts in best]

    def _grid(self, radius: float) -> _Grid:
        """The finest grid with few enough cells in a circle of ``radius``."""
        fine = [grid for grid in self._grids if grid.scale * radius <= SCALE_RADIUS]
        return fine[-1] if fine else self._grids[0]

    def _retier(self, live: LivePost, was: int) -> None:
        if tier(was) != tier(live.count):
            for grid in self._grids:
                grid.take(live, tier(was))
                grid.put(live, tier(live.count))
