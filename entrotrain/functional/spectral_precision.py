r"""Working precision of the spectral measures: when a float32 eigensolve is accurate enough, and how it is checked.

The representation measures (:func:`~entrotrain.functional.representation.matrix_entropy`,
:func:`~entrotrain.functional.representation.vendi_score` q = 1, :func:`~entrotrain.functional.representation.rankme`,
:func:`~entrotrain.functional.representation.effective_rank`) take ``precision=``:

- ``"float64"``: the exact path: the input is upcast to float64 and every step (centring, row norms, Gram, eigensolve,
  entropy) runs in float64.
- ``"auto"`` (default): float64 input stays float64. float32 / bfloat16 / float16 input is computed in **float32**
  (bf16/fp16 upcast: their values are exact in float32) when the work is large enough to matter
  (``n · d · min(n, d) >= 2**20``, :data:`AUTO_MIN_WORK`), and the spectrum of the float32 eigensolve passes the
  accuracy test below; otherwise the measure is recomputed on the float64 path. The entropy ``-Σ p ln p`` is always
  accumulated in float64 from the float32 eigenvalues.

**The accuracy test** (:func:`float32_entropy_error_bound`). A backward-stable symmetric eigensolver (or SVD) gives
each eigenvalue with an absolute error of a few ``ε · λ_max``; we take ``η = 8 ε₃₂ p_max`` on the normalised
spectrum ``p = λ / Σλ`` (measured: ≤ 7.5 ε λ_max at m ≤ 2048 on Gaussian-blob and low-rank data). Then, with
``p̂`` the float32 spectrum:

.. math::

    B = \underbrace{\sum_{\hat p_k < 4\eta} (\hat p_k + \eta)\,(1 - \ln(\hat p_k + \eta))}_{\text{unresolved: worst case}}
      + \underbrace{\eta \sqrt{\textstyle\sum_{\hat p_k \ge 4\eta} (\ln \hat p_k + 1)^2}}_{\text{resolved: first order}}
      + \underbrace{2 r \,(1 - \ln \min_{\hat p_k \ge 4\eta} \hat p_k)}_{\text{input rows}}

The first term bounds what eigenvalues at the float32 noise floor (rank deficiency, duplicated rows) can add or
remove; the second is the first-order change ``Σ (ln p_k + 1) δp_k`` with independent errors of size ``η``; the
third is the trace-norm change of ``Σ = ZᵀZ/n`` when every row carries a relative error ``r`` (centring: ``r = ε (2
+ 2‖μ‖ / min_i ‖z_i‖)``; unit rows: ``r = 2ε``; raw rows: 0). float32 is kept when ``B ≤ tol`` with ``tol = 1e-5 ·
H`` for an entropy in nats and ``tol = 1e-5`` for a count ``exp H`` (its relative error is ``|ΔH|``), so the stated
error against float64 is a relative ``1e-5`` (tested in ``tests/functional/test_spectral_precision.py``; the bound
is 10-100× above the errors measured there). A zero row after centring, or a row norm below ``2⁻⁵⁰`` of the largest
entry, sends the measure to float64 as well (its direction would be float32 noise).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entrotrain._validation import check_choice, check_tensor
from entrotrain.errors import EntrotrainError

__all__ = ["AUTO_MIN_WORK", "AUTO_RTOL", "PRECISIONS", "float32_entropy_error_bound", "shannon64"]

#: The values of ``precision=``.
PRECISIONS = ("auto", "float64")

#: Relative error against float64 that ``precision="auto"`` keeps (entropy in nats; a count ``exp H`` likewise).
AUTO_RTOL = 1e-5

#: ``n · d · min(n, d)`` below which ``"auto"`` computes in float64 anyway (a few ms: speed does not matter there).
AUTO_MIN_WORK = 1 << 20

#: Largest absolute error of one float32 eigen/singular value, in units of ``ε₃₂ · p_max`` (measured ≤ 5).
_EIG_NOISE = 8.0

#: Root-mean-square error of the float32 eigen/singular values, in units of ``ε₃₂ · p_max`` (measured ≤ 0.67).
_EIG_RMS = 2.0

#: Where the float32 eigenvalues of exact zeros land, in units of ``ε₃₂ · p_max`` (measured: max 2.7, rms 0.4).
_ZERO_NOISE = 4.0

_EPS32 = torch.finfo(torch.float32).eps


def check_precision(precision: str) -> str:
    """``"auto"`` or ``"float64"`` (the error names the argument and the choices)."""
    return check_choice(precision, "precision", PRECISIONS)


def check_finite_fast(x: Tensor, name: str) -> float:
    """Refuse NaN/±Inf in ``x`` with one reduction (``aminmax``, NaN-propagating) and return ``max |x|``.

    Only on failure is the bad-entry count taken (a second pass), so clean input costs one read and one sync.
    """
    if x.numel() == 0:
        return 0.0
    lo, hi = torch.aminmax(x)
    lo, hi = torch.stack((lo, hi)).double().tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        from entrotrain.functional.spectrum import _check_finite

        _check_finite(x, name)  # raises with the count
    return max(-lo, hi)


def use_float32(x: Tensor, precision: str) -> bool:
    """Whether ``"auto"`` tries float32 for rows ``x`` ``(n, d)``: a non-float64 input and enough work to matter."""
    if precision != "auto" or x.dtype == torch.float64:
        return False
    n, d = x.shape
    return n * d * min(n, d) >= AUTO_MIN_WORK


def _f(p: Tensor | float) -> Tensor | float:
    """``p (1 − ln p)``: the most ``-p ln p`` can change when ``p`` moves by ``p`` near 0 (``p < 1``)."""
    return p * (1.0 - (torch.log(p) if isinstance(p, Tensor) else math.log(p)))


def float32_entropy_error_bound(p: Tensor, *, row_rel: float = 0.0, n_negative: int | None = None) -> float:
    """The bound ``B`` of the module doc on ``|H(p̂) − H(p)|`` (nats) for a float32 spectrum ``p̂``.

    Args:
        p: ``(m,)`` float64, normalised, ``>= 0`` (negatives already clamped).
        row_rel: relative error of each input row (centring / normalisation in float32).
        n_negative: how many eigenvalues ``eigvalsh`` returned below 0 (symmetric eigensolve: about half of the
            true zeros); ``None`` for singular values (never negative: every ``p̂ < 4η`` counts as unresolved).
    """
    top = float(p.max())
    if n_negative is None:  # singular values: absolute errors η, every p̂ < 4η unresolved (worst case)
        eta = _EIG_NOISE * _EPS32 * top
        low = p < 4.0 * eta
        unresolved = float(_f(p[low] + eta).sum())
        pr = p[~low]
        err = _EIG_RMS * _EPS32 * top
    else:  # eigenvalues of a Gram: graded errors √(p p_max), true zeros at the floor
        floor = _ZERO_NOISE * _EPS32 * top
        low = p < floor
        unresolved = (2 * n_negative + 1) * float(_f(floor))
        pr = p[~low]
        err = _EIG_RMS * _EPS32 * torch.sqrt(pr * top)
    ln = 1.0 - torch.log(pr)
    resolved = float(torch.sqrt(((err * ln) ** 2).sum()))
    rows = 2.0 * row_rel * float(torch.sqrt((pr * ln * ln).sum())) if row_rel else 0.0
    return unresolved + resolved + rows


def float32_ok(p: Tensor, h: float, *, count: bool, row_rel: float = 0.0, n_negative: int | None = None) -> bool:
    """True when the float32 spectrum ``p`` gives the entropy ``h`` within :data:`AUTO_RTOL` of float64 by the bound:
    relative to ``h`` for an entropy (``count=False``), absolute in ``H`` (relative in ``exp H``) for a count."""
    tol = AUTO_RTOL * (1.0 if count else h)
    return float32_entropy_error_bound(p, row_rel=row_rel, n_negative=n_negative) <= tol


def shannon64(lam: Tensor, *, eps: float = 0.0) -> Tensor:
    r"""``-Σ p ln p`` (``0 ln 0 = 0``) of ``p = λ / Σλ`` (then ``+ ε``), accumulated in float64.

    ``λ``: ``(m,)`` spectrum, ``>= 0`` (negatives clamped), any float dtype, not all 0 (raises); a spectrum that is
    already normalised passes through unchanged up to round-off. Returns a 0-dim float64 tensor.
    """
    p = normalised64(lam)
    if eps:
        p = p + eps
    pos = p > 0
    return -torch.where(pos, p * torch.log(torch.where(pos, p, 1.0)), 0.0).sum()


def normalised64(lam: Tensor) -> Tensor:
    """``λ / Σλ`` in float64 (scaled by ``max λ`` first: no overflow of the sum), negatives clamped to 0."""
    check_tensor(lam, "eigenvalues", ndim=1)
    lam = lam.to(torch.float64).clamp_min(0.0)
    top = lam.max()
    if not float(top) > 0:
        raise EntrotrainError(
            "the spectrum sums to 0 (all eigenvalues are 0: a zero matrix), so p = λ / Σλ is undefined and so is its "
            "entropy. Drop zero rows or measure a batch with more than one distinct sample."
        )
    p = lam / top
    return p / p.sum()
