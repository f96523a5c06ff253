"""Run by test_ddp.py as a script: 2 CPU processes (gloo DDP), one logging step; rank 0 writes what it logged."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.callbacks import AttentionEntropyMonitor  # noqa: E402
from tests.helpers.ddp_trainer import ddp_trainer, rank_loader  # noqa: E402
from tests.helpers.lightning_models import TinyLM, token_loader  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    accumulate = int(sys.argv[2])
    L.seed_everything(3)
    model = TinyLM()
    monitor = AttentionEntropyMonitor(every_n_steps=100, max_rows=None, max_queries=None)
    trainer = ddp_trainer(
        callbacks=[monitor], max_steps=1, accumulate_grad_batches=accumulate, use_distributed_sampler=False
    )
    trainer.fit(model, rank_loader(trainer, token_loader(n=32, batch_size=4).dataset, batch_size=4))
    if trainer.is_global_zero:
        out.write_text(json.dumps(monitor.last_logged))
