"""Per-head sufficient statistics of attention entropy: what a tap accumulates and a monitor reduces.

A site's statistics are a ``(5, heads)`` float64 tensor of sums, so micro-batches, repeated calls and DDP ranks
combine by plain addition (one ``all_reduce(SUM)``) and means are formed only when logging:

====================  ===========================================================================
row                   meaning
====================  ===========================================================================
``ENTROPY_SUM``       :math:`\\sum H_i` over scored queries with at least one valid key
``NORMALIZED_SUM``    :math:`\\sum H_i / \\ln|V_i|` over scored queries with ``|V_i| >= 2``
``ROWS``              number of queries in ``ENTROPY_SUM``
``NORMALIZED_ROWS``   number of queries in ``NORMALIZED_SUM``
``NONFINITE``         queries whose entropy was NaN/Inf (non-finite q or k): counted, never averaged
====================  ===========================================================================

Padded queries (``query_mask`` False, see :mod:`entrotrain.taps.query_padding`) are in no row: not scored, not
counted, not non-finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from entrotrain.functional.attention import AttentionEntropy

__all__ = ["ENTROPY_SUM", "NORMALIZED_SUM", "ROWS", "NORMALIZED_ROWS", "NONFINITE", "N_STATS", "per_head_sums"]

ENTROPY_SUM, NORMALIZED_SUM, ROWS, NORMALIZED_ROWS, NONFINITE = range(5)
N_STATS = 5


def per_head_sums(result: AttentionEntropy, query_mask: Tensor | None = None) -> Tensor:
    """Reduce per-query results ``(batch, heads, queries)`` to the ``(5, heads)`` sums above.

    ``query_mask``: ``(batch, queries)`` bool, True = a real query; padded queries count in no row. ``None`` = all real.
    """
    entropy, normalized, n_keys = result
    finite = torch.isfinite(entropy)
    if query_mask is not None:
        real = query_mask[:, None, :].to(entropy.device)
        nonfinite = ~finite & real
        finite = finite & real
    else:
        nonfinite = ~finite
    has_keys = finite & (n_keys >= 1)
    has_norm = finite & (n_keys >= 2)
    zero = torch.zeros((), dtype=torch.float64, device=entropy.device)
    dims = (0, 2)
    return torch.stack(
        [
            torch.where(has_keys, entropy.double(), zero).sum(dims),
            torch.where(has_norm, normalized.double(), zero).sum(dims),
            has_keys.sum(dims, dtype=torch.float64),
            has_norm.sum(dims, dtype=torch.float64),
            nonfinite.sum(dims, dtype=torch.float64),
        ]
    )
