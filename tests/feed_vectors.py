"""Test vectors of the feed ranking (``protocol.ranking``), for PROTOCOL.md to quote.

Each row calls one function with ``args`` and expects ``expected`` to 12 significant
digits. ``python -m tests.feed_vectors`` prints them as a Markdown table;
``tests/test_ranking.py`` checks every row.
"""

from typing import Any

HOUR_MS = 3_600_000

VECTORS: list[dict[str, Any]] = [
    # geo(distance m, radius m): 1 at the viewer, 0 at the radius and beyond
    {"function": "geo", "args": [0, 10_000], "expected": 1.0},
    {"function": "geo", "args": [2_500, 10_000], "expected": 0.75},
    {"function": "geo", "args": [10_000, 10_000], "expected": 0.0},
    {"function": "geo", "args": [15_000, 10_000], "expected": 0.0},
    # freshness(age ms): halves every 6 hours; a post from the future counts as new
    {"function": "freshness", "args": [0], "expected": 1.0},
    {"function": "freshness", "args": [-60_000], "expected": 1.0},
    {"function": "freshness", "args": [HOUR_MS], "expected": 0.890898718140},
    {"function": "freshness", "args": [6 * HOUR_MS], "expected": 0.5},
    {"function": "freshness", "args": [12 * HOUR_MS], "expected": 0.25},
    # popularity(likes, comments): log(1 + n) / log(1001), capped at 1
    {"function": "popularity", "args": [0, 0], "expected": 0.0},
    {"function": "popularity", "args": [7, 3], "expected": 0.347080675085},
    {"function": "popularity", "args": [30, 0], "expected": 0.497048645404},
    {"function": "popularity", "args": [1000, 0], "expected": 1.0},
    {"function": "popularity", "args": [600, 400], "expected": 1.0},
    {"function": "popularity", "args": [5000, 0], "expected": 1.0},
    # distance_m(lat1, lon1, lat2, lon2): haversine on a sphere of 6,371,008.8 m
    {"function": "distance_m", "args": [0, 0, 0, 0], "expected": 0.0},
    {"function": "distance_m", "args": [0, 0, 1, 0], "expected": 111195.080234},  # R·π/180
    {
        "function": "distance_m",
        "args": [48.8566, 2.3522, 51.5074, -0.1278],  # Paris to London
        "expected": 343556.534881,
    },
    {
        "function": "distance_m",
        "args": [40.4168, -3.7038, 41.3874, 2.1686],  # Madrid to Barcelona
        "expected": 505096.361769,
    },
    # score((geo, freshness, popularity, subscription, category))
    {"function": "score", "args": [[1, 1, 1, 1, 1]], "expected": 1.0},
    {"function": "score", "args": [[0.5, 0.5, 0.5, 0, 0]], "expected": 0.425},
    {"function": "score", "args": [[0.75, 0.5, 0.25, 1, 0]], "expected": 0.575},
    {"function": "score", "args": [[0, 0, 0, 0, 1]], "expected": 0.05},
    # ranking_instant(now ms): rounded down to a whole minute
    {"function": "ranking_instant", "args": [1_700_000_123_456], "expected": 1_700_000_100_000},
]


def main() -> None:
    print("| function | arguments | expected |")
    print("|---|---|---|")
    for row in VECTORS:
        args = ", ".join(str(a) for a in row["args"])
        print(f"| `{row['function']}` | `{args}` | `{row['expected']:.12g}` |")


if __name__ == "__main__":
    main()
