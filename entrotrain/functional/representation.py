r"""Representation entropy / diversity presets, each reproducing its paper's own code.

Every preset takes rows ``x`` of shape ``(n, d)`` (n samples, d features) in any float dtype and returns a 0-dim
float64 tensor. The computation is float64, except that ``matrix_entropy`` / ``matrix_erank`` / ``vendi_score``
(cosine, q = 1) / ``rankme`` / ``effective_rank`` take ``precision="auto"`` (default): float32 / bf16 / fp16 rows
are then centred, normalised and eigen-decomposed (or SVD'd) in float32 when the float32 spectrum passes the
accuracy test of :mod:`entrotrain.functional.spectral_precision` (relative error ≤ 1e-5 against float64), with the
entropy summed in float64; ``precision="float64"`` is the exact float64 path. All of them are "the entropy of a normalised spectrum"
(:func:`entrotrain.functional.spectrum.spectral_entropy`) with a different matrix, normalisation, log base and ε:

- :func:`matrix_entropy` / :func:`matrix_erank` — spectrum of ``Σ/trΣ``, ``Σ = ZᵀZ/n``, ``Z`` = rownorm(centred
  rows); nats (Wei et al. 2024, Diff-eRank).
- :func:`vendi_score` — spectrum of ``K / n`` for a unit-diagonal kernel, any order ``q``; a count (Friedman &
  Dieng 2023).
- :func:`effective_rank` — singular values of ``X`` (p ∝ σ, not σ²); a count (Roy & Vetterli 2007).
- :func:`rankme` — singular values of the raw ``X``, ``p + ε``; a count (Garrido et al. 2023).
- :func:`diffusion_spectral_entropy` — ``|λ|^t`` of ``D^-½ G D^-½`` with a Gaussian ``G``; bits (Liao et al. 2023).
- :func:`diffusion_spectral_mutual_information` — class-conditional DSE differences; bits (Liao et al. 2023).
- :func:`matrix_nuclear_norm` — column norms of ``Z`` (no spectrum: an L₁,₂ surrogate) (Li et al. 2024).

These numbers depend on ``n``, ``d`` and every parameter (DSE ≤ log₂ n, erank ≤ min(n, d), σ is absolute): log them
with the value (:data:`REPRESENTATION_MEASURES` gives each measure's parameter dict).

Rows that become zero after centring (a row equal to the mean) are kept as zero rows by :func:`matrix_entropy` and
:func:`matrix_nuclear_norm` (they take no part), where the anchors' code divides 0 by 0 and skips the NaN. Cosine
kernels need non-zero rows and raise otherwise.

Bad input (DESIGN §8): every measure returns a finite value or raises :class:`~entrotrain.errors.EntrotrainError`
naming the argument and the fix. NaN/±Inf rows are refused — a spectrum of a matrix with a NaN has no meaning, not
even row-wise — with the count of bad entries; callers that must not raise on bad data drop them first with
:func:`finite_rows` and count what was dropped. Fewer than 2 rows, 0 features, integer tensors, all-zero or
all-identical rows (where the measure is undefined) and non-finite / out-of-range parameters (``q``, ``sigma``, ``t``,
``eps``, ``max_n``, ``seed``, ``n_repetitions``) raise too. The exact presets and their SLQ estimates give the same
answer class on the same degenerate input.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable, Union

import torch
from torch import Tensor

from entrotrain._validation import check_int, check_real, check_seed, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional.spectral_precision import (
    _EPS32,
    check_finite_fast,
    check_precision,
    float32_ok,
    normalised64,
    shannon64,
    use_float32,
)
from entrotrain.functional.spectrum import (
    _ZERO_MATRIX,
    _check_order,
    _check_rows,
    _gram_eigvalsh,
    _prescale,
    _rows64,
    _square64,
    kernel_spectrum,
    linear_kernel_spectrum,
    renyi2,
    renyi2_from_rows,
    spectral_entropy,
)

__all__ = [
    "DSE_EPS",
    "REPRESENTATION_MEASURES",
    "RepresentationMeasure",
    "diffusion_matrix",
    "diffusion_spectral_entropy",
    "diffusion_spectral_mutual_information",
    "effective_rank",
    "finite_row_mask",
    "finite_rows",
    "get_measure",
    "matrix_entropy",
    "matrix_erank",
    "matrix_nuclear_norm",
    "median_pairwise_distance",
    "rankme",
    "vendi_score",
    "vendi_score_from_kernel",
]

#: ε added to every probability by dse-dsmi (``np.finfo(float).eps``).
DSE_EPS = 2.220446049250313e-16

Kernel = Union[str, Callable[[Tensor], Tensor]]


# --------------------------------------------------------------------------------------------------- helpers


def finite_row_mask(x: Tensor) -> Tensor:
    """``(n,)`` bool: which rows of ``x`` ``(n, d)`` hold only finite entries (the one definition of a usable row;
    monitors cut aligned tensors, e.g. each row's batch index, with it). No device sync."""
    check_tensor(x, "x", ndim=2, layout="(n, d)")
    if not (x.is_floating_point() or x.is_complex()):
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.isfinite(x).all(dim=1)


def finite_rows(x: Tensor) -> tuple[Tensor, int]:
    """The rows of ``x`` ``(n, d)`` whose entries are all finite, and how many rows were dropped.

    Every measure here refuses NaN/±Inf (a spectrum of a matrix with a NaN has no meaning, not even row-wise);
    callers that must never raise on bad *data* (monitors) drop those rows first and count them::

        rows, n_dropped = finite_rows(x)    # rows: (n - n_dropped, d), same dtype and device, no copy if clean

    One device sync (the count). Non-floating tensors have no non-finite entries and come back whole.
    """
    keep = finite_row_mask(x)
    n_dropped = int(x.shape[0] - keep.sum())
    return (x, 0) if n_dropped == 0 else (x[keep], n_dropped)


def _row_normalize(z: Tensor, *, allow_zero: bool, name: str) -> Tensor:
    """``z_i / ‖z_i‖`` (zero rows stay 0 when ``allow_zero``, raise otherwise). Each row is first divided by its
    largest |entry|, so the norm never overflows (rows of 1e200) or underflows (rows of 1e-200)."""
    peak = z.abs().amax(dim=1, keepdim=True)
    zero = peak == 0
    if bool(zero.any()) and not allow_zero:
        raise EntrotrainError(
            f"{name} has {int(zero.sum())} all-zero row(s): the cosine kernel is undefined there. Drop those rows "
            "or use kernel='linear'."
        )
    z = z / torch.where(zero, torch.ones_like(peak), peak)
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    return z / torch.where(zero, torch.ones_like(norms), norms)


def _centred_unit_rows(x: Tensor, name: str = "x") -> Tensor:
    """``rownorm(X − mean over rows)`` with zero rows kept as zero; raises when every row equals the mean.

    Scale-free, so ``x`` is first divided by a power of two near ``max |x|`` when its scale is extreme (exact)."""
    x, _ = _prescale(x)
    z = x - x.mean(dim=0, keepdim=True)
    z = _row_normalize(z, allow_zero=True, name=name)
    if not bool((z != 0).any()):
        raise EntrotrainError(
            f"all rows of {name} are identical: after centring every row is 0 and the measure is undefined. "
            "Measure a batch with more than one distinct sample."
        )
    return z


def _scaled_sq_dists(x: Tensor) -> tuple[Tensor, float]:
    """``(D, s)`` with ``‖x_i − x_j‖² = s² · D_ij``: distances of the rows divided by a power of two ``s`` near
    ``max |x|`` when the scale of ``x`` is extreme (1e200 rows would overflow ``‖x_i‖²``), ``s = 1`` otherwise."""
    x, unit = _prescale(x)
    return _sq_dists(x), unit


def _sq_dists(x: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances, float64, from the differences themselves (``torch.cdist`` without the
    matmul shortcut; scipy's ``cdist`` in dse-dsmi does the same): symmetric bit for bit, exactly 0 between identical
    rows, and as accurate for rows far from the origin as near it. The shortcut ``‖x_i‖² + ‖x_j‖² − 2 x_i·x_j`` loses
    the digits of ``‖x_i‖²``: rows offset by 1e5 made the DSE kernel asymmetric (an error), copies of a row were
    2e-13 apart, so at σ = 1e-7 their kernel entry was not 1 and not symmetric. ``O(n² d)`` like the shortcut, with
    each pair computed once (:func:`_upper_sq_dist_blocks`, the lower triangle is its mirror image): 1.4×, 1.7×,
    3.1× the shortcut's time at n × d = 1000 × 64, 2048 × 128, 2048 × 256 (1 CPU thread, load ~10; 1.9×, 3.0×, 7.4×
    with every pair computed twice by one ``cdist``), below the ``eigvalsh`` of the n × n kernel that DSE and the
    Vendi score need."""
    n = x.shape[0]
    out = torch.empty(n, n, dtype=x.dtype, device=x.device)
    for start, stop, block in _upper_sq_dist_blocks(x):
        out[start:stop, start:] = block
        out[stop:, start:stop] = block[:, stop - start :].T
    return out


#: Rows per block of :func:`_upper_sq_dist_blocks`: each block computes ``rows × (n − start)`` pairs, so about
#: ``n · rows / 2`` pairs are computed twice (the diagonal blocks) besides the ``n² / 2`` of the upper triangle.
_DIST_BLOCK_ROWS = 128


def _upper_sq_dist_blocks(x: Tensor) -> Iterator[tuple[int, int, Tensor]]:
    """``(start, stop, D)`` for row blocks of ``x``: ``D = cdist(x[start:stop], x[start:])²`` (no matmul shortcut),
    the squared distances of those rows to every row from ``start`` on. ``cdist`` computes each pair from its two
    rows alone, and ``|a − b| = |b − a|``, so the blocks and their mirror images are bit for bit
    ``cdist(x, x)²``: every pair at about half the cost."""
    n = x.shape[0]
    for start in range(0, n, _DIST_BLOCK_ROWS):
        stop = min(start + _DIST_BLOCK_ROWS, n)
        yield start, stop, torch.cdist(x[start:stop], x[start:], compute_mode="donot_use_mm_for_euclid_dist").square_()


def median_pairwise_distance(x: Tensor) -> Tensor:
    """Median Euclidean distance over the ``m = n(n-1)/2`` pairs of distinct rows (float64, 0-dim).

    The usual median (``numpy.median``, ``statistics.median``): for even ``m`` the mean of the two middle distances
    (``torch.median`` would return the lower one). Log it next to any kernel measure with a fixed σ, so the σ choice
    can be audited (DSE's σ is absolute); ``vendi_score(kernel="rbf", sigma=None)`` uses it as σ.
    """
    x, unit = _prescale(_rows64(x))
    # the pairs i < j straight from the upper-triangle blocks: no n × n matrix, no (2, m) index tensor
    dist = torch.cat([
        block[torch.ones(block.shape, dtype=torch.bool, device=x.device).triu_(1)]
        for _, _, block in _upper_sq_dist_blocks(x)
    ]).sqrt_()
    m = dist.numel()
    lower = torch.kthvalue(dist, (m + 1) // 2).values
    if m % 2:
        return lower * unit
    # the (m/2 + 1)-th smallest without a second kthvalue: lower itself when more than m/2 distances are <= lower,
    # else the smallest distance above it (two elementwise passes; kthvalue copies and partitions the m distances)
    above = torch.where(dist > lower, dist, torch.full((), math.inf, dtype=dist.dtype, device=dist.device)).amin()
    upper = torch.where((dist <= lower).sum() > m // 2, lower, above)
    return 0.5 * (lower + upper) * unit


# ---------------------------------------------------------------------------------------------- matrix entropy


def matrix_entropy(x: Tensor, *, normalized: bool = False, precision: str = "auto") -> Tensor:
    r"""Matrix entropy of Wei et al. (2024, "Diff-eRank", arXiv 2401.17139), in nats.

    .. math::

        Z = \operatorname{rownorm}(X - \bar X),\quad \Sigma = Z^\top Z / n,\quad
        H = -\sum_k \lambda_k \ln \lambda_k,\ \lambda = \operatorname{spec}(\Sigma / \operatorname{tr}\Sigma)

    ``normalized=True`` returns ``H / ln d`` (the form of the Matrix-Nuclear-Norm and UNComp code). Computed on
    the ``n × n`` Gram when ``n < d`` and the ``d × d`` covariance otherwise (same spectrum). Invariant to the
    scale of ``x``, to row permutations and to rotations of the features.

    Args:
        x: ``(n, d)``, ``n >= 2``, for one sequence the ``T`` token states of one layer.
        precision: ``"auto"`` (float32 centring, Gram and eigensolve for float32/bf16/fp16 input when the spectrum
            passes the accuracy test of :mod:`~entrotrain.functional.spectral_precision`, relative error ≤ 1e-5
            against float64; float64 otherwise) or ``"float64"`` (every step in float64). The entropy sum is float64.

    Returns:
        0-dim float64, ``0 <= H <= ln min(n - 1, d)``.
    """
    h = _matrix_entropy(x, check_precision(precision), count=False)
    if normalized:
        if x.shape[1] < 2:
            raise EntrotrainError("normalized matrix entropy divides by ln d; it needs d >= 2 features.")
        h = h / math.log(x.shape[1])
    return h


def _matrix_entropy(x: Tensor, precision: str, *, count: bool) -> Tensor:
    """Validate once, then the float32 route (when ``precision`` allows and the bound accepts it) or float64."""
    _check_rows(x, "x")
    x = x.detach()
    top = check_finite_fast(x, "x")
    if use_float32(x, precision):
        h = _matrix_entropy32(x, top, count=count)
        if h is not None:
            return h
    z = _centred_unit_rows(x.to(torch.float64))
    return spectral_entropy(_gram_eigvalsh(z).clamp_min(0.0), 1.0)


def _scaled32(x: Tensor, top: float) -> tuple[Tensor, float]:
    """``x`` in float32 (a copy only for other dtypes) divided by a power of two when ``max |x|`` is outside
    ``[2⁻²⁰, 2²⁰]`` (exact), so that squares and sums of rows neither overflow nor underflow; and the new max."""
    x32 = x.to(torch.float32)
    if top == 0.0 or 2.0**-20 <= top <= 2.0**20:
        return x32, top
    unit = 2.0 ** math.frexp(top)[1]
    return x32 / unit, top / unit


def _unit_rows32(z: Tensor, top: float) -> tuple[Tensor, Tensor] | None:
    """Row norms of float32 rows ``z`` (divided in place) and their min; None when a row norm is below ``2⁻²⁰`` of
    the largest entry (a zero or nearly-zero row: its direction would be float32 noise, so use float64)."""
    norms = torch.linalg.vector_norm(z, dim=1, keepdim=True)
    nmin = norms.min()
    if not float(nmin) > 2.0**-20 * top:
        return None
    return z.div_(norms), nmin


def _matrix_entropy32(x: Tensor, top: float, *, count: bool) -> Tensor | None:
    """Matrix entropy with float32 centring, Gram and ``eigvalsh``; None when the accuracy bound refuses it."""
    xs, top = _scaled32(x, top)
    z = xs - xs.mean(dim=0, keepdim=True)  # the one copy: centred rows, corrected and normalised in place below
    z.sub_(z.mean(dim=0, keepdim=True))  # second pass: removes the float32 error of the mean (ε·|μ| → ε·|z|)
    norms = torch.linalg.vector_norm(z, dim=1)
    nmin, rms, inv_rms = torch.stack(
        (norms.min(), norms.square().mean().sqrt(), norms.reciprocal().square().mean().sqrt())
    ).double().tolist()
    if not nmin > 2.0**-20 * top:  # a (near-)zero row: its direction is float32 noise; float64 keeps it as 0
        return None
    z.div_(norms[:, None])
    # rounding of each row + the mean's leftover error (~ε·rms), RMS over rows
    row_rel = _EPS32 * (2.0 + rms * inv_rms)
    return _gram_entropy32(z, count=count, row_rel=row_rel)


def _gram_entropy32(z: Tensor, *, count: bool, row_rel: float) -> Tensor | None:
    """``H`` (float64) of the eigenvalues of the float32 Gram of unit rows ``z``, normalised to sum 1 (the λ of
    ``K/n``: vendi-score's, within ε); None when ``eigvalsh`` fails or :func:`float32_ok` refuses it (``row_rel``: the
    relative rounding of the rows). The float32 route of :func:`matrix_entropy` and the cosine :func:`vendi_score`."""
    try:
        lam = _gram_eigvalsh(z)
    except EntrotrainError:
        return None
    p = normalised64(lam)
    h = shannon64(p)
    return h if float32_ok(p, float(h), count=count, row_rel=row_rel, n_negative=int((lam < 0).sum())) else None


def matrix_erank(x: Tensor, *, precision: str = "auto") -> Tensor:
    """``exp(matrix_entropy(x))``: Wei et al.'s effective rank (= Vendi score q=1, cosine kernel, centred rows).
    ``precision`` as :func:`matrix_entropy` (the float32 route keeps the relative error of the count ≤ 1e-5)."""
    return torch.exp(_matrix_entropy(x, check_precision(precision), count=True))


# ------------------------------------------------------------------------------------------------------- Vendi


def _check_unit_diagonal(k: Tensor, name: str) -> None:
    diag = torch.diagonal(k)
    worst = float((diag - 1.0).abs().max())
    if worst > 1e-6:
        raise EntrotrainError(
            f"{name} must have a unit diagonal (k(x, x) = 1) for the Vendi score; max |diag − 1| = {worst:.3g}. "
            "Normalise it: K / torch.sqrt(torch.outer(K.diagonal(), K.diagonal()))."
        )


def vendi_score_from_kernel(k: Tensor, q: float | str = 1.0) -> Tensor:
    r"""Vendi score of order ``q`` of a unit-diagonal PSD kernel matrix (Friedman & Dieng 2023).

    .. math::  \mathrm{VS}_q(K) = \exp H_q(\lambda),\qquad \lambda = \operatorname{spec}(K / n)

    with :func:`~entrotrain.functional.spectrum.spectral_entropy` on ``λ`` *as is* (no renormalisation; negative
    round-off eigenvalues and those at the round-off floor ``max(n, 16) · ε₆₄ · max λ`` take no part): vendi-score
    0.0.3's ``score_K(K, q)``, except where ``K`` is rank-deficient, whose zero eigenvalues ``score_K`` counts as
    their ±1e-17 round-off in every order ``q < 1`` (order 0, the rank, becomes about ``n``). ``q = 2`` uses
    ``VS₂ = 1 / ‖K/n‖_F²`` (no eigendecomposition). ``q`` may be ``float('inf')`` or ``"inf"``.

    Args:
        k: ``(n, n)`` symmetric, unit diagonal. q: order ``>= 0``.

    Returns:
        0-dim float64 in ``[1, n]`` (for a PSD kernel).
    """
    q = _check_order(q)
    k = _square64(k, "K")
    _check_unit_diagonal(k, "K")
    n = k.shape[0]
    if q == 2.0:
        return torch.exp(renyi2(k / n, normalize=False))
    return torch.exp(spectral_entropy(kernel_spectrum(k / n), q, normalize=False))


def _rbf_kernel(x: Tensor, sigma: float) -> Tensor:
    """``exp(-‖x_i − x_j‖² / 2σ²)`` for any scale of ``x`` and σ: from scaled distances ``D`` and ``r = s / σ``,
    ``exp(-½ (D r) r)`` (σ = 1e-300 gives the identity, σ = 1e300 the all-ones matrix, rows of 1e200 stay finite),
    and exactly 1 where two rows coincide (``0 · ∞`` never happens)."""
    d2, unit = _scaled_sq_dists(x)
    r = unit / sigma
    same = d2 == 0
    return d2.mul_(r).mul_(-0.5).mul_(r).exp_().masked_fill_(same, 1.0)  # in place: no n × n temporaries


def _check_sigma(sigma: Any, name: str = "sigma") -> float:
    return check_real(sigma, name, low=0.0, low_open=True)  # type: ignore[return-value]


def _linear_kernel_rows(x: Tensor, kernel: str) -> Tensor:
    """Rows whose linear kernel is the Vendi kernel: unit rows (``"cosine"``) or ``x`` itself (``"linear"``).

    One rule for the exact and the SLQ route, every order: an all-zero ``x`` (zero kernel) raises, never a value, and
    so does a linear kernel whose trace ``‖X‖_F² / n`` over- or underflows float64 (rows beyond ~1e±154)."""
    if kernel == "cosine":
        return _row_normalize(_prescale(x)[0], allow_zero=False, name="x")
    if not bool((x != 0).any()):
        raise EntrotrainError(_ZERO_MATRIX.format(name="x") + " (The linear kernel X Xᵀ of zero rows is 0.)")
    xs, unit = _prescale(x)
    trace = float((xs * xs).sum()) / x.shape[0] * unit * unit  # tr(X Xᵀ / n): Σλ, used unnormalised
    if not 0.0 < trace < math.inf:
        raise EntrotrainError(
            f"the spectrum of X Xᵀ / n {'overflows' if trace > 0 else 'underflows'} float64 (max |x| ≈ {unit:.3g}): the "
            "linear-kernel Vendi score uses these eigenvalues unnormalised. Rescale x (e.g. unit-norm rows: "
            "kernel='cosine')."
        )
    return x


def vendi_score(
    x: Tensor,
    q: float | str = 1.0,
    *,
    kernel: Kernel = "cosine",
    sigma: float | None = None,
    precision: str = "auto",
) -> Tensor:
    r"""Vendi score of order ``q`` of the rows of ``x`` (Friedman & Dieng 2023, "The Vendi Score").

    ``VS_q = exp H_q(spec(K / n))`` with the kernel:

    - ``"cosine"`` (default): ``K = X̂ X̂ᵀ``, ``X̂`` = rows scaled to unit norm (no centring) — vendi-score's
      ``score_dual(X, q)``; computed on the ``d × d`` matrix ``X̂ᵀ X̂ / n`` when ``d ≤ n``;
    - ``"linear"``: ``K = X Xᵀ`` — ``score_dual(X, q, normalize=False)``. The diagonal is *not* 1, so the
      eigenvalues of ``K / n`` do not sum to 1 and the value is only a diversity when the rows have unit norm;
    - ``"rbf"``: ``K_ij = exp(-‖x_i − x_j‖² / 2σ²)``, ``σ`` = ``sigma`` or, if ``None``, the median pairwise
      distance (:func:`median_pairwise_distance`);
    - a callable ``kernel(x) -> (n, n)`` tensor with unit diagonal (checked).

    ``q = 2`` goes through the Frobenius norm (``VS₂ = 1 / ‖K/n‖_F²``), no eigendecomposition.

    Args:
        x: ``(n, d)``, ``n >= 2``. q: Rényi order ``>= 0`` incl. ``float('inf')`` / ``"inf"``.
        precision: ``"auto"``: the cosine kernel at ``q = 1`` on float32/bf16/fp16 input is computed in float32
            (unit rows, Gram, ``eigvalsh``; entropy summed in float64) when the spectrum passes the accuracy test of
            :mod:`~entrotrain.functional.spectral_precision` (relative error ≤ 1e-5 against float64), in float64
            otherwise; every other kernel and order is float64. ``"float64"``: always float64.

    Returns:
        0-dim float64; ``1 <= VS <= min(n, rank K)`` for unit-diagonal kernels.
    """
    q = _check_order(q)
    precision = check_precision(precision)
    _check_rows(x, "x")
    top = check_finite_fast(x.detach(), "x")
    if kernel == "cosine" and q == 1.0 and use_float32(x, precision):
        vs = _vendi_cosine32(x.detach(), top)
        if vs is not None:
            return vs
    x = x.detach().to(torch.float64)
    n = x.shape[0]
    if callable(kernel):
        k = kernel(x)
        if not isinstance(k, Tensor) or tuple(k.shape) != (n, n):
            got = tuple(k.shape) if isinstance(k, Tensor) else type(k).__name__
            raise EntrotrainError(f"kernel(x) must return an ({n}, {n}) tensor, got {got}.")
        return vendi_score_from_kernel(k, q)
    if kernel in ("cosine", "linear"):
        z = _linear_kernel_rows(x, kernel)
        if q == 2.0:
            return _finite_score(torch.exp(renyi2_from_rows(z, scale=1.0 / n)), kernel)
        return _finite_score(
            torch.exp(spectral_entropy(linear_kernel_spectrum(z, scale=1.0 / n), q, normalize=False)), kernel
        )
    if kernel == "rbf":
        return vendi_score_from_kernel(_rbf_kernel(x, _rbf_sigma(x, sigma)), q)
    raise EntrotrainError(f"kernel={kernel!r} is not 'cosine', 'linear', 'rbf' or a callable x -> (n, n) tensor.")


def _vendi_cosine32(x: Tensor, top: float) -> Tensor | None:
    """Cosine Vendi q = 1 from float32 unit rows, Gram and ``eigvalsh``; None when the accuracy bound refuses it."""
    xs, top = _scaled32(x, top)
    z = xs.clone() if xs is x else xs  # unit rows are written in place: never into the caller's tensor
    unit = _unit_rows32(z, top)
    if unit is None:
        return None
    h = _gram_entropy32(unit[0], count=True, row_rel=2.0 * _EPS32)
    return None if h is None else torch.exp(h)


def _finite_score(vs: Tensor, kernel: str) -> Tensor:
    """The Vendi score, refused when ``exp H`` overflows: only possible for the linear kernel, whose eigenvalues
    ``λ(X Xᵀ / n)`` are used unnormalised (rows far from unit norm make ``Σλ^q`` tiny or huge)."""
    if not bool(torch.isfinite(vs)):
        raise EntrotrainError(
            f"the Vendi score with kernel={kernel!r} overflows float64 here: the linear kernel uses the eigenvalues of "
            "X Xᵀ / n as they are, and these rows are far from unit norm. Use kernel='cosine' (unit rows) or "
            "rescale x."
        )
    return vs


def _rbf_sigma(x: Tensor, sigma: float | None) -> float:
    """The RBF width: ``sigma`` (finite, > 0) or the median pairwise distance (> 0 unless most rows coincide)."""
    if sigma is not None:
        return _check_sigma(sigma)
    s = float(median_pairwise_distance(x))
    if not s > 0:
        raise EntrotrainError(
            "rbf kernel with sigma=None takes σ = the median pairwise distance, which is 0 here (most rows of x are "
            "identical); pass sigma=<a positive width> explicitly."
        )
    return s


# ---------------------------------------------------------------------------------------- effective rank, RankMe


def _singular_values(x: Tensor) -> Tensor:
    s = torch.linalg.svdvals(x)
    if not bool((s > 0).any()):
        raise EntrotrainError("x is all zeros: its singular values are 0 and the effective rank is undefined.")
    return s


def effective_rank(x: Tensor, *, precision: str = "auto") -> Tensor:
    r"""Effective rank of Roy & Vetterli (2007): ``exp(-Σ p_k ln p_k)``, ``p_k = σ_k / ‖σ‖₁``, ``0 ln 0 = 0``.

    ``σ`` are the singular values of ``x`` itself (not centred, *not squared* — unlike the covariance family).
    Range ``[1, rank x]``; ``diag(1, 1, 0) → 2``. ``svdvals`` of ``x`` (no Gram: that squares the condition number):
    float32 for float32/bf16/fp16 input under ``precision="auto"`` when the singular spectrum passes the accuracy
    test of :mod:`~entrotrain.functional.spectral_precision` (relative error ≤ 1e-5 against float64), float64
    otherwise and with ``precision="float64"``; the entropy sum is float64.

    Args:
        x: ``(n, d)`` matrix, ``n >= 2``. precision: ``"auto"`` | ``"float64"``.
    """
    return _svd_rank(x, 0.0, check_precision(precision))


def rankme(x: Tensor, *, eps: float = 1e-7, precision: str = "auto") -> Tensor:
    r"""RankMe of Garrido et al. (2023): ``exp(-Σ p_k ln p_k)``, ``p_k = σ_k(X) / ‖σ(X)‖₁ + ε``.

    ``X`` are the raw embeddings (no centring), ``ε = 1e-7`` as in the paper for float32 (stable-pretraining's
    callback uses 1e-5: pass ``eps=1e-5`` to match it). Scale-invariant, not centring-invariant. The paper uses
    25 600 samples. ``eps=0`` gives :func:`effective_rank`. ``precision`` as :func:`effective_rank`.

    Args:
        x: ``(n, d)`` embeddings, ``n >= 2``.
    """
    eps = check_real(eps, "eps", low=0.0, high=1.0, high_open=True)
    return _svd_rank(x, eps, check_precision(precision))


def _svd_rank(x: Tensor, eps: float, precision: str) -> Tensor:
    """``exp H(σ / ‖σ‖₁ + eps)``: validate once; float32 ``svdvals`` when allowed and accepted, float64 otherwise."""
    _check_rows(x, "x")
    x = x.detach()
    top = check_finite_fast(x, "x")
    if use_float32(x, precision) and top > 0:
        xs, _ = _scaled32(x, top)
        try:
            s = torch.linalg.svdvals(xs)
        except RuntimeError:
            s = None
        if s is not None:
            p = normalised64(s)
            h = shannon64(p, eps=eps)
            if float32_ok(p, float(shannon64(p)) if eps else float(h), count=True):
                return torch.exp(h)
    x, _ = _prescale(x.to(torch.float64))  # scale-free: exact power-of-two rescaling of extreme inputs
    return torch.exp(spectral_entropy(_singular_values(x), 1.0, eps=eps))


# --------------------------------------------------------------------------------------------------------- DSE


def diffusion_matrix(x: Tensor, sigma: float = 10.0) -> Tensor:
    r"""The symmetric diffusion matrix of dse-dsmi: ``K = D^{-1/2} G D^{-1/2}``, ``G_ij = exp(-‖x_i − x_j‖² / 2σ²)``.

    ``D = diag(Σ_j G_ij)``. ``K`` has the spectrum of the random-walk matrix ``P = D⁻¹ G`` (in ``[-1, 1]``, top
    eigenvalue 1) and, ``G`` being PSD, is PSD. dse-dsmi's ``1/(σ√2π)`` prefactor cancels and is left out.
    Returns an ``(n, n)`` float64 matrix; ``O(n² d)`` time, ``O(n²)`` memory.
    """
    sigma = _check_sigma(sigma)
    x = _rows64(x)
    g = _rbf_kernel(x, sigma)
    inv_sqrt_deg = g.sum(1).rsqrt()
    return g.mul_(inv_sqrt_deg[:, None]).mul_(inv_sqrt_deg[None, :])


def _subsample(x: Tensor, max_n: int | None, seed: int) -> Tensor:
    if max_n is None or x.shape[0] <= max_n:
        return x
    gen = torch.Generator(device="cpu").manual_seed(seed)
    idx = torch.randperm(x.shape[0], generator=gen)[:max_n].to(x.device)
    return x[idx]


def diffusion_spectral_entropy(
    x: Tensor,
    sigma: float = 10.0,
    t: int = 1,
    *,
    max_n: int | None = 10000,
    seed: int = 0,
) -> Tensor:
    r"""Diffusion spectral entropy of Liao et al. (2023), in **bits**, as dse-dsmi 1.1 computes it.

    .. math::

        K = D^{-1/2} G D^{-1/2},\quad \alpha_k = \frac{|\lambda_k(K)|^t}{\sum_j |\lambda_j(K)|^t},\quad
        \mathrm{DSE} = -\sum_k (\alpha_k + \varepsilon) \log_2 (\alpha_k + \varepsilon),\ \varepsilon = 2.2\cdot10^{-16}

    σ is absolute (not scale-free): ``DSE(cX, σ) = DSE(X, σ/c)``. ``σ → 0`` gives ``log₂ n``; large ``t``
    collapses it. The value depends on ``n``: keep ``n`` fixed across epochs. More than ``max_n`` rows are
    subsampled without replacement with a seeded torch generator (dse-dsmi does the same with numpy's RNG, so the
    subset differs). ``O(n² d + n³)``: for large ``n`` see
    :func:`~entrotrain.functional.stochastic_spectrum.slq_diffusion_spectral_entropy`.

    Args:
        x: ``(n, d)`` embeddings, ``n >= 2``. sigma: Gaussian kernel width (default 10). t: diffusion time.
    """
    t = _check_time(t)
    sigma = _check_sigma(sigma)
    max_n = check_int(max_n, "max_n", low=2, none_ok=True)
    seed = check_seed(seed)
    x = _subsample(_rows64(x), max_n, seed)
    eigs = kernel_spectrum(diffusion_matrix(x, sigma), negative="abs")
    # |λ|^t / Σ|λ|^t = (|λ| / max|λ|)^t / Σ(...)^t: scaling first keeps the top term 1 for any t (no underflow to 0)
    return spectral_entropy((eigs / eigs.max()).pow(t), 1.0, base=2.0, eps=DSE_EPS)


def _check_time(t: Any) -> float:
    """Diffusion time: a finite real ``t > 0`` (bools refused)."""
    return check_real(t, "t (diffusion time)", low=0.0, low_open=True)  # type: ignore[return-value]


def _discrete_labels(y: Tensor, n: int) -> Tensor:
    if not isinstance(y, Tensor):
        raise EntrotrainError(f"y must be a tensor of n = {n} class labels, got {type(y).__name__}.")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1 or y.shape[0] != n:
        raise EntrotrainError(
            f"y must hold one discrete label per row of x, shape ({n},), got {tuple(y.shape)}. Vector-valued "
            "references (dse-dsmi's spectral clustering) are not supported: cluster them into labels first."
        )
    if y.is_floating_point() or y.is_complex():
        raise EntrotrainError(
            f"y has dtype {y.dtype}: DSMI here takes discrete class labels (integer or bool). For a continuous "
            "1-D target, bin it first, e.g. torch.bucketize(y, torch.linspace(y.min(), y.max(), 11)[1:-1])."
        )
    return y


def diffusion_spectral_mutual_information(
    x: Tensor,
    y: Tensor,
    sigma: float = 10.0,
    t: int = 1,
    *,
    n_repetitions: int = 5,
    seed: int = 0,
) -> Tensor:
    r"""Diffusion spectral mutual information of Liao et al. (2023) with discrete labels, in bits.

    .. math::

        \mathrm{DSMI}(X; Y) = \sum_c p(c)\Big[\frac{1}{R}\sum_{r=1}^{R} \mathrm{DSE}(X_{S_{c,r}})
        - \mathrm{DSE}(X_c)\Big]

    ``X_c`` = rows of class ``c``, ``p(c) = n_c / n``, ``S_{c,r}`` a uniformly random subset of ``n_c`` rows of
    all of ``X`` (``R = n_repetitions``; the generator is re-seeded with ``seed`` for each class, as dse-dsmi
    re-seeds Python's ``random``, so the subsets differ from dse-dsmi's but follow the same scheme). Classes with
    one row contribute 0 (both terms are the entropy of a single eigenvalue). Not a Shannon MI: it can be negative.

    Args:
        x: ``(n, d)`` embeddings. y: ``(n,)`` integer/bool labels (float labels raise: bin them first).
        sigma, t: as :func:`diffusion_spectral_entropy`. n_repetitions: random subsets per class. seed: RNG seed.
    """
    sigma, t = _check_sigma(sigma), _check_time(t)
    n_repetitions = check_int(n_repetitions, "n_repetitions", low=1)
    seed = check_seed(seed)
    x = _rows64(x)
    n = x.shape[0]
    y = _discrete_labels(y, n).to(x.device)
    classes, counts = torch.unique(y, return_counts=True)
    mi = torch.zeros((), dtype=torch.float64, device=x.device)
    for c, n_c in zip(classes.tolist(), counts.tolist()):
        if n_c < 2:
            continue
        p_c = n_c / n
        h_cond = diffusion_spectral_entropy(x[y == c], sigma, t, max_n=None)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        h_rand = torch.stack(
            [
                diffusion_spectral_entropy(x[torch.randperm(n, generator=gen)[:n_c].to(x.device)], sigma, t, max_n=None)
                for _ in range(n_repetitions)
            ]
        ).mean()
        mi = mi + p_c * (h_rand - h_cond)
    return mi


# ------------------------------------------------------------------------------------------ matrix nuclear norm


def matrix_nuclear_norm(x: Tensor) -> Tensor:
    r"""Matrix Nuclear-Norm surrogate of Li et al. (2024), divided by the number of rows, as their code computes.

    .. math::

        Z = \operatorname{rownorm}(X - \bar X),\qquad
        \mathrm{MNN} = \frac{1}{T}\sum_{j \in \text{top}_{\min(T, d)}} \|Z_{:, j}\|_2

    (the sum of the ``min(T, d)`` largest column L2 norms: an ``L_{1,2}`` surrogate, *not* close to the true nuclear
    norm). ``O(T d)``; no SVD. ``R = [[1,0],[-1,0],[0,1],[0,-1]] → 2√2 / 4 ≈ 0.7071``.

    Args:
        x: ``(T, d)`` hidden states of one response, ``T >= 2``.
    """
    x = _rows64(x)
    z = _centred_unit_rows(x)
    t, d = z.shape
    cols = torch.linalg.vector_norm(z, dim=0)
    return torch.topk(cols, min(t, d)).values.sum() / t


# ------------------------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class RepresentationMeasure:
    """One named measure for a callback: the function, its unit, and the parameters to log with its value.

    ``measure(x, **overrides)`` computes it; ``measure.params(x, **overrides)`` returns the dict to log
    (``n``, ``d``, the unit and every parameter, overrides applied).
    """

    name: str
    fn: Callable[..., Tensor]
    unit: str
    defaults: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def __call__(self, x: Tensor, **overrides: Any) -> Tensor:
        unknown = set(overrides) - set(self.defaults)
        if unknown:
            raise EntrotrainError(
                f"measure {self.name!r} takes parameters {sorted(self.defaults)}, got unknown {sorted(unknown)}."
            )
        return self.fn(x, **{**self.defaults, **overrides})

    def params(self, x: Tensor, **overrides: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"measure": self.name, "unit": self.unit}
        if isinstance(x, Tensor) and x.ndim == 2:
            out["n"], out["d"] = int(x.shape[0]), int(x.shape[1])
        for key, value in {**self.defaults, **overrides}.items():
            out[key] = value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
        return out


#: name → :class:`RepresentationMeasure`, for callbacks (``entropy/repr/{layer}/{name}``).
REPRESENTATION_MEASURES: dict[str, RepresentationMeasure] = {
    m.name: m
    for m in (
        RepresentationMeasure(
            "matrix_entropy", matrix_entropy, "nats", {"normalized": False, "precision": "auto"}, "Wei et al. 2024"
        ),
        RepresentationMeasure(
            "matrix_entropy_normalized",
            matrix_entropy,
            "fraction of ln d",
            {"normalized": True, "precision": "auto"},
            "Wei et al. 2024",
        ),
        RepresentationMeasure("matrix_erank", matrix_erank, "count", {"precision": "auto"}, "Wei et al. 2024"),
        RepresentationMeasure("effective_rank", effective_rank, "count", {"precision": "auto"}, "Roy & Vetterli 2007"),
        RepresentationMeasure("rankme", rankme, "count", {"eps": 1e-7, "precision": "auto"}, "Garrido et al. 2023"),
        RepresentationMeasure(
            "vendi",
            vendi_score,
            "count",
            {"q": 1.0, "kernel": "cosine", "sigma": None, "precision": "auto"},
            "Friedman & Dieng 2023",
        ),
        RepresentationMeasure(
            "dse",
            diffusion_spectral_entropy,
            "bits",
            {"sigma": 10.0, "t": 1, "max_n": 10000, "seed": 0},
            "Liao et al. 2023",
        ),
        RepresentationMeasure("nuclear_norm", matrix_nuclear_norm, "per row", {}, "Li et al. 2024"),
    )
}


def get_measure(name: str) -> RepresentationMeasure:
    """The registered measure called ``name``; raises listing the known names otherwise."""
    try:
        return REPRESENTATION_MEASURES[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name (a list of names)
        raise EntrotrainError(
            f"unknown representation measure {name!r}; known: {sorted(REPRESENTATION_MEASURES)}."
        ) from None
