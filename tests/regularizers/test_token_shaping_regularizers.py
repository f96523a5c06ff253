"""PEARShaping (reward shaper), CANONAdvantage (advantage estimator): values against the functional forms and CANON's
code transcribed in float64, metrics hand-computed, composition, the error contract, and GRPOTask plugging them in
(default path unchanged: group-normalised advantages of the task reward)."""

from __future__ import annotations

import math

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.functional.token_shaping import pear_reward, phase_ids_from_delimiter, sequence_entropy
from entrotrain.regularizers.token_shaping import (
    AdvantageOutput,
    CANONAdvantage,
    PEARShaping,
    RewardShaperSum,
    ShapedRewards,
)
from tests.helpers.contracts import NAN
from tests.helpers.token_shaping_reference import canon_reference


def _rollout(b=8, t=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.rand(b, t, generator=g) * 2
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None] < lengths[:, None]
    ids = torch.randint(3, 6, (b, t), generator=g)
    rewards = (torch.rand(b, generator=g) < 0.5).float()
    return rewards, h, mask, ids


# ------------------------------------------------------------------ PEAR


def test_pear_hand_computed_rewards_and_metrics():
    h = torch.tensor([[2.0, 4.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    ids = torch.tensor([[3, 3, 9, 3], [3, 9, 3, 3]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    out = PEARShaping(delimiter_ids=9, think_coef=0.5)(torch.tensor([1.0, 0.0]), h, m, token_ids=ids)
    assert isinstance(out, ShapedRewards)
    assert out.rewards.tolist() == [1.0 - 1.5, 0.0 - 0.5]
    assert out.phase_ids.tolist() == [[0, 0, 1, -1], [0, 1, 1, 1]]
    mt = out.metrics
    assert mt["pear/penalty"].item() == pytest.approx(-1.0)
    assert mt["pear/think_entropy"].item() == pytest.approx((2 + 4 + 1) / 3)  # pooled over the think tokens
    assert mt["pear/answer_entropy"].item() == pytest.approx((1 + 1 + 1 + 1) / 4)
    assert mt["pear/think_length"].item() == 1.5 and mt["pear/answer_length"].item() == 2.0
    assert all(not v.requires_grad for v in mt.values())


def test_pear_phase_ids_win_and_match_functional():
    rewards, h, m, ids = _rollout()
    phases = phase_ids_from_delimiter(ids, m, [4, 5])
    shaper = PEARShaping(delimiter_ids=[3], think_coef=0.3, answer_coef=0.1, max_penalty=0.4)
    out = shaper(rewards, h, m, token_ids=ids, phase_ids=phases)
    expect = rewards + pear_reward(h, m, phases, think_coef=0.3, answer_coef=0.1, max_penalty=0.4)
    assert torch.equal(out.rewards, expect) and out.phase_ids is phases


def test_pear_half_precision_entropy_and_empty_batch():
    rewards, h, m, ids = _rollout()
    a = PEARShaping(delimiter_ids=4)(rewards, h.bfloat16(), m, token_ids=ids)
    b = PEARShaping(delimiter_ids=4)(rewards, h.bfloat16().float(), m, token_ids=ids)
    assert a.rewards.dtype == torch.float32 and torch.allclose(a.rewards, b.rewards, atol=1e-6)
    empty = PEARShaping(delimiter_ids=4)(torch.zeros(0), torch.zeros(0, 5), torch.zeros(0, 5, dtype=torch.bool),
                                         token_ids=torch.zeros(0, 5, dtype=torch.long))  # fmt: skip
    assert empty.rewards.shape == (0,) and all(math.isfinite(v.item()) for v in empty.metrics.values())


def test_pear_nan_entropy_stays_in_its_row():
    rewards, h, m, ids = _rollout()
    h[2, 0] = NAN
    m[2, 0] = True
    out = PEARShaping(delimiter_ids=4)(rewards, h, m, token_ids=ids)
    bad = torch.isnan(out.rewards)
    assert bad.tolist() == [i == 2 for i in range(8)]
    assert all(math.isfinite(v.item()) for k, v in out.metrics.items() if "length" in k or "penalty" in k)


def test_pear_phase_entropy_metrics_pool_the_finite_tokens_of_a_row_holding_a_nan():
    # row 1's think phase holds a NaN: the pooled think entropy is over the finite think tokens, (1 + 1 + 3) / 3
    # (it gave 0.5: row 1's NaN phase mean counted as 0 for both of its tokens)
    h = torch.tensor([[1.0, 1.0, 2.0], [NAN, 3.0, 4.0]])
    phases = torch.tensor([[0, 0, 1], [0, 0, 1]])
    out = PEARShaping()(torch.zeros(2), h, torch.ones(2, 3, dtype=torch.bool), phase_ids=phases)
    assert out.metrics["pear/think_entropy"].item() == pytest.approx(5 / 3)
    assert out.metrics["pear/answer_entropy"].item() == pytest.approx(3.0)
    assert out.metrics["pear/think_length"].item() == 2.0  # lengths count every valid token


def test_shapers_compose_by_adding_terms():
    rewards, h, m, ids = _rollout()
    a, b = PEARShaping(delimiter_ids=4, think_coef=0.2), PEARShaping(delimiter_ids=5, think_coef=0.0, answer_coef=0.3)
    both = a + b
    assert isinstance(both, RewardShaperSum) and len((both + a).terms) == 3
    out = both(rewards, h, m, token_ids=ids)
    ta = a(rewards, h, m, token_ids=ids).rewards - rewards
    tb = b(rewards, h, m, token_ids=ids).rewards - rewards
    assert torch.allclose(out.rewards, rewards + ta + tb, atol=1e-6)
    assert "pear/penalty" in out.metrics and "pear/penalty.1" in out.metrics
    assert torch.equal(out.phase_ids, phase_ids_from_delimiter(ids, m, 4))


def test_pear_errors_name_the_argument():
    rewards, h, m, ids = _rollout()
    for kwargs, word in [
        ({"think_coef": -0.1}, "think_coef"),
        ({"answer_coef": NAN}, "answer_coef"),
        ({"max_penalty": 0}, "max_penalty"),
        ({"delimiter_ids": []}, "delimiter_ids"),
    ]:
        with pytest.raises(EntrotrainError, match=word):
            PEARShaping(**kwargs)
    with pytest.raises(EntrotrainError, match="phase_ids=|delimiter_ids"):
        PEARShaping()(rewards, h, m, token_ids=ids)
    with pytest.raises(EntrotrainError, match="rewards"):
        PEARShaping(delimiter_ids=4)(rewards[:, None], h, m, token_ids=ids)
    with pytest.raises(EntrotrainError, match="entropy"):
        PEARShaping(delimiter_ids=4)(rewards[:4], h, m, token_ids=ids)
    with pytest.raises(EntrotrainError, match="token_ids"):
        PEARShaping(delimiter_ids=4)(rewards, h, m, token_ids=ids[:, :3])
    with pytest.raises(EntrotrainError, match="mask"):
        PEARShaping(delimiter_ids=4)(rewards, h, m[:, :3], token_ids=ids)


# ------------------------------------------------------------------ CANON


@pytest.mark.parametrize("metric", ["entropy", "length"])
@pytest.mark.parametrize("group_size", [1, 3, 4])
def test_canon_matches_the_reference_code(metric, group_size):
    b = 12
    rewards, h, m, _ = _rollout(b=b, seed=group_size)
    est = CANONAdvantage(lam=0.7, alpha=1.2, beta=0.1, metric=metric, length_norm=8192.0)
    out = est(rewards, group_size, entropy=h, mask=m)
    assert isinstance(out, AdvantageOutput) and out.advantages.shape == (b,)
    value = [(h[i][m[i]].double().sum() / (m[i].sum() + 1e-8)).item() for i in range(b)] if metric == "entropy" else [
        float(m[i].sum()) for i in range(b)
    ]
    ref = canon_reference(rewards.double(), value, [i // group_size for i in range(b)], 1.2, 0.1, 0.7, 8192.0, metric)
    assert torch.allclose(out.advantages.double(), ref, atol=1e-9)


def test_canon_metrics_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    h = torch.tensor([[0.1], [0.2], [0.4], [0.3]])
    out = CANONAdvantage()(rewards, 2, entropy=h, mask=torch.ones(4, 1, dtype=torch.bool))
    # group 0: low = row 0 (r 1), high = row 1 (r 0); group 1: low = row 3 (r 1), high = row 2 (r 0)
    assert out.metrics["canon/reward_high"].item() == 0.0 and out.metrics["canon/reward_low"].item() == 1.0
    assert out.metrics["canon/metric_high"].item() == pytest.approx(0.3)
    assert out.metrics["canon/metric_low"].item() == pytest.approx(0.2)
    assert out.advantages.tolist() == [1.0 - 0.0, 0.0 - 1.0, 0.0 - 1.0, 1.0 - 0.0]  # lam = 1: vs the other group
    assert out.metrics["canon/adv_abs"].item() == 1.0


def test_canon_batch_reward_schedule_is_the_annealed_variant():
    rewards, h, m, _ = _rollout(b=12, seed=5)
    out = CANONAdvantage(lam=0.1, alpha=3.0, beta=2.0, lam_schedule="batch_reward")(rewards, 4, entropy=h, mask=m)
    mean_r = float(rewards.double().mean())
    value = [(h[i][m[i]].double().sum() / (m[i].sum() + 1e-8)).item() for i in range(12)]
    # the code: mean_of_all = 1 - mean(r); high: (1 - mean_of_all)(r - mu-) + mean_of_all (r - mu+)
    ref = canon_reference(rewards.double(), value, [i // 4 for i in range(12)], 1.0, 0.0, mean_r)
    assert torch.allclose(out.advantages.double(), ref, atol=1e-6)
    assert out.metrics["canon/lam"].item() == pytest.approx(mean_r)
    with pytest.raises(EntrotrainError, match="lam_schedule"):
        CANONAdvantage(lam_schedule="cosine")


def test_canon_errors_and_empty():
    rewards, h, m, _ = _rollout()
    for kwargs, word in [({"lam": NAN}, "lam"), ({"metric": "sum"}, "metric"), ({"length_norm": -1}, "length_norm")]:
        with pytest.raises(EntrotrainError, match=word):
            CANONAdvantage(**kwargs)
    with pytest.raises(EntrotrainError, match="entropy"):
        CANONAdvantage()(rewards, 4, mask=m)
    with pytest.raises(EntrotrainError, match="mask"):
        CANONAdvantage()(rewards, 4, entropy=h)
    with pytest.raises(EntrotrainError, match="group_size"):
        CANONAdvantage()(rewards, 3, entropy=h, mask=m)
    assert CANONAdvantage(metric="length")(rewards, 4, mask=m).advantages.shape == (8,)  # no entropy needed
    empty = CANONAdvantage()(torch.zeros(0), 4, entropy=torch.zeros(0, 3), mask=torch.zeros(0, 3, dtype=torch.bool))
    assert empty.advantages.shape == (0,) and all(v.item() == 0 for k, v in empty.metrics.items() if k != "canon/lam")


# ------------------------------------------------------------------ GRPOTask


def _task(**kw):
    from entrotrain.tasks.arithmetic import ArithmeticDataModule
    from entrotrain.tasks.grpo import GRPOTask

    dm = ArithmeticDataModule(num_digits=1, operation="add", prompts_per_batch=4, num_batches=2, seed=0)
    task = GRPOTask(n_layer=1, n_head=2, n_embd=32, block_size=12, group_size=4, ppo_epochs=1, num_mini_batches=1,
                    sft_steps=3, sft_batch_size=16, **kw)  # fmt: skip
    return task, dm


def _fit(task, dm, *callbacks):
    from tests.helpers.lightning_models import quiet_trainer
    from tests.helpers.recorders import OutputsRecorder

    capture = OutputsRecorder()
    trainer = quiet_trainer(callbacks=[capture, *callbacks], max_epochs=1, max_steps=-1, deterministic=False,
                            log_every_n_steps=1)  # fmt: skip
    trainer.fit(task, dm)
    return trainer, capture.outputs


def test_grpo_task_with_pear_and_canon():
    from entrotrain.tasks.arithmetic import EOS

    torch.manual_seed(0)
    from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor

    task, dm = _task(reward_shaping=PEARShaping(delimiter_ids=EOS, think_coef=0.2), advantage_estimator=CANONAdvantage())
    monitor = PolicyEntropyMonitor(window=2, entropy_length_corr=True, print_summary=False, log_media=False)
    trainer, outs = _fit(task, dm, monitor)
    out = outs[-1]
    mask = out["response_mask"]
    assert out["phase_ids"].shape == mask.shape and (out["phase_ids"][~mask] == -1).all()
    expect_shaped = out["rewards"] + pear_reward(out["token_entropy"], mask, out["phase_ids"], think_coef=0.2)
    torch.testing.assert_close(out["shaped_rewards"], expect_shaped)
    metric = sequence_entropy(out["token_entropy"], mask)
    ref = canon_reference(out["shaped_rewards"].double(), metric.double(), [i // 4 for i in range(16)])
    torch.testing.assert_close(out["advantages"].double(), ref, atol=1e-6, rtol=0)
    assert monitor.last_logged["phase0/length"] + monitor.last_logged["phase1/length"] == pytest.approx(
        float(mask.sum()) / mask.shape[0]
    )  # the phases PEAR used reach the monitor through training_step's "phase_ids"
    for key in ("grpo/shaped_reward_mean", "grpo/pear/penalty", "grpo/canon/reward_high", "grpo/reward_mean",
                "entropy/policy/phase0/mean", "entropy/policy/hwe_frac"):  # fmt: skip
        assert key in trainer.callback_metrics, sorted(trainer.callback_metrics)


def test_grpo_task_default_path_unchanged():
    from entrotrain.tasks.grpo import group_advantages

    torch.manual_seed(0)
    task, dm = _task()
    trainer, outs = _fit(task, dm)
    out = outs[-1]
    assert "phase_ids" not in out and "shaped_rewards" not in out
    torch.testing.assert_close(out["advantages"], group_advantages(out["rewards"], 4))
    assert not any(k.startswith(("grpo/pear", "grpo/canon", "grpo/shaped")) for k in trainer.callback_metrics)


def test_grpo_yaml_builds_the_pieces(tmp_path):
    from jsonargparse import ArgumentParser

    from entrotrain.tasks.grpo import GRPOTask

    cfg = tmp_path / "m.yaml"
    cfg.write_text(
        "model:\n"
        "  reward_shaping:\n"
        "    class_path: entrotrain.regularizers.token_shaping.PEARShaping\n"
        "    init_args: {delimiter_ids: [2], think_coef: 0.05}\n"
        "  advantage_estimator:\n"
        "    class_path: entrotrain.regularizers.token_shaping.CANONAdvantage\n"
        "    init_args: {lam: 0.5, metric: length}\n"
    )
    parser = ArgumentParser()
    parser.add_class_arguments(GRPOTask, "model")
    init = parser.instantiate(parser.parse_path(str(cfg)))
    task = init.model
    assert isinstance(task.reward_shaping, PEARShaping) and task.reward_shaping.think_coef == 0.05
    assert isinstance(task.advantage_estimator, CANONAdvantage) and task.advantage_estimator.metric == "length"
