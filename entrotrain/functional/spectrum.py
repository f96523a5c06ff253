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

- The functions of this module compute spectra in float64 whatever the input dtype (bf16/fp16/fp32 inputs are
  upcast first). The representation presets take ``precision="auto"`` and may run their eigensolve in float32 where
  that is within a relative 1e-5 of float64 (:mod:`~entrotrain.functional.spectral_precision`).
- Finiteness is checked with one NaN-propagating ``aminmax`` pass over the input (the bad-entry count is taken only
  when it fails).
- Symmetric matrices go through ``torch.linalg.eigvalsh`` (never a general SVD of a PSD matrix).
- Negative eigenvalues of a PSD matrix are round-off, and so are the positive ones at the float64 round-off floor
  ``max(size, 16) · ε₆₄ · max|λ|`` (``size`` = the side of the decomposed matrix, ``max(n, d)`` for a product of
  ``(n, d)`` rows; the eigenvalues of exact zeros land there: measured ``<= 12.1 ε₆₄ · max|λ|`` on rank-1 to rank-10
  products of 40-3000 rows, at most 0.03 of the floor). ``negative="clamp"`` (default) sets both to 0: they take no
  part (what vendi-score's ``λ > 0`` filter and Diff-eRank's ``nansum`` do to the negative ones). Without the floor, the round-off of the ``n − rank`` zero eigenvalues counts in every order
  ``q < 1`` (``λ^q`` of 1e-17 is 0.02 at ``q = 0.1``): the Vendi score of order 0 of 10 copies of 2 points was 10,
  not 2, and order 0.1 was 7 % too high. ``negative="abs"`` takes ``|λ|`` (what DSE does, as dse-dsmi: no
  floor). ``negative="raise"`` raises if any eigenvalue is below ``-tol · max|λ|`` (``tol = 1e-10``): use it to
  catch a kernel that is not PSD; the rest is clamped.
- Inputs holding NaN or ±Inf raise :class:`~entrotrain.errors.EntrotrainError` saying how many entries are bad (drop
  the rows holding them with :func:`~entrotrain.functional.representation.finite_rows`); so do fewer than 2 rows,
  0 features, integer dtypes and every non-finite or out-of-range parameter (``q``, ``base``, ``eps``, ``scale``).
- A zero matrix (a spectrum that sums to 0) raises on every route and every order, normalised or not; the SLQ
  estimator in :mod:`~entrotrain.functional.stochastic_spectrum` refuses it the same way.
- Scale: inputs beyond ~1e±100 are divided by a power of two first (exact), and Rényi sums are taken relative to
  ``max p``, so extreme scales and orders stay finite; LAPACK failures become an ``EntrotrainError``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor

from entrotrain._validation import check_choice, check_real, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional.spectral_precision import check_finite_fast

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

#: The one message for an all-zero matrix, on every route (exact, Frobenius, stochastic).
_ZERO_MATRIX = (
    "{name} is all zeros: the matrix is 0 (trace 0), its spectrum has no mass and its entropy is undefined. Drop zero rows, "
    "or measure a batch with more than one distinct, non-zero sample."
)

#: float64 machine epsilon: the unit of the round-off floor of :func:`_round_off_zeros`.
_EPS64 = torch.finfo(torch.float64).eps

#: Rows per block when checking an (n, n) matrix for symmetry and finiteness.
_BLOCK_ROWS = 512


# ---------------------------------------------------------------------------------------------------- validation


def _check_finite(t: Tensor, name: str) -> None:
    """Refuse NaN/±Inf entries, saying how many there are and how to drop them (one device sync)."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        count = int(bad.sum())
        raise EntrotrainError(
            f"{name} holds {count} non-finite (NaN or Inf) entr{'y' if count == 1 else 'ies'} of {t.numel()}; a "
            f"spectrum of non-finite data is undefined. Drop the rows holding them first (rows, n_dropped = "
            f"entrotrain.functional.finite_rows(x)), or fix the producer of {name}."
        )


def _eigvalsh(m: Tensor, name: str) -> Tensor:
    """``torch.linalg.eigvalsh`` of a finite symmetric float64 matrix; a LAPACK failure becomes an EntrotrainError."""
    try:
        return torch.linalg.eigvalsh(m)
    except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
        raise EntrotrainError(
            f"the eigendecomposition of {name} ({tuple(m.shape)}) failed to converge ({err}); its entries span too "
            "many orders of magnitude. Rescale the input (e.g. divide by its largest |entry|) and retry."
        ) from None


def _check_base(base: float) -> float:
    """A finite logarithm base ``> 0`` and ``!= 1``."""
    base = check_real(base, "base", low=0.0, low_open=True)
    if base == 1.0:
        raise EntrotrainError("base must be positive and != 1 (log base 1 is undefined), got 1.0; use math.e or 2.")
    return base


def _rows64(x: Tensor, name: str = "x", *, min_rows: int = 2) -> Tensor:
    """Validate ``x`` as ``(n, d)`` floating rows (``n >= min_rows``, ``d >= 1``, finite); a detached float64 copy."""
    _check_rows(x, name, min_rows=min_rows)
    check_finite_fast(x.detach(), name)  # one aminmax pass on the input; the count only on failure
    return x.detach().to(torch.float64)


def _check_rows(x: Tensor, name: str = "x", *, min_rows: int = 2) -> None:
    """Validate ``x`` as ``(n, d)`` floating rows (``n >= min_rows``, ``d >= 1``); finiteness is checked apart."""
    check_tensor(x, name, floating=True)
    if x.ndim != 2:
        raise EntrotrainError(
            f"{name} must have shape (n, d) (n samples, d features), got {tuple(x.shape)}. Flatten extra "
            f"dimensions first, e.g. x.reshape(-1, x.shape[-1]) for tokens, or x.flatten(1) for per-sample maps."
        )
    if x.shape[0] < min_rows:
        raise EntrotrainError(
            f"{name} has {x.shape[0]} row(s); representation measures need at least {min_rows} samples. "
            "Measure a larger batch (or accumulate rows across steps)."
        )
    if x.shape[1] < 1:
        raise EntrotrainError(
            f"{name} has no features (shape {tuple(x.shape)}); give rows of d >= 1 features (n, d)."
        )


def _square64(k: Tensor, name: str = "K", *, symmetric_tol: float = 1e-8) -> Tensor:
    """Validate a square symmetric matrix (relative tolerance) and return it detached in float64.

    No copy when ``k`` is already float64, and no symmetrised copy: ``eigvalsh`` reads one triangle, and round-off
    asymmetry changes a Frobenius norm by its square. The symmetry check runs over row blocks (``O(block · n)``
    scratch, not ``n²``), which matters for a 10 000² kernel (800 MB in float64).
    """
    check_tensor(k, name, floating=True, ndim=2, layout="(n, n)")
    if k.shape[0] != k.shape[1]:
        raise EntrotrainError(f"{name} must be a square (n, n) matrix, got {tuple(k.shape)}.")
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


def _round_off_zeros(eigs: Tensor, size: int) -> Tensor:
    """``eigs`` with every value at or below the round-off floor ``max(size, 16) · ε₆₄ · max|λ|`` set to exactly 0.

    A backward-stable eigensolve of a ``size``-sided PSD matrix returns its exact zero eigenvalues as ``±c·ε·max|λ|``
    with ``c`` of order 1 (measured ``c <= 12.1`` for products of up to 3000 rows); a true eigenvalue that small is
    not resolved anyway. ``size``: the side of the decomposed matrix (``max(n, d)`` for ``X Xᵀ`` or ``Xᵀ X`` of
    ``(n, d)`` rows, whose entries carry the round-off of ``d``- or ``n``-term sums)."""
    if eigs.numel() == 0:
        return eigs
    floor = max(int(size), 16) * _EPS64 * eigs.abs().max()
    return torch.where(eigs > floor, eigs, torch.zeros((), dtype=eigs.dtype, device=eigs.device))


def _apply_negative_policy(eigs: Tensor, negative: str, name: str, size: int) -> Tensor:
    check_choice(negative, "negative", NEGATIVE_EIGENVALUE_POLICIES)
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
    return _round_off_zeros(eigs, size)


# ------------------------------------------------------------------------------------------------------- spectra


def kernel_spectrum(k: Tensor, *, negative: str = "clamp") -> Tensor:
    """Eigenvalues of a symmetric kernel matrix, float64, descending.

    Args:
        k: ``(n, n)`` symmetric matrix (any float dtype; upcast to float64). Asymmetry beyond round-off raises.
        negative: ``"clamp"`` | ``"abs"`` | ``"raise"`` — the negative-eigenvalue policy (module doc).

    Returns:
        ``(n,)`` float64 eigenvalues, largest first. Cost ``O(n³)`` (``torch.linalg.eigvalsh``).
    """
    check_choice(negative, "negative", NEGATIVE_EIGENVALUE_POLICIES)
    k = _square64(k, "K")
    eigs = _eigvalsh(k, "K").flip(0)
    return _apply_negative_policy(eigs, negative, "K", k.shape[0])


def _prescale(x: Tensor) -> tuple[Tensor, float]:
    """``(x / s, s)`` with ``s`` = a power of two near ``max |x|`` when ``|x|`` is so large (> 1e100) or so small
    (< 1e-100) that ``X Xᵀ`` would overflow or underflow float64; ``(x, 1.0)`` otherwise (exact: powers of two)."""
    top = float(x.abs().max()) if x.numel() else 0.0
    if top == 0.0 or 1e-100 <= top <= 1e100:
        return x, 1.0
    unit = 2.0 ** math.frexp(top)[1]
    return x / unit, unit


def _resolve_route(route: str, n: int, d: int) -> str:
    check_choice(route, "route", ("auto", "gram", "covariance"))
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
    scale = check_real(scale, "scale", low=0.0, low_open=True)
    check_choice(negative, "negative", NEGATIVE_EIGENVALUE_POLICIES)
    x = _rows64(x, "x", min_rows=1)
    n, d = x.shape
    route = _resolve_route(route, n, d)
    x, unit = _prescale(x)
    eigs = _gram_eigvalsh(x, route)
    top = float(eigs.max())
    if top > 0 and not 0.0 < top * scale * unit * unit < math.inf:
        raise EntrotrainError(
            f"the spectrum of scale · X Xᵀ {'overflows' if top * scale * unit * unit > 0 else 'underflows'} float64 "
            f"(max |x| ≈ {unit:.3g}, scale = {scale:.3g}); rescale x (e.g. unit-norm rows) or pass another scale."
        )
    eigs = eigs * (scale * unit * unit)
    return _apply_negative_policy(eigs, negative, "X Xᵀ", max(n, d))


def _gram_eigvalsh(x: Tensor, route: str = "auto") -> Tensor:
    """Eigenvalues of the smaller of ``X Xᵀ`` / ``Xᵀ X`` (``route``), descending, ``min(n, d)`` of them, in ``x``'s
    dtype; no validation, no copy of ``x``. ``eigvalsh`` reads one triangle, so the round-off asymmetry of the
    product needs no symmetrised copy."""
    n, d = x.shape
    route = _resolve_route(route, n, d)
    m = x @ x.T if route == "gram" else x.T @ x
    return _eigvalsh(m, "X Xᵀ").flip(0)[: min(n, d)]


# ------------------------------------------------------------------------------------------------------- entropy


def _check_order(q: float | str) -> float:
    """A Rényi order: a real ``q >= 0``, ``float('inf')`` or the string ``"inf"``; NaN, negatives, bools refused."""
    if isinstance(q, str) and q.strip().lower() in ("inf", "+inf", "infinity"):
        return math.inf
    if isinstance(q, Tensor) and q.numel() == 1:
        q = q.item()
    if isinstance(q, bool) or not isinstance(q, Real):
        raise EntrotrainError(f"q (the Rényi order) must be a number >= 0 or 'inf', got {q!r}; e.g. q=1.0.")
    q = float(q)
    if math.isnan(q) or q < 0:
        raise EntrotrainError(f"Rényi order q must be >= 0 (or float('inf')), got {q}; e.g. q=1.0 (Shannon).")
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
        eigenvalues: ``(..., m)`` non-negative, finite spectrum, ``m >= 1`` (negative values raise: apply a
            negative-eigenvalue policy first). Any real dtype (integer counts too); computed in float64. A row that
            is all zeros (the spectrum of a zero matrix) raises :class:`~entrotrain.errors.EntrotrainError`, with or
            without ``normalize``: every exact and stochastic route refuses a zero operator the same way.
        q: Rényi order, ``>= 0`` or ``float('inf')``.
        base: logarithm base, finite, ``> 0`` and ``!= 1`` (``math.e`` → nats, ``2`` → bits).
        eps: in ``[0, 1)``, added to every ``p_k`` after normalisation (RankMe uses 1e-7, DSE 2.2e-16).
        normalize: divide by ``Σλ`` first (the spectrum must then have a positive sum).

    Returns:
        ``(...)`` float64 entropy in units of ``log base``.
    """
    q = _check_order(q)
    base = _check_base(base)
    eps = check_real(eps, "eps", low=0.0, high=1.0, high_open=True)
    lam = _spectrum64(eigenvalues)
    p = lam / lam.amax(-1, keepdim=True)  # scale first: Σλ of huge spectra overflows, of tiny ones underflows
    p = p / p.sum(-1, keepdim=True) if normalize else lam
    if eps:
        p = p + eps
    pos = p > 0
    if q == 1.0:
        h = -torch.where(pos, p * torch.log(torch.where(pos, p, 1.0)), 0.0).sum(-1)
    elif q == 0.0:
        h = torch.log(pos.sum(-1).to(torch.float64))
    elif math.isinf(q):
        h = -torch.log(p.amax(-1))
    else:  # log Σ p^q = q log max p + log Σ (p / max p)^q: no under/overflow of p^q for any order q
        top = p.amax(-1, keepdim=True)
        s = torch.where(pos, p / top, 0.0).pow(q).sum(-1)
        h = (q * torch.log(top.squeeze(-1)) + torch.log(s)) / (1.0 - q)
    if not normalize and not bool(torch.isfinite(h).all()):  # a normalised spectrum's entropy is always finite
        raise EntrotrainError(
            f"the entropy of the unnormalised spectrum (normalize=False, largest eigenvalue {float(lam.max()):.3g}) "
            "overflows float64; its eigenvalues are far from a distribution. Rescale the matrix (e.g. unit-norm "
            "rows) or use normalize=True."
        )
    return h / math.log(base)


def _spectrum64(eigenvalues: Tensor) -> Tensor:
    """Validate a ``(..., m)`` spectrum: real, finite, ``>= 0``, ``m >= 1``, no all-zero row; a float64 copy."""
    check_tensor(eigenvalues, "eigenvalues", min_ndim=1, layout="(..., m)")
    if eigenvalues.is_complex():
        raise EntrotrainError(
            f"eigenvalues must be real, got dtype {eigenvalues.dtype}; a PSD matrix has a real spectrum (use "
            "torch.linalg.eigvalsh, not eigvals)."
        )
    if eigenvalues.shape[-1] < 1:
        raise EntrotrainError(
            f"eigenvalues must have shape (..., m) with m >= 1, got {tuple(eigenvalues.shape)}; an empty spectrum "
            "has no entropy."
        )
    lam = eigenvalues.detach().to(torch.float64)
    _check_finite(lam, "eigenvalues")
    if bool((lam < 0).any()):
        raise EntrotrainError(
            f"eigenvalues hold negative values (min {float(lam.min()):.3g}); apply a negative-eigenvalue policy "
            "first (kernel_spectrum(..., negative='clamp'|'abs'), or lam.clamp_min(0))."
        )
    if bool((lam.amax(-1) <= 0).any()):
        raise EntrotrainError(
            "the spectrum sums to 0 (all eigenvalues are 0: a zero matrix), so p = λ / Σλ is undefined and so is "
            "its entropy. Check that the input is not all zeros (or a constant row repeated, after centring); drop "
            "zero rows or measure a batch with more than one distinct sample."
        )
    return lam


def renyi2(matrix: Tensor, *, base: float = math.e, normalize: bool = True) -> Tensor:
    r"""Order-2 entropy of the spectrum of a symmetric PSD matrix from its Frobenius norm, no eigendecomposition.

    .. math::

        H_2 = -\log \frac{\sum_k \lambda_k^2}{(\sum_k \lambda_k)^2} = -\log \frac{\|A\|_F^2}{(\operatorname{tr} A)^2}

    (``normalize=False``: ``-log ‖A‖_F²``, the vendi-score convention for ``A = K / n``). ``O(n²)``.

    Args:
        matrix: ``(n, n)`` symmetric matrix, any float dtype (float64 inside).
        base: log base. normalize: divide by the trace.
    """
    base = _check_base(base)
    a, unit = _prescale(_square64(matrix, "matrix"))
    log_fro2 = 2.0 * torch.log(torch.linalg.vector_norm(a))
    if not bool(torch.isfinite(log_fro2)):
        raise EntrotrainError(_ZERO_MATRIX.format(name="matrix"))
    if normalize:
        tr = torch.diagonal(a).sum()
        if float(tr) <= 0:
            raise EntrotrainError(
                f"matrix has a non-positive trace ({float(tr) * unit:.3g}); it is not a non-zero PSD matrix. "
                "Pass a PSD matrix (a kernel or covariance), or its eigenvalues to spectral_entropy."
            )
        return -(log_fro2 - 2.0 * torch.log(tr)) / math.log(base)
    return -(log_fro2 + 2.0 * math.log(unit)) / math.log(base)


def renyi2_from_rows(x: Tensor, *, base: float = math.e, scale: float | None = None) -> Tensor:
    r"""Order-2 entropy of the spectrum of the linear kernel ``X Xᵀ`` from the smaller of ``X Xᵀ`` / ``Xᵀ X``.

    ``‖X Xᵀ‖_F = ‖Xᵀ X‖_F`` and ``tr X Xᵀ = ‖X‖_F²``, so ``H_2 = -log(‖G‖_F² / ‖X‖_F⁴)`` with ``G`` the
    ``min(n, d)``-sided Gram: ``O(n d · min(n, d))``, no eigendecomposition. With ``scale`` given, the spectrum
    of ``scale · X Xᵀ`` is used *without* trace normalisation (vendi-score: ``scale = 1 / n``).
    """
    base = _check_base(base)
    scale = check_real(scale, "scale", low=0.0, low_open=True, none_ok=True)
    x, unit = _prescale(_rows64(x, "x", min_rows=1))
    n, d = x.shape
    g = x @ x.T if n < d else x.T @ x
    log_fro2 = torch.log((g * g).sum())  # log ‖G‖_F² of the prescaled rows
    if not bool(torch.isfinite(log_fro2)):
        raise EntrotrainError(_ZERO_MATRIX.format(name="x"))
    if scale is None:
        return -(log_fro2 - 2.0 * torch.log((x * x).sum())) / math.log(base)
    return -(log_fro2 + 4.0 * math.log(unit) + 2.0 * math.log(scale)) / math.log(base)
