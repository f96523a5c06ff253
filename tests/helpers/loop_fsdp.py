"""FSDP2 (``fully_shard``) in a hand-written training loop under :class:`~entrotrain.integrations.loop.EntropyMonitors`:
the model, the monitors and the loop that tests/integrations/loop_fsdp2_run.py (2 gloo ranks) and
tests/integrations/test_loop_scale.py (the one-process reference) both run.

The model is tests/helpers/fsdp_models.py's :class:`FSDPLM` (two pre-LN attention blocks, a top-2 MoE layer, LM and
class heads) with σReparam-converted blocks and a root ``forward(idx, labels=None)``: the loop calls
``model(x, labels=y)``, where the prediction monitor reads the labels (a plain loop hands monitors no batch). No
regulariser: the loss is the LM cross-entropy plus the class cross-entropy.

Data-parallel arithmetic. Rank ``r`` of ``W`` runs rows ``r·BATCH ... (r+1)·BATCH - 1`` of each union batch of
:func:`~tests.helpers.fsdp_models.union_loader` (one forward of its half, its mean loss); FSDP2 averages the
gradients over ranks. The reference runs one forward of the whole union batch (every monitor sees it, as one process
would) with ``chunks=W``: the loss is the mean of the ``W`` row blocks' mean losses, whose gradient is the ranks'
average gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from entrotrain.integrations.loop import EntropyMonitors
from entrotrain.regularizers.sigma_reparam import sigma_reparam
from tests.helpers.fsdp_models import BATCH, HEAD, MLP, ROUTER, SEQ, VOCAB, FSDPLM, probe

__all__ = ["LOOP_STEPS", "LoopLM", "hooks", "loss_of", "make_monitors", "monitor_list", "rank_batch", "shard", "train"]

#: optimizer steps of the loop; the monitors log at every one
LOOP_STEPS = 3


class LoopLM(FSDPLM):
    """:class:`FSDPLM` without regularisers, ``blocks.*`` σReparam-converted (``blocks.{0,1}.attn.qkv``, ``.proj``,
    ``.mlp.fc``, ``.mlp.proj``), whose root forward takes the labels as a keyword argument (read by the loop's
    prediction monitor, ignored by the model)."""

    def __init__(self, seed: int = 3) -> None:
        torch.manual_seed(seed)
        super().__init__(regularize=False)
        sigma_reparam(self, include="blocks.**")

    def forward(self, idx: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        return super().forward(idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def shard(model: nn.Module, world: int) -> None:
    """``fully_shard`` every block, the MoE layer and the root on a 1-D CPU mesh of ``world`` ranks (what Lightning's
    ``ModelParallelStrategy(data_parallel_size=world)`` builds: ``init_device_mesh("cpu", (world,))``)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model.moe, mesh=mesh)
    fully_shard(model, mesh=mesh)


def monitor_list() -> list[Any]:
    """Attention, representation, σReparam, router and two prediction monitors (the model output with a probe whose
    second batch has one row and generation; the ``lm_head`` hook with the probe): exact (no sampling), no media, no
    summaries. Their periods do not matter: the loop passes ``every_n_steps=1``."""
    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
    from entrotrain.callbacks.router_monitor import RouterEntropyMonitor
    from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor

    quiet = dict(log_media=False, print_summary=False)
    return [
        AttentionEntropyMonitor(every_n_steps=5, max_rows=None, max_queries=None, **quiet),
        RepresentationEntropyMonitor(
            stage="train", include=["blocks.0", MLP, "ln_f"], measures=["rankme", "effective_rank", "matrix_entropy"],
            every_n_steps=5, max_samples=4096, max_tokens=None, log_spectrum=False, print_summary=False,
        ),
        SigmaReparamMonitor(every_n_steps=5),
        RouterEntropyMonitor(every_n_steps=5, include=[ROUTER], top_k=2, mask_key=None, **quiet),
        PredictionEntropyMonitor(
            every_n_steps=5, source="output", probe=probe(), floor=2.5, positions=[0, 3, 7],
            generation_prompts=[[1, 2, 3], [4, 5, 6], [7]], max_new_tokens=3, context_size=SEQ, **quiet,
        ),
        PredictionEntropyMonitor(
            every_n_steps=5, source="head", head=HEAD, prefix="entropy/pred_head", probe=probe(), floor=2.5,
            positions=[0, 3, 7], **quiet,
        ),
    ]


def loss_of(model: nn.Module, batch: Sequence[torch.Tensor], chunks: int = 1) -> torch.Tensor:
    """One forward of ``batch`` ``(ids, labels, advantage, class)``; the mean over ``chunks`` equal row blocks of
    (LM cross-entropy + class cross-entropy) on the block's rows."""
    x, y, _, cls = batch
    logits = model(x, labels=y)
    class_logits = model.class_logits
    n = x.shape[0] // chunks
    losses = []
    for c in range(chunks):
        rows = slice(c * n, (c + 1) * n)
        loss = F.cross_entropy(logits[rows].reshape(-1, VOCAB), y[rows].reshape(-1))
        losses.append(loss + F.cross_entropy(class_logits[rows], cls[rows]))
    return torch.stack(losses).mean()


def rank_batch(batch: Sequence[torch.Tensor], rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s rows of a union batch (``BATCH`` rows per rank, in rank order)."""
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    return [t[rows] for t in batch]


def train(
    model: nn.Module, batches: Sequence[Sequence[torch.Tensor]], monitors: EntropyMonitors | None, chunks: int = 1,
    log: list | None = None,
) -> tuple[list[float], dict[int, dict[str, float]]]:
    """``len(batches)`` SGD steps of :func:`loss_of` (forward, backward, ``optimizer.step()``, ``zero_grad`` inside
    ``monitors.step(step)``; ``None``: the same loop unmonitored). Returns the losses and the non-empty
    ``monitors.logs`` by step."""
    opt = model.configure_optimizers()
    losses: list[float] = []
    logs: dict[int, dict[str, float]] = {}

    def one(batch: Sequence[torch.Tensor]) -> None:
        loss = loss_of(model, batch, chunks)
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad()

    if monitors is None:
        for batch in batches:
            one(batch)
        return losses, logs
    with monitors.watch(model, opt):
        for step, batch in enumerate(batches):
            with monitors.step(step):
                one(batch)
            if monitors.logs:
                logs[step] = dict(monitors.logs)
    return losses, logs


def make_monitors(calls: list | None = None) -> EntropyMonitors:
    """:func:`monitor_list` logging at every step; ``calls`` collects the ``log(metrics, step=)`` calls."""
    log = None if calls is None else (lambda metrics, *, step: calls.append((step, dict(metrics))))
    return EntropyMonitors(monitor_list(), every_n_steps=1, log=log, print_summary=False)


def hooks(model: nn.Module) -> dict[str, tuple[int, int, int, int]]:
    """Per module: the numbers of forward pre-hooks, forward hooks and their with-kwargs entries. FSDP2 registers its
    own hooks; what a monitor's tap leaves behind would add to these counts."""
    return {
        name or "<root>": (
            len(m._forward_pre_hooks), len(m._forward_hooks), len(m._forward_pre_hooks_with_kwargs),
            len(m._forward_hooks_with_kwargs),
        )
        for name, m in model.named_modules()
    }

