"""Trust under failure for the MoE router maths (routing.py, router_losses.py): any input gives the documented
finite value (NaN only where documented: a row holding NaN/Inf, or router means over no row) or an EntrotrainError
naming the argument — never a raw torch / Python error; losses on empty or all-masked input are 0 with a zero
gradient, and gradients are finite on finite input.

Scenario tests first (each failed before its fix), then hypothesis properties over shapes (0-sized included), dtypes
(half, integer, bool), dims, masks (bool, 0/1 int, float, all-False, wrong size), NaN/Inf placements, uniform and
one-hot rows and parameter values at and beyond their bounds.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.router_losses import (
    dynmole_router_loss,
    dynmole_routing,
    load_balancing_loss,
    router_z_loss,
)
from entrotrain.functional.routing import (
    router_statistics,
    router_values,
    tsallis_entropy,
    tsallis_entropy_from_logits,
    tsallis_max,
)
from tests.helpers.contracts import DTYPES, INF, NAN, call

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------ scenarios (each failed before its fix)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_z_loss_of_finite_logits_beyond_float32_is_inf_with_a_finite_gradient(dtype):
    """lse ≈ 2e19: (lse)² = 4e38 > float32's max. The loss is +inf (its value, never NaN), with no host sync, and
    its gradient 2·lse·p/T stays finite; float64 logits compute it; a masked row of such logits takes no part; NaN
    logits stay data (a NaN loss)."""
    z = torch.tensor([[2e19, 0.0], [1.0, 0.0]], dtype=dtype, requires_grad=True)
    loss = router_z_loss(z)
    assert loss.dtype == torch.float32 and float(loss.detach()) == math.inf
    loss.backward()
    assert torch.isfinite(z.grad).all() and float(z.grad[0, 0]) > 1e18
    assert float(router_z_loss(z.detach().double())) == pytest.approx((2e19**2 + math.log1p(math.e) ** 2) / 2, rel=1e-2)
    assert math.isfinite(float(router_z_loss(z.detach(), mask=torch.tensor([False, True]))))
    assert math.isnan(float(router_z_loss(torch.tensor([[NAN, 0.0]]))))


@pytest.mark.parametrize(
    "args, match",
    [
        ((8, "a"), "q"),  # TypeError before
        ((8, NAN), "q"),  # NaN before
        ((8, 0.0), "q"),  # a value before: q must be > 0
        ((2.5, 1.1), "n"),  # a value for a fractional expert count before
        ((10**400, 0.5), "n"),  # OverflowError (math range error) before
        ((True, 1.1), "n"),
    ],
)
def test_tsallis_max_validates_its_arguments(args, match):
    with pytest.raises(EntrotrainError, match=match):
        tsallis_max(*args)


@pytest.mark.parametrize(
    "call_",
    [
        lambda q: tsallis_entropy(torch.tensor([0.3, 0.7]), q, normalize=True),  # NaN before (1/(q-1) underflows)
        lambda q: tsallis_entropy(torch.tensor([1.0, 0.0]), q),  # NaN before: (q-1)·ln 1 = inf·0
        lambda q: tsallis_entropy_from_logits(torch.randn(3, 4), q, normalize=True),  # NaN before
        lambda q: router_statistics(torch.randn(3, 4), 1, q=q),
        lambda q: dynmole_router_loss(torch.randn(3, 4), q=q),
    ],
)
def test_orders_beyond_float32_range_are_refused(call_):
    with pytest.raises(EntrotrainError, match=r"q must be in \(0.0, 1e\+30\]"):
        call_(1e300)
    out = call_(1e30)  # the largest accepted order (routing.MAX_ORDER) gives finite values
    values = out if isinstance(out, torch.Tensor) else out.entropy
    assert torch.isfinite(values).all()


@pytest.mark.parametrize(
    "call_",
    [
        lambda eps: tsallis_entropy(torch.tensor([0.3, 0.7]), 0.5, eps=eps),  # NaN before (p + 1e300 = inf)
        lambda eps: tsallis_entropy_from_logits(torch.randn(3, 4), 2.0, eps=eps),  # -inf before
        lambda eps: dynmole_routing(torch.softmax(torch.randn(3, 4), -1), eps=eps),
        lambda eps: dynmole_router_loss(torch.randn(3, 4), eps=eps),
    ],
)
def test_probability_offsets_above_one_are_refused(call_):
    with pytest.raises(EntrotrainError, match=r"eps must be in \[0.0, 1.0\]"):
        call_(1e300)
    out = call_(1.0)
    assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()


# ------------------------------------------------------------------ property tests

_ALL_DTYPES = DTYPES + (torch.int64, torch.bool)
_ORDERS = st.sampled_from([1.0, 1.1, 2.0, 0.5, 1e-6, 1.0 + 1e-7, 7.0, 1e30])
TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _tsallis64(p: torch.Tensor, q: float) -> torch.Tensor:
    """Brute force along the last dim in float64: ``(1 − Σ p^q)/(q − 1)``, Shannon at q = 1 (0 ln 0 = 0); an empty
    dim gives 0 (documented)."""
    p = p.double()
    if p.shape[-1] == 0:
        return p.sum(-1)
    if abs(q - 1.0) < 1e-6:
        return -torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p)).sum(-1)
    return (1.0 - torch.where(p > 0, p.clamp_min(0).pow(q), torch.zeros_like(p)).sum(-1)) / (q - 1.0)


@st.composite
def probs_case(draw):
    rows, width = draw(st.integers(0, 4)), draw(st.integers(0, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["random", "uniform", "one_hot", "nonfinite"]))
    p = torch.softmax(torch.randn(rows, width, generator=g, dtype=torch.float64) * 3, -1)
    if kind == "uniform" and width:
        p[:] = 1.0 / width
    elif kind == "one_hot" and width:
        p.zero_()[:, 0] = 1.0
    elif kind == "nonfinite" and p.numel():
        p.view(-1)[draw(st.integers(0, p.numel() - 1))] = draw(st.sampled_from([NAN, INF]))
    dtype = draw(st.sampled_from(_ALL_DTYPES))
    p = p.to(dtype)
    transpose = draw(st.booleans())
    return (p.t() if transpose else p), (0 if transpose else -1), kind, dtype


@settings(max_examples=60, deadline=None)
@given(probs_case(), _ORDERS, st.sampled_from([0.0, 1e-5, 1.0]), st.booleans(), st.sampled_from([math.e, 2.0]))
def test_tsallis_entropy_contract(case, q, eps, normalize, base):
    p, dim, kind, dtype = case
    status, out = call(tsallis_entropy, p, q, dim=dim, normalize=normalize, eps=eps, base=base)
    if not dtype.is_floating_point:
        assert status == "error" and "probs must be a floating-point tensor" in str(out)
        return
    assert status == "ok", out
    rows = p.movedim(dim, -1)
    assert out.shape == rows.shape[:-1]
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    row_finite = torch.isfinite(rows.double()).all(-1)
    if eps > 0 and q > 1e6:
        return  # (p + eps)^q overflows: the literal DynMoLE value is -inf (documented)
    assert torch.isfinite(out[row_finite]).all(), f"finite rows gave {out}"
    assert not torch.isfinite(out[~row_finite]).any(), "a row holding NaN/Inf must not look finite"
    n = rows.shape[-1]
    if eps == 0.0 and row_finite.any():
        want = _tsallis64(rows[row_finite].double(), q)
        scale = (tsallis_max(n, q) if n > 1 else 1.0) if normalize else math.log(base)
        want = want / scale if (not normalize or n > 1) else want * 0
        tol = TOL[dtype] * max(1.0, abs(1.0 / (q - 1.0)) if abs(q - 1) > 1e-6 else 1.0)
        torch.testing.assert_close(out[row_finite].double(), want, atol=tol, rtol=TOL[dtype])
        if kind == "one_hot":
            assert (out[row_finite] == 0).all()
        if kind == "uniform" and normalize and n > 1 and q < 1e6:
            torch.testing.assert_close(out.double(), torch.ones_like(out.double()), atol=tol, rtol=TOL[dtype])


@settings(max_examples=30, deadline=None)
@given(probs_case(), _ORDERS)
def test_tsallis_gradients_are_finite_on_finite_rows(case, q):
    p, dim, _, dtype = case
    if dtype not in (torch.float32, torch.float64) or not bool(torch.isfinite(p).all()):
        return
    for fn, x in ((tsallis_entropy, p), (tsallis_entropy_from_logits, p.clamp_min(1e-30).log())):
        x = x.detach().clone().requires_grad_()
        fn(x, q, dim=dim, normalize=True).sum().backward()
        assert torch.isfinite(x.grad).all(), f"{fn.__name__}: {x.grad}"


@settings(max_examples=40, deadline=None)
@given(probs_case(), _ORDERS, st.booleans())
def test_tsallis_from_logits_equals_tsallis_of_the_softmax(case, q, normalize):
    p, dim, kind, dtype = case
    if not dtype.is_floating_point:
        assert call(tsallis_entropy_from_logits, p, q)[0] == "error"
        return
    z = p.double().clamp_min(0).log().to(dtype) if kind != "nonfinite" else p  # -inf logits: absent experts
    status, out = call(tsallis_entropy_from_logits, z, q, dim=dim, normalize=normalize)
    assert status == "ok", out
    rows = z.movedim(dim, -1).double()
    ok = torch.isfinite(torch.softmax(rows, -1)).all(-1) & (rows.shape[-1] > 0)
    if ok.any():
        want = tsallis_entropy(torch.softmax(rows[ok], -1), q, normalize=normalize)
        torch.testing.assert_close(out[ok].double(), want, atol=TOL[dtype] * 10, rtol=TOL[dtype] * 10)


@st.composite
def router_case(draw):
    rows, experts = draw(st.integers(0, 6)), draw(st.integers(0, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([0.1, 3.0, 30.0, 1e20]))  # 1e20: finite, but the z-loss's lse² overflows float32
    z = torch.randn(rows, experts, generator=g, dtype=torch.float64) * scale
    if z.numel() and draw(st.booleans()):
        z[draw(st.integers(0, rows - 1))] = draw(st.sampled_from([NAN, INF, -INF]))
    dtype = draw(st.sampled_from(_ALL_DTYPES))
    z = z.to(dtype)
    mask_kind = draw(st.sampled_from(["none", "bool", "all_false", "int", "float", "wrong_size"]))
    mask = {
        "none": None,
        "bool": torch.rand(rows, generator=g) < 0.6,
        "all_false": torch.zeros(rows, dtype=torch.bool),
        "int": (torch.rand(rows, generator=g) < 0.6).long(),
        "float": torch.ones(rows),
        "wrong_size": torch.ones(rows + 1, dtype=torch.bool),
    }[mask_kind]
    return z, mask, mask_kind


def _invalid_router_input(z, mask_kind) -> bool:
    return not z.dtype.is_floating_point or z.shape[-1] == 0 or mask_kind in ("float", "wrong_size")


@settings(max_examples=60, deadline=None)
@given(router_case(), st.integers(0, 5), _ORDERS, st.sampled_from([0.0, 0.1, 1.0, 1.5, NAN]))
def test_router_statistics_and_values_contract(case, top_k, q, dead_threshold):
    z, mask, mask_kind = case
    status, sums = call(router_statistics, z, top_k, mask=mask, q=q)
    if _invalid_router_input(z, mask_kind) or not 1 <= top_k <= z.shape[-1]:
        assert status == "error", f"accepted: dtype={z.dtype} E={z.shape[-1]} mask={mask_kind} top_k={top_k}"
        return
    assert status == "ok", sums
    keep = torch.ones(z.shape[0], dtype=torch.bool) if mask is None else mask.bool()
    finite = torch.isfinite(z.double()).all(-1)
    assert float(sums.rows) == int((keep & finite).sum()) and float(sums.nonfinite) == int((keep & ~finite).sum())
    assert all(bool(torch.isfinite(f).all()) for f in sums), "router sums must be finite (bad rows are skipped)"
    assert float(sums.load_counts.sum()) == top_k * float(sums.rows)
    status, values = call(router_values, sums, dead_threshold=dead_threshold)
    if not 0.0 <= dead_threshold <= 1.0:
        assert status == "error" and "dead_threshold" in str(values)
        return
    means = [values.entropy, values.entropy_norm, values.tsallis, values.load_entropy, values.dead_frac]
    if float(sums.rows) == 0:
        assert all(bool(torch.isnan(v)) for v in means), "no row: the documented value is NaN (not computable)"
        return
    assert all(bool(torch.isfinite(v).all()) for v in values), values
    assert float(values.load.sum()) == pytest.approx(1.0) and float(values.importance.sum()) == pytest.approx(1.0)
    assert 0.0 <= float(values.dead_frac) <= 1.0
    assert -1e-6 <= float(values.entropy_norm) <= 1.0 + 1e-5 and -1e-9 <= float(values.load_entropy_norm) <= 1 + 1e-9


_LOSSES = {
    "load_balancing": lambda zs, mask: load_balancing_loss(zs, 1, mask=mask),
    "load_balancing_per_layer": lambda zs, mask: load_balancing_loss(zs, 1, mask=mask, per_layer=True, normalize=True),
    "z_loss": lambda zs, mask: router_z_loss(zs, mask=mask),
    "dynmole": lambda zs, mask: dynmole_router_loss(zs, mask=mask),
    "dynmole_q1": lambda zs, mask: dynmole_router_loss(zs, mask=mask, q=1.0, entropy_weight=1.0, aux_weight=1.0),
}


@settings(max_examples=60, deadline=None)
@given(router_case(), st.sampled_from(sorted(_LOSSES)), st.integers(1, 3))
def test_router_losses_contract(case, name, n_layers):
    z, mask, mask_kind = case
    layers = [z if i == 0 else z.flip(0) for i in range(n_layers)]
    if z.dtype in (torch.float32, torch.float64):
        layers = [x.detach().clone().requires_grad_() for x in layers]
    status, loss = call(_LOSSES[name], layers, mask)
    if _invalid_router_input(z, mask_kind):
        assert status == "error", f"accepted: dtype={z.dtype} E={z.shape[-1]} mask={mask_kind}"
        return
    assert status == "ok", loss
    value = float(loss.detach())
    overflow = name == "z_loss" and value == math.inf and z.dtype != torch.float64  # finite logits, lse² > max
    assert loss.shape == () and loss.dtype == (torch.float64 if z.dtype == torch.float64 else torch.float32)
    keep = torch.ones(z.shape[0], dtype=torch.bool) if mask is None else mask.bool()
    finite = all(bool(torch.isfinite(x.detach().double())[keep].all()) for x in layers)
    if not keep.any():  # empty or all-masked: 0 with a zero gradient (DESIGN §8)
        assert value == 0.0
    if not finite:
        return  # a NaN/Inf logit in a valid row is data: the pooled loss may be non-finite (documented)
    assert (math.isfinite(value) or overflow) and value >= 0.0, f"{name}: {value}"
    if layers[0].requires_grad:
        loss.backward()
        for x in layers:
            assert x.grad is not None and torch.isfinite(x.grad).all(), f"{name}: gradient {x.grad}"
            if not keep.any():
                assert (x.grad == 0).all()
            else:
                assert (x.grad[~keep] == 0).all(), "a masked row received a gradient"



@pytest.mark.parametrize("sums", [None, torch.zeros(8), (1, 2)])
def test_router_values_refuses_anything_but_router_sums(sums):
    with pytest.raises(EntrotrainError, match="sums must be the RouterSums"):  # AttributeError (n_experts) before
        router_values(sums)
