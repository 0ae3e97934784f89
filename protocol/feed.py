"""A client's copy of one feed view's live page, sans-IO.

    view = FeedView(page)          # the answer to feedopen
    view.apply(changed)            # each feedchanged of view.number, in order
    view.items                     # the page now, in rank order

A ``feedchanged`` names the whole new page (``posts``, in rank order) and carries the
items that entered or changed; every other post keeps the item it had.
"""

from protocol.frames import FeedChanged, FeedItem, FeedPage


class FeedView:
    __slots__ = ("items", "number", "ts")

    def __init__(self, page: FeedPage) -> None:
        self.number = page.view
        self.ts = page.ts
        self.items: tuple[FeedItem, ...] = page.items

    def apply(self, changed: FeedChanged) -> None:
        """Apply a change of this view; raises ``ValueError`` if it names a post that
        it neither carries nor the page had (a change was missed)."""
        if changed.view != self.number:
            raise ValueError(f"a change of view {changed.view}, not {self.number}")
        known = {item.post: item for item in self.items}
        known.update((item.post, item) for item in changed.items)
        missing = [post for post in changed.posts if post not in known]
        if missing:
            raise ValueError(f"posts {missing} neither on the page nor in the change")
        self.items = tuple(known[post] for post in changed.posts)
        self.ts = changed.ts

    @property
    def posts(self) -> list[int]:
        return [item.post for item in self.items]
