r"""Differentiable spectral objectives: matrix entropy (orders 1 and 2), Vendi entropy/score, and MMCR.

These are the *training* forms of the detached, float64 measures of :mod:`entrotrain.functional.representation`:
same matrices, same centring / normalisation presets, same values (to ~1e-6 in float64 for orders ``q >= 1``; see
"Zero eigenvalues" for ``q < 1``), but they keep the graph so a regulariser can maximise them. The measures stay
the reference (tests compare the two).

Numerics — the choices this module makes (reference note ``representation_routing.md``, "Choices", items 1–2):

- **Eigenvalues only.** Spectra come from ``torch.linalg.eigvalsh`` / ``svdvals``, never eigenvectors: their
  gradients (``V diag(g) Vᵀ``, ``U Vᵀ``) stay finite on repeated eigenvalues, where eigenvector gradients carry
  ``1 / (λ_i − λ_j)``. Order 2 uses no eigensolver at all: ``H₂ = −log(‖G‖_F² / (tr G)²)``.
- **Zero eigenvalues.** The normalised eigenvalues ``p`` enter ``log`` clamped at :data:`EIG_EPS` (``1e-10``);
  modes with ``p <= ε`` (the zeros of a rank-deficient batch ``n < d``, the centring's null direction, round-off
  ``λ ≈ −1e-17``) contribute 0 and get 0 gradient. Their share of the entropy is at most ``ε·ln(1/ε)`` per mode
  at ``q = 1`` (``2e-9``); at ``q < 1`` each would add up to ``ε^q`` to ``Σ p^q`` (``1e-5`` at ``q = 0.5``, ``3e-3`` at
  ``q = 0.25``), so genuine small eigenvalues the measures keep are missing here: on 64 rows whose 32 feature
  scales span 1 to 1e-6 (``torch.logspace``), the log-Vendi objective was below the measure by 8e-6 relative at
  ``q = 0.5``, 1.2e-3 at ``q = 0.25``, 1e-9 at ``q = 1``. The clamp stays: ``d p^q / dp = q p^{q−1}`` is unbounded
  at 0.
- **Smaller Gram.** ``X Xᵀ`` (``n × n``) when ``n < d``, ``Xᵀ X`` (``d × d``) otherwise: same non-zero spectrum.
- **Precision.** bf16/fp16 inputs are cast to float32; float32 stays float32 and float64 stays float64 (tests use
  float64). The result has that dtype.
- **Row normalisation.** Each row is first divided by its largest ``|entry|`` (a constant: no gradient; the
  function is scale-free, so the gradient is unchanged) and then by its L2 norm with ``F.normalize``'s
  ``eps = 1e-12`` (the MMCR reference's): identical to ``F.normalize(z)`` for rows with ``‖z‖ >= 1e-12``, no
  overflow for rows of 1e30 in float32, and an exactly zero row stays zero (it takes no part).
- **Degenerate batches.** A batch whose centred rows are all zero (all rows identical, or one row) has no
  spectrum: the matrix entropy is then 0 with zero gradient (a fully collapsed batch gives the loss no direction).
  No device sync anywhere (``torch.where``, no ``.item()``).
- **Non-finite data.** A NaN/±Inf entry makes the value NaN (documented value: the batch cannot be scored); the
  spectrum is computed on a sanitised copy, so no LAPACK error is raised and every gradient is finite (0 for the
  whole batch). Monitors should drop such rows with :func:`~entrotrain.functional.representation.finite_rows`.
- **Sign and units.** These return the entropy (nats) or score; a regulariser *maximises* it by adding ``−w·H``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from entrotrain._validation import check_bool, check_choice, check_int, check_real, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional.spectrum import _check_order

__all__ = [
    "EIG_EPS",
    "MMCR_MAX_LAM",
    "MMCR_NORM_EPS",
    "matrix_entropy_objective",
    "mmcr_objective",
    "mmcr_terms",
    "mmcr_views",
    "nuclear_norm",
    "spectral_entropy_objective",
    "unit_rows",
    "vendi_entropy_objective",
    "vendi_score_objective",
]

#: Normalised eigenvalues ``p <= EIG_EPS`` take no part in the entropy and get zero gradient.
EIG_EPS = 1e-10
#: ``F.normalize`` eps of the MMCR reference code (``mmcr/*/loss_mmcr.py``).
MMCR_NORM_EPS = 1e-12
#: The largest MMCR local weight λ (a weight of order 1; far larger ones overflow the float32 gradient).
MMCR_MAX_LAM = 1e6

ViewLayout = Literal["sample_major", "view_major"]


# ---------------------------------------------------------------------------------------------------- helpers


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _sanitise(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x with non-finite entries set to 0, any_bad)`` in the compute dtype; ``any_bad`` is a 0-dim bool (no
    sync). The replaced entries get zero gradient."""
    x = x.to(_compute_dtype(x))
    finite = torch.isfinite(x)
    return torch.where(finite, x, torch.zeros((), dtype=x.dtype, device=x.device)), ~finite.all()


def _nan_if(bad: Tensor, value: Tensor) -> Tensor:
    return torch.where(bad, torch.full_like(value, math.nan), value)


def _rows(x: Tensor, name: str) -> Tensor:
    check_tensor(x, name, floating=True, ndim=2, layout="(n, d)")
    return x


def unit_rows(z: Tensor, eps: float = MMCR_NORM_EPS) -> Tensor:
    r"""``z_i / max(‖z_i‖₂, eps)`` along the last dim, differentiable, scale-safe.

    Each row is divided by its largest ``|entry|`` first (a detached constant; the map is scale-free so the
    gradient equals ``F.normalize``'s), so rows of 1e30 do not overflow in float32; an exactly zero row stays 0
    and takes no part: its gradient is 0 (``F.normalize``'s is ``1/eps`` = 1e12 there, ±inf in half precision).
    ``z``: a floating tensor with at least one dim; ``eps`` > 0.
    """
    check_tensor(z, "z", floating=True, min_ndim=1, layout="(..., d)")
    check_real(eps, "eps", low=0.0, low_open=True)
    if z.numel() == 0:
        return z
    peak = z.detach().abs().amax(dim=-1, keepdim=True)
    nonzero = peak > 0
    z = torch.where(nonzero, z, z.detach())  # a zero row: no gradient
    return F.normalize(z / torch.where(nonzero, peak, torch.ones_like(peak)), dim=-1, eps=eps)


def _gram_small(z: Tensor) -> Tensor:
    """The smaller of ``Z Zᵀ`` (``n < d``) and ``Zᵀ Z``, symmetrised."""
    g = z @ z.T if z.shape[0] < z.shape[1] else z.T @ z
    return 0.5 * (g + g.T)


def _check_eps(eps: float) -> float:
    return check_real(eps, "eps", low=0.0, high=1e-3, low_open=True)  # type: ignore[return-value]


def spectral_entropy_objective(p: Tensor, q: float = 1.0, *, eps: float = EIG_EPS) -> Tensor:
    r"""Differentiable Rényi entropy of order ``q`` of spectra ``p`` ``(..., m)`` that already sum to (at most) 1.

    .. math::

        H_1 = -\sum_{p_k > \varepsilon} p_k \ln p_k,\qquad
        H_q = \frac{\ln \sum_{p_k > \varepsilon} p_k^q}{1 - q},\qquad H_\infty = -\ln \max_k p_k

    Modes with ``p_k <= ε`` contribute 0 with zero gradient (``p`` is clamped at ``ε`` inside the log); a spectrum
    with no mode above ``ε`` (all zeros, or ``m = 0``) has entropy **0** with zero gradient, for every ``q``.
    ``q = 0`` (a count of modes) has no gradient and is refused. Rényi (1961).

    ``p``: a floating tensor with at least one dim (bf16/fp16 computed in float32, as every objective here).
    """
    check_tensor(p, "p", floating=True, min_ndim=1, layout="(..., m)")
    q = _check_order(q)
    if q == 0.0:
        raise EntrotrainError("q=0 counts the non-zero eigenvalues: it has no gradient. Use q > 0 (q=1: Shannon).")
    eps = _check_eps(eps)
    p = p.to(_compute_dtype(p))
    keep = p > eps
    safe = p.clamp_min(eps)
    if q == 1.0:
        return -torch.where(keep, p * torch.log(safe), torch.zeros_like(p)).sum(-1)
    some = keep.any(-1)
    if math.isinf(q):
        top = torch.where(keep, safe, torch.zeros_like(safe)).amax(-1) if p.shape[-1] else some.to(p.dtype)
        top = torch.where(some, top, torch.ones_like(top))
        return torch.where(some, -torch.log(top), torch.zeros_like(top))
    s = torch.where(keep, safe.pow(q), torch.zeros_like(p)).sum(-1)
    return torch.where(some, torch.log(torch.where(some, s, torch.ones_like(s))) / (1.0 - q), torch.zeros_like(s))


# ---------------------------------------------------------------------------------------------- matrix entropy


def matrix_entropy_objective(
    x: Tensor,
    order: int = 1,
    *,
    center: bool = True,
    normalize_rows: bool = True,
    normalized: bool = False,
    eps: float = EIG_EPS,
) -> Tensor:
    r"""Differentiable matrix entropy (Wei et al. 2024, "Diff-eRank"; von Neumann / Rényi-2 entropy of ``ρ``).

    .. math::

        Z = \operatorname{rownorm}(X - \bar X),\quad \rho = \frac{Z^\top Z}{\operatorname{tr} Z^\top Z},\quad
        H_1 = -\sum_k \lambda_k \ln \lambda_k,\quad H_2 = -\ln \operatorname{tr}\rho^2 = -\ln \|\rho\|_F^2

    With the defaults the value equals :func:`entrotrain.functional.representation.matrix_entropy` (order 1) and
    :func:`~entrotrain.functional.spectrum.renyi2_from_rows` of the same ``Z`` (order 2). Order 1 takes
    ``eigvalsh`` of the smaller Gram (``n × n`` when ``n < d``), order 2 only its Frobenius norm (smooth,
    ``∂H₂/∂ρ = −2ρ / tr ρ²``). ``center`` / ``normalize_rows`` switch the preset's steps off (then ``ρ`` is the
    trace-normalised second moment of the rows as given). ``normalized=True`` divides by ``ln d`` as the measure's
    ``normalized`` does. Numerics, degenerate and non-finite input: module docstring.

    Args:
        x: ``(n, d)`` rows, any float dtype (bf16/fp16 computed in float32). ``n = 1`` or ``d = 1`` give 0.
        order: 1 (von Neumann) or 2 (Rényi-2, no eigensolver).
        eps: the eigenvalue clamp ``ε`` (order 1).

    Returns:
        0-dim tensor (float32, or float64 for float64 input), ``0 <= H <= ln min(n − 1, d)`` (centred).
    """
    _rows(x, "x")
    order = check_int(order, "order", low=1, high=2)
    center = check_bool(center, "center")
    normalize_rows = check_bool(normalize_rows, "normalize_rows")
    normalized = check_bool(normalized, "normalized")
    eps = _check_eps(eps)
    if normalized and x.shape[1] < 2:
        raise EntrotrainError("normalized matrix entropy divides by ln d; it needs d >= 2 features.")
    z, bad = _sanitise(x)
    n, d = z.shape
    if n == 0 or d == 0:
        return _zero_with_grad(x)
    if center:
        z = z - z.mean(dim=0, keepdim=True)
    if normalize_rows:
        z = unit_rows(z)
    else:  # ρ is scale-free: divide by the largest |entry| (a constant) so Z Zᵀ neither overflows nor underflows
        peak = z.detach().abs().amax()
        z = z / torch.where(peak > 0, peak, torch.ones_like(peak))
    trace = (z * z).sum()
    ok = trace > 0
    safe_trace = torch.where(ok, trace, torch.ones_like(trace))
    g = _gram_small(z)
    if order == 2:
        h = -torch.log(torch.where(ok, (g * g).sum(), torch.ones_like(trace)) / safe_trace**2)
    else:
        p = torch.linalg.eigvalsh(g) / safe_trace
        h = spectral_entropy_objective(p, 1.0, eps=eps)
    h = torch.where(ok, h, torch.zeros_like(h))
    if normalized:
        h = h / math.log(d)
    return _nan_if(bad, h)


def _zero_with_grad(x: Tensor) -> Tensor:
    """A 0-dim zero that is connected to ``x`` (zero gradient), for empty input."""
    return x.to(_compute_dtype(x)).sum() * 0.0


# ------------------------------------------------------------------------------------------------------- Vendi


def vendi_entropy_objective(x: Tensor, q: float = 1.0, *, eps: float = EIG_EPS) -> Tensor:
    r"""Differentiable log-Vendi score (Friedman & Dieng 2023) with the cosine kernel: ``H_q(spec(K / n))``.

    .. math::

        \hat X = \operatorname{rownorm}(X),\quad K = \hat X \hat X^\top,\quad
        \lambda = \operatorname{spec}(K/n) = \operatorname{spec}(\hat X^\top \hat X / n),\quad
        \ln \mathrm{VS}_q = H_q(\lambda)

    No centring; the eigenvalues are used as they are (they sum to 1: unit diagonal), as vendi-score's
    ``score_dual(X, q)`` and :func:`entrotrain.functional.representation.vendi_score` (``kernel="cosine"``) do;
    the values agree (for ``q < 1`` up to the clamped modes: module docstring). ``q = 2`` uses ``−ln ‖K/n‖_F²``
    from the smaller Gram (no eigensolver); other ``q > 0`` ``eigvalsh`` of the smaller Gram, clamped at ``eps``.
    An exactly zero row takes no part (the measure refuses it): ``n`` counts the non-zero rows, so the bounds below
    hold; all rows zero give 0 with zero gradient.
    Numerics: module docstring.

    Args:
        x: ``(n, d)``, any float dtype. q: order ``> 0`` incl. ``float('inf')``.

    Returns:
        0-dim, ``0 <= H_q <= ln min(n, d)``.
    """
    _rows(x, "x")
    q = _check_order(q)
    eps = _check_eps(eps)
    if q == 0.0:
        raise EntrotrainError("q=0 counts the non-zero eigenvalues: it has no gradient. Use q > 0 (q=1: Shannon).")
    z, bad = _sanitise(x)
    n = z.shape[0]
    if n == 0 or z.shape[1] == 0:
        return _zero_with_grad(x)
    rows = (z != 0).any(dim=1).sum().clamp_min(1).to(z.dtype)  # zero rows take no part
    g = _gram_small(unit_rows(z)) / rows
    if q == 2.0:
        f = (g * g).sum()
        h = torch.where(f > 0, -torch.log(torch.where(f > 0, f, torch.ones_like(f))), torch.zeros_like(f))
    else:
        h = spectral_entropy_objective(torch.linalg.eigvalsh(g), q, eps=eps)
    return _nan_if(bad, h)


def vendi_score_objective(x: Tensor, q: float = 1.0, *, eps: float = EIG_EPS) -> Tensor:
    """``exp`` of :func:`vendi_entropy_objective`: the Vendi score of order ``q``, in ``[1, min(n, d)]``."""
    return torch.exp(vendi_entropy_objective(x, q, eps=eps))


# -------------------------------------------------------------------------------------------------------- MMCR


def mmcr_views(z: Tensor, n_views: int, layout: ViewLayout = "sample_major") -> Tensor:
    r"""Reshape stacked views ``(N·k, d)`` to MMCR's explicit ``(N, k, d)``.

    - ``"sample_major"``: the ``k`` views of one sample are contiguous — ``[x₁v₁, x₁v₂, …, x₂v₁, …]``; the MMCR
      reference's ``rearrange("(B N) C -> B C N")``.
    - ``"view_major"``: all first views, then all second views — ``torch.cat([z_view1, z_view2])``, the usual SSL
      layout (and :class:`~entrotrain.tasks.SimSiamTask`'s). Reading it as sample-major silently gives wrong
      centroids; say which one you have.
    """
    check_tensor(z, "z", floating=True, ndim=2, layout="(N*k, d)")
    k = check_int(n_views, "n_views", low=1)
    check_choice(layout, "layout", ("sample_major", "view_major"))
    if z.shape[0] % k:
        raise EntrotrainError(
            f"z has {z.shape[0]} rows, not a multiple of n_views={k}; pass N·k rows (k views of N samples)."
        )
    n = z.shape[0] // k
    if layout == "sample_major":
        return z.reshape(n, k, z.shape[1])
    return z.reshape(k, n, z.shape[1]).transpose(0, 1)


def nuclear_norm(m: Tensor) -> Tensor:
    """``‖M‖_* = Σ σ_i(M)`` over the last two dims (``svdvals``: finite gradient ``U Vᵀ``, also at repeated and —
    as a subgradient — zero singular values). ``m``: floating, ``(..., r, c)``; bf16/fp16 computed in float32."""
    check_tensor(m, "m", floating=True, min_ndim=2, layout="(..., rows, cols)")
    return torch.linalg.svdvals(m.to(_compute_dtype(m))).sum(-1)


def mmcr_terms(z: Tensor, *, eps: float = MMCR_NORM_EPS) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(C, Ẑ, bad)`` for MMCR: unit views ``Ẑ`` ``(N, k, d)``, centroids ``C = mean_j ẑ_ij`` ``(N, d)`` and the
    0-dim non-finite flag. Non-finite entries are zeroed (the caller makes the value NaN)."""
    check_tensor(z, "z", floating=True, ndim=3, layout="(N, k, d)")
    zc, bad = _sanitise(z)
    zhat = unit_rows(zc, eps)
    return zhat.mean(dim=1), zhat, bad


def mmcr_objective(z: Tensor, lam: float = 0.0, *, eps: float = MMCR_NORM_EPS) -> Tensor:
    r"""The MMCR loss of Yerxa et al. (NeurIPS 2023), single process.

    .. math::

        \hat z_{ij} = z_{ij} / \|z_{ij}\|_2,\quad c_i = \tfrac1k \textstyle\sum_j \hat z_{ij},\quad
        \mathcal L = -\|C\|_* + \frac{\lambda}{N}\sum_i \|Z_i\|_*,\quad C = [c_1 \dots c_N]^\top,\
        Z_i = [\hat z_{i1} \dots \hat z_{ik}]

    Exactly the reference's ``MMCR_Loss(lmbda, n_aug)`` on sample-major input (``λ = 0`` skips the per-sample
    SVDs; the local term is divided by ``N``; no centring; ``C`` not normalised; the scale is unnormalised,
    ``‖C‖_* <= √(N·min(N, d))``). The input layout is explicit: ``(N, k, d)`` (use :func:`mmcr_views` for stacked
    views). SVDs in float32/float64. NaN/Inf anywhere → NaN (module docstring). Minimise it.

    Args:
        z: ``(N, k, d)``: ``k`` views of ``N`` samples. ``N = 0`` gives 0 with zero gradient.
        lam: ``0 <= λ <= 1e6``, weight of the local (per-sample) nuclear norms (a weight of order 1; far larger ones
            overflow the float32 gradient at a zero view, ``∝ λ / eps``).
        eps: ``F.normalize`` eps (reference: 1e-12).
    """
    lam = check_real(lam, "lam", low=0.0, high=MMCR_MAX_LAM)  # type: ignore[assignment]
    eps = check_real(eps, "eps", low=0.0, low_open=True)  # type: ignore[assignment]
    c, zhat, bad = mmcr_terms(z, eps=eps)
    if c.shape[0] == 0 or c.shape[1] == 0 or zhat.shape[1] == 0:
        return _zero_with_grad(z)
    loss = -nuclear_norm(c)
    if lam:
        loss = loss + lam * nuclear_norm(zhat.transpose(1, 2)).sum() / c.shape[0]
    return _nan_if(bad, loss)
