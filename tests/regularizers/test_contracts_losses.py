"""Property tests of the loss contracts (DESIGN.md §8, "trust under failure") for every policy loss.

Drawn: batch shape (B, T including 0), dtype (fp32, bf16, fp16, fp64), mask (random, all-False, all-True, integer
0/1, float 0/1), advantages (zeros, constant, huge, random, one per sequence), NaN/Inf placements, constructor
parameters (valid and invalid), both modes and every aggregation. Asserted:

- invalid parameters or shapes raise :class:`EntrotrainError`; valid ones construct;
- finite valid inputs give a finite loss, finite metrics and finite gradients; all masked: loss 0, gradient 0;
- masked positions never leak: garbage (NaN/Inf) there gives bit for bit the loss, metrics and gradient of zeros;
- NaN at one valid position never makes the gradient of another row non-finite.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional import AGG_MODES
from entrotrain.regularizers import ClipCovLoss, EntropyBonus, KLCovLoss, PPOClipLoss, SteerLoss

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # KL-Cov's on-policy warning on degenerate draws

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NAMES = ("ppo", "clip_cov", "kl_cov", "steer", "bonus", "sum")
MODES = ("micro_batch", "global")


def build(name: str, mode: str, agg: str):
    glob = mode == "global"
    if name == "ppo":
        return PPOClipLoss(0.2, 0.28, 3.0, agg, global_agg=glob)
    if name == "clip_cov":
        return ClipCovLoss(0.5, -5.0, 5.0, agg=agg, mode=mode, seed=1)
    if name == "kl_cov":
        return KLCovLoss(0.5, agg=agg, mode=mode)
    if name == "steer":
        return SteerLoss(agg=agg, global_agg=glob)
    if name == "bonus":
        return EntropyBonus(0.1, agg=agg, global_agg=glob)
    return PPOClipLoss(agg=agg, global_agg=glob) + ClipCovLoss(0.5, -5.0, 5.0, agg=agg, mode=mode) + EntropyBonus(
        0.05, agg=agg, global_agg=glob
    )


@st.composite
def batches(draw):
    """``(logprobs, old, advantages, mask, valid, entropy)``: finite data, masks of every accepted kind."""
    b, t = draw(st.integers(0, 4)), draw(st.integers(0, 6))
    dtype = draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 8
    old = (logp + torch.randn(b, t, generator=g, dtype=torch.float64)).clamp_max(0)
    kind = draw(st.sampled_from(("random", "all_false", "all_true", "int01", "float01")))
    valid = torch.rand(b, t, generator=g) < 0.6
    if kind == "all_false":
        valid = torch.zeros(b, t, dtype=torch.bool)
    elif kind == "all_true":
        valid = torch.ones(b, t, dtype=torch.bool)
    mask = {"int01": valid.long(), "float01": valid.to(dtype)}.get(kind, valid)
    huge = min(1e6, torch.finfo(dtype).max / 4)
    adv_kind = draw(st.sampled_from(("zeros", "constant", "huge", "random", "per_sequence")))
    adv = {
        "zeros": torch.zeros(b, t, dtype=torch.float64),
        "constant": torch.full((b, t), 1.5, dtype=torch.float64),
        "huge": torch.full((b, t), -huge, dtype=torch.float64) * torch.randint(-1, 2, (b, 1), generator=g),
        "random": torch.randn(b, t, generator=g, dtype=torch.float64) * 3,
        "per_sequence": torch.randn(b, generator=g, dtype=torch.float64),
    }[adv_kind]
    entropy = torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask, valid, entropy.to(dtype)


def run(name, mode, agg, logp, old, adv, mask, entropy):
    """Loss, metrics and gradients w.r.t. ``logprobs`` and ``entropy`` of a fresh module (same seed each call)."""
    logp = logp.clone().requires_grad_()
    entropy = entropy.clone().requires_grad_()
    torch.manual_seed(0)
    out = build(name, mode, agg)(logp, old, adv, mask, entropy=entropy)
    grads = torch.autograd.grad(out.loss, [logp, entropy], allow_unused=True)
    return out, grads


def _finite(x) -> bool:
    return x is None or bool(torch.isfinite(x).all())


@settings(max_examples=150)
@given(batch=batches(), name=st.sampled_from(NAMES), mode=st.sampled_from(MODES), agg=st.sampled_from(AGG_MODES))
def test_finite_inputs_give_finite_loss_metrics_and_gradients(batch, name, mode, agg):
    logp, old, adv, mask, valid, entropy = batch
    out, grads = run(name, mode, agg, logp, old, adv, mask, entropy)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss), out.loss
    assert all(_finite(v) for v in out.metrics.values()), out.metrics
    assert all(_finite(g) for g in grads)
    if not bool(valid.any()):  # empty or all masked: verl's masked mean, 0 with a zero gradient
        assert float(out.loss.detach()) == 0.0
        assert all(g is None or not bool(g.any()) for g in grads)


@settings(max_examples=150)
@given(
    batch=batches(),
    name=st.sampled_from(NAMES),
    mode=st.sampled_from(MODES),
    agg=st.sampled_from(AGG_MODES),
    fill=st.sampled_from((math.nan, math.inf, -math.inf, 1e30)),
)
def test_masked_garbage_equals_masked_zeros(batch, name, mode, agg, fill):
    logp, old, adv, mask, valid, entropy = batch
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp).contiguous()
    clean = [torch.where(valid, x, torch.zeros((), dtype=x.dtype)) for x in (logp, old, adv, entropy)]
    dirty = [torch.where(valid, x, torch.full((), fill, dtype=x.dtype)) for x in clean]
    ref, ref_grads = run(name, mode, agg, clean[0], clean[1], clean[2], mask, clean[3])
    got, got_grads = run(name, mode, agg, dirty[0], dirty[1], dirty[2], mask, dirty[3])
    assert torch.equal(got.loss, ref.loss), (got.loss, ref.loss)
    assert got.metrics.keys() == ref.metrics.keys()
    for key, value in ref.metrics.items():
        assert torch.equal(got.metrics[key], value), key
    for g_got, g_ref in zip(got_grads, ref_grads):
        assert (g_got is None and g_ref is None) or torch.equal(g_got, g_ref)


@settings(max_examples=150)
@given(
    batch=batches(),
    name=st.sampled_from(NAMES),
    mode=st.sampled_from(MODES),
    agg=st.sampled_from(AGG_MODES),
    where=st.sampled_from(("logprobs", "old_logprobs", "advantages", "entropy")),
    fill=st.sampled_from((math.nan, math.inf, -math.inf)),
)
def test_nonfinite_valid_token_never_contaminates_other_rows(batch, name, mode, agg, where, fill):
    logp, old, adv, mask, valid, entropy = batch
    assume(valid.sum() > 0 and valid.shape[0] >= 2)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp).contiguous()
    b0, t0 = (int(i) for i in torch.nonzero(valid)[0])
    data = dict(logprobs=logp.clone(), old_logprobs=old.clone(), advantages=adv.clone(), entropy=entropy.clone())
    _, clean = run(name, mode, agg, data["logprobs"], data["old_logprobs"], data["advantages"], mask, data["entropy"])
    data[where][b0, t0] = fill
    out, grads = run(name, mode, agg, data["logprobs"], data["old_logprobs"], data["advantages"], mask, data["entropy"])
    others = torch.arange(logp.shape[0]) != b0
    for g, g_clean in zip(grads, clean):
        # finite wherever the clean batch's gradient is: a float16 gradient can overflow by itself (advantage 1.6e4
        # times a ratio of 40 exceeds 65504), which is not the non-finite token's doing
        assert g is None or bool((torch.isfinite(g[others]) | ~torch.isfinite(g_clean[others])).all()), (g, b0)


# ------------------------------------------------------------------------------------------- parameters

_ANY = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from((0.0, 1.0, 1e-4, -1e-4, 0.5, 1.5, 2.0, math.nan, math.inf, -math.inf)),
    st.sampled_from(("0.2", None, True)),
)


def _num(value) -> bool:
    """A real, finite, non-bool number."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: (builder of one parameter, is the value valid?)
PARAMETERS = {
    "PPOClipLoss.clip_low": (lambda v: PPOClipLoss(clip_low=v), lambda v: _num(v) and 0 <= v <= 1),
    "PPOClipLoss.clip_high": (lambda v: PPOClipLoss(clip_high=v), lambda v: _num(v) and v >= 0),
    "PPOClipLoss.dual_clip": (lambda v: PPOClipLoss(dual_clip=v), lambda v: v is None or (_num(v) and v > 1)),
    "PPOClipLoss.log_ratio_clamp": (
        lambda v: PPOClipLoss(log_ratio_clamp=v),
        lambda v: v is None or (_num(v) and v > 0),
    ),
    "ClipCovLoss.clip_ratio": (lambda v: ClipCovLoss(clip_ratio=v), lambda v: _num(v) and 0 < v <= 1),
    "ClipCovLoss.cov_lb": (lambda v: ClipCovLoss(cov_lb=v, cov_ub=5.0), lambda v: _num(v) and v < 5),
    "ClipCovLoss.cov_ub": (lambda v: ClipCovLoss(cov_lb=1.0, cov_ub=v), lambda v: _num(v) and v > 1),
    "KLCovLoss.k_ratio": (lambda v: KLCovLoss(k_ratio=v), lambda v: _num(v) and 0 < v <= 1),
    "KLCovLoss.kl_coef": (lambda v: KLCovLoss(kl_coef=v), lambda v: _num(v) and v >= 0),
    "SteerLoss.w_min": (lambda v: SteerLoss(w_min=v, w_max=1.0), lambda v: _num(v) and 0 < v <= 1),
    "SteerLoss.w_max": (lambda v: SteerLoss(w_min=0.8, w_max=v), lambda v: _num(v) and v >= 0.8),
    "EntropyBonus.coef": (lambda v: EntropyBonus(coef=v), lambda v: _num(v) and v >= 0),
    "EntropyBonus.target": (lambda v: EntropyBonus(target=v), lambda v: v is None or (_num(v) and v >= 0)),
    "EntropyBonus.delta": (lambda v: EntropyBonus(delta=v), lambda v: _num(v) and v >= 0),
    "EntropyBonus.coef_max": (lambda v: EntropyBonus(coef_min=0.0, coef_max=v), lambda v: _num(v) and v >= 0),
}


@settings(max_examples=120)
@given(param=st.sampled_from(sorted(PARAMETERS)), value=_ANY)
def test_every_parameter_is_validated(param, value):
    make, ok = PARAMETERS[param]
    if ok(value):
        make(value)
    else:
        with pytest.raises(EntrotrainError, match=param.split(".")[1].split("_")[0]):
            make(value)


@given(
    name=st.sampled_from(NAMES),
    mode=st.sampled_from(MODES),
    agg=st.sampled_from(AGG_MODES),
    bad=st.sampled_from(("old_short", "adv_short", "adv_seq_short", "mask_short", "mask_3d", "int_logprobs")),
    b=st.integers(1, 4),
    t=st.integers(1, 5),
)
def test_mismatched_shapes_and_dtypes_raise(name, mode, agg, bad, b, t):
    logp, old, adv = -torch.rand(b, t), -torch.rand(b, t), torch.randn(b, t)
    mask, entropy = torch.ones(b, t, dtype=torch.bool), torch.rand(b, t)
    if bad == "old_short":
        old = old[:, :-1]
    elif bad == "adv_short":
        adv = adv[:, :-1]
    elif bad == "adv_seq_short":
        adv = adv[:-1, 0]
    elif bad == "mask_short":
        mask = mask[:, :-1]
    elif bad == "mask_3d":
        mask = mask[None]
    else:
        logp = (logp * 10).long()
    if name == "bonus" and not bad.startswith("mask"):
        return  # the bonus reads only entropy and mask
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(EntrotrainError):
            build(name, mode, agg)(logp, old, adv, mask, entropy=entropy)


# ------------------------------------------------------------------------------------------- attention regularisers


def _attention_regs(heads: int):
    from entrotrain.regularizers import (
        AttentionEntropyMaximization,
        EntropyBandRegularizer,
        EntropyFloorRegularizer,
    )

    regs = {
        "aem": AttentionEntropyMaximization(1.0),
        "aem_normalized": AttentionEntropyMaximization(1.0, normalized=True),
        "floor": EntropyFloorRegularizer(1.0, floor=0.9),
    }
    if heads >= 1:
        regs["band"] = EntropyBandRegularizer(1, heads, weight=1.0)
        regs["band_paper"] = EntropyBandRegularizer(1, heads, preset="paper", weight=1.0)
    return regs


@settings(max_examples=60)
@given(
    b=st.integers(0, 2),
    h=st.integers(0, 3),
    n=st.integers(0, 4),
    m=st.integers(0, 4),
    mask_kind=st.sampled_from(("none", "random", "all_false", "causal", "one_key")),
    dtype=st.sampled_from((torch.float32, torch.float64)),
    seed=st.integers(0, 2**16),
)
def test_attention_regularizers_are_finite_on_any_pattern(b, h, n, m, mask_kind, dtype, seed):
    from entrotrain.functional.attention import attention_entropy_stats

    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, n, 4, generator=g, dtype=torch.float64) * 3).to(dtype).requires_grad_()
    k = torch.randn(b, h, m, 4, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    mask = None
    if mask_kind == "random":
        mask = torch.rand(b, h, n, m, generator=g) < 0.5
    elif mask_kind == "all_false":
        mask = torch.zeros(b, h, n, m, dtype=torch.bool)
    elif mask_kind == "causal":
        mask = torch.ones(n, m, dtype=torch.bool).tril().expand(b, h, n, m)
    elif mask_kind == "one_key":
        mask = torch.zeros(b, h, n, m, dtype=torch.bool)
        mask[..., :1] = True
    for name, reg in _attention_regs(h).items():
        records = [("l0", attention_entropy_stats(q, k, attn_mask=mask, path="materialized"))]
        total = reg(records).total
        assert torch.isfinite(total), (name, total)
        leaves = [x for x in (q, k, *reg.parameters()) if x.requires_grad]
        for grad in torch.autograd.grad(total, leaves, allow_unused=True):
            assert grad is None or bool(torch.isfinite(grad).all()), name
        if not bool((records[0][1].n_keys >= 2).any()):  # no query with a defined entropy: nothing to penalise
            assert float(total.detach()) == 0.0, (name, total)
