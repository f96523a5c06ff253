r"""The spectral core: float64 spectra of Gram, covariance and kernel matrices, and the entropy of a spectrum.

Every representation measure in :mod:`entrotrain.functional.representation` is "the entropy of a normalised
spectrum" with a different matrix, normalisation, log base and ε. This module holds the shared pieces:

- :func:`spectral_entropy` — Rényi entropy of order ``q`` of ``p = λ / Σλ`` (any ``q`` including 0, 1, 2, ∞):

  .. math::

      H_1 = -\sum_{p_k > 0} p_k \ln p_k,\quad H_q = \frac{\ln \sum_{p_k>0} p_k^q}{1-q},\quad
      H_0 = \ln \#\{p_k > 0\},\quad H_\infty = -\ln \max_k p_k

  with ``0 · log 0 = 0``, an optional ``ε`` added to every ``p_k`` (RankMe, DSE) and any log base.
- :func:`linear_kernel_spectrum` — the non-zero eigenvalues of the ``n × n`` Gram ``X Xᵀ``, taken by the cheap
  exact route: the ``n × n`` Gram itself when ``n < d``, the ``d × d`` matrix ``Xᵀ X`` when ``d ≤ n`` (same
  non-zero eigenvalues). Cost ``O(n d · min(n, d) + min(n, d)³)`` instead of ``O(n³)``.
- :func:`kernel_spectrum` — eigenvalues of a symmetric (PSD) kernel matrix.
- :func:`renyi2` / :func:`renyi2_from_rows` — order-2 entropy from the Frobenius norm, no eigendecomposition:
  ``H_2 = -ln(‖A‖_F² / (tr A)²)``.

Numerics policy (one place, DESIGN §2):

- Spectra are computed in float64 whatever the input dtype (bf16/fp16/fp32 inputs are upcast first).
- Symmetric matrices go through ``torch.linalg.eigvalsh`` (never a general SVD of a PSD matrix).
- Negative eigenvalues of a PSD matrix are round-off. ``negative="clamp"`` (default) sets them to 0: they take no
  part (exactly what vendi-score's ``λ > 0`` filter and Diff-eRank's ``nansum`` do to the entropy).
  ``negative="abs"`` takes ``|λ|`` (what DSE does). ``negative="raise"`` raises if any eigenvalue is below
  ``-tol · max|λ|`` (``tol = 1e-10``): use it to catch a kernel that is not PSD.
- Inputs holding NaN or ±Inf raise :class:`~entrotrain.errors.EntrotrainError`; so do fewer than 2 rows.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entrotrain.errors import EntrotrainError

__all__ = [
    "NEGATIVE_EIGENVALUE_POLICIES",
    "kernel_spectrum",
    "linear_kernel_spectrum",
    "renyi2",
    "renyi2_from_rows",
    "spectral_entropy",
]

#: How :func:`kernel_spectrum` / :func:`linear_kernel_spectrum` treat negative eigenvalues (see the module doc).
NEGATIVE_EIGENVALUE_POLICIES = ("clamp", "abs", "raise")

#: ``negative="raise"`` tolerates eigenvalues down to ``-_NEGATIVE_TOL * max|λ|`` (round-off of float64 eigh).
_NEGATIVE_TOL = 1e-10

#: Rows per block when checking an (n, n) matrix for symmetry and finiteness.
_BLOCK_ROWS = 512


# ---------------------------------------------------------------------------------------------------- validation


def _check_finite(t: Tensor, name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise EntrotrainError(
            f"{name} holds NaN or Inf values; spectra of non-finite data are undefined. Fix the producer of "
            f"{name} (or drop the bad rows, e.g. x[torch.isfinite(x).all(-1)]) before measuring it."
        )


def _rows64(x: Tensor, name: str = "x", *, min_rows: int = 2) -> Tensor:
    """Validate ``x`` as ``(n, d)`` floating rows (``n >= min_rows``, finite) and return a detached float64 copy."""
    if not isinstance(x, Tensor):
        raise EntrotrainError(f"{name} must be a torch.Tensor of shape (n, d), got {type(x).__name__}.")
    if x.ndim != 2:
        raise EntrotrainError(
            f"{name} must have shape (n, d) (n samples, d features), got {tuple(x.shape)}. Flatten extra "
            f"dimensions first, e.g. x.reshape(-1, x.shape[-1]) for tokens, or x.flatten(1) for per-sample maps."
        )
    if not (x.is_floating_point()):
        raise EntrotrainError(f"{name} must be a floating tensor, got {x.dtype}; cast it with x.float().")
    if x.shape[0] < min_rows:
        raise EntrotrainError(
            f"{name} has {x.shape[0]} row(s); representation measures need at least {min_rows} samples. "
            "Measure a larger batch (or accumulate rows across steps)."
        )
    if x.shape[1] < 1:
        raise EntrotrainError(f"{name} has no features (shape {tuple(x.shape)}).")
    x = x.detach().to(torch.float64)
    _check_finite(x, name)
    return x


def _square64(k: Tensor, name: str = "K", *, symmetric_tol: float = 1e-8) -> Tensor:
    """Validate a square symmetric matrix (relative tolerance) and return it detached in float64.

    No copy when ``k`` is already float64, and no symmetrised copy: ``eigvalsh`` reads one triangle, and round-off
    asymmetry changes a Frobenius norm by its square. The symmetry check runs over row blocks (``O(block · n)``
    scratch, not ``n²``), which matters for a 10 000² kernel (800 MB in float64).
    """
    if not isinstance(k, Tensor) or k.ndim != 2 or k.shape[0] != k.shape[1]:
        shape = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
        raise EntrotrainError(f"{name} must be a square (n, n) matrix, got {shape}.")
    if not k.is_floating_point():
        raise EntrotrainError(f"{name} must be a floating tensor, got {k.dtype}; cast it with K.double().")
    if k.shape[0] < 2:
        raise EntrotrainError(f"{name} is {tuple(k.shape)}; a spectrum measure needs at least 2 samples.")
    k = k.detach().to(torch.float64)
    n = k.shape[0]
    scale = asym = 0.0
    for start in range(0, n, _BLOCK_ROWS):
        rows = k[start : start + _BLOCK_ROWS]
        _check_finite(rows, name)
        scale = max(scale, float(rows.abs().max()))
        asym = max(asym, float((rows - k[:, start : start + _BLOCK_ROWS].T).abs().max()))
    if asym > symmetric_tol * max(scale, 1e-300):
        raise EntrotrainError(
            f"{name} is not symmetric (max |K - Kᵀ| = {asym:.3g}, max |K| = {scale:.3g}); a kernel matrix must be "
            "symmetric. Symmetrise it with (K + K.T) / 2 if the asymmetry is round-off."
        )
    return k


def _apply_negative_policy(eigs: Tensor, negative: str, name: str) -> Tensor:
    if negative not in NEGATIVE_EIGENVALUE_POLICIES:
        raise EntrotrainError(f"negative={negative!r} is not one of {NEGATIVE_EIGENVALUE_POLICIES}.")
    if negative == "abs":
        return eigs.abs()
    if negative == "raise":
        worst = float(eigs.min()) if eigs.numel() else 0.0
        top = float(eigs.abs().max()) if eigs.numel() else 0.0
        if worst < -_NEGATIVE_TOL * top:
            raise EntrotrainError(
                f"{name} has eigenvalue {worst:.3g} < 0 (max |λ| = {top:.3g}): it is not positive semi-definite. "
                "Use a PSD kernel, or negative='clamp' / 'abs' if you accept it."
            )
    return eigs.clamp_min(0.0)


# ------------------------------------------------------------------------------------------------------- spectra


def kernel_spectrum(k: Tensor, *, negative: str = "clamp") -> Tensor:
    """Eigenvalues of a symmetric kernel matrix, float64, descending.

    Args:
        k: ``(n, n)`` symmetric matrix (any float dtype; upcast to float64). Asymmetry beyond round-off raises.
        negative: ``"clamp"`` | ``"abs"`` | ``"raise"`` — the negative-eigenvalue policy (module doc).

    Returns:
        ``(n,)`` float64 eigenvalues, largest first. Cost ``O(n³)`` (``torch.linalg.eigvalsh``).
    """
    k = _square64(k, "K")
    eigs = torch.linalg.eigvalsh(k).flip(0)
    return _apply_negative_policy(eigs, negative, "K")


def _resolve_route(route: str, n: int, d: int) -> str:
    if route not in ("auto", "gram", "covariance"):
        raise EntrotrainError(f"route={route!r} is not one of 'auto', 'gram' (n×n), 'covariance' (d×d).")
    if route == "auto":
        return "gram" if n < d else "covariance"
    return route


def linear_kernel_spectrum(x: Tensor, *, scale: float = 1.0, route: str = "auto", negative: str = "clamp") -> Tensor:
    r"""Eigenvalues of ``scale · X Xᵀ`` (its non-zero ones equal those of ``scale · Xᵀ X``), float64, descending.

    ``X Xᵀ`` (``n × n``, the dual Gram) and ``Xᵀ X`` (``d × d``, the second moment) share their non-zero
    eigenvalues, so the smaller one is decomposed:

    - ``route="gram"``: ``eigvalsh(scale · X Xᵀ)``, ``O(n² d + n³)``, used by ``"auto"`` when ``n < d``;
    - ``route="covariance"``: ``eigvalsh(scale · Xᵀ X)``, ``O(n d² + d³)``, used by ``"auto"`` when ``d ≤ n``.

    Args:
        x: ``(n, d)`` rows (already centred / normalised as the measure wants), any float dtype.
        scale: multiplies the matrix (e.g. ``1 / n``).
        route: ``"auto"`` | ``"gram"`` | ``"covariance"``.
        negative: negative-eigenvalue policy (module doc).

    Returns:
        ``(min(n, d),)`` float64 eigenvalues, largest first (the other ``|n - d|`` eigenvalues are exactly 0).
    """
    x = _rows64(x, "x", min_rows=1)
    n, d = x.shape
    if _resolve_route(route, n, d) == "gram":
        m = x @ x.T
    else:
        m = x.T @ x
    m = 0.5 * (m + m.T) * scale
    eigs = torch.linalg.eigvalsh(m).flip(0)[: min(n, d)]
    return _apply_negative_policy(eigs, negative, "X Xᵀ")


# ------------------------------------------------------------------------------------------------------- entropy


def _check_order(q: float) -> float:
    try:
        q = float(q)
    except (TypeError, ValueError):
        raise EntrotrainError(f"q must be a number (0, 1, 2, float('inf'), ...), got {q!r}.") from None
    if math.isnan(q) or q < 0:
        raise EntrotrainError(f"Rényi order q must be >= 0 (or float('inf')), got {q}.")
    return q


def spectral_entropy(
    eigenvalues: Tensor,
    q: float = 1.0,
    *,
    base: float = math.e,
    eps: float = 0.0,
    normalize: bool = True,
) -> Tensor:
    r"""Rényi entropy of order ``q`` of a spectrum: the core of every representation measure.

    With ``p = λ / Σλ`` (``normalize=True``; ``p = λ`` otherwise) and then ``p ← p + ε``:

    .. math::

        H_1 = -\sum_{p_k>0} p_k \log p_k,\qquad H_q = \frac{\log \sum_{p_k>0} p_k^q}{1-q}\;(q \ne 0,1,\infty),
        \qquad H_0 = \log \#\{p_k > 0\},\qquad H_\infty = -\log \max_k p_k

    (Rényi 1961; ``0 · log 0 = 0``). ``exp(H_q)`` is the Hill number / Vendi score of order ``q``.
    ``normalize=False`` reproduces vendi-score, which uses the eigenvalues of ``K / n`` as they are (their sum is
    ``tr K / n = 1`` for a unit-diagonal kernel). ``H_0`` counts every positive ``p_k``, round-off included: use it
    on spectra whose zeros are exact, or with ``eps = 0`` after thresholding.

    Args:
        eigenvalues: ``(..., m)`` non-negative spectrum (negative values raise: apply a negative-eigenvalue policy
            first). Any float dtype; computed in float64.
        q: Rényi order, ``>= 0`` or ``float('inf')``.
        base: logarithm base (``math.e`` → nats, ``2`` → bits).
        eps: added to every ``p_k`` after normalisation (RankMe uses 1e-7, DSE 2.2e-16). ``0`` by default.
        normalize: divide by ``Σλ`` first (the spectrum must then have a positive sum).

    Returns:
        ``(...)`` float64 entropy in units of ``log base``.
    """
    q = _check_order(q)
    if not isinstance(eigenvalues, Tensor) or eigenvalues.ndim < 1 or eigenvalues.shape[-1] < 1:
        raise EntrotrainError("eigenvalues must be a tensor of shape (..., m) with m >= 1.")
    if base <= 0 or base == 1:
        raise EntrotrainError(f"base must be positive and != 1, got {base}.")
    if eps < 0:
        raise EntrotrainError(f"eps must be >= 0, got {eps}.")
    lam = eigenvalues.detach().to(torch.float64)
    _check_finite(lam, "eigenvalues")
    if bool((lam < 0).any()):
        raise EntrotrainError(
            f"eigenvalues hold negative values (min {float(lam.min()):.3g}); apply a negative-eigenvalue policy "
            "first (kernel_spectrum(..., negative='clamp'|'abs'), or lam.clamp_min(0))."
        )
    p = lam
    if normalize:
        total = lam.sum(-1, keepdim=True)
        if bool((total <= 0).any()):
            raise EntrotrainError("the spectrum sums to 0 (all eigenvalues are 0): its entropy is undefined.")
        p = lam / total
    if eps:
        p = p + eps
    pos = p > 0
    if q == 1.0:
        h = -torch.where(pos, p * torch.log(torch.where(pos, p, 1.0)), 0.0).sum(-1)
    elif q == 0.0:
        h = torch.log(pos.sum(-1).to(torch.float64))
    elif math.isinf(q):
        h = -torch.log(p.amax(-1))
    else:
        s = torch.where(pos, p, 0.0).pow(q).sum(-1)
        h = torch.log(s) / (1.0 - q)
    return h / math.log(base)


def renyi2(matrix: Tensor, *, base: float = math.e, normalize: bool = True) -> Tensor:
    r"""Order-2 entropy of the spectrum of a symmetric PSD matrix from its Frobenius norm, no eigendecomposition.

    .. math::

        H_2 = -\log \frac{\sum_k \lambda_k^2}{(\sum_k \lambda_k)^2} = -\log \frac{\|A\|_F^2}{(\operatorname{tr} A)^2}

    (``normalize=False``: ``-log ‖A‖_F²``, the vendi-score convention for ``A = K / n``). ``O(n²)``.

    Args:
        matrix: ``(n, n)`` symmetric matrix, any float dtype (float64 inside).
        base: log base. normalize: divide by the trace.
    """
    a = _square64(matrix, "matrix")
    fro2 = torch.linalg.vector_norm(a).square()
    if normalize:
        tr = torch.diagonal(a).sum()
        if float(tr) <= 0:
            raise EntrotrainError("matrix has a non-positive trace; it is not a non-zero PSD matrix.")
        fro2 = fro2 / (tr * tr)
    return -torch.log(fro2) / math.log(base)


def renyi2_from_rows(x: Tensor, *, base: float = math.e, scale: float | None = None) -> Tensor:
    r"""Order-2 entropy of the spectrum of the linear kernel ``X Xᵀ`` from the smaller of ``X Xᵀ`` / ``Xᵀ X``.

    ``‖X Xᵀ‖_F = ‖Xᵀ X‖_F`` and ``tr X Xᵀ = ‖X‖_F²``, so ``H_2 = -log(‖G‖_F² / ‖X‖_F⁴)`` with ``G`` the
    ``min(n, d)``-sided Gram: ``O(n d · min(n, d))``, no eigendecomposition. With ``scale`` given, the spectrum
    of ``scale · X Xᵀ`` is used *without* trace normalisation (vendi-score: ``scale = 1 / n``).
    """
    x = _rows64(x, "x", min_rows=1)
    n, d = x.shape
    g = x @ x.T if n < d else x.T @ x
    fro2 = (g * g).sum()
    if scale is None:
        tr = (x * x).sum()
        if float(tr) <= 0:
            raise EntrotrainError("x is all zeros: the spectrum of X Xᵀ is 0 and its entropy is undefined.")
        fro2 = fro2 / (tr * tr)
    else:
        fro2 = fro2 * (scale * scale)
    return -torch.log(fro2) / math.log(base)
