"""Which query positions an attention tap scores: a padded query is not a token (DESIGN.md §8, "padding is not data").

Rule: a query position is scored only if the model's own mask marks it as real. The mask of one attention call is
found, in this order:

1. given with the call: :func:`~entrotrain.taps.record_attention` ``(..., query_mask=...)``, or the
   ``key_padding_mask`` of an :class:`torch.nn.MultiheadAttention` *self*-attention (``query is key``: the queries are
   the keys);
2. the 2-D ``attention_mask`` ``(batch, tokens)`` (1 = real) handed to the forward of the innermost HF
   ``PreTrainedModel`` running the call (captured by the HF adapter while a tap is armed). Self-attention queries are
   those tokens, left or right padding alike; an encoder-decoder's decoder stack gets ``decoder_attention_mask``, so
   its self- and cross-attention queries are the decoder tokens (all of them when no ``decoder_attention_mask`` is
   given); with a KV cache (``past_key_values`` / ``cache`` passed) the mask covers past and new tokens and the
   queries are its last ``N`` positions. A 4-D (custom) ``attention_mask`` gives no query mask;
3. a mask the user hands over for everything in a block::

       with query_padding(batch["attention_mask"]):   # (batch, tokens), bool or 0/1 with 1 = real
           loss = model(batch["input_ids"])            # every armed tap skips the padded queries

   which is how models captured through ``F.scaled_dot_product_attention`` or ``record_attention`` learn their
   padding. Blocks nest (the innermost wins); costs nothing when no tap is armed.

A mask that does not fit a call (another batch size or query count: pooling queries, packed or concatenated
sequences, image tokens) is not guessed at: every query of that call is scored and a warning names the site, once
per tap. A mask handed to ``record_attention`` that does not fit is an error.

Sampling (``max_rows`` / ``max_queries``): the evenly spaced positions are chosen over the full length first, then
the padded ones among them are dropped, so the same positions are scored at every step and the mean stays an
unbiased estimate over real queries (fewer queries are scored in a heavily padded batch).

Activations follow the same rule: an :class:`~entrotrain.taps.ActivationTap` (``RepresentationEntropyMonitor``, the
representation regularisers) keeps only the real token positions of a ``(batch, tokens, features)`` output, by the
``attention_mask`` of the HF model running the module (2.) or a ``query_padding`` block (3.), after its own evenly
spaced pick (:func:`ambient_token_mask`; a mask that does not fit keeps every position, warned once per module).
A router capture armed with ``token_masks=True`` (:class:`~entrotrain.taps.RouterTap`, as a router regulariser's
``capture`` arms it) records the same mask flattened over its ``(batch·tokens, E)`` rows (:func:`ambient_row_mask`).

Scored results mark a padded query as a query with no valid key (entropy 0, ``n_keys = 0``), which every statistic
(:func:`~entrotrain.taps.attention_stats.per_head_sums`) and every attention regulariser already leaves out.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from entrotrain._validation import check_tensor, keep_mask
from entrotrain.errors import EntrotrainError
from entrotrain.functional.attention import AttentionEntropy

__all__ = ["query_padding", "mask_queries", "check_query_mask", "ambient_query_mask", "ambient_token_mask",
           "ambient_row_mask", "ambient_row_batch"]

#: User blocks (``with query_padding(mask):``), innermost last; seen by every armed tap. Each entry is
#: ``[mask as given, bool mask or None]``: converted (which reads an integer mask's values) only when a tap uses it.
_USER: list[list[Any]] = []
#: Per tap: the masks of the HF models whose forward is running, innermost last (see :func:`push_model_mask`).
_MODEL: weakref.WeakKeyDictionary[Any, list[Any]] = weakref.WeakKeyDictionary()
#: Per tap: the sites already warned about (a mask that does not fit).
_WARNED: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
_ALL_REAL = "all real"  # a nested HF model called without attention_mask: its queries are all real
_INHERIT = "inherit"  # the outermost HF model called without attention_mask: a user block may still apply


@contextmanager
def query_padding(mask: Tensor) -> Iterator[None]:
    """Within the block, every armed :class:`~entrotrain.taps.AttentionTap` scores only the real queries of ``mask``
    (and every armed :class:`~entrotrain.taps.ActivationTap` keeps only the real tokens of ``(batch, tokens, C)``).

    Args:
        mask: ``(batch, tokens)``, bool (True = real) or integer 0/1 (1 = real, HF's ``attention_mask``). It applies to
            each attention call whose queries are ``(batch, tokens)``; a call it does not fit scores all its queries
            (warned once per site). A model's own mask (HF ``attention_mask``, MHA ``key_padding_mask``) and a
            ``record_attention(query_mask=...)`` take precedence.

    Raises:
        EntrotrainError: when ``mask`` is not a 2-D bool or 0/1 integer tensor.
    """
    check_tensor(mask, "mask", ndim=2)
    if mask.dtype != torch.bool:
        keep_mask(mask[:0], "mask")  # refuses a float mask now; the 0/1 check reads values, so it waits for a tap
    _USER.append([mask, None])
    try:
        yield
    finally:
        _USER.pop()


def check_query_mask(mask: Tensor, batch: int, queries: int) -> Tensor:
    """A ``query_mask`` handed over with one call: ``(batch, queries)``, bool or 0/1 (1 = real); returns it as bool."""
    check_tensor(mask, "query_mask", ndim=2)
    if tuple(mask.shape) != (batch, queries):
        raise EntrotrainError(
            f"query_mask must be (batch, queries) = ({batch}, {queries}) like q, got shape {tuple(mask.shape)}; "
            "pass the mask of the query positions of this call (True / 1 = real token)."
        )
    return keep_mask(mask, "query_mask")


# ------------------------------------------------------------------------------------------------ model masks (HF)
def pretrained_model_class() -> type | None:
    """transformers' ``PreTrainedModel``, whose forwards the mask hooks read, when transformers is already imported;
    ``None`` otherwise (no HF model can exist then, and entrotrain never imports transformers itself)."""
    if sys.modules.get("transformers") is None:
        return None
    try:
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return None
    return PreTrainedModel


def push_model_mask(tap: Any, mask: Any, with_cache: bool) -> None:
    """An HF model of ``tap`` starts its forward with this ``attention_mask`` (``None`` if not given)."""
    stack = _MODEL.setdefault(tap, [])
    if isinstance(mask, Tensor) and mask.dim() == 2:
        stack.append((mask != 0, with_cache))  # HF's convention: 1 = real (bool, int or float 0/1)
    elif mask is None and stack and stack[-1] is not _INHERIT:
        stack.append(_ALL_REAL)  # e.g. a decoder stack called without decoder_attention_mask
    else:
        stack.append(_INHERIT if mask is None else _ALL_REAL)  # no mask, or a 4-D mask: no query mask


def pop_model_mask(tap: Any) -> None:
    stack = _MODEL.get(tap)
    if stack:
        stack.pop()


def clear_model_masks(tap: Any) -> None:
    _MODEL.pop(tap, None)


def _fit(mask: Tensor, batch: int, queries: int, with_cache: bool) -> Tensor | None:
    if mask.shape[0] != batch:
        return None
    if mask.shape[1] == queries:
        return mask
    if with_cache and mask.shape[1] > queries:
        return mask[:, mask.shape[1] - queries :]  # past tokens first, then the queries of this call
    return None


def _ambient(tap: Any) -> tuple[Tensor, bool] | None:
    """``(mask, with_cache)`` in force for ``tap``: the innermost HF model's mask, else the innermost
    ``query_padding`` block; ``None`` when every position is real."""
    stack = _MODEL.get(tap)
    if stack and stack[-1] is _ALL_REAL:
        return None
    if stack and stack[-1] is not _INHERIT:
        return stack[-1]
    if _USER:
        entry = _USER[-1]
        if entry[1] is None:
            entry[1] = keep_mask(entry[0], "mask")
        return entry[1], False
    return None


def ambient_token_mask(tap: Any, batch: int, tokens: int, device: torch.device) -> tuple[Tensor | None, Any]:
    """The real token positions ``(batch, tokens)`` bool of a ``(batch, tokens, features)`` activation captured by
    ``tap`` (an :class:`~entrotrain.taps.ActivationTap`) under the same rule as attention queries: ``(mask, None)``,
    ``(None, None)`` when every position is real, or ``(None, shape)`` when the mask in force does not fit (the
    caller warns: all positions are kept)."""
    found = _ambient(tap)
    if found is None:
        return None, None
    fitted = _fit(found[0], batch, tokens, found[1])
    if fitted is None:
        return None, tuple(found[0].shape)
    return fitted.to(device), None


def ambient_row_mask(tap: Any, rows: int, device: torch.device) -> tuple[Tensor | None, Any]:
    """The real rows ``(rows,)`` bool of a flat ``(batch·tokens, E)`` capture of ``tap`` (router logits, HF's
    row-major flattening of ``(batch, tokens)``), under the rule of :func:`ambient_token_mask` with ``tokens =
    rows / batch``: ``(mask, None)``, ``(None, None)`` when every row is real, or ``(None, shape)`` when the mask in
    force does not fit (the caller warns: all rows are kept)."""
    found = _ambient(tap)
    if found is None:
        return None, None
    batch = found[0].shape[0]
    fitted = _fit(found[0], batch, rows // batch, found[1]) if batch and rows % batch == 0 else None
    if fitted is None:
        return None, tuple(found[0].shape)
    return fitted.reshape(-1).to(device), None


def ambient_row_batch(tap: Any, rows: int) -> int | None:
    """The batch size of the mask in force for a ``(batch·tokens, E)`` capture of ``tap`` when it fits the rows (as
    :func:`ambient_row_mask`), else ``None`` (no mask in force, or one that does not fit): how the rows split into
    sequences."""
    found = _ambient(tap)
    if found is None:
        return None
    batch = found[0].shape[0]
    return batch if batch and rows % batch == 0 and _fit(found[0], batch, rows // batch, found[1]) is not None else None


def ambient_query_mask(tap: Any, site: str, batch: int, queries: int, device: torch.device) -> Tensor | None:
    """The query mask ``(batch, queries)`` bool of a call of ``tap`` without its own, or ``None`` (all real).

    The innermost HF model's mask, else the innermost ``query_padding`` block; a mask that does not fit warns once.
    """
    found = _ambient(tap)
    if found is None:
        return None
    mask, with_cache = found
    fitted = _fit(mask, batch, queries, with_cache)
    if fitted is None:
        warned = _WARNED.setdefault(tap, set())
        if site not in warned:
            warned.add(site)
            warnings.warn(
                f"AttentionTap: the query mask of shape {tuple(mask.shape)} does not fit the attention call at "
                f"{site!r} (batch {batch}, {queries} queries); all its queries are scored. Hand the mask of its "
                "queries over with record_attention(..., query_mask=...) or a query_padding(...) block of that shape.",
                stacklevel=4,
            )
        return None
    return fitted.to(device)


# ------------------------------------------------------------------------------------------------ results
def mask_queries(result: AttentionEntropy, query_mask: Tensor | None) -> AttentionEntropy:
    """``result`` ``(batch, heads, queries)`` with each padded query (``query_mask`` False) as a query with no valid key.

    Entropy and normalised entropy become 0 and ``n_keys`` 0, so every mean that keeps ``n_keys >= 1`` (or ``>= 2``)
    leaves them out; the graph of the real queries is untouched (``torch.where``).
    """
    if query_mask is None:
        return result
    real = query_mask[:, None, :].to(result.entropy.device)
    zero = torch.zeros((), dtype=result.entropy.dtype, device=result.entropy.device)
    return AttentionEntropy(
        torch.where(real, result.entropy, zero),
        torch.where(real, result.normalized, zero),
        torch.where(real, result.n_keys, torch.zeros((), dtype=result.n_keys.dtype, device=result.n_keys.device)),
    )
