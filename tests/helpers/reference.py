"""Brute-force float64 references, written independently of ``entrotrain.functional``.

Everything here loops over rows in Python: the valid subset of a row is selected explicitly, softmaxed in
float64 and ``-Σ p ln p`` is summed over it. Masks are built from their definitions (index loops / ``tril``), not
from ``entrotrain.functional.attention_masks``. Slow by design: use small shapes.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor


def row_entropy64(values: Tensor, valid: Tensor | None = None) -> tuple[float, int]:
    """Entropy (nats) of ``softmax`` over the valid, not ``-inf`` entries of a 1-D row, and their count.

    Returns ``(0.0, 0)`` for a row with no valid entry and ``nan`` when a valid entry is NaN or ``+inf``.
    """
    z = values.detach().double().flatten()
    keep = z != float("-inf")
    if valid is not None:
        keep &= valid.flatten().bool()
    z = z[keep]
    if z.numel() == 0:
        return 0.0, 0
    if bool(torch.isnan(z).any()) or bool(torch.isposinf(z).any()):
        return float("nan"), int(z.numel())
    p = torch.softmax(z, 0)
    p = p[p > 0]  # 0 ln 0 = 0
    return float(-(p * torch.log(p)).sum()), int(z.numel())


def probs_entropy64(p: Tensor) -> float:
    """``-Σ p ln p`` of a 1-D probability row in float64, with ``0 ln 0 = 0``."""
    p = p.detach().double().flatten()
    if bool(torch.isnan(p).any()):
        return float("nan")
    p = p[p > 0]
    return float(-(p * torch.log(p)).sum())


def entropy_rows64(logits: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """Entropy along ``dim`` of every row of ``logits`` (any shape), float64, by a Python loop over rows.

    ``mask`` is broadcast to ``logits``' shape *before* ``dim`` is moved (numpy broadcasting on the original
    layout), ``False`` = the entry takes no part.
    """
    x = logits.detach().double()
    m = None if mask is None else torch.broadcast_to(mask, x.shape).movedim(dim, -1)
    x = x.movedim(dim, -1)
    out = torch.zeros(x.shape[:-1], dtype=torch.float64)
    for idx in _indices(x.shape[:-1]):
        out[idx] = row_entropy64(x[idx], None if m is None else m[idx])[0]
    return out


def _indices(shape: torch.Size):
    if len(shape) == 0:
        yield ()
        return
    for flat in range(math.prod(shape)):
        idx = []
        for size in reversed(shape):
            idx.append(flat % size)
            flat //= size
        yield tuple(reversed(idx))


def valid_keys(
    batch: int,
    heads: int,
    n_q: int,
    n_k: int,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
) -> Tensor:
    """Dense ``(B, H, Nq, Nk)`` boolean: which key each query may attend to, from the definitions.

    - causal: ``torch.ones(Nq, Nk).tril()`` (top-left aligned, as SDPA);
    - window ``w``: ``0 <= i - j < w`` when causal, ``|i - j| < w`` otherwise;
    - boolean ``attn_mask`` (True = attend), float ``attn_mask`` entries ``-inf`` / ``<= finfo.min`` are masked;
    - ``key_padding_mask`` ``(B, Nk)``, True = padding.
    """
    valid = torch.ones(batch, heads, n_q, n_k, dtype=torch.bool)
    if is_causal:
        valid &= torch.ones(n_q, n_k).tril().bool()
    if window is not None:
        pos = torch.zeros(n_q, n_k, dtype=torch.bool)
        for i in range(n_q):
            for j in range(n_k):
                pos[i, j] = (0 <= i - j < window) if is_causal else (abs(i - j) < window)
        valid &= pos
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            valid &= attn_mask
        else:
            valid &= attn_mask > torch.finfo(attn_mask.dtype).min
    if key_padding_mask is not None:
        valid &= ~key_padding_mask.bool()[:, None, None, :]
    return valid


def attention_entropy64(
    q: Tensor,
    k: Tensor,
    *,
    valid: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Brute-force per-query attention entropy in float64: ``(entropy, normalized, n_keys)``, each ``(B, H, Nq)``.

    ``k`` may have fewer heads (GQA/MQA): it is expanded with ``repeat_interleave(group, dim=1)``. ``valid`` is a
    boolean broadcastable to ``(B, H, Nq, Nk)``; ``bias`` an additive float broadcastable likewise (finite entries
    only; mask with ``valid``). Normalised entropy is ``H / ln n`` for ``n >= 2`` and 0 otherwise.
    """
    q, k = q.detach().double(), k.detach().double()
    batch, heads, n_q, dim = q.shape
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    n_k = k.shape[2]
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    valid = torch.ones(1, dtype=torch.bool) if valid is None else valid
    valid = torch.broadcast_to(valid, (batch, heads, n_q, n_k))
    if bias is not None:
        bias = torch.broadcast_to(bias.detach().double(), (batch, heads, n_q, n_k))
    ent = torch.zeros(batch, heads, n_q, dtype=torch.float64)
    norm = torch.zeros_like(ent)
    count = torch.zeros(batch, heads, n_q, dtype=torch.long)
    for b in range(batch):
        for h in range(heads):
            for i in range(n_q):
                s = scale * (k[b, h] @ q[b, h, i])  # (Nk,) scores of this one query
                if bias is not None:
                    s = s + bias[b, h, i]
                e, n = row_entropy64(s, valid[b, h, i])
                ent[b, h, i], count[b, h, i] = e, n
                norm[b, h, i] = e / math.log(n) if n >= 2 else 0.0
    return ent, norm, count


def probs_from_sdpa(q: Tensor, k: Tensor, **sdpa_kwargs) -> Tensor:
    """The attention probabilities *as SDPA computes them*: SDPA with ``value`` = identity returns ``softmax``."""
    n_k = k.shape[2]
    eye = torch.eye(n_k, dtype=q.dtype).expand(k.shape[0], k.shape[1], n_k, n_k)
    return torch.nn.functional.scaled_dot_product_attention(q, k, eye, **sdpa_kwargs)


def probs_entropy_rows64(p: Tensor) -> Tensor:
    """``-Σ p ln p`` along the last dim of any tensor, float64, by a loop over rows."""
    flat = p.detach().double().reshape(-1, p.shape[-1])
    return torch.tensor([probs_entropy64(row) for row in flat], dtype=torch.float64).reshape(p.shape[:-1])


def head_means(entropy: Tensor, normalized: Tensor, n_keys: Tensor) -> tuple[Tensor, Tensor]:
    """Per-head mean entropy over queries with ``>= 1`` key, and mean normalised entropy over ``>= 2`` keys."""
    heads = entropy.shape[1]
    ent, norm = torch.zeros(heads, dtype=torch.float64), torch.zeros(heads, dtype=torch.float64)
    for h in range(heads):
        rows = n_keys[:, h] >= 1
        ent[h] = entropy[:, h][rows].double().mean()
        rows2 = n_keys[:, h] >= 2
        norm[h] = normalized[:, h][rows2].double().mean()
    return ent, norm


@pytest.fixture(autouse=True)
def no_tap_leaks():
    """Import into a test module: a failing test must not leave a tap (hooks, TorchFunctionMode) armed."""
    yield
    from entrotrain.taps import attention_tap

    for tap in list(attention_tap._ACTIVE_TAPS):
        tap.disarm()
    attention_tap._ACTIVE_TAPS.clear()
    while torch._C._len_torch_function_stack():
        torch._C._pop_torch_function_stack()


@pytest.fixture(autouse=True)
def one_thread():
    """Import into a test module: tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine
    OpenMP barriers make every op ~100x slower. Restored after each test (other modules keep their setting)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
