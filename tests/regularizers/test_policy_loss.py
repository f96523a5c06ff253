"""Policy losses: verl parity (micro_batch mode, bit for bit), the §12 properties, global mode, composition."""

from __future__ import annotations

import warnings

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.functional import AGG_MODES, aggregate_loss
from entrotrain.regularizers import (
    ClipCovLoss,
    EntropyBonus,
    KLCovLoss,
    PolicyLossOutput,
    PolicyLossSum,
    PPOClipLoss,
    SteerLoss,
)
from entrotrain.regularizers.policy_selection import counter_uniform, global_index, global_topk_mask
from tests.helpers import verl_reference as verl


def _batch(seed=0, b=6, t=24, spread=0.3, float_mask=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    adv = (torch.randn(b, 1, generator=g) * 2).expand(b, t).contiguous().to(dtype)
    logp = (-torch.rand(b, t, generator=g) * 4).to(dtype)
    old = (logp + torch.randn(b, t, generator=g, dtype=dtype) * spread).to(dtype)
    lengths = torch.randint(t // 3, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    mask[-1] = False  # one fully masked sequence
    return logp, old, adv, (mask.to(dtype) if float_mask else mask)


def _same(a, b):
    assert torch.equal(a, b), (a, b)


# ------------------------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_matches_verl(mode):
    logp, _, _, mask = _batch()
    values = torch.randn_like(logp)
    expected = verl.agg_loss(values, mask, mode)
    _same(aggregate_loss(values, mask, mode), expected)
    _same(aggregate_loss(values, mask.bool(), mode), expected)
    values[mask == 0] = float("inf")  # masked entries never leak (verl's seq modes would give nan here)
    _same(aggregate_loss(values, mask, mode), expected)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_global_denominators_reproduce_the_whole_batch(mode):
    logp, _, _, mask = _batch(b=8)
    values = torch.randn_like(logp).double()
    mask = mask.double()
    whole = aggregate_loss(values, mask, mode)
    halves = [(values[:4], mask[:4]), (values[4:], mask[4:])]
    n_tok, n_seq = mask.sum(), (mask.sum(-1) > 0).double().sum()
    parts = [aggregate_loss(v, m, mode, num_tokens=n_tok, num_sequences=n_seq, dp_size=2) for v, m in halves]
    torch.testing.assert_close(sum(parts) / 2, whole, rtol=1e-12, atol=1e-12)


def test_aggregate_rejects_bad_mode():
    with pytest.raises(EntrotrainError, match="mode must be one of"):
        aggregate_loss(torch.zeros(2, 3), torch.ones(2, 3), "mean")


# ------------------------------------------------------------------------------------------- verl parity


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("bool_mask", [False, True])
def test_clip_cov_micro_batch_equals_verl(mode, bool_mask):
    logp, old, adv, mask = _batch()
    ours_mask = mask.bool() if bool_mask else mask
    for seed in range(3):
        lp_ref = logp.clone().requires_grad_()
        torch.manual_seed(seed)
        ref, ref_frac, ref_kl, _ = verl.compute_policy_loss_clip_cov(
            old, lp_ref, adv, mask, mode, clip_cov_ratio=0.05, cliprange_low=0.2, cliprange_high=0.2
        )
        ref.backward()
        lp = logp.clone().requires_grad_()
        torch.manual_seed(seed)
        loss_fn = ClipCovLoss(clip_ratio=0.05, agg=mode, mode="micro_batch", seed=None)
        out = loss_fn(lp, old, adv, ours_mask)
        out.loss.backward()
        _same(out.loss.detach(), ref.detach())
        _same(lp.grad, lp_ref.grad)
        _same(out.metrics["policy/cov_selected_frac"], ref_frac)  # verl's pg_clipfrac, renamed
        _same(out.metrics["policy/ppo_kl"], ref_kl)
        assert out.metrics["policy/cov_selected"] >= 1


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("ratio", [0.0002, 0.1])
def test_kl_cov_micro_batch_equals_verl(mode, ratio):
    logp, old, adv, mask = _batch(seed=1)
    lp_ref = logp.clone().requires_grad_()
    ref, _, ref_kl_abs, _ = verl.compute_policy_loss_kl_cov(old, lp_ref, adv, mask, mode, kl_cov_ratio=ratio)
    ref.backward()
    lp = logp.clone().requires_grad_()
    out = KLCovLoss(k_ratio=ratio, agg=mode, mode="micro_batch")(lp, old, adv, mask)
    out.loss.backward()
    _same(out.loss.detach(), ref.detach())
    _same(lp.grad, lp_ref.grad)
    _same(out.metrics["policy/ppo_kl_abs"], ref_kl_abs)
    assert out.metrics["policy/cov_selected"] == max(1, int(mask.sum() * ratio))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_ppo_clip_equals_verl_vanilla(mode):
    logp, old, adv, mask = _batch(seed=2, spread=0.6)
    lp_ref = logp.clone().requires_grad_()
    ref, ref_clipfrac, ref_kl, ref_lower = verl.compute_policy_loss_vanilla(
        old, lp_ref, adv, mask, mode, cliprange_low=0.2, cliprange_high=0.28, clip_ratio_c=3.0
    )
    ref.backward()
    lp = logp.clone().requires_grad_()
    out = PPOClipLoss(0.2, 0.28, dual_clip=3.0, agg=mode)(lp, old, adv, mask)
    out.loss.backward()
    _same(out.loss.detach(), ref.detach())
    _same(lp.grad, lp_ref.grad)
    _same(out.metrics["policy/ppo_kl"], ref_kl)
    _same(out.metrics["policy/dual_clip_frac"], ref_lower)
    frac = out.metrics["policy/clip_frac_low"] + out.metrics["policy/clip_frac_high"]
    torch.testing.assert_close(frac, ref_clipfrac)  # verl's pg_clipfrac is the sum of the two (A != 0 here)


# ------------------------------------------------------------------------------------------- §12 properties


@pytest.mark.parametrize("mode", ["micro_batch", "global"])
def test_clip_cov_without_candidates_is_single_clip_ppo(mode):
    logp, old, adv, mask = _batch(seed=3, spread=1.0)
    adv = adv * 1e-3  # |cov| << 1 = lb: no candidate
    lp1, lp2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    out = ClipCovLoss(clip_ratio=0.5, mode=mode)(lp1, old, adv, mask)
    ref = PPOClipLoss(dual_clip=None, log_ratio_clamp=None)(lp2, old, adv, mask)
    assert out.metrics["policy/cov_selected"] == 0 and out.metrics["policy/cov_candidates"] == 0
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=1e-7)
    out.loss.backward()
    ref.loss.backward()
    torch.testing.assert_close(lp1.grad, lp2.grad, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["micro_batch", "global"])
def test_kl_cov_on_policy_is_unclipped_pg_and_warns(mode):
    logp, _, adv, mask = _batch(seed=4)
    lp = logp.clone().requires_grad_()
    loss_fn = KLCovLoss(k_ratio=0.2, mode=mode)
    with pytest.warns(UserWarning, match="on-policy.*ClipCovLoss"):
        out = loss_fn(lp, lp.detach(), adv, mask)
    out.loss.backward()
    lp2 = logp.clone().requires_grad_()
    ref = aggregate_loss(-adv * torch.exp(lp2 - lp2.detach()), mask, "token-mean")
    ref.backward()
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(lp.grad, lp2.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        loss_fn(lp, lp.detach(), adv, mask)


def test_kl_cov_selects_top_cov_and_penalises_them():
    logp, old, adv, mask = _batch(seed=5)
    out = KLCovLoss(k_ratio=0.1, mode="global")(logp, old, adv, mask)
    n = int(mask.sum())
    assert int(out.metrics["policy/cov_selected"]) == int(0.1 * n)
    # the selected ones are the top covariances
    from entrotrain.functional import policy_covariance

    cov = policy_covariance(logp.double(), adv.double(), mask.bool())
    k = int(0.1 * n)
    thr = cov[mask.bool()].topk(k).values.min()
    assert torch.isclose(out.metrics["policy/cov_min_selected"], thr.float())


# ------------------------------------------------------------------------------------------- global mode


def test_global_clip_cov_exact_fraction_and_split_invariance():
    logp, old, adv, mask = _batch(seed=6, b=8)
    a = ClipCovLoss(clip_ratio=0.05, mode="global", seed=3)(logp, old, adv, mask, step=7)
    n = int(mask.sum())
    assert int(a.metrics["policy/cov_selected"]) == min(int(0.05 * n), int(a.metrics["policy/cov_candidates"]))
    b = ClipCovLoss(clip_ratio=0.05, mode="global", seed=3)(logp, old, adv, mask, step=7)
    _same(a.loss, b.loss)
    c = ClipCovLoss(clip_ratio=0.05, mode="global", seed=3)(logp, old, adv, mask, step=8)
    assert a.metrics["policy/cov_selected"] == c.metrics["policy/cov_selected"]


def test_counter_keys_and_global_topk():
    idx = torch.arange(1000)
    u = counter_uniform(0, 1, idx)
    assert u.min() >= 0 and u.max() < 1 and u.unique().numel() == 1000
    assert 0.45 < float(u.mean()) < 0.55
    assert not torch.equal(u, counter_uniform(0, 2, idx)) and torch.equal(u, counter_uniform(0, 1, idx))
    gidx = global_index(torch.Size([3, 4]), torch.device("cpu"))
    _same(gidx, torch.arange(12).reshape(3, 4))
    score = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 3.0, -1.0, 5.0], [0, 0, 0, 0]])
    cand = torch.ones(3, 4, dtype=torch.bool)
    sel = global_topk_mask(score, cand, gidx, 3)  # 5, then the first two 3s
    assert sel.sum() == 3 and sel[1, 3] and sel[0, 1] and sel[0, 2] and not sel[1, 1]


def test_nonzero_adv_only():
    logp, old, adv, mask = _batch(seed=7)
    adv = adv.clone()
    adv[:3] = 0.0
    n_nz = int(((adv != 0) & mask.bool()).sum())
    for mode in ("global", "micro_batch"):
        out = KLCovLoss(k_ratio=0.5, mode=mode, nonzero_adv_only=True)(logp, old, adv, mask)
        assert int(out.metrics["policy/cov_selected"]) == int(0.5 * n_nz), mode  # budget counts A != 0 only
        cc = ClipCovLoss(clip_ratio=0.5, cov_lb=-100.0, cov_ub=100.0, mode=mode, nonzero_adv_only=True)
        sel = cc(logp, old, adv, mask).metrics
        assert int(sel["policy/cov_selected"]) == min(int(0.5 * n_nz), int(sel["policy/cov_candidates"])), mode


# ------------------------------------------------------------------------------------------- STEER, bonus, composition


def test_steer_weights_and_loss():
    logp, old, adv, mask = _batch(seed=8)
    ent = torch.rand_like(logp) * 2
    out = SteerLoss()(logp.clone().requires_grad_(), old, adv, mask, entropy=ent)
    assert 0.8 - 1e-6 <= float(out.metrics["policy/token_weight_min"]) <= float(out.metrics["policy/token_weight_max"])
    assert float(out.metrics["policy/token_weight_max"]) <= 1.0
    with pytest.raises(EntrotrainError, match="entropy="):
        SteerLoss()(logp, old, adv, mask)


def test_entropy_bonus_fixed_and_composition():
    logp, old, adv, mask = _batch(seed=9)
    ent = (torch.rand_like(logp) * 2).requires_grad_()
    combo = PPOClipLoss() + EntropyBonus(0.01)
    out = combo(logp, old, adv, mask, entropy=ent)
    assert isinstance(out, PolicyLossOutput)
    ppo = PPOClipLoss()(logp, old, adv, mask)
    h = aggregate_loss(ent, mask, "token-mean")
    torch.testing.assert_close(out.loss, ppo.loss - 0.01 * h)
    assert {"policy/pg_loss", "policy/entropy", "policy/entropy_coef"} <= set(out.metrics)
    out.loss.backward()
    assert ent.grad is not None and (ent.grad[mask.bool()] < 0).all()
    triple = combo + PPOClipLoss()
    assert len(triple.terms) == 3 and "policy/pg_loss.1" in triple(logp, old, adv, mask, entropy=ent).metrics


def test_kl_cov_micro_batch_nonzero_adv_only_reports_the_true_cov_mean():
    """``policy/cov_mean`` is the mean covariance over every valid token in both modes: micro_batch with
    ``nonzero_adv_only`` reported the A = 0 tokens' covariance as 0 (their exclusion from the pick leaked into it)."""
    torch.manual_seed(0)
    lp = torch.randn(4, 6) - 1
    old = lp + 0.1 * torch.randn(4, 6)
    adv = torch.tensor([1.0, 0.0, 0.5, 0.0])  # mean(A) != 0: an A = 0 token has a nonzero covariance
    mask = torch.ones(4, 6, dtype=torch.bool)
    a = adv[:, None].expand(4, 6).double()
    want = ((a - a.mean()) * (lp.double() - lp.double().mean())).mean()
    for mode in ("micro_batch", "global"):
        out = KLCovLoss(0.2, mode=mode, nonzero_adv_only=True)(lp, old, adv, mask)
        assert float(out.metrics["policy/cov_mean"]) == pytest.approx(float(want), abs=1e-6)
        assert float(out.metrics["policy/cov_selected"]) == 2.0  # 0.2 x the 12 tokens with A != 0


def test_python_sum_of_policy_losses_and_adding_a_non_loss():
    """``sum([a, b])`` starts from 0 (it raised Python's TypeError); ``loss + 3`` raises EntrotrainError naming the
    fix."""
    logp, old, adv, mask = _batch(seed=9)
    ent = torch.rand_like(logp)
    total = sum([PPOClipLoss(), EntropyBonus(0.01)])
    assert isinstance(total, PolicyLossSum) and len(total.terms) == 2
    want = (PPOClipLoss() + EntropyBonus(0.01))(logp, old, adv, mask, entropy=ent).loss
    assert torch.equal(total(logp, old, adv, mask, entropy=ent).loss, want)
    for bad in (3, "a", True):
        with pytest.raises(EntrotrainError, match="only be added to another PolicyLoss"):
            PPOClipLoss() + bad
    with pytest.raises(EntrotrainError, match="only be added"):
        3 + PPOClipLoss()


def test_entropy_bonus_adaptive_controller_and_state_dict():
    mask = torch.ones(2, 5)
    low, high = torch.full((2, 5), 0.1), torch.full((2, 5), 0.5)
    bonus = EntropyBonus(coef=0.0, target=0.2, delta=0.005)
    for _ in range(3):
        out = bonus(entropy=low, mask=mask)  # below target: coef grows, stays applied
    assert torch.isclose(bonus.coef, torch.tensor(0.015, dtype=torch.float64))
    assert bool(bonus.active)
    out = bonus(entropy=high, mask=mask)  # above target: coef shrinks and is not applied next
    assert torch.isclose(bonus.coef, torch.tensor(0.010, dtype=torch.float64)) and not bool(bonus.active)
    out = bonus(entropy=high, mask=mask)
    assert float(out.metrics["policy/entropy_coef"]) == 0.0
    other = EntropyBonus(coef=0.0, target=0.2)
    other.load_state_dict(bonus.state_dict())
    assert torch.equal(other.coef, bonus.coef) and bool(other.active) == bool(bonus.active)
    # with steps: one update per new step (window = all calls of a step)
    stepped = EntropyBonus(coef=0.0, target=0.2, delta=0.01)
    for step in (0, 0, 0, 1, 1, 2):
        stepped(entropy=low, mask=mask, step=step)
    assert torch.isclose(stepped.coef, torch.tensor(0.02, dtype=torch.float64))


def test_bad_arguments():
    with pytest.raises(EntrotrainError, match="not a percent"):
        KLCovLoss(k_ratio=2.0)
    with pytest.raises(EntrotrainError, match="mode must be"):
        ClipCovLoss(mode="local")
    with pytest.raises(EntrotrainError, match="int seed"):
        ClipCovLoss(mode="global", seed=None)
    with pytest.raises(EntrotrainError, match="dual_clip"):
        PPOClipLoss(dual_clip=0.5)
    logp, old, adv, mask = _batch()
    with pytest.raises(EntrotrainError, match="advantages"):
        PPOClipLoss()(logp, old, adv[:, :3], mask)


# ------------------------------------------------------------------------------------- trust under failure

_AGGS = list(AGG_MODES)


def _loss(name: str, mode: str, agg: str = "token-mean"):
    """Every policy loss (and a composition) in ``mode``: 'micro_batch' (local) or 'global' (global denominators)."""
    glob = mode == "global"
    ratio = 0.3  # large enough that a small batch selects tokens
    builds = {
        "ppo": lambda: PPOClipLoss(agg=agg, dual_clip=3.0, global_agg=glob),
        "clip_cov": lambda: ClipCovLoss(ratio, cov_lb=-10.0, cov_ub=10.0, agg=agg, mode=mode, seed=0),
        "kl_cov": lambda: KLCovLoss(ratio, agg=agg, mode=mode),
        "steer": lambda: SteerLoss(agg=agg, global_agg=glob),
        "bonus": lambda: EntropyBonus(0.1, agg=agg, global_agg=glob),
        "sum": lambda: PPOClipLoss(agg=agg, global_agg=glob) + KLCovLoss(ratio, agg=agg, mode=mode)
        + EntropyBonus(0.1, agg=agg, global_agg=glob),
    }
    return builds[name]()


_NAMES = ["ppo", "clip_cov", "kl_cov", "steer", "bonus", "sum"]


def _call(fn, logp, old, adv, mask, entropy):
    return fn(logp, old, adv, mask, entropy=entropy)


@pytest.mark.parametrize("shape", [(6, 24), (0, 24), (6, 0), (0, 0)])
@pytest.mark.parametrize("mode", ["micro_batch", "global"])
@pytest.mark.parametrize("name", _NAMES)
def test_empty_or_all_masked_batch_gives_zero_loss_zero_grad_finite_metrics(name, mode, shape):
    b, t = shape
    logp, old, adv, _ = _batch(b=max(b, 1), t=max(t, 3))
    logp, old, adv = logp[:b, :t].clone(), old[:b, :t].clone(), adv[:b, :t].clone()
    logp.requires_grad_()
    entropy = torch.rand(b, t).requires_grad_()
    for agg in _AGGS:
        out = _call(_loss(name, mode, agg), logp, old, adv, torch.zeros(b, t, dtype=torch.bool), entropy)
        assert float(out.loss.detach()) == 0.0, (agg, out.loss)
        grads = torch.autograd.grad(out.loss, [logp, entropy], allow_unused=True)
        for g in grads:
            assert g is None or torch.equal(g, torch.zeros_like(g)), agg
        bad = {k: v for k, v in out.metrics.items() if not torch.isfinite(v).all()}
        assert not bad, (agg, bad)


@pytest.mark.parametrize("mode", ["micro_batch", "global"])
@pytest.mark.parametrize("name", _NAMES)
def test_nonfinite_garbage_in_masked_positions_never_leaks(name, mode):
    logp, old, adv, mask = _batch(seed=3, float_mask=False)
    entropy = torch.rand_like(logp) * 2
    clean = [torch.where(mask, x, torch.zeros_like(x)) for x in (logp, old, adv, entropy)]
    dirty = [x.clone() for x in clean]
    for x, fill in zip(dirty, (float("nan"), float("inf"), float("-inf"), float("nan"))):
        x[~mask] = fill
    results = []
    for lp, ol, ad, en in (clean, dirty):
        lp, en = lp.clone().requires_grad_(), en.clone().requires_grad_()
        torch.manual_seed(0)
        out = _call(_loss(name, mode), lp, ol, ad, mask, en)
        out.loss.backward()
        results.append((out, lp.grad, en.grad))
    (ref, g_ref, e_ref), (got, g_got, e_got) = results
    assert torch.isfinite(ref.loss) and torch.equal(got.loss, ref.loss)
    assert (g_ref is None and g_got is None) or (torch.isfinite(g_got).all() and torch.equal(g_got, g_ref))
    assert e_ref is None or torch.equal(e_got, e_ref)
    assert set(got.metrics) == set(ref.metrics)
    for key in ref.metrics:
        assert torch.equal(got.metrics[key], ref.metrics[key]), key


@pytest.mark.parametrize("agg", _AGGS)
def test_micro_batch_with_masked_garbage_equals_verl_on_zeroed_input(agg):
    logp, old, adv, mask = _batch(seed=5)
    expected = verl.compute_policy_loss_kl_cov(old, logp, adv, mask, agg, kl_cov_ratio=0.1)[0]
    old_bad = old.clone()
    old_bad[mask == 0] = float("nan")  # verl itself would give nan here in its seq-mean modes
    got = KLCovLoss(0.1, agg=agg, mode="micro_batch")(logp, old_bad, adv, mask).loss
    _same(got, expected)


def test_half_precision_inputs_are_computed_in_float32():
    logp, old, adv, mask = _batch(seed=2)
    for dtype in (torch.bfloat16, torch.float16):
        lo, ol, ad = logp.to(dtype), old.to(dtype), adv.to(dtype)
        got = PPOClipLoss(dual_clip=3.0)(lo, ol, ad, mask)
        ref = PPOClipLoss(dual_clip=3.0)(lo.float(), ol.float(), ad.float(), mask)
        assert got.loss.dtype == torch.float32 and torch.equal(got.loss, ref.loss)
        # advantages far beyond fp16's range of a product still give a finite loss
        big = PPOClipLoss()(lo, ol, torch.full_like(ad, 6e4), mask).loss
        assert torch.isfinite(big)


def test_integer_01_masks_are_accepted_and_other_masks_refused():
    logp, old, adv, mask = _batch(seed=4, float_mask=False)
    ref = PPOClipLoss()(logp, old, adv, mask).loss
    _same(PPOClipLoss()(logp, old, adv, mask.long()).loss, ref)
    _same(PPOClipLoss()(logp, old, adv, mask.to(torch.uint8)).loss, ref)
    _same(PPOClipLoss()(logp, old, adv, mask.float()).loss, ref)
    with pytest.raises(EntrotrainError, match="values other than 0 and 1"):
        PPOClipLoss()(logp, old, adv, mask.long() * 2)


@pytest.mark.parametrize(
    "args, match",
    [
        (lambda lp, ol, ad, m: (lp[0], ol[0], ad[0], m[0]), "logprobs must have 2 dims"),
        (lambda lp, ol, ad, m: (lp, ol[:, :-1], ad, m), "old_logprobs must have shape"),
        (lambda lp, ol, ad, m: (lp, ol, ad[:-1, 0], m), "advantages must have shape"),
        (lambda lp, ol, ad, m: (lp, ol, ad[:, :-1], m), "advantages must have shape"),
        (lambda lp, ol, ad, m: (lp, ol, ad, m[:, :-1]), "mask must have shape"),
        (lambda lp, ol, ad, m: (lp, ol, ad, m.T), "mask must have shape"),
        (lambda lp, ol, ad, m: ((lp * 100).long(), ol, ad, m), "logprobs must be a floating"),
        (lambda lp, ol, ad, m: (lp, ol.long(), ad, m), "old_logprobs must be a floating"),
        (lambda lp, ol, ad, m: (lp, ol, ad.long(), m), "advantages must be a floating"),
        (lambda lp, ol, ad, m: (lp, ol, ad, m.to(torch.complex64)), "mask must be boolean"),
        (lambda lp, ol, ad, m: (lp.numpy(), ol, ad, m), "logprobs must be a torch.Tensor"),
    ],
)
@pytest.mark.parametrize("name", _NAMES)
def test_bad_inputs_raise_entrotrain_error(name, args, match):
    logp, old, adv, mask = _batch(b=5, t=7, float_mask=False)
    lp, ol, ad, m = args(logp, old, adv, mask)
    entropy = torch.rand(lp.shape) if isinstance(lp, torch.Tensor) else torch.rand(5, 7)
    if name == "bonus" and not match.startswith("mask"):
        return  # the bonus reads only entropy and mask
    with pytest.raises(EntrotrainError, match=match):
        _call(_loss(name, "micro_batch"), lp, ol, ad, m, entropy)


def test_entropy_argument_is_validated():
    logp, old, adv, mask = _batch(b=5, t=7)
    with pytest.raises(EntrotrainError, match="entropy="):
        SteerLoss()(logp, old, adv, mask)
    with pytest.raises(EntrotrainError, match="entropy must have shape"):
        SteerLoss()(logp, old, adv, mask, entropy=torch.rand(5, 6))
    with pytest.raises(EntrotrainError, match="entropy must be a floating"):
        EntropyBonus(0.1)(entropy=torch.ones(5, 7, dtype=torch.long), mask=mask)
    with pytest.raises(EntrotrainError, match="mask="):
        EntropyBonus(0.1)(entropy=torch.rand(5, 7))
    with pytest.raises(EntrotrainError, match="step"):
        EntropyBonus(0.1, target=0.5)(entropy=torch.rand(5, 7), mask=mask, step=-1)


_NAN, _INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: PPOClipLoss(clip_low=_NAN), "clip_low"),
        (lambda: PPOClipLoss(clip_low=-0.1), "clip_low"),
        (lambda: PPOClipLoss(clip_low=1.5), "clip_low"),
        (lambda: PPOClipLoss(clip_high=_INF), "clip_high"),
        (lambda: PPOClipLoss(dual_clip=_NAN), "dual_clip"),
        (lambda: PPOClipLoss(dual_clip=1.0), "dual_clip"),
        (lambda: PPOClipLoss(agg="mean"), "agg"),
        (lambda: PPOClipLoss(log_ratio_clamp=0.0), "log_ratio_clamp"),
        (lambda: PPOClipLoss(global_agg="yes"), "global_agg"),
        (lambda: ClipCovLoss(clip_ratio=0.0), "clip_ratio"),
        (lambda: ClipCovLoss(clip_ratio=_NAN), "clip_ratio"),
        (lambda: ClipCovLoss(cov_lb=5.0, cov_ub=5.0), "cov_lb must be < cov_ub"),
        (lambda: ClipCovLoss(cov_lb=_NAN), "cov_lb"),
        (lambda: ClipCovLoss(cov_ub=_INF), "cov_ub"),
        (lambda: ClipCovLoss(seed=1.5), "seed"),
        (lambda: ClipCovLoss(min_selected=-1), "min_selected"),
        (lambda: ClipCovLoss(min_selected=1.0), "min_selected"),
        (lambda: ClipCovLoss(nonzero_adv_only=1), "nonzero_adv_only"),
        (lambda: ClipCovLoss(clip_low=_NAN), "clip_low"),
        (lambda: KLCovLoss(k_ratio=_INF), "k_ratio"),
        (lambda: KLCovLoss(k_ratio=-2e-4), "k_ratio"),
        (lambda: KLCovLoss(kl_coef=_NAN), "kl_coef"),
        (lambda: KLCovLoss(kl_coef=-1.0), "kl_coef"),
        (lambda: KLCovLoss(mode="globl"), "mode"),
        (lambda: SteerLoss(w_min=0.0), "w_min"),
        (lambda: SteerLoss(w_min=1.2, w_max=1.0), "w_min"),
        (lambda: SteerLoss(w_max=_NAN), "w_max"),
        (lambda: SteerLoss(linear="no"), "linear"),
        (lambda: SteerLoss(dual_clip=0.5), "dual_clip"),
        (lambda: EntropyBonus(coef=-0.1), "coef"),
        (lambda: EntropyBonus(coef=_NAN), "coef"),
        (lambda: EntropyBonus(target=_NAN), "target"),
        (lambda: EntropyBonus(target=-1.0), "target"),
        (lambda: EntropyBonus(delta=_INF), "delta"),
        (lambda: EntropyBonus(coef_min=0.5, coef_max=0.1), "coef_max"),
        (lambda: EntropyBonus(agg="sum"), "agg"),
    ],
)
def test_bad_constructor_arguments_raise(build, match):
    with pytest.raises(EntrotrainError, match=match):
        build()


def test_entropy_bonus_controller_skips_nonfinite_entropy():
    mask = torch.ones(2, 4, dtype=torch.bool)
    low = torch.full((2, 4), 0.1)
    dirty = low.clone()
    dirty[0, 1] = float("nan")
    clean_bonus, dirty_bonus = EntropyBonus(0.0, target=0.5, delta=0.01), EntropyBonus(0.0, target=0.5, delta=0.01)
    for step in range(3):
        clean_bonus(entropy=low[:, [0, 2, 3]], mask=mask[:, :3], step=step)
        dirty_bonus(entropy=dirty, mask=mask, step=step)
    # the NaN token is left out of the window: the controller moves as on the finite tokens (H = 0.1 < target)
    assert torch.equal(dirty_bonus.coef, clean_bonus.coef) and bool(dirty_bonus.active)
    assert float(dirty_bonus.coef) == pytest.approx(0.02)
