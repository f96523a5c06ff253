r"""Attention and its per-query entropy in one pass, with one backward: what attention regularisers train through.

A regulariser on attention entropy (AEM, the entropy band, the entropy floor; Zhai et al. 2023, "Stabilizing
Transformer Training by Preventing Attention Entropy Collapse") needs, for every attention call, the model's output
:math:`O = PV` *and* the entropy :math:`H_i = -\sum_j p_{ij}\ell_{ij}` of :math:`p_i = \mathrm{softmax}(s_i)`,
:math:`\ell_{ij} = \log p_{ij}`, :math:`s_{ij} = \text{scale}\cdot q_i\cdot k_j + m_{ij}`
(:math:`m_{ij}`: causal and boolean masks, 0/−∞; or any additive mask, ALiBi and relative biases included),
both differentiable. Computed apart, the entropy pays for its own scores, softmax and backward matmuls. Computed
together, it shares them:

Forward (one score matrix): :math:`S`, :math:`P = \mathrm{softmax}(S)`, :math:`\ell = \mathrm{log\_softmax}(S)`,
:math:`O = PV`, :math:`H_i = -\sum_j p_{ij}\ell_{ij}` (blocked keys: :math:`p = 0` and :math:`p\,\ell = 0`; no
``lse − q·ō`` cancellation).

Backward. For upstream :math:`dO` and :math:`g_i = \partial L/\partial H_i`, the score gradient is the sum of the
attention's and the entropy's (see :mod:`entrotrain.functional.attention_fused_grad` for
:math:`\partial H_i/\partial s_{ij} = -p_{ij}(\ell_{ij} + H_i)`):

.. math::

    dV = P^\top dO,\qquad D_i = dO_i\cdot O_i,\qquad
    dS_{ij} = p_{ij}\bigl(dO_i\cdot v_j - D_i - g_i(\ell_{ij} + H_i)\bigr),\qquad
    dQ = \text{scale}\,dS\,K,\qquad dK = \text{scale}\,dS^\top Q,

so the entropy adds one elementwise term to the attention backward and **no matmul**: 2 matmuls forward and 4
backward, where attention plus a separate entropy take 2 + 4 (flash) and 2 + 3 more. Memory: ``P`` and ``ℓ`` are kept
for the backward (as ``P`` and ``P∘ℓ``: ``2·B·H·Nq·Nk`` elements), which is why callers use it for small score
matrices only (:data:`JOINT_MAX_ELEMENTS`); longer sequences keep the flash kernels (SDPA, and the ``fused`` entropy
path).

Choices this implementation states:

- The output equals ``F.scaled_dot_product_attention`` to float round-off (≤ 1e-6 relative in float32, tested), not
  bit for bit: it is a materialised attention, not SDPA's kernel. Its strides are those of SDPA's output (``q``'s
  dimension order where SDPA runs its CPU flash kernel, contiguous where it runs the math path), so a
  ``y.transpose(1, 2).view(B, N, C)`` that works on SDPA's output works on it.
- Masks: ``is_causal`` (top-left, as SDPA), boolean ``attn_mask`` (True = attend) and additive float ``attn_mask`` in
  ``q``'s dtype (added to the scores, as SDPA; −∞ entries block a key, and ``n_keys`` counts the others; a mask
  holding the float's minimum, older HF's "blocked", is refused: SDPA and the entropy paths read it differently).
  The
  materialised scores make any additive bias exact here, where the ``fused`` path needs 0/−∞. A query with no valid key
  gets output 0 and entropy 0 (as SDPA's CPU kernels) and no gradient.
- GQA / MQA: ``k``, ``v`` may have fewer heads (``H`` a multiple of ``H_kv``); query head ``h`` reads key head
  ``h // (H / H_kv)``; ``dk``, ``dv`` are summed over each key head's query group.
- No dropout, no gradient to the mask (a learned bias, e.g. T5's relative attention, keeps the separate path);
  float32 and float64. Callers route anything else to SDPA and the separate entropy paths.
- Non-finite inputs: a NaN/Inf in ``q`` or ``k`` gives NaN entropy only for the queries that read it through a valid
  key (as :func:`~entrotrain.functional.attention.attention_entropy_stats`); a NaN/Inf in ``v`` reaches every query
  of its head (``0·NaN``), where SDPA's kernels skip the key blocks a causal mask hides. The tap therefore leaves
  calls with non-finite ``k`` or ``v`` to SDPA.
- First-order only (``once_differentiable``).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from entrotrain.errors import EntrotrainError
from entrotrain.functional.attention import AttentionEntropy, normalized_entropy

__all__ = ["JOINT_MAX_ELEMENTS", "attention_with_entropy", "joint_attention", "joint_attention_applies"]

#: Score elements ``B·H·Nq·Nk`` up to which :func:`joint_attention_applies` says yes: ``P`` and ``P∘ℓ`` kept for the
#: backward are then at most 2 × 16 MiB in float32 per call. Measured (``benchmarks/attention_regularizers.py``,
#: 1 thread): the joint attention costs 1.1–1.8× SDPA fwd+bwd up to 4 Mi scores, against 1.9–2.3× for SDPA + the
#: separate entropy; at 8 Mi (B1 H8 N1024) the score buffers leave the caches and it costs 2.2–2.6×.
JOINT_MAX_ELEMENTS = 1 << 22


def joint_attention_applies(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    dropout_p: float,
    enable_gqa: bool,
    max_elements: int | None = JOINT_MAX_ELEMENTS,
) -> bool:
    """Whether :func:`attention_with_entropy` can stand in for this ``scaled_dot_product_attention`` call, and pays.

    Dense CPU float32/float64 4-D tensors of one dtype, no dropout, no mask, a boolean one or a constant additive one
    in q's dtype, heads that SDPA would accept, sizes > 0, no CPU autocast, and ``B·H·Nq·Nk <= max_elements``
    (``None``: any size)."""
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor)):
        return False
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64):
        return False
    if k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device:
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.is_nested or q.layout != torch.strided:
        return False
    if dropout_p or _cpu_autocast():
        return False
    if attn_mask is not None and (
        attn_mask.dtype not in (torch.bool, q.dtype) or attn_mask.device != q.device or attn_mask.requires_grad
    ):
        return False  # an additive mask must be q's dtype (as SDPA wants it) and constant (no bias gradient here)
    if attn_mask is not None and attn_mask.dtype != torch.bool and bool((attn_mask == torch.finfo(q.dtype).min).any()):
        # a float's minimum as "blocked" (older HF masks): the entropy paths count such a key as blocked, SDPA gives a
        # row of them a uniform average; left to SDPA and the separate entropy, which keep both conventions
        return False
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    if k.shape[0] != batch or v.shape[0] != batch or k.shape[-1] != dim or v.shape[1] != kv_heads:
        return False
    if v.shape[2] != n_k or kv_heads == 0 or heads % kv_heads or (kv_heads != heads and not enable_gqa):
        return False
    if 0 in (batch, heads, n_q, n_k, dim, v.shape[-1]):
        return False
    if attn_mask is not None:
        if attn_mask.dim() < 2:  # SDPA reads a mask's last two dims (a 1-D or 0-d mask is an IndexError there)
            return False
        try:  # the mask must broadcast *to* the scores (SDPA refuses a mask of 2 batches for 1), not only with them
            if tuple(torch.broadcast_shapes(attn_mask.shape, (batch, heads, n_q, n_k))) != (batch, heads, n_q, n_k):
                return False
        except RuntimeError:
            return False
    return max_elements is None or batch * heads * n_q * n_k <= max_elements


def _cpu_autocast() -> bool:
    try:
        return torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled()


def _blocked(attn_mask: Tensor | None, is_causal: bool, n_q: int, n_k: int, device: torch.device) -> Tensor | None:
    """The blocked (query, key) pairs, bool, broadcastable to ``(B, H, Nq, Nk)`` (2-D when the mask is), or ``None``:
    ``False`` entries of a boolean mask, ``−∞`` entries of an additive one, and the causal mask's."""
    if attn_mask is None:
        blocked = None
    else:
        blocked = ~attn_mask if attn_mask.dtype == torch.bool else torch.isneginf(attn_mask)
    if is_causal:
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=device).triu_(1)  # top-left, as SDPA
        blocked = causal if blocked is None else blocked | causal
    return blocked


def _grouped(x: Tensor, batch: int, kv_heads: int, groups: int, n_q: int) -> Tensor:
    """``(b, h, Nq, ·)`` with ``b ∈ {1, B}``, ``h ∈ {1, H}`` → ``(B·H_kv, G·Nq, ·)``: query head ``h = j·G + g`` of key
    head ``j`` at rows ``g·Nq …``; a 2-D ``x`` (shared by every head) stays 2-D, repeated ``G`` times. One row for
    every query (a padding mask ``(B, 1, 1, Nk)``) is expanded to the ``Nq`` rows first when ``G > 1``: the ``G``
    query heads of a key head sit one after the other, so a single row no longer broadcasts over them."""
    if groups > 1 and x.shape[-2] == 1 and n_q > 1:
        x = x.expand(*x.shape[:-2], n_q, x.shape[-1])
    if x.dim() == 2:
        return x.repeat(groups, 1) if groups > 1 else x
    x = x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))
    x = x.expand(batch, kv_heads * groups, *x.shape[2:])
    return x.reshape(batch * kv_heads, groups * x.shape[2], x.shape[3])


def _masks(blocked: Tensor, batch: int, kv_heads: int, groups: int, n_q: int, dtype: torch.dtype,
           additive: Tensor | None = None):
    """From the blocked pairs: the score bias in the grouped layout (0/−∞, or ``additive`` with −∞ on the blocked
    pairs), the valid-key counts ``(…, Nq)``, and the queries with no valid key (grouped layout ``(·, G·Nq)``;
    ``None`` when every query has one)."""
    counts = (~blocked).sum(-1)
    if additive is None:
        bias = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device).masked_fill_(blocked, float("-inf"))
    else:
        bias = torch.where(blocked, float("-inf"), additive.to(dtype))
    bias = _grouped(bias, batch, kv_heads, groups, n_q)
    empty = counts == 0
    no_key = _grouped(empty.unsqueeze(-1), batch, kv_heads, groups, n_q).squeeze(-1) if bool(empty.any()) else None
    return bias, counts, no_key


@functools.lru_cache(maxsize=32)
def _plain_mask(is_causal: bool, n_q: int, n_k: int, groups: int, dtype: torch.dtype, device: torch.device):
    """``(bias, counts)`` for no mask or a causal one (cached: small, read-only, shared by every call of a shape)."""
    if not is_causal:
        return None, torch.full((1, 1, 1), n_k, dtype=torch.long, device=device)
    bias, counts, _ = _masks(_blocked(None, True, n_q, n_k, device), 1, 1, groups, n_q, dtype)
    return bias, counts


class _JointAttention(torch.autograd.Function):
    """``(O, H)`` of one materialised attention in the ``(B·H_kv, G·Nq, ·)`` layout; backward
    ``dS = P∘(dP − D) − g·P∘(ℓ + H)`` (module docstring)."""

    @staticmethod
    def forward(ctx, q3: Tensor, k3: Tensor, v3: Tensor, bias: Tensor | None, no_key: Tensor | None, scale: float,
                finite_keys: bool):
        if bias is None:
            scores = torch.bmm(q3, k3.transpose(1, 2)).mul_(scale)
        else:  # the 0/−∞ mask added inside the matmul (a masked_fill with a broadcast mask is a slow pass)
            scores = torch.baddbmm(bias, q3, k3.transpose(1, 2), alpha=scale)
            if not finite_keys:  # NaN + (−∞) is NaN: a blocked NaN/Inf key must not reach the query's row
                scores = scores.masked_fill_(torch.isneginf(bias), float("-inf"))
        p = torch.softmax(scores, -1)
        # ℓ = −∞ on blocked keys → the most negative float: p·ℓ = 0·finite = 0 (never 0·∞); NaN stays NaN
        plogp = torch.log_softmax(scores, -1).clamp_min_(torch.finfo(scores.dtype).min).mul_(p)  # p·ℓ
        del scores
        if no_key is not None:  # a query with no valid key: (log-)softmax of all −∞ is NaN; SDPA gives output 0
            p = torch.where(no_key.unsqueeze(-1), 0.0, p)
            plogp = torch.where(no_key.unsqueeze(-1), 0.0, plogp)
        out = torch.bmm(p, v3)
        entropy = plogp.sum(-1).neg_()
        ctx.scale = scale
        ctx.save_for_backward(q3, k3, v3, p, plogp, out, entropy)
        ctx.set_materialize_grads(False)
        return out, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor | None, grad_entropy: Tensor | None):
        q3, k3, v3, p, plogp, out, entropy = ctx.saved_tensors
        scale = ctx.scale
        dv = ds = None
        if grad_out is not None:
            grad_out = grad_out.contiguous()
            dv = torch.bmm(p.transpose(1, 2), grad_out)
            # scale·(dP − D), D_i = dO_i·O_i, in the matmul
            d = torch.linalg.vecdot(grad_out, out).mul_(-scale).unsqueeze(-1)
            ds = torch.baddbmm(d, grad_out, v3.transpose(1, 2), alpha=scale).mul_(p)
        if grad_entropy is not None:
            term = torch.addcmul(plogp, p, entropy.unsqueeze(-1))  # P∘(ℓ + H); a blocked key: 0 before g
            g = grad_entropy.unsqueeze(-1)
            ds = term.mul_(g * -scale) if ds is None else ds.addcmul_(term, g, value=-scale)
        if ds is None:
            return None, None, None, None, None, None, None
        dq = torch.bmm(ds, k3)
        dk = torch.bmm(ds.transpose(1, 2), q3)
        if dv is None:
            dv = torch.zeros_like(v3)
        return dq, dk, dv, None, None, None, None


def _like_sdpa_layout(out: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool,
                      scale: float, enable_gqa: bool) -> Tensor:
    """``out`` laid out in memory as SDPA lays out its own: in ``q``'s dimension order where SDPA would run its flash
    kernel, contiguous where it would run the math path (e.g. ``Dv != D``)."""
    try:
        flash = torch._fused_sdp_choice(q, k, v, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa) == 1
    except (AttributeError, RuntimeError, TypeError):  # a torch without the query: follow q (the flash kernel's rule)
        flash = True
    order = sorted(range(4), key=lambda d: -q.stride(d)) if flash else [0, 1, 2, 3]  # stable: ties keep the order
    if order == [0, 1, 2, 3]:
        return out if out.is_contiguous() else out.contiguous()
    return out.permute(order).contiguous().permute([order.index(d) for d in range(4)])


def attention_with_entropy(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[Tensor, AttentionEntropy]:
    r"""``scaled_dot_product_attention(q, k, v, ...)`` and the per-query attention entropy, differentiable together.

    Arguments as :func:`torch.nn.functional.scaled_dot_product_attention` (no dropout; ``attn_mask`` boolean, True =
    attend, or additive in ``q``'s dtype, not requiring grad). ``q`` ``(B, H, Nq, D)``, ``k`` ``(B, H_kv, Nk, D)``,
    ``v`` ``(B, H_kv, Nk, Dv)`` float32/float64 on CPU, sizes > 0; ``enable_gqa`` lets ``H_kv`` divide ``H``. For
    custom attention code that wants a regulariser's entropy at the price of the attention (an
    :class:`~entrotrain.taps.AttentionTap` with ``differentiable=True`` uses it for SDPA calls by itself).

    Returns:
        ``(output, AttentionEntropy)``: the attention output ``(B, H, Nq, Dv)`` (equal to SDPA's to round-off, strides
        in ``q``'s order) and the entropy, normalised entropy and valid-key count ``(B, H, Nq)`` of
        :func:`~entrotrain.functional.attention.attention_entropy_stats`. Memory ``O(B·H·Nq·Nk)``: the module
        docstring derives the shared backward and says when to use it.

    Raises:
        EntrotrainError: a call :func:`joint_attention_applies` refuses (apart from the size limit), or a
            non-finite ``scale``.
    """
    if not joint_attention_applies(q, k, v, attn_mask, 0.0, enable_gqa, max_elements=None):
        raise EntrotrainError(
            "attention_with_entropy needs dense CPU float32/float64 q (B, H, Nq, D), k (B, H_kv, Nk, D), v (B, H_kv, "
            "Nk, Dv) of one dtype with sizes > 0 (H_kv < H only with enable_gqa=True), no attn_mask, a boolean one or "
            "a constant additive one in q's dtype (−∞ to block, not the float's minimum), and no CPU autocast; got "
            f"q {_describe(q)}, k {_describe(k)}, v {_describe(v)}, attn_mask {_describe(attn_mask)}. "
            "For other calls use F.scaled_dot_product_attention and entrotrain.functional.attention_entropy_stats."
        )
    if scale is not None and not math.isfinite(float(scale)):
        raise EntrotrainError(f"scale must be finite, got {scale!r}.")
    # one reduction decides whether a blocked NaN/Inf key needs the masking pass (a finite k that overflows: slower)
    finite_keys = attn_mask is None and not is_causal or math.isfinite(float(k.detach().sum()))
    return joint_attention(q, k, v, attn_mask, bool(is_causal), scale, enable_gqa, finite_keys)


def joint_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    finite_keys: bool,
) -> tuple[Tensor, AttentionEntropy]:
    """:func:`attention_with_entropy` for a caller that has checked the call (:func:`joint_attention_applies`) and
    knows whether ``k`` is finite (``finite_keys``): the SDPA interceptor, which runs both checks itself."""
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    if attn_mask is None:  # no mask or a causal one: the same small tensors at every call
        bias, counts = _plain_mask(is_causal, n_q, n_k, groups, q.dtype, q.device)
        counts, no_key = counts.clone(), None  # the cache's own tensor never reaches the caller
    else:
        additive = None if attn_mask.dtype == torch.bool else attn_mask.detach()
        bias, counts, no_key = _masks(_blocked(attn_mask, is_causal, n_q, n_k, q.device), batch, kv_heads, groups,
                                      n_q, q.dtype, additive)
    q3 = q.reshape(batch * kv_heads, groups * n_q, dim)  # (B·H_kv, G·Nq, D): one bmm per key head
    k3 = k.reshape(batch * kv_heads, n_k, dim)
    v3 = v.reshape(batch * kv_heads, n_k, v.shape[-1])
    out, entropy = _JointAttention.apply(q3, k3, v3, bias, no_key, scale, finite_keys)
    entropy = entropy.view(batch, heads, n_q)
    counts = counts.reshape((1,) * (3 - counts.dim()) + tuple(counts.shape)).expand(batch, heads, n_q)
    out = _like_sdpa_layout(out.view(batch, heads, n_q, v.shape[-1]), q, k, v, attn_mask, is_causal, scale, enable_gqa)
    return out, AttentionEntropy(entropy, normalized_entropy(entropy, counts), counts)


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"{tuple(x.shape)} {x.dtype} on {x.device.type}"
    return repr(x)
