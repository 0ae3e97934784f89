"""The fine grid inside a feed shard's cell, and lower bounds of distances to its cells.

A grid cell is ``(row, column)`` in units of ``1/scale`` degree; with a power of two
for ``scale`` a point's cell and the cell's edges are exact floats. A feed ranking
reads only grid cells that may hold a post within the viewer's radius, best bound
first, so the bounds must never exceed a haversine distance (``distance_m``) to a
point of the cell; ``tests/test_feed_index.py`` checks it.
"""

import math

from protocol.ranking import EARTH_RADIUS_M

Key = tuple[int, int]


def grid_key(lat: float, lon: float, scale: int) -> Key:
    row = min(90 * scale - 1, max(-90 * scale, math.floor(lat * scale)))
    column = (math.floor(lon * scale) + 180 * scale) % (360 * scale) - 180 * scale
    return row, column


def _metres(radians: float) -> float:
    # Shaved so that float error never lifts a bound above a haversine distance.
    return max(0.0, radians * EARTH_RADIUS_M * (1 - 1e-9) - 1e-3)


def row_lower_bound(lat: float, row: int, scale: int) -> float:
    """Metres from latitude ``lat`` to the band of ``row``, or less: a path between
    latitudes is at least as long as the meridian arc between them."""
    south, north = row / scale, (row + 1) / scale
    gap = south - lat if lat < south else lat - north if lat > north else 0.0
    return _metres(math.radians(gap))


def column_lower_bound(lat: float, lon: float, column: int, scale: int) -> float:
    """Metres from ``(lat, lon)`` to the meridians of ``column``, or less: a point
    beyond the nearer edge meridian is beyond its great circle, at cross-track distance
    ``asin(cos φ · sin Δλ)``, which grows with Δλ up to 90°."""
    west, east = column / scale, (column + 1) / scale
    if west <= lon <= east:
        return 0.0
    dlon = min((west - lon) % 360, (lon - east) % 360, 90.0)
    return _metres(math.asin(min(1.0, math.cos(math.radians(lat)) * math.sin(math.radians(dlon)))))


def lower_bound(lat: float, lon: float, key: Key, scale: int) -> float:
    """A lower bound (metres) of the distance from ``(lat, lon)`` to grid cell ``key``."""
    row, column = key
    return max(row_lower_bound(lat, row, scale), column_lower_bound(lat, lon, column, scale))


def within(
    lat: float, lon: float, radius: float, scale: int
) -> tuple[dict[int, float], dict[int, float]]:
    """The rows and the columns whose bound from ``(lat, lon)`` is within ``radius``,
    each with its bound. A cell beyond that (``lower_bound`` above the radius) holds no
    point within it. Each walk goes outward from the point, as the bounds grow."""
    row0, column0 = grid_key(lat, lon, scale)
    rows: dict[int, float] = {}
    for row, step in ((row0, 1), (row0 - 1, -1)):
        while -90 * scale <= row < 90 * scale:
            bound = row_lower_bound(lat, row, scale)
            if bound > radius:
                break
            rows[row] = bound
            row += step
    columns: dict[int, float] = {}
    wrap = 360 * scale
    for start, step in ((column0, 1), (column0 - 1, -1)):
        for j in range(wrap):
            column = (start + step * j + 180 * scale) % wrap - 180 * scale
            bound = column_lower_bound(lat, lon, column, scale)
            if bound > radius or column in columns:
                break
            columns[column] = bound
    return rows, columns


def point_lower_bound(lat: float, cos_lat: float, lon: float, lat2: float, lon2: float) -> float:
    """A lower bound (metres) of the distance from ``(lat, lon)`` to ``(lat2, lon2)``,
    cheaper than the distance: the latitude gap, or the cross-track distance to the
    second point's meridian, with ``sin x >= x - x³/6`` and ``asin y >= y``.
    ``cos_lat`` is ``cos(radians(lat))``."""
    dlon = abs(lon2 - lon) % 360
    x = math.radians(min(dlon, 360 - dlon))
    cross = cos_lat * x * (1 - x * x / 6) if x < 1 else 0.0
    return _metres(max(math.radians(abs(lat2 - lat)), cross))
