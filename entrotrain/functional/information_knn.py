r"""k-nearest-neighbour MI estimators: KSG (continuous–continuous), Ross (continuous–discrete), and the PCA
compression of Butakov et al. that makes them usable on wide layers.

**KSG, algorithm 1** (Kraskov, Stögbauer & Grassberger 2004, PRE 69:066138), joint space ``z = (x, y)`` with the
max-norm ``‖z − z'‖ = max(‖x − x'‖_∞, ‖y − y'‖_∞)``; ``ε_i`` = distance from ``z_i`` to its k-th neighbour
(itself excluded), ``n_x(i) = #{j ≠ i : ‖x_i − x_j‖_∞ < ε_i}`` (strict), ``n_y`` likewise:

.. math::  \hat I_1 = \psi(k) + \psi(N) - \langle \psi(n_x + 1) + \psi(n_y + 1) \rangle .

**Ross** (2014, PLoS ONE 9:e87357; scikit-learn's ``mutual_info_classif``), ``x`` continuous, ``y`` a class:
``d_i`` = max-norm distance to the ``k_i``-th neighbour of ``i``'s class (``k_i = min(k, N_y − 1)``),
``m_i = 1 + #{j ≠ i : ‖x_i − x_j‖_∞ < d_i}`` over all classes:

.. math::  \hat I = \psi(N) + \langle \psi(k_i) \rangle - \langle \psi(N_{y_i}) \rangle - \langle \psi(m_i) \rangle ,

over the rows whose class has ≥ 2 members (singleton classes are dropped, as scikit-learn does).

Choices (reference note items 6, 7, 11, 12):

- nats by default, float64, max-norm, KSG algorithm 1 with strict counts; estimates are **not clipped** at 0
  (scikit-learn clips; KSG is unbiased at independence, so clipping would bias it upward); joint vectors (not per
  feature); no rescaling (the max-norm is not scale-free: standardise or whiten the inputs if their scales differ —
  :func:`pca_compress` whitens);
- ties (ε = 0 for discrete-valued activations) are broken by a seeded jitter like scikit-learn's but scale-free:
  ``x += jitter · mean|x_col| · N(0, 1)`` per column (default ``jitter=1e-10``, ``seed=0``, drawn on the CPU so
  every device gets the same numbers), so the estimate does not change when the data are rescaled by 1e±300;
  ``jitter=0`` estimates the raw values;
- a constant variable or one with no features gives exactly 0; fewer than ``k + 1`` rows raise (no k-th
  neighbour); memory ``O(N · chunk_size)``, time ``O(N² d)``.

Bias on correlated Gaussians (``I = −½ ln(1 − ρ²)`` per coordinate pair), N = 2000, k = 3, measured over 24 draws
(``x ~ N(0, 1)``, ``y = ρx + √(1 − ρ²) z``, ``torch.Generator`` seeds 0–23, drawn as
``tests/functional/test_information_knn.py`` draws the one it checks): mean error +0.002, +0.002, +0.007, +0.020
nats at ρ = 0, 0.5, 0.9, 0.99 (sd ≤ 0.027 per draw). Through :func:`pca_compress` (two such pairs rotated into 6
dims, compressed to 2, whitened): +0.002, +0.005, +0.009 at ρ = 0, 0.5, 0.9, but −0.18 at ρ = 0.99 (true 3.92:
KSG's known negative bias for strong dependence in a 4-d joint space).

**Lossy compression** (Butakov et al. 2024, "Information Bottleneck Analysis of Deep Neural Networks via Lossy
Compression", ICLR): MI between wide variables is estimated between compressed versions; :func:`pca_compress` keeps
the top ``dim`` principal components (recomputed at every call), whitened to unit variance by default (Butakov et
al. whiten before their Kozachenko–Leonenko entropies; here the estimator is KSG/Ross, not their 3-entropy KL form).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_int, check_real, check_seed
from entrotrain.errors import EntrotrainError
from entrotrain.functional._information_common import as_rows64, check_base, check_labels, class_ids, zero
from entrotrain.functional.information_kde import pairwise_chunk_rows

__all__ = ["jittered", "ksg_mutual_information", "pca_compress", "ross_mutual_information"]


def jittered(rows: Tensor, jitter: float, seed: int) -> Tensor:
    """``rows + jitter · mean|col| · N(0, 1)``, seeded on the CPU: scikit-learn's tie-breaking noise made scale-free
    (scikit-learn uses ``max(1, mean|col|)``, which swamps data of magnitude ≪ 1e-10; an all-zero column stays 0)."""
    if jitter == 0.0 or rows.numel() == 0:
        return rows
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows.shape, generator=gen, dtype=torch.float64).to(rows.device)
    magnitude = rows.abs()
    peak = magnitude.amax(dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    scale = (magnitude / peak).mean(dim=0) * peak  # mean|col|, without overflow at 1e308
    return rows + jitter * scale * noise


def _is_constant(rows: Tensor) -> bool:
    return rows.shape[1] == 0 or bool((rows == rows[0]).all())


def _check_knn(k: int, jitter: float, seed: int) -> tuple[int, float, int]:
    return (
        check_int(k, "k", low=1),
        check_real(jitter, "jitter", low=0.0),  # type: ignore[return-value]
        check_seed(seed, low=0, offset=1),  # y is jittered with seed + 1
    )


def _off_diagonal(block: Tensor, start: int) -> Tensor:
    """Set each row's own column (``start + i``) of a ``(c, n)`` pairwise block to +inf, in place."""
    idx = torch.arange(block.shape[0], device=block.device)
    block[idx, idx + start] = math.inf
    return block


def ksg_mutual_information(
    x: Tensor,
    y: Tensor,
    k: int = 3,
    *,
    base: float = math.e,
    jitter: float = 1e-10,
    seed: int = 0,
    chunk_size: int | None = None,
) -> Tensor:
    r"""KSG estimate (algorithm 1, max-norm, digamma form) of ``I(X;Y)`` for paired rows ``x`` ``(N, d_x)`` and
    ``y`` ``(N, d_y)`` (1-D tensors are one feature). Formula, choices and measured bias in the module docstring.

    Args:
        x, y: samples, any real dtype (computed in float64); NaN/Inf rows refused.
        k: neighbours (default 3, as scikit-learn and NPEET); needs ``N ≥ k + 1``.
        base: log base (nats by default, 2 for bits).
        jitter: relative tie-breaking noise (0 to disable); seed: its generator's seed.
        chunk_size: rows per pairwise block (memory ``O(N · chunk_size)``).

    Returns:
        A 0-d float64 tensor (not clipped: may be slightly negative near independence); 0 when either variable is
        constant or has no features.
    """
    xr, yr = as_rows64(x, "x"), as_rows64(y, "y")
    n = xr.shape[0]
    if yr.shape[0] != n:
        raise EntrotrainError(f"x and y must have the same number of rows (paired samples), got {n} and {yr.shape[0]}.")
    k, jitter, seed = _check_knn(k, jitter, seed)
    base = check_base(base)
    if n < k + 1:
        raise EntrotrainError(f"KSG needs at least k + 1 = {k + 1} rows, got {n}; pass more samples or lower k.")
    if _is_constant(xr) or _is_constant(yr):
        return zero(xr.device)
    xr, yr = jittered(xr, jitter, seed), jittered(yr, jitter, seed + 1)
    chunk = pairwise_chunk_rows(n, chunk_size)
    total = zero(xr.device)
    for start in range(0, n, chunk):
        dx = _off_diagonal(torch.cdist(xr[start : start + chunk], xr, p=math.inf), start)
        dy = _off_diagonal(torch.cdist(yr[start : start + chunk], yr, p=math.inf), start)
        eps = torch.maximum(dx, dy).topk(k, dim=1, largest=False).values[:, -1:]
        n_x = (dx < eps).sum(dim=1).to(torch.float64)
        n_y = (dy < eps).sum(dim=1).to(torch.float64)
        total = total + (torch.special.digamma(n_x + 1) + torch.special.digamma(n_y + 1)).sum()
    digamma = torch.special.digamma
    mi = digamma(torch.tensor(float(k), dtype=torch.float64)) + digamma(torch.tensor(float(n), dtype=torch.float64))
    return (mi.to(xr.device) - total / n) / math.log(base)


def ross_mutual_information(
    t: Tensor,
    labels: Tensor,
    k: int = 3,
    *,
    base: float = math.e,
    jitter: float = 1e-10,
    seed: int = 0,
    chunk_size: int | None = None,
) -> Tensor:
    r"""Ross (2014) k-NN estimate of ``I(T;Y)`` between continuous rows ``t`` ``(N, d)`` and classes ``labels``
    ``(N,)`` — scikit-learn's ``mutual_info_classif`` estimator for a joint vector, max-norm, without its clip at 0.
    Formula and choices in the module docstring.

    Returns a 0-d float64 tensor; exactly 0 when fewer than two classes have ≥ 2 members, when ``t`` is constant or
    has no features, or with fewer than 2 usable rows.
    """
    rows = as_rows64(t)
    labels = check_labels(labels, rows.shape[0]).to(rows.device)
    k, jitter, seed = _check_knn(k, jitter, seed)
    base = check_base(base)
    ids, _ = class_ids(labels)
    if ids.numel():
        class_size = torch.bincount(ids)[ids]
        keep = class_size > 1
        rows, ids, class_size = rows[keep], ids[keep], class_size[keep]
    n = rows.shape[0]
    if n < 2 or _is_constant(rows) or torch.unique(ids).numel() < 2:
        return zero(rows.device)
    rows = jittered(rows, jitter, seed)
    k_i = class_size.clamp_max(k + 1) - 1  # min(k, N_y − 1) ≥ 1
    top = int(k_i.max())
    chunk = pairwise_chunk_rows(n, chunk_size)
    digamma = torch.special.digamma
    sum_m = zero(rows.device)
    for start in range(0, n, chunk):
        d = _off_diagonal(torch.cdist(rows[start : start + chunk], rows, p=math.inf), start)
        same = ids[start : start + chunk, None] == ids[None, :]
        nearest = d.masked_fill(~same, math.inf).topk(top, dim=1, largest=False).values
        radius = nearest.gather(1, (k_i[start : start + chunk] - 1)[:, None])
        m = (d < radius).sum(dim=1).to(torch.float64) + 1.0  # the point itself
        sum_m = sum_m + digamma(m).sum()
    mi = (
        digamma(torch.tensor(float(n), dtype=torch.float64, device=rows.device))
        + digamma(k_i.to(torch.float64)).mean()
        - digamma(class_size.to(torch.float64)).mean()
        - sum_m / n
    )
    return mi / math.log(base)


def pca_compress(t: Tensor, dim: int = 4, *, whiten: bool = True, name: str = "t") -> Tensor:
    r"""The top ``min(dim, rank)`` principal-component scores of ``t`` ``(N, d)``, float64 ``(N, r)`` (Butakov et
    al. 2024's PCA compression, refit at every call).

    ``t`` is centred and decomposed by SVD, ``t_c = U S Vᵀ``; scores ``U S`` (or ``U √(N−1)``, unit variance, when
    ``whiten``). Components with ``S ≤ max(S) · max(N, d) · eps`` (rank deficiency) are dropped, so a constant
    ``t`` gives ``(N, 0)`` (an estimator then returns 0). Signs are SVD's (MI does not depend on them)."""
    rows = as_rows64(t, name)
    dim = check_int(dim, "dim", low=1)
    check_bool(whiten, "whiten")
    n, d = rows.shape
    if n < 2 or d == 0:
        return rows.new_zeros((n, 0))
    centred = rows - rows.mean(dim=0)
    u, s, _ = torch.linalg.svd(centred, full_matrices=False)
    tol = float(s.max()) * max(n, d) * torch.finfo(torch.float64).eps
    r = min(dim, int((s > tol).sum()))
    if whiten:
        return u[:, :r] * math.sqrt(n - 1)
    return u[:, :r] * s[:r]
