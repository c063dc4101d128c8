"""Which offset of a partition is safe to commit while calls finish out of order."""

from __future__ import annotations

from collections import deque


class PartitionOffsets:
    """Consumed offsets of one partition, in order, and which of them have finished.

    Kafka's committed offset means "everything before this is done", so it may
    only advance over a contiguous run of finished calls: the commit point is
    the first unfinished offset.
    """

    __slots__ = ("_committed", "_done", "_next", "_order")

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = None  # offset to commit: all before it have finished
        self._committed: int | None = None

    def __len__(self) -> int:
        """Calls consumed and not yet finished."""
        return len(self._order) - len(self._done)

    def track(self, offset: int) -> None:
        self._order.append(offset)

    def finish(self, offset: int) -> None:
        self._done.add(offset)
        while self._order and self._order[0] in self._done:
            first = self._order.popleft()
            self._done.remove(first)
            self._next = first + 1

    def to_commit(self) -> int | None:
        """The offset to commit now, or None when nothing new has finished."""
        return None if self._next == self._committed else self._next

    def committed(self, offset: int) -> None:
        self._committed = offset

    def commit_failed(self, offset: int) -> None:
        """Kafka refused the commit of `offset`: offer it again (unless a later one was sent)."""
        if self._committed == offset:
            self._committed = None
