"""k-NN information-plane estimators: KSG and Ross against looped float64 references and scikit-learn, correlated
Gaussians within the documented bias, PCA compression, the dispatcher's ksg / pca_ksg routes, degenerate input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.feature_selection import mutual_info_classif, mutual_info_regression

from entrotrain.errors import EntrotrainError
from entrotrain.functional.information import (
    information_plane_point,
    ksg_mutual_information,
    pca_compress,
    ross_mutual_information,
)
from tests.helpers.contracts import DTYPES, NAN, call
from tests.helpers.information_reference import ksg_loop, ross_loop


def _gaussian_pair(n, rho, seed, dim=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, dim, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("dx,dy,k", [(1, 1, 3), (2, 3, 1), (4, 2, 5)])
def test_ksg_matches_looped_reference(dx, dy, k):
    rng = np.random.default_rng(dx * 10 + dy)
    x = rng.standard_normal((150, dx))
    y = np.tanh(x[:, :1] + 0.5 * rng.standard_normal((150, dy)))
    got = ksg_mutual_information(torch.from_numpy(x), torch.from_numpy(y), k, jitter=0.0, chunk_size=16)
    assert got.item() == pytest.approx(ksg_loop(x, y, k), abs=1e-10)
    bits = ksg_mutual_information(torch.from_numpy(x), torch.from_numpy(y), k, jitter=0.0, base=2)
    assert bits.item() == pytest.approx(ksg_loop(x, y, k) / math.log(2), abs=1e-10)


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_ksg_matches_scikit_learn(rho):
    # sklearn: KSG alg. 1 on unit-variance columns, 1e-10 relative noise, clipped at 0 (MI here ≫ 0). Inputs are
    # pre-scaled to unit variance, so the only difference is the noise: tolerance 1e-6 nats.
    x, y = _gaussian_pair(400, rho, seed=5)
    x, y = x / x.std(unbiased=False), y / y.std(unbiased=False)
    ref = mutual_info_regression(x.numpy(), y[:, 0].numpy(), n_neighbors=3, random_state=0)[0]
    assert ksg_mutual_information(x, y).item() == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("rho,tol", [(0.0, 0.07), (0.5, 0.08), (0.9, 0.08), (0.99, 0.09)])
def test_ksg_correlated_gaussians_within_documented_bias(rho, tol):
    # documented (N = 2000, k = 3, seeds 0-23): mean error +0.002 / +0.002 / +0.007 / +0.020 nats, sd ≤ 0.027 per
    # draw; one draw, about 3 sd allowed.
    true = -0.5 * math.log(1 - rho**2)
    x, y = _gaussian_pair(2000, rho, seed=21)
    assert ksg_mutual_information(x, y).item() == pytest.approx(true, abs=tol)


def test_ross_matches_looped_reference_and_scikit_learn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 300)
    c = labels[:, None] * 0.8 + rng.standard_normal((300, 1))
    labels[:1] = 7  # a singleton class: dropped by both
    got = ross_mutual_information(torch.from_numpy(c), torch.from_numpy(labels), 3, jitter=0.0, chunk_size=13)
    assert got.item() == pytest.approx(ross_loop(c, labels, 3), abs=1e-10)
    ref = mutual_info_classif(c, labels, discrete_features=False, n_neighbors=3, random_state=0)[0]
    assert ross_mutual_information(torch.from_numpy(c), torch.from_numpy(labels)).item() == pytest.approx(ref, abs=1e-6)
    c2 = rng.standard_normal((120, 3))
    l2 = (c2[:, 0] > 0).astype(int) + (rng.random(120) < 0.05)
    got2 = ross_mutual_information(torch.from_numpy(c2), torch.from_numpy(l2), 5, jitter=0.0)
    assert got2.item() == pytest.approx(ross_loop(c2, l2, 5), abs=1e-10)


def test_pca_compress():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(300, 2, generator=g, dtype=torch.float64)
    t = torch.cat([z, z @ torch.tensor([[1.0, 2.0, 0.0], [0.5, 0.0, 1.0]], dtype=torch.float64)], 1)  # rank 2
    out = pca_compress(t, 4)
    assert out.shape == (300, 2)  # rank-deficient components dropped
    torch.testing.assert_close(out.T @ out / 299, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-10)
    raw = pca_compress(t, 1, whiten=False)
    centred = t - t.mean(0)
    assert raw.var().item() == pytest.approx(torch.linalg.svdvals(centred)[0].item() ** 2 / 299, rel=1e-10)
    assert pca_compress(torch.ones(10, 3), 4).shape == (10, 0)


@pytest.mark.parametrize("rho", [0.5, 0.9])
def test_pca_ksg_recovers_gaussian_mi_in_a_rotated_embedding(rho):
    # two correlated pairs rotated into 6 dims: PCA to 2 loses nothing; I = −ln(1 − ρ²). Documented (N = 2000):
    # +0.005 / +0.009 nats mean error, sd 0.025.
    true = -math.log(1 - rho**2)
    x, y = _gaussian_pair(2000, rho, seed=4, dim=2)
    q = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    pad = torch.zeros(2000, 4, dtype=torch.float64)
    x6, y6 = torch.cat([x, pad], 1) @ q, torch.cat([y, pad], 1) @ q.T
    labels = torch.zeros(2000, dtype=torch.long)
    i_xt, i_ty = information_plane_point(y6, labels, "pca_ksg", x=x6, dim=2)
    assert i_xt.item() == pytest.approx(true, abs=0.08) and i_ty.item() == 0.0
    # a given map instead of PCA
    first = information_plane_point(y, labels, "pca_ksg", x=x, compress=lambda r: r[:, :1], compress_x=lambda r: r[:, :1])
    assert first[0].item() == ksg_mutual_information(x[:, :1], y[:, :1]).item()


def test_dispatcher_ksg_route_and_noise():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, 4, generator=g)
    t = torch.tanh(x @ torch.randn(4, 3, generator=g))
    y = (x[:, 0] > 0).long()
    i_xt, i_ty = information_plane_point(t, y, "ksg", x=x)
    assert i_xt.item() == ksg_mutual_information(x, t).item()
    assert i_ty.item() == ross_mutual_information(t, y).item()
    noisy = information_plane_point(t, y, "ksg", x=x, noise_std=0.3)
    assert noisy[0].item() < i_xt.item()  # noise destroys information
    again = information_plane_point(t, y, "ksg", x=x, noise_std=0.3)
    assert noisy[0].item() == again[0].item()  # seeded
    with pytest.raises(EntrotrainError, match="needs x"):
        information_plane_point(t, y, "ksg")
    with pytest.raises(EntrotrainError, match="compress must"):
        information_plane_point(t, y, "pca_ksg", x=x, compress=lambda r: r[:5])


def test_ties_and_degenerate_inputs():
    y = torch.tensor([0, 1] * 10)
    binary = torch.tensor([[0.0], [1.0]] * 10)  # every distance 0 or 1: ε = 0 without jitter
    assert torch.isfinite(ksg_mutual_information(binary, binary + 0.0))
    assert torch.isfinite(ksg_mutual_information(binary, binary, jitter=0.0))
    assert torch.isfinite(ross_mutual_information(binary, y, jitter=0.0))
    assert ksg_mutual_information(torch.ones(20, 2), torch.randn(20, 1)).item() == 0.0  # constant
    assert ksg_mutual_information(torch.randn(20, 0), torch.randn(20, 1)).item() == 0.0  # no features
    assert ross_mutual_information(torch.randn(20, 2), torch.zeros(20, dtype=torch.long)).item() == 0.0  # one class
    assert ross_mutual_information(torch.randn(3, 2), torch.tensor([0, 1, 2])).item() == 0.0  # all singletons
    assert ross_mutual_information(torch.ones(20, 2), y).item() == 0.0
    for name in ("ksg", "pca_ksg"):
        assert [v.item() for v in information_plane_point(torch.randn(1, 3), y[:1], name, x=torch.randn(1, 2))] == [0, 0]
        assert [v.item() for v in information_plane_point(torch.ones(20, 3), y, name, x=torch.randn(20, 2))] == [0, 0]
    with pytest.raises(EntrotrainError, match="at least k"):
        ksg_mutual_information(torch.randn(3, 1), torch.randn(3, 1), k=3)
    with pytest.raises(EntrotrainError, match="at least k"):
        information_plane_point(torch.randn(3, 2), y[:3], "ksg", x=torch.randn(3, 2))
    with pytest.raises(EntrotrainError, match="same number of rows"):
        ksg_mutual_information(torch.randn(5, 1), torch.randn(4, 1))
    with pytest.raises(EntrotrainError, match="finite_row_mask"):
        ksg_mutual_information(torch.tensor([[0.0], [NAN], [1.0], [2.0], [3.0]]), torch.randn(5, 1))
    with pytest.raises(EntrotrainError, match="k must be"):
        ksg_mutual_information(torch.randn(5, 1), torch.randn(5, 1), k=0)


def test_chunking_does_not_change_the_value():
    x, y = _gaussian_pair(101, 0.7, seed=8, dim=2)
    whole = ksg_mutual_information(x, y)
    for chunk in (1, 10, 101):
        assert ksg_mutual_information(x, y, chunk_size=chunk).item() == pytest.approx(whole.item(), abs=1e-12)


@settings(max_examples=25)
@given(
    n=st.integers(0, 12),
    d=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES),
    k=st.integers(1, 4),
    estimator=st.sampled_from(["ksg", "pca_ksg"]),
    nan_at=st.one_of(st.none(), st.integers(0, 40)),
    seed=st.integers(0, 2**16),
)
def test_property_finite_or_error(n, d, dtype, k, estimator, nan_at, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(n, d, generator=gen).to(dtype)
    x = torch.randn(n, 2, generator=gen).to(dtype)
    labels = torch.randint(0, 3, (n,), generator=gen)
    if nan_at is not None and t.numel():
        t.view(-1)[nan_at % t.numel()] = NAN
    kind, out = call(information_plane_point, t, labels, estimator, x=x, k=k)
    if nan_at is not None and t.numel():
        assert kind == "error" and "finite_row_mask" in str(out)
        return
    if 1 < n < k + 1:
        assert kind == "error" and "at least k" in str(out)
        return
    assert kind == "ok"
    assert all(torch.isfinite(v) and v.dtype == torch.float64 for v in out)


@pytest.mark.parametrize("estimator", ["ksg", "pca_ksg", "adaptive_binning"])
def test_scale_free_estimators_do_not_change_under_rescaling(estimator):
    # the tie-breaking jitter is relative to each column's mean |x|, PCA whitens and EBAB uses quantiles: rescaling
    # the data by 1e±300 changes nothing (KDE and fixed-grid binning are deliberately absolute).
    g = torch.Generator().manual_seed(9)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    t, y = torch.tanh(x), x[:, 0] > 0  # bool labels are class ids too
    ref = information_plane_point(t, y, estimator, x=x)
    for s in (1e-300, 1e300):
        got = information_plane_point(t * s, y, estimator, x=x * s)
        for a, b in zip(got, ref):
            assert a.item() == pytest.approx(b.item(), abs=1e-12)


def test_extreme_magnitudes_stay_finite():
    g = torch.Generator().manual_seed(10)
    t = torch.randn(30, 2, generator=g, dtype=torch.float64) * 1e307
    y = torch.arange(30) % 2
    for name in ("binning", "adaptive_binning", "kde", "ksg", "pca_ksg"):
        assert all(torch.isfinite(v) for v in information_plane_point(t, y, name, x=t))
