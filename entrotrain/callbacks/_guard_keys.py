"""A guard watching a key its monitors will never publish: a typo, said at the first logging step.

A guard's ``monitor`` key that nothing logs leaves the guard judging nothing, silently (``missing_ok=True`` waits for
the key, which may be logged later, e.g. at validation). When a publication holds keys of the same folder as the
guard's key (``entropy/attn_norm/`` for ``entropy/attn_norm/mni``) and one close to it but not the key itself, the
key is a typo: the Lightning glue (:func:`~entrotrain.callbacks._publish.publish_scalars`) and the plain-loop / HF
glue warn once per key and fit, naming the close key.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

__all__ = ["misspelt_key", "warn_misspelt_keys"]


def misspelt_key(key: str, published: Collection[str]) -> str | None:
    """The published key ``key`` was probably meant to be, or ``None``: ``key`` is not in ``published``, a key of its
    folder (the part before its last ``/``) is, and the last part of one of those is close to ``key``'s (``min`` for
    ``mni``; not ``reward_mean`` or ``tokens`` for ``mean``: compared whole, any two keys of one folder look alike)."""
    if key in published or "/" not in key:
        return None
    folder, _, name = key.rpartition("/")
    siblings = {k[len(folder) + 1:]: k for k in published if k.startswith(folder + "/")}
    close = difflib.get_close_matches(name, [leaf for leaf in siblings if "/" not in leaf], n=1, cutoff=0.6)
    return siblings[close[0]] if close else None


def warn_misspelt_keys(guards: Iterable[Any], published: Collection[str], step: int, warned: set[str]) -> None:
    """Warn (rank zero, once per key: ``warned`` holds the keys already said) for each guard that never observed its
    key while ``published`` (the keys published at ``step``) shows the key is misspelt."""
    for guard in guards:
        key = guard.monitor
        if key in warned or guard.last_seen_step is not None:
            continue
        meant = misspelt_key(key, published)
        if meant is None:
            continue
        warned.add(key)
        rank_zero_warn(
            f"EntropyCollapseGuard(monitor={key!r}) watches a key no monitor publishes: at step {step} they published "
            f"{meant!r}, not {key!r}, so the guard judges nothing. Fix the key: EntropyCollapseGuard({meant!r}, ...)."
        )
