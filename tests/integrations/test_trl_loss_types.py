"""Every TRL ``loss_type``'s normaliser against entrotrain's: ``trl_grpo_loss(loss_type=...)`` and ``_TRL_AGG``.

TRL 1.16 ``GRPOTrainer._compute_loss`` (per micro-batch, :math:`m` the completion mask, :math:`B` its rows):
``grpo``/``sapo`` ``mean_b(sum_t l m / max(1, sum_t m))``; ``bnpo`` ``sum l m / max(1, sum m)``; ``dr_grpo``
``sum l m / (B * max_completion_length)``; ``dapo``/``cispo``/``vespo`` ``sum l m / D`` with ``D`` =
``num_items_in_batch / processes * accumulation / steps_per_generation`` (no division by the accumulation steps);
``luspo`` ``mean_b(sum_t l m)``; every type but the ``dapo`` family then divides by the accumulation steps.
Transcribed below in float64 and checked against TRL's own ``_compute_loss`` with the tiny model of test_trl.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("trl")

from trl import GRPOTrainer  # noqa: E402

from entrotrain.callbacks.policy_monitor import policy_entropy_summary  # noqa: E402
from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations.trl import (  # noqa: E402
    _TRL_AGG,
    TRL_PPO_LOSS_TYPES,
    EntrotrainGRPOTrainer,
    trl_grpo_loss,
)
from entrotrain.regularizers.policy_loss import ClipCovLoss, EntropyBonus, PPOClipLoss  # noqa: E402
from tests.integrations.test_trl import (  # noqa: E402
    _inputs,
    _loss_and_grads,
    _model,
    _train,
    _trainer,
    _with_old_logps,
)

L_MAX = 8  # max_completion_length of the transcriptions


def _trl_normalised(values: torch.Tensor, mask: torch.Tensor, loss_type: str, max_len: int = L_MAX) -> torch.Tensor:
    """TRL 1.16's aggregation of per-token ``values (B, T)`` for one micro-batch, one process, no accumulation
    (``num_items_in_batch`` = this micro-batch's valid tokens), transcribed from ``_compute_loss``."""
    m = mask.to(values.dtype)
    if loss_type in ("grpo", "sapo"):
        return ((values * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "bnpo":
        return (values * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return (values * m).sum() / (values.size(0) * max_len)
    if loss_type in ("dapo", "cispo", "vespo"):
        return (values * m).sum() / m.sum().clamp(min=1.0)
    if loss_type == "luspo":
        return (values * m).sum(-1).mean()
    raise AssertionError(loss_type)


@st.composite
def _batches(draw):
    """float64 ratios on both clip sides, ragged completions, some rows fully masked (mask_truncated_completions)."""
    b, t = draw(st.integers(1, 6)), draw(st.integers(1, L_MAX))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    old = logp + torch.randn(b, t, generator=g, dtype=torch.float64) * 0.4
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    return logp, old, adv, mask


@pytest.mark.parametrize("loss_type", TRL_PPO_LOSS_TYPES)
@settings(max_examples=40, deadline=None)
@given(batch=_batches())
def test_trl_grpo_loss_is_trls_normaliser_of_the_clipped_surrogate(loss_type, batch):
    logp, old, adv, mask = batch
    loss = trl_grpo_loss(0.2, 0.28, loss_type=loss_type, max_completion_length=L_MAX)
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.28) * a)  # TRL's two-sided min
    expected = _trl_normalised(per_token, mask.long(), loss_type)
    got = loss(logp, old, adv, mask).loss
    assert got.dtype == torch.float64
    # grpo: verl's per-sequence count + 1e-8 (it rounds away in float32: bit for bit there, see the TRL test below)
    if loss_type == "grpo":  # each row's mean is off by at most 1e-8 of it (values can cancel: absolute bound)
        assert abs(float(got - expected)) <= 2e-8 * float(per_token.abs().max()) + 1e-15
    else:
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@settings(max_examples=40, deadline=None)
@given(batch=_batches())
def test_dr_grpo_divides_by_the_constant_length_and_every_row(batch):
    """The padded width T and the rows with a token are what PPOClipLoss used before max_length / all_sequences."""
    logp, old, adv, mask = batch
    per_token = PPOClipLoss(log_ratio_clamp=None).per_token(logp, old, adv, mask)[0]
    expected = _trl_normalised(per_token, mask, "dr_grpo")
    got = PPOClipLoss(log_ratio_clamp=None, agg="seq-mean-token-sum-norm", max_length=L_MAX, all_sequences=True)(
        logp, old, adv, mask
    ).loss
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)
    # the same options reach every loss that aggregates: Clip-Cov with nothing picked, the entropy bonus
    cov = ClipCovLoss(clip_ratio=1e-9, min_selected=0, clip_low=0.2, clip_high=0.2, agg="seq-mean-token-sum-norm",
                      max_length=L_MAX, all_sequences=True)(logp, old, adv, mask)  # fmt: skip
    torch.testing.assert_close(cov.loss, expected, rtol=1e-12, atol=1e-15)
    h = -logp
    bonus = EntropyBonus(1.0, agg="seq-mean-token-sum-norm", max_length=L_MAX, all_sequences=True)(
        entropy=h, mask=mask
    ).loss
    torch.testing.assert_close(-bonus, _trl_normalised(h, mask, "dr_grpo"), rtol=1e-12, atol=1e-15)


def test_the_old_normaliser_differs_where_trl_dr_grpo_does():
    """Padded width 4 < max_completion_length 8, one row fully masked: T and the valid rows give another loss."""
    logp = torch.full((2, 4), -1.0, dtype=torch.float64)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    adv = torch.tensor([1.0, 1.0], dtype=torch.float64)
    values = torch.full((2, 4), -1.0, dtype=torch.float64)  # on-policy: l = -A
    expected = _trl_normalised(values, mask, "dr_grpo")  # -2 / (2 * 8)
    assert float(expected) == -0.125
    old = PPOClipLoss(log_ratio_clamp=None, agg="seq-mean-token-sum-norm")(logp, logp, adv, mask).loss
    assert float(old) == -0.5  # -2 / (1 row * 4)
    new = trl_grpo_loss(loss_type="dr_grpo", max_completion_length=8)(logp, logp, adv, mask).loss
    assert float(new) == -0.125
    grpo = trl_grpo_loss(loss_type="grpo")(logp, logp, adv, mask).loss
    assert float(_trl_normalised(values, mask, "grpo")) == -0.5  # the mean over both rows
    assert float(grpo) == pytest.approx(-0.5, rel=1e-8)  # (verl's + 1e-8 in the row's count, float64)


def test_normaliser_options_are_checked():
    with pytest.raises(EntrotrainError, match="max_length.*seq-mean-token-sum-norm"):
        PPOClipLoss(max_length=8)  # token-mean does not use it
    with pytest.raises(EntrotrainError, match="max_length"):
        PPOClipLoss(agg="seq-mean-token-sum-norm", max_length=0)
    with pytest.raises(EntrotrainError, match="all_sequences"):
        PPOClipLoss(all_sequences="yes")
    with pytest.raises(EntrotrainError, match="max_completion_length"):
        trl_grpo_loss(loss_type="dr_grpo")
    with pytest.raises(EntrotrainError, match="sapo"):
        trl_grpo_loss(loss_type="sapo")


@settings(max_examples=25, deadline=None)
@given(window=st.lists(_batches(), min_size=1, max_size=3), global_agg=st.booleans())
def test_token_mean_over_the_window_is_the_window_token_mean(window, global_agg):
    """TRL's dapo: each micro-batch's token sum over the window's valid tokens D, added over the window, is the token
    mean of the whole window (every token weighs alike), for every token-mean term of a sum (global_agg too: D is
    already the window's count); a term with another agg keeps its own count, and the count is gone after the
    block."""
    loss = PPOClipLoss(log_ratio_clamp=None, global_agg=global_agg) + EntropyBonus(0.5, global_agg=global_agg)
    other = EntropyBonus(0.5, agg="seq-mean-token-mean")
    tokens = sum(int(mask.sum()) for _, _, _, mask in window)
    d = torch.tensor(float(max(tokens, 1)), dtype=torch.float64)  # TRL's num_items_in_batch.clamp(min=1)
    got = torch.zeros((), dtype=torch.float64)
    pg_sum = h_sum = torch.zeros((), dtype=torch.float64)
    for logp, old, adv, mask in window:
        with loss._token_mean_over(d), other._token_mean_over(d):
            got = got + loss(logp, old, adv, mask, entropy=-logp).loss
            inside = other(entropy=-logp, mask=mask).loss
        torch.testing.assert_close(inside, other(entropy=-logp, mask=mask).loss, rtol=0, atol=0)
        per_token = PPOClipLoss(log_ratio_clamp=None).per_token(logp, old, adv, mask)[0]
        pg_sum = pg_sum + torch.where(mask, per_token, 0.0).sum()
        h_sum = h_sum + torch.where(mask, -logp, 0.0).sum()
    torch.testing.assert_close(got, (pg_sum - 0.5 * h_sum) / d, rtol=1e-12, atol=1e-15)
    assert all(term._window_tokens is None for term in [*loss.terms, other])


def _window(trainer, steps: int = 2) -> list[dict]:
    """One accumulation window of ``steps`` micro-batches with different valid-token counts (24 and 16: the second
    has two completions zeroed, as mask_truncated_completions does); ``num_items_in_batch`` counts the whole window,
    as TRL's generation batch does with ``steps_per_generation = gradient_accumulation_steps``."""
    batches = [_with_old_logps(trainer, _inputs(seed)) for seed in range(steps)]
    batches[-1]["completion_mask"] = batches[-1]["completion_mask"].clone()
    batches[-1]["completion_mask"][[1, 6]] = 0
    counts = [int(b["completion_mask"].sum()) for b in batches]
    assert len(set(counts)) == steps  # the micro-batches weigh differently from their tokens
    for b in batches:
        b["num_items_in_batch"] = torch.tensor(sum(counts))
    return batches


def _window_loss_and_grads(trainer, batches: list[dict]):
    """The micro-batch losses and the accumulated gradients of one window (``_compute_loss`` as TRL's training step
    calls it: ``current_gradient_accumulation_steps`` = the window's micro-batches)."""
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    trainer.current_gradient_accumulation_steps = len(batches)
    losses = []
    for inputs in batches:
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        losses.append(loss.detach())
    return losses, {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("config_type", ["dapo", "cispo", "vespo"])
def test_dapo_window_under_accumulation_equals_trls_compute_loss(tmp_path, config_type):
    """GRPOConfig(loss_type='dapo' / 'cispo' / 'vespo', gradient_accumulation_steps=2) with a token-mean entrotrain
    loss: TRL dapo's loss and gradients bit for bit over a window of micro-batches with 24 and 16 tokens (training:
    the window's tokens, no division by the accumulation steps; eval: the batch's tokens). Before, the loss was each
    micro-batch's token mean / 2 (TRL's bnpo)."""
    model = _model()
    kw = dict(epsilon=0.2, epsilon_high=0.28, max_completion_length=6, gradient_accumulation_steps=2)
    trl_side = _trainer(GRPOTrainer, tmp_path / "a", model=copy.deepcopy(model), loss_type="dapo", **kw)
    ours = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", model=copy.deepcopy(model), loss_type=config_type, **kw,
                    policy_loss=trl_grpo_loss(0.2, 0.28, loss_type="dapo"))  # fmt: skip
    assert trl_side.args.steps_per_generation == 2
    batches = _window(trl_side)
    losses_a, grads_a = _window_loss_and_grads(trl_side, batches)
    losses_b, grads_b = _window_loss_and_grads(ours, batches)
    assert all(torch.equal(a, b) for a, b in zip(losses_a, losses_b)), (losses_a, losses_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    for trainer in (trl_side, ours):  # eval: TRL divides by num_items_in_batch / processes alone
        trainer.model.eval()
    one = dict(batches[1], num_items_in_batch=batches[1]["completion_mask"].sum())
    with torch.no_grad():
        assert torch.equal(trl_side._compute_loss(trl_side.model, one), ours._compute_loss(ours.model, one))


def test_dapo_with_another_agg_in_the_sum_keeps_the_micro_batch_mean(tmp_path):
    """A term that is not token-mean (here a zero-coefficient seq-mean-token-mean entropy bonus): the window count
    is not used, the loss is each micro-batch's own aggregation / the accumulation steps, as before."""
    model = _model()
    kw = dict(loss_type="dapo", max_completion_length=6, gradient_accumulation_steps=2)
    window = _trainer(EntrotrainGRPOTrainer, tmp_path / "a", model=copy.deepcopy(model), **kw,
                      policy_loss=trl_grpo_loss(loss_type="dapo"))  # fmt: skip
    mixed = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", model=copy.deepcopy(model), **kw,
                     policy_loss=trl_grpo_loss(loss_type="dapo") + EntropyBonus(0.0, agg="seq-mean-token-mean"))
    batches = _window(window)
    losses_w, _ = _window_loss_and_grads(window, batches)
    losses_m, _ = _window_loss_and_grads(mixed, batches)
    for w, m, inputs in zip(losses_w, losses_m, batches):
        d, n = float(inputs["num_items_in_batch"]), float(inputs["completion_mask"].sum())
        torch.testing.assert_close(m, w * d / n / 2, rtol=1e-6, atol=0)  # the micro-batch mean / 2
        assert not torch.equal(m, w)


def test_dapo_training_steps_under_accumulation_equal_trl_bit_for_bit(tmp_path):
    """Two optimizer steps of 2 accumulated micro-batches: TRL dapo and trl_grpo_loss('dapo') end with identical
    parameters (before: 0.03 apart in some parameter)."""
    model = _model()
    kw = dict(loss_type="dapo", max_steps=2, gradient_accumulation_steps=2)
    a = _trainer(GRPOTrainer, tmp_path / "a", model=copy.deepcopy(model), **kw)
    b = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", model=copy.deepcopy(model), **kw,
                 policy_loss=trl_grpo_loss(a.epsilon_low, a.epsilon_high, loss_type="dapo"))  # fmt: skip
    _train(a)
    _train(b)
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(p, q) for p, q in zip(a.model.parameters(), model.parameters()))  # it trained


# --------------------------------------------------------------------------------------------- entropy/policy/mean


@pytest.mark.parametrize("loss_type", sorted(_TRL_AGG))
def test_stats_agg_of_each_loss_type_is_trls_aggregation_of_the_entropy(loss_type):
    """``entropy/policy/mean`` (one micro-batch, completions with >= 1 token) is TRL's normaliser of the entropies."""
    g = torch.Generator().manual_seed(1)
    b, t = 6, L_MAX
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    h = torch.rand(b, t, generator=g, dtype=torch.float64) * 2
    expected = _trl_normalised(h, mask, loss_type)
    logp = -torch.rand(b, t, generator=g, dtype=torch.float64)
    summary = policy_entropy_summary(h, logp, torch.randn(b, generator=g, dtype=torch.float64), mask,
                                     agg=_TRL_AGG[loss_type], max_length=L_MAX)  # fmt: skip
    rel = 2e-8 if _TRL_AGG[loss_type] == "seq-mean-token-mean" else 1e-12  # verl's + 1e-8 in each row's count
    assert summary["mean"] == pytest.approx(float(expected), rel=rel)


# --------------------------------------------------------------------------------------------- TRL's own loss


@pytest.mark.parametrize("loss_type", TRL_PPO_LOSS_TYPES)
def test_trl_grpo_loss_equals_trls_compute_loss(tmp_path, loss_type):
    """Against TRL's ``_compute_loss`` on the tiny Qwen2 (B = 8 rows, one row zeroed as mask_truncated_completions
    does): loss and gradients bit for bit, dr_grpo's loss to rounding (summation order, see trl_grpo_loss)."""
    model = _model()
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, max_completion_length=6)
    trl_side = _trainer(GRPOTrainer, tmp_path / "a", model=copy.deepcopy(model), **kw)
    ours = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", model=copy.deepcopy(model), **kw,
                    policy_loss=trl_grpo_loss(0.2, 0.28, loss_type=loss_type, max_completion_length=6))  # fmt: skip
    for seed in (0, 1):
        inputs = _with_old_logps(trl_side, _inputs(seed))
        inputs["completion_mask"] = inputs["completion_mask"].clone()
        inputs["completion_mask"][3] = 0  # a truncated completion, masked out
        inputs["num_items_in_batch"] = inputs["completion_mask"].sum()
        loss_a, grads_a = _loss_and_grads(trl_side, inputs)
        loss_b, grads_b = _loss_and_grads(ours, inputs)
        if loss_type == "dr_grpo":
            torch.testing.assert_close(loss_b, loss_a, rtol=2e-6, atol=1e-8)
        else:
            assert torch.equal(loss_a, loss_b)
        assert grads_a.keys() == grads_b.keys() and grads_a
        for name in grads_a:
            assert torch.equal(grads_a[name], grads_b[name]), name


def test_dr_grpo_statistics_use_max_completion_length(tmp_path):
    """TRL's dr_grpo and an entrotrain loss with max_length give the statistic their constant L (not the padded
    width)."""
    trl_loss = _trainer(EntrotrainGRPOTrainer, tmp_path / "a", loss_type="dr_grpo", max_completion_length=6)
    assert trl_loss.policy_stats.monitor.agg == "seq-mean-token-sum-norm"
    assert trl_loss.policy_stats.monitor.agg_max_length == 6
    ours = _trainer(EntrotrainGRPOTrainer, tmp_path / "b", loss_type="grpo", max_completion_length=6,
                    policy_loss=trl_grpo_loss(loss_type="dr_grpo", max_completion_length=5) + EntropyBonus(0.01))
    assert ours.policy_stats.monitor.agg_max_length == 5
    grpo = _trainer(EntrotrainGRPOTrainer, tmp_path / "c", loss_type="grpo", max_completion_length=6)
    assert grpo.policy_stats.monitor.agg_max_length is None
    assert grpo.policy_stats.monitor.agg == "seq-mean-token-mean"
