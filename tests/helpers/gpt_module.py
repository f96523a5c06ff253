"""A TinyGPT LightningModule (optionally σReparam-converted), shared by callback and DDP tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F

from entrotrain.models import TinyGPT
from entrotrain.regularizers.sigma_reparam import sigma_reparam

VOCAB, SEQ, HEADS = 50, 16, 2


class GPTModule(L.LightningModule):
    """A 2-layer, 2-head :class:`TinyGPT` trained on next-token cross-entropy with Adam (lr 1e-2), σReparam-converted
    (``lm_head`` excluded) when ``convert``; ``seed``: ``torch.manual_seed`` before the weights are drawn (None: the
    global RNG as it stands)."""

    def __init__(
        self, convert: bool = True, dropout: float = 0.0, vocab_size: int = VOCAB, block_size: int = SEQ,
        n_embd: int = 32, seed: int | None = None,
    ) -> None:
        super().__init__()
        if seed is not None:
            torch.manual_seed(seed)
        self.model = TinyGPT(
            vocab_size=vocab_size, block_size=block_size, n_layer=2, n_head=HEADS, n_embd=n_embd, dropout=dropout
        )
        if convert:
            sigma_reparam(self.model, exclude=("lm_head",))

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        logits = self.model(idx[:, :-1])
        return F.cross_entropy(logits.reshape(-1, self.model.vocab_size), idx[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

