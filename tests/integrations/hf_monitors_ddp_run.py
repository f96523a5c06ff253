"""RouterEntropyMonitor and PredictionEntropyMonitor (head, probe, generation) under 2-process CPU DDP (gloo) in HF
Trainer, and the same step in one process.

``python hf_monitors_ddp_run.py OUT`` starts two ranks (each trains one step with lr = 0 on its half of 8 padded rows
and writes ``rank{r}.json``: what it logged). The test runs ``run(OUT, "single", 8, None)`` itself (one process, all
8 rows) and checks that the reduced statistics equal the one-process statistics of the union batch, on every rank.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

VOCAB, T, ROWS = 40, 10, 8


def _rows(rows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(rows):
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        mask = (torch.arange(T) < T - r % 4).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    return out


def run(out: Path, name: str, per_device: int, backend: str | None) -> None:
    from transformers import MixtralConfig, MixtralForCausalLM, Trainer, TrainingArguments

    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from entrotrain.callbacks.router_monitor import RouterEntropyMonitor
    from entrotrain.integrations.transformers import EntropyTrainerCallback

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    model = MixtralForCausalLM(config)
    probe = {k: torch.stack([r[k] for r in _rows(4, seed=7)]) for k in ("input_ids", "attention_mask", "labels")}
    args = TrainingArguments(
        str(out / f"run_{name}"), max_steps=1, per_device_train_batch_size=per_device, logging_steps=1,
        learning_rate=0.0, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, ddp_backend=backend,
    )
    trainer = Trainer(model=model, args=args, train_dataset=_rows(ROWS, seed=1))
    cb = EntropyTrainerCallback(
        [
            RouterEntropyMonitor(log_media=False, print_summary=False),
            PredictionEntropyMonitor(
                source="head", shift_labels=True, probe=probe, generation_prompts=2, prompt_length=3,
                max_new_tokens=3, log_media=False, print_summary=False,
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
