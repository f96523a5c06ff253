"""A fixed-size, seeded reservoir of rows (Vitter's algorithm R), for measures that need samples, not moments.

Kernel-family measures (diffusion spectral entropy, RBF Vendi, DSMI) depend on ``n``: DSE ≤ log₂ n, so values are only
comparable across steps at a fixed ``n``. A reservoir keeps a uniform sample of exactly ``capacity`` rows (once that
many have been seen) of any stream, in bounded memory. It draws from its *own* ``torch.Generator`` (seeded, CPU),
never from the global RNG, so monitoring never changes training; with the same seed and the same stream (a fixed
probe set) it keeps the same rows every time.
"""

from __future__ import annotations

import torch
from torch import Tensor

from entrotrain._validation import check_int, check_tensor
from entrotrain.errors import EntrotrainError

__all__ = ["Reservoir"]


class Reservoir:
    """Uniform sample of ``capacity`` rows of a stream of ``(m, d)`` blocks, with optional per-row labels.

    Args:
        capacity: rows kept.
        seed: seed of the reservoir's own generator (re-applied by :meth:`reset`).

    Example:
        >>> r = Reservoir(256, seed=0)
        >>> for x in blocks:
        ...     r.add(x)
        >>> r.rows   # (min(256, seen), d), in slot order
    """

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = check_int(capacity, "capacity", low=1)
        self.seed = check_int(seed, "seed")
        self.reset()

    def reset(self) -> None:
        """Empty the reservoir and re-seed its generator."""
        self.seen = 0
        self._rows: Tensor | None = None
        self._labels: Tensor | None = None
        self._generator = torch.Generator().manual_seed(self.seed)

    @property
    def rows(self) -> Tensor | None:
        """The kept rows ``(min(capacity, seen), d)`` (``None`` before the first :meth:`add`)."""
        return None if self._rows is None else self._rows[: min(self.seen, self.capacity)]

    @property
    def labels(self) -> Tensor | None:
        """Labels of the kept rows, when labels were given to every :meth:`add`."""
        return None if self._labels is None else self._labels[: min(self.seen, self.capacity)]

    def add(self, rows: Tensor, labels: Tensor | None = None) -> None:
        """Offer ``rows`` ``(m, d)`` (and ``labels`` ``(m,)``) to the reservoir; copies what it keeps."""
        check_tensor(rows, "rows", ndim=2, layout="(m, d)")
        if labels is not None:
            check_tensor(labels, "labels", ndim=1, layout="(m,)")
            if labels.shape[0] != rows.shape[0]:
                raise EntrotrainError(
                    f"labels must be ({rows.shape[0]},), one per row of rows, got {tuple(labels.shape)}."
                )
        if self._rows is None:
            self._rows = rows.new_empty(self.capacity, rows.shape[1])
            if labels is not None:
                self._labels = labels.new_empty(self.capacity)
        elif rows.shape[1] != self._rows.shape[1]:
            raise EntrotrainError(f"rows have {rows.shape[1]} features, the reservoir holds {self._rows.shape[1]}.")
        if (labels is None) != (self._labels is None):
            raise EntrotrainError("give labels to every add() call or to none.")
        m = rows.shape[0]
        fill = max(0, min(m, self.capacity - self.seen))
        if fill:
            self._rows[self.seen : self.seen + fill] = rows[:fill]
            if self._labels is not None and labels is not None:
                self._labels[self.seen : self.seen + fill] = labels[:fill]
        rest = m - fill
        if rest:
            # algorithm R: item number i (0-based) replaces slot j ~ U{0..i} when j < capacity
            i = torch.arange(self.seen + fill, self.seen + m, dtype=torch.float64)
            j = (torch.rand(rest, generator=self._generator, dtype=torch.float64) * (i + 1)).floor().long()
            hit = (j < self.capacity).nonzero().flatten()
            if hit.numel():
                slots = j[hit]
                # a later item overwrites an earlier one in the same slot: keep the last per slot
                order = torch.arange(len(slots))
                last = torch.zeros(self.capacity, dtype=torch.long).scatter_reduce(
                    0, slots, order, reduce="amax", include_self=False
                )
                keep = last[slots] == order
                slots, src = slots[keep], (hit[keep] + fill).to(rows.device)
                self._rows[slots.to(rows.device)] = rows.index_select(0, src)
                if self._labels is not None and labels is not None:
                    self._labels[slots.to(labels.device)] = labels.index_select(0, src.to(labels.device))
        self.seen += m
