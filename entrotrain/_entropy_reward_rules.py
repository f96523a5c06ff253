"""The rules of :mod:`entrotrain.functional.entropy_reward_fit` that need no torch: the fit's record
(:class:`EntropyRewardFit`), how far H = 0 lies outside the data (:func:`fit_extrapolation`) and whether a fitted
ceiling is shown as a prediction (:func:`ceiling_verdict`, the module docstring there says why each rule).

They live outside :mod:`entrotrain.functional` (whose package imports torch) so that ``entrotrain status`` and
``entrotrain report``, which read a run record with numpy only, judge a run's ceiling without loading torch (~2 CPU s
per command). :mod:`entrotrain.functional.entropy_reward_fit` re-exports every name: the same objects, one
implementation. Minima and maxima of float64 values are exact, so the verdicts equal those computed on tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from entrotrain.errors import EntrotrainError

__all__ = [
    "CEILING_MAX_EXTRAPOLATION", "CEILING_MIN_POINTS", "CEILING_MIN_R2", "CeilingVerdict", "EntropyRewardFit",
    "ceiling_verdict", "fit_extrapolation",
]

#: Fewest fitted points for the ceiling to be shown as a prediction (R² ≥ 0.5 is then significant at p < 0.05).
CEILING_MIN_POINTS = 8
#: Least R² for the ceiling to be shown as a prediction (the law explains at least half of the reward's variance).
CEILING_MIN_R2 = 0.5
#: Largest :func:`fit_extrapolation` (distance of H = 0 from the data, in spans of exp(H)) for a shown ceiling.
CEILING_MAX_EXTRAPOLATION = 1.0


class EntropyRewardFit(NamedTuple):
    """Least-squares fit of ``R = -a·exp(H) + b``.

    Attributes:
        a: the fitted ``a`` (positive when reward rises as entropy falls, the regime of the paper).
        b: the fitted ``b``.
        ceiling: ``b - a``, the reward predicted at zero entropy.
        r2: coefficient of determination of the fit (1 = perfect). When the rewards are all equal the fitted line
            (slope 0) reproduces them exactly and ``r2 = 1.0`` (scikit-learn's finite convention): never NaN.
        n: number of points.
    """

    a: float
    b: float
    ceiling: float
    r2: float
    n: int

    def predict(self, entropy: Any) -> Any:
        """``-a·exp(H) + b`` (a tensor of entropies gives a tensor: its ``exp()``)."""
        exp = None if isinstance(entropy, (int, float)) else getattr(entropy, "exp", None)
        if callable(exp):
            return -self.a * exp() + self.b
        return -self.a * math.exp(entropy) + self.b


def _values(values: Sequence[float] | Any, name: str) -> np.ndarray:
    """``values`` (a sequence of numbers, or a tensor on any device) as a 1-D float64 array of per-step numbers (a
    0-dim value is one point): the numbers :func:`~entrotrain.functional.entropy_reward_fit.fit_entropy_reward`'s
    float64 tensor holds, without importing torch."""
    try:
        if hasattr(values, "detach"):  # a tensor: its float64 values
            data = np.asarray(values.detach().cpu().double().numpy())
        elif values is None:
            raise TypeError
        else:
            data = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, RuntimeError):
        raise EntrotrainError(
            f"{name} must be a sequence of numbers (one per logged step) or a 1-D tensor, got "
            f"{type(values).__name__}; e.g. [float(v) for v in history]."
        ) from None
    if data.ndim > 1:
        raise EntrotrainError(
            f"{name} must be 1-D (one value per logged step), got shape {tuple(data.shape)}; pass the per-step means, "
            f"or {name}.flatten() if every entry is one step."
        )
    return data.reshape(-1)


def fit_extrapolation(entropy: Sequence[float] | Any) -> float:
    r"""How far H = 0 (where the ceiling is read) lies outside the fitted entropies, in spans of :math:`x = e^H`.

    .. math:: d = \frac{\max(0,\ e^{H_{min}} - 1,\ 1 - e^{H_{max}})}{e^{H_{max}} - e^{H_{min}}}

    0 when H = 0 is inside the observed range, ``inf`` when all entropies are equal (or there are none). Computed as
    ``expm1(H_min) / (exp(H_min) · expm1(H_max - H_min))`` so nearly equal entropies keep their digits. Non-finite
    entries are ignored.
    """
    h = _values(entropy, "entropy")
    h = h[np.isfinite(h)]
    if h.size == 0:
        return math.inf
    lo, hi = float(h.min()), float(h.max())
    if lo <= 0.0 <= hi:
        return 0.0
    span = math.expm1(hi - lo)  # (e^{hi} - e^{lo}) / e^{lo}
    if span <= 0.0:
        return math.inf
    if lo > 0.0:
        return math.expm1(lo) / (math.exp(lo) * span) if math.isfinite(math.exp(lo)) else 1.0 / span
    return -math.expm1(hi) / (math.exp(lo) * span)  # all entropies below 0: x = 1 lies above the data


class CeilingVerdict(NamedTuple):
    """Whether a fit's ceiling ``b - a`` is shown as a prediction, and if not, why (see the module docstring).

    Attributes:
        shown: every check passed.
        reasons: one sentence per failed check (empty when ``shown``), to print beside the ceiling.
        extrapolation: :func:`fit_extrapolation` of the fitted entropies.
    """

    shown: bool
    reasons: tuple[str, ...]
    extrapolation: float


def ceiling_verdict(
    fit: EntropyRewardFit,
    entropy: Sequence[float] | Any,
    reward: Sequence[float] | Any,
) -> CeilingVerdict:
    """Judge ``fit.ceiling`` against the points it was fitted on (module docstring: points, R², extrapolation, range).

    Args:
        fit: the fit (``a``, ``b``, ``ceiling``, ``r2``, ``n``).
        entropy: ``(n,)`` the fitted entropies (nats).
        reward: ``(n,)`` the fitted rewards; their finite min/max is the observed reward range.

    Returns:
        :class:`CeilingVerdict`; ``reasons`` name the numbers that failed, e.g. ``"R² 0.16 < 0.5: ..."``.
    """
    reasons = []
    if not fit.a > 0:
        reasons.append(f"a = {fit.a:.3g} ≤ 0: the reward did not rise as the entropy fell, so the law has no ceiling")
    if fit.n < CEILING_MIN_POINTS:
        reasons.append(f"only {fit.n} fitted steps (at least {CEILING_MIN_POINTS} are needed)")
    if not fit.r2 >= CEILING_MIN_R2:
        reasons.append(
            f"R² {fit.r2:.2f} < {CEILING_MIN_R2:g}: the law explains less than half of the reward's variance"
        )
    h = _values(entropy, "entropy")
    h = h[np.isfinite(h)]
    d = fit_extrapolation(h)
    if not d <= CEILING_MAX_EXTRAPOLATION:
        where = f"{float(h.min()):.4g}–{float(h.max()):.4g}" if h.size else "none"
        reasons.append(
            f"extrapolated: H = 0 lies {d:.3g} spans of exp(H) outside the observed entropies ({where} nats; at most "
            f"{CEILING_MAX_EXTRAPOLATION:g} allowed)"
        )
    r = _values(reward, "reward")
    r = r[np.isfinite(r)]
    if r.size:
        lo, hi = float(r.min()), float(r.max())
        span = hi - lo
        if span > 0 and not lo - span <= fit.ceiling <= hi + span:
            reasons.append(
                f"b − a = {fit.ceiling:.3g} lies far outside the observed rewards [{lo:.3g}, {hi:.3g}] (more than "
                "their span beyond them)"
            )
    return CeilingVerdict(shown=not reasons, reasons=tuple(reasons), extrapolation=d)
