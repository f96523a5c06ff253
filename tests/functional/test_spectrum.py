"""The spectral core: spectral_entropy for every Rényi order, the eigenvalue routes, Frobenius order 2, policies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.spectrum import (
    kernel_spectrum,
    linear_kernel_spectrum,
    renyi2,
    renyi2_from_rows,
    spectral_entropy,
)
from tests.helpers.spectral_reference import renyi_entropy

ORDERS = [0.0, 0.5, 1.0, 2.0, 3.0, math.inf]


def _rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- spectral_entropy


@pytest.mark.parametrize("q", ORDERS)
def test_spectral_entropy_matches_renyi_reference(q):
    lam = torch.rand(40, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    lam[:5] = 0.0  # exact zeros take no part (0 log 0 = 0)
    p = (lam / lam.sum()).numpy()
    assert float(spectral_entropy(lam, q)) == pytest.approx(renyi_entropy(p, q), rel=1e-12, abs=1e-12)
    assert float(spectral_entropy(lam, q, base=2)) == pytest.approx(renyi_entropy(p, q) / math.log(2), rel=1e-12)


@pytest.mark.parametrize("q", ORDERS)
def test_uniform_spectrum_gives_log_m_and_one_hot_gives_zero(q):
    assert float(spectral_entropy(torch.full((7,), 0.3), q)) == pytest.approx(math.log(7), rel=1e-12)
    one_hot = torch.tensor([0.0, 2.5, 0.0, 0.0])
    assert float(spectral_entropy(one_hot, q)) == pytest.approx(0.0, abs=1e-15)


def test_eps_is_added_after_normalisation():
    lam = torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64)
    p = np.array([0.75, 0.25, 0.0]) + 1e-3
    assert float(spectral_entropy(lam, 1.0, eps=1e-3)) == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-13)


def test_unnormalised_spectrum_is_used_as_is():
    lam = torch.tensor([0.5, 0.3, 0.3], dtype=torch.float64)  # sums to 1.1: vendi-score's convention keeps it
    want = float(-(lam * lam.log()).sum())
    assert float(spectral_entropy(lam, normalize=False)) == pytest.approx(want, rel=1e-14)
    assert float(spectral_entropy(lam)) != pytest.approx(want, rel=1e-3)


def test_batched_and_low_precision_spectra():
    lam = torch.rand(3, 10, generator=torch.Generator().manual_seed(2))
    out = spectral_entropy(lam.to(torch.bfloat16), 2.0)
    assert out.shape == (3,) and out.dtype == torch.float64
    for i in range(3):
        p = lam.to(torch.bfloat16).double()[i]
        p = (p / p.sum()).numpy()
        assert float(out[i]) == pytest.approx(renyi_entropy(p, 2.0), rel=1e-12)


@pytest.mark.parametrize(
    "lam, kwargs, match",
    [
        (torch.tensor([1.0, -0.1]), {}, "negative"),
        (torch.tensor([1.0, float("nan")]), {}, "NaN"),
        (torch.tensor([0.0, 0.0]), {}, "sums to 0"),
        (torch.tensor([1.0, 1.0]), {"q": -1.0}, "q must be >= 0"),
        (torch.tensor([1.0, 1.0]), {"base": 1.0}, "base"),
        (torch.tensor([1.0, 1.0]), {"eps": -1.0}, "eps"),
    ],
)
def test_spectral_entropy_rejects_bad_input(lam, kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        spectral_entropy(lam, **kwargs)


# ------------------------------------------------------------------------------------------------------- routes


@pytest.mark.parametrize("n, d", [(12, 30), (30, 12), (16, 16)])
@pytest.mark.parametrize("route", ["auto", "gram", "covariance"])
def test_linear_kernel_routes_equal_full_eigendecomposition(n, d, route):
    x = _rows(n, d, seed=n + d)
    full = np.sort(np.linalg.eigvalsh(x.numpy() @ x.numpy().T / n))[::-1][: min(n, d)]  # the n×n Gram, numpy
    got = linear_kernel_spectrum(x, scale=1.0 / n, route=route)
    assert got.dtype == torch.float64 and got.shape == (min(n, d),)
    np.testing.assert_allclose(got.numpy(), np.clip(full, 0, None), rtol=1e-10, atol=1e-12)


def test_kernel_spectrum_matches_numpy_and_is_descending():
    x = _rows(20, 5)
    k = torch.exp(-torch.cdist(x, x) ** 2 / 8)
    got = kernel_spectrum(k.float())  # float32 input is upcast
    want = np.sort(np.linalg.eigvalsh(k.float().double().numpy()))[::-1]
    np.testing.assert_allclose(got.numpy(), np.clip(want, 0, None), rtol=1e-10, atol=1e-12)
    assert bool((got[:-1] >= got[1:]).all())


def test_negative_eigenvalue_policies():
    q, _ = torch.linalg.qr(_rows(4, 4))
    k = q @ torch.diag(torch.tensor([2.0, 1.0, 0.5, -0.25], dtype=torch.float64)) @ q.T
    np.testing.assert_allclose(kernel_spectrum(k).numpy(), [2.0, 1.0, 0.5, 0.0], atol=1e-12)
    np.testing.assert_allclose(kernel_spectrum(k, negative="abs").numpy(), [2.0, 1.0, 0.5, 0.25], atol=1e-12)
    with pytest.raises(EntrotrainError, match="not positive semi-definite"):
        kernel_spectrum(k, negative="raise")
    with pytest.raises(EntrotrainError, match="negative"):
        kernel_spectrum(k, negative="drop")


def test_negative_raise_tolerates_round_off():
    x = _rows(30, 3)  # rank-3 Gram of 30 rows: 27 eigenvalues are round-off around 0
    assert kernel_spectrum(x @ x.T, negative="raise").shape == (30,)


def test_kernel_spectrum_rejects_asymmetric_nonsquare_nonfinite():
    with pytest.raises(EntrotrainError, match="not symmetric"):
        kernel_spectrum(torch.tensor([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(EntrotrainError, match="square"):
        kernel_spectrum(torch.ones(2, 3))
    with pytest.raises(EntrotrainError, match="NaN or Inf"):
        kernel_spectrum(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]))


def test_linear_kernel_spectrum_rejects_bad_rows():
    with pytest.raises(EntrotrainError, match=r"shape \(n, d\)"):
        linear_kernel_spectrum(torch.ones(3))
    with pytest.raises(EntrotrainError, match="route"):
        linear_kernel_spectrum(torch.ones(3, 2), route="svd")
    with pytest.raises(EntrotrainError, match="floating"):
        linear_kernel_spectrum(torch.ones(3, 2, dtype=torch.long))


# ------------------------------------------------------------------------------------------------------ Rényi-2


def test_renyi2_frobenius_equals_eigen_route():
    x = _rows(25, 8)
    k = torch.exp(-torch.cdist(x, x) ** 2 / 10)
    lam = np.clip(np.linalg.eigvalsh(k.numpy()), 0, None)
    assert float(renyi2(k)) == pytest.approx(renyi_entropy(lam / lam.sum(), 2.0), rel=1e-12)
    assert float(renyi2(k / 25, normalize=False)) == pytest.approx(renyi_entropy(lam / 25, 2.0), rel=1e-12)
    assert float(renyi2(k, base=2)) == pytest.approx(renyi_entropy(lam / lam.sum(), 2.0) / math.log(2), rel=1e-12)


@pytest.mark.parametrize("n, d", [(10, 40), (40, 10)])
def test_renyi2_from_rows_equals_eigen_route(n, d):
    x = _rows(n, d, seed=3)
    lam = np.clip(np.linalg.eigvalsh(x.numpy() @ x.numpy().T), 0, None)
    assert float(renyi2_from_rows(x)) == pytest.approx(renyi_entropy(lam / lam.sum(), 2.0), rel=1e-12)
    assert float(renyi2_from_rows(x, scale=1.0 / n)) == pytest.approx(renyi_entropy(lam / n, 2.0), rel=1e-12)
    assert float(renyi2_from_rows(x.to(torch.float16))) == pytest.approx(
        float(renyi2_from_rows(x.to(torch.float16).double())), rel=1e-14
    )


def test_renyi2_rejects_zero_matrix():
    with pytest.raises(EntrotrainError, match="all zeros"):
        renyi2_from_rows(torch.zeros(3, 2))
    with pytest.raises(EntrotrainError, match="trace"):
        renyi2(torch.zeros(3, 3))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 40), d=st.integers(1, 40), r=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_spectra_of_rank_deficient_matrices_have_exact_zeros_past_the_rank(n, d, r, seed):
    """Rows of rank r: linear_kernel_spectrum (both routes) and kernel_spectrum of X Xᵀ return exactly
    min(n, d) − r (n − r) zeros under negative='clamp' / 'raise', not ±1e-17 round-off that every order q < 1 would
    count (order 0, the rank, was min(n, d) − #negative); the non-zero eigenvalues are numpy's."""
    r = min(r, n, d)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, r, generator=g, dtype=torch.float64) @ torch.randn(r, d, generator=g, dtype=torch.float64)
    want = np.sort(np.linalg.eigvalsh(x.numpy() @ x.numpy().T))[::-1][:r]
    for route in ("gram", "covariance", "auto"):
        for negative in ("clamp", "raise"):
            lam = linear_kernel_spectrum(x, route=route, negative=negative)
            assert int((lam > 0).sum()) == r and lam.shape == (min(n, d),)
            np.testing.assert_allclose(lam[:r].numpy(), want, rtol=1e-9)
            assert float(spectral_entropy(lam, 0.0)) == pytest.approx(math.log(r), abs=1e-12)
    lam = kernel_spectrum(x @ x.T)
    assert int((lam > 0).sum()) == r and int((lam == 0).sum()) == n - r
    if r < n:  # 'abs' (DSE, as dse-dsmi) keeps |round-off|
        assert float(kernel_spectrum(x @ x.T, negative="abs")[r:].max()) < 1e-12 * want[0]
