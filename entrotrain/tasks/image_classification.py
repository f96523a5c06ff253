"""Image classification of scikit-learn's 8×8 digits with :class:`entrotrain.models.tiny_vit.TinyViT`.

* :class:`DigitsDataModule` — the 1797 bundled digits (``sklearn.datasets.load_digits``, no download), a seeded random
  train/val split, pixels scaled to ``[0, 1]``.
* :class:`DigitsViTTask` — a :class:`TinyViT` trained with cross-entropy (Adam or SGD, optional linear warm-up,
  optional σReparam, optional attention-entropy regularisers).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from entrotrain.models.tiny_vit import TinyViT
from entrotrain.regularizers.composition import Regularizer, combine_regularizers
from entrotrain.regularizers.sigma_reparam import sigma_reparam as convert_to_sigma_reparam
from entrotrain.tasks._regularized import add_regularization, capturing

__all__ = ["load_digits_tensors", "DigitsDataModule", "DigitsViTTask"]

Batch = tuple[torch.Tensor, torch.Tensor]


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images ``(1797, 1, 8, 8)`` float32 in ``[0, 1]`` and labels ``(1797,)`` int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("DigitsDataModule needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.long)
    return x, y


class DigitsDataModule(LightningDataModule):
    """scikit-learn's 8×8 handwritten digits (10 classes), bundled with scikit-learn: no network.

    Batches are ``(x, y)``: ``x`` ``(batch_size, 1, 8, 8)`` float32 in ``[0, 1]``, ``y`` ``(batch_size,)`` int64.

    Args:
        batch_size: images per batch.
        val_size: images held out for validation (the rest, 1797 - ``val_size``, train).
        seed: seeds the split permutation and the training sampler's ``torch.Generator``.
        steps_per_epoch: training batches per epoch (drawn with replacement); ``None`` = one shuffled pass
            (``(1797 - val_size) // batch_size`` batches, last partial batch dropped).
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_size: int = 360,
        seed: int = 0,
        steps_per_epoch: int | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size, self.val_size, self.seed = batch_size, val_size, seed
        self.steps_per_epoch, self.num_workers = steps_per_epoch, num_workers
        self.num_classes: int = 10
        self.image_size: int = 8
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Load once and split with ``torch.randperm`` seeded by ``seed``."""
        if self.train_set is not None:
            return
        x, y = load_digits_tensors()
        if not 0 < self.val_size < len(x):
            raise ValueError(f"val_size must be in (0, {len(x)}), got {self.val_size}")
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        val, train = perm[: self.val_size], perm[self.val_size :]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed)
        if self.steps_per_epoch is None:
            sampler = RandomSampler(self.train_set, generator=generator)
        else:
            sampler = RandomSampler(
                self.train_set, replacement=True, num_samples=self.steps_per_epoch * self.batch_size, generator=generator
            )
        return DataLoader(
            self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.val_set, batch_size=max(self.batch_size, 120), shuffle=False,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )


class DigitsViTTask(LightningModule):
    """Train a :class:`TinyViT` on :class:`DigitsDataModule` batches with cross-entropy.

    Attention modules are reachable as ``model.blocks.{i}.attn``. Logs ``train/loss``, ``train/acc`` (per step),
    ``val/loss`` and ``val/acc`` (per validation epoch).

    Args:
        n_layer: transformer blocks.
        n_head: attention heads per block.
        n_embd: model width.
        patch_size: patch side (2 -> 16 patches of 4 pixels; 1 -> 64 one-pixel tokens); plus one CLS token.
        lr: peak learning rate.
        optimizer: ``"adam"`` (AdamW; plain Adam when ``weight_decay=0``) or ``"sgd"`` (momentum 0.9).
        warmup_steps: linear warm-up steps from ``0`` to ``lr`` (``0`` disables warm-up).
        sigma_reparam: reparametrise every linear layer of the transformer blocks (``qkv``, ``proj``, ``mlp.*``)
            with σReparam (Zhai et al. 2023, :func:`entrotrain.regularizers.sigma_reparam`).
        sigma_reparam_embed: with ``sigma_reparam``, also convert the patch embedding and the classification head.
        regularizers: attention-entropy regularisers added to the loss (summed); each named part is logged as
            ``reg/{name}``, and ``train/loss`` stays the cross-entropy alone.
        weight_decay: decoupled weight decay on matrices.
        betas: Adam betas.
        dropout: dropout probability.
        image_size: image side (8 for the digits).
        num_classes: number of classes (10 for the digits).
    """

    def __init__(
        self,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 64,
        patch_size: int = 2,
        lr: float = 1e-3,
        optimizer: Literal["adam", "sgd"] = "adam",
        warmup_steps: int = 0,
        sigma_reparam: bool = False,
        sigma_reparam_embed: bool = False,
        regularizers: list[Regularizer] | None = None,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        dropout: float = 0.0,
        image_size: int = 8,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.save_hyperparameters(ignore=["regularizers"])
        self.model = TinyViT(
            image_size=image_size, patch_size=patch_size, num_classes=num_classes,
            n_layer=n_layer, n_head=n_head, n_embd=n_embd, dropout=dropout,
        )
        if sigma_reparam:
            include = ["blocks.**"] + (["patch_embed", "head"] if sigma_reparam_embed else [])
            convert_to_sigma_reparam(self.model, include=include)
        self.regularizer: Regularizer | None = combine_regularizers(regularizers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)`` for images ``(B, 1, S, S)``."""
        return self.model(x)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        with capturing(self.regularizer, self.model, self.global_step):
            logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", acc, on_step=True, on_epoch=False)
        return add_regularization(self, self.regularizer, loss)

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(-1) == y).float().mean()
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        self.log("val/acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's return type is a union
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        if self.regularizer is not None:  # learnable thresholds (entropy band): never decayed
            no_decay += [p for p in self.regularizer.parameters() if p.requires_grad]
        groups = [
            {"params": decay, "weight_decay": hp.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if hp.optimizer == "adam":
            optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        else:
            optimizer = torch.optim.SGD(groups, lr=hp.lr, momentum=0.9)
        if hp.warmup_steps <= 0:
            return optimizer
        warmup = hp.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }
