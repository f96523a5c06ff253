"""Which heads (or layers) a guard's aggregate key fell on, for the firing's message.

A guard on ``entropy/attn_norm/min`` fires on the least entropic head of the model, but the message used to say only
the value: ``= 0.01222 fell below 0.05``. The monitors publish the per-head values in the same publication
(``entropy/attn_norm/L2/H3``), so the firing can name where the collapse is, at 2 a.m., without opening a
dashboard: ``entropy/attn_norm/min = 0.01222 fell below 0.05 (3 heads below: L2/H3 = 0.01222, L3/H0 = 0.031,
L1/H2 = 0.048)``. An aggregate key is one ending in ``/min``, ``/max`` or ``/p05``; its parts are the keys of the same
folder named ``L<layer>/H<head>`` (or ``L<layer>`` alone when no per-head key was published).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["worst_parts"]

_AGGREGATES = ("min", "max", "p05")
_PART = re.compile(r"L\d+(/H\d+)?")
_SHOWN = 3


def worst_parts(monitor: str, beside: Mapping[str, Any] | None, threshold: float, below: bool) -> str:
    """`` (N heads below: L2/H3 = 0.01222, ...)`` for the parts of the aggregate key ``monitor`` among ``beside`` (the
    values published with it) on the bad side of ``threshold`` (``below``: under it), worst first; ``""`` when
    ``monitor`` is no aggregate or no part is on the bad side."""
    folder, _, name = monitor.rpartition("/")
    if not beside or not folder or name not in _AGGREGATES:
        return ""
    parts = {}
    for key, value in beside.items():
        if key.startswith(folder + "/") and _PART.fullmatch(key[len(folder) + 1:]) and isinstance(value, (int, float)):
            if not isinstance(value, bool) and math.isfinite(value):
                parts[key[len(folder) + 1:]] = float(value)
    heads = {part: value for part, value in parts.items() if "/H" in part}
    parts = heads or parts
    bad = sorted(((v, p) for p, v in parts.items() if (v < threshold if below else v > threshold)), reverse=not below)
    if not bad:
        return ""
    kind = "heads" if heads else "layers"
    if len(bad) == 1:
        kind = kind[:-1]
    shown = ", ".join(f"{part} = {value:.4g}" for value, part in bad[:_SHOWN])
    more = f", +{len(bad) - _SHOWN} more" if len(bad) > _SHOWN else ""
    return f" ({len(bad)} {kind} {'below' if below else 'above'}: {shown}{more})"
