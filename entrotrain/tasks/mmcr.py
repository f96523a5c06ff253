r"""Self-supervised MMCR on scikit-learn's 8×8 digits: ``k`` augmented views per image, nuclear norm of the centroids.

Maximum Manifold Capacity Representations (Yerxa, Kuang, Simoncelli & Chung, NeurIPS 2023): the encoder's ``k``
views of each image are L2-normalised and averaged into a centroid; the loss
:class:`~entrotrain.regularizers.representation.MMCRLoss` ``= −‖C‖_* + (λ/N) Σ_i ‖Z_i‖_*`` spreads the centroids over
many directions (a high-rank ``C``) while pulling each image's views together. Views come from
:func:`~entrotrain.tasks.self_supervised.augment_digits`, stacked view-major (``[all view 1; all view 2; …]``) and read
with ``layout="view_major"``.

Validation encodes the *clean* validation digits (the probe set of
:class:`~entrotrain.callbacks.RepresentationEntropyMonitor` with ``stage="validation"``) and scores the backbone with
a cosine ``k``-nearest-neighbour classifier against the training digits (labels are used only there): ``val/knn_acc``.
At the end of fit the first and last kNN accuracy are printed (rank zero).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from entrotrain.regularizers.representation import MMCRLoss
from entrotrain.tasks.self_supervised import augment_digits

__all__ = ["MMCREncoder", "MMCRTask", "knn_accuracy"]

Batch = tuple[torch.Tensor, torch.Tensor]


class MMCREncoder(nn.Module):
    """Backbone MLP (the representation) + projector, SimSiam's layout without a predictor.

    Module names: ``backbone`` (Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d, ReLU) and ``projector`` (Linear,
    BatchNorm1d, ReLU, Linear), as the MMCR reference's projector (BN + ReLU on the hidden layer).
    """

    def __init__(self, in_features: int = 64, hidden_dim: int = 128, feature_dim: int = 64) -> None:
        super().__init__()
        self.in_features = in_features
        self.backbone = nn.Sequential(
            nn.Linear(in_features, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
        )
        self.projector = nn.Sequential(
            nn.Linear(hidden_dim, feature_dim, bias=False), nn.BatchNorm1d(feature_dim), nn.ReLU(),
            nn.Linear(feature_dim, feature_dim),
        )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone representation ``(B, hidden_dim)`` of images ``(B, ...)``."""
        return self.backbone(x.reshape(len(x), -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Projection ``z`` ``(B, feature_dim)``."""
        return self.projector(self.encode(x))


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, k: int = 5
) -> float:
    """Accuracy of a cosine-similarity ``k``-NN majority vote (ties: the smallest label) of ``test_x`` against
    ``train_x`` (rows of features)."""
    sim = F.normalize(test_x.float(), dim=1) @ F.normalize(train_x.float(), dim=1).T
    idx = sim.topk(min(k, len(train_x)), dim=1).indices
    votes = F.one_hot(train_y[idx], int(train_y.max()) + 1).sum(1)
    return float((votes.argmax(1) == test_y).float().mean())


class MMCRTask(LightningModule):
    """MMCR on digits (labels unused for training).

    Logs ``train/loss`` (the MMCR loss), ``train/centroid_nuc`` (``‖C‖_*``) per step; ``val/loss`` (on views drawn
    from a generator seeded per batch, so validation never consumes the training RNG) and ``val/knn_acc`` per
    validation.

    Args:
        n_views: ``k`` augmented views per image (the CIFAR reference uses 40, ImageNet 2).
        lam: MMCR's ``λ`` (weight of the per-image view nuclear norms; reference default 0).
        hidden_dim: backbone width (the representation size).
        feature_dim: projector output size.
        lr: Adam learning rate (the CIFAR reference: Adam 1e-3, weight decay 1e-6).
        weight_decay: weight decay.
        max_shift, noise, erase: augmentation (see :func:`~entrotrain.tasks.self_supervised.augment_digits`).
        knn_k: neighbours of the kNN probe.
        val_seed: seed of the validation views' generator (``val_seed + batch_idx``).
    """

    def __init__(
        self,
        n_views: int = 4,
        lam: float = 0.0,
        hidden_dim: int = 128,
        feature_dim: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 1e-6,
        max_shift: int = 1,
        noise: float = 0.1,
        erase: int = 3,
        knn_k: int = 5,
        val_seed: int = 1234,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters()
        self.model = MMCREncoder(64, hidden_dim, feature_dim)
        self.mmcr = MMCRLoss(1.0, lam, n_views=n_views, layout="view_major")
        self.knn_history: list[tuple[int, float]] = []
        self._val_feats: list[torch.Tensor] = []
        self._val_labels: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone representation ``(B, hidden_dim)`` of images ``(B, 1, 8, 8)``."""
        return self.model.encode(x)

    def _loss(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        hp = self.hparams
        kw = dict(max_shift=hp.max_shift, noise=hp.noise, erase=hp.erase, generator=generator)
        views = torch.cat([augment_digits(x, **kw) for _ in range(hp.n_views)])  # view-major (k·B, ...)
        return self.mmcr(self.model(views)).total

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        loss = self._loss(x)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/centroid_nuc", -loss.detach(), on_step=True, on_epoch=False)  # λ = 0: the loss is −‖C‖_*
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_feats, self._val_labels = [], []

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        self._val_feats.append(self.model.encode(x).detach())  # clean images: the fixed probe set
        self._val_labels.append(y)
        generator = torch.Generator(device=x.device).manual_seed(self.hparams.val_seed + batch_idx)
        loss = self._loss(x, generator)
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        return loss

    def on_validation_epoch_end(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        train_set = getattr(dm, "train_set", None)
        if not self._val_feats or train_set is None:
            return
        train_x, train_y = train_set.tensors
        feats = []
        for start in range(0, len(train_x), 512):
            feats.append(self.model.encode(train_x[start : start + 512].to(self.device)).detach())
        acc = knn_accuracy(
            torch.cat(feats), train_y.to(self.device), torch.cat(self._val_feats), torch.cat(self._val_labels),
            self.hparams.knn_k,
        )
        self.knn_history.append((int(self.global_step), acc))
        self.log("val/knn_acc", acc, on_step=False, on_epoch=True)

    def on_fit_end(self) -> None:
        if self.knn_history and self.trainer.is_global_zero:
            (s0, a0), (s1, a1) = self.knn_history[0], self.knn_history[-1]
            print(
                f"MMCR kNN accuracy (backbone, cosine, k={self.hparams.knn_k}, {self.hparams.n_views} views): "
                f"step {s0} {a0:.4f} -> step {s1} {a1:.4f}"
            )

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's return type is a union
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
