"""The one non-finite-data policy every entrotrain monitor follows (DESIGN.md §8).

Non-finite *data* (NaN/Inf activations, attention rows, entropies, rewards, weights) is never an error in a
callback. A monitor

- counts it and publishes the count as ``…/nonfinite`` at every logging step (0 when clean);
- leaves it out of every statistic (rows with a NaN/Inf value are dropped, see
  :func:`entrotrain.functional.finite_row_mask`);
- warns once per fit, not at every step (:class:`NonFiniteCounter`);
- publishes a statistic it could not compute as NaN to ``trainer.callback_metrics`` only (``publish_scalars``
  with ``source=``), so a stale value never stands in for a current one and no logger receives NaN;
- never lets a non-finite value into its state (histories, fits, running estimates).
"""

from __future__ import annotations

import math

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["NonFiniteCounter", "is_finite_number"]


def is_finite_number(value: float | None) -> bool:
    """``value`` is a real, finite number (``None``, NaN and ±Inf are not)."""
    return value is not None and math.isfinite(value)


class NonFiniteCounter:
    """Counts non-finite data a monitor met in one fit and warns about it once.

    Args:
        owner: the monitor's name, for the message (``"RepresentationEntropyMonitor"``).
        key: the metric key the count is published under (named in the warning).
    """

    def __init__(self, owner: str, key: str) -> None:
        self.owner = owner
        self.key = key
        self.total = 0.0
        self._warned: set[str] = set()

    def reset(self) -> None:
        """Forget the count and the warnings (at the start of every fit)."""
        self.total = 0.0
        self._warned.clear()

    def add(self, count: float, what: str, where: str) -> float:
        """Count ``count`` non-finite items met at ``where`` (e.g. ``"step 12"``); ``what`` says what they are, as
        the rest of the sentence ``"{count} {what}"`` (e.g. ``"activation rows held NaN/Inf"``); warn the first time
        in this fit. Returns ``count`` as a float."""
        count = float(count)
        if count > 0:
            self.total += count
            self.warn_once(
                "nonfinite",
                f"{self.owner}: {int(count)} {what} at {where}; they are counted in {self.key} and left "
                "out of every statistic (statistics that cannot be computed go to trainer.callback_metrics as NaN, "
                "never to a logger). This warning is shown once per fit.",
            )
        return count

    def warn_once(self, topic: str, message: str) -> None:
        """Warn ``message`` the first time ``topic`` comes up in this fit (rank zero)."""
        if topic not in self._warned:
            self._warned.add(topic)
            rank_zero_warn(message)
