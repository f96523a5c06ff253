"""Tiny HF causal LMs for ``transformers.Trainer`` tests (from configs: random weights, no download), their
training rows, and one HF Trainer step on 2 forked CPU ranks (gloo) or in one process: shared by
tests/integrations' EntropyTrainerCallback tests and their DDP run scripts (``hf_*ddp_run.py``)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp

from tests.helpers.gloo import free_port


def tiny_gpt2_lm(vocab: int, t: int, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, width-16, 2-head ``GPT2LMHeadModel`` with ``t`` positions and no dropout (runs are comparable),
    its weights drawn after ``torch.manual_seed(seed)``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab, n_positions=t, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def lm_rows(rows: int, vocab: int, t: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """``rows`` unpadded rows of ``t`` random ids; the labels are the ids."""
    ids = torch.randint(0, vocab, (rows, t), generator=torch.Generator().manual_seed(seed))
    return [{"input_ids": r, "labels": r} for r in ids]


def tiny_mixtral_lm(vocab: int, seed: int = 0, experts: int = 4, top_k: int = 2) -> torch.nn.Module:
    """A 2-layer, hidden-16 ``MixtralForCausalLM`` (2 heads, 1 KV head) with ``experts`` experts, ``top_k`` per
    token, its weights drawn after ``torch.manual_seed(seed)``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=experts, num_experts_per_tok=top_k, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )
    return MixtralForCausalLM(config)


def padded_rows(rows: int, vocab: int, t: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Right-padded rows: row r keeps its first ``t - r % 4`` tokens (ids in 1..vocab-1, padding id 0); padded
    labels are -100."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(rows):
        ids = torch.randint(1, vocab, (t,), generator=g)
        mask = (torch.arange(t) < t - r % 4).long()
        ids = torch.where(mask.bool(), ids, torch.zeros_like(ids))
        out.append({"input_ids": ids, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    return out


def stack_rows(rows: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch of ``rows`` (each field stacked along a new first dimension)."""
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def train_one_step(
    out: Path, name: str, model: torch.nn.Module, data: list, monitors: Callable[[], list], per_device: int,
    backend: str | None,
) -> None:
    """One HF Trainer step with lr = 0 on ``data`` (``per_device`` rows per process) under an
    ``EntropyTrainerCallback`` of ``monitors()`` (built after the Trainer); writes ``out/{name}.json``: the world
    size and what the callback logged."""
    from transformers import Trainer, TrainingArguments

    from entrotrain.integrations.transformers import EntropyTrainerCallback

    args = TrainingArguments(
        str(out / f"run_{name}"), max_steps=1, per_device_train_batch_size=per_device, logging_steps=1,
        learning_rate=0.0, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, ddp_backend=backend,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    cb = EntropyTrainerCallback(monitors()).attach(trainer)
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
