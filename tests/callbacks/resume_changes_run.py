"""ResumeWithChanges on 2-process CPU DDP (gloo): resume a checkpoint with a lower learning rate; each rank writes the
learning rate its optimizer had at the first resumed step. Run by test_resume_with_changes.py, which reads the
printed lines and the run record.

Also holds the small LightningModule, data and trainer the tests use, so the script and the tests train the same
model: ``Net(lr, width, t_max, betas)`` (AdamW, a cosine schedule of period ``t_max`` when > 0, hyperparameters
saved) on a fixed regression set.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

IN = 4


class Net(L.LightningModule):
    """``body`` = Linear(4, width) → tanh → Linear(width, 1); MSE; AdamW(lr, betas), cosine period ``t_max``."""

    def __init__(self, lr: float = 0.01, width: int = 8, t_max: int = 0,
                 betas: tuple[float, float] = (0.9, 0.95)) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(IN, width), nn.Tanh(), nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.mse_loss(self(x), y))

    def scheduler_period(self) -> int:
        return int(self.hparams.t_max)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> dict | None:
        """Lightning's scheduler config: a cosine of period :meth:`scheduler_period` (none when <= 0); tests
        replace it."""
        if self.scheduler_period() <= 0:
            return None
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.scheduler_period())
        return {"scheduler": cosine, "interval": "step"}

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.betas))
        scheduler = self.scheduler(optimizer)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}


def loader(n: int = 64, batch_size: int = 4) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, IN, generator=g)
    y = x.sum(1, keepdim=True).sin()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class Spy(Callback):
    """Each step's optimizer learning rates and Adam moments of the first parameter, before the step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.exp_avg: list[torch.Tensor | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        optimizer = trainer.optimizers[0]
        self.lrs.append([g["lr"] for g in optimizer.param_groups])
        state = optimizer.state.get(optimizer.param_groups[0]["params"][0], {})
        self.exp_avg.append(state["exp_avg"].clone() if "exp_avg" in state else None)


def trainer(root: Path, *callbacks: Callback, max_steps: int = 4, checkpoints: bool = False, record: bool = True,
            **kwargs) -> L.Trainer:
    """A quiet CPU trainer logging every step into ``RunRecordLogger(root)`` (``record``); ``checkpoints``: a
    checkpoint every 2 steps into ``root/ckpts``."""
    from entrotrain.dashboards.run_record import RunRecordLogger

    extra = [ModelCheckpoint(dirpath=root / "ckpts", every_n_train_steps=2, save_top_k=-1)] if checkpoints else []
    defaults = dict(accelerator="cpu", devices=1, max_steps=max_steps, log_every_n_steps=1,
                    logger=RunRecordLogger(root) if record else False, enable_checkpointing=checkpoints,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs}, callbacks=[*callbacks, *extra])


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from entrotrain.callbacks.resume_with_changes import ResumeWithChanges

    ckpt, root = Path(sys.argv[1]), Path(sys.argv[2])
    spy = Spy()
    fit = trainer(root, ResumeWithChanges(), spy, devices=2, strategy="ddp", max_steps=4)
    fit.fit(Net(lr=0.001), loader(), ckpt_path=str(ckpt))
    (root / f"rank{fit.global_rank}.json").write_text(json.dumps({"lrs": spy.lrs, "step": fit.global_step}))
