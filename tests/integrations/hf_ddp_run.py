"""EntropyTrainerCallback under 2-process CPU DDP (gloo) in HF Trainer, and the same step in one process.

``python hf_ddp_run.py OUT`` starts two ranks (each trains one step with lr = 0 on its half of 8 rows and writes
``rank{r}.json``: what it logged). The test runs ``run(OUT, "single", 8, None)`` itself (one process, all 8 rows)
and checks that the reduced statistics equal the one-process statistics of the union batch, on every rank.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

VOCAB, T, ROWS = 48, 12, 8


def run(out: Path, name: str, per_device: int, backend: str | None) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
    from entrotrain.integrations.transformers import EntropyTrainerCallback

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, VOCAB, (ROWS, T), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(
        str(out / f"run_{name}"), max_steps=1, per_device_train_batch_size=per_device, logging_steps=1,
        learning_rate=0.0, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, ddp_backend=backend,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    cb = EntropyTrainerCallback(
        [
            AttentionEntropyMonitor(max_rows=None, max_queries=None, log_media=False, print_summary=False),
            RepresentationEntropyMonitor(
                include=["transformer.h.?"], measures=("rankme", "matrix_entropy"), max_tokens=None,
                log_spectrum=False, print_summary=False,
            ),
        ]
    ).attach(trainer)
    trainer.train()
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    (out / f"{name}.json").write_text(json.dumps({"world": world, "metrics": cb.last_metrics}))


def _worker(rank: int, world: int, port: int, out: Path) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    run(out, f"rank{rank}", ROWS // world, "gloo")


def main(out: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, out), nprocs=2, join=True, start_method="fork")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
