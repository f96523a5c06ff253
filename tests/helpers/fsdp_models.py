"""A tiny attention + MoE language model and the monitor set the FSDP tests train (FSDP2 on CPU, FSDP1 on CUDA).

:class:`FSDPLM` is a LightningModule whose ``training_step`` goes through ``self(x)`` (FSDP2's all-gather hooks run
only on ``forward()``). ``configure_model`` applies ``fully_shard`` to every block, the MoE layer and the root
when the trainer's strategy is Lightning's ``ModelParallelStrategy``; under any other strategy it does nothing
(FSDP1 wraps the model itself from ``auto_wrap_policy``).

Its loss is ``CE + R`` with ``R`` = AEM + an entropy floor (on the records of a differentiable ``AttentionTap``) +
a matrix-entropy regulariser on ``blocks.1.mlp`` (a differentiable ``ActivationTap``): the taps
``Regularizer.capture`` arms. The regularisers score what they are given (their documented data-parallel semantics:
each rank's local batch, gradients averaged by the strategy). ``chunks`` splits the batch into that many equal row
blocks *after* one forward and averages the blocks' losses (CE and regularisers on the block's rows): a one-process
run on the union of ``W`` ranks' batches with ``chunks=W`` is then the same loss as the ``W``-rank run, while every
monitor sees one forward of the union batch, as one process would.

The training step returns what the monitors read: ``logits`` (PredictionEntropyMonitor, ``source="output"``) and the
policy fields (PolicyEntropyMonitor: token entropy, log-probs of the labels, a per-sample advantage from the data).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from entrotrain.models.tiny_gpt import Block
from entrotrain.models.tiny_moe import MoELayer

VOCAB, SEQ, DIM, HEADS = 19, 8, 16, 2
#: samples per rank per step, ranks, steps: the union batch of one step holds ``BATCH * WORLD`` samples
BATCH, WORLD, STEPS = 4, 2, 3
CLASSES = 3
#: module globs that also match under FSDP1's wrappers (``blocks.1._fsdp_wrapped_module.mlp``); FSDP2 renames nothing
MLP, ROUTER, HEAD = "blocks.1.**.mlp", "moe.**.router", "**.lm_head"


class FSDPLM(L.LightningModule):
    """Token ids ``(B, T)`` → two pre-LN blocks (SDPA attention, MLP) → a top-2 MoE layer → logits ``(B, T, V)``.

    Module names: ``tok_emb``, ``pos_emb``, ``blocks.{0,1}`` (``.attn``, ``.mlp``), ``moe`` (``moe.router``),
    ``ln_f``, ``lm_head``, and ``cls_head``: a ``CLASSES``-way classifier of the mean-pooled final states, one
    ``(B, CLASSES)`` row per sample (the layer the InformationPlaneMonitor reads), trained with the LM loss.
    """

    def __init__(self, chunks: int = 1, lr: float = 0.2, regularize: bool = True) -> None:
        super().__init__()
        from entrotrain.regularizers.attention_entropy import AttentionEntropyMaximization, EntropyFloorRegularizer
        from entrotrain.regularizers.representation import MatrixEntropyRegularizer

        self.chunks, self.lr = chunks, lr
        self.tok_emb = nn.Embedding(VOCAB, DIM)
        self.pos_emb = nn.Embedding(SEQ, DIM)
        self.blocks = nn.ModuleList(Block(DIM, HEADS) for _ in range(2))
        self.moe = MoELayer(DIM, 2 * DIM, n_experts=4, top_k=2)
        self.ln_f = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.cls_head = nn.Linear(DIM, CLASSES)
        self.class_logits: torch.Tensor | None = None  # the last forward's (B, CLASSES) classifier output
        self.regularize = regularize
        self.aem = AttentionEntropyMaximization(0.05)
        self.floor = EntropyFloorRegularizer(0.5, floor=1.0)
        self.matrix = MatrixEntropyRegularizer(0.05, order=1)
        #: per step, per chunk: the chunk's loss and its regulariser parts (``{name: value}``)
        self.losses: list[list[float]] = []
        self.parts: list[list[dict[str, float]]] = []

    def configure_model(self) -> None:
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(self.trainer.strategy, ModelParallelStrategy):
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.moe, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.shape
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        x, _ = self.moe(x.reshape(b * t, DIM))
        h = self.ln_f(x.reshape(b, t, DIM))
        self.class_logits = self.cls_head(h.mean(1))
        return self.lm_head(h)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        from entrotrain.functional.attention import AttentionEntropy
        from entrotrain.taps.activation_tap import ActivationTap
        from entrotrain.taps.attention_tap import AttentionTap

        x, y, adv, cls = batch
        if self.regularize:  # the taps Regularizer.capture arms, opened here so their records can be split by rows
            with AttentionTap(self, differentiable=True) as attn, ActivationTap(
                self, include=[MLP], differentiable=True
            ) as act:
                logits = self(x)
        else:
            logits = self(x)
        class_logits = self.class_logits
        n = x.shape[0] // self.chunks
        losses, parts = [], []
        for c in range(self.chunks):
            rows = slice(c * n, (c + 1) * n)
            loss = F.cross_entropy(logits[rows].reshape(-1, VOCAB), y[rows].reshape(-1))
            loss = loss + F.cross_entropy(class_logits[rows], cls[rows])
            terms: dict[str, float] = {}
            if self.regularize:
                records = [(site, AttentionEntropy(*(t[rows] for t in r))) for site, r in attn.records]
                ((mlp,),) = act.captures.values()
                tokens = slice(c * n * x.shape[1], (c + 1) * n * x.shape[1])  # rows are (B·T, C), batch-major
                for out in (self.aem(records, step=self.global_step), self.floor(records, step=self.global_step),
                            self.matrix(mlp.rows[tokens], step=self.global_step)):
                    loss = loss + out.total
                    terms.update({k: float(v) for k, v in out.parts.items()})
            losses.append(loss)
            parts.append(terms)
        loss = torch.stack(losses).mean()
        self.losses.append([float(v.detach()) for v in losses])
        self.parts.append(parts)
        logits = logits.detach().float()
        logp_all = logits.log_softmax(-1)
        return {
            "loss": loss,
            "logits": logits,
            "token_entropy": -(logp_all.exp() * logp_all).sum(-1),
            "logprobs": logp_all.gather(-1, y[..., None])[..., 0],
            "advantages": adv,
            "response_mask": torch.ones_like(y, dtype=torch.bool),
            "rewards": adv,
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def dataset(n: int = BATCH * WORLD * STEPS, seed: int = 0) -> torch.utils.data.TensorDataset:
    """``n`` samples ``(ids (T,), labels (T,), advantage (), class ())``; labels are the ids shifted by one plus
    noise; the class is the first id mod ``CLASSES``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(VOCAB, (n, SEQ), generator=g)
    y = torch.where(torch.rand(n, SEQ, generator=g) < 0.7, (x + 1) % VOCAB, torch.randint(VOCAB, (n, SEQ), generator=g))
    adv = torch.randn(n, generator=g)
    return torch.utils.data.TensorDataset(x, y, adv, x[:, 0] % CLASSES)


def union_loader(data: torch.utils.data.TensorDataset, ranks: int = WORLD) -> torch.utils.data.DataLoader:
    """What one process loads for the ``WORLD``-rank run with ``DistributedSampler(shuffle=False)`` and per-rank batch
    ``BATCH``: batch ``s`` = rank 0's rows then rank 1's rows (rank ``r`` takes samples ``r, r + W, ...``).
    ``ranks=1``: rank 0's batches alone. Its dataset holds the same samples, in that order."""
    order = [r + WORLD * (s * BATCH + i) for s in range(len(data) // (BATCH * WORLD)) for r in range(ranks)
             for i in range(BATCH)]
    permuted = torch.utils.data.TensorDataset(*(t[order] for t in data.tensors))
    return torch.utils.data.DataLoader(permuted, batch_size=BATCH * ranks, shuffle=False)


def probe() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two probe batches, 5 rows then 1 row: under 2 ranks rank 1 holds no row of the second (it must still run the
    forward: FSDP's all-gathers are collectives)."""
    x, y, _, _ = dataset(6, seed=9).tensors
    return [(x[:5], y[:5]), (x[5:], y[5:])]


def monitors() -> list[L.Callback]:
    """Every monitor that can read this model, logging at every step, exact (no sampling), no media/summaries."""
    from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
    from entrotrain.callbacks.information_plane_monitor import InformationPlaneMonitor
    from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor
    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
    from entrotrain.callbacks.router_monitor import RouterEntropyMonitor

    quiet = dict(log_media=False, print_summary=False)
    return [
        AttentionEntropyMonitor(every_n_steps=1, max_rows=None, max_queries=None, **quiet),
        RepresentationEntropyMonitor(
            include=["blocks.0", MLP, "ln_f"], measures=["rankme", "effective_rank", "matrix_entropy", "vendi"],
            every_n_steps=1, max_samples=4096, max_tokens=None, label_index=None, log_spectrum=False,
            print_summary=False,
        ),
        RouterEntropyMonitor(every_n_steps=1, include=[ROUTER], top_k=2, mask_key=None, **quiet),
        PolicyEntropyMonitor(every_n_batches=1, fit_min_points=2, **quiet),
        # the probe (the train set, 24 rows) in chunks of 10: under 2 ranks rank 0 forwards 2 chunks, rank 1 one
        InformationPlaneMonitor(
            include=["cls_head"], estimators=["binning", "kde"], every_n_steps=1, probe="train", probe_batch_size=10,
            label_index=3, log_table=False, print_summary=False,
        ),
        PredictionEntropyMonitor(
            every_n_steps=1, source="head", head=HEAD, prefix="entropy/pred_head", probe=probe(), floor=2.5,
            positions=[0, 3, 7], **quiet,
        ),
        PredictionEntropyMonitor(
            every_n_steps=1, source="output", probe=probe(), floor=2.5, positions=[0, 3, 7],
            generation_prompts=[[1, 2, 3], [4, 5, 6], [7]], max_new_tokens=3, context_size=SEQ, **quiet,
        ),
    ]
