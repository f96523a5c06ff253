"""Run by test_grpo.py as a script: GRPO with Clip-Cov in global mode on 2 CPU ranks (gloo DDP), one rollout of
4 updates; each rank writes a checksum of its weights, its prompts and its first reward."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.regularizers import ClipCovLoss  # noqa: E402
from entrotrain.tasks import ArithmeticDataModule, GRPOTask  # noqa: E402


class Record(L.Callback):
    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.warm: list[float] = []

    def on_train_start(self, trainer, pl_module):  # after the warm start (on_fit_start), before any RL update
        self.warm = [float(p.double().sum()) for p in pl_module.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.prompts.append(batch["prompt_ids"][:, 1:].flatten().tolist())


if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(0)
    model = GRPOTask(
        n_layer=1, n_head=2, n_embd=32, block_size=8, group_size=4, ppo_epochs=2, num_mini_batches=2,
        sft_steps=150, sft_batch_size=64, sft_lr=1e-2, policy_loss=ClipCovLoss(clip_ratio=0.1, mode="global", seed=0),
    )
    data = ArithmeticDataModule(num_digits=1, prompts_per_batch=8, num_batches=1, seed=0)
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
    )
    trainer.fit(model, data)
    checksum = [float(p.double().sum()) for p in model.parameters()]
    rank = trainer.global_rank
    (out / f"rank{rank}.json").write_text(
        json.dumps({"checksum": checksum, "warm": record.warm, "prompts": record.prompts, "steps": trainer.global_step})
    )
