"""Trust under failure for the information-plane estimators (information.py, information_binning.py,
information_kde.py, information_knn.py): every public function answers any input with finite 0-d float64 values in
the documented range, the documented degenerate value, or an EntrotrainError naming the argument — never a raw torch /
Python error, never NaN.

Scenario tests first (each failed before its fix), then hypothesis properties over shapes (0-sized included), dtypes
(half, integer, bool), NaN/Inf placements, labels (float, wrong length, one class), estimators and parameter values.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.information import (
    ESTIMATORS,
    binned_entropy,
    binned_mutual_information,
    discrete_entropy,
    discrete_mutual_information,
    estimator_parameters,
    information_plane_point,
    kde_mutual_information,
    ksg_mutual_information,
    loggable_parameters,
    pca_compress,
    ross_mutual_information,
)
from tests.helpers.contracts import DTYPES, INF, NAN, call
from tests.helpers.information_reference import plugin_entropy, plugin_mi

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------ scenarios (each failed before its fix)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.arange(3), torch.arange(4)), r"groups must have shape \(3,\)"),  # a raw RuntimeError before
        ((torch.arange(3.0), torch.arange(3)), "symbols must be integer"),  # float ids silently compared before
        ((torch.arange(3), torch.rand(3)), "groups must be integer"),
        (([0, 1, 1], torch.arange(3)), "symbols must be a torch.Tensor"),  # AttributeError before
        ((torch.zeros(2, 2, dtype=torch.long), torch.arange(4)), "symbols must have 1 dims"),  # flattened before
    ],
)
def test_discrete_mutual_information_validates_its_symbols(args, match):
    with pytest.raises(EntrotrainError, match=match):
        discrete_mutual_information(*args)


def test_discrete_entropy_validates_its_symbols():
    with pytest.raises(EntrotrainError, match="symbols must be integer"):
        discrete_entropy(torch.tensor([0.5, NAN, NAN]))  # before: each NaN a distinct symbol, H = ln 3
    with pytest.raises(EntrotrainError, match="symbols must be a torch.Tensor"):
        discrete_entropy([0, 1])  # AttributeError before


_X = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
_Y = torch.arange(8) % 2


@pytest.mark.parametrize(
    "fn",
    [
        lambda seed: ksg_mutual_information(_X, _X[:, :1], seed=seed),
        lambda seed: ross_mutual_information(_X, _Y, seed=seed),
        lambda seed: information_plane_point(_X, _Y, "ksg", x=_X, seed=seed),
        lambda seed: information_plane_point(_X, _Y, "pca_ksg", x=_X, seed=seed, noise_std=0.1),
        lambda seed: estimator_parameters("ksg", seed=seed),
    ],
)
@pytest.mark.parametrize("seed", [2**64 - 1, 2**70])
def test_seeds_beyond_the_generator_range_are_refused(fn, seed):
    # before: ValueError "Overflow when unpacking long long" from torch.Generator.manual_seed (seed, seed + 1, + 2)
    with pytest.raises(EntrotrainError, match="seed must be <="):
        fn(seed)


@pytest.mark.parametrize("used", [None, [("k", 3)], "ksg"])
def test_loggable_parameters_refuses_anything_but_the_parameter_dict(used):
    with pytest.raises(EntrotrainError, match="used must be the dict"):  # AttributeError ('items') before
        loggable_parameters(used)


def test_the_largest_usable_seed_is_accepted():
    top = 2**64 - 1
    assert torch.isfinite(ksg_mutual_information(_X, _X[:, :1], seed=top - 1))
    i_xt, i_ty = information_plane_point(_X, _Y, "ksg", x=_X, seed=top - 2, noise_std=0.1)
    assert torch.isfinite(i_xt) and torch.isfinite(i_ty)


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_grid_too_large_to_materialise_is_refused(adaptive):
    # before: n_bins=2**70 raised OverflowError from torch.arange; n_bins=10**9 allocated 8 GB of edges
    for n_bins in (2**70, 2**24 + 1):
        with pytest.raises(EntrotrainError, match="n_bins must be <= 16777216"):
            binned_entropy(_X, n_bins, adaptive=adaptive)


# ------------------------------------------------------------------ property tests

_ALL_DTYPES = DTYPES + (torch.int64, torch.bool)


@st.composite
def activations(draw, max_n: int = 7):
    """``t`` (n, d) in any dtype and scale, possibly constant, duplicated or holding NaN/Inf, as a view or not."""
    n, d = draw(st.integers(0, max_n)), draw(st.integers(0, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    t = torch.randn(n, d, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-200, 1e-3, 1.0, 3.0, 1e200]))
    kind = draw(st.sampled_from(["random", "random", "constant", "duplicates", "nonfinite"]))
    if kind == "constant":
        t[:] = draw(st.sampled_from([0.0, 0.5, -2.0]))
    elif kind == "duplicates" and n > 1:
        t[n // 2 :] = t[0]
    elif kind == "nonfinite" and t.numel():
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    dtype = draw(st.sampled_from(_ALL_DTYPES))
    t = t.to(dtype) if dtype.is_floating_point else (t.clamp(-3, 3).round().to(dtype))
    if draw(st.booleans()):
        t = t.t().contiguous().t()  # a non-contiguous view
    if draw(st.booleans()) and d == 1:
        t = t[:, 0]  # (n,): one feature
    return t


@st.composite
def labels_for(draw, n: int):
    kind = draw(st.sampled_from(["int", "int", "bool", "one_class", "float", "wrong_length"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "float":
        return kind, torch.randint(0, 2, (n,), generator=g).float()
    if kind == "wrong_length":
        return kind, torch.zeros(n + 1, dtype=torch.long)
    if kind == "one_class":
        return kind, torch.full((n,), 7, dtype=torch.long)
    y = torch.randint(0, draw(st.integers(1, 3)), (n,), generator=g)
    return kind, (y > 0 if kind == "bool" else y * 5 - 3)  # any integer values: only compared


def _finite_rows(t: torch.Tensor) -> bool:
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def _h(labels: torch.Tensor) -> float:
    return plugin_entropy(labels.tolist())


def _check_pair(out, n: int):
    assert isinstance(out, tuple) and len(out) == 2
    for v in out:
        assert v.shape == () and v.dtype == torch.float64 and bool(torch.isfinite(v)), out
    return float(out[0]), float(out[1])


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from(ESTIMATORS), st.sampled_from(["none", "rows", "wrong_length"]))
def test_information_plane_point_contract(data, estimator, x_kind):
    t = data.draw(activations())
    n = t.shape[0]
    label_kind, labels = data.draw(labels_for(n))
    x = None if x_kind == "none" else torch.randn(n + (x_kind == "wrong_length"), 2, dtype=torch.float64)
    base = data.draw(st.sampled_from([math.e, 2.0]))
    status, out = call(information_plane_point, t, labels, estimator, x=x, base=base)
    if t.dtype == torch.bool:
        assert status == "error" and "t must hold real activations" in str(out)
        return
    if not _finite_rows(t):
        assert status == "error" and "finite_row_mask" in str(out), out
        return
    if label_kind in ("float", "wrong_length"):
        assert status == "error" and "labels" in str(out), out
        return
    if x_kind == "wrong_length":
        assert status == "error" and "x must have one row per row of t" in str(out), out
        return
    if estimator in ("ksg", "pca_ksg") and x is None:
        assert status == "error" and "needs x" in str(out), out
        return
    if status == "error":  # the one refusal left: too few rows for the k-NN estimators
        assert estimator in ("ksg", "pca_ksg") and 2 <= n <= 3 and "k + 1" in str(out), out
        return
    i_xt, i_ty = _check_pair(out, n)
    if n <= 1:
        assert (i_xt, i_ty) == (0.0, 0.0)
    if label_kind == "one_class" or n <= 1:
        assert i_ty == 0.0
    if estimator in ("binning", "adaptive_binning", "kde"):
        tol = 1e-9
        log_n = math.log(max(n, 1)) / math.log(base)
        assert -tol <= i_xt <= log_n + tol
        assert i_ty <= _h(labels) / math.log(base) + tol
        if estimator != "kde":
            assert i_ty >= 0.0
        if n and t.dim() == 2 and t.shape[1] and bool((t == t[:1]).all()):
            assert (i_xt, i_ty) == (0.0, 0.0)  # constant activations: one symbol / one kernel centre


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_discrete_estimators_match_the_plugin_reference(data):
    n = data.draw(st.integers(0, 9))
    symbols = torch.tensor(data.draw(st.lists(st.integers(-3, 3), min_size=n, max_size=n)), dtype=torch.long)
    groups = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=n, max_size=n)), dtype=torch.long)
    if data.draw(st.booleans()):
        groups = groups > 0
    base = data.draw(st.sampled_from([math.e, 2.0, 10.0]))
    h = discrete_entropy(symbols, base=base)
    mi = discrete_mutual_information(symbols, groups, base=base)
    assert h.dtype == mi.dtype == torch.float64
    assert float(h) == pytest.approx(plugin_entropy(symbols.tolist(), base), abs=1e-12)
    assert float(mi) == pytest.approx(max(plugin_mi(symbols.tolist(), groups.tolist(), base), 0.0), abs=1e-12)
    assert 0.0 <= float(mi) <= float(h) + 1e-12


_BAD_VALUES = st.sampled_from([NAN, INF, -INF, 0, 0.0, -1, 1, 2, 0.5, 1e-300, 1e300, True, "a", None, 2**70])
_PARAMETERS = {
    "binning": ["n_bins", "range", "scheme", "base"],
    "adaptive_binning": ["n_bins", "scope", "quantiles", "base"],
    "kde": ["noise_variance", "bound", "base"],
    "ksg": ["k", "noise_std", "jitter", "seed", "base"],
    "pca_ksg": ["k", "noise_std", "jitter", "seed", "dim", "whiten", "compress", "base"],
}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ESTIMATORS), st.data(), _BAD_VALUES)
def test_every_parameter_value_gives_an_error_naming_it_or_finite_values(estimator, data, value):
    name = data.draw(st.sampled_from(_PARAMETERS[estimator]))
    if name == "range":
        value = data.draw(st.sampled_from([(0, 1), (1, 0), (NAN, 1), (-1e308, 1e308), (0, 0), "ab", (0, 1, 2)]))
    t = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    labels = torch.arange(6) % 2
    status, out = call(information_plane_point, t, labels, estimator, x=t, **{name: value})
    meaningless = isinstance(value, (bool, str)) or value is None or (isinstance(value, float) and math.isnan(value))
    if status == "error":
        assert name.split("_")[0] in str(out) or name in str(out), f"{name}={value!r}: {out}"
        return
    if name != "compress" or value is not None:  # None is compress's default (PCA)
        assert not meaningless or (name == "whiten" and isinstance(value, bool)), f"{name}={value!r} accepted"
    _check_pair(out, 6)


@settings(max_examples=40, deadline=None)
@given(activations(), st.data())
def test_direct_estimators_give_an_error_or_a_finite_value(t, data):
    n = t.shape[0]
    _, labels = data.draw(labels_for(n))
    which = data.draw(st.sampled_from(["binned_h", "binned_mi", "kde", "ksg", "ross", "pca"]))
    kw = {
        "binned_h": lambda: binned_entropy(
            t, data.draw(st.sampled_from([1, 2, 30])), adaptive=data.draw(st.booleans())
        ),
        "binned_mi": lambda: binned_mutual_information(t, labels, 4, adaptive=data.draw(st.booleans())),
        "kde": lambda: kde_mutual_information(t, labels, data.draw(st.sampled_from([1e-3, 1e-300, 1e300])),
                                              chunk_size=data.draw(st.sampled_from([None, 1, 3]))),
        "ksg": lambda: ksg_mutual_information(t, t, data.draw(st.sampled_from([1, 3])), chunk_size=2),
        "ross": lambda: ross_mutual_information(t, labels, data.draw(st.sampled_from([1, 3]))),
        "pca": lambda: pca_compress(t, data.draw(st.sampled_from([1, 4])), whiten=data.draw(st.booleans())),
    }[which]
    status, out = call(kw)
    if status == "error":
        return
    assert _finite_rows(t), f"{which} accepted non-finite activations"
    for v in out if isinstance(out, tuple) else (out,):
        assert v.dtype == torch.float64 and bool(torch.isfinite(v).all()), f"{which}: {v}"
