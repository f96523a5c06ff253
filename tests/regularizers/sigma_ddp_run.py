"""Run by test_sigma_reparam.py as a script: 2 CPU processes (gloo DDP) train a σReparam TinyGPT a few steps.

Each rank sees different batches (DistributedSampler) and writes its final state dict to ``OUT/rank{r}.pt``;
rank 0 also writes the state at conversion to ``OUT/init.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.ddp_trainer import ddp_trainer, rank_loader  # noqa: E402
from tests.helpers.gpt_module import SEQ, VOCAB, GPTModule  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    L.seed_everything(3)
    module = GPTModule(convert=True)
    trainer = ddp_trainer(max_steps=4, use_distributed_sampler=False)
    rank = trainer.strategy.cluster_environment.global_rank()
    if rank == 0:
        torch.save({k: v.clone() for k, v in module.state_dict().items()}, out / "init.pt")
    data = torch.randint(0, VOCAB, (32, SEQ + 1), generator=torch.Generator().manual_seed(0))
    trainer.fit(module, rank_loader(trainer, TensorDataset(data), batch_size=4))
    torch.save({k: v.detach().clone() for k, v in module.state_dict().items()}, out / f"rank{rank}.pt")
