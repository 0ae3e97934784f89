"""What a feed shard remembers of the views that read it, and which changes they need.

For each open view, the shard keeps the rank keys of its own k best posts for that
viewer at the view's instant (what it last answered, kept current since). A change of a
post then falls into one of two cases:

- The post **rose** (a like, a comment, a new post): every other post's score is what
  it was, so the shard's new k best are the old ones with the post put in its place,
  and the view's page is likewise its old page with the post's new item merged in. The
  shard sends the item (``FeedDelta``); no ranking is run again. This is most changes.
- The post **fell** or left (an unlike, a deletion, the horizon) while it was among a
  view's k best: a post nobody was told of may now take its place. The shard tells the
  view to ask again (``FeedDirty``), once, until it does.

"May a rising post enter this view's k best?" is settled for most views without scoring
the post: only views whose circle's box holds it are looked at (found by tiles of
0.25°), then bounds: one for any viewer at the views' oldest instant (geo, subscription
and category at 1), compared first with the lowest k-th score of all views, then with
each view's own (after its follows and interests).

Rises are collected and sent at most once per ``--feed-interval`` (``flush``): a burst of
likes on a post on many pages costs one score and one message per view per interval.
"""

import bisect
import math
from collections.abc import Iterator

import attrs

from actors.feed_index import FeedIndex, LivePost, Ranked, Viewer
from actors.messages import SessionLink
from protocol.ranking import EARTH_RADIUS_M, WEIGHTS, freshness, popularity, rank_key

Key = tuple[float, int]
_NO_FLOOR: Key = (math.inf, 0)  # fewer than k posts answered: any visible post enters
TILES = 4  # per degree: views are found by the tiles of 0.25° their circle touches
MAX_TILES = 400  # a view touching more is checked for every change (near a pole, or
# across the antimeridian: see _box)
REORDER = 256  # uses of a tile's order of views before it is sorted again
# Along a meridian (a hair less: a lower bound of a distance must stay one).
METRES_PER_DEGREE = math.radians(1) * EARTH_RADIUS_M * (1 - 1e-9)


@attrs.define(eq=False)
class Watch:
    link: SessionLink
    view: int
    viewer: Viewer
    at: int
    k: int
    gen: int  # which answer of the shard's the view holds: deltas name it
    keys: list[Key]  # the shard's k best for this view, ascending rank key
    box: tuple[float, float, float, float]  # south, north, west, east: holds the circle
    stale: bool = False  # told to ask again
    floor: Key = _NO_FLOOR  # the k-th key, or _NO_FLOOR
    floor_score: float = -math.inf
    bar: float = -math.inf  # a bound of a post's score below this cannot beat the k-th

    def refloor(self) -> None:
        full = len(self.keys) >= self.k
        self.floor = self.keys[-1] if full else _NO_FLOOR
        self.floor_score = -self.keys[-1][0] if full else -math.inf
        self.bar = self.floor_score - 1e-12  # bounds sum in another order: a few ulps


def _box(viewer: Viewer) -> tuple[float, float, float, float]:
    """A latitude-longitude box holding the viewer's circle (a little more)."""
    dlat = math.degrees(viewer.radius / EARTH_RADIUS_M) * 1.001
    south, north = viewer.lat - dlat, viewer.lat + dlat
    if south <= -90 or north >= 90:
        return south, north, -math.inf, math.inf
    widest = math.cos(math.radians(max(abs(south), abs(north))))
    dlon = dlat / widest
    west, east = viewer.lon - dlon, viewer.lon + dlon
    if west < -180 or east > 180:
        # Across the antimeridian a post's longitude (-179.9) is not between the box's
        # (179.9 to 180.1): take every longitude, and let the ranking's distance decide.
        # Rare views, and few posts near them: cheaper than a box in two parts.
        return south, north, -math.inf, math.inf
    return south, north, west, east


def _tiles(box: tuple[float, float, float, float]) -> list[tuple[int, int]] | None:
    """The grid tiles ``box`` touches; None if too many (or all longitudes)."""
    south, north, west, east = box
    if math.isinf(west):
        return None
    rows = range(math.floor(south * TILES), math.floor(north * TILES) + 1)
    columns = range(math.floor(west * TILES), math.floor(east * TILES) + 1)
    if len(rows) * len(columns) > MAX_TILES:
        return None
    return [(r, c) for r in rows for c in columns]


class Watches:
    def __init__(self, index: FeedIndex) -> None:
        self._index = index
        self._by_view: dict[tuple[str, int], Watch] = {}
        self._showing: dict[int, set[Watch]] = {}  # post -> watches whose k best hold it
        self._pending: dict[Watch, set[int]] = {}  # risen posts not yet sent
        self._tiles: dict[tuple[int, int], set[Watch]] = {}  # tile -> views it may be in
        # Per tile, its views by the bar they had (ascending): a view's bar only rises
        # until it asks again (which drops the tile's order), so a view whose old bar is
        # above a post's bound is above it still. Rebuilt every REORDER uses.
        self._order: dict[tuple[int, int], tuple[list[float], list[Watch], list[int]]] = {}
        self._wide: set[Watch] = set()  # views of no tiles (_tiles): always looked at
        self._gen = 0
        self._bounds: tuple[float, int] | None = None  # lowest floor score, oldest instant

    def __len__(self) -> int:
        return len(self._by_view)

    def __iter__(self) -> Iterator[Watch]:
        return iter(self._by_view.values())

    @property
    def pending(self) -> bool:
        return bool(self._pending)

    def watch(
        self, link: SessionLink, view: int, viewer: Viewer, at: int, k: int, ranked: list[Ranked]
    ) -> int:
        """Remember what the shard answered view ``view`` of ``link``'s session; the
        answer's number, which its deltas carry."""
        self.stop(link.id, view)
        self._gen += 1
        keys = [rank_key(r.score, r.post) for r in ranked]
        watch = Watch(link, view, viewer, at, k, self._gen, keys, _box(viewer))
        watch.refloor()
        self._by_view[link.id, view] = watch
        tiles = _tiles(watch.box)
        if tiles is None:
            self._wide.add(watch)
        for tile in tiles or ():
            self._tiles.setdefault(tile, set()).add(watch)
            self._order.pop(tile, None)
        for r in ranked:
            self._showing.setdefault(r.post, set()).add(watch)
        self._bounds = None
        return self._gen

    def stop(self, session: str, view: int) -> None:
        watch = self._by_view.pop((session, view), None)
        if watch is None:
            return
        for _, post in watch.keys:
            self._unshow(post, watch)
        self._pending.pop(watch, None)
        self._wide.discard(watch)
        for tile in _tiles(watch.box) or ():
            self._order.pop(tile, None)
            near = self._tiles[tile]
            near.discard(watch)
            if not near:
                del self._tiles[tile]
        self._bounds = None

    def stop_session(self, session: str) -> None:
        for s, view in [key for key in self._by_view if key[0] == session]:
            self.stop(s, view)

    def sweep(self) -> None:
        """Forget the views of sessions that ended without saying so."""
        for session, view in [k for k, w in self._by_view.items() if w.link.outbox.closed]:
            self.stop(session, view)

    def changed(self, post: LivePost, *, rises: bool) -> list[Watch]:
        """Note a change of ``post``; the views that must ask again (newly stale)."""
        if not self._by_view:
            return []
        showing = self._showing.get(post.post, ())
        if not rises:
            stale = [w for w in showing if not w.stale]
            for watch in stale:
                watch.stale = True
                self._pending.pop(watch, None)
            return stale
        for watch in showing:
            if not watch.stale:
                self._pending.setdefault(watch, set()).add(post.post)
        lowest, oldest = self._floors()
        g, f, p, s, c = WEIGHTS
        # The best this post can score for anyone at any instant views hold: its
        # freshness is highest at the oldest.
        base = g * 1.0 + f * freshness(oldest - post.ts) + p * popularity(post.likes, post.comments)
        if base + s + c < lowest:
            return []
        rank = self._index.rank
        lat, lon = post.lat, post.lon
        tile = (math.floor(lat * TILES), math.floor(lon * TILES))
        top = base + s + c
        near = self._below(tile, top)
        for watch in (*near, *self._wide) if self._wide else near:
            if top < watch.bar or watch.stale or watch in showing:
                continue  # the first test settles most (one comparison)
            south, north, west, east = watch.box
            if not (south <= lat <= north and west <= lon <= east):
                continue
            viewer = watch.viewer
            # Geo below 1 by the latitude gap at least (a lower bound of the distance).
            gap = abs(lat - viewer.lat) * METRES_PER_DEGREE
            bound = base - g * (gap / viewer.radius)
            bound += s if post.author in viewer.follows else 0.0
            bound += c if post.category in viewer.interests else 0.0
            if bound < watch.bar:
                continue
            ranked = rank(viewer, post, watch.at)
            if ranked is not None and rank_key(ranked.score, ranked.post) < watch.floor:
                self._pending.setdefault(watch, set()).add(post.post)
        return []

    def _below(self, tile: tuple[int, int], top: float) -> list[Watch]:
        """The views of ``tile`` whose bar may be at or below ``top``."""
        order = self._order.get(tile)
        if order is None or order[2][0] >= REORDER:
            near = sorted(self._tiles.get(tile, ()), key=lambda w: w.bar)
            order = self._order[tile] = ([w.bar for w in near], near, [0])
        order[2][0] += 1
        return order[1][: bisect.bisect_right(order[0], top)]

    def flush(self) -> list[tuple[Watch, list[Ranked]]]:
        """The risen posts each view must be sent, now among the shard's k best for it."""
        out = []
        pending, self._pending = self._pending, {}
        for watch, posts in pending.items():
            if watch.stale or self._by_view.get((watch.link.id, watch.view)) is not watch:
                continue
            entered = []
            for number in posts:
                post = self._index.get(number)
                ranked = None if post is None else self._index.rank(watch.viewer, post, watch.at)
                if ranked is not None and self._place(watch, ranked):
                    entered.append(ranked)
            if entered:
                out.append((watch, entered))
        return out

    def _place(self, watch: Watch, ranked: Ranked) -> bool:
        """Put ``ranked`` among ``watch``'s k best if it is one; whether it is."""
        keys = watch.keys
        key = rank_key(ranked.score, ranked.post)
        old = next((i for i, (_, post) in enumerate(keys) if post == ranked.post), None)
        if old is not None:
            del keys[old]
        elif len(keys) >= watch.k and key >= keys[-1]:
            return False
        lo = 0
        while lo < len(keys) and keys[lo] < key:
            lo += 1
        keys.insert(lo, key)
        if old is None:
            self._showing.setdefault(ranked.post, set()).add(watch)
        while len(keys) > watch.k:
            _, dropped = keys.pop()
            self._unshow(dropped, watch)
        watch.refloor()
        self._bounds = None
        return ranked.post in {post for _, post in keys}

    def _unshow(self, post: int, watch: Watch) -> None:
        holders = self._showing.get(post)
        if holders is not None:
            holders.discard(watch)
            if not holders:
                del self._showing[post]

    def _floors(self) -> tuple[float, int]:
        if self._bounds is None:
            watches = [w for w in self._by_view.values() if not w.stale]
            lowest = min((w.floor_score for w in watches), default=math.inf)
            oldest = min((w.at for w in watches), default=0)
            self._bounds = (lowest - 1e-12, oldest)
        return self._bounds
