"""A LanguageModelingTask whose learning rate follows ``CosineAnnealingLR(T_max=cosine_steps)``: a scheduler whose
configuration is in its ``state_dict`` (``T_max``), for the fork tests of ``tests/test_resume_fork_findings.py``."""

from __future__ import annotations

from typing import Any

import torch

from entrotrain.tasks import LanguageModelingTask


class CosineLM(LanguageModelingTask):
    """:class:`LanguageModelingTask` with a per-step cosine schedule over ``cosine_steps`` steps (no warmup)."""

    def __init__(self, *args: Any, cosine_steps: int = 8, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's return type is a union
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.cosine_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
