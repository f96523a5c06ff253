"""Adapter for :class:`torch.nn.MultiheadAttention` (and so :class:`torch.nn.TransformerEncoderLayer` /
``DecoderLayer``, whose ``self_attn`` is one).

The module is never asked for weights (``need_weights=True`` would leave the fused path and return post-dropout,
head-averaged weights). A forward pre-hook reads the call's inputs and recomputes ``q`` and ``k`` from the
module's own projections, so the module's computation is untouched and the entropy is the exact pre-dropout one.

Padded queries: in a self-attention call (``query is key``, as ``nn.TransformerEncoderLayer`` makes it) the queries
are the keys, so the ``key_padding_mask`` also marks the padded queries, which are then not scored
(:mod:`entrotrain.taps.query_padding`). In cross-attention the queries are other tokens: inside an
``nn.TransformerDecoderLayer`` they are the decoder tokens, whose ``tgt_key_padding_mask`` the layer's call carries
(:func:`watch_decoder_padding`); elsewhere no query mask is derived.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from entrotrain._validation import padding_mask
from entrotrain.errors import TapError
from entrotrain.taps.deferred import compiling
from entrotrain.taps.module_names import is_compiled
from entrotrain.taps.query_padding import clear_model_masks, pop_model_mask, push_model_mask

if TYPE_CHECKING:
    from entrotrain.taps.attention_tap import AttentionTap

__all__ = ["mha_query_key", "watch_decoder_padding"]

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def _padding_from(mask: Tensor) -> Tensor:
    """MHA's key padding mask, bool (True = ignore) or float (additive), as a bool 'is padding' mask.

    Integer masks are refused with the fix (:func:`~entrotrain._validation.padding_mask`), as MHA itself refuses
    them: HF's 1 = keep would otherwise mark every real key as padding."""
    if mask.is_floating_point():
        return mask <= torch.finfo(mask.dtype).min
    return padding_mask(mask, "key_padding_mask")


def _has_finite_bias(mask: Tensor) -> bool:
    if torch.compiler.is_compiling():
        return True  # traced: no data-dependent branch; folding the mask into attn_mask is right either way
    return bool(((mask != 0) & (mask > torch.finfo(mask.dtype).min)).any())


def mha_query_key(module: nn.MultiheadAttention, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Recompute what an ``nn.MultiheadAttention`` call scores: ``q``, ``k`` and the masks, SDPA conventions.

    Returns keyword arguments for :meth:`entrotrain.taps.AttentionTap.record`: ``q`` ``(B, H, L, hd)``,
    ``k`` ``(B, H, S, hd)``, ``attn_mask`` (bool True = attend, or additive), ``key_padding_mask`` (True = pad),
    ``is_causal``, ``scale`` and ``query_mask`` ``(B, L)`` (True = real query: the keys that are not padding, for a
    self-attention call with a key padding mask; else ``None``).
    """
    if module.bias_k is not None or module.add_zero_attn:
        raise TapError(
            "nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True is not supported by the attention "
            "tap; call entrotrain.taps.record_attention(q, k, ...) from your own attention code instead."
        )
    call = dict(zip(_MHA_ARGS, args))
    call.update(kwargs)
    query, key = call["query"], call["key"]
    self_attention = query is key
    unbatched = query.dim() == 2
    if unbatched:
        query, key = query.unsqueeze(1), key.unsqueeze(1)  # (L, E) -> (L, 1, E)
    elif module.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)  # -> (L, N, E)
    embed = module.embed_dim
    if module._qkv_same_embed_dim:
        w_q, w_k = module.in_proj_weight[:embed], module.in_proj_weight[embed : 2 * embed]
    else:
        w_q, w_k = module.q_proj_weight, module.k_proj_weight
    bias = module.in_proj_bias
    b_q, b_k = (None, None) if bias is None else (bias[:embed], bias[embed : 2 * embed])
    heads = module.num_heads
    q = rearrange(F.linear(query, w_q, b_q), "l n (h d) -> n h l d", h=heads)
    k = rearrange(F.linear(key, w_k, b_k), "s n (h d) -> n h s d", h=heads)

    attn_mask = call.get("attn_mask")
    is_causal = bool(call.get("is_causal") or False)
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # (N * H, L, S)
            attn_mask = attn_mask.reshape(q.shape[0], heads, *attn_mask.shape[-2:])
        attn_mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask  # MHA: True = NOT allowed
        is_causal = False  # with a mask, MHA's is_causal is only a hint that the mask is causal
    key_padding = call.get("key_padding_mask")
    query_mask = None
    if key_padding is not None:
        key_padding = key_padding.reshape(q.shape[0], -1)
        if self_attention and key_padding.shape[1] == q.shape[2]:
            query_mask = ~_padding_from(key_padding)  # float: -inf marks padding, finite biases do not
        if key_padding.is_floating_point() and _has_finite_bias(key_padding):
            # MHA adds a float key_padding_mask to the scores, finite values included: fold it into attn_mask
            bias = key_padding[:, None, None, :]
            if attn_mask is None:
                attn_mask = bias
            elif attn_mask.dtype == torch.bool:
                attn_mask = torch.where(attn_mask, bias, torch.tensor(float("-inf"), dtype=bias.dtype))
            else:
                attn_mask = attn_mask + bias
            key_padding = None
        else:
            key_padding = _padding_from(key_padding)
    return {
        "q": q,
        "k": k,
        "attn_mask": attn_mask,
        "key_padding_mask": key_padding,
        "is_causal": is_causal,
        "scale": module.head_dim**-0.5,
        "query_mask": query_mask,
    }


def _real_tokens(mask: Any) -> Tensor | None:
    """``~key_padding_mask`` as bool (True = real), or ``None`` for no mask / a mask MHA would refuse."""
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        return None
    if mask.dtype == torch.bool:
        return ~mask
    if mask.is_floating_point():
        return mask > torch.finfo(mask.dtype).min  # -inf marks padding; finite values are biases
    return None


def watch_decoder_padding(tap: AttentionTap, model: nn.Module) -> list[Callable[[], None]]:
    """While an ``nn.TransformerDecoderLayer`` of ``model`` runs, its ``tgt_key_padding_mask`` marks the padded
    queries of the attention calls inside it that have no query mask of their own (its cross-attention: the queries
    are the decoder tokens). Returns the undo callables.

    Under ``torch.compile`` the hooks run inside the traced graph: there they only queue ``push`` / ``pop`` events in
    the tap's queue, in call order with the attention calls the MHA adapter queues, and the tap replays them when it
    scores those calls (as :mod:`entrotrain.taps.compiled_padding` does for HF models). The hook objects are the same
    at every arming, and a compiled model's post-hook has no ``always_call`` (dynamo guards on both)."""
    layers = [m for m in model.modules() if isinstance(m, nn.TransformerDecoderLayer)]
    if not layers:
        return []
    before, after = _decoder_hooks(tap)
    always = not is_compiled(model)
    undo: list[Callable[[], None]] = [lambda: clear_model_masks(tap)]
    for layer in layers:
        undo.append(layer.register_forward_pre_hook(before, with_kwargs=True).remove)
        undo.append(layer.register_forward_hook(after, always_call=always).remove)
    return undo


_SIGNATURE = inspect.signature(nn.TransformerDecoderLayer.forward)


def _decoder_hooks(tap: AttentionTap) -> tuple[Callable[..., None], Callable[..., None]]:
    """One pair of hook objects per tap, the same at every arming (dynamo guards on the hooks it traces)."""
    cached = tap.__dict__.get("_decoder_padding_hooks")
    if cached is not None:
        return cached

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("tgt_key_padding_mask")
        if mask is None and len(args) > 4:
            try:
                mask = _SIGNATURE.bind_partial(module, *args, **kwargs).arguments.get("tgt_key_padding_mask")
            except TypeError:
                mask = None
        if compiling():  # traced: replayed, in order, when the queued attention calls are scored
            tap._deferred.add("push", None, None, (_real_tokens(mask), False), None)
            return
        push_model_mask(tap, _real_tokens(mask), False)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        if compiling():
            tap._deferred.add("pop", None, None, (), None)
            return
        pop_model_mask(tap)

    tap.__dict__["_decoder_padding_hooks"] = (before, after)
    return before, after
