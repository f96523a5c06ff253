"""Independent float64 brute force for attention entropy: loop over rows, softmax over the valid keys, -Σ p ln p."""

from __future__ import annotations

import math

import torch


def causal_head_means(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head mean entropy (nats) and mean normalised entropy of causal attention, ``q, k`` ``(B, H, T, D)``."""
    q, k = q.double(), k.double()
    b, h, t, d = q.shape
    ent = torch.zeros(h, dtype=torch.float64)
    norm = torch.zeros(h, dtype=torch.float64)
    for head in range(h):
        e_sum, n_sum, n_rows = 0.0, 0.0, 0
        for row in range(b):
            for i in range(t):
                s = (q[row, head, i] @ k[row, head, : i + 1].T) / math.sqrt(d)
                p = torch.softmax(s, 0)
                e = float(-(p * torch.log(p)).sum())
                e_sum += e
                if i >= 1:
                    n_sum += e / math.log(i + 1)
                    n_rows += 1
        ent[head] = e_sum / (b * t)
        norm[head] = n_sum / n_rows
    return ent, norm
