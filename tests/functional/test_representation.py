"""Representation presets against brute-force float64 references, closed forms, invariances and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.representation import (
    DSE_EPS,
    REPRESENTATION_MEASURES,
    diffusion_spectral_entropy,
    diffusion_spectral_mutual_information,
    effective_rank,
    get_measure,
    matrix_entropy,
    matrix_erank,
    matrix_nuclear_norm,
    median_pairwise_distance,
    rankme,
    vendi_score,
    vendi_score_from_kernel,
)
from tests.helpers import spectral_reference as ref

SHAPES = [(12, 40), (40, 12)]  # n < d (dual Gram route) and d < n (covariance route)
ORDERS = [0.5, 1.0, 2.0, 3.0, math.inf]


def _blobs(n: int, d: int, seed: int = 0, spread: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, d, generator=g, dtype=torch.float64) * spread
    return centres[torch.randint(0, 4, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=torch.float64)


def _rotation(d: int, seed: int = 5) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _val(t: torch.Tensor) -> float:
    assert t.dtype == torch.float64 and t.ndim == 0
    return float(t)


# -------------------------------------------------------------------------------------- brute-force references


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 14), d=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_median_pairwise_distance_is_numpy_median_of_the_pairs(n, d, seed):
    """The usual median over the n(n-1)/2 pairs: the mean of the two middle distances when their count is even
    (torch.median returns the lower one); and the rbf Vendi score with sigma=None takes that σ."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xn = x.numpy()
    d2 = ((xn[:, None, :] - xn[None, :, :]) ** 2).sum(-1)
    med = float(np.median(np.sqrt(d2[np.triu_indices(n, 1)])))
    assert _val(median_pairwise_distance(x)) == pytest.approx(med, rel=1e-12)
    want = ref.vendi_score_k(np.exp(-d2 / (2 * med**2)), 1.0)
    assert _val(vendi_score(x, kernel="rbf")) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("n, d", SHAPES)
def test_matrix_entropy_matches_diff_erank_reference(n, d):
    x = _blobs(n, d)
    want = ref.matrix_entropy(x.numpy())
    assert _val(matrix_entropy(x)) == pytest.approx(want, rel=1e-10)
    assert _val(matrix_entropy(x, normalized=True)) == pytest.approx(want / math.log(d), rel=1e-10)
    assert _val(matrix_erank(x)) == pytest.approx(math.exp(want), rel=1e-10)


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("q", ORDERS)
def test_vendi_cosine_and_linear_match_score_k(n, d, q):
    x = _blobs(n, d, seed=1)
    xn = x.numpy()
    # q < 1 weighs tiny eigenvalues up: the reference's n − d round-off eigenvalues of the n×n kernel (±1e-17, the
    # positive ones kept) add ~√1e-17 each to Σλ^q, where the d×d route has exact zeros. Hence the looser rel.
    rel = 1e-6 if q < 1 else 1e-9
    assert _val(vendi_score(x, q)) == pytest.approx(ref.vendi_score_k(ref.cosine_kernel(xn), q), rel=rel)
    assert _val(vendi_score(x, q, kernel="linear")) == pytest.approx(ref.vendi_score_k(xn @ xn.T, q), rel=rel)


@pytest.mark.parametrize("q", ORDERS)
def test_vendi_rbf_and_callable_match_score_k(q):
    x = _blobs(30, 6, seed=2)
    xn = x.numpy()
    d2 = ((xn[:, None, :] - xn[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / (2 * 2.5**2))
    assert _val(vendi_score(x, q, kernel="rbf", sigma=2.5)) == pytest.approx(ref.vendi_score_k(k, q), rel=1e-9)
    med = float(np.median(np.sqrt(d2[np.triu_indices(30, 1)])))
    assert _val(median_pairwise_distance(x)) == pytest.approx(med, rel=1e-12)
    k_med = np.exp(-d2 / (2 * med**2))
    assert _val(vendi_score(x, q, kernel="rbf")) == pytest.approx(ref.vendi_score_k(k_med, q), rel=1e-9)
    lap = lambda z: torch.exp(-torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist"))  # noqa: E731
    want = ref.vendi_score_k(np.exp(-np.sqrt(d2)), q)
    assert _val(vendi_score(x, q, kernel=lap)) == pytest.approx(want, rel=1e-8)
    assert _val(vendi_score_from_kernel(torch.from_numpy(k), q)) == pytest.approx(ref.vendi_score_k(k, q), rel=1e-9)


@pytest.mark.parametrize("n, d", SHAPES)
def test_effective_rank_and_rankme_match_svd_reference(n, d):
    x = _blobs(n, d, seed=3)
    assert _val(effective_rank(x)) == pytest.approx(ref.effective_rank(x.numpy()), rel=1e-12)
    assert _val(rankme(x)) == pytest.approx(ref.rankme(x.numpy(), 1e-7), rel=1e-12)
    assert _val(rankme(x, eps=1e-5)) == pytest.approx(ref.rankme(x.numpy(), 1e-5), rel=1e-12)
    assert _val(rankme(x, eps=0.0)) == pytest.approx(_val(effective_rank(x)), rel=1e-13)


@pytest.mark.parametrize("sigma, t", [(10.0, 1), (2.0, 1), (2.0, 2), (5.0, 3)])
def test_dse_matches_dse_dsmi_reference(sigma, t):
    x = _blobs(40, 8, seed=4)
    assert _val(diffusion_spectral_entropy(x, sigma, t)) == pytest.approx(
        ref.diffusion_spectral_entropy(x.numpy(), sigma, t), rel=1e-10, abs=1e-12
    )


@pytest.mark.parametrize("n, d", SHAPES)
def test_matrix_nuclear_norm_matches_reference(n, d):
    x = _blobs(n, d, seed=6)
    assert _val(matrix_nuclear_norm(x)) == pytest.approx(ref.matrix_nuclear_norm(x.numpy()), rel=1e-12)


def test_dsmi_matches_reference_with_the_documented_subsets():
    x = _blobs(30, 5, seed=7)
    y = torch.tensor([0] * 12 + [1] * 10 + [2] * 7 + [3])  # class 3 has one row: contributes 0
    subsets = {}
    for c, n_c in [(0, 12), (1, 10), (2, 7)]:
        gen = torch.Generator().manual_seed(11)  # re-seeded per class, one randperm per repetition (docstring)
        subsets[c] = [torch.randperm(30, generator=gen)[:n_c].numpy() for _ in range(3)]
    want = ref.dsmi_with_subsets(x.numpy(), y.numpy(), subsets, 3.0, 1)
    got = diffusion_spectral_mutual_information(x, y, sigma=3.0, n_repetitions=3, seed=11)
    assert _val(got) == pytest.approx(want, rel=1e-10)


def test_dsmi_of_a_single_class_is_zero_and_labels_carry_information():
    x = _blobs(24, 4, seed=8, spread=6.0)
    assert _val(diffusion_spectral_mutual_information(x, torch.zeros(24, dtype=torch.long), 3.0)) == pytest.approx(
        0.0, abs=1e-12
    )
    # labels = the blob the row came from vs labels unrelated to it
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 4, generator=g, dtype=torch.float64) * 6
    lab = torch.randint(0, 4, (40,), generator=g)
    z = centres[lab] + torch.randn(40, 4, generator=g, dtype=torch.float64)
    informative = _val(diffusion_spectral_mutual_information(z, lab, 3.0))
    shuffled = _val(diffusion_spectral_mutual_information(z, lab[torch.randperm(40, generator=g)], 3.0))
    assert informative > 0.5 and informative > shuffled + 0.5


# ----------------------------------------------------------------------------------------------- closed forms


def test_vendi_readme_values():
    k = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert _val(vendi_score_from_kernel(k)) == pytest.approx(2.1573, abs=5e-5)
    samples = torch.tensor([[0.0], [0.0], [10.0], [10.0], [20.0], [20.0]])
    got = vendi_score(samples, kernel=lambda z: torch.exp(-torch.cdist(z, z)))
    assert _val(got) == pytest.approx(2.99999, abs=5e-5)


def test_matrix_nuclear_norm_hand_case():
    r = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert _val(matrix_nuclear_norm(r)) == pytest.approx(2 * math.sqrt(2) / 4, rel=1e-15)


def test_effective_rank_of_diag_110_is_two():
    assert _val(effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0])))) == pytest.approx(2.0, rel=1e-15)


@pytest.mark.parametrize("n", [3, 6])
def test_identity_rows(n):
    x = torch.eye(n)
    for q in ORDERS:
        assert _val(vendi_score(x, q)) == pytest.approx(n, rel=1e-12)  # K = I
    assert _val(effective_rank(x)) == pytest.approx(n, rel=1e-12)
    p = 1 / n + 1e-7
    assert _val(rankme(x)) == pytest.approx(math.exp(-n * p * math.log(p)), rel=1e-12)
    # centred identity rows span n−1 directions with equal weight
    assert _val(matrix_entropy(x)) == pytest.approx(math.log(n - 1), rel=1e-12)
    # all distances √2: G = (1−a)I + a11ᵀ, K = G / (1 + (n−1)a) has eigenvalues 1 and (1−a)/(1+(n−1)a) (n−1 times)
    a = math.exp(-2 / (2 * 1.5**2))
    lam = np.array([1.0] + [(1 - a) / (1 + (n - 1) * a)] * (n - 1))
    p = lam / lam.sum() + DSE_EPS
    assert _val(diffusion_spectral_entropy(x, 1.5)) == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-12)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_rank_k_equal_weight_rows(k):
    x = torch.eye(8)[:k].repeat(4, 1) * 2.0  # k orthogonal directions, each repeated 4 times, in d = 8
    for q in ORDERS:
        assert _val(vendi_score(x, q)) == pytest.approx(k, rel=1e-12)
    assert _val(effective_rank(x)) == pytest.approx(k, rel=1e-12)
    assert _val(rankme(x, eps=0.0)) == pytest.approx(k, rel=1e-12)
    assert _val(matrix_erank(x)) == pytest.approx(k - 1, rel=1e-12)  # centred: a regular simplex in k−1 dims


def test_repeated_points():
    x = torch.tensor([[1.0, 2.0, 3.0]]).repeat(5, 1)
    assert _val(vendi_score(x)) == pytest.approx(1.0, rel=1e-12)
    assert _val(effective_rank(x)) == pytest.approx(1.0, rel=1e-12)
    assert _val(rankme(x, eps=0.0)) == pytest.approx(1.0, rel=1e-12)
    # K = 11ᵀ/n: one eigenvalue 1, four 0 (up to round-off, which |λ| keeps) → only the ε terms, ~1e-14 bits
    assert 0 < _val(diffusion_spectral_entropy(x)) < 1e-12
    with pytest.raises(EntrotrainError, match="identical"):
        matrix_entropy(x)
    with pytest.raises(EntrotrainError, match="identical"):
        matrix_nuclear_norm(x)


def test_dse_limits():
    x = _blobs(20, 3, seed=9)
    assert _val(diffusion_spectral_entropy(x, sigma=1e-3)) == pytest.approx(math.log2(20), rel=1e-9)
    assert _val(diffusion_spectral_entropy(x, sigma=2.0, t=50)) < 0.5 * _val(diffusion_spectral_entropy(x, 2.0))


def test_dse_subsamples_to_max_n_with_a_seed():
    x = _blobs(30, 3, seed=10)
    a = diffusion_spectral_entropy(x, 2.0, max_n=20, seed=1)
    assert _val(a) == _val(diffusion_spectral_entropy(x, 2.0, max_n=20, seed=1))
    assert _val(a) <= math.log2(20) + 1e-9
    assert _val(a) != pytest.approx(_val(diffusion_spectral_entropy(x, 2.0)), rel=1e-6)


# ------------------------------------------------------------------------------------------------- invariances


SCALE_FREE = {
    "matrix_entropy": matrix_entropy,
    "rankme": lambda x: rankme(x, eps=0.0),
    "effective_rank": effective_rank,
    "vendi_cosine": vendi_score,
    "matrix_nuclear_norm": matrix_nuclear_norm,
}


@pytest.mark.parametrize("name", sorted(SCALE_FREE))
def test_scale_invariance(name):
    fn, x = SCALE_FREE[name], _blobs(20, 10, seed=12)
    assert _val(fn(37.5 * x)) == pytest.approx(_val(fn(x)), rel=1e-11)


ALL = {
    **SCALE_FREE,
    "vendi_rbf": lambda x: vendi_score(x, 2.0, kernel="rbf", sigma=3.0),
    "vendi_inf": lambda x: vendi_score(x, math.inf),
    "dse": lambda x: diffusion_spectral_entropy(x, 3.0),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_row_permutation_invariance(name):
    fn, x = ALL[name], _blobs(20, 10, seed=13)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(1))
    assert _val(fn(x[perm])) == pytest.approx(_val(fn(x)), rel=1e-11)


@pytest.mark.parametrize("name", sorted(set(ALL) - {"matrix_nuclear_norm"}))
def test_feature_rotation_invariance(name):
    fn, x = ALL[name], _blobs(20, 10, seed=14)
    assert _val(fn(x @ _rotation(10))) == pytest.approx(_val(fn(x)), rel=1e-10)


def test_nuclear_norm_surrogate_is_not_rotation_invariant():
    x = _blobs(20, 10, seed=14)
    assert _val(matrix_nuclear_norm(x @ _rotation(10))) != pytest.approx(_val(matrix_nuclear_norm(x)), rel=1e-3)


def test_dse_sigma_is_absolute_not_scale_free():
    x = _blobs(25, 4, seed=15)
    c = 4.0
    scaled = _val(diffusion_spectral_entropy(c * x, 3.0))
    assert scaled == pytest.approx(_val(diffusion_spectral_entropy(x, 3.0 / c)), rel=1e-11)
    assert abs(scaled - _val(diffusion_spectral_entropy(x, 3.0))) > 0.1


def test_centring_matters_for_rankme_not_for_matrix_entropy():
    x = _blobs(20, 10, seed=16)
    shift = torch.full((10,), 5.0, dtype=torch.float64)
    assert _val(matrix_entropy(x + shift)) == pytest.approx(_val(matrix_entropy(x)), rel=1e-11)
    assert abs(_val(rankme(x + shift)) - _val(rankme(x))) > 0.1


# ------------------------------------------------------------------------------------------------- dtypes, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", sorted(ALL))
def test_low_precision_input_is_upcast(dtype, name):
    x = _blobs(16, 6, seed=17).to(dtype)
    assert _val(ALL[name](x)) == pytest.approx(_val(ALL[name](x.double())), rel=1e-12)


BAD = [
    (torch.tensor([[1.0, float("nan")], [0.0, 1.0], [2.0, 1.0]]), "NaN or Inf"),
    (torch.tensor([[1.0, float("inf")], [0.0, 1.0], [2.0, 1.0]]), "NaN or Inf"),
    (torch.ones(1, 4), "at least 2"),
    (torch.ones(4), r"shape \(n, d\)"),
    (torch.ones(3, 4, dtype=torch.long), "floating"),
]


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("x, match", BAD)
def test_bad_input_raises(name, x, match):
    with pytest.raises(EntrotrainError, match=match):
        ALL[name](x)


def test_vendi_specific_errors():
    x = _blobs(6, 3)
    with pytest.raises(EntrotrainError, match="unit diagonal"):
        vendi_score(x, kernel=lambda z: 2 * torch.exp(-torch.cdist(z, z)))
    with pytest.raises(EntrotrainError, match=r"\(6, 6\)"):
        vendi_score(x, kernel=lambda z: torch.ones(5, 5))
    with pytest.raises(EntrotrainError, match="kernel="):
        vendi_score(x, kernel="laplace")
    with pytest.raises(EntrotrainError, match="all-zero row"):
        vendi_score(torch.cat([x, torch.zeros(1, 3, dtype=x.dtype)]))
    with pytest.raises(EntrotrainError, match="'inf'"):
        vendi_score(x, "two")
    assert _val(vendi_score(x, "inf")) == _val(vendi_score(x, math.inf))


def test_dse_and_dsmi_errors():
    x = _blobs(6, 3)
    with pytest.raises(EntrotrainError, match="sigma"):
        diffusion_spectral_entropy(x, sigma=0.0)
    with pytest.raises(EntrotrainError, match="diffusion time"):
        diffusion_spectral_entropy(x, t=0)
    with pytest.raises(EntrotrainError, match="bin it first"):
        diffusion_spectral_mutual_information(x, torch.rand(6))
    with pytest.raises(EntrotrainError, match="one discrete label per row"):
        diffusion_spectral_mutual_information(x, torch.zeros(6, 2, dtype=torch.long))
    with pytest.raises(EntrotrainError, match="n_repetitions"):
        diffusion_spectral_mutual_information(x, torch.zeros(6, dtype=torch.long), n_repetitions=0)


def test_normalized_matrix_entropy_needs_two_features():
    with pytest.raises(EntrotrainError, match="d >= 2"):
        matrix_entropy(torch.tensor([[0.0], [1.0], [3.0]]), normalized=True)


# ------------------------------------------------------------------------------------------------------ registry


def test_registry_calls_the_presets_and_reports_parameters():
    x = _blobs(15, 5, seed=18)
    assert {"matrix_entropy", "rankme", "effective_rank", "vendi", "dse", "nuclear_norm"} <= set(
        REPRESENTATION_MEASURES
    )
    assert _val(get_measure("rankme")(x)) == _val(rankme(x))
    assert _val(get_measure("vendi")(x, q=2.0)) == _val(vendi_score(x, 2.0))
    assert _val(get_measure("dse")(x, sigma=2.0)) == _val(diffusion_spectral_entropy(x, 2.0))
    assert _val(get_measure("matrix_entropy_normalized")(x)) == _val(matrix_entropy(x, normalized=True))
    params = get_measure("dse").params(x, sigma=2.0)
    want = {"measure": "dse", "unit": "bits", "n": 15, "d": 5, "sigma": 2.0, "t": 1, "max_n": 10000, "seed": 0}
    assert params == want
    assert get_measure("rankme").params(x)["eps"] == 1e-7
    for measure in REPRESENTATION_MEASURES.values():
        assert torch.isfinite(measure(x))


def test_registry_errors():
    with pytest.raises(EntrotrainError, match="known"):
        get_measure("entropy_of_everything")
    with pytest.raises(EntrotrainError, match="unknown"):
        get_measure("rankme")(_blobs(5, 2), sigma=1.0)


# ------------------------------------------------------------------------------------- rank-deficient kernels


def _copies(r: int, d: int, counts: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``r`` distinct random rows, row ``i`` repeated ``counts[i]`` times, and the multiplicities."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(r, d, generator=g, dtype=torch.float64)
    m = torch.tensor(counts, dtype=torch.float64)
    return base[torch.repeat_interleave(torch.arange(r), torch.tensor(counts))], m


def _reduced_vendi(k_r: torch.Tensor, m: torch.Tensor, q: float) -> float:
    """Vendi score of a kernel over copies, from the ``r × r`` matrix ``diag(√m) K_r diag(√m) / n`` (the non-zero
    spectrum of ``K / n``, no round-off zeros): ``H_0 = ln r`` for distinct rows in general position."""
    s = m.sqrt()
    lam = np.linalg.eigvalsh((s[:, None] * k_r * s[None, :] / m.sum()).numpy())
    return math.exp(ref.renyi_entropy(lam, q)) if q else float((lam > 0).sum())


@settings(max_examples=30, deadline=None)
@given(
    r=st.integers(1, 4),
    d=st.integers(4, 24),
    counts=st.lists(st.integers(1, 12), min_size=4, max_size=4),
    q=st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0, math.inf]),
    kernel=st.sampled_from(["cosine", "linear", "rbf"]),
    seed=st.integers(0, 2**16),
)
def test_vendi_of_repeated_rows_equals_the_reduced_spectrum_at_every_order(r, d, counts, q, kernel, seed):
    """n copies of r distinct rows: K / n has r non-zero eigenvalues and n − r exact zeros. The zeros come back from
    eigvalsh as ±1e-17 round-off; they must take no part: order 0 is the rank r (it was n − #negative, e.g. 10 for
    10 copies of 2 points) and order 0.1 counted 0.02 per zero (7 % too high there)."""
    counts = counts[:r]
    if sum(counts) < 2:
        counts[0] += 1
    x, m = _copies(r, d, counts, seed)
    base = x[torch.cumsum(torch.tensor([0] + counts[:-1]), 0)]
    if kernel == "cosine":
        u = base / base.norm(dim=1, keepdim=True)
        k_r = u @ u.T
    elif kernel == "linear":
        k_r = base @ base.T
    else:
        k_r = torch.exp(-torch.cdist(base, base) ** 2 / (2 * 2.0**2))
    want = _reduced_vendi(k_r, m, q)
    got = vendi_score(x, q, kernel=kernel, sigma=2.0 if kernel == "rbf" else None)
    assert _val(got) == pytest.approx(want, rel=1e-8)
    if kernel == "rbf":
        k = torch.exp(-torch.cdist(x, x) ** 2 / 8.0)
        assert _val(vendi_score_from_kernel(0.5 * (k + k.T), q)) == pytest.approx(want, rel=1e-8)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(3, 30),
    d=st.integers(1, 6),
    offset=st.sampled_from([1e3, 1e5, 1e6, -1e7]),
    sigma=st.sampled_from([0.3, 1.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_kernel_measures_of_rows_far_from_the_origin_equal_scipy_cdist(n, d, offset, sigma, seed):
    """Distances are taken from the differences (scipy's cdist, dse-dsmi's): rows offset by 1e5 and more gave an
    asymmetric DSE kernel (EntrotrainError 'K is not symmetric') through ‖x_i‖² + ‖x_j‖² − 2 x_i·x_j."""
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + offset
    xn = x.numpy()
    assert _val(diffusion_spectral_entropy(x, sigma)) == pytest.approx(
        ref.diffusion_spectral_entropy(xn, sigma), rel=1e-9, abs=1e-9
    )
    d2 = ((xn[:, None, :] - xn[None, :, :]) ** 2).sum(-1)
    assert _val(vendi_score(x, 1.0, kernel="rbf", sigma=sigma)) == pytest.approx(
        ref.vendi_score_k(np.exp(-d2 / (2 * sigma**2)), 1.0), rel=1e-9
    )
    assert _val(median_pairwise_distance(x)) == pytest.approx(
        float(np.median(np.sqrt(d2[np.triu_indices(n, 1)]))), rel=1e-9
    )


@pytest.mark.parametrize("n, d", [(40, 7), (300, 33)])
def test_copies_of_a_row_are_at_distance_zero_at_any_sigma(n, d):
    """Each of n/2 rows twice, σ far below the spread: the Gaussian kernel is 1 between copies and 0 elsewhere, so
    K = blocks of ½, DSE = log₂(n/2) and the RBF Vendi score n/2. The matmul shortcut put copies 2e-13 apart (not 0)
    and the kernel was asymmetric: EntrotrainError."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n // 2, d, generator=g, dtype=torch.float64) * 10
    x = torch.cat([base, base])[torch.randperm(n, generator=g)]
    assert _val(diffusion_spectral_entropy(x, 1e-7)) == pytest.approx(math.log2(n // 2), rel=1e-12)
    assert _val(vendi_score(x, kernel="rbf", sigma=1e-7)) == pytest.approx(n // 2, rel=1e-12)
    assert _val(median_pairwise_distance(torch.cat([base[:1], base[:1], base[:1]]))) == 0.0


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(1, 270),
    d=st.integers(1, 40),
    offset=st.sampled_from([0.0, 1e3, -1e6]),
    copies=st.booleans(),
    float32=st.booleans(),
    grid=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_pairwise_distances_by_row_blocks_equal_one_cdist_bit_for_bit(n, d, offset, copies, float32, grid, seed):
    """The kernel measures' distances are computed by row blocks, each pair once and the lower triangle mirrored
    (_sq_dists, median_pairwise_distance): bit for bit torch.cdist(x, x) without the matmul shortcut, squared, and
    the median of its upper triangle (the definition: two kthvalues), across block edges (n up to 270, 128 rows a
    block); grid rows (entries 0, 1, 2) tie many distances at the median."""
    from entrotrain.functional import representation as rep

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + offset
    if grid:
        x = torch.randint(0, 3, (n, d), generator=g).double() + offset
    if copies and n > 2:
        x[n // 2 :] = x[: n - n // 2].clone()
    if float32:
        x = x.float().double()
    full = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist").square_()
    assert torch.equal(rep._sq_dists(x), full)
    assert rep._sq_dists(x).view(torch.int64).equal(full.view(torch.int64))  # signs of zeros too
    if n >= 2:
        iu = torch.triu_indices(n, n, 1)
        dist = full[iu[0], iu[1]].sqrt()
        m = dist.numel()
        lower = torch.kthvalue(dist, (m + 1) // 2).values
        want = lower if m % 2 else 0.5 * (lower + torch.kthvalue(dist, m // 2 + 1).values)
        assert median_pairwise_distance(x).item().hex() == want.item().hex()
