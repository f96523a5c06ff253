r"""The Shwartz-Ziv & Tishby (2017) information-plane task: 12-bit inputs, a spherically symmetric label rule, and a
12-10-7-5-4-3-2 network (:class:`~entrotrain.models.ib_mlp.IBMLP`), for
:class:`~entrotrain.callbacks.information_plane_monitor.InformationPlaneMonitor`.

**The data set is a documented stand-in, not the paper's file.** The paper places the 12 input bits on 12 points
spread evenly on a 2-sphere and labels ``y = Θ(f(x) − θ)`` with an O(3)-invariant ``f`` and ``θ`` chosen so that
``p(y=1) ≈ 0.5``; ``f`` and ``θ`` were never published, and the repository ships only the result
(``var_u.mat``). Nothing is downloaded here. :func:`icosahedron_dataset` builds, in code:

* the 12 points = the vertices of a regular icosahedron, ``(0, ±1, ±φ)``, ``(±1, ±φ, 0)``, ``(±φ, 0, ±1)``
  normalised (φ the golden ratio), in the fixed order of :func:`icosahedron_vertices`; bit ``k`` (column ``k``,
  most significant first) switches vertex ``k`` on; row ``i`` is the 12-bit binary of ``i`` (all 4,096 patterns);
* ``f(x) = Σ_{i∈S} 41.2 + Σ_{i<j∈S} g(v_i·v_j)`` over the set ``S`` of switched-on vertices, with
  ``g(1/√5) = 0.8`` (nearest neighbours), ``g(−1/√5) = −8.8`` (second-nearest), ``g(−1) = −13.6`` (antipodal):
  ``f = 41.2 n + 0.8 e − 8.8 s − 13.6 a`` with ``n`` = popcount and ``e, s, a`` the numbers of selected
  nearest / second-nearest / antipodal pairs. ``f`` depends only on the pairwise dot products of the selected
  points, so it is O(3)-invariant ("spherically symmetric"), as the paper requires; ``θ = 171.8``.

This is the linear separator that the reference note (``reference/information_plane.md`` §1) fitted to the labels
of ``var_u.mat`` in (n, e, s, a) coordinates: it is **not** the original ``f``, but it reproduces the file's label
statistics exactly — 2,118 positives of 4,096 (``p(y=1) = 0.51709``, ``H(Y) = 0.99916`` bits), ``y = 0`` for
``n ≤ 4``, ``y = 1`` for ``n ≥ 8``, and 60/792, 532/924, 732/792 positives at ``n`` = 5, 6, 7 (the tests check
these counts) — because ``var_u``'s labels are a function of (n, e, s, a). The stand-in therefore equals
``var_u.mat`` up to the unknown assignment of the file's bits to the icosahedron's vertices (a fixed permutation of
the 12 input columns, which leaves every entropy and mutual information of the task unchanged). Every ``f`` is at
least 1 away from ``θ``: no pattern sits on the boundary.

Split: ``train_fraction = 0.8`` of the rows (3,277) for training, the rest for validation. ``shuffle_split=False``
(default) takes the first rows in counting order, as IDNNs' ``-inds [80]`` does; ``True`` draws a seeded random
split, as Saxe et al.'s ibsgd does.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from entrotrain._validation import check_bool, check_choice, check_int, check_real
from entrotrain.models.ib_mlp import IBMLP

__all__ = [
    "InformationPlaneDataModule",
    "InformationPlaneTask",
    "icosahedron_dataset",
    "icosahedron_vertices",
    "THETA",
]

#: Threshold θ of the stand-in rule (see the module docstring).
THETA = 171.8
_WEIGHTS = {"n": 41.2, "nearest": 0.8, "second": -8.8, "antipodal": -13.6}


def icosahedron_vertices(dtype: torch.dtype = torch.float64) -> Tensor:
    """The 12 unit vertices ``(12, 3)`` of a regular icosahedron, in the order the data set's bits use:
    for ``a, b`` in ``(-1, 1) × (-1, 1)``: ``(0, a, bφ)``, ``(a, bφ, 0)``, ``(bφ, 0, a)``, each normalised."""
    phi = (1 + math.sqrt(5)) / 2
    v = []
    for a in (-1.0, 1.0):
        for b in (-1.0, 1.0):
            v += [(0.0, a, b * phi), (a, b * phi, 0.0), (b * phi, 0.0, a)]
    vert = torch.tensor(v, dtype=torch.float64)
    return (vert / vert.norm(dim=1, keepdim=True)).to(dtype)


def icosahedron_dataset() -> tuple[Tensor, Tensor, Tensor]:
    r"""The 4,096 12-bit patterns, their labels and the rule's value (the module docstring states the rule).

    Returns:
        ``x`` ``(4096, 12)`` float32 in {0, 1} (row ``i`` = binary of ``i``, most significant bit first),
        ``y`` ``(4096,)`` int64 in {0, 1} = ``[f(x) > θ]``, and ``f`` ``(4096,)`` float64.
    """
    idx = torch.arange(4096)
    x = ((idx[:, None] >> torch.arange(11, -1, -1)) & 1).to(torch.float64)
    gram = icosahedron_vertices() @ icosahedron_vertices().T
    c = 1 / math.sqrt(5)
    pair = torch.zeros(12, 12, dtype=torch.float64)  # g(v_i · v_j), 0 on the diagonal
    pair[(gram - c).abs() < 1e-9] = _WEIGHTS["nearest"]
    pair[(gram + c).abs() < 1e-9] = _WEIGHTS["second"]
    pair[(gram + 1).abs() < 1e-9] = _WEIGHTS["antipodal"]
    f = _WEIGHTS["n"] * x.sum(1) + torch.einsum("ni,ij,nj->n", x, pair, x) / 2
    y = (f > THETA).long()
    return x.float(), y, f


class InformationPlaneDataModule(LightningDataModule):
    """All 4,096 12-bit patterns with the stand-in spherically symmetric labels (:func:`icosahedron_dataset`).

    Args:
        train_fraction: share of the rows used for training (IDNNs: 0.8 → 3,277 rows); the rest is validation.
        shuffle_split: ``False`` = the first rows in counting order train (IDNNs); ``True`` = a seeded random split
            (Saxe et al.).
        batch_size: training batch size (IDNNs 512, Saxe/Chelombiev 256); ``None`` = full batch.
        seed: seed of the split (when shuffled) and of the training-batch order (own generator: the global RNG is
            not touched).

    The validation loader serves the held-out rows in one batch. ``information_probe()`` returns all 4,096 rows,
    the probe set the paper computes MI on.
    """

    def __init__(
        self,
        train_fraction: float = 0.8,
        shuffle_split: bool = False,
        batch_size: int | None = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()  # a checkpoint names this datamodule (entrotrain inspect rebuilds it)
        check_real(train_fraction, "train_fraction", low=0.0, high=1.0, low_open=True, high_open=True)
        check_bool(shuffle_split, "shuffle_split")
        check_int(batch_size, "batch_size", low=1, none_ok=True)
        check_int(seed, "seed")
        self.train_fraction, self.shuffle_split, self.batch_size, self.seed = train_fraction, shuffle_split, batch_size, seed
        self.x, self.y, _ = icosahedron_dataset()
        n_train = int(round(train_fraction * len(self.x)))
        order = (
            torch.randperm(len(self.x), generator=torch.Generator().manual_seed(seed))
            if shuffle_split
            else torch.arange(len(self.x))
        )
        self.train_index, self.val_index = order[:n_train].sort().values, order[n_train:].sort().values
        self.train_set = TensorDataset(self.x[self.train_index], self.y[self.train_index])
        self.val_set = TensorDataset(self.x[self.val_index], self.y[self.val_index])

    def information_probe(self) -> tuple[Tensor, Tensor]:
        """The probe set of the information plane: all 4,096 inputs ``(4096, 12)`` and labels ``(4096,)``."""
        return self.x, self.y

    def train_dataloader(self) -> DataLoader:
        bs = self.batch_size or len(self.train_set)
        return DataLoader(
            self.train_set, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(self.seed)
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=len(self.val_set), shuffle=False)


Batch = tuple[Tensor, Tensor]


class InformationPlaneTask(LightningModule):
    """Train :class:`~entrotrain.models.ib_mlp.IBMLP` with cross-entropy on the clipped softmax and Adam.

    Loss (IDNNs): ``−mean log clip(p_y, tiny, 1)`` with ``tiny`` the smallest normal float32 (IDNNs' 1e-50 underflows
    to 0 in float32). Logs ``train/loss``, ``train/acc`` per step and ``val/loss``, ``val/acc`` per validation.

    Args:
        activation: hidden activation, ``"tanh"`` or ``"relu"``.
        lr: learning rate (IDNNs, Saxe, Chelombiev: Adam 4e-4).
        optimizer: ``"adam"`` (the reference code) or ``"sgd"`` (the paper's text).
        init: ``"fan_in"`` or ``"fan_out"`` (see :class:`IBMLP`).
        gain: init std multiplier (1 = IDNNs).
    """

    def __init__(
        self,
        activation: Literal["tanh", "relu"] = "tanh",
        lr: float = 4e-4,
        optimizer: Literal["adam", "sgd"] = "adam",
        init: Literal["fan_in", "fan_out"] = "fan_in",
        gain: float = 1.0,
    ) -> None:
        super().__init__()
        check_real(lr, "lr", low=0.0, low_open=True)
        check_choice(optimizer, "optimizer", ("adam", "sgd"))
        self.save_hyperparameters()
        self.model = IBMLP(activation=activation, init=init, gain=gain)

    def forward(self, x: Tensor) -> Tensor:
        """Class probabilities ``(B, 2)`` of inputs ``(B, 12)``."""
        return self.model(x)

    def _step(self, batch: Batch) -> tuple[Tensor, Tensor]:
        x, y = batch
        p = self.model(x).float()
        tiny = torch.finfo(torch.float32).tiny
        loss = -p.gather(1, y[:, None]).clamp(tiny, 1.0).log().mean()
        return loss, (p.argmax(-1) == y).float().mean()

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, acc = self._step(batch)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", acc, on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss, acc = self._step(batch)
        n = len(batch[1])
        self.log("val/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        self.log("val/acc", acc, on_step=False, on_epoch=True, prog_bar=True, batch_size=n)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
