"""Trust under failure for the differentiable spectral objectives (spectral_objectives.py): any input gives a value
in the documented range with a finite gradient, NaN only for non-finite data (documented), or an EntrotrainError
naming the argument — never a raw torch error, never a value outside ``[0, ln rank]``.

Scenario tests first (each failed before its fix), then hypothesis properties over shapes (0-sized included), dtypes
(half, integer, bool), zero / constant / duplicated rows, scales from 1e-30 to 1e30, orders and the preset flags;
``spectral_entropy_objective`` against a float64 brute force.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.spectral_objectives import (
    matrix_entropy_objective,
    mmcr_objective,
    nuclear_norm,
    spectral_entropy_objective,
    unit_rows,
    vendi_entropy_objective,
)
from tests.helpers.contracts import DTYPES, INF, NAN, call

pytestmark = pytest.mark.usefixtures("one_thread")

ORDERS = (1.0, 2.0, 0.5, INF)


# ------------------------------------------------------------------ scenarios (each failed before its fix)


@pytest.mark.parametrize("q", ORDERS)
def test_a_spectrum_with_no_mode_has_entropy_zero(q):
    # before: q=2 gave 46.05 (= -ln 1e-20), q=0.5 gave -23.03, q=inf 23.03, and an empty spectrum with q=inf IndexError
    for p in (torch.zeros(4), torch.zeros(3, 0), torch.full((5,), 1e-12)):
        p = p.requires_grad_()
        h = spectral_entropy_objective(p, q)
        assert (h == 0).all()
        if p.numel():
            (g,) = torch.autograd.grad(h.sum(), p)
            assert (g == 0).all()


@pytest.mark.parametrize("dtype", [torch.long, torch.bool])
def test_spectral_entropy_objective_refuses_non_float_spectra(dtype):
    with pytest.raises(EntrotrainError, match="p must be a floating-point tensor"):  # before: NaN or a raw RuntimeError
        spectral_entropy_objective(torch.ones(3, dtype=dtype), 2.0)


def test_spectral_entropy_objective_of_half_spectra_is_computed_in_float32():
    p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float16)
    for q in ORDERS:  # before: RuntimeError "value cannot be converted to type c10::Half without overflow" (eps**q)
        h = spectral_entropy_objective(p, q)
        assert h.dtype == torch.float32
        assert float(h) == pytest.approx(float(spectral_entropy_objective(p.double(), q)), rel=1e-6)


@pytest.mark.parametrize("q", ORDERS)
def test_zero_rows_take_no_part_in_the_vendi_objective(q):
    # before: all-zero x gave 46.05 (q=2), -23.03 (q=0.5); one non-zero row among 4 gave 2.77 (q=2) > ln 1 = 0
    x = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    h = vendi_entropy_objective(x, q)
    (g,) = torch.autograd.grad(h, x)
    assert float(h.detach()) == 0.0 and (g == 0).all()
    rows = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    padded = torch.cat([rows, torch.zeros(2, 5, dtype=torch.float64)])
    assert float(vendi_entropy_objective(padded, q)) == pytest.approx(float(vendi_entropy_objective(rows, q)), 1e-12)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("order", [1, 2])
def test_matrix_entropy_without_row_normalisation_is_scale_free_in_float32(scale, order):
    # before: 1e30 rows overflowed X^T X (LinAlgError from eigvalsh at order 1, NaN at order 2); 1e-30 rows underflowed
    # to a zero trace and gave 0
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for center in (True, False):
        want = float(matrix_entropy_objective(x, order, center=center, normalize_rows=False))
        got = matrix_entropy_objective((x * scale).float(), order, center=center, normalize_rows=False)
        assert float(got) == pytest.approx(want, abs=1e-5)


def test_mmcr_refuses_a_weight_that_overflows_float32():
    z = torch.zeros(1, 1, 1, requires_grad=True)  # before: lam=1e300 became inf in float32: an inf gradient
    for lam in (1e300, 1e30):  # 1e30: the zero view's gradient 1/eps = 1e12 times λ overflowed float32
        with pytest.raises(EntrotrainError, match=r"lam must be in \[0.0, 1000000.0\]"):
            mmcr_objective(z, lam)
    (g,) = torch.autograd.grad(mmcr_objective(z, 1e6), z)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_an_exactly_zero_view_takes_no_part_and_gets_no_gradient(dtype):
    # before: F.normalize's gradient 1/eps = 1e12 at a zero view: -inf in float16, 1e12 in float32
    z = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(3)).to(dtype)
    z[1, 0] = 0.0
    z.requires_grad_()
    (g,) = torch.autograd.grad(mmcr_objective(z, 0.5), z)
    assert torch.isfinite(g).all() and (g[1, 0] == 0).all() and (g[0] != 0).any()


def test_nuclear_norm_and_unit_rows_validate_their_input():
    m = torch.randn(3, 4, generator=torch.Generator().manual_seed(2))
    # before: NotImplementedError "linalg_svd_cpu" not implemented for 'BFloat16'; RuntimeError for integers
    assert float(nuclear_norm(m.bfloat16())) == pytest.approx(float(nuclear_norm(m.bfloat16().float())), rel=1e-6)
    with pytest.raises(EntrotrainError, match="m must be a floating-point tensor"):
        nuclear_norm(m.long())
    with pytest.raises(EntrotrainError, match=r"m must have at least 2 dim"):
        nuclear_norm(m[0])
    with pytest.raises(EntrotrainError, match="z must be a floating-point tensor"):  # NotImplementedError "abs_cpu" before
        unit_rows(m > 0)
    with pytest.raises(EntrotrainError, match="eps"):
        unit_rows(m, eps=NAN)


# ------------------------------------------------------------------ property tests

_ALL_DTYPES = DTYPES + (torch.int64, torch.bool)


@st.composite
def rows_case(draw, max_n: int = 6, max_d: int = 5):
    n, d = draw(st.integers(0, max_n)), draw(st.integers(0, max_d))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    rank = draw(st.integers(0, max(min(n, d), 0)))
    x = torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["random", "random", "zero_rows", "constant", "duplicates", "nonfinite"]))
    if kind == "zero_rows" and n:
        x[: draw(st.integers(1, n))] = 0.0
    elif kind == "constant":
        x[:] = 1.5
    elif kind == "duplicates" and n > 1:
        x[1:] = x[0]
    elif kind == "nonfinite" and x.numel():
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    x = x * draw(st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
    dtype = draw(st.sampled_from(_ALL_DTYPES))
    x = x.to(dtype) if dtype.is_floating_point else (x.clamp(-3, 3).round().to(dtype))
    if draw(st.booleans()):
        x = x.t().contiguous().t()
    return x


_OBJECTIVES = {
    "me1": lambda x: matrix_entropy_objective(x, 1),
    "me2": lambda x: matrix_entropy_objective(x, 2),
    "me1_raw": lambda x: matrix_entropy_objective(x, 1, center=False, normalize_rows=False),
    "me2_raw": lambda x: matrix_entropy_objective(x, 2, center=False, normalize_rows=False),
    "me1_uncentred": lambda x: matrix_entropy_objective(x, 1, center=False),
    **{f"vendi_q{q}": (lambda q: lambda x: vendi_entropy_objective(x, q))(q) for q in ORDERS},
}


def _rank_bound(x: torch.Tensor, name: str) -> float:
    """``ln`` of the most modes the objective's matrix can have."""
    n, d = x.shape
    if name.startswith("vendi"):
        n = int((x.double() != 0).any(dim=1).sum())  # zero rows take no part
    elif name in ("me1", "me2"):
        n = n - 1  # centring removes one direction
    return math.log(max(min(n, d), 1))


@settings(max_examples=80, deadline=None)
@given(rows_case(), st.sampled_from(sorted(_OBJECTIVES)))
def test_objectives_give_a_bounded_value_and_a_finite_gradient(x, name):
    leaf = x.detach().clone().requires_grad_() if x.is_floating_point() else x
    status, h = call(_OBJECTIVES[name], leaf)
    if not x.is_floating_point():
        assert status == "error" and "x must be a floating-point tensor" in str(h), h
        return
    assert status == "ok", h
    assert h.shape == () and h.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    if not bool(torch.isfinite(x).all()):
        assert math.isnan(float(h.detach())), "non-finite data: the documented value is NaN"
    else:
        tol = 1e-9 if x.dtype == torch.float64 else 1e-4
        assert -tol <= float(h.detach()) <= _rank_bound(x, name) + tol, f"{name}: {float(h)}"
    (g,) = torch.autograd.grad(h, leaf)
    assert torch.isfinite(g).all(), f"{name}: non-finite gradient"


def _renyi64(p: torch.Tensor, q: float, eps: float) -> float:
    """Brute force of the documented clamped Rényi entropy over the modes ``p_k > eps`` (0 when there is none)."""
    kept = [float(v) for v in p.double() if float(v) > eps]
    if not kept:
        return 0.0
    if q == 1.0:
        return -sum(v * math.log(v) for v in kept)
    if math.isinf(q):
        return -math.log(max(kept))
    return math.log(sum(v**q for v in kept)) / (1.0 - q)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.sampled_from([0.0, 1e-12, 1e-3, 0.1, 0.3, 1.0]), min_size=0, max_size=6),
    st.sampled_from(ORDERS + (3.0, 1e-3)),
    st.sampled_from([1e-10, 1e-4]),
    st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
)
def test_spectral_entropy_objective_matches_the_float64_brute_force(weights, q, eps, dtype):
    total = sum(weights)
    p = torch.tensor([w / total for w in weights] if total else weights, dtype=torch.float64)
    h = spectral_entropy_objective(p.to(dtype), q, eps=eps)
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = _renyi64(p.to(dtype).double(), q, eps)
    assert float(h) == pytest.approx(want, rel=1e-5, abs=1e-5 if dtype != torch.float64 else 1e-12)


@settings(max_examples=40, deadline=None)
@given(rows_case(max_n=6, max_d=4), st.integers(1, 3), st.sampled_from([0.0, 0.5, NAN, -1.0, 1e6, 1e300]))
def test_mmcr_objective_contract(x, k, lam):
    n = (x.shape[0] // k) * k
    z = x[:n].reshape(n // k, k, x.shape[1])
    leaf = z.detach().clone().requires_grad_() if z.is_floating_point() else z
    status, loss = call(mmcr_objective, leaf, lam)
    if not z.is_floating_point() or not (math.isfinite(lam) and 0 <= lam <= 1e6):
        assert status == "error" and ("lam" in str(loss) or "z must be" in str(loss)), loss
        return
    assert status == "ok", loss
    if not bool(torch.isfinite(z).all()):
        assert math.isnan(float(loss.detach()))
    elif lam <= 1.0:
        c = z.shape[0]
        assert -math.sqrt(c * min(c, z.shape[2])) - 1e-3 <= float(loss.detach()) <= lam * math.sqrt(k) * 2 + 1e-3
    (g,) = torch.autograd.grad(loss, leaf)
    assert torch.isfinite(g).all()


def test_the_mmcr_regulariser_refuses_the_same_weights_at_construction():
    from entrotrain.regularizers import MMCRLoss

    with pytest.raises(EntrotrainError, match=r"lam must be in \[0.0, 1000000.0\]"):  # accepted before
        MMCRLoss(1.0, lam=1e30, n_views=2)
    assert MMCRLoss(1.0, lam=1e6, n_views=2).lam == 1e6
