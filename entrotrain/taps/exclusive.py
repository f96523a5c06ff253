"""Forwards that no other tap sees: a monitor's own probe or generation forwards.

A monitor that runs extra forwards of the model (a held-out probe set, greedy generation, an information-plane
probe) does so while other monitors' taps may still be armed for the training step. Without care those taps would
score the extra forwards as if they were training data. Inside ``with exclusive_capture(*taps):`` every armed tap
that is not one of ``taps`` ignores what runs (attention calls, module outputs, router logits), so what each
monitor reports does not depend on the order of the callbacks.

    >>> with exclusive_capture(my_tap), torch.no_grad():
    ...     model(probe)          # only my_tap records; every other tap skips these calls

Nests: the innermost block decides. The state is process-wide (taps hook modules, which are process-wide too).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["exclusive_capture", "capture_allowed"]

#: Stack of the tap sets allowed by the enclosing ``exclusive_capture`` blocks (innermost last).
_ALLOWED: list[frozenset[int]] = []


@contextmanager
def exclusive_capture(*taps: object) -> Iterator[None]:
    """Within the block only ``taps`` record (none when called without arguments); every other tap skips."""
    _ALLOWED.append(frozenset(id(tap) for tap in taps))
    try:
        yield
    finally:
        _ALLOWED.pop()


def capture_allowed(tap: object) -> bool:
    """Whether ``tap`` may record now: outside any ``exclusive_capture`` block, or named by the innermost one."""
    return not _ALLOWED or id(tap) in _ALLOWED[-1]
