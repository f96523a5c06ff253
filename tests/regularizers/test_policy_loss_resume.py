"""Clip-Cov's random stream resumes from ``state_dict``: the call counter is saved, the micro-batch generator is
derived from (seed, rank, counter), so a resumed run picks what the uninterrupted run picks."""

from __future__ import annotations

import pytest
import torch

import entrotrain.regularizers.policy_selection as selection
from entrotrain.regularizers import ClipCovLoss


def _batch(b: int = 4, t: int = 32):
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(b, t, generator=g) * 4
    old = logp + torch.randn(b, t, generator=g) * 0.05
    adv = torch.randn(b, 1, generator=g).expand(b, t).contiguous() * 2
    return logp, old, adv, torch.ones(b, t)


def _loss(mode: str) -> ClipCovLoss:
    # a wide covariance band and a small budget: which few tokens are dropped changes the loss
    return ClipCovLoss(clip_ratio=0.05, cov_lb=-100.0, cov_ub=100.0, clip_low=0.9, clip_high=10.0, mode=mode, seed=3)


@pytest.mark.parametrize("mode", ["micro_batch", "global"])
def test_clip_cov_picks_resume_after_state_dict_round_trip(mode):
    batch = _batch()
    run = _loss(mode)
    losses = [run(*batch).loss for _ in range(4)]
    assert len({float(x) for x in losses}) == 4  # each call picks other tokens (so a replay would show)
    for k in range(3):
        first = _loss(mode)
        for _ in range(k + 1):
            first(*batch)
        resumed = _loss(mode)
        resumed.load_state_dict(first.state_dict())
        assert torch.equal(resumed(*batch).loss, losses[k + 1])


def test_clip_cov_state_dict_without_counter_still_loads():
    """A checkpoint from before the counter was saved (no ``_extra_state``) loads; the counter stays."""
    loss = _loss("micro_batch")
    loss.load_state_dict({})
    assert loss.get_extra_state() == {"calls": 0}


def test_clip_cov_micro_batch_stream_differs_per_rank(monkeypatch):
    batch = _batch()
    rank0 = _loss("micro_batch")(*batch).loss
    monkeypatch.setattr(selection, "world", lambda: (1, 2))
    rank1 = _loss("micro_batch")(*batch).loss
    assert not torch.equal(rank0, rank1)


def test_fork_that_swaps_the_policy_loss_has_no_key_problem():
    """GRPO's cure recipes resume with changes from PPOClipLoss to ClipCovLoss (and back): the saved counter of
    Clip-Cov (``policy_loss._extra_state``) is neither a missing nor an unexpected key of that fork; the new loss's
    counter starts at 0, which the fork notes."""
    from entrotrain._forked_resume import state_key_problems
    from entrotrain.regularizers import PPOClipLoss

    def task(policy_loss):
        module = torch.nn.Module()
        module.net = torch.nn.Linear(2, 2)
        module.policy_loss = policy_loss
        return module

    ppo, cov = task(PPOClipLoss()), task(_loss("global"))
    assert state_key_problems(cov, ppo.state_dict()) == ([], [], ["policy_loss._extra_state"])
    assert state_key_problems(ppo, cov.state_dict()) == ([], [], [])
    assert state_key_problems(cov, cov.state_dict()) == ([], [], [])
