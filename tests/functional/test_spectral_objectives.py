"""Differentiable spectral objectives against float64 brute forces (value and gradient), the detached measures, and
on degenerate spectra (repeated / zero eigenvalues, n < d, identical rows, NaN rows)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.representation import _centred_unit_rows, matrix_entropy, vendi_score
from entrotrain.functional.spectral_objectives import (
    matrix_entropy_objective,
    mmcr_objective,
    mmcr_views,
    spectral_entropy_objective,
    vendi_entropy_objective,
    vendi_score_objective,
)
from entrotrain.functional.spectrum import renyi2_from_rows
from tests.helpers.contracts import DTYPES, NAN, call

# ----------------------------------------------------------------------------------------------- brute forces


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / max(n, 1e-12)


def brute_matrix_entropy(x: np.ndarray, order: int) -> float:
    """The d × d density matrix of the Diff-eRank preset, its full eigendecomposition, the entropy from its definition."""
    n, d = x.shape
    mean = sum(x[i] for i in range(n)) / n
    z = np.stack([_unit(x[i] - mean) for i in range(n)])
    sigma = sum(np.outer(z[i], z[i]) for i in range(n)) / n
    rho = sigma / np.trace(sigma)
    lam = np.linalg.eigvalsh(rho)
    if order == 2:
        return -math.log(sum(v * v for v in lam))
    return -sum(v * math.log(v) for v in lam if v > 1e-13)


def brute_vendi_entropy(x: np.ndarray, q: float) -> float:
    n = x.shape[0]
    xs = np.stack([_unit(r) for r in x])
    k = np.array([[xs[i] @ xs[j] for j in range(n)] for i in range(n)])
    lam = [v for v in np.linalg.eigvalsh(k / n) if v > 1e-13]
    if q == 1:
        return -sum(v * math.log(v) for v in lam)
    if math.isinf(q):
        return -math.log(max(lam))
    return math.log(sum(v**q for v in lam)) / (1 - q)


def brute_mmcr(z_sample_major: np.ndarray, k: int, lam: float) -> float:
    """The reference's MMCR_Loss on (B·k, d) sample-major rows, written out."""
    rows = np.stack([_unit(r) for r in z_sample_major])
    n = rows.shape[0] // k
    groups = [rows[i * k : (i + 1) * k] for i in range(n)]  # views of sample i are contiguous
    c = np.stack([g.mean(0) for g in groups])
    glob = np.linalg.svd(c, compute_uv=False).sum()
    local = sum(np.linalg.svd(g.T, compute_uv=False).sum() for g in groups)
    return float(-glob + lam * local / n)


def _x(n, d, seed=0, dtype=torch.float64):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ------------------------------------------------------------------------------------------- values and gradcheck


@pytest.mark.parametrize("n,d", [(9, 4), (4, 9), (6, 6), (2, 3), (3, 1)])
@pytest.mark.parametrize("order", [1, 2])
def test_matrix_entropy_equals_brute_force_and_the_measure(n, d, order):
    x = _x(n, d, seed=n * 10 + d)
    h = matrix_entropy_objective(x, order)
    assert h.dtype == torch.float64
    assert float(h) == pytest.approx(brute_matrix_entropy(x.numpy(), order), abs=1e-9)
    ref = matrix_entropy(x) if order == 1 else renyi2_from_rows(_centred_unit_rows(x))
    assert float(h) == pytest.approx(float(ref), abs=1e-9)
    if d >= 2:
        assert float(matrix_entropy_objective(x, order, normalized=True)) == pytest.approx(
            float(h) / math.log(d), abs=1e-12
        )


@pytest.mark.parametrize("q", [0.5, 1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("n,d", [(8, 3), (3, 8), (5, 5)])
def test_vendi_equals_brute_force_and_the_measure(q, n, d):
    x = _x(n, d, seed=7 * n + d)
    h = vendi_entropy_objective(x, q)
    assert float(h) == pytest.approx(brute_vendi_entropy(x.numpy(), q), abs=1e-9)
    assert float(vendi_score_objective(x, q)) == pytest.approx(float(vendi_score(x, q)), rel=1e-9)


@pytest.mark.parametrize("n,k,d,lam", [(6, 2, 4, 0.0), (5, 3, 8, 0.5), (8, 4, 3, 1.0)])
def test_mmcr_equals_the_reference_on_sample_major_rows(n, k, d, lam):
    z = _x(n * k, d, seed=n + k + d)
    value = mmcr_objective(mmcr_views(z, k, "sample_major"), lam)
    assert float(value) == pytest.approx(brute_mmcr(z.numpy(), k, lam), abs=1e-9)


def test_mmcr_view_major_layout_reads_the_same_samples():
    n, k, d = 5, 3, 4
    z = _x(n, k * d).reshape(n, k, d)  # the ground truth (N, k, d)
    view_major = torch.cat([z[:, j] for j in range(k)])  # [all view 1; all view 2; ...]
    sample_major = z.reshape(n * k, d)
    assert torch.equal(mmcr_views(view_major, k, "view_major"), z)
    assert torch.equal(mmcr_views(sample_major, k, "sample_major"), z)
    # the trap: view-major rows read as sample-major give other centroids, another value
    assert float(mmcr_objective(mmcr_views(view_major, k, "sample_major"))) != pytest.approx(float(mmcr_objective(z)))


def test_mmcr_orthonormal_centroids_give_n():
    n = 5
    q, _ = torch.linalg.qr(_x(n, n))
    z = q[:, None, :].expand(n, 3, n) * 2.5  # three identical views per sample, scaled (unit rows after normalising)
    assert float(mmcr_objective(z)) == pytest.approx(-n, abs=1e-10)
    assert float(mmcr_objective(z, 1.0)) == pytest.approx(-n + math.sqrt(3), abs=1e-10)  # Z_i: 3 equal unit columns, ‖Z_i‖_* = √3


@pytest.mark.parametrize(
    "fn",
    [
        lambda t: matrix_entropy_objective(t, 1),
        lambda t: matrix_entropy_objective(t, 2),
        lambda t: vendi_entropy_objective(t, 1.0),
        lambda t: vendi_entropy_objective(t, 2.0),
        lambda t: vendi_entropy_objective(t, 0.5),
    ],
    ids=["me1", "me2", "vendi1", "vendi2", "vendi0.5"],
)
@pytest.mark.parametrize("n,d", [(7, 4), (4, 7)])
def test_gradcheck_well_conditioned(fn, n, d):
    x = _x(n, d, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(fn, (x,))


def test_mmcr_gradcheck():
    z = _x(5 * 3, 4, seed=1).reshape(5, 3, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: mmcr_objective(t, 0.7), (z,))


# ----------------------------------------------------------------------------------------------- degenerate spectra


def _orthogonal_rows(n, d):
    q, _ = torch.linalg.qr(_x(d, d, seed=11))
    return q[:n].clone()


def _degenerate_inputs():
    base = _x(4, 6, seed=5)
    return {
        # ± orthonormal rows: centred spectrum has repeated eigenvalues
        "repeated": torch.cat([_orthogonal_rows(3, 6), -_orthogonal_rows(3, 6)]),
        # n < d: rank-deficient, many exact zero eigenvalues of the d × d matrix
        "rank_deficient": _x(3, 10, seed=2),
        # a constant feature: an exact zero eigenvalue on the covariance route (d < n)
        "zero_feature": torch.cat([_x(9, 3, seed=4), torch.zeros(9, 1, dtype=torch.float64)], 1),
        # duplicated rows
        "duplicates": torch.cat([base, base]),
        # rank-1 batch
        "rank_one": _x(6, 1, seed=9) @ _x(1, 5, seed=8),
    }


OBJECTIVES = {
    "me1": lambda t: matrix_entropy_objective(t, 1),
    "me2": lambda t: matrix_entropy_objective(t, 2),
    "vendi1": lambda t: vendi_entropy_objective(t, 1.0),
    "vendi2": lambda t: vendi_entropy_objective(t, 2.0),
    "vendi_inf": lambda t: vendi_entropy_objective(t, math.inf),
}


@pytest.mark.parametrize("case", sorted(_degenerate_inputs()))
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_degenerate_gradients_are_finite_and_match_finite_differences(case, name):
    fn = OBJECTIVES[name]
    x = _degenerate_inputs()[case].requires_grad_()
    value = fn(x)
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    if name == "vendi_inf" and case in ("repeated", "duplicates", "rank_one"):
        return  # max of a repeated top eigenvalue: not differentiable, only a finite subgradient is promised
    direction = _x(*x.shape, seed=99)
    direction = direction / direction.norm()
    h = 1e-6
    with torch.no_grad():
        fd = (fn(x + h * direction) - fn(x - h * direction)) / (2 * h)
    assert float((grad * direction).sum()) == pytest.approx(float(fd), abs=2e-4, rel=1e-3)


@pytest.mark.parametrize("order", [1, 2])
def test_identical_rows_give_zero_with_zero_gradient(order):
    x = torch.ones(5, 4, dtype=torch.float64).mul(3.0).requires_grad_()
    h = matrix_entropy_objective(x, order)
    h.backward()
    assert float(h.detach()) == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_mmcr_degenerate_views_have_finite_gradients():
    z = torch.zeros(4, 3, 5, dtype=torch.float64)
    z[:, :, 0] = 1.0  # every view identical: C rank 1, zero singular values everywhere else
    z[0, 1] = 0.0  # one zero view
    z.requires_grad_()
    loss = mmcr_objective(z, 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()


def test_zero_eigenvalue_clamp_gives_zero_gradient_to_clamped_modes():
    p = torch.tensor([0.5, 0.5, 0.0, 1e-12], dtype=torch.float64, requires_grad=True)
    h = spectral_entropy_objective(p, 1.0)
    h.backward()
    assert float(h.detach()) == pytest.approx(math.log(2))
    assert p.grad[2] == 0 and p.grad[3] == 0 and torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------------------------------- properties


@settings(max_examples=30)
@given(
    n=st.integers(0, 6),
    d=st.integers(0, 6),
    dtype=st.sampled_from(DTYPES),
    which=st.sampled_from(["me1", "me2", "vendi1", "vendi2"]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_dtype_gives_a_bounded_value_and_finite_gradient(n, d, dtype, which, seed):
    x = (_x(n, d, seed=seed).to(dtype)).requires_grad_()
    outcome, value = call(OBJECTIVES[which], x)
    assert outcome == "ok", value
    assert value.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    top = math.log(max(min(n, d), 1))
    assert -1e-5 <= float(value.detach()) <= top + 1e-4
    (grad,) = torch.autograd.grad(value, x)
    assert torch.isfinite(grad).all()


@settings(max_examples=20)
@given(n=st.integers(2, 6), d=st.integers(1, 6), row=st.integers(0, 5), bad=st.sampled_from([NAN, math.inf]))
def test_non_finite_data_gives_nan_and_finite_zero_gradient(n, d, row, bad):
    x = _x(n, d)
    x[row % n, 0] = bad
    x.requires_grad_()
    for fn in OBJECTIVES.values():
        value = fn(x)
        assert math.isnan(float(value.detach()))
        (grad,) = torch.autograd.grad(value, x)
        assert torch.isfinite(grad).all()
    z = x[: (n // 2) * 2].reshape(-1, 2, d)
    if z.shape[0] and not torch.isfinite(z).all():
        assert math.isnan(float(mmcr_objective(z, 0.5).detach()))


@settings(max_examples=20)
@given(n=st.integers(0, 5), k=st.integers(1, 4), d=st.integers(0, 5), dtype=st.sampled_from(DTYPES))
def test_mmcr_any_shape_and_dtype(n, k, d, dtype):
    z = _x(n * k, d).to(dtype).reshape(n, k, d).requires_grad_()
    loss = mmcr_objective(z, 0.5)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert -math.sqrt(max(n * min(n, d), 0)) - 1e-3 <= float(loss.detach())
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all()


@settings(max_examples=20)
@given(n=st.integers(2, 8), d=st.integers(2, 8), scale=st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]))
def test_scale_free_in_float32(n, d, scale):
    x = _x(n, d, seed=n * d)
    for order in (1, 2):
        ref = float(matrix_entropy_objective(x, order))
        got = float(matrix_entropy_objective((x * scale).float(), order))
        assert got == pytest.approx(ref, abs=1e-4)


def test_bad_arguments_are_refused():
    x = _x(4, 3)
    for bad in (
        lambda: matrix_entropy_objective(x, 3),
        lambda: matrix_entropy_objective(x[0], 1),
        lambda: matrix_entropy_objective(x.long(), 1),
        lambda: matrix_entropy_objective(x, 1, eps=0.0),
        lambda: vendi_entropy_objective(x, 0.0),
        lambda: vendi_entropy_objective(x, -1.0),
        lambda: mmcr_objective(x, 0.0),
        lambda: mmcr_objective(x.reshape(2, 2, 3), -1.0),
        lambda: mmcr_views(x, 3),
        lambda: mmcr_views(x, 2, "views_first"),
        lambda: matrix_entropy_objective(x[:, :1], 1, normalized=True),
    ):
        with pytest.raises(EntrotrainError):
            bad()
