"""Fail when coverage falls under its floors; ./run-tests runs this after the suite.

    python scripts/coverage_floors.py coverage.json

The floors sit just under what the suite reached when they were set, so a change that
leaves code untested fails here instead of going unnoticed. Raise them as tests grow.
"""

import json
import sys

BRANCHES = 71.0  # percent of all branches taken, over the product's packages (reached 72.9)
FILE_LINES = 85.0  # percent of lines run, in every module but the exceptions
# Modules under FILE_LINES, or within 3 points of it, in any of three full runs when the
# floors were set, each with its own floor 3 points under its lowest (hypothesis draws
# new examples each run and a few paths depend on timing, so a module varies by up to
# 7 points): the ones to write tests for first.
EXCEPTIONS: dict[str, float] = {
    "actors/cluster.py": 83,
    "actors/cluster_presence.py": 81,
    "actors/feed_cells.py": 77,
    "actors/feed_index.py": 83,
    "actors/feed_shard.py": 70,
    "actors/feed_view.py": 76,
    "actors/kv.py": 81,
    "actors/kvmap.py": 77,
    "actors/outbox.py": 79,
    "actors/profile.py": 70,
    "actors/quotas.py": 78,
    "actors/receipts.py": 74,
    "actors/remote.py": 81,
    "actors/room.py": 77,
    "actors/session.py": 75,
    "actors/session_feeds.py": 70,
    "actors/timers.py": 84,
    "protocol/client.py": 84,
    "protocol/kv.py": 78,
    "protocol/wsframe.py": 83,
    "protocol/wsserver.py": 82,
    "server/admin.py": 61,
    "server/chat.py": 84,
    "server/connection.py": 79,
    "server/listener.py": 79,
    "server/ops.py": 75,
    "server/workers_ops.py": 81,
    "storage/postgres.py": 79,
    "storage/redis_conn.py": 82,
    "storage/redis_link.py": 81,
    "storage/redis_pubsub.py": 80,
}


def main(path: str) -> int:
    with open(path) as f:
        report = json.load(f)
    totals = report["totals"]
    branches = 100.0 * totals["covered_branches"] / max(1, totals["num_branches"])
    failures = []
    if branches < BRANCHES:
        failures.append(f"branches {branches:.1f} % < floor {BRANCHES} %")
    for name, data in sorted(report["files"].items()):
        lines = data["summary"]["percent_statements_covered"]
        floor = EXCEPTIONS.get(name, FILE_LINES)
        if lines < floor:
            failures.append(f"{name}: lines {lines:.1f} % < floor {floor} %")
    print(
        f"coverage floors: branches {branches:.1f} % (floor {BRANCHES} %); lines at least "
        f"{FILE_LINES} % in every module but {len(EXCEPTIONS)} with floors of their own"
    )
    for failure in failures:
        print(f"coverage under its floor: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
