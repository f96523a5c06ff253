r"""Mixture-of-experts router statistics: Tsallis entropy (DynMoLE) and per-layer routing sums.

**Tsallis entropy** of order :math:`q > 0` of a probability vector :math:`p \in \Delta^{N-1}`:

.. math::

    S_q(p) = \frac{1 - \sum_i p_i^q}{q - 1} = \sum_i p_i \ln_q(1/p_i), \qquad
    \ln_q(x) = \frac{x^{1-q} - 1}{1 - q}, \qquad \lim_{q \to 1} S_q = -\sum_i p_i \ln p_i,

normalised by its maximum (the uniform distribution) :math:`S_q^{\max} = \ln_q N = (1 - N^{1-q})/(q - 1)`
(:math:`\ln N` at :math:`q = 1`). DynMoLE (Li et al. 2025, "DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning
with a Hybrid Routing Mechanism"; code ``moe_peft/common/moe_utils.py::tsallis_entropy``) uses
:math:`q = 1.1` and :math:`p + 10^{-5}` *without renormalising*.

Choices this module makes (reference note ``representation_routing.md``, "Choices an implementation must state", 3):

- **Form.** We evaluate :math:`\sum_i p_i \ln_q(1/p_i)` with ``-p * expm1((q-1) ln p) / (q-1)``: no cancellation near
  :math:`q = 1`, so the value is continuous in :math:`q`; it equals the closed form when :math:`\sum_i p = 1` (the
  input is *assumed* normalised along ``dim``; this is not checked). For :math:`|q - 1| <` :data:`SHANNON_TOLERANCE`
  the Shannon branch is taken; the jump there is at most :math:`\tfrac{|q-1|}{2}\sum_i p_i \ln^2 p_i`.
- **eps.** ``eps = 0`` (default) is exact. ``eps > 0`` reproduces DynMoLE: :math:`p' = p + \epsilon`, not
  renormalised, and :math:`S = (1 - \sum_i p_i'^q)/(q-1)` *literally* (we add the offset :math:`(1 - \sum_i
  p'_i)/(q - 1)` to the stable sum), and :math:`-\sum_i p'_i \ln p'_i` on the Shannon branch, as DynMoLE does; with
  ``eps > 0`` the value is therefore discontinuous at :math:`q = 1` (offset :math:`-N\epsilon/(q-1)`), as in DynMoLE.
- **normalize.** Divides by :math:`S_q^{\max}` of the width :math:`N` along ``dim`` (DynMoLE's choice, also with
  ``eps``); :math:`N = 1` has :math:`S_q^{\max} = 0` and the normalised value is **defined as 0**.
- **Gradient at p_i = 0.** :math:`\partial S_q/\partial p_i = (1 - q p_i^{q-1})/(q-1)`: at :math:`p_i = 0` it is
  :math:`1/(q-1)` for :math:`q > 1` (returned exactly) and :math:`+\infty` for :math:`q \le 1` (Shannon included):
  there we return **0**, treating the absent expert like :math:`0 \ln 0 = 0`. Entries :math:`p_i \le 0` count as 0.
- **base.** The value is divided by :math:`\ln(\text{base})` (nats by default), so that the :math:`q \to 1` limit is
  Shannon entropy in that base; the normalised value does not depend on it.
- **Dtypes.** Computed in float32 (float64 stays float64); a row holding NaN/Inf gives a non-finite value in that row
  only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_dim, check_real, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional.entropy import accumulation_dtype

__all__ = ["SHANNON_TOLERANCE", "tsallis_entropy", "tsallis_entropy_from_logits"]

#: :math:`|q - 1|` below which :func:`tsallis_entropy` takes the Shannon branch.
SHANNON_TOLERANCE = 1e-6


def _check_order(q: float) -> float:
    return check_real(q, "q", low=0.0, low_open=True)


def _check_base(base: float) -> float:
    base = check_real(base, "base", low=0.0, low_open=True)
    if base == 1.0:
        raise EntrotrainError("base must be > 0 and != 1 (log base 1 is undefined), got 1.0; use math.e or 2.")
    return base


def _check_probs(x: Tensor, name: str, dim: int) -> int:
    check_tensor(x, name, floating=True, min_ndim=1, layout="(..., n_experts, ...)")
    return check_dim(dim, x.dim())


def _check_flag(value: object, name: str) -> bool:
    return bool(check_bool(value, name))


def _is_shannon(q: float) -> bool:
    return abs(q - 1.0) < SHANNON_TOLERANCE


def tsallis_max(n: int, q: float) -> float:
    r""":math:`S_q^{\max} = \ln_q N = (1 - N^{1-q})/(q-1)` in nats (:math:`\ln N` on the Shannon branch); 0 for
    :math:`N \le 1`."""
    if n <= 1:
        return 0.0
    if _is_shannon(q):
        return math.log(n)
    return -math.expm1((1.0 - q) * math.log(n)) / (q - 1.0)


def _finish(s: Tensor, n: int, q: float, normalize: bool, base: float) -> Tensor:
    if normalize:
        s_max = tsallis_max(n, q)
        return s / s_max if s_max > 0 else s * 0  # N = 1: defined 0 (NaN rows stay NaN)
    return s / math.log(base) if base != math.e else s


def _terms(p: Tensor, q: float) -> Tensor:
    r"""Per-entry :math:`p \ln_q(1/p)` with the gradient conventions of the module docstring."""
    positive = ~(p <= 0)  # p > 0, and NaN: a NaN probability gives a NaN row, never a hidden one
    safe = torch.where(positive, p, torch.ones_like(p))
    log_p = torch.log(safe)
    if _is_shannon(q):
        pos = -safe * log_p
    else:
        pos = -safe * torch.expm1((q - 1.0) * log_p) / (q - 1.0)
    if q > 1.0 and not _is_shannon(q):  # exact value 0 and derivative 1/(q-1) at p = 0
        zero = torch.where(positive, torch.zeros_like(p), p).clamp_min(0)
        at_zero = (zero - zero.pow(q)) / (q - 1.0)
    else:  # infinite derivative at 0: value 0, gradient 0 (documented)
        at_zero = torch.zeros_like(p)
    return torch.where(positive, pos, at_zero)


def tsallis_entropy(
    probs: Tensor,
    q: float = 1.1,
    *,
    dim: int = -1,
    normalize: bool = False,
    eps: float = 0.0,
    base: float = math.e,
) -> Tensor:
    r"""Tsallis entropy :math:`S_q(p) = (1 - \sum_i p_i^q)/(q-1)` along ``dim`` (DynMoLE's router entropy).

    Evaluated as :math:`\sum_i p_i \ln_q(1/p_i)` (stable, continuous in :math:`q`); :math:`q \to 1` gives Shannon
    :math:`-\sum_i p_i \ln p_i`. See the module docstring for every choice (eps, normalisation, gradient at 0, base).

    Args:
        probs: ``(..., N, ...)`` probabilities summing to 1 along ``dim`` (assumed, not checked), any floating dtype;
            computed in float32 (float64 stays float64).
        q: the order, finite and > 0 (DynMoLE default 1.1; 2 gives the Gini–Simpson index :math:`1 - \sum p^2`).
        dim: the expert dimension (no wrap-around).
        normalize: divide by :math:`S_q^{\max} = (1 - N^{1-q})/(q-1)` (:math:`\ln N` at :math:`q = 1`), so the
            uniform distribution gives 1; :math:`N = 1` gives 0 by definition.
        eps: finite, >= 0. ``0`` is exact; ``> 0`` reproduces DynMoLE's :math:`p + \epsilon` without
            renormalisation, literally :math:`(1 - \sum_i (p_i+\epsilon)^q)/(q-1)`.
        base: log base of the Shannon limit (the value is divided by :math:`\ln` base); finite, > 0, != 1.

    Returns:
        ``probs.shape`` without ``dim``, float32 (float64 for float64 input). Differentiable with a finite gradient
        everywhere (at :math:`p_i = 0`: :math:`1/(q-1)` for :math:`q > 1`, 0 for :math:`q \le 1`). A row holding
        NaN/Inf gives a non-finite value in that row only; an empty ``dim`` (:math:`N = 0`) gives 0.

    Raises:
        EntrotrainError: ``probs`` not a floating tensor with a dim, ``dim`` out of range, ``q`` not finite > 0,
            ``eps`` not finite >= 0, ``base`` not finite > 0 and != 1, ``normalize`` not a bool.

    Example:
        >>> round(tsallis_entropy(torch.full((4,), 0.25), q=2.0).item(), 6)  # 1 - 4 * 1/16
        0.75
    """
    dim = _check_probs(probs, "probs", dim)
    q = _check_order(q)
    eps = check_real(eps, "eps", low=0.0)
    base = _check_base(base)
    normalize = _check_flag(normalize, "normalize")
    p = probs.to(accumulation_dtype(probs.dtype))
    n = p.shape[dim]
    if eps > 0:
        p = p + eps
    s = _terms(p, q).sum(dim=dim)
    if eps > 0 and not _is_shannon(q):  # DynMoLE's literal 1 - Σ p'^q: the unrenormalised mass enters
        s = s + (1.0 - p.sum(dim=dim)) / (q - 1.0)
    return _finish(s, n, q, normalize, base)


def tsallis_entropy_from_logits(
    logits: Tensor,
    q: float = 1.1,
    *,
    dim: int = -1,
    normalize: bool = False,
    eps: float = 0.0,
    base: float = math.e,
) -> Tensor:
    r"""Tsallis entropy :math:`S_q(\mathrm{softmax}(z))` of raw logits along ``dim`` (e.g. router logits).

    .. math:: S_q = \sum_i -e^{\ell_i}\,\frac{\operatorname{expm1}((q-1)\ell_i)}{q-1}, \qquad \ell = \log\mathrm{softmax}(z)

    The softmax is taken in float32 for half-precision input (float64 stays float64). With ``eps = 0`` the log-domain
    form above is used (exact for tiny probabilities; ``-inf`` logits are absent experts, contributing 0 with a
    finite gradient); with ``eps > 0`` the probabilities go through :func:`tsallis_entropy` (DynMoLE's :math:`p +
    \epsilon`). Arguments and conventions as :func:`tsallis_entropy`. A row whose logits are all ``-inf`` or hold
    NaN/``+inf`` gives NaN in that row only.

    Example:
        >>> round(tsallis_entropy_from_logits(torch.zeros(8), q=1.0, normalize=True).item(), 6)
        1.0
    """
    check_tensor(logits, "logits", floating=True, min_ndim=1, layout="(..., n_experts, ...)")
    dim = check_dim(dim, logits.dim())
    q = _check_order(q)
    eps = check_real(eps, "eps", low=0.0)
    base = _check_base(base)
    normalize = _check_flag(normalize, "normalize")
    z = logits.to(accumulation_dtype(logits.dtype))
    n = z.shape[dim]
    if n == 0:
        return _finish(z.sum(dim=dim), n, q, normalize, base)
    if eps > 0:
        return tsallis_entropy(torch.softmax(z, dim=dim), q, dim=dim, normalize=normalize, eps=eps, base=base)
    log_p = torch.log_softmax(z, dim=dim)
    present = log_p != float("-inf")  # NaN stays in and propagates to its row
    safe = torch.where(present, log_p, torch.zeros_like(log_p))
    if _is_shannon(q):
        terms = -torch.exp(safe) * safe
    else:
        terms = -torch.exp(safe) * torch.expm1((q - 1.0) * safe) / (q - 1.0)
    s = torch.where(present, terms, torch.zeros_like(terms)).sum(dim=dim)
    return _finish(s, n, q, normalize, base)
