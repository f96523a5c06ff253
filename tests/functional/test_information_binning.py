"""Binning information-plane estimators: exact hand-computed tables, the IDNNs scheme against its numpy code,
EBAB edges, the dispatcher, degenerate input and property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.information import (
    ESTIMATORS,
    binned_entropy,
    binned_mutual_information,
    binned_symbols,
    estimator_parameters,
    information_plane_point,
)
from tests.helpers.contracts import DTYPES, NAN, call
from tests.helpers.information_reference import idnns_binned, plugin_entropy, plugin_mi

# Four bins of width 0.5 over [-1, 1): edges -1, -0.5, 0, 0.5, 1.
TABLE = torch.tensor(
    [
        [0.10, 0.20],  # bins (2, 2)
        [0.30, 0.40],  # (2, 2)
        [0.90, -0.90],  # (3, 0)
        [-0.50, 0.50],  # (1, 3)
        [0.45, 0.05],  # (2, 2)
        [-0.49, 0.99],  # (1, 3)
        [0.60, -0.60],  # (3, 0)
        [0.00, 0.00],  # (2, 2)
    ]
)
LABELS = torch.tensor([0, 0, 1, 1, 0, 1, 1, 1])


def test_exact_hand_table_bits():
    # symbols: (2,2) x4, (3,0) x2, (1,3) x2 → p = 1/2, 1/4, 1/4 → H = 1.5 bits exactly.
    assert binned_entropy(TABLE, 4, base=2).item() == 1.5
    # y=0: rows 0,1,4 all (2,2) → H=0; y=1 (5 rows): (3,0)x2, (1,3)x2, (2,2)x1 → H(T|Y)=5/8·H(2/5,2/5,1/5).
    h_cond = 5 / 8 * -(2 * 0.4 * math.log2(0.4) + 0.2 * math.log2(0.2))
    assert binned_mutual_information(TABLE, LABELS, 4, base=2).item() == pytest.approx(1.5 - h_cond, abs=1e-15)


def test_exact_dyadic_mutual_information():
    t = torch.tensor([[-0.9], [-0.9], [0.9], [0.9]])
    assert binned_mutual_information(t, torch.tensor([0, 0, 1, 1]), 2, base=2).item() == 1.0
    assert binned_mutual_information(t, torch.tensor([0, 1, 0, 1]), 2, base=2).item() == 0.0
    assert binned_entropy(t, 2).item() == math.log(2)


def test_nats_match_dict_counts():
    syms = [tuple(r) for r in [(2, 2), (2, 2), (3, 0), (1, 3), (2, 2), (1, 3), (3, 0), (2, 2)]]
    assert binned_entropy(TABLE, 4).item() == pytest.approx(plugin_entropy(syms), abs=1e-15)
    mi = binned_mutual_information(TABLE, LABELS, 4).item()
    assert mi == pytest.approx(plugin_mi(syms, LABELS.tolist()), abs=1e-15)


def test_intervals_clip_out_of_range():
    t = torch.tensor([[-5.0], [-1.0], [0.99], [1.0], [7.0]])
    sym = binned_symbols(t, 2)
    assert sym[0] == sym[1] and sym[2] == sym[3] == sym[4] and sym[0] != sym[2]


@pytest.mark.parametrize("n_edges", [1, 2, 5, 30])
def test_idnns_scheme_matches_numpy_code(n_edges):
    gen = torch.Generator().manual_seed(n_edges)
    a = torch.rand(300, 3, generator=gen, dtype=torch.float64) * 2.6 - 1.3  # some < -1 (wrap) and > 1
    a[:5] = 1.0
    labels = torch.randint(0, 3, (300,), generator=gen)
    ref = idnns_binned(a.numpy(), n_edges)
    got = binned_entropy(a, n_edges, scheme="idnns")
    assert got.item() == pytest.approx(plugin_entropy(ref), abs=1e-12)
    got_mi = binned_mutual_information(a, labels, n_edges, scheme="idnns")
    assert got_mi.item() == pytest.approx(plugin_mi(ref, labels.tolist()), abs=1e-12)


def test_idnns_wraps_below_range_into_top_bin():
    t = torch.tensor([[-1.5], [1.0], [0.0]])
    sym = binned_symbols(t, 30, scheme="idnns")
    assert sym[0] == sym[1] != sym[2]


def test_adaptive_edges_are_distinct_value_quantiles():
    # distinct values 0..7 (+ many zeros): B=4 → edges u[2], u[4], u[6] = 2, 4, 6 → bins {0,1},{2,3},{4,5},{6,7}.
    t = torch.tensor([0.0] * 10 + [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]).unsqueeze(1)
    sym = binned_symbols(t, 4, adaptive=True)
    groups = [sym[10:].tolist()[i] for i in range(7)]
    assert sym[0] == groups[0]  # value 1 shares the zeros' bin
    assert groups[1] == groups[2] != groups[0] and groups[3] == groups[4] and groups[5] == groups[6]
    # samples quantiles: edges sorted[4], sorted[8], sorted[12] = 0, 0, 3 → bins [0, 3) and [3, ∞): 12 and 5 rows.
    s2 = binned_symbols(t, 4, adaptive=True, quantiles="samples")
    assert s2.tolist() == [0] * 12 + [1] * 5
    h_bits = binned_entropy(t, 4, adaptive=True, base=2).item()
    counts = [11, 2, 2, 2]
    assert h_bits == pytest.approx(-sum(c / 17 * math.log2(c / 17) for c in counts), abs=1e-15)


def test_adaptive_scope_neuron_vs_layer():
    t = torch.stack([torch.arange(8.0), 100 + torch.arange(8.0)], dim=1)
    # layer scope, 2 bins: edge u[8] = 100 → column 0 all bin 0, column 1 all bin 1: one symbol.
    assert binned_entropy(t, 2, adaptive=True).item() == 0.0
    # neuron scope: each column split at its median → two symbols of 4 rows: ln 2.
    assert binned_entropy(t, 2, adaptive=True, scope="neuron").item() == pytest.approx(math.log(2), abs=1e-15)


def test_dispatcher_binning_routes():
    for name, adaptive in (("binning", False), ("adaptive_binning", True)):
        i_xt, i_ty = information_plane_point(TABLE, LABELS, name, base=2, n_bins=4)
        assert i_xt.dtype == torch.float64 and i_xt.dim() == 0
        assert i_xt.item() == binned_entropy(TABLE, 4, adaptive=adaptive, base=2).item()
        assert i_ty.item() == binned_mutual_information(TABLE, LABELS, 4, adaptive=adaptive, base=2).item()
        # x given, deterministic map: H(T) − H(T|X) = H(T).
        i_xt_x, _ = information_plane_point(TABLE, LABELS, name, base=2, n_bins=4, x=TABLE * 3)
        assert i_xt_x.item() == pytest.approx(i_xt.item(), abs=1e-15)
    # x with duplicates mapped to different T (a noisy network): I(X;T) < H(T).
    x = torch.zeros(8, 1)
    assert information_plane_point(TABLE, LABELS, "binning", n_bins=4, x=x)[0].item() == 0.0


def test_estimator_parameters():
    assert set(ESTIMATORS) >= {"binning", "adaptive_binning"}
    p = estimator_parameters("binning", n_bins=10, base=2)
    assert p == {"estimator": "binning", "base": 2.0, "n_bins": 10, "range": (-1.0, 1.0), "scheme": "intervals"}
    assert estimator_parameters("adaptive_binning")["quantiles"] == "distinct"
    with pytest.raises(EntrotrainError, match="no parameter"):
        estimator_parameters("binning", noise_variance=1.0)
    with pytest.raises(EntrotrainError, match="estimator must be one of"):
        information_plane_point(TABLE, LABELS, "mine")


@pytest.mark.parametrize("adaptive", [False, True])
def test_degenerate_inputs_give_zero(adaptive):
    f = binned_entropy
    assert f(torch.full((9, 3), 0.3), 30, adaptive=adaptive).item() == 0.0  # constant
    assert f(torch.randn(1, 3), 30, adaptive=adaptive).item() == 0.0  # one sample
    assert f(torch.randn(0, 3), 30, adaptive=adaptive).item() == 0.0  # no rows
    assert f(torch.randn(5, 0), 30, adaptive=adaptive).item() == 0.0  # no features
    assert f(TABLE, 1, adaptive=adaptive).item() == 0.0  # one bin
    assert binned_mutual_information(TABLE, torch.zeros(8, dtype=torch.long), 4, adaptive=adaptive).item() == 0.0
    assert binned_mutual_information(torch.randn(0, 2), torch.zeros(0, dtype=torch.long), 4).item() == 0.0


def test_bad_input_errors_name_the_fix():
    with pytest.raises(EntrotrainError, match="finite_row_mask"):
        binned_entropy(torch.tensor([[0.1], [NAN]]), 4)
    with pytest.raises(EntrotrainError, match="labels must have shape"):
        binned_mutual_information(TABLE, LABELS[:3], 4)
    with pytest.raises(EntrotrainError, match="integer"):
        binned_mutual_information(TABLE, LABELS.float(), 4)
    with pytest.raises(EntrotrainError, match="n_bins"):
        binned_entropy(TABLE, 0)
    with pytest.raises(EntrotrainError, match="range"):
        binned_entropy(TABLE, 4, range=(1.0, -1.0))
    with pytest.raises(EntrotrainError, match="base"):
        binned_entropy(TABLE, 4, base=1.0)
    with pytest.raises(EntrotrainError, match="x must have one row"):
        information_plane_point(TABLE, LABELS, "binning", x=torch.zeros(3, 1))


@settings(max_examples=30)
@given(
    n=st.integers(0, 12),
    d=st.integers(0, 3),
    dtype=st.sampled_from(DTYPES),
    n_bins=st.integers(1, 6),
    adaptive=st.booleans(),
    nan_at=st.one_of(st.none(), st.integers(0, 40)),
    seed=st.integers(0, 2**16),
)
def test_property_finite_or_error(n, d, dtype, n_bins, adaptive, nan_at, seed):
    gen = torch.Generator().manual_seed(seed)
    t = (torch.randn(n, d, generator=gen) * 0.7).to(dtype)
    labels = torch.randint(0, 3, (n,), generator=gen)
    if nan_at is not None and t.numel():
        t.view(-1)[nan_at % t.numel()] = NAN
    name = "adaptive_binning" if adaptive else "binning"
    kind, out = call(information_plane_point, t, labels, name, n_bins=n_bins)
    if nan_at is not None and t.numel():
        assert kind == "error" and "finite_row_mask" in str(out)
        return
    assert kind == "ok"
    i_xt, i_ty = out
    assert torch.isfinite(i_xt) and torch.isfinite(i_ty)
    assert 0.0 <= i_ty.item() <= i_xt.item() + 1e-12 <= math.log(max(n, 1)) + 1e-12
    # against the dict-count reference on the same float64 bins
    sym = binned_symbols(t, n_bins, adaptive=adaptive).tolist()
    assert i_xt.item() == pytest.approx(plugin_entropy(sym), abs=1e-12)
    assert i_ty.item() == pytest.approx(plugin_mi(sym, labels.tolist()), abs=1e-12)


def test_numpy_reference_is_independent_of_bins_on_float32():
    a = np.random.default_rng(0).uniform(-1, 1, size=(200, 4)).astype(np.float32)
    ref = idnns_binned(a.astype(np.float64), 30)
    assert binned_entropy(torch.from_numpy(a), 30, scheme="idnns").item() == pytest.approx(plugin_entropy(ref))
