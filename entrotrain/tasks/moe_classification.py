"""Digits classification with a tiny mixture of experts (:class:`~entrotrain.models.tiny_moe.TinyMoE`), optional
router losses, and a per-layer expert-load summary on the validation set.

Use with :class:`~entrotrain.tasks.image_classification.DigitsDataModule`. ``training_step`` returns
``{"loss": ..., "router_logits": (rows, E) per layer (detached)}``, so
:class:`~entrotrain.callbacks.router_monitor.RouterEntropyMonitor` reads the router without a tap.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from entrotrain.models.tiny_moe import TinyMoE
from entrotrain.regularizers.composition import Regularizer, combine_regularizers

__all__ = ["MoEDigitsTask", "expert_load_stats"]

Batch = tuple[torch.Tensor, torch.Tensor]


def expert_load_stats(counts: torch.Tensor, dead_threshold: float = 0.0) -> tuple[float, int]:
    r"""Normalised load entropy :math:`-\sum_e \ell_e \ln \ell_e / \ln E` of the load :math:`\ell = c / \sum c`
    (top-k assignments per expert, ``counts (E,)``) and the number of dead experts: no assignment, or a share
    :math:`\ell_e <` ``dead_threshold`` (:class:`~entrotrain.callbacks.router_monitor.RouterEntropyMonitor`'s
    definition). ``(0.0, E)`` without counts."""
    n_exp = counts.numel()
    total = float(counts.sum())
    if total <= 0:
        return 0.0, n_exp
    load = counts.double() / total
    ent = float(-(load * load.clamp_min(1e-300).log()).sum())
    return (ent / math.log(n_exp) if n_exp > 1 else 0.0), int(((counts <= 0) | (load < dead_threshold)).sum())


class MoEDigitsTask(LightningModule):
    """Train a :class:`TinyMoE` on digits with cross-entropy (+ router regularisers).

    Logs ``train/loss`` (cross-entropy alone), ``train/acc``, ``reg/{name}`` for every regulariser part,
    ``val/loss``, ``val/acc`` and, per MoE layer ``l``, ``val/router/L{l}/load_entropy_norm`` and
    ``val/router/L{l}/dead`` (top-k assignments of the validation set: :func:`expert_load_stats`). Prints the first
    and last validation's load entropy, dead experts and accuracy when the fit ends.

    Args:
        n_experts: experts per MoE layer.
        top_k: experts per token.
        n_layer, d_model, d_hidden, n_tokens, renormalize, router_init_std: the :class:`TinyMoE`.
        lr: AdamW learning rate.
        router_lr: learning rate of the routers (default ``lr``).
        weight_decay: decoupled weight decay of the matrices.
        regularizers: router losses (e.g. :class:`~entrotrain.regularizers.router_loss.TsallisRouterLoss`), summed
            and called as ``reg(router_logits)``; added to the loss.
        dead_threshold: an expert is dead when it gets no validation top-k assignment or a share below this (as the
            monitor's ``dead_threshold``).
        print_summary: print the first/last table at the end of the fit (rank zero).
    """

    def __init__(
        self,
        n_experts: int = 8,
        top_k: int = 1,
        n_layer: int = 2,
        d_model: int = 32,
        d_hidden: int = 64,
        n_tokens: int = 8,
        renormalize: bool = False,
        router_init_std: float | None = None,
        lr: float = 3e-3,
        router_lr: float | None = None,
        weight_decay: float = 0.0,
        regularizers: list[Regularizer] | None = None,
        dead_threshold: float = 0.0,
        print_summary: bool = True,
    ) -> None:
        super().__init__()
        if lr <= 0 or (router_lr is not None and router_lr <= 0):
            raise ValueError(f"lr and router_lr must be positive, got {lr}, {router_lr}")
        self.save_hyperparameters(ignore=["regularizers"])
        self.model = TinyMoE(
            in_features=64, n_tokens=n_tokens, d_model=d_model, d_hidden=d_hidden, n_layer=n_layer,
            n_experts=n_experts, top_k=top_k, renormalize=renormalize, router_init_std=router_init_std,
        )
        self.regularizer: Regularizer | None = combine_regularizers(regularizers)
        self.history: list[dict] = []  # one record per validation: step, acc, load entropy and dead per layer
        self._val: dict | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Class logits ``(B, 10)`` and router logits (one ``(B·n_tokens, E)`` per layer)."""
        return self.model(x)

    def training_step(self, batch: Batch, batch_idx: int) -> dict:
        x, y = batch
        logits, router_logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == y).float().mean(), on_step=True, on_epoch=False)
        if self.regularizer is not None:
            reg = self.regularizer(router_logits, step=self.global_step)
            self.log_dict({f"reg/{k}": v for k, v in reg.parts.items()}, on_step=True, on_epoch=False)
            loss = loss + reg.total
        return {"loss": loss, "router_logits": tuple(z.detach() for z in router_logits)}

    # ------------------------------------------------------------------ validation: accuracy and expert load
    def on_validation_epoch_start(self) -> None:
        hp = self.hparams
        self._val = {"counts": torch.zeros(hp.n_layer, hp.n_experts, device=self.device),
                     "correct": torch.zeros((), device=self.device), "n": torch.zeros((), device=self.device)}

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits, router_logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float()
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("val/acc", acc.mean(), on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        assert self._val is not None
        for layer, z in enumerate(router_logits):
            idx = z.topk(self.hparams.top_k, dim=-1).indices.reshape(-1)
            self._val["counts"][layer] += torch.bincount(idx, minlength=self.hparams.n_experts).to(z.dtype)
        self._val["correct"] += acc.sum()
        self._val["n"] += len(y)
        return loss

    def on_validation_epoch_end(self) -> None:
        if self._val is None:
            return
        val = {k: self.trainer.strategy.reduce(v, reduce_op="sum") for k, v in self._val.items()}
        record = {"step": int(self.global_step), "sanity": bool(self.trainer.sanity_checking),
                  "acc": float(val["correct"] / val["n"].clamp_min(1)), "entropy": [], "dead": []}
        for layer, counts in enumerate(val["counts"]):
            ent, dead = expert_load_stats(counts.cpu(), self.hparams.dead_threshold)
            record["entropy"].append(ent)
            record["dead"].append(dead)
            if not self.trainer.sanity_checking:
                self.log(f"val/router/L{layer}/load_entropy_norm", ent, on_epoch=True, sync_dist=False)
                self.log(f"val/router/L{layer}/dead", float(dead), on_epoch=True, sync_dist=False)
        self.history.append(record)
        self._val = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """The validation history (first and last rows of the summary) survives a resume."""
        checkpoint["moe_router_history"] = list(self.history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.history = list(checkpoint.get("moe_router_history", []))

    def on_fit_end(self) -> None:
        if self.hparams.print_summary and self.history and self.trainer.is_global_zero:
            print(self.summary())

    def summary(self) -> str:
        """First and last validation: per-layer normalised load entropy, dead experts, accuracy."""
        if not self.history:
            return "MoE router: no validation yet"
        hp = self.hparams
        lines = [f"MoE router on the validation digits ({hp.n_experts} experts, top-{hp.top_k}; dead = share < "
                 f"{hp.dead_threshold} or none; load entropy normalised by ln {hp.n_experts}):"]
        for label, rec in (("first", self.history[0]), ("last", self.history[-1])):
            per_layer = "  ".join(f"L{i} {e:.3f} ({d} dead)" for i, (e, d) in enumerate(zip(rec["entropy"], rec["dead"])))
            lines.append(f"  {label:5s} step {rec['step']:5d}  load entropy {per_layer}  val acc {rec['acc']:.3f}")
        return "\n".join(lines)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        router = [p for n, p in self.model.named_parameters() if ".router." in n]
        router_ids = {id(p) for p in router}
        rest = [p for p in self.model.parameters() if id(p) not in router_ids]
        groups = [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
            {"params": router, "weight_decay": 0.0, "lr": hp.router_lr or hp.lr},
        ]
        return torch.optim.AdamW(groups, lr=hp.lr)
