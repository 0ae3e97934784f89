"""``protocol.feed.FeedView``: a client's copy of one feed view's live page, sans-IO."""

import pytest

from protocol.feed import FeedView
from protocol.frames import FeedChanged, FeedItem, FeedPage


def _item(post: int, score: float) -> FeedItem:
    return FeedItem(
        post=post, user="u", ts=1, lat=0.0, lon=0.0, category="news", likes=0, comments=0,
        score=score, parts=(score, 0.0, 0.0, 0.0, 0.0),
    )  # fmt: skip


def test_a_client_view_applies_changes_and_refuses_one_it_cannot_place() -> None:
    """``protocol.feed.FeedView``: a change names the whole page; an item it does not
    carry keeps what the page had; a change of another view, or one naming a post the
    client never got (a change was missed), is refused and leaves the page as it was."""
    view = FeedView(FeedPage(id=1, view=7, ts=10, items=(_item(1, 0.9), _item(2, 0.5))))
    view.apply(FeedChanged(view=7, ts=20, posts=(3, 1), items=(_item(3, 0.95),)))
    assert view.posts == [3, 1] and view.ts == 20
    assert [i.score for i in view.items] == [0.95, 0.9]
    with pytest.raises(ValueError, match="a change of view 8, not 7"):
        view.apply(FeedChanged(view=8, ts=30, posts=(1,)))
    with pytest.raises(ValueError, match=r"posts \[2\] neither on the page nor in the change"):
        view.apply(FeedChanged(view=7, ts=30, posts=(2, 3)))  # 2 left the page at 20
    assert view.posts == [3, 1] and view.ts == 20
