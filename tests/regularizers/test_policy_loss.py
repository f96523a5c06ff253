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
