r"""Triton kernels: per-query attention entropy, flash-style, forward and backward.

For query ``i`` of head ``h`` with scores :math:`s_{ij} = \text{scale}\cdot q_i\cdot k_j + b_{ij}` over its valid
keys :math:`V_i` (causal top-left, sliding window, padding, boolean / additive masks; GQA: query head ``h`` reads key
head ``h // (H / H_kv)``):

.. math:: H_i = \operatorname{lse}_{j\in V_i}(s_{ij}) - \sum_{j\in V_i} p_{ij} s_{ij}

Forward: a program owns ``BLOCK_M`` queries of one head and walks the key blocks its mask can reach (causal and
window bounds skip the rest), one ``tl.dot`` per block, folding the scores into the online recurrence (running max
:math:`m`, :math:`l = \sum e^{s-m}`, centred :math:`t = \sum e^{s-m}(s-m)`; :math:`H = \ln l - t/l`). It stores
``H``, ``lse``, :math:`E_p[s]` and :math:`|V_i|` per query: memory ``O(B·H·N)``, no ``N×N`` tensor, no value GEMM.

Backward (attention-entropy regularisers): :math:`\partial H_i/\partial s_{ij} = -p_{ij}(s_{ij} - E_{p_i}[s])`,
so with upstream :math:`g_i` and :math:`\delta_{ij} = -g_i p_{ij} (s_{ij} - E_{p_i}[s])`:
:math:`\partial q_i = \text{scale}\sum_j \delta_{ij} k_j` (one kernel over key blocks per query block) and
:math:`\partial k_j = \text{scale}\sum_{h \in \text{group}}\sum_i \delta_{ij} q_i` (one kernel over query blocks per key
block, summing the query heads that share the key head: no atomics). ``p`` is recomputed from the saved ``lse``.

float32 accumulation (IEEE float32 dots for float32 inputs; tensor cores with float32 accumulation for bf16 / fp16),
float32 output. Queries without a valid key: entropy 0, ``|V_i| = 0``, zero gradient. Additive biases take part in the
scores (as in the torch ``chunked`` path) but get no gradient.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from entrotrain.errors import EntrotrainError
from entrotrain.kernels.dispatch import (
    check_kernel_inputs,
    fallback_allowed,
    kernel_backward,
    on_device,
    require_triton,
)

require_triton()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

__all__ = ["AttentionEntropy", "attention_entropy", "attention_entropy_stats"]

#: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` by element size, for head_dim <= 128 on an H100 (sm_90). Shared memory
#: stays under 227 KiB (at most 131072 B) for head dims 64 / 128 / 256; ptxas (triton 3.9) spills a little in three
#: variants: bf16 forward d=128 causal+window 16 B and d=64 window-only 160 B a thread, fp32 dk with bias + padding
#: 424 B (``python benchmarks/kernel_compile_check.py``, no GPU needed). 2 bytes (bf16 / fp16): tensor-core tiles; 4
#: bytes (fp32, IEEE dots, no TF32): small tiles. Blocks shrink to the problem when it is smaller.
FWD_CONFIG = {2: (128, 64, 8, 3), 4: (32, 32, 8, 1)}
BWD_DQ_CONFIG = {2: (64, 64, 8, 2), 4: (32, 32, 8, 1)}
BWD_DK_CONFIG = {2: (64, 64, 8, 2), 4: (32, 32, 4, 1)}


class AttentionEntropy(NamedTuple):
    """Per-query ``entropy``, ``normalized`` (:math:`H/\\ln|V_i|`, 0 where ``|V_i| < 2``), ``n_keys``: ``(B, H, N)``."""

    entropy: Tensor
    normalized: Tensor
    n_keys: Tensor


@triton.jit
def _scores(
    q, k_base, valid_base, bias_base, kpm_base, rows, cols, n_q, n_k, s_kn, s_kd, s_vq, s_vk, s_bq, s_bk, s_pk,
    scale, window,
    HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, BLOCK_D: tl.constexpr, head_dim, DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    """Scores ``scale · q kᵀ + b`` of a ``(BLOCK_M, BLOCK_N)`` tile, the valid-key mask, and the key tile.

    ``rows`` and ``cols`` are int64 (as every index that multiplies a stride: ``rows * s_vq`` of a dense mask passes
    ``2**31`` at 46341 tokens).
    """
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    rows = rows.to(tl.int64)
    cols = cols.to(tl.int64)
    col_ok = cols < n_k
    k = tl.load(k_base + cols[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    if DOT_UPCAST:  # Triton's CPU interpreter (3.9) gets bf16 tl.dot wrong; exact bf16 products fit float32
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=DOT_PRECISION) * scale
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
    ok = (rows[:, None] < n_q) & col_ok[None, :]
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None])
    if HAS_WINDOW:
        ok = ok & (rows[:, None] - cols[None, :] < window)
        if not CAUSAL:
            ok = ok & (cols[None, :] - rows[:, None] < window)
    if HAS_KPM:
        pad = tl.load(kpm_base + cols * s_pk, mask=col_ok, other=1)
        ok = ok & (pad == 0)[None, :]
    if HAS_VALID:
        keep = tl.load(valid_base + rows[:, None] * s_vq + cols[None, :] * s_vk, mask=ok, other=0)
        ok = ok & (keep != 0)
    if HAS_BIAS:
        s += tl.load(bias_base + rows[:, None] * s_bq + cols[None, :] * s_bk, mask=ok, other=0.0).to(tl.float32)
    s = tl.where(ok, s, float("-inf"))
    return s, ok, k


@triton.jit
def _key_range(start_m, n_k, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_WINDOW: tl.constexpr):
    """Keys ``[lo, hi)`` that queries ``start_m .. start_m + BLOCK_M - 1`` can reach; ``lo`` a multiple of BLOCK_N."""
    lo = 0
    hi = n_k
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(0, start_m - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
        if not CAUSAL:
            hi = tl.minimum(hi, start_m + BLOCK_M - 1 + window)
    return lo, hi


@triton.jit
def _block_and_head(n, BLOCK: tl.constexpr):
    """``(first index, batch·head)`` of this program on the 1-D grid of ``cdiv(n, BLOCK) · batch·heads`` programs.

    One grid axis, blocks of a head adjacent: CUDA caps grid axes 1 and 2 at 65535, and ``batch · heads`` passes that
    (e.g. 4096 sequences x 16 heads); axis 0 takes ``2**31 - 1``.
    """
    pid = tl.program_id(0).to(tl.int64)
    n_blocks = tl.cdiv(n, BLOCK)
    return (pid % n_blocks) * BLOCK, pid // n_blocks


@triton.jit
def _attn_entropy_fwd(
    q_ptr, k_ptr, valid_ptr, bias_ptr, kpm_ptr, h_ptr, lse_ptr, mean_ptr, cnt_ptr,
    n_heads, group, n_q, n_k, head_dim,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vq, s_vk, s_bb, s_bh, s_bq, s_bk, s_pb, s_pk,
    scale, window,
    HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    start_m, bh = _block_and_head(n_q, BLOCK_M)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=(rows[:, None] < n_q) & (offs_d[None, :] < head_dim), other=0.0)
    k_base = k_ptr + b * s_kb + hk * s_kh
    valid_base = valid_ptr + b * s_vb + h * s_vh
    bias_base = bias_ptr + b * s_bb + h * s_bh
    kpm_base = kpm_ptr + b * s_pb
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    cnt = tl.zeros([BLOCK_M], tl.int32)
    lo, hi = _key_range(start_m, n_k, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        s, ok, _k = _scores(q, k_base, valid_base, bias_base, kpm_base, rows, cols, n_q, n_k, s_kn, s_kd, s_vq, s_vk,
                            s_bq, s_bk, s_pk, scale, window, HAS_VALID, HAS_BIAS, HAS_KPM, CAUSAL, HAS_WINDOW,
                            BLOCK_D, head_dim, DOT_PRECISION, DOT_UPCAST)
        cnt += tl.sum(ok.to(tl.int32), axis=1)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        shift = tl.where(m == float("-inf"), 0.0, m - m_safe)
        e = tl.exp(s - m_safe[:, None])
        c = tl.where(e > 0, s - m_safe[:, None], 0.0)
        t = alpha * (t + shift * l) + tl.sum(e * c, axis=1)
        l = alpha * l + tl.sum(e, axis=1)
        m = m_new
    has_any = (l > 0) | (l != l)
    l_safe = tl.where(has_any, l, 1.0)
    centred_mean = t / l_safe
    log_l = tl.log(l_safe)
    m_safe = tl.where(has_any, m, 0.0)
    out = bh * n_q + rows
    row_ok = rows < n_q
    entropy = log_l - centred_mean
    entropy = tl.where(entropy < 0.0, 0.0, entropy)  # round-off below 0; not tl.maximum, which turns NaN into 0
    tl.store(h_ptr + out, tl.where(has_any, entropy, 0.0), mask=row_ok)
    tl.store(lse_ptr + out, tl.where(has_any, m_safe + log_l, float("-inf")), mask=row_ok)
    tl.store(mean_ptr + out, tl.where(has_any, m_safe + centred_mean, 0.0), mask=row_ok)
    tl.store(cnt_ptr + out, cnt, mask=row_ok)


@triton.jit
def _attn_entropy_bwd_dq(
    q_ptr, k_ptr, valid_ptr, bias_ptr, kpm_ptr, lse_ptr, mean_ptr, g_ptr, dq_ptr,
    n_heads, group, n_q, n_k, head_dim,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vq, s_vk, s_bb, s_bh, s_bq, s_bk, s_pb, s_pk,
    s_db, s_dh, s_dn, s_dd,
    scale, window,
    HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    start_m, bh = _block_and_head(n_q, BLOCK_M)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    q_off = b * s_qb + h * s_qh + rows[:, None] * s_qn + offs_d[None, :] * s_qd
    q_mask = (rows[:, None] < n_q) & (offs_d[None, :] < head_dim)
    q = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
    row_ok = rows < n_q
    stat = bh * n_q + rows
    lse = tl.load(lse_ptr + stat, mask=row_ok, other=float("-inf"))
    has_any = lse != float("-inf")
    lse = tl.where(has_any, lse, 0.0)
    mean = tl.load(mean_ptr + stat, mask=row_ok, other=0.0)
    g = tl.where(has_any, tl.load(g_ptr + stat, mask=row_ok, other=0.0), 0.0)
    k_base = k_ptr + b * s_kb + hk * s_kh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, n_k, window, BLOCK_M, BLOCK_N, CAUSAL, HAS_WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        s, ok, k = _scores(q, k_base, valid_ptr + b * s_vb + h * s_vh, bias_ptr + b * s_bb + h * s_bh,
                           kpm_ptr + b * s_pb, rows, cols, n_q, n_k, s_kn, s_kd, s_vq, s_vk, s_bq, s_bk, s_pk,
                           scale, window, HAS_VALID, HAS_BIAS, HAS_KPM, CAUSAL, HAS_WINDOW, BLOCK_D, head_dim,
                           DOT_PRECISION, DOT_UPCAST)
        p = tl.exp(s - lse[:, None])
        ds = -g[:, None] * p * tl.where(p > 0, s - mean[:, None], 0.0)
        if DOT_UPCAST:
            dq = tl.dot(ds, k.to(tl.float32), dq, input_precision=DOT_PRECISION)
        else:
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    dq_off = b * s_db + h * s_dh + rows[:, None] * s_dn + offs_d[None, :] * s_dd  # dq's own strides
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _attn_entropy_bwd_dk(
    q_ptr, k_ptr, valid_ptr, bias_ptr, kpm_ptr, lse_ptr, mean_ptr, g_ptr, dk_ptr,
    n_heads, group, n_q, n_k, head_dim,
    s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vq, s_vk, s_bb, s_bh, s_bq, s_bk, s_pb, s_pk,
    s_db, s_dh, s_dn, s_dd,
    scale, window,
    HAS_VALID: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_KPM: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    start_n, bhk = _block_and_head(n_k, BLOCK_N)
    n_kv = n_heads // group
    b = bhk // n_kv
    hk = bhk % n_kv
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    k_base = k_ptr + b * s_kb + hk * s_kh
    # queries that can reach keys start_n .. start_n + BLOCK_N - 1
    lo = 0
    hi = n_q
    if CAUSAL:
        lo = start_n
    if HAS_WINDOW:
        hi = tl.minimum(hi, start_n + BLOCK_N - 1 + window)
        if not CAUSAL:
            lo = tl.maximum(0, start_n - window + 1)
    lo = (lo // BLOCK_M) * BLOCK_M
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for j in range(0, group):
        h = hk * group + j
        bh = b * n_heads + h
        for start_m in range(lo, hi, BLOCK_M):
            rows = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            row_ok = rows < n_q
            q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None] * s_qn + offs_d[None, :] * s_qd,
                        mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
            s, ok, _k = _scores(q, k_base, valid_ptr + b * s_vb + h * s_vh, bias_ptr + b * s_bb + h * s_bh,
                                kpm_ptr + b * s_pb, rows, cols, n_q, n_k, s_kn, s_kd, s_vq, s_vk, s_bq, s_bk, s_pk,
                                scale, window, HAS_VALID, HAS_BIAS, HAS_KPM, CAUSAL, HAS_WINDOW, BLOCK_D, head_dim,
                                DOT_PRECISION, DOT_UPCAST)
            stat = bh * n_q + rows
            lse = tl.load(lse_ptr + stat, mask=row_ok, other=float("-inf"))
            has_any = lse != float("-inf")
            lse = tl.where(has_any, lse, 0.0)
            mean = tl.load(mean_ptr + stat, mask=row_ok, other=0.0)
            g = tl.where(has_any, tl.load(g_ptr + stat, mask=row_ok, other=0.0), 0.0)
            p = tl.exp(s - lse[:, None])
            ds = -g[:, None] * p * tl.where(p > 0, s - mean[:, None], 0.0)
            if DOT_UPCAST:
                dk = tl.dot(tl.trans(ds), q.to(tl.float32), dk, input_precision=DOT_PRECISION)
            else:
                dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=DOT_PRECISION)
    tl.store(dk_ptr + b * s_db + hk * s_dh + cols[:, None] * s_dn + offs_d[None, :] * s_dd,
             (dk * scale).to(dk_ptr.dtype.element_ty), mask=(cols[:, None] < n_k) & (offs_d[None, :] < head_dim))


# ----------------------------------------------------------------------------------------------------------- host


class _Masks(NamedTuple):
    valid: Tensor | None  # uint8 view broadcast to (B, H, Nq, Nk) (zero strides where broadcast)
    bias: Tensor | None  # float, broadcast likewise
    kpm: Tensor | None  # uint8 (B or 1, Nk), 1 = padding
    causal: bool
    window: int | None


def _prepare_masks(shape, attn_mask, key_padding_mask, is_causal, window, device) -> _Masks:
    """The conventions of :class:`entrotrain.functional.attention_masks.AttentionMask`, as kernel arguments."""
    batch, heads, n_q, n_k = shape
    if window is not None and int(window) < 1:
        raise EntrotrainError(f"window must be a positive number of keys, got {window}.")
    valid = bias = kpm = None
    if attn_mask is not None:
        if attn_mask.dim() > 4:
            raise EntrotrainError(f"attn_mask must have at most 4 dims (batch, heads, queries, keys), got "
                                  f"{tuple(attn_mask.shape)}.")
        mask = attn_mask.to(device).reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        try:
            torch.broadcast_shapes(mask.shape, shape)
        except RuntimeError as err:
            raise EntrotrainError(
                f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' shape {shape} "
                "(batch, heads, queries, keys)."
            ) from err
        if mask.dtype == torch.bool:
            valid = mask
        elif mask.is_floating_point():
            if torch.is_grad_enabled() and mask.requires_grad:
                raise EntrotrainError(
                    "the Triton attention-entropy kernel gives no gradient to attn_mask; use impl='torch' for a "
                    "learnable bias."
                )
            blocked = mask <= torch.finfo(mask.dtype).min  # -inf, or HF's finfo.min for masked keys
            if bool(blocked.any()):
                valid = ~blocked
                mask = torch.where(blocked, torch.zeros_like(mask), mask)
            if bool((mask != 0).any()):
                bias = mask
        else:
            raise EntrotrainError(
                f"attn_mask must be boolean (True = attend) or floating (additive), got {mask.dtype}."
            )
    if key_padding_mask is not None:
        kpm_shape = tuple(key_padding_mask.shape)
        if len(kpm_shape) != 2 or kpm_shape[1] != n_k or kpm_shape[0] not in (1, batch):
            raise EntrotrainError(
                f"key_padding_mask must have shape (batch, keys) = ({batch}, {n_k}), got "
                f"{tuple(key_padding_mask.shape)}; True marks padding."
            )
        kpm = key_padding_mask.to(device=device, dtype=torch.bool).expand(batch, n_k).view(torch.uint8)
    if valid is not None:
        valid = valid.expand(shape).view(torch.uint8)
    if bias is not None:
        bias = bias.expand(shape)
    return _Masks(valid, bias, kpm, bool(is_causal), None if window is None else int(window))


def _strides(x: Tensor | None, n: int) -> list[int]:
    return list(x.stride()) if x is not None else [0] * n


def _common_args(q, k, masks: _Masks):
    batch, heads, n_q, dim = q.shape
    args = [heads, heads // k.shape[1], n_q, k.shape[2], dim, *q.stride(), *k.stride()]
    args += _strides(masks.valid, 4) + _strides(masks.bias, 4) + _strides(masks.kpm, 2)
    flags = dict(
        HAS_VALID=masks.valid is not None, HAS_BIAS=masks.bias is not None, HAS_KPM=masks.kpm is not None,
        CAUSAL=masks.causal, HAS_WINDOW=masks.window is not None,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_UPCAST=q.device.type != "cuda",
    )
    ptrs = [masks.valid if masks.valid is not None else q, masks.bias if masks.bias is not None else q,
            masks.kpm if masks.kpm is not None else q]
    return ptrs, args, flags


def _config(table: dict, q: Tensor, n_q: int, n_k: int, masks: _Masks) -> tuple[int, int, int, int]:
    """Blocks for this dtype, shrunk (to >= 16, ``tl.dot``'s minimum) when the problem is smaller."""
    bm0, bn0, warps, stages = table[q.element_size() if q.element_size() in table else 4]
    if q.shape[-1] > 128:  # wider heads: halve the tiles to stay inside registers / shared memory (not tuned)
        bm0, bn0 = max(16, bm0 // 2), max(16, bn0 // 2)
    if (masks.valid is not None or masks.bias is not None) and bm0 >= 64 and q.element_size() == 2:
        bm0 //= 2  # dense mask / bias tiles held too: full-size tiles spill registers on sm_90
    bm = min(bm0, max(16, triton.next_power_of_2(n_q)))
    bn = min(bn0, max(16, triton.next_power_of_2(n_k)))
    return bm, bn, (warps if (bm, bn) == (bm0, bn0) else 4), stages


def _forward(q, k, masks: _Masks, scale: float):
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    out = [torch.empty(batch, heads, n_q, dtype=torch.float32, device=q.device) for _ in range(3)]
    cnt = torch.empty(batch, heads, n_q, dtype=torch.int32, device=q.device)
    ptrs, args, flags = _common_args(q, k, masks)
    bm, bn, warps, stages = _config(FWD_CONFIG, q, n_q, n_k, masks)
    _attn_entropy_fwd[(triton.cdiv(n_q, bm) * batch * heads,)](
        q, k, *ptrs, *out, cnt, *args, scale, masks.window or 0, **flags, BLOCK_M=bm, BLOCK_N=bn,
        num_warps=warps, num_stages=stages,
    )
    return (*out, cnt)


class _TritonAttentionEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, masks: _Masks, scale: float):  # type: ignore[override]
        entropy, lse, mean, cnt = _forward(q, k, masks, scale)
        ctx.save_for_backward(q, k, lse, mean)
        ctx.masks, ctx.scale, ctx.fallback = masks, scale, fallback_allowed()
        ctx.mark_non_differentiable(cnt)
        return entropy, cnt

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g, _g_cnt):  # type: ignore[override]
        q, k, lse, mean = ctx.saved_tensors
        return kernel_backward("attention-entropy", ctx.fallback, lambda: _backward(ctx, q, k, lse, mean, g),
                               lambda: _torch_backward(ctx, q, k, g))


def _torch_backward(ctx, q: Tensor, k: Tensor, g: Tensor):
    """The same ``∂q``, ``∂k`` through the torch path, the kernel's mask arguments turned back into its inputs."""
    from entrotrain.functional.attention import attention_entropy_stats as torch_stats

    masks = ctx.masks
    attn_mask = None if masks.valid is None else masks.valid.view(torch.bool)
    if masks.bias is not None:
        attn_mask = masks.bias if attn_mask is None else masks.bias.masked_fill(~attn_mask, float("-inf"))
    wanted = ctx.needs_input_grad[:2]
    with torch.enable_grad():
        q2, k2 = (x.detach().requires_grad_(True) if want else x.detach() for x, want in zip((q, k), wanted))
        entropy = torch_stats(
            q2, k2, attn_mask=attn_mask, key_padding_mask=None if masks.kpm is None else masks.kpm.view(torch.bool),
            is_causal=masks.causal, window=masks.window, scale=ctx.scale, impl="torch",
        ).entropy
        found = iter(torch.autograd.grad(entropy, [x for x, want in zip((q2, k2), wanted) if want], g,
                                         materialize_grads=True))
    return (*(next(found) if want else None for want in wanted), None, None)


def _backward(ctx, q: Tensor, k: Tensor, lse: Tensor, mean: Tensor, g: Tensor):
    """The ``∂q`` and ``∂k`` kernels."""
    masks, scale = ctx.masks, ctx.scale
    batch, heads, n_q, _ = q.shape
    n_k, kv_heads = k.shape[2], k.shape[1]
    g = g.float().contiguous()
    ptrs, args, flags = _common_args(q, k, masks)
    window = masks.window or 0
    dq = dk = None
    if ctx.needs_input_grad[0]:
        # its own strides: empty_like(q) is contiguous when q is a strided view (a slice of a fused qkv), so
        # writing with q's strides would run past the buffer
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        bm, bn, warps, stages = _config(BWD_DQ_CONFIG, q, n_q, n_k, masks)
        _attn_entropy_bwd_dq[(triton.cdiv(n_q, bm) * batch * heads,)](
            q, k, *ptrs, lse, mean, g, dq, *args, *dq.stride(), scale, window, **flags, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=warps, num_stages=stages,
        )
    if ctx.needs_input_grad[1]:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        bm, bn, warps, stages = _config(BWD_DK_CONFIG, q, n_q, n_k, masks)
        _attn_entropy_bwd_dk[(triton.cdiv(n_k, bn) * batch * kv_heads,)](
            q, k, *ptrs, lse, mean, g, dk, *args, *dk.stride(), scale, window, **flags, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=warps, num_stages=stages,
        )
    return dq, dk, None, None


def _check_qk(q: Tensor, k: Tensor) -> None:
    for name, x in (("q", q), ("k", k)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
            raise EntrotrainError(
                f"{name} must be a floating (batch, heads, tokens, head_dim) tensor, got "
                f"{tuple(getattr(x, 'shape', ()))}."
            )
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise EntrotrainError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim (dims 0, 3).")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise EntrotrainError(
            f"q has {q.shape[1]} heads and k {k.shape[1]}: the query heads must be a multiple of the key heads (GQA)."
        )
    if q.dtype != k.dtype:
        raise EntrotrainError(f"q and k must share a dtype, got {q.dtype} and {k.dtype}.")


def attention_entropy_stats(
    q: Tensor,
    k: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    path: str = "auto",
    chunk_elements: int | None = None,
) -> AttentionEntropy:
    r"""Per-query entropy, normalised entropy and valid-key count, as the torch ``attention_entropy_stats``.

    .. math:: H_i = \operatorname{lse}_{j \in V_i}(s_{ij}) - \sum_{j\in V_i} p_{ij} s_{ij}, \qquad
              \hat H_i = H_i / \ln |V_i|

    Args:
        q: ``(B, H, Nq, D)``; k: ``(B, H_kv, Nk, D)`` with ``H % H_kv == 0``; float32 / bfloat16 / float16.
        attn_mask: boolean (True = attend) or additive float mask broadcastable to ``(B, H, Nq, Nk)``.
        key_padding_mask: ``(B, Nk)`` boolean, True = padding.
        is_causal: key ``j`` visible to query ``i`` iff ``j <= i`` (top-left).
        window: sliding window: ``0 <= i - j < w`` when causal, ``|i - j| < w`` otherwise.
        scale: default ``1/sqrt(D)`` (1 for ``D = 0``: every score 0, uniform attention over the valid keys).
        path, chunk_elements: accepted for signature compatibility and ignored (the kernel is its own path).

    Returns:
        :class:`AttentionEntropy` of ``(B, H, Nq)``: float32 entropy (differentiable in ``q`` and ``k``) and
        normalised entropy, int64 ``n_keys``.
    """
    del path, chunk_elements
    _check_qk(q, k)
    check_kernel_inputs(q, k)
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    scale = (1.0 / math.sqrt(dim) if dim else 1.0) if scale is None else float(scale)  # head_dim 0: scores all 0
    masks = _prepare_masks((batch, heads, n_q, n_k), attn_mask, key_padding_mask, is_causal, window, q.device)
    if 0 in (batch, heads, n_q, n_k):  # (head_dim 0 runs: every score is 0 + bias, as the torch path)
        entropy = q.float().sum(-1) * 0
        return AttentionEntropy(entropy, entropy.clone(), torch.zeros(entropy.shape, dtype=torch.long,
                                                                       device=q.device))
    with on_device(q):
        entropy, cnt = _TritonAttentionEntropy.apply(q, k, masks, scale)
    n_keys = cnt.long()
    n = n_keys.to(entropy.dtype)
    defined = n >= 2
    normalized = torch.where(defined, entropy / torch.log(torch.where(defined, n, 2.0)), 0.0)
    return AttentionEntropy(entropy, normalized, n_keys)


def attention_entropy(
    q: Tensor,
    k: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    normalize: bool = False,
    path: str = "auto",
    chunk_elements: int | None = None,
) -> Tensor:
    r"""Per-query attention entropy ``(B, H, Nq)`` in nats, or :math:`H_i/\ln|V_i|` with ``normalize=True``.

    Arguments as :func:`attention_entropy_stats`. Differentiable in ``q`` and ``k``
    (:math:`\partial H_i/\partial s_{ij} = -p_{ij}(s_{ij} - E_{p_i}[s])`).
    """
    out = attention_entropy_stats(
        q, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, window=window,
        scale=scale, path=path, chunk_elements=chunk_elements,
    )
    return out.normalized if normalize else out.entropy
