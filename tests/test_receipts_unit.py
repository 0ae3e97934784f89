"""actors/receipts.py on its own: monotonic cursors, changes, counts."""

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.receipts import RoomReceipts
from protocol.frames import Cursor, SeqCount
from storage.store import ReceiptUpsert


def test_cursors_only_move_forward_and_read_implies_delivered() -> None:
    r = RoomReceipts("r")
    assert r.mark("bob", 5, None, head=10)
    assert not r.mark("bob", 3, None, head=10)  # lower: a no-op
    assert not r.mark("bob", 5, None, head=10)  # repeated: a no-op
    assert r.mark("bob", None, 7, head=10)  # read 7 implies delivered 7
    assert r.cursor("bob") == (7, 7)
    assert r.mark("bob", 99, None, head=10)  # beyond the head counts as the head
    assert r.cursor("bob") == (10, 7)
    assert not r.mark("carol", 0, 0, head=10)  # nothing to record


def test_changes_are_taken_once_and_stored_once() -> None:
    r = RoomReceipts("r", [("alice", 2, 1)])
    for seq in range(3, 9):  # a burst from two users
        r.mark("bob", seq, seq - 1, head=10)
        r.mark("alice", seq, None, head=10)
    changes = r.take_changes()
    assert changes is not None
    assert changes.cursors == (
        Cursor(user="alice", delivered=8, read=1),
        Cursor(user="bob", delivered=8, read=7),
    )
    assert (changes.lo, changes.hi) == (1, 8)  # bob's read moved from 0
    assert r.take_changes() is None
    assert r.take_unsaved() == [
        ReceiptUpsert(room="r", user="alice", delivered=8, read=1),
        ReceiptUpsert(room="r", user="bob", delivered=8, read=7),
    ]
    assert r.take_unsaved() == []


def test_who_lists_members_who_received_a_seq() -> None:
    r = RoomReceipts("r", [("alice", 5, 5), ("bob", 3, 1)])
    members = {"alice", "bob", "carol"}
    assert r.who(members, 4, 10) == ([Cursor(user="alice", delivered=5, read=5)], False)
    everyone, more = r.who(members, None, 10)
    assert [c.user for c in everyone] == ["alice", "bob", "carol"] and not more
    assert r.who(members, None, 2) == (everyone[:2], True)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from("abcde"), st.integers(0, 30), st.integers(0, 30)), max_size=40
    ),
    st.integers(1, 30),
)
def test_counts_match_a_brute_force_count(marks: list[tuple[str, int, int]], head: int) -> None:
    r = RoomReceipts("r")
    best: dict[str, list[int]] = {}
    for user, delivered, read in marks:
        r.mark(user, delivered, read, head)
        rd = min(read, head)
        dl = max(min(delivered, head), rd)
        old = best.setdefault(user, [0, 0])
        old[0], old[1] = max(old[0], dl), max(old[1], rd)
    for user, (d, rd) in best.items():
        assert r.cursor(user) == (d, rd)
    expected = tuple(
        SeqCount(
            seq=s,
            delivered=sum(1 for d, _ in best.values() if d >= s),
            read=sum(1 for _, rd in best.values() if rd >= s),
        )
        for s in range(1, head + 1)
    )
    assert r.counts(1, head) == expected
