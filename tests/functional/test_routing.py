"""entrotrain.functional.routing: Tsallis entropy against a float64 closed form, its q -> 1 limit, gradients,
dtypes and non-finite rows; router statistics against a float64 brute force."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.routing import (
    SHANNON_TOLERANCE,
    tsallis_entropy,
    tsallis_entropy_from_logits,
)
from tests.helpers.contracts import DTYPES, INF, NAN, call


def tsallis64(p: torch.Tensor, q: float, eps: float = 0.0) -> torch.Tensor:
    """Closed form in float64, literally as written in DynMoLE: (1 - Σ (p+eps)^q) / (q - 1); Shannon at q = 1."""
    p = p.double() + eps
    if q == 1.0:
        return -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(-1)
    return (1.0 - (p**q).sum(-1)) / (q - 1.0)


def smax64(n: int, q: float) -> float:
    return math.log(n) if q == 1.0 else (1.0 - n ** (1.0 - q)) / (q - 1.0)


def _probs(rows: int, n: int, seed: int, zeros: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, n, generator=g, dtype=torch.float64) * 2
    if zeros:
        z[:, 0] = -INF
    return torch.softmax(z, -1)


@pytest.mark.parametrize("q", [0.5, 0.9, 1.0, 1.1, 1.5, 2.0, 3.0])
@pytest.mark.parametrize("eps", [0.0, 1e-5])
def test_tsallis_matches_closed_form(q, eps):
    p = _probs(16, 6, seed=1)
    got = tsallis_entropy(p, q, eps=eps)
    torch.testing.assert_close(got, tsallis64(p, q, eps), rtol=1e-10, atol=1e-12)
    got32 = tsallis_entropy(p.float(), q, eps=eps)
    torch.testing.assert_close(got32.double(), tsallis64(p, q, eps), rtol=1e-4, atol=1e-5)
    norm = tsallis_entropy(p, q, eps=eps, normalize=True)
    torch.testing.assert_close(norm, tsallis64(p, q, eps) / smax64(6, q), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("q", [0.5, 1.0, 1.1, 2.0])
def test_uniform_is_maximum_and_one_hot_is_zero(q):
    n = 5
    uni = torch.full((n,), 1.0 / n, dtype=torch.float64)
    assert tsallis_entropy(uni, q, normalize=True).item() == pytest.approx(1.0, abs=1e-12)
    assert tsallis_entropy(uni, q).item() == pytest.approx(smax64(n, q), rel=1e-12)
    hot = torch.zeros(n, dtype=torch.float64)
    hot[2] = 1
    assert tsallis_entropy(hot, q).item() == 0.0
    p = _probs(32, n, seed=3)
    assert bool((tsallis_entropy(p, q, normalize=True) <= 1 + 1e-12).all())


def test_q_to_one_limit_is_shannon_and_continuous():
    p = _probs(8, 7, seed=2)
    shannon = tsallis64(p, 1.0)
    second = 0.5 * (p * torch.log(p) ** 2).sum(-1)  # S_q ≈ H - (q-1)/2 Σ p ln² p
    for delta in (1e-2, 1e-3, 1e-4, 1e-5, 2 * SHANNON_TOLERANCE):
        for sign in (1, -1):
            got = tsallis_entropy(p, 1 + sign * delta)
            torch.testing.assert_close(got, shannon - sign * delta * second, rtol=0, atol=10 * delta**2 + 1e-12)
    inside = tsallis_entropy(p, 1 + 0.5 * SHANNON_TOLERANCE)
    outside = tsallis_entropy(p, 1 + 1.5 * SHANNON_TOLERANCE)
    assert float((inside - outside).abs().max()) < 2 * SHANNON_TOLERANCE * float(second.max()) + 1e-12
    # float32 keeps its digits near q = 1 (no 1 - Σp^q cancellation)
    got32 = tsallis_entropy(p.float(), 1 + 1e-5).double()
    torch.testing.assert_close(got32, shannon - 1e-5 * second, rtol=1e-5, atol=1e-6)
    # normalised by ln N in the limit
    torch.testing.assert_close(tsallis_entropy(p, 1.0, normalize=True), shannon / math.log(7))


def test_base_divides_and_normalize_ignores_it():
    p = _probs(4, 3, seed=4)
    torch.testing.assert_close(tsallis_entropy(p, 1.0, base=2.0), tsallis64(p, 1.0) / math.log(2))
    torch.testing.assert_close(tsallis_entropy(p, 1.5, base=2.0, normalize=True), tsallis_entropy(p, 1.5, normalize=True))


@pytest.mark.parametrize("q", [0.5, 1.0, 1.1, 2.0])
def test_gradient_matches_float64_and_is_finite_at_zero(q):
    p = _probs(6, 5, seed=5, zeros=True).requires_grad_(True)  # column 0 is exactly 0
    tsallis_entropy(p, q).sum().backward()
    grad = p.grad
    assert bool(torch.isfinite(grad).all())
    pd = p.detach()
    expected = -torch.log(pd[:, 1:]) - 1 if q == 1.0 else (1 - q * pd[:, 1:] ** (q - 1)) / (q - 1)
    torch.testing.assert_close(grad[:, 1:], expected)
    at_zero = 1 / (q - 1) if q > 1 else 0.0
    torch.testing.assert_close(grad[:, 0], torch.full((6,), at_zero, dtype=torch.float64))


@settings(max_examples=20)
@given(q=st.floats(1.01, 8.0), n_zero=st.integers(1, 3))
def test_gradient_at_an_exact_zero_is_one_over_q_minus_one_for_every_order_above_one(q, n_zero):
    """The one-sided derivative of p - p^q at p = 0, on every torch: it must not ride on an op's gradient at a
    boundary (clamp_min(0) at x = 0 backprops 1 on torch 2.13 and 0 on torch 2.14, which zeroed it there)."""
    p = torch.cat([torch.zeros(2, n_zero, dtype=torch.float64), _probs(2, 4, seed=7)], dim=1).requires_grad_(True)
    tsallis_entropy(p, q).sum().backward()
    torch.testing.assert_close(p.grad[:, :n_zero], torch.full((2, n_zero), 1 / (q - 1), dtype=torch.float64))
    # negative entries (not probabilities): value 0 and gradient 0, as before
    neg = torch.tensor([[-0.25, 0.5, 0.75]], dtype=torch.float64, requires_grad=True)
    tsallis_entropy(neg, q).sum().backward()
    assert float(neg.grad[0, 0]) == 0.0


@pytest.mark.parametrize("q", [0.5, 1.0, 1.1, 2.0])
def test_from_logits_matches_and_gradcheck(q):
    g = torch.Generator().manual_seed(6)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(tsallis_entropy_from_logits(z, q), tsallis64(torch.softmax(z, -1), q))
    assert torch.autograd.gradcheck(lambda x: tsallis_entropy_from_logits(x, q, normalize=True), (z,))
    # -inf logits are absent experts: value as without them, finite gradient
    zi = z.detach().clone()
    zi[:, 0] = -INF
    zi.requires_grad_(True)
    out = tsallis_entropy_from_logits(zi, q)
    torch.testing.assert_close(out, tsallis64(torch.softmax(zi.detach()[:, 1:], -1), q))
    out.sum().backward()
    assert bool(torch.isfinite(zi.grad).all())
    # eps goes through the probability path (DynMoLE)
    torch.testing.assert_close(
        tsallis_entropy_from_logits(z, q, eps=1e-5), tsallis64(torch.softmax(z.detach(), -1), q, 1e-5)
    )


@pytest.mark.parametrize("q", [0.5, 0.9, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_from_logits_with_a_far_expert_and_order_below_one_is_finite(q, dtype):
    """q < 1 and an expert ~300 nats below the top (finite logits): e^ℓ·expm1((q-1)ℓ) was 0·inf = NaN (in float32
    already at ~100 nats), value and gradient; now p^q - p is taken as e^{qℓ}·(1 - e^{(1-q)ℓ}) there."""
    z = torch.tensor([[0.0, -300.0, 1.0, -50.0], [2.0, -1e20, 0.5, 0.0]], dtype=dtype, requires_grad=True)
    out = tsallis_entropy_from_logits(z, q)
    want = tsallis64(torch.softmax(z.detach().double(), -1), q)
    torch.testing.assert_close(out.double(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    out.sum().backward()
    assert bool(torch.isfinite(z.grad).all()), z.grad
    first = z.detach()[:1].double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: tsallis_entropy_from_logits(x, q), (first,))


def test_dim_and_half_precision():
    p = _probs(6, 4, seed=7)
    torch.testing.assert_close(tsallis_entropy(p.T.contiguous(), 1.3, dim=0), tsallis64(p, 1.3))
    z = torch.randn(6, 4, dtype=torch.float64)
    out = tsallis_entropy_from_logits(z.to(torch.bfloat16), 1.1)
    assert out.dtype == torch.float32
    expected = tsallis64(torch.softmax(z.to(torch.bfloat16).double(), -1), 1.1)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_width_one_and_empty():
    one = torch.ones(3, 1)
    assert tsallis_entropy(one, 1.1, normalize=True).tolist() == [0.0, 0.0, 0.0]
    assert tsallis_entropy_from_logits(torch.randn(3, 1), 1.0, normalize=True).tolist() == [0.0, 0.0, 0.0]
    assert tsallis_entropy(torch.zeros(0, 4), 1.1).shape == (0,)
    assert tsallis_entropy(torch.zeros(2, 0), 1.1, normalize=True).tolist() == [0.0, 0.0]
    assert tsallis_entropy_from_logits(torch.zeros(2, 0), 1.1).tolist() == [0.0, 0.0]


def test_nonfinite_rows_stay_in_their_row():
    p = _probs(4, 3, seed=8).float()
    p[1, 0] = NAN
    p[2, 1] = INF
    for fn in (tsallis_entropy, tsallis_entropy_from_logits):
        for q in (0.5, 1.0, 1.1):
            out = fn(p, q)
            assert torch.isfinite(out[[0, 3]]).all() and not torch.isfinite(out[[1, 2]]).any()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"q": 0.0},
        {"q": -1.0},
        {"q": NAN},
        {"q": INF},
        {"q": True},
        {"eps": -1e-3},
        {"eps": NAN},
        {"base": 1.0},
        {"base": 0.0},
        {"normalize": 1},
        {"dim": 2},
    ],
)
def test_bad_parameters_are_refused(kwargs):
    for fn in (tsallis_entropy, tsallis_entropy_from_logits):
        with pytest.raises(EntrotrainError):
            fn(torch.full((2, 3), 1 / 3), **kwargs)
    with pytest.raises(EntrotrainError):
        tsallis_entropy(torch.ones(3, dtype=torch.long))
    with pytest.raises(EntrotrainError):
        tsallis_entropy(torch.tensor(1.0))


@settings(max_examples=30)
@given(
    rows=st.integers(0, 4),
    n=st.integers(0, 6),
    q=st.sampled_from([0.3, 0.999, 1.0, 1.0 + 1e-7, 1.1, 2.0, 4.0]),
    dtype=st.sampled_from(DTYPES),
    normalize=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_finite_bounded_and_close_to_float64(rows, n, q, dtype, normalize, seed):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, n, generator=g) * 3).to(dtype)
    status, out = call(tsallis_entropy_from_logits, z, q, normalize=normalize)
    assert status == "ok"
    assert out.shape == (rows,) and bool(torch.isfinite(out).all())
    assert bool((out >= -1e-5).all())
    if n > 0 and rows > 0:
        qq = 1.0 if abs(q - 1) < SHANNON_TOLERANCE else q
        ref = tsallis64(torch.softmax(z.double(), -1), qq)
        if normalize:
            ref = ref / smax64(n, qq) if n > 1 else ref * 0
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)
        p = torch.softmax(z.float(), -1).to(dtype)
        status, from_p = call(tsallis_entropy, p, q, normalize=normalize)
        assert status == "ok" and bool(torch.isfinite(from_p).all())


# ------------------------------------------------------------------------------------------------ router statistics
from entrotrain.functional.routing import RouterSums, router_statistics, router_values  # noqa: E402
from tests.helpers.router_reference import router_reference  # noqa: E402

_SCALARS = ("entropy", "entropy_norm", "tsallis", "load_entropy", "load_entropy_norm", "dead_frac", "top1_margin", "topk_margin")


def assert_matches_reference(values, ref, atol=1e-9):
    assert float(values.rows) == ref["rows"] and float(values.nonfinite) == ref["nonfinite"]
    if ref["rows"] == 0:
        for name in _SCALARS:
            assert math.isnan(float(getattr(values, name))), name
        return
    for name in _SCALARS:
        assert float(getattr(values, name)) == pytest.approx(ref[name], abs=atol), name
    torch.testing.assert_close(values.load.cpu(), torch.tensor(ref["load"], dtype=torch.float64), atol=atol, rtol=0)
    torch.testing.assert_close(
        values.importance.cpu(), torch.tensor(ref["importance"], dtype=torch.float64), atol=atol, rtol=0
    )


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("q", [1.0, 1.1, 2.0])
def test_router_statistics_match_brute_force(top_k, q):
    g = torch.Generator().manual_seed(top_k)
    z = torch.randn(24, 4, generator=g, dtype=torch.float64) * 2
    mask = torch.ones(24, dtype=torch.long)
    mask[[3, 7, 20]] = 0
    values = router_values(router_statistics(z, top_k, mask=mask, q=q))
    assert_matches_reference(values, router_reference(z, top_k, mask, q=q))
    assert float(values.load.sum()) == pytest.approx(1.0) and float(values.importance.sum()) == pytest.approx(1.0)


def test_mask_shapes_and_conventions():
    z = torch.randn(2, 5, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    a = router_statistics(z, 2, mask=mask)
    b = router_statistics(z.reshape(10, 6), 2, mask=mask.bool().reshape(-1))
    c = router_statistics(z.reshape(10, 6)[mask.reshape(-1).bool()], 2)
    for x, y, w in zip(a, b, c):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, w)
    assert float(a.rows) == 7
    with pytest.raises(EntrotrainError, match="rows"):
        router_statistics(z, 2, mask=torch.ones(9, dtype=torch.bool))
    with pytest.raises(EntrotrainError):
        router_statistics(z, 2, mask=mask.float())
    with pytest.raises(EntrotrainError):
        router_statistics(z, 2, mask=mask * 2)


def test_dead_experts_and_threshold():
    z = torch.full((30, 5), -10.0)
    z[:, 0] = 5.0
    z[:20, 1] = 4.0  # expert 1: 20 of 30 second choices
    z[20:, 2] = 4.0  # expert 2: 10
    z[0, 3] = 6.0  # expert 3: one row (top-1) -> 1 / 60 share
    s = router_statistics(z, 2)
    v = router_values(s)
    assert float(v.dead_frac) == pytest.approx(1 / 5)  # only expert 4 has no assignment
    ref = router_reference(z, 2, dead_threshold=0.05)
    assert float(router_values(s, dead_threshold=0.05).dead_frac) == pytest.approx(ref["dead_frac"]) == 2 / 5
    with pytest.raises(EntrotrainError):
        router_values(s, dead_threshold=-0.1)


def test_sums_merge_exactly_and_round_trip():
    z = torch.randn(40, 6, dtype=torch.float64)
    whole = router_statistics(z, 2)
    parts = router_statistics(z[:13], 2).merged(router_statistics(z[13:], 2))
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b)
    back = RouterSums.from_flat(whole.flat(), 6)
    for a, b in zip(whole, back):
        assert torch.equal(a, b)
    with pytest.raises(EntrotrainError):
        RouterSums.from_flat(whole.flat(), 5)
    with pytest.raises(EntrotrainError):
        whole.merged(router_statistics(torch.randn(3, 4), 1))


def test_nonfinite_rows_are_counted_and_skipped():
    z = torch.randn(10, 4)
    z[2, 1] = NAN
    z[5, 0] = INF
    z[7, 3] = -INF  # a -inf logit is a non-finite row too (counted, skipped)
    mask = torch.ones(10, dtype=torch.bool)
    mask[5] = False  # a masked non-finite row is padding: neither counted nor used
    v = router_values(router_statistics(z, 2, mask=mask))
    assert float(v.nonfinite) == 2 and float(v.rows) == 7
    assert_matches_reference(v, router_reference(z, 2, mask), atol=1e-6)
    assert all(math.isfinite(float(getattr(v, n))) for n in _SCALARS)


def test_single_expert_zero_rows_and_all_masked():
    v = router_values(router_statistics(torch.randn(5, 1), 1))
    assert float(v.entropy_norm) == 0 and float(v.load_entropy_norm) == 0 and float(v.top1_margin) == 1.0
    assert float(v.topk_margin) == 1.0 and float(v.dead_frac) == 0
    for z, mask in ((torch.zeros(0, 4), None), (torch.randn(6, 4), torch.zeros(6, dtype=torch.bool))):
        s = router_statistics(z, 2, mask=mask)
        assert float(s.rows) == 0 and float(s.load_counts.sum()) == 0
        assert_matches_reference(router_values(s), {"rows": 0, "nonfinite": 0})


@pytest.mark.parametrize("kwargs", [{"top_k": 0}, {"top_k": 5}, {"top_k": 2.0}, {"top_k": 2, "q": 0.0}])
def test_router_bad_parameters(kwargs):
    with pytest.raises(EntrotrainError):
        router_statistics(torch.randn(3, 4), **kwargs)
    with pytest.raises(EntrotrainError):
        router_statistics(torch.randn(3, 0), 1)
    with pytest.raises(EntrotrainError):
        router_statistics(torch.randn(4), 1)
    with pytest.raises(EntrotrainError):
        router_statistics(torch.randint(0, 3, (3, 4)), 1)


@settings(max_examples=25)
@given(
    rows=st.integers(0, 12),
    n_experts=st.integers(1, 6),
    k=st.integers(1, 6),
    dtype=st.sampled_from(DTYPES),
    masked=st.booleans(),
    bad_rows=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_property_router_statistics(rows, n_experts, k, dtype, masked, bad_rows, seed):
    k = min(k, n_experts)
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(rows, n_experts, generator=g) * 3).to(dtype)
    for r in range(min(bad_rows, rows)):
        z[r, r % n_experts] = NAN if r % 2 == 0 else INF
    mask = (torch.rand(rows, generator=g) > 0.3) if masked else None
    status, sums = call(router_statistics, z, k, mask=mask)
    assert status == "ok"
    values = router_values(sums)
    # the reference sees what the function sees: half-precision logits widened, top-k on float32 probabilities
    ref = router_reference(z.float() if dtype != torch.float64 else z, k, mask)
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    assert_matches_reference(values, ref, atol=tol)


@settings(max_examples=25)
@given(
    rows=st.integers(0, 12),
    n_experts=st.integers(1, 6),
    k=st.integers(1, 6),
    q=st.sampled_from([1.0, 1.1, 2.0]),
    masked=st.booleans(),
    bad_rows=st.integers(0, 2),
    seed=st.integers(0, 2**16),
    scoring=st.sampled_from(["sigmoid", "sqrtsoftplus"]),
)
def test_property_scoring_is_of_the_normalised_scores(rows, n_experts, k, q, masked, bad_rows, seed, scoring):
    """scoring='sigmoid' (DeepSeek-V3) / 'sqrtsoftplus' (DeepSeek-V4): every statistic is of the scores s(z) / sum
    s(z), as a float64 loop has it."""
    k = min(k, n_experts)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, n_experts, generator=g, dtype=torch.float64) * 4
    for r in range(min(bad_rows, rows)):
        z[r, r % n_experts] = NAN if r % 2 == 0 else INF
    mask = (torch.rand(rows, generator=g) > 0.3) if masked else None
    status, sums = call(router_statistics, z, k, mask=mask, q=q, scoring=scoring)
    assert status == "ok"
    assert_matches_reference(router_values(sums), router_reference(z, k, mask, q=q, scoring=scoring), atol=1e-9)


def test_sigmoid_scoring_differs_from_softmax_and_a_bad_scoring_is_refused():
    z = torch.tensor([[3.0, 1.0, -2.0, 0.0]], dtype=torch.float64)
    soft, sig = (router_values(router_statistics(z, 2, scoring=s)) for s in ("softmax", "sigmoid"))
    p = torch.sigmoid(z) / torch.sigmoid(z).sum()
    assert float(sig.entropy) == pytest.approx(float(-(p * p.log()).sum()), abs=1e-12)
    assert abs(float(sig.entropy) - float(soft.entropy)) > 0.3
    with pytest.raises(EntrotrainError, match="scoring"):
        router_statistics(z, 2, scoring="sparsemax")
    far = torch.tensor([[-1e4, -100.0, 0.0, 80.0]])  # float32: no log(0), no overflow on either side
    for scoring in ("sigmoid", "sqrtsoftplus"):
        values = router_values(router_statistics(far, 2, scoring=scoring))
        assert all(math.isfinite(float(getattr(values, f))) for f in _SCALARS), scoring
        ref = router_reference(far.double().clamp_min(-700), 2, scoring=scoring)
        assert float(values.entropy) == pytest.approx(ref["entropy"], abs=1e-5), scoring
