"""Token selection for Clip-Cov and KL-Cov: verl's per-micro-batch rules and the exact global (cross-rank) ones.

Global selection is split-invariant: every token gets a global index ``(row_offset + b) * T_max + t`` (rows of
earlier ranks first), Clip-Cov's random keys are a pure function ``hash(seed, counter, global index)``
(splitmix64), and the top-k over ranks gathers each rank's local top-k, ties broken by the smaller global index.
So 2 ranks select exactly the tokens one process selects on the concatenated batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from entrotrain.functional._dist import all_reduce_max, gather_rows, world

__all__ = ["call_seed", "counter_uniform", "global_index", "global_topk_mask", "rank_seed"]


def global_index(shape: torch.Size, device: torch.device) -> Tensor:
    """Global token index ``(row_offset + b) * T_max + t`` of every token of this rank's ``(B, T)`` batch."""
    b, t = shape
    sizes = gather_rows(torch.tensor([b], dtype=torch.int64, device=device)).reshape(-1)
    rank, _ = world()
    offset = int(sizes[:rank].sum()) if rank > 0 else 0
    t_max = int(all_reduce_max(torch.tensor([t], dtype=torch.int64, device=device)))
    rows = torch.arange(b, dtype=torch.int64, device=device)[:, None] + offset
    cols = torch.arange(t, dtype=torch.int64, device=device)[None, :]
    return rows * t_max + cols


_M64 = (1 << 64) - 1


def _signed(c: int) -> int:
    c &= _M64
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix(x: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors (wrapping arithmetic)."""
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _shr(x, 31)


def _splitmix_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def counter_uniform(seed: int, counter: int, index: Tensor) -> Tensor:
    """Counter-based uniform ``[0, 1)`` float64 keys: a pure function of ``(seed, counter, index)``."""
    base = _signed(_splitmix_int(_splitmix_int(seed & _M64) ^ (counter & _M64)))
    bits = _splitmix(index ^ base)
    return _shr(bits, 11).double() * (2.0**-53)


def global_topk_mask(score: Tensor, cand: Tensor, gidx: Tensor, k: int) -> Tensor:
    """Mask of the ``k`` candidates with the largest ``score`` over all ranks (ties: smaller global index first)."""
    if k <= 0:
        return torch.zeros_like(cand)
    s = torch.where(cand, score, torch.full((), -math.inf, dtype=score.dtype, device=score.device)).reshape(-1)
    g = gidx.reshape(-1)
    k_local = min(k, s.numel())
    # stable sort: equal scores keep the flat (= global index) order, so the local cut agrees with the global one
    top = torch.sort(s, descending=True, stable=True).indices[:k_local]
    vals, idx = s[top], g[top]
    pad = k - k_local
    if pad:
        vals = torch.cat([vals, torch.full((pad,), -math.inf, dtype=s.dtype, device=s.device)])
        idx = torch.cat([idx, torch.full((pad,), -1, dtype=torch.int64, device=s.device)])
    all_vals = gather_rows(vals).reshape(-1)
    all_idx = gather_rows(idx).reshape(-1)
    order = torch.sort(all_idx, stable=True).indices  # tie-break by global index, then sort by score (stable)
    all_vals, all_idx = all_vals[order], all_idx[order]
    order = torch.sort(all_vals, descending=True, stable=True).indices[:k]
    chosen = all_idx[order]
    chosen = chosen[torch.isfinite(all_vals[order])]
    return cand & torch.isin(gidx, chosen)


def rank_seed(seed: int) -> int:
    rank, _ = world()
    return _splitmix_int((seed & _M64) ^ _splitmix_int(rank + 1)) & ((1 << 63) - 1)


def call_seed(seed: int, counter: int) -> int:
    """A 63-bit generator seed that is a pure function of ``(seed, counter)`` (splitmix64): Clip-Cov's micro-batch
    generator for its ``counter``-th call."""
    return _splitmix_int(_splitmix_int(seed & _M64) ^ (counter & _M64)) & ((1 << 63) - 1)
