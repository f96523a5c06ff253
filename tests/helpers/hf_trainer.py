"""One ``transformers.Trainer`` step under an ``EntropyTrainerCallback``, in one process or on forked CPU ranks
(gloo): for the HF Trainer DDP run scripts (``tests/integrations/hf_*ddp_run.py``) and their tests."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.helpers.gloo import free_port


def train_one_step(
    out: Path, name: str, model: torch.nn.Module, data: list, monitors: Callable[[], list], per_device: int,
    backend: str | None,
) -> None:
    """One HF Trainer step with lr = 0 on ``data`` (``per_device`` rows per process) under an
    ``EntropyTrainerCallback`` of ``monitors()`` (built after the Trainer); writes ``out/{name}.json``: the world
    size and what the callback logged, and a run record under ``out/{name}_record`` (rank 0 only)."""
    from transformers import Trainer, TrainingArguments

    from entrotrain.integrations.transformers import EntropyTrainerCallback

    args = TrainingArguments(
        str(out / f"run_{name}"), max_steps=1, per_device_train_batch_size=per_device, logging_steps=1,
        learning_rate=0.0, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, ddp_backend=backend,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    cb = EntropyTrainerCallback(monitors(), record=out / f"{name}_record").attach(trainer)  # rank 0 writes
    trainer.train()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    (out / f"{name}.json").write_text(json.dumps({"world": world, "metrics": cb.last_metrics}))


def fork_ranks(run: Callable[[Path, str, int, str | None], None], out: Path, rows: int, world: int = 2) -> None:
    """Fork ``world`` processes with torchrun's environment (a free local port); rank ``r`` calls
    ``run(out, f"rank{r}", rows // world, "gloo")``, HF Trainer setting up the process group."""
    mp.start_processes(_rank, args=(world, free_port(), run, out, rows), nprocs=world, join=True, start_method="fork")


def _rank(rank: int, world: int, port: int, run: Callable, out: Path, rows: int) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    run(out, f"rank{rank}", rows // world, "gloo")
