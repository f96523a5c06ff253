"""A per-logging-step history whose size is bounded however long the run: what monitors keep for summaries, the
heads-over-time image and their checkpoint state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["ThinnedHistory"]


class ThinnedHistory(list):
    """A list of per-logging-step records that never holds more than ``capacity`` of them.

    When an append makes it longer than ``capacity``, every other record is dropped (the first and the newest are
    always kept), so the history still spans the whole run, at halving resolution: memory and checkpoint size stay
    O(capacity) for a week-long run logging at every step, and appends stay O(1) amortised. Two histories that are
    appended in lockstep (e.g. steps and values) are thinned identically: which records survive depends only on the
    length.

    Args:
        items: initial records (e.g. restored from a checkpoint; thinned if too many).
        capacity: the most records kept, at least 2.
    """

    def __init__(self, items: Iterable[Any] = (), capacity: int = 1024) -> None:
        super().__init__(items)
        if capacity < 2:
            raise ValueError(f"capacity must be at least 2, got {capacity}.")
        self.capacity = capacity
        self._thin()

    def append(self, item: Any) -> None:
        super().append(item)
        self._thin()

    def _thin(self) -> None:
        while len(self) > self.capacity:
            odd_last = (len(self) - 1) % 2 == 1  # the newest record would be dropped by [::2]: keep it too
            last = self[-1]
            self[:] = self[::2] + ([last] if odd_last else [])
