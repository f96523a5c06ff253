"""Run by test_policy_monitor_shaping.py as a script: 2 CPU ranks (gloo DDP), each returning its own rows of one
batch with phase ids (different sizes and lengths per rank); rank 0 writes what the monitor logged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor  # noqa: E402
from tests.helpers.lightning_models import quiet_trainer  # noqa: E402
from tests.helpers.policy_batches import ReturnsBatches, loader, rl_batch  # noqa: E402

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


def rank_batches(rank: int, n: int) -> list[dict]:
    """Rank 0 holds rows 0..3 of each union batch, truncated to 7 tokens; rank 1 rows 4..5, all 9 tokens."""
    out = []
    for s in range(n):
        union = phased_batch(100 + s)
        rows = slice(0, 4) if rank == 0 else slice(4, 6)
        part = {k: (v[rows] if hasattr(v, "dim") else v) for k, v in union.items()}
        if rank == 0:
            part = {k: (v[:, :7] if hasattr(v, "dim") and v.dim() == 2 else v) for k, v in part.items()}
        out.append(part)
    return out


if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    monitor = PolicyEntropyMonitor(**MONITOR)
    trainer = quiet_trainer(callbacks=[monitor], max_steps=3, devices=2, strategy="ddp", deterministic=False)
    rank = trainer.strategy.cluster_environment.global_rank()
    trainer.fit(ReturnsBatches(rank_batches(rank, 3)), loader(6))
    if trainer.is_global_zero:
        out.write_text(json.dumps(monitor.last_logged))
