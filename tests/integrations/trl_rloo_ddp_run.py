"""Run by test_trl_rloo.py as a script: EntrotrainRLOOTrainer on 2 forked CPU ranks (gloo, HF/accelerate set up the
process group), 2 steps of 4 completions per rank; each rank saves ``rank{r}.pt``: its logged rows, the tensors TRL
computed in its micro-batches (inputs, loss-forward entropies) and TRL's gathered rewards, per optimizer step."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.hf_trainer import fork_ranks  # noqa: E402

#: Completions per optimizer step over both ranks (2 prompts x num_generations=4).
ROWS = 8


def run(out: Path, name: str, per_device: int, backend: str | None) -> None:
    from entrotrain.integrations.trl_rloo import EntrotrainRLOOTrainer
    from tests.integrations.test_trl import _train, _trainer
    from tests.integrations.test_trl_rloo import _rows, _spy

    torch.set_num_threads(1)
    t = _trainer(EntrotrainRLOOTrainer, out / f"run_{name}", max_steps=2, per_device_train_batch_size=per_device,
                 ddp_backend=backend)
    seen = _spy(t)
    _train(t)
    torch.save(
        {"world": t.accelerator.num_processes, "rows": _rows(t), "batches": dict(seen["batches"]),
         "rewards": dict(seen["rewards"])},
        out / f"{name}.pt",
    )  # fmt: skip


if __name__ == "__main__":
    fork_ranks(run, Path(sys.argv[1]), ROWS)
