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
        r2: coefficient of determination of the fit (1 = perfect; NaN when the rewards are all equal).
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
        EntrotrainError: fewer than 2 points, shapes that differ, non-finite values, or all entropies equal (the
            slope is undefined).
    """
    h = torch.as_tensor(entropy, dtype=torch.float64).flatten()
    r = torch.as_tensor(reward, dtype=torch.float64).flatten()
    if h.shape != r.shape:
        raise EntrotrainError(f"entropy and reward need one value per step each, got {tuple(h.shape)} and {tuple(r.shape)}.")
    if h.numel() < 2:
        raise EntrotrainError(f"fitting R = -a·exp(H) + b needs at least 2 (entropy, reward) points, got {h.numel()}.")
    if not (torch.isfinite(h).all() and torch.isfinite(r).all()):
        raise EntrotrainError("fit_entropy_reward got NaN/Inf entropy or reward; drop those steps first.")
    x = torch.exp(h)
    dx = x - x.mean()
    sxx = float((dx * dx).sum())
    if sxx <= 1e-300 or sxx <= 1e-24 * float((x * x).sum()):
        raise EntrotrainError("all entropies are equal: the slope of R against exp(H) is undefined; log more steps.")
    dr = r - r.mean()
    slope = float((dx * dr).sum()) / sxx
    a = -slope
    b = float(r.mean()) + a * float(x.mean())
    residual = r - (slope * x + b)
    srr = float((dr * dr).sum())
    r2 = 1.0 - float((residual * residual).sum()) / srr if srr > 0 else float("nan")
    return EntropyRewardFit(a=a, b=b, ceiling=b - a, r2=r2, n=int(h.numel()))
