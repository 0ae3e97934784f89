"""What a feed shard's ranking costs: ``FeedIndex.top`` against the brute force.

``python -m loadtests.feedindexbench [--posts N] [--viewers N] [--scales 8,16,32,64]``

One shard's cell (Madrid's, 2° by 2°) holds ``--posts`` posts over 7 days, clustered
around five towns with a gaussian spread (plus a few rural ones); authors, categories
and counts follow power laws. Viewers stand where posts are (people post where they
live), with a radius of 5 to 50 km, following up to 40 authors and interested in up to
6 categories. The first ``--brute`` viewers' tops are checked against the brute force.
Times are CPU time of this process, steadier than wall time on a shared machine.
"""

import argparse
import gc
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from typing import cast

from actors.feed_index import GRID_SCALES, FeedIndex, LivePost, Viewer, brute_force_top

HOUR = 3_600_000
WEEK = 168 * HOUR
AT = 1_800_000_000_000  # the ranking instant: posts are from the week before
# (lat, lon, spread in degrees, weight): one big city, four towns, and the countryside.
TOWNS = [
    (40.42, -3.70, 0.08, 60),
    (40.48, -3.36, 0.03, 8),
    (40.03, -3.60, 0.02, 4),
    (41.65, -2.47, 0.02, 4),
    (40.95, -2.60, 0.05, 4),
]
RURAL = 0.1


def place(rng: random.Random) -> tuple[float, float]:
    if rng.random() < RURAL:
        return rng.uniform(40, 42), rng.uniform(-4, -2)
    lat, lon, spread, _ = rng.choices(TOWNS, weights=[t[3] for t in TOWNS])[0]
    return (
        min(41.999, max(40.0, rng.gauss(lat, spread))),
        min(-2.001, max(-4.0, rng.gauss(lon, spread))),
    )


def zipf(rng: random.Random, n: int) -> int:
    return int(rng.paretovariate(1.0)) % n


def make_posts(n: int, rng: random.Random) -> list[LivePost]:
    posts = []
    for number in range(1, n + 1):
        lat, lon = place(rng)
        post = LivePost(
            post=number * 16384 + 7,
            author=f"u{zipf(rng, 400)}",
            cid=str(number),
            ts=AT - rng.randrange(WEEK),
            lat=lat,
            lon=lon,
            category=f"k{zipf(rng, 200)}",
            comments=int(rng.paretovariate(1.5)) - 1,
        )
        post.likers = {f"l{i}" for i in range(min(5000, int(rng.paretovariate(1.1)) - 1))}
        posts.append(post)
    return posts


def make_viewer(rng: random.Random) -> Viewer:
    lat, lon = place(rng)
    return Viewer(
        lat=lat,
        lon=lon,
        radius=rng.uniform(5000, 50_000),
        follows=frozenset(f"u{zipf(rng, 400)}" for _ in range(rng.randrange(41))),
        interests=frozenset(f"k{zipf(rng, 200)}" for _ in range(rng.randrange(7))),
        hidden=frozenset(f"u{rng.randrange(400)}" for _ in range(rng.randrange(3))),
    )


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def traced(build: Callable[[], object]) -> tuple[int, object]:
    """Bytes allocated by ``build`` and still held, and what it built."""
    gc.collect()
    tracemalloc.start()
    built = build()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return held, built


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posts", type=int, default=100_000)
    parser.add_argument("--viewers", type=int, default=2000)
    parser.add_argument("--brute", type=int, default=20, help="viewers timed by brute force")
    parser.add_argument(
        "--scales",
        type=lambda text: tuple(int(s) for s in text.split(",")),
        default=GRID_SCALES,
        help="grid scales, e.g. 8,16,32",
    )
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    posts_bytes, built = traced(lambda: make_posts(args.posts, rng))
    posts = cast(list[LivePost], built)
    likers_bytes = sum(sys.getsizeof(p.likers) for p in posts)  # the sets, not the names
    index = FeedIndex(args.scales)

    def fill() -> None:
        for post in posts:
            index.add(post)

    index_bytes, _ = traced(fill)
    viewers = [make_viewer(rng) for _ in range(args.viewers)]

    times, pages, examined, seen = [], [], [], []
    for viewer in viewers:
        start = time.process_time()
        top = index.top(viewer, AT, args.k)
        times.append(time.process_time() - start)
        examined.append(index.examined)
        seen.append(index.seen)
        if top:
            start = time.process_time()
            index.top(viewer, AT, args.k, (top[-1].score, top[-1].post))
            pages.append(time.process_time() - start)
    brute = []
    for viewer in viewers[: args.brute]:
        start = time.process_time()
        expected = brute_force_top(index, viewer, AT, args.k)
        brute.append(time.process_time() - start)
        assert index.top(viewer, AT, args.k) == expected, viewer

    def us(values: list[float]) -> str:
        mean, p99 = statistics.mean(values) * 1e6, percentile(values, 0.99) * 1e6
        return f"mean {mean:.0f} µs, p50 {percentile(values, 0.5) * 1e6:.0f}, p99 {p99:.0f}"

    n = len(index)
    print(f"{n} posts, grids {args.scales}, {len(viewers)} viewers, k={args.k}, CPU time")
    print(f"top:          {us(times)}, max {max(times) * 1e6:.0f} µs")
    print(f"second page:  {us(pages)}")
    print(
        f"scored:       mean {statistics.mean(examined):.0f}, p99 {percentile(examined, 0.99):.0f}"
        f"; read: mean {statistics.mean(seen):.0f}, p99 {percentile(seen, 0.99):.0f}"
    )
    print(f"brute force:  {us(brute)} ({len(brute)} viewers, the same results)")
    print(
        f"memory:       {(posts_bytes + index_bytes) / n:.0f} B per live post: the index"
        f" {index_bytes / n:.0f}, the LivePost and its likers {posts_bytes / n:.0f}"
        f" (the likers sets alone {likers_bytes / n:.0f})"
    )


if __name__ == "__main__":
    main()
