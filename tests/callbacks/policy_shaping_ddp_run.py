"""Run by test_policy_monitor_shaping.py as a script: 2 CPU ranks (gloo DDP), each returning its own rows of one
batch with phase ids (different sizes and lengths per rank: tests/helpers/policy_batches.rank_batches); rank 0
writes what the monitor logged."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor  # noqa: E402
from tests.helpers.policy_batches import fit_rank_batches, rl_batch  # noqa: E402

MONITOR = dict(window=3, hwe_threshold=1.0, entropy_length_corr=True, fit_min_points=2, print_summary=False)


def phased_batch(seed: int) -> dict:
    """rl_batch plus phase ids: phase 0 before a random cut, phase 1 from it on, -1 on padding."""
    batch = rl_batch(seed)
    g = torch.Generator().manual_seed(seed + 7)
    mask = batch["response_mask"]
    cut = torch.randint(0, mask.shape[1] + 1, (mask.shape[0],), generator=g)
    phases = (torch.arange(mask.shape[1])[None] >= cut[:, None]).long()
    batch["phase_ids"] = torch.where(mask, phases, torch.full_like(phases, -1))
    return batch


if __name__ == "__main__":
    L.seed_everything(0)
    fit_rank_batches(PolicyEntropyMonitor(**MONITOR), Path(sys.argv[1]), make=phased_batch)
