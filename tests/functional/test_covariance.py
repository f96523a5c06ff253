"""CovarianceAccumulator: exact streaming statistics, merge / all-reduce, and the streamable measures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.functional.covariance import CovarianceAccumulator
from entrotrain.functional.representation import effective_rank, matrix_entropy, rankme, vendi_score
from tests.helpers import spectral_reference as ref


def _rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.5


def _stream(x: torch.Tensor, sizes, **kw) -> CovarianceAccumulator:
    acc = CovarianceAccumulator(x.shape[1], **kw)
    for chunk in torch.split(x, sizes):
        acc.update(chunk)
    return acc


def test_streamed_statistics_equal_numpy_on_all_rows():
    x = _rows(50, 6)
    acc = _stream(x, [7, 20, 1, 22])
    xn = x.numpy()
    assert float(acc.count) == 50
    np.testing.assert_allclose(acc.mean().numpy(), xn.mean(0), rtol=1e-12)
    np.testing.assert_allclose(acc.second_moment().numpy(), xn.T @ xn / 50, rtol=1e-12)
    np.testing.assert_allclose(acc.covariance().numpy(), np.cov(xn.T, bias=True), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(acc.covariance(centered=False).numpy(), xn.T @ xn / 50, rtol=1e-12)
    want = np.clip(np.sort(np.linalg.eigvalsh(np.cov(xn.T, bias=True)))[::-1], 0, None)
    np.testing.assert_allclose(acc.spectrum().numpy(), want, rtol=1e-10, atol=1e-12)


def test_leading_dims_are_flattened_and_low_precision_upcast():
    x = _rows(24, 4).to(torch.bfloat16)
    a = CovarianceAccumulator(4).update(x.reshape(2, 3, 4, 4))
    b = CovarianceAccumulator(4).update(x.double())
    assert float(a.count) == 24
    torch.testing.assert_close(a.sum_outer, b.sum_outer, rtol=1e-14, atol=0)


def test_merge_and_summed_state_equal_one_accumulator():
    x = _rows(40, 5, seed=1)
    whole = _stream(x, [40])
    a, b = _stream(x[:13], [13]), _stream(x[13:], [10, 17])
    merged = CovarianceAccumulator(5).merge(a).merge(b)
    torch.testing.assert_close(merged.covariance(), whole.covariance(), rtol=1e-12, atol=1e-13)
    # what a DDP callback does: all-reduce(SUM) each state tensor, then load it
    summed = [sa + sb for sa, sb in zip(a.state(), b.state())]
    rank0 = _stream(x[:13], [13])
    rank0.load_state(summed)
    torch.testing.assert_close(rank0.second_moment(), whole.second_moment(), rtol=1e-12, atol=1e-13)
    assert float(rank0.count) == 40
    # state() returns the live tensors: an in-place all-reduce updates the accumulator
    live = _stream(x[:13], [13])
    for t, other in zip(live.state(), b.state()):
        t.add_(other)
    torch.testing.assert_close(live.covariance(), whole.covariance(), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0, math.inf])
def test_streamed_vendi_equals_the_preset_on_all_rows(q):
    x = _rows(30, 6, seed=2)
    lin = _stream(x, [11, 19])
    assert float(lin.vendi_score(q)) == pytest.approx(float(vendi_score(x, q, kernel="linear")), rel=1e-9)
    cos = _stream(x, [5, 25], normalize_rows=True)
    assert float(cos.vendi_score(q)) == pytest.approx(float(vendi_score(x, q)), rel=1e-9)
    assert float(cos.vendi_score(q)) == pytest.approx(ref.vendi_score_k(ref.cosine_kernel(x.numpy()), q), rel=1e-6)


@pytest.mark.parametrize("q", [1.0, 2.0])
def test_covariance_entropy_matches_numpy(q):
    x = _rows(30, 6, seed=3)
    lam = np.clip(np.linalg.eigvalsh(np.cov(x.numpy().T, bias=True)), 0, None)
    acc = _stream(x, [3, 27])
    assert float(acc.entropy(q)) == pytest.approx(ref.renyi_entropy(lam / lam.sum(), q), rel=1e-10)
    assert float(acc.erank(q)) == pytest.approx(math.exp(ref.renyi_entropy(lam / lam.sum(), q)), rel=1e-10)
    assert float(acc.entropy(q, base=2)) == pytest.approx(ref.renyi_entropy(lam / lam.sum(), q) / math.log(2), 1e-10)


def test_streamed_effective_rank_and_rankme_equal_the_svd_presets():
    x = _rows(40, 8, seed=4)
    acc = _stream(x, [16, 24])
    assert float(acc.effective_rank()) == pytest.approx(float(effective_rank(x)), rel=1e-9)
    assert float(acc.rankme()) == pytest.approx(float(rankme(x)), rel=1e-9)
    assert float(acc.rankme(eps=1e-5)) == pytest.approx(ref.rankme(x.numpy(), 1e-5), rel=1e-9)


@pytest.mark.parametrize("n, d", [(12, 40), (3, 64), (40, 40)])
def test_streamed_rankme_and_vendi_with_fewer_rows_than_features_equal_the_presets(n, d):
    """X (n, d) has min(n, d) singular values; the d - n other eigenvalues of the d x d Σxxᵀ are zeros that RankMe's
    + eps must not count (they raised these RankMes by 5e-5 and 1e-4 relative; 64 x 2048 N(0, 1) rows: 63.94 for
    63.74)."""
    x = _rows(n, d, seed=6)
    acc = _stream(x, [n // 2, n - n // 2])
    assert acc.singular_values().shape == (min(n, d),)
    assert float(acc.rankme()) == pytest.approx(float(rankme(x)), rel=1e-9)
    assert float(acc.rankme(eps=1e-5)) == pytest.approx(ref.rankme(x.numpy(), 1e-5), rel=1e-9)
    assert float(acc.effective_rank()) == pytest.approx(float(effective_rank(x)), rel=1e-9)
    unit = _stream(x, [n // 2, n - n // 2], normalize_rows=True)
    for q in (0.0, 0.5, 1.0, 2.0):  # q = 0 is the rank: it counted the d - n round-off eigenvalues (24 for 12)
        assert float(unit.vendi_score(q)) == pytest.approx(float(vendi_score(x, q)), rel=1e-6)


def test_covariance_spectrum_of_fewer_rows_than_features_has_exact_zeros_past_the_rank():
    """5 centred rows span at most 4 directions (5 uncentred): the other eigenvalues are 0, not round-off that the
    order-0 entropy (the rank) would count."""
    x = _rows(5, 30, seed=7)
    acc = _stream(x, [2, 3])
    assert acc.spectrum()[4:].eq(0).all() and acc.spectrum()[:4].gt(0).all()
    assert acc.spectrum(centered=False)[5:].eq(0).all() and acc.spectrum(centered=False)[:5].gt(0).all()
    assert float(acc.erank(0.0)) == pytest.approx(4.0) and float(acc.erank(0.0, centered=False)) == pytest.approx(5.0)
    lam = np.linalg.eigvalsh(np.cov(x.numpy().T, bias=True))[::-1][:4]
    assert float(acc.entropy(2.0)) == pytest.approx(ref.renyi_entropy(lam / lam.sum(), 2.0), rel=1e-9)


def test_matrix_entropy_is_not_streamable_per_batch():
    # documented: centring by a per-batch mean is another measure than Diff-eRank's global centring
    x = _rows(40, 6, seed=5)
    x[20:] += 3.0
    per_batch = torch.cat([x[:20] - x[:20].mean(0), x[20:] - x[20:].mean(0)])
    assert float(matrix_entropy(per_batch)) != pytest.approx(float(matrix_entropy(x)), rel=1e-3)


def test_reset_and_errors():
    acc = _stream(_rows(10, 3), [10])
    acc.reset()
    with pytest.raises(EntrotrainError, match="0 row"):
        acc.mean()
    acc.update(torch.ones(1, 3))
    with pytest.raises(EntrotrainError, match="at least 2"):
        acc.covariance()
    with pytest.raises(EntrotrainError, match=r"\(\.\.\., 3\)"):
        acc.update(torch.ones(4, 2))
    with pytest.raises(EntrotrainError, match="NaN or Inf"):
        acc.update(torch.tensor([[1.0, float("nan"), 0.0]]))
    with pytest.raises(EntrotrainError, match="cannot merge"):
        acc.merge(CovarianceAccumulator(3, normalize_rows=True))
    with pytest.raises(EntrotrainError, match="all-zero rows"):
        CovarianceAccumulator(3, normalize_rows=True).update(torch.zeros(2, 3))
    with pytest.raises(EntrotrainError, match="dim"):
        CovarianceAccumulator(0)
    with pytest.raises(EntrotrainError, match="shapes"):
        acc.load_state([torch.ones(()), torch.ones(2), torch.ones(3, 3)])


@pytest.mark.parametrize("n, d, rank", [(300, 120, 3), (60, 150, 3), (60, 8, 2)])
def test_streamed_measures_of_rank_deficient_rows_equal_the_svd_presets(n, d, rank):
    """Rows of rank r < min(N, d): the d × d sums' zero eigenvalues come back as ~1e-16·λ_max round-off, whose square
    root is a singular value of 1e-8·σ_max (svdvals of the rows: ~1e-16·σ_max). They are 0 now: the streamed
    effective rank and RankMe equal the presets (they differed by 4.5e-6 relative at 500 × 200, rank 3), the
    covariance has order-0 entropy ln r (it was ln 101 there) and the Vendi score of order 0.5 equals the preset's."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    acc = CovarianceAccumulator(d)
    for part in x.split(37):
        acc.update(part)
    assert float(acc.effective_rank()) == pytest.approx(float(effective_rank(x, precision="float64")), rel=1e-11)
    assert float(acc.rankme()) == pytest.approx(float(rankme(x, precision="float64")), rel=1e-11)
    assert float(acc.entropy(0.0)) == pytest.approx(math.log(rank), abs=1e-12)
    assert float(acc.vendi_score(0.5)) == pytest.approx(float(vendi_score(x, 0.5, kernel="linear")), rel=1e-9)
    s = np.linalg.svd(x.numpy(), compute_uv=False)[:rank]
    p = s / s.sum()
    assert float(acc.effective_rank()) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-11)
