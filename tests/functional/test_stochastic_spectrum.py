"""Stochastic Lanczos quadrature: exactness where it must be exact, honest error bars, seeding, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.functional.representation import diffusion_spectral_entropy, vendi_score
from entrotrain.functional.stochastic_spectrum import (
    SpectralEstimate,
    lanczos_quadrature,
    slq_diffusion_spectral_entropy,
    slq_spectral_entropy,
    slq_vendi_score,
)
from tests.helpers import spectral_reference as ref
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture: hundreds of tiny GEMMs)


def _blobs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(8, d, generator=g, dtype=torch.float64) * 2
    return centres[torch.randint(0, 8, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=torch.float64)


def _diag_spectrum(n: int) -> torch.Tensor:
    lam = torch.rand(n, generator=torch.Generator().manual_seed(3), dtype=torch.float64) ** 3
    return lam / lam.sum()


@pytest.mark.parametrize("q", [1.0, 0.5, 2.0, 3.0])
def test_diagonal_operator_with_full_lanczos_is_exact(q):
    # Rademacher Hutchinson is exact for a diagonal f(A) (vᵀDv = tr D), and n Lanczos steps integrate exactly.
    lam = _diag_spectrum(24)
    est = slq_spectral_entropy(torch.diag(lam), 24, q=q, n_probes=4, n_steps=24)
    want = ref.renyi_entropy(lam.numpy(), q)
    assert isinstance(est, SpectralEstimate) and (est.n_probes, est.n_steps) == (4, 24)
    assert float(est.value) == pytest.approx(want, rel=1e-9)
    assert float(est.stderr) < 1e-9


def test_unnormalised_spectrum_with_known_trace_is_exact_on_a_diagonal():
    lam = _diag_spectrum(16) * 1.3  # vendi-score's convention: λ used as is, here summing to 1.3
    est = slq_spectral_entropy(torch.diag(lam), 16, trace=1.3, normalize=False, n_probes=2, n_steps=16)
    assert float(est.value) == pytest.approx(float(-(lam * lam.log()).sum()), rel=1e-9)
    with pytest.raises(EntrotrainError, match="exact trace"):
        slq_spectral_entropy(torch.diag(lam), 16, trace=None, normalize=False)


def test_scaling_the_operator_with_its_exact_trace_changes_nothing():
    # the control variate makes the estimate invariant to the operator's scale (K vs K / tr K)
    x = _blobs(120, 6, seed=2)
    k = torch.exp(-torch.cdist(x, x) ** 2 / 8)
    tr = float(k.diagonal().sum())
    for q in (1.0, 2.0):
        a = slq_spectral_entropy(k, 120, q=q, trace=tr, seed=3)
        b = slq_spectral_entropy(k / tr, 120, q=q, trace=1.0, seed=3)
        assert float(a.value) == pytest.approx(float(b.value), rel=1e-10)
        assert float(a.stderr) == pytest.approx(float(b.stderr), rel=1e-8)


def test_unknown_trace_is_estimated_from_the_same_probes():
    lam = _diag_spectrum(20) * 7.0  # trace 7, not 1
    want = ref.renyi_entropy((lam / lam.sum()).numpy(), 1.0)
    est = slq_spectral_entropy(torch.diag(lam), 20, trace=None, n_probes=3, n_steps=20)
    assert float(est.value) == pytest.approx(want, rel=1e-9)
    assert float(slq_spectral_entropy(torch.diag(lam), 20, trace=7.0, n_steps=20).value) == pytest.approx(want, 1e-9)


def test_quadrature_weights_sum_to_one_and_nodes_lie_in_the_spectrum():
    x = _blobs(60, 5)
    k = torch.exp(-torch.cdist(x, x) ** 2 / 8) / 60
    nodes, weights = lanczos_quadrature(k, 60, n_probes=5, n_steps=12, seed=1)
    assert nodes.shape == weights.shape == (5, 12)
    np.testing.assert_allclose(weights.sum(-1).numpy(), 1.0, rtol=1e-12)
    lam = np.linalg.eigvalsh(k.numpy())
    assert float(nodes.min()) >= lam.min() - 1e-12 and float(nodes.max()) <= lam.max() + 1e-12


def test_matvec_callable_equals_matrix_and_seed_reproduces():
    x = _blobs(80, 6)
    k = torch.exp(-torch.cdist(x, x) ** 2 / 10) / 80
    a = slq_spectral_entropy(k, 80, seed=4)
    b = slq_spectral_entropy(lambda v: k @ v, 80, seed=4)
    assert float(a.value) == pytest.approx(float(b.value), rel=1e-12)
    assert float(a.stderr) == pytest.approx(float(b.stderr), rel=1e-9)
    assert float(slq_spectral_entropy(k, 80, seed=5).value) != float(a.value)


def test_slq_estimates_agree_with_exact_presets():
    x = _blobs(150, 6)
    exact = float(diffusion_spectral_entropy(x, 2.0))
    est = slq_diffusion_spectral_entropy(x, 2.0, n_probes=32)
    assert abs(float(est.value) - exact) < max(4 * float(est.stderr), 1e-3)
    exact2 = float(diffusion_spectral_entropy(x, 2.0, t=2))
    est2 = slq_diffusion_spectral_entropy(x, 2.0, t=2, n_probes=32)
    assert abs(float(est2.value) - exact2) < 4 * float(est2.stderr)
    for kernel, kw in [("cosine", {}), ("rbf", {"sigma": 3.0}), ("linear", {})]:
        for q in (1.0, 2.0):
            want = float(vendi_score(x / x.norm(dim=1).max(), q, kernel=kernel, **kw))
            got = slq_vendi_score(x / x.norm(dim=1).max(), q, kernel=kernel, n_probes=32, **kw)
            assert abs(float(got.value) - want) < 4 * float(got.stderr) + 1e-9 * want, (kernel, q)


@pytest.mark.parametrize("case", ["dse", "vendi_rbf"])
def test_error_bar_covers_the_exact_value_in_90_percent_of_seeds(case):
    # 100 seeded runs: ±2 SE must cover the exact value in >= 90 % of them, and the spread of the errors must match
    # the reported SE (an error bar that is too wide would cover everything and fail the second check).
    x = _blobs(150, 12, seed=7)
    if case == "dse":
        exact = float(diffusion_spectral_entropy(x, 2.0))
        run = lambda s: slq_diffusion_spectral_entropy(x, 2.0, n_probes=32, n_steps=30, seed=s)  # noqa: E731
    else:
        exact = float(vendi_score(x, kernel="rbf", sigma=3.0))
        run = lambda s: slq_vendi_score(x, kernel="rbf", sigma=3.0, n_probes=32, n_steps=30, seed=s)  # noqa: E731
    errors, ses = [], []
    for seed in range(100):
        est = run(seed)
        errors.append(float(est.value) - exact)
        ses.append(float(est.stderr))
    covered = sum(abs(e) <= 2 * s for e, s in zip(errors, ses))
    assert covered >= 90, f"±2 SE covered the exact value in {covered}/100 seeds"
    calibration = float(np.std(errors, ddof=1) / np.mean(ses))
    assert 0.7 < calibration < 1.35, f"error spread / mean SE = {calibration:.2f}"


def test_slq_errors():
    k = torch.eye(5) / 5
    with pytest.raises(EntrotrainError, match="q=inf"):
        slq_spectral_entropy(k, 5, q=math.inf)
    with pytest.raises(EntrotrainError, match="q=0"):
        slq_spectral_entropy(k, 5, q=0.0)
    with pytest.raises(EntrotrainError, match=r"\(5, 5\)"):
        slq_spectral_entropy(torch.eye(4), 5)
    with pytest.raises(EntrotrainError, match="same shape"):
        slq_spectral_entropy(lambda v: v[:2], 5)
    with pytest.raises(EntrotrainError, match="callable"):
        slq_spectral_entropy([[1.0]], 1)
    with pytest.raises(EntrotrainError, match="n_probes"):
        slq_spectral_entropy(k, 5, n_probes=0)
    with pytest.raises(EntrotrainError, match="NaN or Inf"):
        slq_spectral_entropy(torch.full((5, 5), float("nan")), 5)
    with pytest.raises(EntrotrainError, match="kernel"):
        slq_vendi_score(torch.randn(5, 2), kernel="laplace")
    with pytest.raises(EntrotrainError, match="NaN or Inf"):
        slq_diffusion_spectral_entropy(torch.tensor([[0.0, float("nan")], [1.0, 1.0]]))
