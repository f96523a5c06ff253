"""A nanoGPT-style, pre-LayerNorm Vision Transformer for tiny grayscale images.

Small enough to read on one screen and to train on a laptop CPU (built for scikit-learn's 8×8 digits). An image
``(B, 1, H, W)`` is cut into non-overlapping ``patch_size × patch_size`` patches, each flattened and linearly
embedded; a learned CLS token is prepended, learned positions are added, and pre-LN blocks with bidirectional
(non-causal) attention follow. The class logits are read from the CLS token.

Attention is computed with :func:`torch.nn.functional.scaled_dot_product_attention` on ``(B, H, T, D)`` tensors so
that entrotrain's attention tap observes every head. Module names seen from the model are ``blocks.{i}.attn`` (and
``model.blocks.{i}.attn`` from :class:`entrotrain.tasks.image_classification.DigitsViTTask`); each ``attn`` has a
fused ``qkv`` Linear with rows ``[q; k; v]`` and int attributes ``n_head`` and ``head_dim``, which
:class:`entrotrain.callbacks.SigmaReparamMonitor` reads.
"""

from __future__ import annotations

import torch
from torch import nn

from entrotrain.models.tiny_gpt import Block

__all__ = ["TinyViT"]


class TinyViT(nn.Module):
    """Vision Transformer: patch embedding, CLS token, learned positions, pre-LN blocks, linear head.

    Args:
        image_size: side ``S`` of the square input images (8 for the digits).
        patch_size: side ``P`` of the square patches (must divide ``S``): ``(S/P)²`` patch tokens plus one CLS.
        in_chans: input channels.
        num_classes: number of classes ``K``.
        n_layer: number of transformer blocks.
        n_head: attention heads per block.
        n_embd: model width ``C``.
        dropout: dropout probability (embeddings, attention, residuals).

    Shapes:
        ``forward(x)``: ``x`` is ``(B, in_chans, S, S)`` float; returns logits ``(B, K)``.
    """

    def __init__(
        self,
        image_size: int = 8,
        patch_size: int = 2,
        in_chans: int = 1,
        num_classes: int = 10,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
        self.image_size, self.patch_size, self.in_chans = image_size, patch_size, in_chans
        self.n_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Linear(in_chans * patch_size * patch_size, n_embd)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, n_embd))
        self.pos_emb = nn.Parameter(torch.randn(1, self.n_patches + 1, n_embd) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(n_embd, n_head, dropout, causal=False) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, num_classes)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, S, S)`` -> ``(B, N, C·P·P)`` patches in row-major order."""
        B, C, S, _ = x.shape
        P, n = self.patch_size, S // self.patch_size
        return x.reshape(B, C, n, P, n, P).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, C * P * P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, K)`` for images ``(B, C, S, S)``."""
        if x.dim() != 4 or x.shape[1:] != (self.in_chans, self.image_size, self.image_size):
            raise ValueError(f"x must be (B, {self.in_chans}, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        tok = self.patch_embed(self.patchify(x))
        x = torch.cat([self.cls_token.expand(len(tok), -1, -1), tok], dim=1)
        x = self.drop(x + self.pos_emb)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x[:, 0]))
