r"""Per-query attention entropy, exact, without necessarily forming the N×N attention matrix.

For query ``i`` of head ``h`` with scores :math:`s_{ij} = \text{scale}\cdot q_i\cdot k_j + b_{ij}` over its valid
keys :math:`V_i` (causal, padding, sliding window, boolean or additive masks):

.. math::

    H_i = \operatorname{lse}_{j \in V_i}(s_{ij}) - \sum_{j \in V_i} p_{ij} s_{ij}, \qquad
    \hat H_i = H_i / \ln |V_i| \quad (|V_i| \ge 2)

Three paths give the same numbers (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention
Entropy Collapse", track exactly this quantity per head):

- ``materialized``: all scores at once; for small models and tests.
- ``chunked``: blocks of queries, memory ``O(B·H·C·N)``; any mask or bias; differentiable (each block is
  recomputed in backward, so memory stays bounded with gradients too).
- ``fused``: the value := key identity. With :math:`\bar o_i = \mathrm{softmax}(s_i) K` (attention whose values
  are the keys), :math:`\sum_j p_{ij} s_{ij} = \text{scale}\cdot q_i\cdot\bar o_i` when the mask is 0/−∞, so
  :math:`H_i = \operatorname{lse}_i - \text{scale}\cdot q_i\cdot\bar o_i`: one flash-attention call that returns
  the log-sum-exp. Memory ``O(B·H·N)``. Not for additive biases (they need :math:`E_p[b]`). Differentiable:
  :math:`\partial H_i/\partial s_{ij} = -p_{ij}(s_{ij} - E_p[s]_i)` is exactly the ``dS`` of an attention backward
  with ``v := k`` and upstream ``dO_i = -g_i\,\text{scale}\,q_i``, so the backward is one call of the flash
  kernel's own backward (derivation and choices in :mod:`entrotrain.functional.attention_fused_grad`). CPU only
  (on CUDA the Triton kernel of :mod:`entrotrain.kernels` plays this part).

A regulariser that also needs the attention *output* gets both from one pass with
:func:`~entrotrain.functional.attention_joint.attention_with_entropy` (materialised, small score matrices; the entropy
adds an elementwise term to the attention's own backward), which a differentiable :class:`~entrotrain.taps.AttentionTap`
uses for SDPA calls.

Grouped-query / multi-query attention: ``k`` may have fewer heads than ``q``; every *query* head is scored, query
head ``h`` reading key head ``h // (H / H_kv)`` (as SDPA's ``enable_gqa`` and HF's ``repeat_kv``).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.utils.checkpoint
from torch import Tensor
from torch.autograd.function import once_differentiable

from entrotrain._validation import check_bool, check_choice, check_int, check_real, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional.attention_fused_grad import fused_attention_entropy, fused_grad_available
from entrotrain.functional.attention_masks import AttentionMask
from entrotrain.functional.entropy import accumulation_dtype, entropy_from_logits, entropy_from_probs, row_entropy

__all__ = [
    "AttentionEntropy",
    "AttentionPath",
    "attention_entropy",
    "attention_entropy_stats",
    "attention_entropy_from_scores",
    "attention_entropy_from_probs",
    "normalized_entropy",
]

AttentionPath = Literal["auto", "materialized", "chunked", "fused"]

#: Score elements per query block in the chunked path (4 Mi float32 = 16 MiB of scores per block).
DEFAULT_CHUNK_ELEMENTS = 1 << 22


class AttentionEntropy(NamedTuple):
    """Per-query results, each ``(batch, heads, queries)``.

    Attributes:
        entropy: :math:`H_i` in nats (0 where a query has no valid key).
        normalized: :math:`H_i / \\ln |V_i|`, 0 where ``|V_i| < 2`` (undefined there; see ``n_keys``).
        n_keys: :math:`|V_i|`, the number of keys the query attends to.
    """

    entropy: Tensor
    normalized: Tensor
    n_keys: Tensor


def normalized_entropy(entropy: Tensor, n_keys: Tensor) -> Tensor:
    r""":math:`H / \ln n` where ``n >= 2`` and 0 elsewhere (undefined there: exclude those rows when averaging).

    ``entropy`` floating, ``n_keys`` a tensor broadcastable with it; raises :class:`EntrotrainError` otherwise."""
    check_tensor(entropy, "entropy", floating=True)
    check_tensor(n_keys, "n_keys")
    try:
        torch.broadcast_shapes(entropy.shape, n_keys.shape)
    except RuntimeError:
        raise EntrotrainError(
            f"n_keys of shape {tuple(n_keys.shape)} does not broadcast with entropy of shape {tuple(entropy.shape)}."
        ) from None
    n = n_keys.to(entropy.dtype)
    defined = n >= 2
    return torch.where(defined, entropy / torch.log(torch.where(defined, n, torch.full_like(n, 2.0))), 0.0)


def _check_qk(q: Tensor, k: Tensor) -> None:
    """``q (B, H, Nq, D)`` and ``k (B, Hkv, Nk, D)`` floating, same batch and head_dim, ``H`` a multiple of ``Hkv``."""
    for name, x in (("q", q), ("k", k)):
        check_tensor(x, name, floating=True)
        if x.dim() != 4:
            raise EntrotrainError(
                f"{name} must be (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}; for (batch, tokens, "
                f"heads, head_dim) use einops.rearrange({name}, 'b n h d -> b h n d')."
            )
    if q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        raise EntrotrainError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim (dims 0 and 3)."
        )
    heads, kv_heads = q.shape[1], k.shape[1]
    if (kv_heads == 0 and heads != 0) or (kv_heads and heads % kv_heads):
        raise EntrotrainError(
            f"q has {heads} heads and k {kv_heads}: for grouped-query attention the query heads must be a "
            "multiple of the key heads (0 heads in both is allowed and gives empty results)."
        )


def _check_options(scale: float | None, is_causal: bool, path: str, chunk_elements: int) -> float | None:
    """Scalar arguments shared by every attention-entropy entry point; returns ``scale`` as a float (or None)."""
    check_bool(is_causal, "is_causal")
    check_choice(path, "path", ("auto", "materialized", "chunked", "fused"))
    check_int(chunk_elements, "chunk_elements", low=1)
    return check_real(scale, "scale", none_ok=True)


def _scores(q: Tensor, k_t: Tensor, scale: float, bias: Tensor | None) -> Tensor:
    """``scale · q kᵀ (+ bias)`` for a block of queries ``(B, H, C, D)`` against ``k_t`` ``(B, Hkv, D, N)``."""
    batch, heads, n_q, dim = q.shape
    kv_heads = k_t.shape[1]
    s = torch.matmul(q.reshape(batch, kv_heads, (heads // kv_heads) * n_q, dim), k_t) * scale
    s = s.reshape(batch, heads, n_q, k_t.shape[-1])
    return s if bias is None else s + bias.to(s.dtype)


def _entropy_block(q: Tensor, k_t: Tensor, scale: float, valid: Tensor | None, bias: Tensor | None):
    """Entropy and valid-key count of one block of queries (the in-place, chunked logits kernel does the rows)."""
    scores = _scores(q, k_t, scale, bias)
    if valid is None:
        counts = torch.full(scores.shape[:-1], scores.shape[-1], device=scores.device)
    else:
        valid = _broadcast_valid(valid, scores.shape)
        counts = valid.sum(-1)
    return entropy_from_logits(scores, mask=valid, impl="torch"), counts  # the torch path, all the way down


def _broadcast_valid(valid: Tensor, shape: torch.Size) -> Tensor:
    return valid.reshape((1,) * (len(shape) - valid.dim()) + tuple(valid.shape)).expand(shape)


def _chunked(
    q: Tensor, k: Tensor, scale: float, mask: AttentionMask, block: int, checkpoint: bool
) -> tuple[Tensor, Tensor]:
    acc = accumulation_dtype(q.dtype)
    k_t = k.to(acc).transpose(-1, -2)
    entropies, counts = [], []
    for start in range(0, q.shape[2], block):
        stop = min(start + block, q.shape[2])
        valid, bias = mask.block(start, stop)
        q_blk = q[:, :, start:stop].to(acc)
        if checkpoint:
            h, n = torch.utils.checkpoint.checkpoint(
                _entropy_block, q_blk, k_t, scale, valid, bias, use_reentrant=False
            )
        else:
            h, n = _entropy_block(q_blk, k_t, scale, valid, bias)
        entropies.append(h)
        counts.append(n)
    return torch.cat(entropies, dim=-1), torch.cat(counts, dim=-1)


def _fused_available(q: Tensor) -> bool:
    return fused_grad_available(q)


def _tracing() -> bool:
    """Whether dynamo traces this call (``torch.compile``): the fused path then decides nothing on the host."""
    return torch.compiler.is_compiling()


def _fused(
    q: Tensor, k: Tensor, scale: float, mask: AttentionMask, block: int, needs_grad: bool, guard_keys: bool = True
) -> tuple[Tensor, Tensor]:
    """``H = lse − scale · q·ō`` with ``ō`` = attention(q, k, value=k) from the lse-returning CPU flash kernel.

    Differentiable in ``q`` and ``k``: the backward is one flash-attention backward (derivation in
    :mod:`entrotrain.functional.attention_fused_grad`). Non-finite keys, without a host sync: the kernel multiplies a
    masked key's weight 0 by the key itself (0 · NaN = NaN would reach queries that mask the key), so the NaN/Inf
    entries of ``k`` enter the kernel as 0, and every query that *sees* a key holding one (:func:`_sees_bad_key`) gets
    NaN, as the chunked path gives; :class:`_NonFiniteKeys` gives the gradients the chunked path's NaN pattern.
    ``guard_keys=False`` (eager mode, where the caller has sent non-finite keys to the chunked path) skips that
    bookkeeping."""
    acc = accumulation_dtype(q.dtype)
    q_acc, k_acc = q.to(acc), k.to(acc)
    if not guard_keys:
        is_causal = mask.is_causal and mask.window is None
        additive = mask.dense_additive(acc, positions=not is_causal)
        entropy = fused_attention_entropy(q_acc, k_acc, scale, is_causal=is_causal, additive=additive)
        counts = mask.key_counts(block).expand(q.shape[0], q.shape[1], q.shape[2])
        return torch.where(counts > 0, entropy.clamp_min(0.0), 0.0), counts
    k_det = k_acc.detach()
    bad = _nonfinite_along(k_det, -1)  # (B, Hkv, Nk): keys holding a NaN/Inf
    k_acc = torch.nan_to_num(k_acc, nan=0.0, posinf=0.0, neginf=0.0)  # a key's readers are set to NaN below
    is_causal = mask.is_causal and mask.window is None  # the kernel applies a plain causal mask itself
    additive = mask.dense_additive(acc, positions=not is_causal)
    entropy = fused_attention_entropy(q_acc, k_acc, scale, is_causal=is_causal, additive=additive)
    counts = mask.key_counts(block).expand(q.shape[0], q.shape[1], q.shape[2])
    entropy = torch.where(counts > 0, entropy.clamp_min(0.0), 0.0)
    groups = q.shape[1] // k.shape[1]
    sees_bad = _sees_bad_key(mask, bad.repeat_interleave(groups, dim=1), block).expand_as(entropy)
    if needs_grad:
        return _NonFiniteKeys.apply(entropy, q, k, sees_bad, _nonfinite_along(k_det, -2)), counts
    return entropy.masked_fill(sees_bad, float("nan")), counts


def _nonfinite_along(x: Tensor, dim: int) -> Tensor:
    """Whether ``x`` holds a NaN/Inf along ``dim``: two reductions (amax / amin propagate NaN), no ``x``-sized
    temporary (``isfinite(x).all(dim)`` allocates one and is several times slower on CPU)."""
    return ~(torch.isfinite(x.amax(dim)) & torch.isfinite(x.amin(dim)))


def _range_any(flags: Tensor, lo: Tensor | None, hi: Tensor) -> Tensor:
    """``any(flags[..., lo[i] : hi[i] + 1])`` for each ``i`` (``lo`` None: from 0; empty where ``lo > hi``), from one
    cumulative count over the last dim."""
    n = flags.shape[-1]
    cum = flags.cumsum(-1, dtype=torch.int32)
    hi = hi.clamp(max=n - 1)
    if lo is None:  # from key 0 (causal only)
        return cum.index_select(-1, hi) > 0
    cum = torch.nn.functional.pad(cum, (1, 0))
    return (cum.index_select(-1, hi + 1) - cum.index_select(-1, lo.clamp(0, n))) > 0


def _position_ranges(mask: AttentionMask) -> tuple[Tensor | None, Tensor] | None:
    """Per query the ``[lo, hi]`` range of keys the causal / window mask keeps (as :meth:`AttentionMask.key_counts`;
    ``lo`` None: key 0); None without causal or window."""
    if not mask.is_causal and mask.window is None:
        return None
    i = torch.arange(mask.shape[2], device=mask.device)
    if mask.window is None:  # causal only
        return None, i
    return i - (mask.window - 1), (i if mask.is_causal else i + (mask.window - 1))


def _sees_bad_key(mask: AttentionMask, bad: Tensor, block: int) -> Tensor:
    """Whether each query sees (through a valid key) a key flagged in ``bad`` ``(B, H, Nk)``; ``(B, H, Nq or 1)``.

    Causal / window: a cumulative count over keys; a per-key mask (padding): folded into ``bad``; a dense mask:
    ``(valid & bad).any(-1)`` per block of queries (the chunked path's block), never more than the mask itself."""
    valid = mask.valid
    if valid is not None and valid.shape[2] == 1:  # per key (key padding, or a mask broadcast over queries)
        bad, valid = bad & valid[:, :, 0, :], None
    if valid is None:
        ranges = _position_ranges(mask)
        return bad.any(-1, keepdim=True) if ranges is None else _range_any(bad, *ranges)
    parts = []
    for start in range(0, mask.shape[2], block):
        valid_blk, _ = mask.block(start, min(start + block, mask.shape[2]))
        parts.append((valid_blk & bad.unsqueeze(-2)).any(-1))
    return torch.cat(parts, dim=-1)


class _NonFiniteKeys(torch.autograd.Function):
    r"""Identity on the fused entropies but NaN for the queries that see a non-finite key, with the chunked path's
    gradients: those queries' upstream gradient is cut from the flash backward (whose keys were zeroed), and NaN
    is added where the chunked path's ``dS·k`` and ``dSᵀ·q`` hold it: ``dq`` on those queries' rows and, for every
    query, on the head-dim columns where some key of its head is non-finite (``0·NaN``, ``0·Inf``); ``dk`` on every
    key of a key head one of whose queries sees one (the chunked ``dS`` row of such a query is NaN on masked keys
    too). Elsewhere the gradients are the fused path's own (a non-finite key no query sees gets 0, as on the
    chunked path)."""

    @staticmethod
    def forward(ctx, entropy: Tensor, q: Tensor, k: Tensor, sees_bad: Tensor, bad_columns: Tensor) -> Tensor:
        ctx.save_for_backward(sees_bad, bad_columns)  # (B, H, Nq) and (B, Hkv, D) booleans
        ctx.q_meta, ctx.k_meta = (q.shape, q.dtype), (k.shape, k.dtype)
        return entropy.masked_fill(sees_bad, float("nan"))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        sees_bad, bad_columns = ctx.saved_tensors
        (q_shape, q_dtype), (k_shape, k_dtype) = ctx.q_meta, ctx.k_meta
        groups = q_shape[1] // k_shape[1]
        nan = float("nan")
        dq = dk = None
        if ctx.needs_input_grad[1]:
            rows = torch.zeros(*q_shape[:3], 1, dtype=q_dtype, device=grad.device).masked_fill_(
                sees_bad.unsqueeze(-1), nan)
            cols = torch.zeros(*q_shape[:2], 1, q_shape[3], dtype=q_dtype, device=grad.device).masked_fill_(
                bad_columns.unsqueeze(-2).repeat_interleave(groups, dim=1), nan)
            dq = rows + cols  # (B, H, Nq, D): NaN on those rows and columns, 0 elsewhere
        if ctx.needs_input_grad[2]:  # (B, Hkv): a key head one of whose queries sees a non-finite key
            poisoned = sees_bad.unflatten(1, (k_shape[1], groups)).flatten(2).any(-1)
            dk = torch.zeros((), dtype=k_dtype, device=grad.device).masked_fill(poisoned[..., None, None], nan)
            dk = dk.expand(k_shape)
        return grad.masked_fill(sees_bad, 0.0), dq, dk, None, None


def _resolve_path(path: str, q: Tensor, mask: AttentionMask, mask_grad: bool) -> str:
    if path not in ("auto", "materialized", "chunked", "fused"):
        raise EntrotrainError(f"path must be 'auto', 'materialized', 'chunked' or 'fused', got {path!r}.")
    if path == "fused":
        if mask.has_bias:
            raise EntrotrainError(
                "path='fused' needs a 0/-inf mask: the value := key identity misses E_p[bias] for an additive bias. "
                "Use path='chunked'."
            )
        if mask_grad:
            raise EntrotrainError(
                "path='fused' gives attn_mask no gradient, and attn_mask requires grad; use path='chunked'."
            )
        if not _fused_available(q):
            raise EntrotrainError(
                f"path='fused' has no lse-returning kernel for device {q.device.type!r} in this torch build; "
                "use path='chunked' (same numbers, bounded memory)."
            )
        return path
    if path == "auto":
        if not mask.has_bias and not mask_grad and _fused_available(q) and q.dtype != torch.float64:
            return "fused"
        return "chunked"
    return path


def _use_kernel(impl: str, path: str, q: Tensor, k: Tensor, attn_mask: Tensor | None) -> bool:
    """Whether the Triton kernel computes this call (see ``impl`` in :func:`attention_entropy_stats`)."""
    from entrotrain.kernels.dispatch import resolve_impl

    if path in ("materialized", "chunked"):
        if impl == "triton":
            raise EntrotrainError(f"impl='triton' is the fused kernel; it cannot run path={path!r}. Use path='auto'.")
        return False
    if attn_mask is not None and attn_mask.requires_grad:  # the kernel gives an additive bias no gradient
        if impl == "triton":
            raise EntrotrainError("impl='triton' gives an additive attn_mask no gradient; use impl='torch'.")
        return False
    return resolve_impl(impl, q, k, attn_mask) == "triton"


def attention_entropy_stats(
    q: Tensor,
    k: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    path: AttentionPath = "auto",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    impl: str = "auto",
) -> AttentionEntropy:
    r"""Per-query attention entropy, normalised entropy and number of valid keys.

    Args:
        q: queries ``(batch, heads, queries, head_dim)``.
        k: keys ``(batch, kv_heads, keys, head_dim)``; ``heads`` must be a multiple of ``kv_heads`` (GQA/MQA).
        attn_mask: boolean (True = attend) or additive float mask broadcastable to ``(batch, heads, queries, keys)``,
            as :func:`torch.nn.functional.scaled_dot_product_attention` takes it. Integer masks are refused.
        key_padding_mask: ``(batch, keys)`` boolean, True marks padding (as :class:`torch.nn.MultiheadAttention`).
            Integer masks are refused (an HF ``attention_mask``, 1 = keep, is ``key_padding_mask=mask == 0``).
        is_causal: query ``i`` attends keys ``j <= i`` (top-left aligned, as SDPA).
        window: sliding window of this many keys, an int >= 1 (see
            :class:`~entrotrain.functional.attention_masks.AttentionMask`).
        scale: finite score scale; default ``1/sqrt(head_dim)`` as SDPA (1 for ``head_dim = 0``).
        path: ``"materialized"``, ``"chunked"``, ``"fused"`` or ``"auto"`` (fused when it applies: CPU, float32 /
            half, 0/−∞ masks, ``attn_mask`` not requiring grad — with or without a gradient; chunked otherwise).
            All agree to float32 round-off, gradients included. ``fused`` runs as ``chunked`` when
            ``head_dim = 0`` and, in eager mode, when ``k`` holds NaN/Inf (one reduction over ``k`` decides: a host
            sync). Under ``torch.compile`` it decides nothing on the host (no graph break): keys holding NaN/Inf
            enter its kernel as 0 and every query that sees one (through a valid key) gets NaN, as on ``chunked``,
            gradients too; except that ``chunked`` drops a ±Inf key from a query whose score on it is −Inf, where
            the traced ``fused`` gives NaN.
        chunk_elements: score elements per query block in the chunked path, an int >= 1.
        impl: ``"auto"`` (the Triton kernel of :mod:`entrotrain.kernels` on CUDA tensors when triton is installed,
            the torch paths otherwise), ``"torch"`` or ``"triton"`` (raises, with the fix, where it cannot run);
            ``ENTROTRAIN_IMPL`` overrides it. The kernel is the ``fused`` path on GPU: flash-style, differentiable,
            ``O(B·H·N)`` memory; it is used only with ``path="auto"`` or ``"fused"``.

    Returns:
        :class:`AttentionEntropy` of ``(batch, heads, queries)`` tensors, float32 (float64 for float64 input).
        Sizes of 0 are allowed: 0 batch, heads or queries give empty tensors; 0 keys give entropy 0 and
        ``n_keys = 0``; ``head_dim = 0`` gives uniform attention (:math:`\ln |V_i|`). A query with no valid key gets
        entropy 0. Non-finite ``q``/``k`` give NaN only for the queries that read them (through a valid key).

    Raises:
        EntrotrainError: ``q``/``k`` not floating 4-D or not matching (batch, head_dim, GQA groups), an integer or
            mis-shaped mask, ``window < 1``, a non-finite ``scale``, ``chunk_elements < 1``, an unknown ``path`` or
            ``impl``, or a ``path`` that cannot run the call.
    """
    _check_qk(q, k)
    scale = _check_options(scale, is_causal, path, chunk_elements)
    batch, heads, n_q, dim = q.shape
    n_k = k.shape[2]
    # head_dim 0: every score is 0 (uniform attention), whatever the scale
    scale = (1.0 / math.sqrt(dim) if dim else 1.0) if scale is None else scale
    mask = AttentionMask(
        (batch, heads, n_q, n_k),
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        window=window,
        device=q.device,
    )
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad)
    if _use_kernel(impl, path, q, k, attn_mask):
        from entrotrain.kernels.dispatch import call_kernel

        def kernel() -> AttentionEntropy:
            from entrotrain.kernels.attention_entropy import attention_entropy_stats as triton_stats

            return AttentionEntropy(
                *triton_stats(q, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                              window=window, scale=scale)
            )

        def fallback() -> AttentionEntropy:
            return attention_entropy_stats(
                q, k, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal, window=window,
                scale=scale, path=path, chunk_elements=chunk_elements, impl="torch",
            )

        return call_kernel("attention-entropy", impl, kernel, fallback)
    mask_grad = torch.is_grad_enabled() and attn_mask is not None and attn_mask.requires_grad
    resolved = _resolve_path(path, q, mask, mask_grad)
    if 0 in (batch, heads, n_q, n_k):
        # nothing to score, or no key to attend (SDPA returns zeros): the kernels and the block loop need sizes > 0
        entropy = torch.nan_to_num(q.to(accumulation_dtype(q.dtype)).sum(-1) * 0, nan=0.0)  # 0 even for a NaN query
        counts = torch.zeros(entropy.shape, dtype=torch.long, device=q.device)
        return AttentionEntropy(entropy, entropy.clone(), counts)
    block = max(1, chunk_elements // max(1, batch * heads * n_k))
    traced = _tracing()
    check_keys = resolved == "fused" and dim and not traced
    k_sum = float(k.detach().sum(dtype=accumulation_dtype(k.dtype))) if check_keys else 0.0
    if resolved == "fused" and (dim == 0 or not math.isfinite(k_sum)):
        # the flash kernel needs head_dim >= 1, and it multiplies a masked key's weight 0 by the key itself: a
        # NaN/Inf in a key that a query does not see would poison that query (0 * nan = nan). In eager mode one sum
        # decides (a host sync, a fraction of the cost of isfinite().all()) and the chunked path, which gives the
        # same numbers, takes non-finite keys; while dynamo traces (no sync, no graph break) the fused path zeroes
        # them and sets NaN on the queries that see one (_fused's guard_keys).
        resolved = "chunked"
    if resolved == "fused":
        entropy, counts = _fused(q, k, scale, mask, block, needs_grad, guard_keys=traced)
    else:
        block = n_q if resolved == "materialized" else block
        entropy, counts = _chunked(q, k, scale, mask, block, checkpoint=needs_grad and block < n_q)
    counts = counts.expand_as(entropy)
    return AttentionEntropy(entropy, normalized_entropy(entropy, counts), counts)


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
    path: AttentionPath = "auto",
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    impl: str = "auto",
) -> Tensor:
    r"""Per-query attention entropy ``(batch, heads, queries)`` in nats, or normalised by :math:`\ln|V_i|`.

    Arguments as :func:`attention_entropy_stats`; ``normalize=True`` returns :math:`\hat H_i = H_i/\ln|V_i|`
    (0 where ``|V_i| < 2``). Differentiable in ``q`` and ``k`` on every path (``fused``: first order only).

    Example:
        >>> q = k = torch.zeros(1, 1, 4, 8)
        >>> attention_entropy(q, k, is_causal=True)[0, 0]  # uniform over 1, 2, 3, 4 keys
        tensor([0.0000, 0.6931, 1.0986, 1.3863])
    """
    out = attention_entropy_stats(
        q,
        k,
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        window=window,
        scale=scale,
        path=path,
        chunk_elements=chunk_elements,
        impl=impl,
    )
    return out.normalized if normalize else out.entropy


def _mask_for(x: Tensor, name: str, attn_mask, key_padding_mask, is_causal, window) -> AttentionMask:
    check_tensor(x, name, floating=True, ndim=4, layout="(batch, heads, queries, keys)")
    check_bool(is_causal, "is_causal")
    return AttentionMask(
        tuple(x.shape),
        attn_mask=attn_mask,
        key_padding_mask=key_padding_mask,
        is_causal=is_causal,
        window=window,
        device=x.device,
    )


def attention_entropy_from_scores(
    scores: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    normalize: bool = False,
) -> Tensor:
    r"""Per-query entropy of ``softmax(scores)`` for pre-softmax scores ``(batch, heads, queries, keys)``.

    Masks as :func:`attention_entropy` (an additive mask is added to the scores). Exact and differentiable:
    :math:`H = \operatorname{lse}(s) - \sum_j p_j s_j`.
    """
    mask = _mask_for(scores, "scores", attn_mask, key_padding_mask, is_causal, window)
    valid, bias = mask.block(0, scores.shape[2])
    out = row_entropy(scores if bias is None else scores + bias.to(scores.dtype), valid)
    if not normalize:
        return out.entropy
    return normalized_entropy(out.entropy, out.count.expand_as(out.entropy))


def attention_entropy_from_probs(
    probs: Tensor,
    *,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    normalize: bool = False,
) -> Tensor:
    r"""Per-query :math:`-\sum_j p_{ij}\ln p_{ij}` of attention weights ``(batch, heads, queries, keys)``.

    For backends that only hand over weights. Give *pre-dropout* weights: a dropped-and-rescaled row is not a
    distribution. The masks only set :math:`|V_i|` for normalisation (masked weights are already 0); without a mask
    every key counts.
    """
    mask = _mask_for(probs, "probs", attn_mask, key_padding_mask, is_causal, window)
    entropy = entropy_from_probs(probs)
    if not normalize:
        return entropy
    counts = mask.key_counts(max(1, (1 << 24) // max(1, probs.shape[-1])))
    return normalized_entropy(entropy, counts.expand_as(entropy))
