"""Self-supervised SimSiam on scikit-learn's 8×8 digits, with augmentations made for 8×8 images.

* :func:`augment_digits` — a random view of a batch: shift by up to ``max_shift`` pixels (zero fill), per-image
  contrast, Gaussian pixel noise and a random erased square.
* :class:`SimSiamTask` — a :class:`~entrotrain.models.simsiam.SimSiam` trained on two views per image (labels
  unused). Validation encodes the *clean* validation images (a fixed probe set for
  :class:`~entrotrain.callbacks.RepresentationEntropyMonitor` with ``on="validation"``), and scores the loss on
  views drawn from a generator seeded per batch, so validation never consumes the training RNG.

Use it with :class:`~entrotrain.tasks.image_classification.DigitsDataModule`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule

from entrotrain.models.simsiam import SimSiam
from entrotrain.regularizers.composition import Regularizer, combine_regularizers

__all__ = ["augment_digits", "SimSiamTask"]

Batch = tuple[torch.Tensor, torch.Tensor]


def augment_digits(
    x: torch.Tensor,
    *,
    max_shift: int = 1,
    noise: float = 0.1,
    erase: int = 3,
    contrast: tuple[float, float] = (0.6, 1.4),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One random view of images ``x`` ``(B, 1, S, S)`` in ``[0, 1]``; returns the same shape, float, in ``[0, 1]``.

    Per image: a shift of ``(dy, dx) ∈ [-max_shift, max_shift]²`` with zero fill, a contrast factor drawn from
    ``contrast``, an ``erase × erase`` square set to 0 at a random place (``0`` disables), additive Gaussian noise of
    standard deviation ``noise``, then clamping to ``[0, 1]``. Draws from ``generator`` (the global RNG when ``None``).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, S, S), got {tuple(x.shape)}")
    b, _, s, _ = x.shape
    dev = x.device
    kw = dict(generator=generator, device=generator.device if generator is not None else dev)
    out = x
    if max_shift > 0:
        m = max_shift
        padded = F.pad(x, (m, m, m, m))
        dy = torch.randint(0, 2 * m + 1, (b,), **kw).to(dev)
        dx = torch.randint(0, 2 * m + 1, (b,), **kw).to(dev)
        rows = (dy[:, None] + torch.arange(s, device=dev)[None, :])  # (B, S)
        cols = (dx[:, None] + torch.arange(s, device=dev)[None, :])
        out = padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(x.shape[1], device=dev)[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    lo, hi = contrast
    scale = (lo + (hi - lo) * torch.rand(b, **kw)).to(dev)
    out = out * scale[:, None, None, None]
    if erase > 0:
        top = torch.randint(0, s - erase + 1, (b,), **kw).to(dev)
        left = torch.randint(0, s - erase + 1, (b,), **kw).to(dev)
        r = torch.arange(s, device=dev)
        in_rows = (r[None, :] >= top[:, None]) & (r[None, :] < top[:, None] + erase)
        in_cols = (r[None, :] >= left[:, None]) & (r[None, :] < left[:, None] + erase)
        mask = in_rows[:, :, None] & in_cols[:, None, :]
        out = out.masked_fill(mask[:, None], 0.0)
    if noise > 0:
        out = out + noise * torch.randn(out.shape, **kw).to(dev)
    return out.clamp(0.0, 1.0)


class SimSiamTask(LightningModule):
    """SimSiam on digits: two augmented views per image, symmetrised negative cosine loss, optional stop-gradient.

    Representation modules (names from the task): ``model.backbone`` (the representation, ``hidden_dim``
    features), ``model.backbone.{1,4}`` (its BatchNorm outputs), ``model.projector`` (``z``), ``model.predictor``
    (``p``). Logs ``train/loss`` per step; ``val/loss`` and ``val/z_std`` (standard deviation of the
    l2-normalised ``z`` over the batch, averaged over features: ``0`` = collapsed, ``≈ 1/√D`` healthy) per
    validation.

    Args:
        stop_gradient: SimSiam's stop-gradient on the targets; ``False`` shows the rank collapse.
        hidden_dim: backbone width (the representation size).
        feature_dim: projector output size.
        pred_dim: predictor bottleneck.
        lr: SGD learning rate (momentum 0.9) or Adam learning rate.
        optimizer: ``"sgd"`` (SimSiam's choice) or ``"adam"``.
        weight_decay: weight decay.
        max_shift: augmentation shift in pixels.
        noise: augmentation Gaussian-noise standard deviation.
        erase: side of the erased square (``0`` = none).
        val_seed: seed of the validation views' generator (``val_seed + batch_idx``).
        regularizers: representation regularisers added to the training loss (summed), e.g.
            :class:`~entrotrain.regularizers.representation.MatrixEntropyRegularizer`. Each is called on the
            projections ``z`` ``(2B, feature_dim)`` of both views, **view-major** (``[z₁; z₂]``: an
            :class:`~entrotrain.regularizers.representation.MMCRLoss` here needs ``layout="view_major"``), with the
            step set to ``global_step``; its terms are logged as ``reg/{name}`` (as every recipe task does). ``None`` (default): the loss
            and every number are those of plain SimSiam.
    """

    def __init__(
        self,
        stop_gradient: bool = True,
        hidden_dim: int = 128,
        feature_dim: int = 64,
        pred_dim: int = 16,
        lr: float = 0.05,
        optimizer: str = "sgd",
        weight_decay: float = 1e-4,
        max_shift: int = 1,
        noise: float = 0.1,
        erase: int = 3,
        val_seed: int = 1234,
        regularizers: list[Regularizer] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        self.save_hyperparameters(ignore=["regularizers"])
        self.reg = combine_regularizers(regularizers)
        self.model = SimSiam(
            in_features=64, hidden_dim=hidden_dim, feature_dim=feature_dim, pred_dim=pred_dim, stop_gradient=stop_gradient
        )

    def _views(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hp = self.hparams
        kw = dict(max_shift=hp.max_shift, noise=hp.noise, erase=hp.erase, generator=generator)
        return augment_digits(x, **kw), augment_digits(x, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone representation ``(B, hidden_dim)`` of images ``(B, 1, 8, 8)``."""
        return self.model.encode(x)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        if self.reg is None:
            loss = self.model.loss(*self._views(x))
            self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
            return loss
        loss, z = self.model.loss(*self._views(x), return_projections=True)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        reg = self.reg(z, step=self.global_step)
        self.log_dict({f"reg/{k}": v for k, v in reg.parts.items()}, on_step=True, on_epoch=False)
        return loss + reg.total

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        z, _ = self.model(x)  # clean images: the fixed probe set
        generator = torch.Generator(device=x.device).manual_seed(self.hparams.val_seed + batch_idx)
        loss = self.model.loss(*self._views(x, generator))
        z_std = F.normalize(z, dim=-1).std(0).mean()
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(x))
        self.log("val/z_std", z_std, on_step=False, on_epoch=True, batch_size=len(x))
        return loss

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's return type is a union
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
