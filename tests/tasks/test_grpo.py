from __future__ import annotations

import lightning as L
import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.regularizers import PPOClipLoss
from entrotrain.tasks.arithmetic import EOS, PAD, ArithmeticDataModule, encode
from entrotrain.tasks.grpo import GRPOTask, group_advantages, response_mask
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.recorders import OutputsRecorder

# Tiny models: one intra-op thread (the suite's two threads make the warm start ~10x slower on a loaded machine).
pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_layer=1, n_head=2, n_embd=32, block_size=12, group_size=4, ppo_epochs=2, num_mini_batches=2)


def _trainer(**kw) -> L.Trainer:
    return quiet_trainer(**{"max_epochs": 1, "max_steps": -1, "deterministic": False, **kw})


def test_group_advantages_match_brute_force():
    g = torch.Generator().manual_seed(0)
    rewards = (torch.rand(6 * 5, generator=g) < 0.4).float()
    rewards[:5] = 1.0  # a group with equal rewards: advantage 0
    for norm in (True, False):
        got = group_advantages(rewards, 5, norm_by_std=norm, eps=1e-6)
        for gi in range(6):
            r = rewards[gi * 5 : (gi + 1) * 5].tolist()
            mean = sum(r) / 5
            std = (sum((x - mean) ** 2 for x in r) / 4) ** 0.5
            for j in range(5):
                want = (r[j] - mean) / (std + 1e-6) if norm else r[j] - mean
                assert abs(float(got[gi * 5 + j]) - want) < 1e-5
    assert torch.all(group_advantages(rewards, 5)[:5] == 0)
    with pytest.raises(EntrotrainError, match="multiple of group_size"):
        group_advantages(rewards, 7)
    with pytest.raises(EntrotrainError, match="group_size must be >= 2"):
        group_advantages(rewards, 1)


def test_response_mask_up_to_first_eos():
    d = encode("3")[0]
    resp = torch.tensor([[d, d, EOS, PAD], [EOS, PAD, PAD, PAD], [d, d, d, d], [d, EOS, d, EOS]])
    want = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(response_mask(resp), want)


def _task_with_dm(seed: int = 0, **kw):
    torch.manual_seed(seed)
    task = GRPOTask(**{**SMALL, "sft_steps": 0, **kw})
    dm = ArithmeticDataModule(num_digits=1, prompts_per_batch=4, num_batches=2, seed=seed)
    return task, dm


def test_logprob_alignment_against_per_token_loop():
    task, dm = _task_with_dm(temperature=0.7)
    t = dm.task
    prompts, _ = t.sample(6, torch.Generator().manual_seed(3))
    resp = task.generate(prompts, t.max_new_tokens)
    assert resp.shape == (6, t.max_new_tokens)
    logits = task.response_logits(prompts, resp)
    from entrotrain.functional.policy import token_logprobs

    fast = token_logprobs(logits, resp, temperature=0.7)
    with torch.no_grad():
        for i in range(6):
            for j in range(t.max_new_tokens):
                ctx = torch.cat([prompts[i], resp[i, :j]])[None]
                z = task.model(ctx)[0, -1] / 0.7
                want = torch.log_softmax(z, -1)[resp[i, j]]
                assert abs(float(fast[i, j]) - float(want)) < 1e-5, (i, j)


def test_generation_pads_after_eos_and_greedy_is_argmax():
    task, dm = _task_with_dm()
    t = dm.task
    prompts, _ = t.sample(32, torch.Generator().manual_seed(1))
    resp = task.generate(prompts, t.max_new_tokens)
    mask = response_mask(resp)
    assert torch.all(resp[~mask] == PAD)
    greedy = task.generate(prompts, t.max_new_tokens, greedy=True)
    logits = task.response_logits(prompts, greedy)
    m = response_mask(greedy)
    assert torch.equal(logits.argmax(-1)[m], greedy[m])


class SpyLoss(PPOClipLoss):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def forward(self, logprobs, old_logprobs, advantages, mask, *, entropy=None, step=None):
        self.calls.append((logprobs.detach().clone(), old_logprobs.clone(), advantages.clone(), mask.clone()))
        return super().forward(logprobs, old_logprobs, advantages, mask, entropy=entropy, step=step)


def test_padding_and_prompt_tokens_give_no_loss():
    task, dm = _task_with_dm()
    t = dm.task
    prompts, _ = t.sample(8, torch.Generator().manual_seed(2))
    resp = task.generate(prompts, t.max_new_tokens)
    d = encode("1")[0]
    resp[:, 0] = d
    resp[:, 1] = EOS  # every response ends at position 1; positions 2.. are padding
    mask = response_mask(resp)
    adv = torch.randn(8)
    with torch.no_grad():
        old = task.response_logits(prompts, resp).log_softmax(-1).gather(-1, resp[..., None])[..., 0] - 0.1

    def grads(r):
        task.zero_grad()
        loss, _ = task.update_loss(prompts, r, old, adv, mask)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in task.model.parameters()]

    l1, g1 = grads(resp)
    other = resp.clone()
    other[:, 2:] = torch.randint(3, 13, other[:, 2:].shape)  # change only tokens after <eos>
    l2, g2 = grads(other)
    assert torch.allclose(l1, l2)
    assert all(torch.allclose(a, b) for a, b in zip(g1, g2))
    # the loss sees response tokens only: one log-prob per response position, none for the prompt
    spy = SpyLoss()
    task.policy_loss = spy
    task.update_loss(prompts, resp, old, adv, mask)
    lp, _, _, m = spy.calls[0]
    assert lp.shape == resp.shape and torch.equal(m, mask)


def test_fit_changes_weights_and_returns_contract():
    task, dm = _task_with_dm(sft_steps=5, sft_batch_size=16)
    spy = SpyLoss()
    task.policy_loss = spy
    before = [p.detach().clone() for p in task.model.parameters()]
    cap = OutputsRecorder()
    trainer = _trainer(callbacks=[cap], log_every_n_steps=1)
    trainer.fit(task, dm)
    assert bool(task.warm_started)
    # 2 rollouts x ppo_epochs 2 x 2 mini-batches optimizer steps
    assert trainer.global_step == 8 and len(spy.calls) == 8
    assert any(not torch.equal(a, b) for a, b in zip(before, task.model.parameters()))
    out = cap.outputs[-1]
    B, R = 4 * 4, dm.task.max_new_tokens
    for key in ("token_entropy", "logprobs", "post_logprobs", "post_token_entropy"):
        assert out[key].shape == (B, R) and out[key].dtype == torch.float32 and not out[key].requires_grad
    assert out["response_mask"].dtype == torch.bool and out["response_mask"].shape == (B, R)
    assert out["advantages"].shape == (B,) and out["rewards"].shape == (B,)
    assert isinstance(out["temperature"], float)
    assert torch.all(out["token_entropy"][~out["response_mask"]] == 0)
    assert torch.all(out["token_entropy"][out["response_mask"]] > 0)
    # the first update of a rollout is on-policy: its old log-probs equal the current ones
    lp, old, adv, m = spy.calls[-4]
    torch.testing.assert_close(lp[m], old[m], atol=1e-5, rtol=0)
    # advantages are the group-normalised rewards of this rollout
    torch.testing.assert_close(out["advantages"], group_advantages(out["rewards"], 4))
    metrics = trainer.callback_metrics
    for key in ("grpo/reward_mean", "grpo/accuracy", "grpo/response_length", "grpo/token_entropy", "grpo/loss"):
        assert key in metrics, sorted(metrics)
    assert "grpo/policy/ppo_kl" in metrics
    assert "token entropy" in task.summary() and len(task._history) == 2


def test_warm_start_learns_the_task():
    task, dm = _task_with_dm(sft_steps=100, sft_batch_size=64, sft_lr=5e-3, sft_noise=0.0)
    prompts, answers = dm.task.sample(200, torch.Generator().manual_seed(5))

    def greedy_accuracy():
        return float(dm.task.reward(task.generate(prompts, dm.task.max_new_tokens, greedy=True), answers).mean())

    assert greedy_accuracy() < 0.05  # untrained
    loss = task.warm_start(dm.task)
    assert loss < 1.2 and greedy_accuracy() > 0.12 and bool(task.warm_started)


def test_bad_arguments_raise():
    with pytest.raises(EntrotrainError, match="group_size"):
        GRPOTask(group_size=1)
    with pytest.raises(EntrotrainError, match="temperature"):
        GRPOTask(temperature=0.0)
    with pytest.raises(EntrotrainError, match="ppo_epochs"):
        GRPOTask(ppo_epochs=0)
    with pytest.raises(EntrotrainError, match="sft_noise"):
        GRPOTask(sft_noise=2.0)
    task = GRPOTask(**{**SMALL, "block_size": 8, "sft_steps": 0})
    with pytest.raises(EntrotrainError, match="block_size"):
        _trainer(max_steps=1).fit(task, ArithmeticDataModule(num_digits=2, num_batches=1))
    with pytest.raises(EntrotrainError, match="ArithmeticDataModule"):
        _trainer(max_steps=1).fit(GRPOTask(**{**SMALL, "sft_steps": 0}), _OtherDM())


class _OtherDM(L.LightningDataModule):
    def train_dataloader(self):
        return torch.utils.data.DataLoader([{"prompt_ids": torch.zeros(3, dtype=torch.long)}], batch_size=None)



def test_two_rank_ddp_keeps_ranks_identical_on_different_prompts(tmp_path):
    """Several manual backward passes per training_step under DDP: gradients are still averaged across ranks (the
    weights stay identical although each rank rolls out its own prompts), and RL really moved them."""
    import json
    from pathlib import Path

    from tests.helpers.scripts import run_script

    run_script(Path(__file__).with_name("grpo_ddp_run.py"), tmp_path, str(tmp_path))
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 4
    assert r0["prompts"] != r1["prompts"]
    assert r0["checksum"] == r1["checksum"]
    assert r0["checksum"] != r0["warm"]
