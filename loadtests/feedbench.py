"""``parley bench feed``: live ranked feeds at the issue's scale (issue 14).

It seeds storage directly (``Store.write_batch``, before the server starts), then starts
``parley serve`` on that database and measures, in order:

  cold      one view per shard holding live posts, one after the other, each the first
            view of its shard: the shard loads its live posts from storage (a radius of
            1 km inside the cell, so the view touches that shard only).
  memory    the server's RSS after those loads minus its RSS before any shard loaded,
            per live post loaded.
  open      ``--views`` views (``--views-per-session`` per session, radius 2-20 km
            around the city centres, ``--limit`` 20), at most ``--open-window`` opens in
            flight, the shards warm: feedopen to feedpage.
  load      ``--seconds`` of ``--likes-rate`` likes/s and ``--posts-rate`` posts/s from
            their own sessions, open-loop (each frame is sent at its scheduled instant
            however the server keeps up; latencies count from that instant). Meanwhile
            ``--reopen-rate`` views/s are closed and opened again by other sessions
            (feed-open latency under load). ``--on-page`` of the likes go to posts on
            some view's current page (the generator knows the pages from the events it
            receives); the others to any live post.

Like to event: every like to a post that is on some views' pages when it is sent (aimed
or not) brings the post's count to a known n (the generator knows the seeded counts,
and each like comes from a session that never liked that post, so each one counts);
for each of those views, the latency is from the like's scheduled instant to the first
``feedchanged`` of that view carrying the post with ``likes >= n``. Nothing is
subtracted: the coalescing interval is reported beside it. A view whose page drops the
post first counts as "left", one that never shows it as "unresolved".

Seed data (documented in BENCHMARKS.md): ``--posts`` posts, ``--live`` of them made in
the last 6 days (so a cached seed keeps the same live posts for a day under the 7-day
horizon), the others 8 to 180 days old; ids in time order per shard. Places: five
cities (Paris, London, Madrid, Berlin, Rome, weights 30/25/20/15/10), 90 % gaussian
around the centre (sigma 4-6 km), 10 % uniform over the city's 2-degree cell. Authors
skewed (the top 1 % of 20,000 write a fifth of the posts), ten categories. Live posts
have likes from a Pareto law (mean about 2, at most 1,000); viewers follow 20 authors
and have 1-3 interests.

CPU is read from ``/proc/<pid>/stat`` (user + system) around each phase; run the command
under ``taskset -c 1`` with ``--server-cpu 0``.
"""

import argparse
import itertools
import json
import math
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import attrs
import cbor2
import trio

from actors.feed_cells import bounds, cell_of, cells_within, post_id
from loadtests.cli import free_port, start_server
from loadtests.proc import cpu_seconds, progress, status_kib
from loadtests.rawclient import RawClient
from protocol.codec import encode
from protocol.frames import (
    Error,
    FeedChanged,
    FeedClose,
    FeedOpen,
    FeedPage,
    Frame,
    Like,
    Ok,
    Ping,
    Pong,
    Post,
    Posted,
)
from protocol.wsframe import client_frame
from server.tokens import issue_token
from storage.store import (
    FollowChanged,
    InterestsSet,
    LikeChanged,
    PostCreated,
    Record,
    open_store,
    redact_url,
)

DAY_MS = 86_400_000
SEED_VERSION = 1
CACHE_HOURS = 24  # live posts are made within 6 days: they stay live for a day
CATEGORIES = ("art", "events", "food", "music", "news", "other", "places", "sports", "tech")
AUTHORS = 20_000
FOLLOWS = 20
KM_PER_DEGREE = 111.2
RURAL = 0.1


@attrs.frozen
class City:
    name: str
    lat: float
    lon: float
    sigma_km: float
    weight: int

    @property
    def cell(self) -> int:
        return cell_of(self.lat, self.lon)


CITIES = (
    City("Paris", 48.8566, 2.3522, 5, 30),
    City("London", 51.5072, -0.1276, 6, 25),
    City("Madrid", 40.4168, -3.7038, 4, 20),
    City("Berlin", 52.5200, 13.4050, 5, 15),
    City("Rome", 41.9028, 12.4964, 4, 10),
)
WEIGHTS = [c.weight for c in CITIES]
FILLER = "a table by the window, the light on the river, and a queue at the door. "


def _near(rng: random.Random, city: City, sigma_km: float) -> tuple[float, float]:
    lat = city.lat + rng.gauss(0, sigma_km / KM_PER_DEGREE)
    lon = city.lon + rng.gauss(0, sigma_km / (KM_PER_DEGREE * math.cos(math.radians(lat))))
    return lat, lon


def place(rng: random.Random) -> tuple[float, float]:
    """Where a post is made: mostly near a city centre, else anywhere in its cell."""
    city = rng.choices(CITIES, WEIGHTS)[0]
    if rng.random() < RURAL:
        south, north, west, east = bounds(city.cell)
        return rng.uniform(south, north), rng.uniform(west, east)
    return _near(rng, city, city.sigma_km)


def author(rng: random.Random) -> str:
    return f"a{int(AUTHORS * rng.random() ** 3)}"


def seeded_likes(rng: random.Random) -> int:
    return min(1000, int(rng.paretovariate(1.5)) - 1)


# --- seeding --------------------------------------------------------------------------


@attrs.define
class Seed:
    """What the load needs to know of the seeded data."""

    now_ms: int  # when it was seeded
    posts: int
    live: int
    viewers: int
    live_ids: list[int]
    live_likes: list[int]  # seeded likes of each live post
    cells: dict[int, int]  # shard -> live posts
    seconds: float  # seeding time
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SEED_VERSION,
            "now_ms": self.now_ms,
            "posts": self.posts,
            "live": self.live,
            "viewers": self.viewers,
            "live_ids": self.live_ids,
            "live_likes": self.live_likes,
            "cells": {str(k): v for k, v in self.cells.items()},
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Seed":
        return cls(
            now_ms=data["now_ms"],
            posts=data["posts"],
            live=data["live"],
            viewers=data["viewers"],
            live_ids=data["live_ids"],
            live_likes=data["live_likes"],
            cells={int(k): v for k, v in data["cells"].items()},
            seconds=data["seconds"],
            cached=True,
        )


def seed_records(
    posts: int, live: int, viewers: int, seed: int, now_ms: int, out: Seed
) -> Iterator[Record]:
    """Every record to seed, in time order; fills ``out`` with the live posts."""
    rng = random.Random(seed)
    numbers: Counter[int] = Counter()
    old = posts - live
    old_from, old_to = now_ms - 180 * DAY_MS, now_ms - 8 * DAY_MS
    live_from, live_to = now_ms - 6 * DAY_MS, now_ms - 60_000
    for i in range(posts):
        if i < old:
            ts = old_from + (old_to - old_from) * i // max(1, old)
        else:
            ts = live_from + (live_to - live_from) * (i - old) // max(1, live)
        lat, lon = place(rng)
        cell = cell_of(lat, lon)
        numbers[cell] += 1
        post = post_id(numbers[cell], cell)
        category = rng.choice(CATEGORIES)
        yield PostCreated(
            post=post,
            author=author(rng),
            cid=f"s{i}",
            ts=ts,
            lat=lat,
            lon=lon,
            category=category,
            text=f"{category} #{i}: {FILLER[: rng.randrange(20, len(FILLER))]}",
        )
        if i >= old:
            likes = seeded_likes(rng)
            out.live_ids.append(post)
            out.live_likes.append(likes)
            out.cells[cell] = out.cells.get(cell, 0) + 1
            for j in range(likes):
                user = f"s{(i * 7919 + j) % 100_000}"
                yield LikeChanged(post=post, user=user, liked=True, ts=ts + j)
    for v in range(viewers):
        user = f"v{v}"
        for followed in {author(rng) for _ in range(FOLLOWS)}:
            yield FollowChanged(user=user, author=followed, following=True, ts=now_ms)
        interests = tuple(sorted(set(rng.choices(CATEGORIES, k=rng.randint(1, 3)))))
        yield InterestsSet(user=user, categories=interests, ts=now_ms)


async def write_seed(
    url: str, posts: int, live: int, viewers: int, seed: int, batch: int = 5000
) -> Seed:
    started = time.monotonic()
    now_ms = time.time_ns() // 1_000_000
    out = Seed(now_ms, posts, live, viewers, [], [], {}, 0.0)
    async with open_store(url) as store:
        records: list[Record] = []
        for record in seed_records(posts, live, viewers, seed, now_ms, out):
            records.append(record)
            if len(records) >= batch:
                await store.write_batch(records)
                records = []
        if records:
            await store.write_batch(records)
    out.seconds = time.monotonic() - started
    return out


def _seed_name(args: argparse.Namespace) -> str:
    return f"feed-{args.posts}-{args.live}-{args.views}-s{args.seed}"


def seeded_sqlite(args: argparse.Namespace, tmp: Path) -> tuple[str, Seed]:
    """A SQLite database seeded for ``args`` in ``tmp``: from ``--seed-dir`` when a
    seed made there within the last day matches, else seeded now (and kept there)."""
    db = tmp / "feed.db"
    url = f"sqlite:///{db}"
    cache = Path(args.seed_dir) if args.seed_dir else None
    if cache is not None:
        name = _seed_name(args)
        meta_path, cached_db = cache / f"{name}.json", cache / f"{name}.db"
        if meta_path.exists() and cached_db.exists():
            meta = json.loads(meta_path.read_text())
            age_h = (time.time() * 1000 - meta["now_ms"]) / 3_600_000
            if meta.get("version") == SEED_VERSION and age_h < CACHE_HOURS:
                progress(f"seed: copying {cached_db} (seeded {age_h:.1f} h ago)")
                shutil.copyfile(cached_db, db)
                return url, Seed.from_json(meta)
    progress(f"seed: {args.posts:,} posts ({args.live:,} live) into {redact_url(url)}")
    seed = trio.run(write_seed, url, args.posts, args.live, args.views, args.seed)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(db, cache / f"{name}.db")
        (cache / f"{name}.json").write_text(json.dumps(seed.to_json()))
    return url, seed


# --- the load generator ---------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nan if none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class PostSet:
    """Posts, with O(1) add, discard and random choice."""

    def __init__(self) -> None:
        self.items: list[int] = []
        self.where: dict[int, int] = {}

    def add(self, post: int) -> None:
        if post not in self.where:
            self.where[post] = len(self.items)
            self.items.append(post)

    def discard(self, post: int) -> None:
        at = self.where.pop(post, None)
        if at is None:
            return
        last = self.items.pop()
        if at < len(self.items):
            self.items[at] = last
            self.where[last] = at

    def __len__(self) -> int:
        return len(self.items)


@attrs.define(eq=False)
class ViewState:
    posts: list[int]
    likes: dict[int, int]


Handler = Callable[["Conn", dict[int, Any], float], None]


class Conn:
    """One session: a raw connection, a sender that never blocks its callers, and a
    reader that hands every frame to ``handler`` with its arrival time."""

    def __init__(self, index: int, user: str, client: RawClient, handler: Handler) -> None:
        self.index = index
        self.user = user
        self.client = client
        self.handler = handler
        self.ids = itertools.count(1)
        self.replies: dict[int, tuple[trio.Event, list[tuple[dict[int, Any], float]]]] = {}
        self.size = 0  # bytes of the frame being handled
        self._out: list[bytes] = []
        self._wake = trio.Event()
        self.busy = False
        self.closed = False

    def queue(self, frame: Frame) -> None:
        self._out.append(client_frame(encode(frame)))
        self._wake.set()

    async def request(self, frame: Frame) -> tuple[dict[int, Any], float]:
        """The reply to ``frame`` (which has an ``id``), and when it came."""
        done = trio.Event()
        box: list[tuple[dict[int, Any], float]] = []
        self.replies[frame.id] = (done, box)  # type: ignore[attr-defined]
        self.queue(frame)
        await done.wait()
        return box[0]

    async def send_loop(self) -> None:
        while True:
            if not self._out:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            data = b"".join(self._out)
            self._out.clear()
            await self.client.stream.send_all(data)

    async def read_loop(self, stats: "Stats") -> None:
        try:
            while True:
                payloads = await self.client.receive()
                now = time.monotonic()
                for payload in payloads:
                    stats.frames_in += 1
                    stats.bytes_in += len(payload)
                    frame = cbor2.loads(payload)
                    request = frame.get(1)
                    if request is None and frame.get(0) == Ping.TYPE:
                        self.queue(Pong())  # the server's keep-alive
                        continue
                    waiting = self.replies.pop(request, None) if request is not None else None
                    if waiting is not None:
                        waiting[1].append((frame, now))
                        waiting[0].set()
                    else:
                        self.size = len(payload)
                        self.handler(self, frame, now)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            self.closed = True


@attrs.define
class Stats:
    frames_in: int = 0
    bytes_in: int = 0
    errors: Counter[str] = attrs.field(factory=Counter)
    changes: int = 0  # feedchanged of the measured views
    change_bytes: int = 0
    change_items: int = 0
    other_changes: int = 0  # of the churned views
    likes_sent: int = 0
    likes_ok: int = 0
    like_acks: list[float] = attrs.field(factory=list)
    posts_sent: int = 0
    posts_ok: int = 0
    post_acks: list[float] = attrs.field(factory=list)
    like_to_event: list[float] = attrs.field(factory=list)
    like_first_view: list[float] = attrs.field(factory=list)
    measured_likes: int = 0
    left: int = 0
    post_to_view: list[float] = attrs.field(factory=list)
    post_entries: int = 0
    reopen: list[float] = attrs.field(factory=list)
    reopen_skipped: int = 0
    lag: float = 0.0  # the generator's worst delay past a scheduled send
    skipped_likes: int = 0


class Load:
    """The views' pages as their events tell, and every like awaiting its event."""

    def __init__(self, seed: Seed, rng: random.Random, stats: Stats) -> None:
        self.rng = rng
        self.stats = stats
        self.views: dict[tuple[int, int], ViewState] = {}
        self.showing: dict[int, set[tuple[int, int]]] = {}  # post -> views showing it
        self.on_pages = PostSet()
        self.live = list(seed.live_ids)
        self.count = dict(zip(seed.live_ids, seed.live_likes, strict=True))
        self.ours: Counter[int] = Counter()  # our likes of each post
        # (view, post) -> (n, like index) awaiting an item with likes >= n
        self.pending: dict[tuple[tuple[int, int], int], deque[tuple[int, int]]] = {}
        self.like_sent: dict[int, float] = {}  # like index -> its scheduled instant
        self.like_first: set[int] = set()
        self.new_posts: dict[int, float] = {}  # bench post number -> scheduled instant
        self.measuring = False

    # pages

    def opened(self, key: tuple[int, int], items: list[dict[int, Any]]) -> None:
        state = ViewState([i[45] for i in items], {i[45]: i[52] for i in items})
        self.views[key] = state
        for post in state.posts:
            self._show(post, key)

    def _show(self, post: int, key: tuple[int, int]) -> None:
        viewers = self.showing.get(post)
        if viewers is None:
            viewers = self.showing[post] = set()
            self.on_pages.add(post)
        viewers.add(key)

    def _hide(self, post: int, key: tuple[int, int]) -> None:
        viewers = self.showing.get(post)
        if viewers is not None:
            viewers.discard(key)
            if not viewers:
                del self.showing[post]
                self.on_pages.discard(post)
        waiting = self.pending.pop((key, post), None)
        if waiting:
            self.stats.left += len(waiting)

    def on_frame(self, conn: Conn, frame: dict[int, Any], now: float) -> None:
        kind = frame.get(0)
        if kind == FeedChanged.TYPE:
            state = self.views.get((conn.index, frame[54]))
            if state is None:
                self.stats.other_changes += 1
                return
            self._changed((conn.index, frame[54]), state, frame, now, conn.size)
        elif kind == Error.TYPE:
            self.stats.errors[f"{frame.get(12)} {frame.get(13)}"] += 1

    def _changed(
        self,
        key: tuple[int, int],
        state: ViewState,
        frame: dict[int, Any],
        now: float,
        size: int,
    ) -> None:
        s = self.stats
        if self.measuring:
            s.changes += 1
            s.change_bytes += size
        posts: list[int] = frame[57]
        items: list[dict[int, Any]] = frame.get(17, [])
        if self.measuring:
            s.change_items += len(items)
        before = set(state.posts)
        after = set(posts)
        for post in before - after:
            self._hide(post, key)
            del state.likes[post]
        for post in after - before:
            self._show(post, key)
        state.posts = posts
        for item in items:
            post, likes = item[45], item[52]
            state.likes[post] = likes
            waiting = self.pending.get((key, post))
            while waiting and waiting[0][0] <= likes:
                _, like = waiting.popleft()
                sent = self.like_sent[like]
                s.like_to_event.append(now - sent)
                if like not in self.like_first:
                    self.like_first.add(like)
                    s.like_first_view.append(now - sent)
            if waiting is not None and not waiting:
                del self.pending[key, post]
            text = item.get(7)
            if post not in before and text and text.startswith("bench-new "):
                number = int(text.split()[1])
                s.post_entries += 1
                if number in self.new_posts:
                    s.post_to_view.append(now - self.new_posts.pop(number))

    # likes

    def pick_like(self, on_page: float, likers: int) -> tuple[int, int, int] | None:
        """(post, liker session, the count it brings the post to), or None."""
        for _ in range(20):
            if self.on_pages.items and self.rng.random() < on_page:
                post = self.rng.choice(self.on_pages.items)
            else:
                post = self.rng.choice(self.live)
            k = self.ours[post]
            if k >= likers:
                continue  # every liker session likes it already
            self.ours[post] = k + 1
            self.count[post] = n = self.count.get(post, 0) + 1
            return post, (post * 2654435761 + k) % likers, n
        return None

    def like_sent_now(self, like: int, post: int, n: int, at: float) -> None:
        viewers = self.showing.get(post)
        if not viewers or not self.measuring:
            return
        self.like_sent[like] = at
        self.stats.measured_likes += 1
        for key in viewers:
            self.pending.setdefault((key, post), deque()).append((n, like))

    def unresolved(self) -> int:
        return sum(len(q) for q in self.pending.values())


@attrs.define
class Result:
    figures: dict[str, Any]

    def report(self) -> str:
        f = self.figures

        def ms(key: str) -> str:
            values = f[key]
            return (
                f"p50 {values['p50']:.1f} ms, p99 {values['p99']:.1f} ms, max "
                f"{values['max']:.1f} ms (n={values['n']:,})"
                if values["n"]
                else "none"
            )

        rows = [
            ("command", f["command"]),
            ("database", f"{f['database']} ({f['seed']})"),
            (
                "data",
                f"{f['posts']:,} posts stored, {f['live']:,} live in {f['shards']} shards, "
                f"{f['views']:,} views ({f['view_sessions']} sessions), limit {f['limit']}",
            ),
            (
                "load",
                f"{f['likes_rate']:g} likes/s + {f['posts_rate']:g} posts/s for "
                f"{f['seconds']:g} s (sent {f['likes_sent']:,} likes, {f['posts_sent']:,} "
                f"posts; {f['on_page']:.0%} of likes aimed at posts on pages)",
            ),
            ("cold view per shard", f["cold"]),
            ("feed-open, warm", ms("open_ms")),
            ("feed-open under load", ms("reopen_ms")),
            (
                "like -> view event",
                ms("like_ms") + f"; coalescing interval {f['feed_interval'] * 1000:g} ms",
            ),
            ("like -> first view", ms("like_first_ms")),
            (
                "like acks",
                ms("like_ack_ms") + f"; post acks {f['post_ack_ms']['p50']:.1f} / "
                f"{f['post_ack_ms']['p99']:.1f} ms",
            ),
            (
                "new post -> first view",
                ms("post_ms") + f"; entered {f['post_entries']:,} pages",
            ),
            (
                "feedchanged",
                f"{f['changes']:,} ({f['changes_per_s']:,.0f}/s), {f['change_bytes'] / 1e6:.1f} "
                f"MB, {f['change_mean_bytes']:,.0f} B and {f['change_mean_items']:.1f} items "
                "each",
            ),
            (
                "server, feeds",
                f"{f['server_wakes']:,.0f} view wakes, {f['rank_queries']:,.0f} shard rank "
                f"queries ({f['rank_queries'] / f['load_wall_s']:,.0f}/s, "
                f"{f['examined_per_query']:,.0f} posts scored each), "
                f"{f['server_changes']:,.0f} feedchanged (all views)",
            ),
            (
                "server CPU",
                f"{f['server_cpu_s']:.2f} s in {f['load_wall_s']:.1f} s "
                f"({f['server_busy']:.0%} of a core): {f['us_per_event']:.0f} µs per event "
                f"(like or post) sent, {f['us_per_done_event']:.0f} µs per one it applied "
                f"({f['server_likes']:,.0f} likes, {f['server_posts']:,.0f} posts), "
                f"{f['us_per_change']:.0f} µs per feedchanged, "
                f"{f['us_per_rank_query']:.0f} µs per rank query; idle with "
                f"the views open {f['idle_busy']:.1%}",
            ),
            (
                "memory per live post",
                f"{f['bytes_per_live_post']:,.0f} B (RSS {f['rss_before_mib']:.0f} -> "
                f"{f['rss_loaded_mib']:.0f} MiB for {f['loaded_posts']:,} posts; "
                f"{f['rss_views_mib']:.0f} MiB with the views open, "
                f"{f['rss_end_mib']:.0f} after the load; peak {f['rss_peak_mib']:.0f})",
            ),
            (
                "checks",
                f"errors {sum(f['errors'].values())} {dict(f['errors']) or ''}; "
                f"measured likes {f['measured_likes']:,}, left the page first "
                f"{f['left']:,}, unresolved {f['unresolved']:,}; like picks skipped "
                f"{f['skipped_likes']}; reopens skipped {f['reopen_skipped']}; generator "
                f"lag max {f['lag_ms']:.1f} ms, its CPU {f['generator_busy']:.0%} of a core",
            ),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _lat(values: Sequence[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 0.5) * 1000,
        "p99": pct(values, 0.99) * 1000,
        "max": (max(values) if values else math.nan) * 1000,
        "mean": (statistics.fmean(values) if values else math.nan) * 1000,
    }


def view_place(rng: random.Random, args: argparse.Namespace) -> tuple[float, float, int]:
    city = rng.choices(CITIES, WEIGHTS)[0]
    lat, lon = _near(rng, city, city.sigma_km)
    return lat, lon, rng.randint(args.radius_min, args.radius_max)


def cold_point(cell: int) -> tuple[float, float]:
    """A place whose 1 km circle lies in ``cell`` only: its city's centre, else its
    centre."""
    for city in CITIES:
        if city.cell == cell and cells_within(city.lat, city.lon, 1000) == [cell]:
            return city.lat, city.lon
    south, north, west, east = bounds(cell)
    return (south + north) / 2, (west + east) / 2


async def _gather(jobs: Sequence[Callable[[], Awaitable[None]]], window: int) -> None:
    limit = trio.CapacityLimiter(window)

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with limit:
            await job()

    async with trio.open_nursery() as nursery:
        for job in jobs:
            nursery.start_soon(one, job)


async def run_load(
    args: argparse.Namespace, port: int, ops_port: int, secret: str, pid: int, seed: Seed
) -> dict[str, Any]:
    rng = random.Random(args.seed + 1)
    stats = Stats()
    load = Load(seed, rng, stats)
    f: dict[str, Any] = {}
    conns: list[Conn] = []

    def ignore(conn: Conn, frame: dict[int, Any], now: float) -> None:
        if frame.get(0) == Error.TYPE:
            stats.errors[f"{frame.get(12)} {frame.get(13)}"] += 1

    def acks(conn: Conn, frame: dict[int, Any], now: float) -> None:
        kind = frame.get(0)
        sent = pending_acks.pop((conn.index, frame.get(1)), None)
        if kind == Error.TYPE:
            stats.errors[f"{frame.get(12)} {frame.get(13)}"] += 1
        elif sent is not None and kind == Ok.TYPE:
            stats.likes_ok += 1
            stats.like_acks.append(now - sent)
        elif sent is not None and kind == Posted.TYPE:
            stats.posts_ok += 1
            stats.post_acks.append(now - sent)
            load.live.append(frame[45])
            load.count[frame[45]] = 0

    pending_acks: dict[tuple[int, Any], float] = {}

    async with trio.open_nursery() as nursery:

        async def connect(user: str, handler: Handler) -> Conn:
            token = issue_token(secret, user, 3600)
            client = await RawClient.connect("127.0.0.1", port, token)
            conn = Conn(len(conns), user, client, handler)
            conns.append(conn)
            nursery.start_soon(conn.send_loop)
            nursery.start_soon(conn.read_loop, stats)
            return conn

        async def open_view(
            conn: Conn, lat: float, lon: float, radius: int
        ) -> tuple[float, dict[int, Any]]:
            frame = FeedOpen(id=next(conn.ids), lat=lat, lon=lon, radius=radius, limit=args.limit)
            started = time.monotonic()
            reply, at = await conn.request(frame)
            if reply.get(0) != FeedPage.TYPE:
                stats.errors[f"feedopen: {reply.get(12)} {reply.get(13)}"] += 1
            return at - started, reply

        # --- cold: the first view of each shard -------------------------------------
        cold = await connect("cold", ignore)
        rss_before = status_kib(pid, "VmRSS")
        cold_rows = []
        for cell, live in sorted(seed.cells.items(), key=lambda kv: -kv[1]):
            lat, lon = cold_point(cell)
            seconds, page = await open_view(cold, lat, lon, 1000)
            cold_rows.append((cell, live, seconds))
            progress(f"cold view of shard {cell} ({live:,} live posts): {seconds * 1000:.0f} ms")
            if page.get(0) == FeedPage.TYPE:
                await cold.request(FeedClose(id=next(cold.ids), view=page[54]))
        rss_loaded = status_kib(pid, "VmRSS")
        loaded = sum(live for _, live, _ in cold_rows)
        f["cold_rows"] = cold_rows
        biggest = max(cold_rows, key=lambda r: r[1])
        f["cold"] = (
            f"{len(cold_rows)} shards: {sum(r[2] for r in cold_rows) * 1000:,.0f} ms in all; "
            f"the largest ({biggest[1]:,} posts) {biggest[2] * 1000:,.0f} ms, "
            f"{biggest[2] / max(1, biggest[1]) * 1e6:.1f} µs per post"
        )

        # --- open: the measured views ------------------------------------------------
        progress(f"connecting {args.views // args.views_per_session} view sessions")
        view_sessions: list[Conn] = []

        async def connect_viewer(v: int) -> None:
            view_sessions.append(await connect(f"v{v}", load.on_frame))

        sessions = math.ceil(args.views / args.views_per_session)
        await _gather([lambda v=v: connect_viewer(v) for v in range(sessions)], 50)  # type: ignore[misc]
        progress(f"opening {args.views:,} views, {args.open_window} in flight")
        open_times: list[float] = []
        opened = 0

        async def open_all(conn: Conn) -> None:
            nonlocal opened
            for _ in range(args.views_per_session):
                if opened >= args.views:
                    return
                opened += 1
                lat, lon, radius = view_place(rng, args)
                seconds, page = await open_view(conn, lat, lon, radius)
                open_times.append(seconds)
                if page.get(0) == FeedPage.TYPE:
                    load.opened((conn.index, page[54]), page.get(17, []))

        await _gather([lambda c=c: open_all(c) for c in view_sessions], args.open_window)  # type: ignore[misc]
        rss_views = status_kib(pid, "VmRSS")

        # --- the load's sessions --------------------------------------------------------
        likers = [await connect(f"like{j}", acks) for j in range(args.like_sessions)]
        posters = [await connect(f"poster{j}", acks) for j in range(args.post_sessions)]
        churners = [await connect(f"churn{j}", ignore) for j in range(args.reopen_sessions)]
        churn_views: dict[int, int] = {}
        for conn in churners:
            lat, lon, radius = view_place(rng, args)
            _, page = await open_view(conn, lat, lon, radius)
            if page.get(0) == FeedPage.TYPE:
                churn_views[conn.index] = page[54]

        # idle: what the open views cost with nothing happening
        await trio.sleep(0.5)
        idle_cpu, idle_t = cpu_seconds(pid), time.monotonic()
        await trio.sleep(args.idle_seconds)
        f["idle_busy"] = (cpu_seconds(pid) - idle_cpu) / (time.monotonic() - idle_t)

        async def churn(conn: Conn) -> None:
            conn.busy = True
            try:
                view = churn_views.pop(conn.index, None)
                if view is not None:
                    await conn.request(FeedClose(id=next(conn.ids), view=view))
                lat, lon, radius = view_place(rng, args)
                seconds, page = await open_view(conn, lat, lon, radius)
                stats.reopen.append(seconds)
                if page.get(0) == FeedPage.TYPE:
                    churn_views[conn.index] = page[54]
            finally:
                conn.busy = False

        # --- load -------------------------------------------------------------------------
        progress(
            f"load: {args.likes_rate:g} likes/s, {args.posts_rate:g} posts/s for {args.seconds:g} s"
        )
        load.measuring = True
        spy = _py_spy(args.py_spy, pid, args.seconds)
        metrics0 = await trio.to_thread.run_sync(feed_metrics, ops_port)
        t0 = time.monotonic()
        end = t0 + args.seconds
        cpu0, gen0 = cpu_seconds(pid), time.process_time()
        likes_due = posts_due = reopens_due = 0
        total_likes = int(args.likes_rate * args.seconds)
        total_posts = int(args.posts_rate * args.seconds)
        total_reopens = int(args.reopen_rate * args.seconds)
        while True:
            now = time.monotonic()
            if now >= end and likes_due >= total_likes and posts_due >= total_posts:
                break
            elapsed = now - t0
            while likes_due < min(total_likes, int(elapsed * args.likes_rate) + 1):
                at = t0 + likes_due / args.likes_rate
                likes_due += 1
                picked = load.pick_like(args.on_page, len(likers))
                if picked is None:
                    stats.skipped_likes += 1
                    continue
                post, j, n = picked
                conn = likers[j]
                request = next(conn.ids)
                pending_acks[conn.index, request] = at
                conn.queue(Like(id=request, post=post))
                stats.likes_sent += 1
                stats.lag = max(stats.lag, now - at)
                load.like_sent_now(likes_due, post, n, at)
            while posts_due < min(total_posts, int(elapsed * args.posts_rate) + 1):
                at = t0 + posts_due / args.posts_rate
                posts_due += 1
                conn = posters[posts_due % len(posters)]
                lat, lon = place(rng)
                request = next(conn.ids)
                pending_acks[conn.index, request] = at
                load.new_posts[posts_due] = at
                conn.queue(
                    Post(
                        id=request,
                        cid=f"n{posts_due}",
                        lat=lat,
                        lon=lon,
                        category=rng.choice(CATEGORIES),
                        text=f"bench-new {posts_due} {FILLER[:40]}",
                    )
                )
                stats.posts_sent += 1
            while churners and reopens_due < min(total_reopens, int(elapsed * args.reopen_rate)):
                reopens_due += 1
                idle = [c for c in churners if not c.busy]
                if idle:
                    nursery.start_soon(churn, rng.choice(idle))
                else:
                    stats.reopen_skipped += 1
            await trio.sleep(0.002)
        cpu1, gen1, t1 = cpu_seconds(pid), time.process_time(), time.monotonic()
        metrics1 = await trio.to_thread.run_sync(feed_metrics, ops_port)
        if spy is not None:
            await trio.to_thread.run_sync(spy.wait)
        with trio.move_on_after(60):  # every ack, however busy the machine (CI, coverage)
            while pending_acks:  # noqa: ASYNC110 - the readers pop the acks
                await trio.sleep(0.01)
        await trio.sleep(max(1.0, 5 * args.feed_interval))  # the last events
        load.measuring = False
        f["drain_cpu_s"] = cpu_seconds(pid) - cpu1
        rss_end = status_kib(pid, "VmRSS")
        for conn in [*view_sessions, *likers, *posters, *churners, cold]:
            if conn.closed:
                stats.errors[f"closed by the server ({conn.client.close_code})"] += 1
        nursery.cancel_scope.cancel()

    wall = t1 - t0
    server_cpu = cpu1 - cpu0
    counted = {k: metrics1[k] - metrics0[k] for k in metrics0}
    f.update(
        server_wakes=counted["wakes"],
        server_changes=counted["changes"],
        rank_queries=counted["rank_queries"],
        examined_per_query=counted["examined"] / max(1, counted["rank_queries"]),
        us_per_rank_query=server_cpu / max(1, counted["rank_queries"]) * 1e6,
        server_likes=counted["likes"],
        server_posts=counted["posts"],
        us_per_done_event=server_cpu / max(1, counted["likes"] + counted["posts"]) * 1e6,
    )
    events = stats.likes_sent + stats.posts_sent
    f.update(
        load_wall_s=wall,
        server_cpu_s=server_cpu,
        server_busy=server_cpu / wall,
        us_per_event=server_cpu / max(1, events) * 1e6,
        us_per_change=server_cpu / max(1, stats.changes) * 1e6,
        generator_busy=(gen1 - gen0) / wall,
        likes_sent=stats.likes_sent,
        likes_ok=stats.likes_ok,
        posts_sent=stats.posts_sent,
        posts_ok=stats.posts_ok,
        open_ms=_lat(open_times),
        reopen_ms=_lat(stats.reopen),
        like_ms=_lat(stats.like_to_event),
        like_first_ms=_lat(stats.like_first_view),
        like_ack_ms=_lat(stats.like_acks),
        post_ack_ms=_lat(stats.post_acks),
        post_ms=_lat(stats.post_to_view),
        post_entries=stats.post_entries,
        changes=stats.changes,
        changes_per_s=stats.changes / wall,
        change_bytes=stats.change_bytes,
        change_mean_bytes=stats.change_bytes / max(1, stats.changes),
        change_mean_items=stats.change_items / max(1, stats.changes),
        measured_likes=stats.measured_likes,
        left=stats.left,
        unresolved=load.unresolved(),
        skipped_likes=stats.skipped_likes,
        reopen_skipped=stats.reopen_skipped,
        lag_ms=stats.lag * 1000,
        errors=dict(stats.errors),
        view_sessions=len(view_sessions),
        loaded_posts=loaded,
        bytes_per_live_post=(rss_loaded - rss_before) * 1024 / max(1, loaded),
        rss_before_mib=rss_before / 1024,
        rss_loaded_mib=rss_loaded / 1024,
        rss_views_mib=rss_views / 1024,
        rss_end_mib=rss_end / 1024,
        rss_peak_mib=status_kib(pid, "VmHWM") / 1024,
    )
    return f


FEED_METRICS = {
    "parley_feed_view_wakes_total": "wakes",
    "parley_feed_changes_total": "changes",
    "parley_feed_examined_posts_count": "rank_queries",
    "parley_feed_examined_posts_sum": "examined",
    "parley_feed_likes_total": "likes",
    "parley_feed_posts_total": "posts",
}


def feed_metrics(ops_port: int) -> dict[str, float]:
    """The server's feed counters, from its /metrics."""
    url = f"http://127.0.0.1:{ops_port}/metrics"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    found = dict.fromkeys(FEED_METRICS.values(), 0.0)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in FEED_METRICS:
            found[FEED_METRICS[name]] = float(value)
    return found


def _py_spy(out: Path | None, pid: int, seconds: float) -> "subprocess.Popen[bytes] | None":
    """py-spy sampling the server for ``seconds`` into ``out`` (raw, for flamegraphs)."""
    if out is None:
        return None
    found = shutil.which("py-spy")
    if found is None:
        raise SystemExit("--py-spy needs py-spy on PATH (pip install py-spy)")
    command = [found, "record", "-r", "100", "-f", "raw", "-o", str(out), "-p", str(pid)]
    return subprocess.Popen([*command, "-d", str(max(1, int(seconds))), "--nonblocking"])


QUICK = {
    "posts": 50_000,
    "live": 5_000,
    "views": 100,
    "seconds": 5.0,
    "likes_rate": 500.0,
    "posts_rate": 20.0,
    "like_sessions": 20,
    "post_sessions": 2,
    "reopen_sessions": 2,
    "reopen_rate": 2.0,
    "idle_seconds": 0.5,
}
DEFAULTS = {
    "posts": 1_000_000,
    "live": 100_000,
    "views": 1000,
    "seconds": 30.0,
    "likes_rate": 2000.0,
    "posts_rate": 100.0,
    "like_sessions": 400,
    "post_sessions": 10,
    "reopen_sessions": 10,
    "reopen_rate": 10.0,
    "idle_seconds": 2.0,
}


@contextmanager
def _database(args: argparse.Namespace, stack: ExitStack) -> Iterator[tuple[str, Seed, str]]:
    """(url, seed, description) of the seeded database."""
    if args.postgres or args.database_url:
        url = args.database_url
        what = "PostgreSQL at " + redact_url(url or "")
        if args.postgres:
            root = str(Path(__file__).resolve().parent.parent)
            if root not in sys.path:
                sys.path.append(root)
            from tests.postgres import private_postgres

            pg = stack.enter_context(private_postgres())
            url = pg.new_database()
            what = "a private PostgreSQL (tests/postgres.py), fsync on"
        progress(f"seed: {args.posts:,} posts ({args.live:,} live) into {redact_url(url)}")
        seed = trio.run(write_seed, url, args.posts, args.live, args.views, args.seed)
        yield url, seed, what
        return
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="parley-feedbench-")))
    url, seed = seeded_sqlite(args, tmp)
    yield url, seed, "SQLite file (WAL, synchronous=FULL)"


def run(args: argparse.Namespace) -> int:
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 20_000)), hard))
    tail = sys.argv[sys.argv.index("feed") + 1 :] if "feed" in sys.argv else []
    command = " ".join(["parley bench feed", *tail])
    with ExitStack() as stack, _database(args, stack) as (url, seed, database):
        progress(
            f"seed: {'cached' if seed.cached else 'written'} in {seed.seconds:.1f} s "
            f"({seed.posts / max(seed.seconds, 1e-9):,.0f} posts/s)"
        )
        port = free_port()
        secret = "feed-bench-" + "x" * 32
        ops_port = free_port()
        flags = ["--feed-interval", str(args.feed_interval), "--ops-port", str(ops_port)]
        with start_server(port, secret, url, args.server_cpu, flags) as pid:
            figures = trio.run(run_load, args, port, ops_port, secret, pid, seed)
    figures.update(
        command=command,
        database=database,
        seed=f"seeded in {seed.seconds:.0f} s" + (", from the seed cache" if seed.cached else ""),
        posts=seed.posts,
        live=seed.live,
        shards=len(seed.cells),
        views=args.views,
        limit=args.limit,
        likes_rate=args.likes_rate,
        posts_rate=args.posts_rate,
        seconds=args.seconds,
        on_page=args.on_page,
        feed_interval=args.feed_interval,
        seed_seconds=seed.seconds,
    )
    print(Result(figures).report())
    if args.json:
        with args.json.open("a") as out:
            out.write(json.dumps(figures) + "\n")
    return 1 if figures["errors"] else 0


def add_parser(kinds: "argparse._SubParsersAction[Any]", formatter: Any) -> None:
    p = kinds.add_parser(
        "feed",
        help="live ranked feeds: feed-open and like-to-event latency, CPU, memory per post",
        description=(__doc__ or "").split("\n\n", 1)[1],
        formatter_class=formatter,
    )
    default = "(default {}; --quick: {})"
    for name, kind, text in (
        ("posts", int, "posts in storage"),
        ("live", int, "of them within the horizon (in the shards)"),
        ("views", int, "measured feed views"),
        ("seconds", float, "seconds of load"),
        ("likes-rate", float, "likes/s"),
        ("posts-rate", float, "new posts/s"),
        ("like-sessions", int, "sessions the likes come from (a user likes a post once)"),
        ("post-sessions", int, "sessions the posts come from"),
        ("reopen-sessions", int, "sessions closing and opening a view during the load"),
        ("reopen-rate", float, "views/s closed and opened again during the load"),
        ("idle-seconds", float, "seconds of server CPU measured idle, views open"),
    ):
        key = name.replace("-", "_")
        p.add_argument(
            f"--{name}", type=kind, help=f"{text} {default.format(DEFAULTS[key], QUICK[key])}"
        )
    p.add_argument("--quick", action="store_true", help="a small run, for the test suite")
    p.add_argument("--views-per-session", type=int, default=4, help="views per view session")
    p.add_argument("--limit", type=int, default=20, help="page size of every view")
    p.add_argument("--radius-min", type=int, default=2000, help="view radius, metres")
    p.add_argument("--radius-max", type=int, default=20_000, help="view radius, metres")
    p.add_argument("--open-window", type=int, default=1, help="feed opens in flight (warm opens)")
    p.add_argument(
        "--on-page", type=float, default=0.1, help="fraction of likes aimed at posts on pages"
    )
    p.add_argument("--feed-interval", type=float, default=0.1, help="the server's flag")
    p.add_argument("--seed", type=int, default=14, help="random seed of the data and load")
    p.add_argument(
        "--seed-dir",
        help="keep the seeded SQLite file here and reuse it for a day (same sizes and seed)",
    )
    p.add_argument("--database-url", help="seed and serve this (empty) database instead")
    p.add_argument("--postgres", action="store_true", help="start a private PostgreSQL and use it")
    p.add_argument("--server-cpu", type=int, metavar="CORE", help="pin the server to this CPU core")
    p.add_argument("--json", type=Path, help="append the figures to this JSON-lines file")
    p.add_argument(
        "--py-spy",
        type=Path,
        metavar="FILE",
        help="sample the server with py-spy during the load (raw stacks into FILE)",
    )
    p.set_defaults(func=run)
