"""A ``notify`` target named by import path in the guard tests (as a YAML recipe names one)."""

from __future__ import annotations

#: Messages received, in order.
RECEIVED: list[str] = []


def collect(message: str) -> None:
    RECEIVED.append(message)


NOT_CALLABLE = 42
