"""Policy losses against their references on random and adversarial batches (hypothesis).

The fixed-batch parity tests (``test_policy_loss.py``) use one ragged batch per mode; here the batches are drawn:
one-token responses, padding-only rows, half-precision inputs (computed in float32: compared with the reference on
the float32 upcast), several clip ranges, covariance bands and budgets, every ``loss_agg_mode``.

- ``micro_batch`` Clip-Cov / KL-Cov and ``PPOClipLoss`` against verl's functions (``tests.helpers.verl_reference``),
  bit for bit (values, gradients in float32, the clip fractions);
- ``SteerLoss`` against STEER's ``compute_token_weights`` + ``compute_policy_loss_with_entropy``
  (``zz-haooo/STEER:verl/trainer/ppo/core_algos.py``, transcribed below), bit for bit in float32;
- ``global`` KL-Cov / Clip-Cov and ``EntropyBonus`` against a float64 loop transcription of the definitions
  (covariance centred over all valid tokens, the exact budget ``floor(r N)``, ties to the smaller flat index,
  Clip-Cov's candidates ranked by the counter-based keys).
"""

from __future__ import annotations

import math
import warnings

import torch
from hypothesis import given
from hypothesis import strategies as st

from entrotrain.functional import AGG_MODES
from entrotrain.regularizers import ClipCovLoss, EntropyBonus, KLCovLoss, PPOClipLoss, SteerLoss
from entrotrain.regularizers.policy_selection import counter_uniform
from tests.helpers import verl_reference as verl


@st.composite
def rl_batch(draw, dtypes=(torch.float32, torch.bfloat16, torch.float16)):
    b, t = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    dtype = draw(st.sampled_from(dtypes))
    scale = draw(st.sampled_from([0.5, 3.0, 10.0]))
    if draw(st.booleans()):
        adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous() * scale  # GRPO: one value per response
    else:
        adv = torch.randn(b, t, generator=g) * scale
    logp = -torch.rand(b, t, generator=g) * 4
    old = logp + torch.randn(b, t, generator=g) * draw(st.sampled_from([0.05, 0.5, 2.0]))
    mask = torch.rand(b, t, generator=g) < draw(st.sampled_from([0.5, 0.9, 1.0]))
    mask[0, 0] = True  # at least one valid token (verl divides 0 by 0 otherwise)
    if b > 1 and draw(st.booleans()):
        mask[-1] = False  # a padding-only row
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask


def _grads(fn, logp):
    x = logp.clone().requires_grad_()
    out = fn(x)
    loss = out[0] if isinstance(out, tuple) else out.loss
    loss.backward()
    return out, x.grad


# ------------------------------------------------------------------------------------------- verl, micro-batch


@given(rl_batch(), st.sampled_from(AGG_MODES), st.sampled_from([(0.2, 0.2), (0.2, 0.28), (1.0, 1.0)]),
       st.sampled_from([3.0, 10.0]))  # fmt: skip
def test_ppo_clip_equals_verl_vanilla_on_drawn_batches(batch, agg, clip, dual):
    logp, old, adv, mask = batch
    maskf = mask.float()
    ref, ref_grad = _grads(
        lambda x: verl.compute_policy_loss_vanilla(old.float(), x, adv.float(), maskf, agg, clip[0], clip[1], dual),
        logp.float(),
    )
    out, grad = _grads(lambda x: PPOClipLoss(*clip, dual_clip=dual, agg=agg)(x, old, adv, maskf), logp)
    assert torch.equal(out.loss.detach(), ref[0].detach())
    assert torch.equal(out.metrics["policy/ppo_kl"], ref[2])
    assert torch.equal(out.metrics["policy/dual_clip_frac"], ref[3])
    if logp.dtype == torch.float32:
        assert torch.equal(grad, ref_grad)


@given(rl_batch(), st.sampled_from(AGG_MODES), st.sampled_from([2e-4, 0.1, 0.5, 1.0]))
def test_kl_cov_micro_batch_equals_verl_on_drawn_batches(batch, agg, ratio):
    logp, old, adv, mask = batch
    maskf = mask.float()
    ref, ref_grad = _grads(
        lambda x: verl.compute_policy_loss_kl_cov(old.float(), x, adv.float(), maskf, agg, kl_cov_ratio=ratio),
        logp.float(),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the on-policy warning (old == logp never happens here)
        out, grad = _grads(lambda x: KLCovLoss(k_ratio=ratio, agg=agg, mode="micro_batch")(x, old, adv, maskf), logp)
    assert torch.equal(out.loss.detach(), ref[0].detach())
    assert torch.equal(out.metrics["policy/ppo_kl_abs"], ref[2])
    assert int(out.metrics["policy/cov_selected"]) == max(1, int(int(mask.sum()) * ratio))
    if logp.dtype == torch.float32:
        assert torch.equal(grad, ref_grad)


@given(rl_batch(), st.sampled_from(AGG_MODES), st.sampled_from([2e-4, 0.1, 0.5]),
       st.sampled_from([(1.0, 5.0), (-1.0, 100.0), (0.0, 1.0)]), st.sampled_from([(0.2, 0.2), (1.0, 1.0)]),
       st.integers(0, 3))  # fmt: skip
def test_clip_cov_micro_batch_equals_verl_on_drawn_batches(batch, agg, ratio, band, clip, seed):
    logp, old, adv, mask = batch
    maskf = mask.float()
    torch.manual_seed(seed)  # both draw the same randperm from the global RNG
    ref, ref_grad = _grads(
        lambda x: verl.compute_policy_loss_clip_cov(
            old.float(), x, adv.float(), maskf, agg, ratio, clip[0], clip[1], band[0], band[1]
        ),
        logp.float(),
    )
    torch.manual_seed(seed)
    loss_fn = ClipCovLoss(ratio, band[0], band[1], clip[0], clip[1], agg, mode="micro_batch", seed=None)
    out, grad = _grads(lambda x: loss_fn(x, old, adv, maskf), logp)
    assert torch.equal(out.loss.detach(), ref[0].detach())
    assert torch.equal(out.metrics["policy/cov_selected_frac"], ref[1])  # verl's pg_clipfrac, renamed
    assert torch.equal(out.metrics["policy/ppo_kl"], ref[2])
    if logp.dtype == torch.float32:
        assert torch.equal(grad, ref_grad)


# ------------------------------------------------------------------------------------------- STEER


def _steer_token_weights(advantages, entropys, old_log_prob, log_prob, response_mask, w_min, w_max, linear):
    """STEER's compute_token_weights (float32, no grad), transcribed."""
    with torch.no_grad():
        x = torch.clamp(torch.exp(log_prob), min=1e-8, max=1.0 - 1e-8)
        f_x = x * (1 - x) * (torch.log(x) + entropys)
        old_prob = torch.clamp(torch.exp(old_log_prob), min=1e-8, max=1.0)
        metric = advantages / old_prob * f_x
        metric = torch.where(torch.isfinite(metric), metric, torch.zeros_like(metric)).abs()
        valid = response_mask.bool()
        values = metric[valid]
        lo, hi = values.min(), values.max()
        weights = torch.zeros_like(metric, dtype=torch.float)
        if linear:
            if hi > lo:
                w = w_max - (values - lo) * ((w_max - w_min) / (hi - lo))
            else:
                w = torch.full_like(values, (w_min + w_max) / 2)
            w = torch.clamp(w, min=w_min, max=w_max)
        else:
            k = -torch.log(torch.tensor(w_min, dtype=metric.dtype)) / torch.maximum(hi, torch.tensor(0.02))
            w = torch.clamp(torch.exp(-k * values), min=w_min, max=1.0)
        weights[valid] = w
        return weights * response_mask.float()


def _steer_loss(old_log_prob, log_prob, advantages, response_mask, entropys, clip_low, clip_high, clip_ratio_c, agg,
                w_min, w_max, linear):  # fmt: skip
    """STEER's compute_policy_loss_with_entropy (the loss), transcribed."""
    weights = _steer_token_weights(advantages, entropys, old_log_prob, log_prob, response_mask, w_min, w_max, linear)
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0))
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    clip_pg_losses2 = torch.min(-advantages * clip_ratio_c, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return verl.agg_loss(pg_losses * weights, response_mask, agg), weights


STEER_WEIGHTS = [(0.8, 1.0, False), (0.8, 1.2, True), (0.5, 1.0, False)]  # (w_min, w_max, linear)


@given(rl_batch(dtypes=(torch.float32,)), st.sampled_from(AGG_MODES), st.sampled_from(STEER_WEIGHTS),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_steer_loss_equals_steer_code_on_drawn_batches(batch, agg, weights, seed):
    logp, old, adv, mask = batch
    w_min, w_max, linear = weights
    ent = torch.rand(logp.shape, generator=torch.Generator().manual_seed(seed)) * 3
    maskf = mask.float()
    (ref, ref_w), ref_grad = _grads(
        lambda x: _steer_loss(old, x, adv, maskf, ent, 0.2, 0.28, 10.0, agg, w_min, w_max, linear), logp
    )
    loss_fn = SteerLoss(w_min, w_max, linear, 0.2, 0.28, 10.0, agg)
    out, grad = _grads(lambda x: loss_fn(x, old, adv, maskf, entropy=ent), logp)
    assert torch.equal(out.loss.detach(), ref.detach())
    assert torch.equal(grad, ref_grad)
    assert torch.equal(out.metrics["policy/token_weight_min"], ref_w[mask].min())
    assert torch.equal(out.metrics["policy/token_weight_max"], ref_w[mask].max())


# ------------------------------------------------------------------------------------------- global mode, float64


def _agg64(values, mask, agg):
    """The four aggregation modes by loops in float64 (verl's +1e-8 in seq-mean-token-mean)."""
    b, t = len(values), len(values[0])
    rows = [[values[i][j] for j in range(t) if mask[i][j]] for i in range(b)]
    kept = [r for r in rows if r]
    if agg == "token-mean":
        return sum(sum(r) for r in kept) / sum(len(r) for r in kept)
    if agg == "seq-mean-token-sum":
        return sum(sum(r) for r in kept) / len(kept)
    if agg == "seq-mean-token-mean":
        return sum(sum(r) / (len(r) + 1e-8) for r in kept) / len(kept)
    return sum(sum(r) for r in kept) / len(kept) / t  # seq-mean-token-sum-norm (verl >= 0.9, Dr. GRPO)


def _cov64(logp, adv, mask):
    cells = [(i, j) for i in range(len(mask)) for j in range(len(mask[0])) if mask[i][j]]
    mean_l = sum(logp[i][j] for i, j in cells) / len(cells)
    mean_a = sum(adv[i][j] for i, j in cells) / len(cells)
    return cells, {(i, j): (logp[i][j] - mean_l) * (adv[i][j] - mean_a) for i, j in cells}


@given(rl_batch(dtypes=(torch.float64,)), st.sampled_from(AGG_MODES), st.sampled_from([0.1, 0.3, 0.5, 1.0]),
       st.integers(0, 1000))  # fmt: skip
def test_global_kl_cov_and_clip_cov_equal_their_definitions(batch, agg, ratio, step):
    logp, old, adv, mask = batch
    lp, od, a, m = logp.tolist(), old.tolist(), adv.tolist(), mask.tolist()
    cells, cov = _cov64(lp, a, m)
    t = logp.shape[1]
    k = int(ratio * len(cells))

    def per_token(fn):
        return [[fn(i, j) if m[i][j] else 0.0 for j in range(t)] for i in range(len(m))]

    # KL-Cov: the k largest covariances (ties: smaller flat index) get + |log r|
    top = set(sorted(cells, key=lambda c: (-cov[c], c[0] * t + c[1]))[:k])
    kl = per_token(lambda i, j: -a[i][j] * math.exp(lp[i][j] - od[i][j]) + (abs(lp[i][j] - od[i][j]) if (i, j) in top
                                                                               else 0.0))  # fmt: skip
    out = KLCovLoss(k_ratio=ratio, agg=agg, mode="global")(logp, old, adv, mask)
    assert abs(out.loss.item() - _agg64(kl, m, agg)) <= 1e-12 * (1 + abs(out.loss.item()))
    assert int(out.metrics["policy/cov_selected"]) == k

    # Clip-Cov: candidates are unclipped tokens with lb < cov < ub; the k with the largest keys are zeroed
    lb, ub = -1.0, 4.0

    def ppo(i, j):
        r = math.exp(lp[i][j] - od[i][j])
        return max(-a[i][j] * r, -a[i][j] * min(max(r, 0.8), 1.2))

    def clipped(i, j):
        r = math.exp(lp[i][j] - od[i][j])
        return -a[i][j] * min(max(r, 0.8), 1.2) > -a[i][j] * r

    cand = [c for c in cells if not clipped(*c) and lb < cov[c] < ub]
    keys = counter_uniform(7, step, torch.arange(logp.numel()).reshape(logp.shape)).tolist()
    picked = set(sorted(cand, key=lambda c: (-keys[c[0]][c[1]], c[0] * t + c[1]))[:k])
    cc = per_token(lambda i, j: 0.0 if (i, j) in picked else ppo(i, j))
    out = ClipCovLoss(ratio, lb, ub, agg=agg, mode="global", seed=7)(logp, old, adv, mask, step=step)
    assert abs(out.loss.item() - _agg64(cc, m, agg)) <= 1e-12 * (1 + abs(out.loss.item()))
    assert int(out.metrics["policy/cov_selected"]) == min(k, len(cand))


@given(rl_batch(dtypes=(torch.float64,)), st.sampled_from(AGG_MODES), st.integers(0, 2**31 - 1))
def test_entropy_bonus_equals_minus_coef_times_the_aggregated_entropy(batch, agg, seed):
    _, _, _, mask = batch
    ent = torch.rand(mask.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    ent[~mask] = float("nan")  # padding never enters
    out = EntropyBonus(0.3, agg=agg)(entropy=ent, mask=mask)
    ref = -0.3 * _agg64(ent.tolist(), mask.tolist(), agg)
    assert abs(out.loss.item() - ref) <= 1e-12
