r"""The empirical law between policy entropy and reward, fitted online.

Cui et al. (2025), "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models" (arXiv
2505.22617): over an RL run, validation performance :math:`R` and policy entropy :math:`H` follow

.. math:: R = -a\, e^{H} + b,

so when entropy is exhausted (:math:`H = 0`) performance tops out at the predicted ceiling :math:`b - a`. With
:math:`x = e^{H}` this is linear in :math:`x`: ordinary least squares gives :math:`-a` (slope) and :math:`b`
(intercept), in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from entrotrain.errors import EntrotrainError

__all__ = ["EntropyRewardFit", "fit_entropy_reward"]


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

    def predict(self, entropy: float | Tensor) -> float | Tensor:
        """``-a·exp(H) + b``."""
        if isinstance(entropy, Tensor):
            return -self.a * torch.exp(entropy) + self.b
        return -self.a * math.exp(entropy) + self.b


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
    """``values`` as a 1-D float64 tensor of per-step numbers (a 0-dim value is one point)."""
    try:
        t = torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise EntrotrainError(
            f"{name} must be a sequence of numbers (one per logged step) or a 1-D tensor, got "
            f"{type(values).__name__}; e.g. [float(v) for v in history]."
        ) from None
    if t.dim() > 1:
        raise EntrotrainError(
            f"{name} must be 1-D (one value per logged step), got shape {tuple(t.shape)}; pass the per-step means, "
            f"or {name}.flatten() if every entry is one step."
        )
    return t.reshape(-1)
