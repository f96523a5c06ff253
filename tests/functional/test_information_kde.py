"""KDE (Kolchinsky–Tracey) information-plane estimator: against a numpy transcription of Saxe et al.'s kde.py,
the bracketing of the true MI on correlated Gaussians within the documented bias, degenerate input, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.information import information_plane_point, kde_mutual_information
from tests.helpers.contracts import DTYPES, NAN, call
from tests.helpers.information_reference import kde_saxe, kde_saxe_lower


@pytest.mark.parametrize("n,d,var,n_classes", [(50, 1, 1e-3, 2), (200, 3, 0.1, 3), (120, 10, 1.0, 4), (64, 5, 1e-2, 1)])
def test_matches_saxe_kde_py(n, d, var, n_classes):
    rng = np.random.default_rng(n + d)
    h = np.tanh(rng.standard_normal((n, d)))
    labels = rng.integers(0, n_classes, n)
    for bound, ref_fn in (("upper", kde_saxe), ("lower", kde_saxe_lower)):
        ref = ref_fn(h, labels, var)
        got = kde_mutual_information(torch.from_numpy(h), torch.from_numpy(labels), var, bound=bound)
        assert got[0].item() == pytest.approx(ref[0], abs=1e-9)
        assert got[1].item() == pytest.approx(ref[1], abs=1e-9)
        bits = kde_mutual_information(torch.from_numpy(h), torch.from_numpy(labels), var, bound=bound, base=2)
        assert bits[0].item() == pytest.approx(ref[0] / math.log(2), abs=1e-9)


def test_chunking_does_not_change_the_value():
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(97, 4, generator=g), torch.randint(0, 3, (97,), generator=g)
    whole = kde_mutual_information(h, y, 0.1)
    for chunk in (1, 7, 96, 500):
        part = kde_mutual_information(h, y, 0.1, chunk_size=chunk)
        torch.testing.assert_close(part[0], whole[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(part[1], whole[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("rho,upper_bias,lower_bias", [(0.5, 0.124, -0.066), (0.9, 0.402, -0.211)])
def test_correlated_gaussians_bracketed_within_documented_bias(rho, upper_bias, lower_bias):
    # T = ρX + Z, Z ~ N(0, 1 − ρ²): I(X;T) = −½ ln(1 − ρ²). Documented bias (N = 2000): upper +0.12 / +0.40,
    # lower −0.07 / −0.21 nats; seed spread ≤ 0.013 — allow 0.04 around it.
    true = -0.5 * math.log(1 - rho**2)
    g = torch.Generator().manual_seed(11)
    h = rho * torch.randn(2000, 1, generator=g, dtype=torch.float64)
    y = torch.zeros(2000, dtype=torch.long)
    up = kde_mutual_information(h, y, 1 - rho**2)[0].item()
    lo = kde_mutual_information(h, y, 1 - rho**2, bound="lower")[0].item()
    assert lo < true < up
    assert up - true == pytest.approx(upper_bias, abs=0.04)
    assert lo - true == pytest.approx(lower_bias, abs=0.04)


def test_separated_clusters_reach_log_n_and_label_entropy():
    # far-apart distinct rows with σ² tiny: every kernel row is one-hot → I(X;T) = ln N, I(T;Y) = H(Y).
    h = torch.arange(8.0).unsqueeze(1) * 10
    y = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    i_xt, i_ty = kde_mutual_information(h, y, 1e-3)
    assert i_xt.item() == pytest.approx(math.log(8), abs=1e-12)
    h_y = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert i_ty.item() == pytest.approx(h_y, abs=1e-12)


def test_degenerate_inputs():
    y = torch.tensor([0, 1, 0, 1, 1])
    for t in (torch.full((5, 3), 0.7), torch.randn(5, 0)):
        assert [v.item() for v in kde_mutual_information(t, y)] == [0.0, 0.0]
    assert [v.item() for v in kde_mutual_information(torch.randn(1, 3), y[:1])] == [0.0, 0.0]
    assert [v.item() for v in kde_mutual_information(torch.randn(0, 3), y[:0])] == [0.0, 0.0]
    i_xt, i_ty = kde_mutual_information(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), 0.1)
    assert i_ty.item() == 0.0 and i_xt.item() > 0
    dup = torch.tensor([[0.1, 0.2]] * 3 + [[0.5, 0.5]])  # duplicate rows: distance exactly 0, finite
    assert torch.isfinite(kde_mutual_information(dup, torch.tensor([0, 0, 1, 1]), 1e-6)[1])


def test_bad_input_errors():
    with pytest.raises(EntrotrainError, match="finite_row_mask"):
        kde_mutual_information(torch.tensor([[0.0], [NAN]]), torch.tensor([0, 1]))
    with pytest.raises(EntrotrainError, match="noise_variance"):
        kde_mutual_information(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), 0.0)
    with pytest.raises(EntrotrainError, match="labels must have shape"):
        kde_mutual_information(torch.randn(4, 2), torch.tensor([0, 1]))
    with pytest.raises(EntrotrainError, match="bound"):
        kde_mutual_information(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), bound="tight")
    with pytest.raises(EntrotrainError, match="chunk_size"):
        kde_mutual_information(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), chunk_size=0)


def test_dispatcher_kde():
    g = torch.Generator().manual_seed(3)
    t, y = torch.tanh(torch.randn(40, 3, generator=g)), torch.randint(0, 2, (40,), generator=g)
    got = information_plane_point(t, y, "kde", noise_variance=0.05, base=2)
    ref = kde_mutual_information(t, y, 0.05, base=2)
    assert got[0].item() == ref[0].item() and got[1].item() == ref[1].item()


@settings(max_examples=30)
@given(
    n=st.integers(0, 10),
    d=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES),
    var=st.sampled_from([1e-3, 0.1, 10.0]),
    nan_at=st.one_of(st.none(), st.integers(0, 30)),
    seed=st.integers(0, 2**16),
)
def test_property_finite_or_error(n, d, dtype, var, nan_at, seed):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(n, d, generator=gen).to(dtype)
    labels = torch.randint(0, 3, (n,), generator=gen)
    if nan_at is not None and t.numel():
        t.view(-1)[nan_at % t.numel()] = NAN
    kind, out = call(kde_mutual_information, t, labels, var)
    if nan_at is not None and t.numel():
        assert kind == "error" and "finite_row_mask" in str(out)
        return
    assert kind == "ok"
    i_xt, i_ty = out
    assert torch.isfinite(i_xt) and torch.isfinite(i_ty)
    assert 0.0 <= i_xt.item() <= math.log(max(n, 1)) + 1e-12
    if n:
        counts = torch.bincount(labels).double()
        p = counts[counts > 0] / n
        assert i_ty.item() <= float(-(p * p.log()).sum()) + 1e-12
        ref = kde_saxe(t.double().numpy(), labels.numpy(), var) if d and n > 1 else (0.0, 0.0)
        if d and n > 1 and not bool((t == t[0]).all()):
            assert i_xt.item() == pytest.approx(ref[0], abs=1e-8)
            assert i_ty.item() == pytest.approx(ref[1], abs=1e-8)
