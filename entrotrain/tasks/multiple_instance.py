"""Multiple-instance learning on bags of scikit-learn's bundled 8×8 digits (no download).

A bag is positive iff it contains at least one image of ``target_digit``. Bags are built once, deterministically
from ``seed``: the digit images are split into disjoint train/val pools, then each bag draws ``U[min_bag, max_bag]``
instances from its pool — negatives only from the non-target digits, positives with 1..``max_positives`` target
images at random positions. Batches are ``(x, mask, y)``: ``x`` ``(B, N, 64)`` zero-padded to the longest bag,
``mask`` ``(B, N)`` bool (True = real instance), ``y`` ``(B,)`` float bag labels.

:class:`DigitsMILTask` trains :class:`~entrotrain.models.attention_mil.AttentionMIL` with a bag BCE loss plus
optional attention regularisers (e.g. AEM, :class:`~entrotrain.regularizers.AttentionEntropyMaximization`); the
pooling attention is the site ``model.pool``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from entrotrain.models.attention_mil import AttentionMIL
from entrotrain.regularizers.composition import Regularizer, combine_regularizers
from entrotrain.tasks._regularized import add_regularization, capturing

__all__ = ["DigitsBags", "DigitsMILDataModule", "DigitsMILTask", "collate_bags"]

Batch = tuple[Tensor, Tensor, Tensor]


class DigitsBags(Dataset):
    """A fixed list of bags: ``bags[i]`` ``(n_i, 64)`` float, ``instance_labels[i]`` ``(n_i,)`` digit ids,
    ``labels[i]`` the bag label (1.0 iff ``target_digit`` is among the instance labels)."""

    def __init__(self, bags: list[Tensor], instance_labels: list[Tensor], target_digit: int) -> None:
        self.bags, self.instance_labels = bags, instance_labels
        self.labels = torch.tensor([float(bool((d == target_digit).any())) for d in instance_labels])

    def __len__(self) -> int:
        return len(self.bags)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.bags[i], self.labels[i]


def collate_bags(items: list[tuple[Tensor, Tensor]]) -> Batch:
    """Zero-pad bags to the longest one: ``(x (B, N, F), mask (B, N) bool, y (B,))``."""
    n = max(x.shape[0] for x, _ in items)
    x = torch.zeros(len(items), n, items[0][0].shape[1])
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for i, (bag, _) in enumerate(items):
        x[i, : bag.shape[0]] = bag
        mask[i, : bag.shape[0]] = True
    return x, mask, torch.stack([y for _, y in items])


def _make_bags(
    images: np.ndarray,
    digits: np.ndarray,
    n_bags: int,
    *,
    target_digit: int,
    min_bag: int,
    max_bag: int,
    positive_fraction: float,
    max_positives: int,
    noise_std: float,
    rng: np.random.Generator,
) -> DigitsBags:
    pos_pool = np.flatnonzero(digits == target_digit)
    neg_pool = np.flatnonzero(digits != target_digit)
    bags, inst = [], []
    for _ in range(n_bags):
        size = int(rng.integers(min_bag, max_bag + 1))
        idx = rng.choice(neg_pool, size=size, replace=True)
        if rng.random() < positive_fraction:
            k = int(rng.integers(1, min(max_positives, size) + 1))
            slots = rng.choice(size, size=k, replace=False)
            idx[slots] = rng.choice(pos_pool, size=k, replace=True)
        x = images[idx]
        if noise_std > 0:
            x = x + noise_std * rng.standard_normal(x.shape)
        bags.append(torch.from_numpy(x.astype(np.float32)))
        inst.append(torch.from_numpy(digits[idx].astype(np.int64)))
    return DigitsBags(bags, inst, target_digit)


class DigitsMILDataModule(LightningDataModule):
    """Bags of scikit-learn digits (``load_digits()``, bundled), positive iff they contain ``target_digit``.

    Args:
        target_digit: the digit whose presence makes a bag positive.
        min_bag, max_bag: bag sizes are uniform in ``[min_bag, max_bag]``.
        n_train_bags, n_val_bags: number of bags per split.
        n_train_images: images in the train pool (the rest of the 1797 form the disjoint val pool); small values
            make the task harder (few distinct training instances to overfit).
        positive_fraction: probability that a bag is positive.
        max_positives: a positive bag holds ``U[1, max_positives]`` target images (few key instances).
        noise_std: std of Gaussian noise added to every instance's pixels (scaled to [0, 1]), fixed per bag.
        batch_size: bags per batch.
        seed: seed of the image split, the bags and the train shuffling.
    """

    def __init__(
        self,
        target_digit: int = 9,
        min_bag: int = 8,
        max_bag: int = 24,
        n_train_bags: int = 64,
        n_val_bags: int = 256,
        n_train_images: int = 400,
        positive_fraction: float = 0.5,
        max_positives: int = 2,
        noise_std: float = 0.0,
        batch_size: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0 <= target_digit <= 9:
            raise ValueError(f"target_digit must be in 0..9, got {target_digit}.")
        if not 1 <= min_bag <= max_bag:
            raise ValueError(f"need 1 <= min_bag <= max_bag, got {min_bag}, {max_bag}.")
        self.save_hyperparameters()
        self.train_data: DigitsBags | None = None
        self.val_data: DigitsBags | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_data is not None:
            return
        from sklearn.datasets import load_digits

        hp = self.hparams
        digits = load_digits()
        images = digits.data.astype(np.float64) / 16.0
        labels = digits.target.astype(np.int64)
        rng = np.random.default_rng(hp.seed)
        order = rng.permutation(len(labels))
        if not 0 < hp.n_train_images < len(labels):
            raise ValueError(f"n_train_images must be in 1..{len(labels) - 1}, got {hp.n_train_images}.")
        train_idx, val_idx = order[: hp.n_train_images], order[hp.n_train_images :]
        kw: dict[str, Any] = dict(
            target_digit=hp.target_digit,
            min_bag=hp.min_bag,
            max_bag=hp.max_bag,
            positive_fraction=hp.positive_fraction,
            max_positives=hp.max_positives,
            noise_std=hp.noise_std,
        )
        self.train_data = _make_bags(images[train_idx], labels[train_idx], hp.n_train_bags, rng=rng, **kw)
        self.val_data = _make_bags(images[val_idx], labels[val_idx], hp.n_val_bags, rng=rng, **kw)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(
            self.train_data, batch_size=self.hparams.batch_size, shuffle=True, generator=g, collate_fn=collate_bags
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_data, batch_size=self.hparams.batch_size * 4, collate_fn=collate_bags)


class DigitsMILTask(LightningModule):
    """Bag classification with :class:`AttentionMIL` (pooling attention at ``model.pool``) and a BCE loss.

    Logs ``train/loss`` (BCE alone), ``reg/{name}`` per regulariser part, ``val/loss``, ``val/acc`` and ``val/auc``.

    Args:
        in_features: features per instance (64 for 8×8 digits).
        dim: instance embedding width.
        n_heads: pooling heads (AEM's reference: 8).
        hidden: hidden width of the instance encoder.
        dropout: dropout on instance embeddings and the pooled vector.
        lr: AdamW learning rate (constant).
        weight_decay: AdamW decoupled weight decay on matrices (AEM's reference: 1e-5).
        regularizers: attention regularisers added to the loss (summed), e.g.
            ``AttentionEntropyMaximization(weight=0.1)`` for AEM; ``None`` is the baseline.
    """

    def __init__(
        self,
        in_features: int = 64,
        dim: int = 64,
        n_heads: int = 8,
        hidden: int = 128,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        regularizers: list[Regularizer] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["regularizers"])
        self.model = AttentionMIL(in_features=in_features, dim=dim, n_heads=n_heads, hidden=hidden, dropout=dropout)
        self.regularizer: Regularizer | None = combine_regularizers(regularizers)
        self._val_probs: list[Tensor] = []
        self._val_labels: list[Tensor] = []

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Bag logits ``(B,)`` for instances ``(B, N, F)`` and mask ``(B, N)``."""
        return self.model(x, mask).squeeze(-1)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, mask, y = batch
        with capturing(self.regularizer, self.model, self.global_step):
            logits = self(x, mask)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=x.shape[0])
        return add_regularization(self, self.regularizer, loss, batch_size=x.shape[0])

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, mask, y = batch
        logits = self(x, mask)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        self._val_probs.append(torch.sigmoid(logits).detach().cpu())
        self._val_labels.append(y.detach().cpu())
        return loss

    def on_validation_epoch_end(self) -> None:
        if not self._val_probs:
            return
        p, y = torch.cat(self._val_probs), torch.cat(self._val_labels)
        self._val_probs.clear()
        self._val_labels.clear()
        self.log("val/acc", ((p > 0.5).float() == y).float().mean())
        if 0 < float(y.sum()) < len(y):
            from sklearn.metrics import roc_auc_score

            self.log("val/auc", float(roc_auc_score(y.numpy(), p.numpy())))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        if self.regularizer is not None:
            no_decay += [p for p in self.regularizer.parameters() if p.requires_grad]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=hp.lr
        )
