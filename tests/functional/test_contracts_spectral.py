"""Trust under failure for the spectral maths: every public function of spectrum.py, representation.py,
stochastic_spectrum.py and covariance.py answers bad or degenerate input with a documented finite value or an
EntrotrainError naming the argument and the fix — never a silent NaN/Inf, never a raw torch error — and the exact and
stochastic (SLQ) routes give the same answer class on the same degenerate input.

Scenario tests first (each one failed before its fix), then hypothesis properties against float64 references.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional import finite_rows
from entrotrain.functional.covariance import CovarianceAccumulator
from entrotrain.functional.representation import (
    REPRESENTATION_MEASURES,
    diffusion_matrix,
    diffusion_spectral_entropy,
    diffusion_spectral_mutual_information,
    effective_rank,
    matrix_entropy,
    matrix_erank,
    matrix_nuclear_norm,
    median_pairwise_distance,
    rankme,
    vendi_score,
    vendi_score_from_kernel,
)
from entrotrain.functional.spectrum import (
    kernel_spectrum,
    linear_kernel_spectrum,
    renyi2,
    renyi2_from_rows,
    spectral_entropy,
)
from entrotrain.functional.stochastic_spectrum import (
    lanczos_quadrature,
    slq_diffusion_spectral_entropy,
    slq_spectral_entropy,
    slq_vendi_score,
)
from tests.helpers import spectral_reference as ref

NAN, INF = float("nan"), float("inf")


def _rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _finite(v) -> bool:
    return bool(torch.isfinite(torch.as_tensor(v, dtype=torch.float64)).all())


_STDERR: dict[str, float] = {}


def _outcome(fn, *args, **kwargs):
    """``("error", None)`` for an EntrotrainError, ``("value", float)`` for a finite value; anything else fails.

    An SLQ estimate's error bar is checked finite too and left in ``_STDERR["last"]`` (0 for exact values)."""
    _STDERR["last"] = 0.0
    try:
        out = fn(*args, **kwargs)
    except EntrotrainError:
        return "error", None
    value = out.value if hasattr(out, "value") else out
    assert _finite(value), f"{getattr(fn, '__name__', fn)} returned a non-finite value {value}"
    if hasattr(out, "stderr"):
        assert _finite(out.stderr), f"{fn.__name__} returned a non-finite error bar {out.stderr}"
        _STDERR["last"] = float(out.stderr)
    return "value", float(value)


# ============================================================================ SLQ vs exact on a zero operator (bug)


@pytest.mark.parametrize("kwargs", [{}, {"q": 2.0}, {"normalize": False}, {"trace": None}, {"q": 0.5, "trace": None}])
@pytest.mark.parametrize("matrix", [torch.zeros(6, 6), -torch.eye(6, dtype=torch.float64)], ids=["zero", "negative"])
def test_slq_of_a_zero_operator_raises_like_the_exact_route(matrix, kwargs):
    # before: slq_spectral_entropy(zeros) returned 690.78 (= -ln 1e-300) with stderr 0
    with pytest.raises(EntrotrainError, match="sums to 0"):
        spectral_entropy(kernel_spectrum(matrix), kwargs.get("q", 1.0), normalize=kwargs.get("normalize", True))
    with pytest.raises(EntrotrainError, match="all zeros"):
        slq_spectral_entropy(matrix, 6, n_probes=4, n_steps=4, **kwargs)


def test_slq_of_a_zero_matvec_raises():
    with pytest.raises(EntrotrainError, match="all zeros"):
        slq_spectral_entropy(lambda v: torch.zeros_like(v), 8, n_probes=4, n_steps=4)


_DEGENERATE = {
    "zero": torch.zeros(6, 4, dtype=torch.float64),
    "one_row": _rows(1, 4),
    "n0": torch.zeros(0, 4, dtype=torch.float64),
    "d0": torch.zeros(6, 0, dtype=torch.float64),
    "constant_rows": torch.ones(6, 4, dtype=torch.float64),
    "duplicate_rows": _rows(1, 4).repeat(2, 1),
    "rank1": torch.outer(_rows(1, 6)[0], _rows(1, 4, seed=1)[0]),
    "one_zero_row": torch.cat([_rows(5, 4), torch.zeros(1, 4, dtype=torch.float64)]),
    "generic": _rows(6, 4),
}

_PAIRS = {
    "vendi_cosine": (lambda x: vendi_score(x), lambda x: slq_vendi_score(x, n_probes=64, n_steps=8)),
    "vendi_linear": (
        lambda x: vendi_score(x, kernel="linear"),
        lambda x: slq_vendi_score(x, kernel="linear", n_probes=64, n_steps=8),
    ),
    "vendi_rbf": (
        lambda x: vendi_score(x, kernel="rbf"),
        lambda x: slq_vendi_score(x, kernel="rbf", n_probes=64, n_steps=8),
    ),
    "vendi_rbf_sigma": (
        lambda x: vendi_score(x, kernel="rbf", sigma=1.0),
        lambda x: slq_vendi_score(x, kernel="rbf", sigma=1.0, n_probes=64, n_steps=8),
    ),
    "vendi_q2": (lambda x: vendi_score(x, 2.0), lambda x: slq_vendi_score(x, 2.0, n_probes=64, n_steps=8)),
    "dse": (
        lambda x: diffusion_spectral_entropy(x, 1.0),
        lambda x: slq_diffusion_spectral_entropy(x, 1.0, n_probes=64, n_steps=8),
    ),
    "vendi_linear_streamed": (
        lambda x: vendi_score(x, kernel="linear"),
        lambda x: CovarianceAccumulator(max(x.shape[1], 1)).update(x).vendi_score(),
    ),
    "effective_rank_streamed": (effective_rank, lambda x: CovarianceAccumulator(max(x.shape[1], 1)).update(x).effective_rank()),
    "rankme_streamed": (rankme, lambda x: CovarianceAccumulator(max(x.shape[1], 1)).update(x).rankme()),
    "vendi_cosine_streamed": (
        vendi_score,
        lambda x: CovarianceAccumulator(max(x.shape[1], 1), normalize_rows=True).update(x).vendi_score(),
    ),
    "dse_t2": (
        lambda x: diffusion_spectral_entropy(x, 1.0, t=2),
        lambda x: slq_diffusion_spectral_entropy(x, 1.0, t=2, n_probes=64, n_steps=8),
    ),
    "kernel_entropy": (
        lambda x: spectral_entropy(kernel_spectrum(x @ x.T)),
        lambda x: slq_spectral_entropy(x @ x.T, x.shape[0], trace=None, n_probes=64, n_steps=8),
    ),
}


@pytest.mark.parametrize("pair", sorted(_PAIRS))
@pytest.mark.parametrize("case", sorted(_DEGENERATE))
def test_exact_and_stochastic_routes_agree_on_degenerate_input(case, pair):
    """Same input, same answer class: both raise EntrotrainError, or both give close finite values.

    Before: an all-zero x gave vendi_score(kernel="linear") = 1.0 and CovarianceAccumulator.vendi_score() = 1.0
    while slq_vendi_score raised; a single-row accumulator gave effective_rank 1.0 where the exact route raised."""
    x = _DEGENERATE[case]
    exact, other = _PAIRS[pair]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.cov of one row warns about degrees of freedom
        a, va = _outcome(exact, x)
        b, vb = _outcome(other, x)
    assert a == b, f"{case}/{pair}: exact route gave {a} ({va}), the other route {b} ({vb})"
    if a == "value":
        # an SLQ value is within its error bar (6 σ) plus the quadrature bias (5 %) of the exact one
        assert abs(vb - va) <= 6 * _STDERR["last"] + 0.05 * abs(va) + 1e-9, f"{case}/{pair}: {va} vs {vb}"


# ================================================================================ the spectral core's parameters


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"base": NAN}, "base"),  # before: NaN
        ({"base": INF}, "base"),  # before: 0.0 (h / inf)
        ({"base": "e"}, "base"),  # before: TypeError
        ({"eps": NAN}, "eps"),  # before: silently -0.0
        ({"eps": INF}, "eps"),  # before: -inf
        ({"eps": 1.0}, "eps"),  # a regulariser of probabilities: [0, 1)
        ({"q": True}, "q"),
        ({"q": "x"}, "q"),
        ({"q": -1.0}, "q"),
        ({"q": NAN}, "q"),
    ],
)
def test_spectral_entropy_refuses_bad_parameters(kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        spectral_entropy(torch.tensor([3.0, 2.0, 1.0]), **kwargs)


@pytest.mark.parametrize("q", [0.0, 0.5, 1.0, 2.0, INF])
def test_zero_spectrum_raises_with_and_without_normalisation(q):
    # before: normalize=False gave 0 (q=1), +inf (q=2, inf) or -inf (q=0) for an all-zero spectrum
    for normalize in (True, False):
        with pytest.raises(EntrotrainError, match="sums to 0"):
            spectral_entropy(torch.zeros(4), q, normalize=normalize)


def _renyi64(p: np.ndarray, q: float) -> float:
    """Rényi entropy of a probability vector in float64, in log space (logsumexp) for any order."""
    p = p[p > 0]
    if q == 1.0:
        return float(-(p * np.log(p)).sum())
    if math.isinf(q):
        return float(-np.log(p.max()))
    a = q * np.log(p)
    return float((a.max() + np.log(np.exp(a - a.max()).sum())) / (1.0 - q))


@pytest.mark.parametrize("q", [50.0, 1e4, 1e300])
def test_high_order_renyi_stays_finite_and_exact(q):
    # before: Σ p^q underflowed to 0 and H_q came out +inf
    lam = torch.tensor([5.0, 3.0, 2.0, 1e-3], dtype=torch.float64)
    expected = _renyi64((lam / lam.sum()).numpy(), q)
    assert float(spectral_entropy(lam, q)) == pytest.approx(expected, rel=1e-12)


def test_spectral_entropy_of_huge_and_tiny_spectra():
    lam = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=torch.float64)
    expected = _renyi64((lam / lam.sum()).numpy(), 1.0)
    for c in (1e-300, 1e300):  # before: Σλ overflowed to inf at 1e300 (H = 0)
        assert float(spectral_entropy(lam * c)) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("scale", [NAN, INF, 0.0, -1.0, "a"])
def test_linear_kernel_spectrum_refuses_bad_scale(scale):
    # before: NaN/Inf reached eigvalsh and raised torch.linalg.LinAlgError; -1 silently clamped to a zero spectrum
    with pytest.raises(EntrotrainError, match="scale"):
        linear_kernel_spectrum(_rows(5, 3), scale=scale)


def test_linear_kernel_spectrum_of_huge_rows_does_not_overflow():
    x = _rows(6, 4)
    big = linear_kernel_spectrum(x * 1e160, scale=1e-20)  # before: X Xᵀ ~ 1e320 overflowed to inf
    np.testing.assert_allclose((big / 1e300).numpy(), linear_kernel_spectrum(x).numpy(), rtol=1e-10, atol=1e-14)


def test_renyi2_paths_refuse_zero_and_bad_parameters():
    # before: renyi2(0, normalize=False) and renyi2_from_rows(0, scale=1) returned +inf; scale=NaN gave NaN
    with pytest.raises(EntrotrainError, match="all zeros"):
        renyi2(torch.zeros(3, 3), normalize=False)
    with pytest.raises(EntrotrainError, match="all zeros"):
        renyi2_from_rows(torch.zeros(3, 2), scale=1.0)
    for kwargs in ({"scale": NAN}, {"scale": 0.0}, {"base": 1.0}, {"base": NAN}):
        with pytest.raises(EntrotrainError, match=next(iter(kwargs))):
            renyi2_from_rows(_rows(4, 3), **kwargs)
    with pytest.raises(EntrotrainError, match="base"):
        renyi2(torch.eye(3), base=NAN)


def test_renyi2_from_rows_is_scale_free_down_to_tiny_rows():
    # before: X Xᵀ of 1e-200 rows underflowed to 0 and the call raised "all zeros"
    x = _rows(5, 3)
    assert float(renyi2_from_rows(x * 1e-200)) == pytest.approx(float(renyi2_from_rows(x)), rel=1e-12)
    assert float(renyi2(torch.eye(3, dtype=torch.float64) * 1e-300)) == pytest.approx(math.log(3), rel=1e-12)


# ==================================================================================== representation parameters


def test_rbf_kernels_with_extreme_sigma_give_the_documented_limits():
    x = _rows(7, 3)
    # σ → 0: the kernel is the identity (VS = n, DSE = log2 n); before: σ² underflowed and K held NaN (an error)
    assert float(vendi_score(x, kernel="rbf", sigma=1e-300)) == pytest.approx(7.0, rel=1e-12)
    assert float(diffusion_spectral_entropy(x, sigma=1e-300)) == pytest.approx(math.log2(7), rel=1e-12)
    # σ → ∞: all-ones kernel (VS = 1, DSE ≈ 0)
    assert float(vendi_score(x, kernel="rbf", sigma=1e300)) == pytest.approx(1.0, rel=1e-9)
    assert 0.0 <= float(diffusion_spectral_entropy(x, sigma=1e300)) < 1e-10


def test_dse_with_a_long_diffusion_time_is_finite():
    # before: |λ|^t underflowed to 0 for every eigenvalue and the call raised "the spectrum sums to 0"
    x = _rows(8, 3)
    h = float(diffusion_spectral_entropy(x, 2.0, t=1e20))
    assert 0.0 <= h < 1e-10  # only the top eigenvalue (= 1) survives: one state, entropy 0 (+ dse-dsmi's ε)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda x: vendi_score(x, kernel="rbf", sigma="a"), "sigma"),  # before: ValueError from float()
        (lambda x: vendi_score(x, kernel="rbf", sigma=INF), "sigma"),  # before: silently 1.0
        (lambda x: rankme(x, eps=NAN), "eps"),  # before: silently 1.0
        (lambda x: rankme(x, eps=INF), "eps"),  # before: silently 0.0
        (lambda x: diffusion_spectral_entropy(x, "a"), "sigma"),  # before: TypeError
        (lambda x: diffusion_spectral_entropy(x, t=True), "t"),  # before: a value for t = 1
        (lambda x: diffusion_spectral_entropy(x, t=INF), "t"),
        (lambda x: diffusion_spectral_entropy(x, max_n=1.5), "max_n"),  # before: TypeError from a slice
        (lambda x: diffusion_spectral_entropy(x, max_n=3, seed="a"), "seed"),  # before: RuntimeError
        (lambda x: diffusion_matrix(x, NAN), "sigma"),
        (lambda x: diffusion_spectral_mutual_information(x, torch.arange(8), sigma=NAN), "sigma"),  # before: 0.0
        (lambda x: diffusion_spectral_mutual_information(x, torch.arange(8) % 2, n_repetitions=1.5), "n_repetitions"),
        (lambda x: diffusion_spectral_mutual_information(x, torch.arange(8) % 2, seed=NAN), "seed"),
        (lambda x: diffusion_spectral_mutual_information(x, torch.arange(3)), "y"),
        (lambda x: diffusion_spectral_mutual_information(x, torch.zeros(8)), "y"),
        (lambda x: vendi_score(x, q=-1.0), "q"),
        (lambda x: vendi_score_from_kernel(torch.eye(4), q=NAN), "q"),
        (lambda x: REPRESENTATION_MEASURES["dse"](x, sigma=NAN), "sigma"),
    ],
)
def test_representation_measures_refuse_bad_parameters(call, match):
    with pytest.raises(EntrotrainError, match=match):
        call(_rows(8, 3))


def test_nan_data_is_refused_with_a_count_and_finite_rows_drops_it():
    x = _rows(8, 4)
    x[2, 1] = NAN
    x[5] = INF
    with pytest.raises(EntrotrainError, match=r"5 non-finite .*finite_rows"):
        matrix_entropy(x)
    rows, dropped = finite_rows(x)
    assert dropped == 2 and rows.shape == (6, 4)
    clean = x[[0, 1, 3, 4, 6, 7]]
    assert torch.equal(rows, clean)
    assert float(matrix_entropy(rows)) == float(matrix_entropy(clean))
    same, none = finite_rows(clean)
    assert none == 0 and same is clean
    with pytest.raises(EntrotrainError, match="x"):
        finite_rows(torch.ones(3))


# ============================================================================================= SLQ parameters


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"q": NAN, "trace": None}, "q"),  # before: (nan, nan)
        ({"q": -1.0, "trace": None}, "q"),  # before: a value
        ({"trace": INF}, "trace"),  # before: (nan, 0)
        ({"trace": NAN}, "trace"),
        ({"base": NAN}, "base"),  # before: NaN
        ({"base": 1.0}, "base"),  # before: inf
        ({"base": -1.0}, "base"),  # before: ValueError (math domain error)
        ({"n_probes": 1}, "n_probes"),  # before: a NaN error bar
        ({"n_probes": 1.5}, "n_probes"),  # before: TypeError from randint
        ({"n_probes": True}, "n_probes"),
        ({"n_steps": NAN}, "n_steps"),
        ({"seed": "a"}, "seed"),  # before: RuntimeError from manual_seed
        ({"device": "xyz"}, "device"),  # before: RuntimeError
    ],
)
def test_slq_refuses_bad_parameters(kwargs, match):
    k = diffusion_matrix(_rows(8, 3), 2.0)
    with pytest.raises(EntrotrainError, match=match):
        slq_spectral_entropy(k, 8, **kwargs)


def test_slq_refuses_what_the_exact_route_refuses():
    k = diffusion_matrix(_rows(8, 3), 2.0)
    for bad in (torch.triu(torch.ones(8, 8)), torch.ones(1, 1), k.float() * NAN):  # before: values for the first two
        with pytest.raises(EntrotrainError):
            kernel_spectrum(bad)
        with pytest.raises(EntrotrainError):
            slq_spectral_entropy(bad, bad.shape[0])
    with pytest.raises(EntrotrainError, match="n"):
        slq_spectral_entropy(k, 8.0)  # before: TypeError from randint
    with pytest.raises(EntrotrainError, match="NaN/Inf"):  # before: (nan, nan)
        slq_spectral_entropy(lambda v: v * NAN, 8)
    with pytest.raises(EntrotrainError, match="n_probes"):
        lanczos_quadrature(k, 8, n_probes=0)


@pytest.mark.parametrize("t", [0, -1.0, INF, NAN])
def test_slq_dse_refuses_the_diffusion_times_the_exact_route_refuses(t):
    # before: t=0 returned log2 n = 3.0 bits (exact raises), t=inf returned NaN
    x = _rows(8, 3)
    with pytest.raises(EntrotrainError, match="t"):
        diffusion_spectral_entropy(x, 2.0, t=t)
    with pytest.raises(EntrotrainError, match="t"):
        slq_diffusion_spectral_entropy(x, 2.0, t=t)


@pytest.mark.parametrize("q, trace", [(1e6, None), (200.0, 1.0), (200.0, None)])
def test_slq_high_orders_stay_finite_and_close_to_exact(q, trace):
    # before: tr A^q underflowed: (inf, nan) with trace=None
    n = 10
    k = diffusion_matrix(_rows(n, 2), 1.0) / n
    k = k / torch.diagonal(k).sum()  # trace 1
    exact = float(spectral_entropy(kernel_spectrum(k), q))
    est = slq_spectral_entropy(k, n, q=q, trace=trace, n_probes=64, n_steps=n)
    assert _finite(est.value) and _finite(est.stderr)
    assert float(est.value) == pytest.approx(exact, abs=6 * float(est.stderr) + 0.05)


@pytest.mark.parametrize("q", ["x", NAN, -1.0])
def test_slq_vendi_refuses_bad_orders(q):
    # before: 'x' raised ValueError from float(); NaN/-1 reached the estimator
    with pytest.raises(EntrotrainError, match="q"):
        slq_vendi_score(_rows(8, 3), q)


# ======================================================================================= CovarianceAccumulator


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: CovarianceAccumulator(True), "dim"),  # before: TypeError from torch.zeros
        (lambda: CovarianceAccumulator(3, device="xyz"), "device"),  # before: RuntimeError
        (lambda: CovarianceAccumulator(2).load_state([1, 2, 3]), "count"),  # before: AttributeError
        (lambda: CovarianceAccumulator(2).load_state([torch.tensor(2.0), torch.zeros(2) * NAN, torch.eye(2)]), "sum"),
        (lambda: CovarianceAccumulator(2).load_state([torch.tensor(-3.0), torch.zeros(2), torch.eye(2)]), "count"),
        (lambda: CovarianceAccumulator(2).update(torch.zeros(3, 2)).vendi_score(2.0), "sums to 0"),  # before: inf
        (lambda: CovarianceAccumulator(2).update(torch.zeros(3, 2)).vendi_score(), "sums to 0"),  # before: 1.0
        (lambda: CovarianceAccumulator(2).update(_rows(4, 2)).entropy(base=NAN), "base"),  # before: NaN
        (lambda: CovarianceAccumulator(2).update(_rows(4, 2)).rankme(eps=NAN), "eps"),  # before: silently 1.0
    ],
)
def test_covariance_accumulator_refuses_bad_input(call, match):
    with pytest.raises(EntrotrainError, match=match):
        call()


# ===================================================================================================== properties

_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
_SCALES = [1e-200, 1e-30, 1e-3, 1.0, 1e3, 1e30, 1e200]


@st.composite
def _matrices(draw, max_n: int = 7, max_d: int = 6):
    """(x, x64): a rank-deficient-or-not (n, d) matrix in some dtype and scale, possibly with NaN/Inf entries, and
    its exact float64 value (the reference input: what the function sees after the cast)."""
    n = draw(st.integers(0, max_n))
    d = draw(st.integers(0, max_d))
    rank = draw(st.integers(0, max(min(n, d), 0)))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    if draw(st.booleans()) and n > 1:  # duplicate a row
        x[-1] = x[0]
    x = x * draw(st.sampled_from(_SCALES))
    bad = draw(st.sampled_from(["none", "none", "nan_entry", "inf_entry", "nan_row"]))
    if n and d and bad != "none":
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, d - 1))
        if bad == "nan_entry":
            x[i, j] = NAN
        elif bad == "inf_entry":
            x[i, j] = -INF
        else:
            x[i] = NAN
    x = x.to(draw(st.sampled_from(_DTYPES)))
    return x, x.to(torch.float64)


def _reference(fn, x64: torch.Tensor) -> float | None:
    """A numpy float64 reference, or None where it is undefined (NaN/Inf in or out, LAPACK failure)."""
    if x64.numel() == 0 or not bool(torch.isfinite(x64).all()):
        return None
    top = float(x64.abs().max())
    if top > 1e100 or 0 < top < 1e-100:  # the numpy anchors square x without rescaling: they over/underflow here
        return None
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            v = float(fn(x64.numpy()))
        except (np.linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError):
            return None
    return v if math.isfinite(v) else None


_EXACT = {
    "matrix_entropy": (matrix_entropy, ref.matrix_entropy),
    "matrix_erank": (matrix_erank, lambda a: math.exp(ref.matrix_entropy(a))),
    "matrix_entropy_normalized": (lambda x: matrix_entropy(x, normalized=True), None),
    "effective_rank": (effective_rank, ref.effective_rank),
    "rankme": (rankme, ref.rankme),
    "vendi_cosine_q1": (vendi_score, lambda a: ref.vendi_score_k(ref.cosine_kernel(a), 1.0)),
    "vendi_cosine_q2": (lambda x: vendi_score(x, 2.0), lambda a: ref.vendi_score_k(ref.cosine_kernel(a), 2.0)),
    "vendi_cosine_qinf": (lambda x: vendi_score(x, "inf"), lambda a: ref.vendi_score_k(ref.cosine_kernel(a), math.inf)),
    "vendi_linear": (lambda x: vendi_score(x, kernel="linear"), lambda a: ref.vendi_score_k(a @ a.T, 1.0)),
    "vendi_rbf": (lambda x: vendi_score(x, kernel="rbf", sigma=1.0), None),
    "dse": (lambda x: diffusion_spectral_entropy(x, 1.0), lambda a: ref.diffusion_spectral_entropy(a, 1.0)),
    "dsmi": (lambda x: diffusion_spectral_mutual_information(x, torch.arange(x.shape[0]) % 2, 1.0), None),
    "nuclear_norm": (matrix_nuclear_norm, ref.matrix_nuclear_norm),
    "median_distance": (median_pairwise_distance, None),
    "linear_spectrum_entropy": (lambda x: spectral_entropy(linear_kernel_spectrum(x)), None),
    "renyi2_from_rows": (renyi2_from_rows, None),
    "covariance_erank": (lambda x: CovarianceAccumulator(max(x.shape[-1], 1)).update(x).erank(), None),
    "covariance_vendi": (lambda x: CovarianceAccumulator(max(x.shape[-1], 1)).update(x).vendi_score(), None),
}


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow])
@given(_matrices(), st.sampled_from(sorted(_EXACT)))
def test_every_exact_measure_gives_an_error_or_the_float64_reference(xx, name):
    x, x64 = xx
    fn, reference = _EXACT[name]
    kind, value = _outcome(fn, x)
    if kind == "error":
        return
    if reference is None:
        return
    expected = _reference(reference, x64)
    if expected is not None:  # undefined where the anchors' code divides 0 by 0 (zero rows after centring)
        assert value == pytest.approx(expected, rel=1e-7, abs=1e-7), f"{name}: {value} vs reference {expected}"


@settings(max_examples=40)
@given(_matrices(), st.sampled_from(sorted(_EXACT)))
def test_non_finite_data_always_raises_naming_the_count(xx, name):
    x, _ = xx
    assume(x.numel() > 0 and not bool(torch.isfinite(x).all()) and x.shape[0] >= 2)
    fn, _ = _EXACT[name]
    with pytest.raises(EntrotrainError, match="non-finite"):
        fn(x)


_PARAMETERS = st.one_of(
    st.sampled_from([NAN, INF, -INF, 0.0, -1.0, 1e-300, 1e300, True, "a", None]),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
)


@settings(max_examples=40)
@given(_PARAMETERS, st.sampled_from(["q", "base", "eps", "sigma", "t", "rankme_eps", "scale", "max_n"]))
def test_every_parameter_value_gives_an_error_or_a_finite_value(value, which):
    x = _rows(6, 3)
    calls = {
        "q": lambda: vendi_score(x, value),
        "base": lambda: spectral_entropy(torch.tensor([2.0, 1.0]), base=value),
        "eps": lambda: spectral_entropy(torch.tensor([2.0, 1.0]), eps=value),
        "sigma": lambda: diffusion_spectral_entropy(x, value),
        "t": lambda: diffusion_spectral_entropy(x, 1.0, t=value),
        "rankme_eps": lambda: rankme(x, eps=value),
        "scale": lambda: renyi2_from_rows(x, scale=value),
        "max_n": lambda: diffusion_spectral_entropy(x, 1.0, max_n=value),
    }
    kind, result = _outcome(calls[which])  # a finite value (checked inside) or an EntrotrainError, nothing else
    meaningless = isinstance(value, (bool, str)) or (isinstance(value, float) and math.isnan(value))
    if meaningless:  # a bool, a string or NaN is never a valid parameter, whatever the range
        assert kind == "error", f"{which}={value!r} was accepted and gave {result}"
    else:
        assert kind == "error" or math.isfinite(result)


@settings(max_examples=12, deadline=None)
@given(_matrices(max_n=6, max_d=4), st.sampled_from(["cosine", "linear", "rbf"]), st.sampled_from([1.0, 2.0]))
def test_slq_vendi_matches_the_exact_route_in_answer_class(xx, kernel, q):
    x, _ = xx
    exact_kind, exact = _outcome(vendi_score, x, q, kernel=kernel, sigma=1.0 if kernel == "rbf" else None)
    slq_kind, est = _outcome(
        slq_vendi_score, x, q, kernel=kernel, sigma=1.0 if kernel == "rbf" else None, n_probes=32, n_steps=6
    )
    assert exact_kind == slq_kind, f"exact {exact_kind} ({exact}) vs SLQ {slq_kind} ({est})"


@settings(max_examples=10, deadline=None)
@given(_matrices(max_n=6, max_d=4), st.sampled_from([0.5, 1.0, 2.0]))
def test_slq_dse_matches_the_exact_route_in_answer_class(xx, t):
    x, _ = xx
    exact_kind, exact = _outcome(diffusion_spectral_entropy, x, 1.0, t)
    slq_kind, est = _outcome(slq_diffusion_spectral_entropy, x, 1.0, t, n_probes=32, n_steps=6)
    assert exact_kind == slq_kind, f"exact {exact_kind} ({exact}) vs SLQ {slq_kind} ({est})"


@settings(max_examples=30)
@given(
    st.lists(st.floats(0.0, 10.0), min_size=1, max_size=6),
    st.sampled_from([0.0, 0.5, 1.0, 2.0, 7.0, INF]),
    st.sampled_from([1e-300, 1.0, 1e300]),
    st.booleans(),
)
def test_spectral_entropy_matches_the_logspace_reference(values, q, scale, normalize):
    lam = torch.tensor(values, dtype=torch.float64) * scale
    kind, h = _outcome(spectral_entropy, lam, q, normalize=normalize)
    if not bool((lam > 0).any()):
        assert kind == "error"
        return
    if kind == "error":
        assert not normalize  # only an unnormalised spectrum can be refused (a sum that is not a distribution)
        return
    p = (lam / lam.sum()).numpy() if normalize else lam.numpy()
    if q == 0.0:
        expected = math.log(int((p > 0).sum()))
    else:
        expected = _renyi64(p, q)
    assert h == pytest.approx(expected, rel=1e-9, abs=1e-9)


@settings(max_examples=25)
@given(st.lists(_matrices(max_n=4, max_d=3).filter(lambda xx: xx[0].shape[1] == 3), min_size=1, max_size=3))
def test_streamed_statistics_match_the_concatenated_rows(batches):
    acc = CovarianceAccumulator(3)
    rows = []
    for x, x64 in batches:
        try:
            acc.update(x)
        except EntrotrainError as err:  # only bad data, or a scale whose Σxxᵀ float64 cannot hold, is refused
            assert not bool(torch.isfinite(x64).all()) or "flows the float64 second moment" in str(err)
            continue
        rows.append(x64)
    x = torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.float64)
    for exact, streamed in (
        (lambda: vendi_score(x, kernel="linear"), acc.vendi_score),
        (lambda: effective_rank(x), acc.effective_rank),
    ):
        a, va = _outcome(exact)
        b, vb = _outcome(streamed)
        assert a == b, f"exact {a} ({va}) vs streamed {b} ({vb})"
        if a == "value":  # the Gram route squares the condition number: tiny σ_k lose relative accuracy
            assert vb == pytest.approx(va, rel=1e-5, abs=1e-5)


# ====================================================================== extreme float64 scales (beyond 1e±154)

_SCALE_FREE = {
    "matrix_entropy": matrix_entropy,
    "effective_rank": effective_rank,
    "rankme": rankme,
    "vendi_cosine": vendi_score,
    "vendi_cosine_q2": lambda x: vendi_score(x, 2.0),
    "nuclear_norm": matrix_nuclear_norm,
    "renyi2_from_rows": renyi2_from_rows,
    "slq_vendi_cosine": lambda x: slq_vendi_score(x, n_probes=8, n_steps=4).value,
    "streamed_cosine_vendi": lambda x: CovarianceAccumulator(x.shape[1], normalize_rows=True).update(x).vendi_score(),
}


@pytest.mark.parametrize("c", [1e-300, 1e-200, 1e200, 1e300])
@pytest.mark.parametrize("name", sorted(_SCALE_FREE))
def test_scale_free_measures_are_unchanged_at_extreme_scales(name, c):
    # before: X Xᵀ / row norms over- or underflowed: "all rows identical", "all-zero rows" or a wrong value
    x = _rows(7, 4)
    fn = _SCALE_FREE[name]
    assert float(fn(x * c)) == pytest.approx(float(fn(x)), rel=1e-9)


@pytest.mark.parametrize("c", [1e-300, 1e200])
def test_kernel_measures_at_extreme_scales_give_the_documented_limits(c):
    # before: ‖x_i‖² overflowed to inf, K held NaN (an error naming NaN data) and the median distance was NaN
    x = _rows(7, 4)
    assert float(median_pairwise_distance(x * c)) == pytest.approx(float(median_pairwise_distance(x)) * c, rel=1e-12)
    limit = 1.0 if c < 1 else 7.0  # all rows within σ of each other: one state; all far apart: n states
    assert float(vendi_score(x * c, kernel="rbf", sigma=1.0)) == pytest.approx(limit, rel=1e-9)
    assert float(vendi_score(x * c, kernel="rbf")) == pytest.approx(float(vendi_score(x, kernel="rbf")), rel=1e-9)
    assert float(diffusion_spectral_entropy(x * c, 1.0)) == pytest.approx(math.log2(limit), abs=1e-9)


@pytest.mark.parametrize("c", [1e-200, 1e200])
def test_the_unnormalised_linear_kernel_refuses_scales_it_cannot_represent(c):
    # before: inf eigenvalues reported as "non-finite data", or 0 eigenvalues as "a zero matrix", or VS = inf
    x = _rows(7, 4) * c
    for call in (
        lambda: vendi_score(x, kernel="linear"),
        lambda: vendi_score(x, 2.0, kernel="linear"),
        lambda: slq_vendi_score(x, kernel="linear", n_probes=4, n_steps=4),
        lambda: CovarianceAccumulator(4).update(x),
    ):
        with pytest.raises(EntrotrainError, match="flow"):
            call()


def test_get_measure_refuses_an_unhashable_name():
    from entrotrain.functional.representation import get_measure

    with pytest.raises(EntrotrainError, match="unknown representation measure"):  # before: TypeError (unhashable)
        get_measure(["rankme"])


@pytest.mark.parametrize(
    "call",
    [
        lambda seed: diffusion_spectral_entropy(_rows(8, 3), max_n=4, seed=seed),
        lambda seed: diffusion_spectral_mutual_information(_rows(8, 3), torch.arange(8) % 2, seed=seed),
        lambda seed: slq_vendi_score(_rows(8, 3), n_probes=4, n_steps=4, seed=seed),
        lambda seed: lanczos_quadrature(torch.eye(3), 3, n_probes=2, n_steps=2, seed=seed),
    ],
)
def test_seeds_beyond_the_generator_range_are_refused(call):
    # before: ValueError "Overflow when unpacking long long" from torch.Generator.manual_seed
    with pytest.raises(EntrotrainError, match="seed must be <= 18446744073709551615"):
        call(2**70)
    call(2**64 - 1)  # the largest seed manual_seed takes is accepted
