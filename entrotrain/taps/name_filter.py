"""Choosing modules by name: glob ``include`` / ``exclude`` patterns, shared by every tap."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

__all__ = ["NameFilter"]


def _as_list(patterns: str | Sequence[str] | None) -> list[str]:
    if patterns is None:
        return []
    return [patterns] if isinstance(patterns, str) else list(patterns)


class NameFilter:
    """``fnmatch`` globs (``"blocks.*.attn"``; ``*`` also matches dots): a name passes when it matches one of
    ``include`` (default ``["*"]``) and none of ``exclude``."""

    def __init__(self, include: str | Sequence[str] | None = None, exclude: str | Sequence[str] | None = None) -> None:
        self.include = _as_list(include) or ["*"]
        self.exclude = _as_list(exclude)

    def __call__(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.include) and not any(
            fnmatch.fnmatchcase(name, p) for p in self.exclude
        )
