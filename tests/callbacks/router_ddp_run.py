"""RouterEntropyMonitor under 2-process CPU DDP (gloo), one logging step on a two-layer toy MoE with right-padded
batches (HF models are covered in one process: importing transformers in both ranks doubles the run time); rank 0 writes what it logged and the collectives the flush issued. Run by test_router_monitor.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def samples(n: int = 8, seq: int = 6, dim: int = 6, seed: int = 0) -> list[dict]:
    """Per-sample dicts (inputs, targets, HF-style attention_mask) with varied right padding; default collation
    stacks them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        mask = torch.ones(seq, dtype=torch.long)
        pad = i % 3
        if pad:
            mask[seq - pad :] = 0
        out.append({"x": torch.randn(seq, dim, generator=g), "y": torch.randn(seq, dim, generator=g),
                    "attention_mask": mask})
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import lightning as L

    from entrotrain.callbacks.router_monitor import RouterEntropyMonitor
    from tests.helpers.ddp_trainer import count_collectives, ddp_trainer, rank_loader
    from tests.helpers.router_models import ToyMoE

    out = Path(sys.argv[1])
    accumulate = int(sys.argv[2])
    L.seed_everything(3)
    model = ToyMoE(seed=0)
    monitor = RouterEntropyMonitor(every_n_steps=100, top_k=2, log_media=False, print_summary=False)
    trainer = ddp_trainer(
        callbacks=[monitor], max_steps=1, accumulate_grad_batches=accumulate, use_distributed_sampler=False
    )
    collectives = count_collectives(monitor, "_flush")
    trainer.fit(model, rank_loader(trainer, samples(), batch_size=2))
    if trainer.is_global_zero:
        out.write_text(json.dumps({"logged": monitor.last_logged, "collectives": collectives}))
