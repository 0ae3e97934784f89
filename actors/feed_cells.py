"""Which feed shard holds a post, and which shards a view must ask.

Posts are partitioned by place: the globe is cut into cells of ``CELL_DEGREES`` of
latitude by as many of longitude, and each cell is one FeedShard actor. A view asks only
the cells its circle touches: with the largest radius (``MAX_RADIUS_M``) that is at
most 4 cells below 60° of latitude, and at most ``MAX_VIEW_CELLS`` anywhere (near a
pole, a view of a larger circle is refused: its cost must stay bounded). Hashing would
spread a city's load over more actors, but then every view would ask every shard.

A post id carries its cell: ``number * CELLS + cell``, where ``number`` counts the
cell's posts from 1. So a like finds its shard without a lookup, each shard gives out
ids on its own (no coordination between nodes), and every id stays below 2^53, the
largest integer a JavaScript client reads exactly.
"""

import math

from protocol.limits import MAX_RADIUS_M as MAX_RADIUS_M
from protocol.ranking import EARTH_RADIUS_M

CELL_DEGREES = 2
LAT_CELLS = 180 // CELL_DEGREES
LON_CELLS = 360 // CELL_DEGREES
CELLS = 16384  # 2^14 > LAT_CELLS * LON_CELLS: the low bits of a post id
MAX_NUMBER = (2**53 - 1) // CELLS  # posts one cell can ever make
MAX_VIEW_CELLS = 16  # shards one view may read: a large radius near a pole is refused


def cell_of(lat: float, lon: float) -> int:
    row = min(LAT_CELLS - 1, int((lat + 90) // CELL_DEGREES))
    column = min(LON_CELLS - 1, int((lon + 180) // CELL_DEGREES))
    return row * LON_CELLS + column


def post_id(number: int, cell: int) -> int:
    return number * CELLS + cell


def cell_of_post(post: int) -> int | None:
    """The cell of ``post``, or None if no post can have that id."""
    cell = post % CELLS
    return cell if cell < LAT_CELLS * LON_CELLS and post >= CELLS else None


def bounds(cell: int) -> tuple[float, float, float, float]:
    """``(south, north, west, east)`` of ``cell``, in degrees."""
    row, column = divmod(cell, LON_CELLS)
    south = row * CELL_DEGREES - 90
    west = column * CELL_DEGREES - 180
    return south, south + CELL_DEGREES, west, west + CELL_DEGREES


def widest_radius(lat: float, lon: float, radius_m: float) -> int:
    """The largest radius (whole metres) up to ``radius_m`` whose circle touches at most
    ``MAX_VIEW_CELLS`` cells; 0 if none does. The count grows with the radius."""
    lo, hi = 0, int(radius_m)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(cells_within(lat, lon, mid)) <= MAX_VIEW_CELLS:
            lo = mid
        else:
            hi = mid - 1
    return lo


def cells_within(lat: float, lon: float, radius_m: float) -> list[int]:
    """Every cell holding a point within ``radius_m`` of ``(lat, lon)`` (maybe a few
    more: the box around the circle)."""
    dlat = math.degrees(radius_m / EARTH_RADIUS_M)
    south, north = max(-90.0, lat - dlat), min(90.0, lat + dlat)
    if south <= -90.0 or north >= 90.0:
        west, east = -180.0, 180.0  # a pole is within reach: every longitude is
    else:
        narrowest = min(math.cos(math.radians(south)), math.cos(math.radians(north)))
        dlon = math.degrees(radius_m / (EARTH_RADIUS_M * max(narrowest, 1e-9)))
        west, east = lon - dlon, lon + dlon
    rows = range(cell_of(south, 0) // LON_CELLS, cell_of(north, 0) // LON_CELLS + 1)
    if east - west >= 360:
        columns = list(range(LON_CELLS))
    else:
        first = int((west + 180) // CELL_DEGREES)
        last = int((east + 180) // CELL_DEGREES)
        columns = sorted({c % LON_CELLS for c in range(first, last + 1)})
    return [row * LON_CELLS + column for row in rows for column in columns]
