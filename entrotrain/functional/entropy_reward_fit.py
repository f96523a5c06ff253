r"""The empirical law between policy entropy and reward, fitted online.

Cui et al. (2025), "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (arXiv
2505.22617): over an RL run, validation performance :math:`R` and policy entropy :math:`H` follow

.. math:: R = -a\, e^{H} + b,

so when entropy is exhausted (:math:`H = 0`) performance tops out at the predicted ceiling :math:`b - a`. With
:math:`x = e^{H}` this is linear in :math:`x`: ordinary least squares gives :math:`-a` (slope) and :math:`b`
(intercept), in closed form.

**When the ceiling is a prediction.** The fit always returns ``b - a``; :func:`ceiling_verdict` decides whether it
is shown as a prediction (the monitor's ``fit_shown``, the report's headline card and "What happened", ``entrotrain
status``). The ceiling is shown only when all four hold; otherwise it is shown with the reasons it is not a prediction,
never silently clamped or dropped:

* at least :data:`CEILING_MIN_POINTS` = 8 logged points: with R² ≥ 0.5 (next rule) that is a slope significant at
  p < 0.05 (F-test, 1 and n − 2 degrees of freedom: p = 0.050 at n = 8, but 0.18 at n = 5: five points of pure noise
  reach R² ≥ 0.5 about one time in five). The paper fits on tens to hundreds of steps (36 steps predict the next 200).
* R² ≥ :data:`CEILING_MIN_R2` = 0.5: the law explains at least half of the reward's variance over the run; below it
  the residual scatter is larger than what the law explains and ``b - a`` mostly follows the noise.
* H = 0 is not far outside the observed entropies, measured where the fit is linear, in :math:`x = e^H`:
  :func:`fit_extrapolation` :math:`= \max(0,\, e^{H_{min}} - 1,\, 1 - e^{H_{max}}) / (e^{H_{max}} - e^{H_{min}})`,
  the distance from :math:`x = 1` (H = 0) to the observed :math:`x` range in units of that range, must be at most
  :data:`CEILING_MAX_EXTRAPOLATION` = 1. For evenly spread points the standard error of the line at one span beyond
  the data is already about 5× that at their centre (:math:`\sqrt{1 + 12 (d + 1/2)^2}` at distance d spans), and it
  grows linearly with d. A flat entropy (2.6327–2.6337 nats) gives d ≈ 930: its ceiling is the slope of noise. An
  entropy that falls from 1.5 to 0.1 nats gives d ≈ 0.03.
* ``b - a`` is not far outside the observed rewards: within one span of them, in
  :math:`[R_{min} - (R_{max} - R_{min}),\ R_{max} + (R_{max} - R_{min})]` (the fitted points' rewards, i.e. the
  per-step reward means). A ceiling of 10.6 for rewards in [0, 1] (a 6-step TRL run) is no reward the run can
  reach.

Also ``a ≤ 0`` (the reward did not rise as the entropy fell) predicts no ceiling.

The rules need no torch: :class:`EntropyRewardFit`, :func:`fit_extrapolation`, :func:`ceiling_verdict` and the
constants are defined in :mod:`entrotrain._entropy_reward_rules` (numpy only, so that ``entrotrain status`` and
``report`` judge a run without loading torch) and re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from entrotrain._entropy_reward_rules import (
    CEILING_MAX_EXTRAPOLATION,
    CEILING_MIN_POINTS,
    CEILING_MIN_R2,
    CeilingVerdict,
    EntropyRewardFit,
    _values,
    ceiling_verdict,
    fit_extrapolation,
)
from entrotrain.errors import EntrotrainError

__all__ = [
    "CEILING_MAX_EXTRAPOLATION", "CEILING_MIN_POINTS", "CEILING_MIN_R2", "CeilingVerdict", "EntropyRewardFit",
    "ceiling_verdict", "fit_entropy_reward", "fit_extrapolation",
]


def fit_entropy_reward(entropy: Sequence[float] | Tensor, reward: Sequence[float] | Tensor) -> EntropyRewardFit:
    r"""Fit Cui et al.'s :math:`R = -a e^{H} + b` by ordinary least squares in :math:`x = e^{H}`, in float64.

    .. math::

        -a = \frac{\sum_i (x_i - \bar x)(R_i - \bar R)}{\sum_i (x_i - \bar x)^2},\qquad b = \bar R + a \bar x,
        \qquad \text{ceiling} = b - a

    Args:
        entropy: ``(n,)`` mean policy entropies (nats), one per logged step.
        reward: ``(n,)`` the matching mean rewards (or validation accuracies).

    Returns:
        :class:`EntropyRewardFit`.

    Raises:
        EntrotrainError: fewer than 2 points, shapes that differ or are not 1-D, values that are not numbers,
            non-finite values (the message counts the steps), all entropies equal (the slope is undefined), or a fit
            that overflows float64. Every returned field is finite.
    """
    h = _points(entropy, "entropy")
    r = _points(reward, "reward")
    if h.shape != r.shape:
        raise EntrotrainError(
            f"entropy and reward need one value per step each, got {tuple(h.shape)} and {tuple(r.shape)}; pass the "
            "matching (entropy, reward) pairs only."
        )
    if h.numel() < 2:
        raise EntrotrainError(
            f"fitting R = -a·exp(H) + b needs at least 2 (entropy, reward) points, got {h.numel()}; log more steps."
        )
    bad = ~(torch.isfinite(h) & torch.isfinite(r))
    if bool(bad.any()):
        raise EntrotrainError(
            f"fit_entropy_reward got {int(bad.sum())} step(s) with NaN/Inf entropy or reward (of {h.numel()}); drop "
            "those steps first, e.g. keep = torch.isfinite(h) & torch.isfinite(r)."
        )
    # Fit in scaled variables, exact algebra: x = e^{H - H_max} ∈ (0, 1] never overflows (H = 800 nats is finite
    # data), rewards divided by their largest |R| never overflow in the sums of squares. a, b are scaled back.
    h_max = float(h.max())
    y = torch.expm1(h - h_max)  # x = e^{H - H_max} = 1 + y: y keeps the digits of nearly equal entropies
    r_scale = float(r.abs().max()) or 1.0
    r = r / r_scale
    dy = y - y.mean()
    sxx = float((dy * dy).sum())
    if sxx <= 1e-300 or sxx <= 1e-24 * float(((1.0 + y) ** 2).sum()):
        raise EntrotrainError("all entropies are equal: the slope of R against exp(H) is undefined; log more steps.")
    dr = r - r.mean()
    slope = float((dy * dr).sum()) / sxx  # d(R / r_scale) / d(e^{H - H_max})
    b = float(r.mean()) - slope * (1.0 + float(y.mean()))  # intercept at e^{H - H_max} = 0
    residual = dr - slope * dy  # R - R̂ of the least-squares line
    srr = float((dr * dr).sum())
    r2 = 1.0 - float((residual * residual).sum()) / srr if srr > 0 else 1.0
    a = -slope * r_scale * math.exp(-h_max) if slope else 0.0
    b = b * r_scale
    fit = EntropyRewardFit(a=a, b=b, ceiling=b - a, r2=r2, n=int(h.numel()))
    if not all(math.isfinite(v) for v in fit[:4]):
        raise EntrotrainError(
            f"the fit overflows float64 (a={a!r}, b={b!r}): entropies far below 0 or rewards near 1e308. Rescale the "
            "rewards or shift the entropies before fitting."
        )
    return fit


def _points(values: Sequence[float] | Tensor, name: str) -> Tensor:
    """``values`` as a 1-D float64 CPU tensor of per-step numbers (a 0-dim value is one point), read and checked
    as :func:`~entrotrain._entropy_reward_rules.fit_extrapolation` reads them."""
    return torch.from_numpy(_values(values, name))
