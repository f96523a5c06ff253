"""Trust under failure for the RL policy maths: ``token_entropy``, ``token_logprobs``, ``aggregate_loss``,
``covariance_sums`` / ``policy_covariance``, ``quantile``, ``high_entropy_mask``, ``steer_weights`` and
``linear_entropy_and_logprobs``.

Token masks: bool, integer 0/1 or float 0/1 (values checked); ``aggregate_loss`` takes a float mask as verl's
weights without reading it. Scenario tests first (each failed before its fix), then hypothesis property tests:
every call either raises :class:`EntrotrainError` or returns values that are finite where the token's input is
finite and match a float64 brute force; losses on empty / all-masked input are 0 with zero gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional import (
    AGG_MODES,
    aggregate_loss,
    covariance_sums,
    high_entropy_mask,
    linear_entropy_and_logprobs,
    policy_covariance,
    steer_weights,
    token_entropy,
    token_logprobs,
)
from entrotrain.functional.policy import quantile
from tests.helpers.reference import entropy_rows64
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)
from tests.helpers.contracts import DTYPES, INF, NAN, call

TOL = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-4, torch.float16: 2e-4}


def _batch(b=3, t=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64).to(dtype) * 3
    adv = torch.randn(b, generator=g, dtype=torch.float64).to(dtype)
    ent = torch.rand(b, t, generator=g, dtype=torch.float64).to(dtype) * 2
    mask = torch.rand(b, t, generator=g) < 0.7
    return logp, adv, ent, mask


# ------------------------------------------------------------------ scenarios (each failed before its fix)


def test_token_logprobs_label_out_of_vocabulary_names_the_range():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[0, 1, 5], [2, 3, 4]])
    with pytest.raises(EntrotrainError, match=r"token id 5.*vocabulary of 5.*\[0, 5\)"):
        token_logprobs(logits, labels)  # a raw RuntimeError from gather before


def test_token_logprobs_negative_labels_still_mean_ignored():
    logits = torch.randn(2, 5)
    out = token_logprobs(logits, torch.tensor([-100, 2]))
    assert out[0] == 0.0
    torch.testing.assert_close(out[1], torch.log_softmax(logits[1], -1)[2])


def test_linear_head_label_out_of_vocabulary_names_the_range():
    hidden, weight = torch.randn(3, 4), torch.randn(6, 4)
    with pytest.raises(EntrotrainError, match=r"token id 7.*vocabulary of 6"):
        linear_entropy_and_logprobs(hidden, weight, torch.tensor([0, 7, 1]), impl="torch")  # raw RuntimeError before


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"weight": torch.randn(0, 4)}, "V = 0"),  # IndexError from amax before
        ({"chunk_size": 2.5}, "chunk_size"),
        ({"temperature": INF}, "temperature"),  # silently ln V before
        ({"bias": torch.randn(6, dtype=torch.float64)}, "bias"),  # RuntimeError from add_ before
        ({"labels": torch.zeros(3)}, "labels"),
    ],
)
def test_linear_head_bad_arguments(kwargs, name):
    args = {"hidden": torch.randn(3, 4), "weight": torch.randn(6, 4), **kwargs}
    with pytest.raises(EntrotrainError, match=name):
        linear_entropy_and_logprobs(**args, impl="torch")


@pytest.mark.parametrize("temperature", [INF, NAN, 0.0])
def test_infinite_temperature_is_refused(temperature):
    with pytest.raises(EntrotrainError, match="temperature"):
        token_entropy(torch.randn(2, 3, 4), temperature=temperature)  # Inf gave ln V before
    with pytest.raises(EntrotrainError, match="temperature"):
        token_logprobs(torch.randn(2, 4), torch.tensor([0, 1]), temperature=temperature)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("global_denominators", [False, True])
@pytest.mark.parametrize("shape", [(3, 4), (0, 4), (3, 0), (0, 0)])
def test_aggregate_loss_on_all_masked_input_is_zero_with_zero_gradient(mode, global_denominators, shape):
    values = torch.randn(shape, dtype=torch.float64)
    values[..., :1] = NAN  # masked garbage must not leak either
    values.requires_grad_()
    mask = torch.zeros(shape, dtype=torch.bool)
    extra = {"num_tokens": 0.0, "num_sequences": torch.tensor(0.0, dtype=torch.float64)} if global_denominators else {}
    loss = aggregate_loss(values, mask, mode, **extra)  # NaN (0/0) before
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(values.grad, torch.zeros_like(values))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_loss_accepts_integer_and_float_masks_like_bool(mode):
    values, _, _, mask = _batch()
    want = aggregate_loss(values, mask, mode)
    torch.testing.assert_close(aggregate_loss(values, mask.long(), mode), want)
    torch.testing.assert_close(aggregate_loss(values, mask.float(), mode), want)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mode": "mean"}, "mode"),
        ({"dp_size": 0}, "dp_size"),
        ({"num_tokens": -1.0}, "num_tokens"),
        ({"num_tokens": NAN}, "num_tokens"),
        ({"num_sequences": torch.ones(2)}, "num_sequences"),
        ({"max_length": INF}, "max_length"),
        ({"mask": torch.ones(3, 5, dtype=torch.bool)}, "mask"),
    ],
)
def test_aggregate_loss_bad_arguments(kwargs, name):
    values, _, _, mask = _batch()
    args = {"values": values, "mask": mask, **kwargs}
    with pytest.raises(EntrotrainError, match=name):
        aggregate_loss(**args)


@pytest.mark.parametrize(
    "fn",
    [
        lambda lp, adv, ent, m: covariance_sums(lp, adv, m),
        lambda lp, adv, ent, m: policy_covariance(lp, adv, m),
        lambda lp, adv, ent, m: high_entropy_mask(ent, m),
        lambda lp, adv, ent, m: steer_weights(lp, lp, adv, ent, m),
        lambda lp, adv, ent, m: token_entropy(torch.randn(3, 4, 5), m),
    ],
    ids=["covariance_sums", "policy_covariance", "high_entropy_mask", "steer_weights", "token_entropy"],
)
def test_masks_of_the_wrong_shape_are_entrotrain_errors(fn):
    logp, adv, ent, _ = _batch()
    with pytest.raises(EntrotrainError, match=r"mask must have shape \(3, 4\)"):
        fn(logp, adv, ent, torch.ones(3, 5, dtype=torch.bool))  # raw torch errors (or a silent broadcast) before


@pytest.mark.parametrize(
    "fn",
    [
        lambda lp, adv, ent, m: covariance_sums(lp, adv, m),
        lambda lp, adv, ent, m: high_entropy_mask(ent, m),
        lambda lp, adv, ent, m: steer_weights(lp, lp, adv, ent, m),
        lambda lp, adv, ent, m: token_entropy(torch.randn(3, 4, 5), m),
    ],
    ids=["covariance_sums", "high_entropy_mask", "steer_weights", "token_entropy"],
)
def test_token_masks_must_be_zero_one(fn):
    logp, adv, ent, mask = _batch()
    with pytest.raises(EntrotrainError, match="other than 0 and 1"):
        fn(logp, adv, ent, mask.float() * 0.5)  # silently "valid" (.bool()) before
    with pytest.raises(EntrotrainError, match="other than 0 and 1"):
        fn(logp, adv, ent, mask.long() * 2)
    fn(logp, adv, ent, mask.long())  # 0/1 integer and float are fine
    fn(logp, adv, ent, mask.float())


def test_a_nan_token_does_not_poison_every_other_covariance():
    logp, adv, _, mask = _batch()
    mask[:] = True
    bad = logp.clone()
    bad[0, 0] = NAN
    cov = policy_covariance(bad, adv, mask)  # every token NaN before (the batch means were NaN)
    assert torch.isnan(cov[0, 0])
    keep = torch.ones_like(mask)
    keep[0, 0] = False
    torch.testing.assert_close(cov[keep], policy_covariance(logp, adv, keep)[keep])
    assert covariance_sums(bad, adv, mask).count.item() == mask.sum().item() - 1


def test_covariance_of_empty_and_all_masked_input_is_zero():
    logp, adv, _, mask = _batch()
    assert torch.equal(policy_covariance(logp, adv, torch.zeros_like(mask)), torch.zeros_like(logp))
    empty = torch.zeros(0, 4)
    assert policy_covariance(empty, torch.zeros(0), torch.zeros(0, 4, dtype=torch.bool)).shape == (0, 4)
    sums = covariance_sums(empty, torch.zeros(0), torch.zeros(0, 4, dtype=torch.bool))
    assert [float(x) for x in sums] == [0.0, 0.0, 0.0]


def test_quantile_refuses_empty_input_and_bad_q():
    with pytest.raises(EntrotrainError, match="empty"):
        quantile(torch.zeros(0), 0.5)  # NaN before
    for q in (-0.1, 1.5, NAN, INF):
        with pytest.raises(EntrotrainError, match="q must"):
            quantile(torch.arange(4.0), q)  # an IndexError or a silent extrapolation before
    with pytest.raises(EntrotrainError, match="1 dims"):
        quantile(torch.zeros(2, 2), 0.5)


@pytest.mark.parametrize("top_fraction", [0.0, 1.5, NAN, INF, -0.2])
def test_high_entropy_mask_bad_top_fraction(top_fraction):
    _, _, ent, mask = _batch()
    with pytest.raises(EntrotrainError, match="top_fraction"):
        high_entropy_mask(ent, mask, top_fraction)


def test_high_entropy_mask_ignores_nan_entropies_when_choosing_tau():
    _, _, ent, mask = _batch()
    mask[:] = True
    bad = ent.clone()
    bad[0, :3] = NAN
    got = high_entropy_mask(bad, mask, 0.5)  # NaN sorted as the largest values moved tau before
    keep = torch.isfinite(bad)
    tau = torch.quantile(bad[keep].double(), 0.5)
    assert torch.equal(got, (bad.double() >= tau) & keep)
    assert not high_entropy_mask(ent, torch.zeros_like(mask)).any()


def test_steer_weights_refuses_parameters_that_give_nan():
    logp, adv, ent, mask = _batch()
    with pytest.raises(EntrotrainError, match="w_min"):
        steer_weights(logp, logp - 0.1, adv, ent, mask, w_min=0.0)  # -log(0) = inf -> NaN weights before
    with pytest.raises(EntrotrainError, match="w_max"):
        steer_weights(logp, logp - 0.1, adv, ent, mask, w_min=0.8, w_max=0.5, linear=True)
    with pytest.raises(EntrotrainError, match="w_min"):
        steer_weights(logp, logp - 0.1, adv, ent, mask, w_min=NAN)


# ------------------------------------------------------------------ property tests


@st.composite
def token_mask(draw, shape, g):
    kind = draw(st.sampled_from(["none", "bool", "all-false", "all-true", "int", "float01", "float-half", "wrong"]))
    m = torch.rand(shape, generator=g) < 0.6
    mask = {
        "none": None,
        "bool": m,
        "all-false": torch.zeros(shape, dtype=torch.bool),
        "all-true": torch.ones(shape, dtype=torch.bool),
        "int": m.long(),
        "float01": m.float(),
        "float-half": torch.full(shape, 0.5),
        "wrong": torch.ones(tuple(s + 1 for s in shape), dtype=torch.bool),
    }[kind]
    return mask, kind


def _bad_mask(kind: str, mask) -> bool:
    """Whether the drawn mask must be refused: wrong shape, or float values other than 0/1 (an empty one has none)."""
    return kind == "wrong" or (kind == "float-half" and mask.numel() > 0)


def _sprinkle(draw, x: torch.Tensor, values=(NAN, INF, -INF), most=2) -> None:
    for value in draw(st.lists(st.sampled_from(values), max_size=most)):
        if x.numel():
            x.view(-1)[draw(st.integers(0, x.numel() - 1))] = value


@st.composite
def logits_case(draw):
    b, t, v = draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    z = torch.randn(b, t, v, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.1, 1.0, 4.0]))
    kind = draw(st.sampled_from(["random", "uniform", "one-hot"]))
    if kind == "uniform":
        z.zero_()
    elif kind == "one-hot" and v:
        z.fill_(-INF)
        z[..., 0] = 1.0
    _sprinkle(draw, z)
    dtype = draw(st.sampled_from(DTYPES))
    mask, mask_kind = draw(token_mask((b, t), g))
    temperature = draw(st.sampled_from([1.0, 0.7, 1.5, 0.0, INF, NAN]))
    labels = torch.randint(-2, v + 2, (b, t), generator=g)
    return z.to(dtype), mask, mask_kind, temperature, labels


def _good_temperature(t: float) -> bool:
    return math.isfinite(t) and t > 0


@given(logits_case())
def test_token_entropy_contract(case):
    z, mask, mask_kind, temperature, _ = case
    status, out = call(token_entropy, z, mask, temperature=temperature, impl="torch")
    if _bad_mask(mask_kind, mask) or not _good_temperature(temperature):
        assert status == "error"
        return
    assert status == "ok", out
    ref = entropy_rows64(z.double() / temperature)
    if mask is not None:
        ref = torch.where(mask.bool(), ref, 0.0)
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=TOL[z.dtype], rtol=TOL[z.dtype])
    assert torch.isnan(out[~finite]).all()


@given(logits_case())
def test_token_logprobs_contract(case):
    z, _, _, temperature, labels = case
    status, out = call(token_logprobs, z, labels, temperature=temperature)
    v = z.shape[-1]
    if not _good_temperature(temperature) or (labels.numel() and int(labels.max()) >= v):
        assert status == "error"
        if _good_temperature(temperature):
            assert f"vocabulary of {v}" in str(out)
        return
    assert status == "ok", out
    assert out.shape == labels.shape
    if v == 0:
        assert (out == 0).all()
        return
    ref = torch.log_softmax(z.double() / temperature, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    ref = torch.where(labels >= 0, ref, 0.0)
    row_finite = torch.isfinite(z.double()).all(-1) | (labels < 0)
    torch.testing.assert_close(out[row_finite].double(), ref[row_finite], atol=TOL[z.dtype] * 10, rtol=1e-4)


def _agg64(values, mask, mode, num_tokens, num_sequences, max_length, dp_size) -> float:
    """verl's agg_loss by Python loops in float64; a zero denominator counts as 1 (the numerator is 0 whenever the
    input is empty or all-masked)."""
    v, m = values.double().tolist(), mask.double().tolist()
    rows = [[x * w if w else 0.0 for x, w in zip(vr, mr)] for vr, mr in zip(v, m)]
    counts = [sum(mr) for mr in m]
    if mode == "token-mean":
        den = sum(counts) if num_tokens is None else num_tokens
        total = sum(sum(r) for r in rows)
    else:
        per_seq = [sum(r) / (c + 1e-8) if mode == "seq-mean-token-mean" else sum(r) for r, c in zip(rows, counts)]
        total = sum(s for s, c in zip(per_seq, counts) if c > 0)
        den = sum(1 for c in counts if c > 0) if num_sequences is None else num_sequences
    if mode == "seq-mean-token-sum-norm":  # verl >= 0.9 / Dr. GRPO: the seq-mean token sum over a constant length
        length = values.shape[-1] if max_length is None else max_length
        total /= length if length != 0 else 1.0
    return total / (den if den != 0 else 1.0) * dp_size  # documented: a zero denominator counts as 1


@given(data=st.data())
def test_aggregate_loss_contract(data):
    b, t = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 4))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)))
    values = torch.randn(b, t, generator=g, dtype=dtype)
    mask, kind = data.draw(token_mask((b, t), g))
    if kind == "none":
        mask = torch.ones(b, t, dtype=torch.bool)
    if kind not in ("wrong", "float-half") and values.numel():  # non-finite garbage on masked tokens only
        values = torch.where(mask.bool(), values, torch.tensor(NAN, dtype=dtype))
    mode = data.draw(st.sampled_from(AGG_MODES + ("bogus",)))
    num_tokens = data.draw(st.sampled_from([None, None, 0.0, 5.0, -1.0, NAN]))
    num_sequences = data.draw(st.sampled_from([None, None, 0.0, 2.0]))
    max_length = data.draw(st.sampled_from([None, None, 0.0, 6.0, INF]))
    dp_size = data.draw(st.sampled_from([1, 1, 2, 0]))
    x = values.clone().requires_grad_()
    status, out = call(
        aggregate_loss, x, mask, mode, num_tokens=num_tokens, num_sequences=num_sequences, max_length=max_length,
        dp_size=dp_size,
    )  # fmt: skip
    invalid = (
        kind == "wrong" or mode == "bogus" or dp_size == 0
        or (num_tokens is not None and not (math.isfinite(num_tokens) and num_tokens >= 0))
        or max_length == INF
    )  # fmt: skip
    if invalid:
        assert status == "error"
        return
    assert status == "ok", out
    assert out.dim() == 0 and torch.isfinite(out), "finite valid tokens must give a finite loss"
    ref = _agg64(values, mask, mode, num_tokens, num_sequences, max_length, dp_size)
    assert abs(out.item() - ref) <= 1e-5 * (1 + abs(ref))
    out.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask.bool()] == 0).all(), "masked tokens must get zero gradient"


@st.composite
def policy_case(draw):
    b, t = draw(st.integers(0, 3)), draw(st.integers(0, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(DTYPES))
    logp = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 4).to(dtype)
    old = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 4).to(dtype)
    ent = (torch.rand(b, t, generator=g, dtype=torch.float64) * 3).to(dtype)
    adv = torch.randn((b, t) if draw(st.booleans()) else (b,), generator=g, dtype=torch.float64).to(dtype)
    for x in (logp, adv, ent):
        _sprinkle(draw, x, most=1)
    mask, kind = draw(token_mask((b, t), g))
    return logp, old, adv, ent, mask, kind


def _valid(mask, shape):
    return torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool()


@given(policy_case())
def test_policy_covariance_contract(case):
    logp, _, adv, _, mask, kind = case
    mask = torch.ones(logp.shape, dtype=torch.bool) if mask is None else mask
    status, cov = call(policy_covariance, logp, adv, mask)
    if _bad_mask(kind, mask):
        assert status == "error"
        return
    assert status == "ok", cov
    a = (adv[:, None] if adv.dim() == 1 else adv).expand_as(logp).double()
    lp = logp.double()
    valid = mask.bool()
    used = valid & torch.isfinite(lp) & torch.isfinite(a)
    n = int(used.sum())
    mean_l = float(lp[used].sum()) / max(n, 1)
    mean_a = float(a[used].sum()) / max(n, 1)
    ref = torch.where(valid, (lp - mean_l) * (a - mean_a), 0.0)
    finite = ~valid | used
    assert torch.isfinite(cov[finite]).all(), "a finite token's covariance was poisoned"
    tol = TOL[logp.dtype] * 10 if logp.dtype in (torch.float16, torch.bfloat16) else 1e-5
    torch.testing.assert_close(cov[finite].double(), ref[finite].to(logp.dtype).double(), atol=tol * 100, rtol=1e-2)


@given(policy_case(), st.sampled_from([0.2, 0.5, 1.0, 0.0, 1.2, NAN]))
def test_high_entropy_mask_contract(case, top_fraction):
    _, _, _, ent, mask, kind = case
    mask = torch.ones(ent.shape, dtype=torch.bool) if mask is None else mask
    status, out = call(high_entropy_mask, ent, mask, top_fraction)
    if _bad_mask(kind, mask) or not (0 < top_fraction <= 1):
        assert status == "error"
        return
    assert status == "ok", out
    assert out.dtype == torch.bool and out.shape == ent.shape
    vals = ent[mask.bool() & torch.isfinite(ent)].double()
    if vals.numel() == 0:
        assert not out.any()
        return
    acc = torch.promote_types(ent.dtype, torch.float32)  # tau and the comparison unrounded (TRL: float32)
    tau = torch.quantile(vals.to(acc), 1 - top_fraction)
    want = (ent.to(acc) >= tau) & mask.bool()
    assert torch.equal(out, want)


@given(policy_case(), st.sampled_from([(0.8, 1.0, False), (0.5, 0.9, True), (0.0, 1.0, True), (0.0, 1.0, False)]))
@settings(max_examples=30)
def test_steer_weights_contract(case, params):
    logp, old, adv, ent, mask, kind = case
    w_min, w_max, linear = params
    mask = torch.ones(logp.shape, dtype=torch.bool) if mask is None else mask
    status, w = call(steer_weights, logp, old, adv, ent, mask, w_min=w_min, w_max=w_max, linear=linear)
    if _bad_mask(kind, mask) or (w_min == 0.0 and not linear):
        assert status == "error"
        return
    assert status == "ok", w
    assert w.shape == logp.shape and torch.isfinite(w).all(), "STEER weights are always finite"
    if not mask.bool().any():
        assert (w == 1).all(), "documented: all ones when no token is valid"
        return
    hi = w_max if linear else 1.0
    assert ((w >= w_min - 1e-3) & (w <= hi + 1e-3)).all()


@given(st.integers(0, 6), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0, -0.5, NAN]))
def test_quantile_contract(n, seed, q):
    values = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    status, out = call(quantile, values, q)
    if n == 0 or not 0 <= q <= 1:
        assert status == "error"
        return
    assert status == "ok", out
    torch.testing.assert_close(out, torch.quantile(values, q))


@st.composite
def head_case(draw):
    n, d, v = draw(st.integers(0, 3)), draw(st.integers(0, 3)), draw(st.integers(0, 4))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from((torch.float32, torch.float64, torch.bfloat16)))
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64) if draw(st.booleans()) else None
    _sprinkle(draw, hidden, most=1)
    labels = torch.randint(-1, v + 2, (n,), generator=g) if draw(st.booleans()) else None
    temperature = draw(st.sampled_from([1.0, 0.6, INF]))
    chunk = draw(st.sampled_from([1, 2, 512, 0]))
    cast = (lambda x: None if x is None else x.to(dtype))
    return cast(hidden), cast(weight), cast(bias), labels, temperature, chunk


@given(head_case())
@settings(max_examples=30)
def test_linear_entropy_and_logprobs_contract(case):
    hidden, weight, bias, labels, temperature, chunk = case
    status, out = call(
        linear_entropy_and_logprobs, hidden, weight, labels, bias=bias, temperature=temperature, chunk_size=chunk,
        impl="torch",
    )  # fmt: skip
    v = weight.shape[0]
    bad_labels = labels is not None and labels.numel() and int(labels.max()) >= v
    if v == 0 or bad_labels or temperature == INF or chunk == 0:
        assert status == "error"
        return
    assert status == "ok", out
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z / temperature
    ref = entropy_rows64(z)
    rows = torch.isfinite(hidden.double()).all(-1)
    tol = 2e-2 if hidden.dtype == torch.bfloat16 else 1e-4  # bf16: the matmul itself rounds
    torch.testing.assert_close(out.entropy[rows].double(), ref[rows], atol=tol, rtol=tol)
    if labels is not None:
        lp = torch.log_softmax(z, -1).gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
        lp = torch.where(labels >= 0, lp, 0.0)
        torch.testing.assert_close(out.logprobs[rows].double(), lp[rows], atol=tol, rtol=tol)
    else:
        assert out.logprobs is None


@given(logits_case())
@settings(max_examples=30)
def test_token_statistics_gradients_are_finite_for_finite_logits(case):
    """Masked tokens, -inf (one-hot) logits and 0-sized dims never give a NaN gradient (forward or backward)."""
    z, mask, mask_kind, temperature, labels = case
    if z.dtype not in (torch.float32, torch.float64) or _bad_mask(mask_kind, mask) or not _good_temperature(temperature):
        return
    z = torch.where(torch.isnan(z) | torch.isposinf(z), torch.zeros((), dtype=z.dtype), z)
    x = z.clone().requires_grad_()
    h = token_entropy(x, mask, temperature=temperature, impl="torch")
    assert torch.isfinite(h).all()
    labels = labels.clamp(max=max(z.shape[-1] - 1, -1))
    lp = token_logprobs(x, labels, temperature=temperature)
    (h.sum() + torch.where(torch.isfinite(lp), lp, 0.0).sum()).backward()
    has_finite = torch.isfinite(z).any(-1, keepdim=True).expand_as(z)  # an all -inf row has no distribution
    assert torch.isfinite(x.grad[has_finite]).all()


def test_seq_mean_token_sum_norm_is_trl_dr_grpo_and_num_sequences_one_is_verl_08():
    # Dr. GRPO (TRL loss_type="dr_grpo"): sum(l * m) / (B * max_completion_length) when every completion has a
    # token; verl <= 0.8 divided by the length alone (num_sequences=1), N_seq times larger
    g = torch.Generator().manual_seed(0)
    values = torch.randn(5, 7, generator=g, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=g) < 0.6
    mask[:, 0] = True
    trl = (values * mask).sum() / (values.size(0) * 16)
    got = aggregate_loss(values, mask, "seq-mean-token-sum-norm", max_length=16)
    torch.testing.assert_close(got, trl, rtol=1e-15, atol=0)
    old = aggregate_loss(values, mask, "seq-mean-token-sum-norm", max_length=16, num_sequences=1)
    torch.testing.assert_close(old, (values * mask).sum() / 16, rtol=1e-15, atol=0)
