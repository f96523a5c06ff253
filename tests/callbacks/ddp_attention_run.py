"""Run by test_ddp.py as a script: 2 CPU processes (gloo DDP), one logging step; rank 0 writes what it logged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.callbacks import AttentionEntropyMonitor  # noqa: E402
from tests.helpers.lightning_models import TinyLM, quiet_trainer, token_loader  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    accumulate = int(sys.argv[2])
    L.seed_everything(3)
    model = TinyLM()
    monitor = AttentionEntropyMonitor(every_n_steps=100, max_rows=None, max_queries=None)
    trainer = quiet_trainer(
        callbacks=[monitor],
        max_steps=1,
        devices=2,
        strategy="ddp",
        accumulate_grad_batches=accumulate,
        deterministic=False,
        use_distributed_sampler=False,
    )
    loader = token_loader(n=32, batch_size=4)
    rank = trainer.strategy.cluster_environment.global_rank()
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=False)
    trainer.fit(model, DataLoader(loader.dataset, batch_size=4, sampler=sampler))
    if trainer.is_global_zero:
        out.write_text(json.dumps(monitor.last_logged))
