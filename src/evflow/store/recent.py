"""The latest events this process committed, kept in memory for whoever tails the log.

The outbox reads the log in global order right behind the appends. Reading back what was
just written costs a query and a decode per event, so the store keeps its own latest
commits here and serves such reads from memory. It may only do so where memory and file
agree: a commit's rows take consecutive positions (its transaction holds the write lock),
so the position before its first row is the log's end before it. If that is not where
the kept events end, another process wrote in between, and the kept events start over
after those writes.
"""

from __future__ import annotations

from bisect import bisect_right
from operator import attrgetter

from ..events import StoredEvent

DEFAULT_SIZE = 8192
"""Events kept: a few seconds of appends at full speed."""


class RecentEvents:
    """The log's latest events, as committed by this process.

    Every row of the log with a position in ``(start, end]`` is kept here, in order.

    Args:
        end: the log's last position when the store opened.
        size: events kept at least; up to twice as many are, between trims.
    """

    def __init__(self, end: int = 0, size: int = DEFAULT_SIZE):
        self.start = end
        """The position after which every event is kept."""
        self.end = end
        """The last position kept (or, with none kept, known to be the log's last)."""
        self._events: list[StoredEvent] = []
        self._size = size

    def committed(self, before: int | None, events: list[StoredEvent]) -> None:
        """Take the events of a commit, whose rows follow position ``before`` (None: it
        wrote no rows)."""
        if before is None:
            return
        if before != self.end:  # another process wrote since: start over from its writes
            self._events.clear()
            self.start = before
        self._events.extend(events)
        if events:
            self.end = events[-1].position
        if len(self._events) > 2 * self._size:  # trimmed now and then, not on every commit
            dropped = len(self._events) - self._size
            self.start = self._events[dropped - 1].position
            del self._events[:dropped]

    def after(self, position: int, limit: int) -> list[StoredEvent] | None:
        """Up to ``limit`` events after ``position``; None if some of them may not be kept
        (they are older, or newer than this process has seen): read the file then."""
        if position < self.start or position >= self.end:
            return None
        first = bisect_right(self._events, position, key=_position)
        return self._events[first : first + limit]


_position = attrgetter("position")
