r"""The differentiable ``fused`` attention-entropy path: forward and backward from the CPU flash-attention kernel.

Forward (Zhai et al. 2023, "Stabilizing Transformer Training by Preventing Attention Entropy Collapse", track
:math:`H_i` per head). With scores :math:`s_{ij} = \text{scale}\cdot q_i\cdot k_j + m_{ij}`, :math:`m_{ij} \in
\{0, -\infty\}` (causal, padding, window, boolean masks), :math:`p_i = \mathrm{softmax}(s_i)` and
:math:`\bar o_i = \sum_j p_{ij} k_j` (attention whose values are the keys):

.. math::

    H_i = \operatorname{lse}_i - \sum_j p_{ij} s_{ij} = \operatorname{lse}_i - \text{scale}\cdot q_i\cdot\bar o_i

(a masked key has :math:`p_{ij} = 0` and contributes nothing), so one call of
``aten._scaled_dot_product_flash_attention_for_cpu(q, k, v=k)``, which returns ``(ō, lse)``, gives :math:`H`.

Backward. :math:`H_i` depends on ``q`` and ``k`` only through the scores :math:`s_i`. For a loss :math:`L` with
:math:`g_i = \partial L/\partial H_i`,

.. math::

    \frac{\partial H_i}{\partial s_{ij}} = p_{ij} - \frac{\partial}{\partial s_{ij}}\sum_l p_{il}s_{il}
        = p_{ij} - \bigl(p_{ij} + p_{ij}s_{ij} - p_{ij}E_{p}[s]_i\bigr) = -p_{ij}\,(s_{ij} - E_p[s]_i),

    dS_{ij} = -g_i\,p_{ij}\,(s_{ij} - E_p[s]_i), \qquad
    \frac{\partial L}{\partial q_i} = \text{scale}\sum_j dS_{ij}k_j, \qquad
    \frac{\partial L}{\partial k_j} = \text{scale}\sum_i dS_{ij}q_i .

The standard attention backward for :math:`O = PV` and an upstream :math:`dO` computes exactly
:math:`dS_{ij} = p_{ij}(dO_i\cdot v_j - dO_i\cdot o_i)`, then :math:`dQ = \text{scale}\,dS\,K` and
:math:`dK = \text{scale}\,dS^\top Q` (and :math:`dV = P^\top dO`). Choose :math:`v := k` (so :math:`o = \bar o`,
the forward's own output and lse are reused) and :math:`dO_i = -g_i\,\text{scale}\,q_i`:

.. math::

    dO_i\cdot v_j = -g_i\,\text{scale}\,q_i\cdot k_j = -g_i\,(s_{ij} - m_{ij}), \qquad
    dO_i\cdot o_i = -g_i\,\text{scale}\,q_i\cdot\bar o_i = -g_i\,E_p[s]_i ,

which (with :math:`p_{ij} = 0` wherever :math:`m_{ij} = -\infty`) is the :math:`dS` above. So **one** call of
``aten._scaled_dot_product_flash_attention_for_cpu_backward`` gives the exact ``dq`` and ``dk``; its ``dv`` output is
the gradient of a *different* function (one where the values are independent of the keys) and is discarded — the
gradients reach ``k`` only through the scores, which ``dk`` already holds in full. Memory ``O(B·H·N·D)``: no
``N×N`` matrix (beyond a dense 0/−∞ mask for window / boolean masks, shared over batch and heads), no Python loop
over query blocks.

Choices this implementation states:

- Masks: 0/−∞ only (boolean, padding, causal, window; a plain causal mask goes to the kernel's ``is_causal``, the
  rest as one dense additive mask). An additive finite bias would need :math:`E_p[b]` (forward) and a
  bias-dependent ``dS``; soft-capping is not a linear score: both stay on the ``chunked`` path.
- GQA / MQA: from torch 2.9 the kernel takes ``k`` with fewer heads and returns ``dk`` summed over each key head's
  query group. Before 2.9 it reads ``H`` key heads whatever ``k`` holds (torch 2.3.1 and 2.8.0: wrong entropies,
  NaN, and an abort or heap corruption in the backward), so there ``k`` goes to the kernel repeated over each
  group (``repeat_interleave``, ``H/H_kv`` × ``k``'s memory) and the flash route's ``dk`` is summed back.
- Precision: half-precision inputs are computed in float32 (the caller casts; autograd casts the gradients back);
  float64 runs in float64 (so ``torch.autograd.gradcheck`` applies).
- A query with no valid key: the kernel gives ``lse = 0`` and ``ō = 0`` there (entropy 0; before torch 2.5 it gives
  NaN, set to those zeros here); the caller zeroes those rows with ``torch.where`` so their upstream gradient is 0.
- First-order only (``once_differentiable``): a double backward raises.
- Backward route: when the score matrix is small (``B·H·Nq·Nk <= MATERIALIZED_BACKWARD_ELEMENTS``, 4 Mi elements,
  16 MiB in float32) the backward is materialised instead (see below): 3 matmuls and no ``dv`` where the flash
  backward does 5, and none of the flash kernel's per-block overhead, which dominates at the short sequences of
  small models (TinyGPT N = 64: ≈ 3× faster than the flash backward). Larger calls keep the flash backward's
  ``O(B·H·N·D)`` memory. Both give the same gradient to float32 round-off (tested).

Materialised backward. With :math:`\ell_{ij} = s_{ij} - \operatorname{lse}_i = \log p_{ij}` and
:math:`E_p[s]_i = \operatorname{lse}_i - H_i`,

.. math::

    dS_{ij} = -g_i\,p_{ij}\,(s_{ij} - E_p[s]_i) = -g_i\,p_{ij}\,(\ell_{ij} + H_i),

computed from one recomputed score matrix: ``ℓ`` from the *unmasked* scores (finite for finite inputs), ``p = exp(ℓ)``
then set to 0 on the blocked keys (causal, −∞ entries of the mask), so a blocked key adds ``0·(finite) = 0`` (no
``0·∞``, and no ``exp(−∞)``, which is slow on CPU). GQA runs in a ``(B, H_kv, G, N, ·)`` view, ``dk`` summed over ``G``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["MATERIALIZED_BACKWARD_ELEMENTS", "fused_attention_entropy", "fused_grad_available"]

#: score elements ``B·H·Nq·Nk`` up to which the backward is materialised (see the module docstring)
MATERIALIZED_BACKWARD_ELEMENTS = 1 << 22


def _release(version: str) -> tuple[int, int]:
    """``(major, minor)`` of a torch version string (``"2.15.0+cpu"`` -> ``(2, 15)``); ``(0, 0)`` if unreadable."""
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


#: the CPU flash kernel reads ``k`` with fewer heads than ``q`` (torch >= 2.9, pytorch#157893); older ones read ``H``
#: key heads past the end of a ``(B, H_kv, N, D)`` key
_KERNEL_GQA = _release(torch.__version__) >= (2, 9)
#: the kernel returns ``ō = 0``, ``lse = 0`` for a query with no valid key (torch 2.5.1 does; 2.3.1 returns NaN)
_KERNEL_EMPTY_ROWS_ZERO = _release(torch.__version__) >= (2, 5)


def _kernel_keys(q: Tensor, k: Tensor) -> Tensor:
    """``k`` as the kernel can read it: itself, or repeated over each key head's query group on torch < 2.9."""
    if _KERNEL_GQA or k.shape[1] == q.shape[1]:
        return k
    return k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


def fused_grad_available(q: Tensor) -> bool:
    """Whether this torch build has the CPU flash kernel's forward and backward for ``q``'s device."""
    return q.device.type == "cpu" and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    ) and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


class _FusedAttentionEntropy(torch.autograd.Function):
    """``H = lse − scale·q·ō`` forward; backward materialised (small score matrices) or the attention backward with
    ``v := k``, ``dO = −g·scale·q``."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, scale: float, is_causal: bool, additive: Tensor | None) -> Tensor:
        kk = _kernel_keys(q, k)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, kk, kk, 0.0, is_causal, attn_mask=additive, scale=scale
        )
        if additive is not None and not _KERNEL_EMPTY_ROWS_ZERO:  # NaN there: the 0 and 0 of newer kernels
            blocked = torch.isneginf(additive)
            if is_causal:
                blocked = blocked | torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu_(1)
            no_key = blocked.all(-1)
            out, lse = out.masked_fill(no_key.unsqueeze(-1), 0.0), lse.masked_fill(no_key, 0.0)
        lse = lse.to(q.dtype)
        entropy = lse - scale * torch.linalg.vecdot(q, out.to(q.dtype))
        ctx.additive = additive  # a constant 0/-inf mask: no gradient flows to it
        ctx.scale, ctx.is_causal = scale, is_causal
        ctx.materialize = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= MATERIALIZED_BACKWARD_ELEMENTS
        if ctx.materialize:
            ctx.save_for_backward(q, k, lse, entropy)
        else:
            ctx.save_for_backward(q, k, out, lse)
        return entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        if ctx.materialize:
            q, k, lse, entropy = ctx.saved_tensors
            dq, dk = _materialized_backward(grad.to(q.dtype), q, k, lse, entropy, ctx.scale, ctx.is_causal,
                                            ctx.additive)
            return dq, dk, None, None, None
        q, k, out, lse = ctx.saved_tensors
        grad_out = (grad.to(q.dtype).unsqueeze(-1) * q * (-ctx.scale)).contiguous()
        kk = _kernel_keys(q, k)
        dq, dk, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, kk, kk, out, lse, 0.0, ctx.is_causal, attn_mask=ctx.additive, scale=ctx.scale
        )
        if kk is not k:  # the repeated keys' gradient, summed over each key head's query group
            dk = dk.unflatten(1, (k.shape[1], q.shape[1] // k.shape[1])).sum(2)
        return dq, dk, None, None, None


def _materialized_backward(
    grad: Tensor, q: Tensor, k: Tensor, lse: Tensor, entropy: Tensor, scale: float, is_causal: bool,
    additive: Tensor | None,
) -> tuple[Tensor, Tensor]:
    r""":math:`dS = -g\,p\,(\ell + H)` on one recomputed ``(B, H_kv, G, Nq, Nk)`` score tensor; ``dq = scale·dS·k``,
    ``dk = scale·Σ_G dS^T q``."""
    batch, heads, n_q, dim = q.shape
    kv_heads, n_k = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q5 = q.contiguous().unflatten(1, (kv_heads, groups))  # (B, Hkv, G, Nq, D): one copy of a strided q
    k5 = k.contiguous().unsqueeze(2)  # (B, Hkv, 1, Nk, D)
    # ℓ = scale·q·k − lse on the *unmasked* scores (finite), then p = exp(ℓ) with the blocked keys set to 0: exp of
    # a −∞ or a far-out-of-range argument takes a slow path (2–6× the time), and p·(ℓ + H) stays 0·finite = 0
    logp = torch.matmul(q5, k5.transpose(-1, -2)).mul_(scale)
    logp = logp.sub_(lse.unflatten(1, (kv_heads, groups)).unsqueeze(-1))
    p = torch.exp(logp)
    blocked = None
    if additive is not None:
        blocked = torch.isneginf(additive).expand(batch, heads, n_q, n_k).unflatten(1, (kv_heads, groups))
    if is_causal:
        causal = torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).triu_(1)
        blocked = causal if blocked is None else blocked | causal
    if blocked is not None:
        p = p.masked_fill_(blocked, 0.0)
    coef = (grad * (-scale)).unflatten(1, (kv_heads, groups)).unsqueeze(-1)  # −scale·g, (B, Hkv, G, Nq, 1)
    ds = logp.add_(entropy.unflatten(1, (kv_heads, groups)).unsqueeze(-1)).mul_(p).mul_(coef)  # scale·dS
    dq = torch.matmul(ds, k5).flatten(1, 2)
    dk = torch.matmul(ds.transpose(-1, -2), q5)
    dk = dk.sum(2) if groups > 1 else dk.squeeze(2)
    return dq, dk


def fused_attention_entropy(
    q: Tensor, k: Tensor, scale: float, *, is_causal: bool = False, additive: Tensor | None = None
) -> Tensor:
    r"""Per-query :math:`H_i = \operatorname{lse}_i - \text{scale}\cdot q_i\cdot\bar o_i`, differentiable in q and k.

    Args:
        q: ``(B, H, Nq, D)`` float32 or float64 (cast half precision to float32 first), CPU, ``D >= 1``, sizes > 0.
        k: ``(B, H_kv, Nk, D)``, same dtype; ``H`` a multiple of ``H_kv``.
        scale: the score scale.
        is_causal: the kernel's top-left causal mask.
        additive: ``None`` or a 0/−∞ float mask broadcastable to ``(B, H, Nq, Nk)`` in ``q``'s dtype, no gradient.

    Returns:
        ``(B, H, Nq)`` entropies (not clamped; rows with no valid key hold ``lse − 0 = 0``). See the module
        docstring for the derivation of the backward (one flash backward with ``v := k``, ``dO = −g·scale·q``).
        Validation is the caller's (:func:`entrotrain.functional.attention.attention_entropy_stats`).
    """
    return _FusedAttentionEntropy.apply(q, k, scale, is_causal, additive)
