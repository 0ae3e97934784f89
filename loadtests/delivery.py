"""What receivers saw of their rooms' messages: lost, duplicated and reordered deliveries.

Sans-IO, like the codec: fed the ``seq`` of each ``message`` as it arrives and each
``joined`` as the session subscribes, it says whether the delivery was in order, and
keeps the counts. PROTOCOL.md section 7 is the rule checked: every subscriber receives a
room's messages in ``seq`` order, gap-free, without duplicates, and a resume that says
``recovered: true`` replays exactly the messages after the position it named.

A seq above the next one expected opens a gap: its seqs are *missing*. One of them
arriving later is *reordered* (and no longer missing); a seq seen already is a
*duplicate*. What is still missing when the room is checked at the end of the run is
*lost*, and so is the tail between the last seq received and the room's newest
(``finish``). ``joined`` with ``recovered: false`` legitimately skips what it cannot
replay: that room starts over at ``joined.seq`` and the skip is counted as *unrecovered*,
not lost.
"""

import enum

import attrs

# A gap wider than this is counted lost at once instead of remembered seq by seq, so a
# broken server cannot make a receiver hold millions of missing seqs.
MAX_MISSING = 10_000


class Verdict(enum.Enum):
    IN_ORDER = "in order"
    GAP = "gap"  # in order after a gap: the seqs between are missing
    REORDERED = "reordered"
    DUPLICATE = "duplicate"
    UNTRACKED = "untracked"  # a message of a room this session never joined


@attrs.define
class Counts:
    """The totals a report carries; they add up across sessions, users and workers."""

    delivered: int = 0
    duplicated: int = 0
    reordered: int = 0
    lost: int = 0
    unrecovered: int = 0

    def add(self, other: "Counts") -> None:
        for name in attrs.fields_dict(Counts):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def take(self) -> "Counts":
        """These counts, reset to zero: what happened since the last report."""
        out = Counts(**attrs.asdict(self))
        for name in attrs.fields_dict(Counts):
            setattr(self, name, 0)
        return out

    @property
    def faults(self) -> int:
        return self.duplicated + self.reordered + self.lost


@attrs.define
class _Room:
    last: int  # the highest seq received (or the subscription's start)
    missing: set[int] = attrs.field(factory=set)


@attrs.define
class DeliveryCheck:
    """The rooms one session (or one device across its reconnects) is subscribed to."""

    counts: Counts = attrs.field(factory=Counts)
    _rooms: dict[str, _Room] = attrs.field(factory=dict)

    def joined(self, room: str, seq: int, recovered: bool | None) -> None:
        """A ``joined``: without a resume (``recovered`` None) live messages start after
        ``seq``; with ``recovered`` true the replay of what came after the position named
        follows; with false the room starts over at ``seq``."""
        state = self._rooms.get(room)
        if state is None or recovered is None:
            self._rooms[room] = _Room(seq)
        elif not recovered:
            self.counts.unrecovered += len(state.missing) + max(0, seq - state.last)
            self._rooms[room] = _Room(max(seq, state.last))

    def positions(self) -> dict[str, int]:
        """Each room's highest seq received: what a reconnect resumes from (a gap stays
        missing, and is lost unless it arrives)."""
        return {room: state.last for room, state in self._rooms.items()}

    def message(self, room: str, seq: int) -> Verdict:
        state = self._rooms.get(room)
        if state is None:
            return Verdict.UNTRACKED
        if seq == state.last + 1:
            state.last = seq
            self.counts.delivered += 1
            return Verdict.IN_ORDER
        if seq > state.last:
            gap = seq - state.last - 1
            if len(state.missing) + gap > MAX_MISSING:
                self.counts.lost += gap
            else:
                state.missing.update(range(state.last + 1, seq))
            state.last = seq
            self.counts.delivered += 1
            return Verdict.GAP
        if seq in state.missing:
            state.missing.discard(seq)
            self.counts.delivered += 1
            self.counts.reordered += 1
            return Verdict.REORDERED
        self.counts.duplicated += 1
        return Verdict.DUPLICATE

    def forget(self, room: str) -> None:
        """Stop checking ``room``: the session is no longer subscribed (a resume was
        refused); what it lacks of it cannot be told from what it was never sent."""
        self._rooms.pop(room, None)

    def abandon(self) -> int:
        """The user stops before the end of the run: what is missing now is lost (the
        tail may still be on its way, and is not counted)."""
        lost = sum(len(state.missing) for state in self._rooms.values())
        self.counts.lost += lost
        self._rooms.clear()
        return lost

    def rooms(self) -> list[str]:
        return list(self._rooms)

    def caught_up(self, room: str, newest: int) -> bool:
        state = self._rooms.get(room)
        return state is None or (state.last >= newest and not state.missing)

    def finish(self, room: str, newest: int) -> int:
        """End the room's check: the room's newest seq is ``newest``, so whatever of it
        has not arrived is lost. Returns how many."""
        state = self._rooms.pop(room, None)
        if state is None:
            return 0
        lost = len(state.missing) + max(0, newest - state.last)
        self.counts.lost += lost
        return lost
