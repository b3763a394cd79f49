"""Which input offset of one partition may be committed: the lowest one whose work is unfinished.

Reading a record opens its offset (``begin``); every piece of work it causes takes a reference
(``hold``) and gives it back when acknowledged (``done``); ``begin`` itself counts as one
reference, given back when the record has been handled. A manifest's parts stay open until the
manifest's own work is over. After a restart the relay re-reads from the committed offset, so
unfinished work is redone and finished work is skipped by the view.
"""

from __future__ import annotations

from collections import deque


class OffsetTracker:
    """Reference-counted open offsets of one input partition, read in increasing order."""

    def __init__(self) -> None:
        self._open: dict[int, int] = {}
        self._order: deque[int] = deque()
        self._last_read: int | None = None

    def begin(self, offset: int) -> None:
        """A record was read; its offset is open until ``done`` balances this call."""
        if self._last_read is not None and offset <= self._last_read:
            raise ValueError(f"offset {offset} read after {self._last_read}: offsets must increase")
        self._last_read = offset
        self._open[offset] = 1
        self._order.append(offset)

    def hold(self, offset: int) -> None:
        """One more piece of work must finish before ``offset`` is done."""
        if offset not in self._open:
            raise ValueError(f"offset {offset} is not open: it was never read or is already done")
        self._open[offset] += 1

    def done(self, offset: int) -> None:
        """One piece of work of ``offset`` (or its reading) is over."""
        count = self._open.get(offset)
        if count is None:
            raise ValueError(f"offset {offset} is not open: it was never read or is already done")
        if count == 1:
            del self._open[offset]
        else:
            self._open[offset] = count - 1

    def committable(self) -> int | None:
        """The offset to commit: the lowest open one, or the next to read; None before any read."""
        order = self._order
        while order and order[0] not in self._open:
            order.popleft()
        if order:
            return order[0]
        return None if self._last_read is None else self._last_read + 1

    @property
    def next_to_read(self) -> int:
        """The offset after the last one read (0 before any read): how far the reading stands."""
        return 0 if self._last_read is None else self._last_read + 1

    def is_open(self, offset: int) -> bool:
        return offset in self._open

    @property
    def open_count(self) -> int:
        """How many offsets read are not finished yet."""
        return len(self._open)
