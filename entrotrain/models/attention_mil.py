"""Attention-based multiple-instance learning (MIL): an instance encoder, multi-head attention pooling with one
learned query over the instances of a bag, and a bag classifier.

The pooling calls :func:`torch.nn.functional.scaled_dot_product_attention` with a boolean key-padding mask, so
entrotrain's attention taps record it (site ``model.pool`` inside :class:`~entrotrain.tasks.multiple_instance.DigitsMILTask`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionMIL", "MultiHeadAttentionPool"]


class MultiHeadAttentionPool(nn.Module):
    """Pool ``(B, N, d)`` instances to ``(B, d)`` with one learned query and ``n_heads`` heads.

    Args:
        dim: instance embedding width (divisible by ``n_heads``).
        n_heads: attention heads.
        query_init_std: std of the learned query's init (AEM's reference uses 1e-6: uniform attention at init).
    """

    def __init__(self, dim: int, n_heads: int = 8, query_init_std: float = 1e-6) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} must be divisible by n_heads={n_heads}.")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.query = nn.Parameter(torch.randn(1, n_heads, 1, self.head_dim) * query_init_std)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, h: Tensor, mask: Tensor | None = None) -> Tensor:
        """``h`` ``(B, N, d)``, ``mask`` ``(B, N)`` bool (True = real instance) -> ``(B, d)``."""
        b, n, _ = h.shape
        k = self.k_proj(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, N, d_h)
        v = self.v_proj(h).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        q = self.query.expand(b, -1, -1, -1)  # (B, H, 1, d_h)
        attn_mask = None if mask is None else mask[:, None, None, :].bool()  # (B, 1, 1, N), True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, 1, d_h)
        return self.out_proj(out.reshape(b, self.n_heads * self.head_dim))


class AttentionMIL(nn.Module):
    """Instance MLP -> multi-head attention pooling (``self.pool``) -> linear bag classifier.

    Args:
        in_features: features per instance (64 for flattened 8×8 digits).
        dim: instance embedding width.
        n_heads: pooling heads.
        hidden: hidden width of the instance encoder.
        dropout: dropout on the instance embeddings and the pooled vector.
        n_outputs: logits per bag (1 for binary bags).
    """

    def __init__(
        self,
        in_features: int = 64,
        dim: int = 64,
        n_heads: int = 8,
        hidden: int = 128,
        dropout: float = 0.0,
        n_outputs: int = 1,
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU(), nn.Dropout(dropout)
        )
        self.pool = MultiHeadAttentionPool(dim, n_heads)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_outputs))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x`` ``(B, N, in_features)``, ``mask`` ``(B, N)`` -> logits ``(B, n_outputs)``."""
        return self.head(self.pool(self.encoder(x), mask))
