"""``parley bench feed --quick`` end to end: a seeded database, a real server process,
views, likes and posts; it must finish without errors and produce every figure."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.feedbench import PostSet, Seed, cold_point, seed_records
from storage.store import LikeChanged, PostCreated

ROOT = Path(__file__).resolve().parent.parent


def test_post_set_add_discard_choice() -> None:
    s = PostSet()
    for post in (5, 6, 7, 6):
        s.add(post)
    s.discard(5)
    s.discard(9)
    assert sorted(s.items) == [6, 7] and len(s) == 2
    assert s.where == {p: i for i, p in enumerate(s.items)}


def test_seed_records_know_the_live_posts_and_their_likes() -> None:
    out = Seed(1_800_000_000_000, 200, 50, 3, [], [], {}, 0.0)
    records = list(seed_records(200, 50, 3, 14, out.now_ms, out))
    posts = [r for r in records if type(r) is PostCreated]
    likes = [r for r in records if type(r) is LikeChanged]
    assert len(posts) == 200 and len(out.live_ids) == 50
    assert [p.post for p in posts[150:]] == out.live_ids
    assert sum(out.live_likes) == len(likes)
    assert len({(like.post, like.user) for like in likes}) == len(likes)
    assert sum(out.cells.values()) == 50
    week_ago = out.now_ms - 7 * 86_400_000
    assert all(p.ts < week_ago for p in posts[:150])
    assert all(p.ts >= week_ago for p in posts[150:])
    for cell in out.cells:
        lat, lon = cold_point(cell)
        assert not math.isnan(lat + lon)


@pytest.mark.slow
def test_quick_bench_runs_clean(tmp_path: Path) -> None:
    out = tmp_path / "feed.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "bench", "feed", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["errors"] == {}
    assert figures["open_ms"]["n"] == 100
    assert figures["likes_sent"] == figures["likes_ok"] > 0
    assert figures["posts_sent"] == figures["posts_ok"] > 0
    assert figures["like_ms"]["n"] > 0 and figures["like_ms"]["p50"] > 0
    assert figures["changes"] > 0 and figures["change_bytes"] > 0
    assert figures["server_cpu_s"] > 0 and figures["bytes_per_live_post"] > 0
    assert figures["loaded_posts"] == 5000
    assert figures["unresolved"] == 0
    assert "feed-open" in done.stdout
