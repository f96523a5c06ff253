"""Small LightningModules for callback tests: attention through SDPA, by hand, or through nn.MultiheadAttention."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, HEADS, SEQ = 23, 16, 4, 12


class SDPAAttention(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.dropout = dropout
        self.last_qk: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        self.last_qk = (q.detach().clone(), k.detach().clone())
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        return self.proj(y.transpose(1, 2).reshape(b, t, DIM))


class HandAttention(SDPAAttention):
    """softmax(q kᵀ) by hand: invisible to the SDPA tap."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(DIM // HEADS)
        s = s.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        return self.proj((s.softmax(-1) @ v).transpose(1, 2).reshape(b, t, DIM))


class TinyLM(L.LightningModule):
    def __init__(self, attention: type[nn.Module] = SDPAAttention, n_layer: int = 2, lr: float = 1e-2, dropout: float = 0.0):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(attention(dropout) for _ in range(n_layer))
        self.head = nn.Linear(DIM, VOCAB)
        self.lr = lr
        self.fail_at: int | None = None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.emb(idx)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step >= self.fail_at:
            raise RuntimeError("boom")
        (idx,) = batch
        logits = self(idx[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def token_loader(n: int = 64, batch_size: int = 8, seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (n, SEQ + 1), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=batch_size, shuffle=False)


def quiet_trainer(**kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_steps=6,
        deterministic=True,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
