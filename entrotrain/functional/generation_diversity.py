r"""Diversity of generated token sequences: distinct-n, type-token ratio and the repetition rate.

The hyperfitting signal (Carlsson et al. 2025, "The Hyperfitting Phenomenon", arXiv 2412.04318): fine-tuning a
pre-trained LM to near-zero loss on a few samples collapses its next-token entropy, yet its greedy continuations
become *less* repetitive (the paper plots the type-token ratio of 96-token greedy continuations).

For a sequence :math:`s` let :math:`G_n(s)` be the multiset of its n-grams, a window of ``n`` *consecutive valid*
tokens (an n-gram never crosses padding or a sequence boundary), and :math:`U_n(s)` the set of distinct ones.

.. math::

    \text{distinct-}n\ (\text{corpus}) = \frac{|\bigcup_s U_n(s)|}{\sum_s |G_n(s)|}, \qquad
    \text{distinct-}n\ (\text{mean}) = \frac{1}{|S|}\sum_{s \in S} \frac{|U_n(s)|}{|G_n(s)|}, \qquad
    \text{rep-}n = \frac{1}{|S|}\sum_{s \in S}\Big(1 - \frac{|U_n(s)|}{|G_n(s)|}\Big)

``corpus`` is Li et al. (2016, "A Diversity-Promoting Objective Function for Neural Conversation Models")
distinct-n, with the denominator the number of n-grams (not of tokens; for ``n = 1`` they agree). ``mean`` with
``n = 1`` is the type-token ratio (TTR) averaged over sequences, Hyperfitting's diversity measure, in model
tokens (not words). ``rep-n`` is Welleck et al. (2020, "Neural Text Generation with Unlikelihood Training")
seq-rep-n: the fraction of a sequence's n-grams that repeat one already in it. :math:`S` is the set of sequences
holding at least one n-gram; with none at all every function returns 0 (documented, finite).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from entrotrain._validation import check_choice, check_int, check_shape, check_tensor, keep_mask

__all__ = ["NgramCounts", "distinct_n", "ngram_counts", "repetition_rate", "type_token_ratio"]


class NgramCounts(NamedTuple):
    """Per sequence: ``distinct`` n-grams and ``total`` n-grams ``(B,)`` int64, and ``corpus_distinct`` (0-dim
    int64), the distinct n-grams of all sequences together."""

    distinct: Tensor
    total: Tensor
    corpus_distinct: Tensor


def ngram_counts(tokens: Tensor, n: int, mask: Tensor | None = None) -> NgramCounts:
    """Count the n-grams of each sequence (windows of ``n`` consecutive valid tokens) and the distinct ones.

    Args:
        tokens: ``(B, T)`` integer token ids (``(T,)`` is one sequence).
        n: n-gram order, an int >= 1.
        mask: optional ``(B, T)`` keep mask (bool, or integer 0/1 as HF's ``attention_mask``): an n-gram counts only
            when all its ``n`` positions are kept.

    Returns:
        :class:`NgramCounts`. ``T < n``, ``B = 0`` or an all-masked row give 0 n-grams.

    Raises:
        EntrotrainError: ``tokens`` not an integer tensor of 1 or 2 dims, ``n < 1``, a mask of another shape or a
            float mask.
    """
    check_tensor(tokens, "tokens", integer=True, ndim=(1, 2), layout="(batch, tokens)")
    n = check_int(n, "n", low=1)
    valid = keep_mask(mask, "mask")
    if tokens.dim() == 1:
        tokens = tokens[None]
        if valid is not None and valid.dim() == 1:
            valid = valid[None]
    if valid is not None:
        check_shape(valid, tokens.shape, "mask", like="the tokens")
    b, t = tokens.shape
    zeros = torch.zeros(b, dtype=torch.long, device=tokens.device)
    if t < n or b == 0:
        return NgramCounts(zeros, zeros.clone(), torch.zeros((), dtype=torch.long, device=tokens.device))
    windows = tokens.long().unfold(1, n, 1)  # (B, T - n + 1, n)
    ok = torch.ones(windows.shape[:2], dtype=torch.bool, device=tokens.device)
    if valid is not None:
        ok = valid.unfold(1, n, 1).all(-1)
    total = ok.sum(1)
    rows = torch.arange(b, device=tokens.device)[:, None].expand(windows.shape[:2])
    grams = windows[ok]  # (M, n)
    keyed = torch.cat([rows[ok][:, None], grams], dim=1)  # (row, n-gram): distinct within a row
    if keyed.shape[0] == 0:
        return NgramCounts(zeros, total, torch.zeros((), dtype=torch.long, device=tokens.device))
    per_row = torch.unique(keyed, dim=0)
    distinct = torch.bincount(per_row[:, 0], minlength=b)
    corpus = torch.tensor(torch.unique(grams, dim=0).shape[0], device=tokens.device)
    return NgramCounts(distinct, total, corpus)


def distinct_n(tokens: Tensor, n: int = 2, mask: Tensor | None = None, *, reduction: str = "corpus") -> Tensor:
    """Distinct-n of ``tokens`` (module docstring formula): ``"corpus"`` (Li et al. 2016, pooled) or ``"mean"``
    (per-sequence ratio averaged over sequences with at least one n-gram).

    Args:
        tokens: ``(B, T)`` (or ``(T,)``) integer token ids, e.g. greedy continuations without their prompts.
        n: n-gram order >= 1.
        mask: optional ``(B, T)`` keep mask (padding False).
        reduction: ``"corpus"`` or ``"mean"``.

    Returns:
        0-dim float64 tensor in ``[0, 1]``; 0 when there is no n-gram at all.

    Raises:
        EntrotrainError: as :func:`ngram_counts`, or an unknown ``reduction``.
    """
    check_choice(reduction, "reduction", ("corpus", "mean"))
    counts = ngram_counts(tokens, n, mask)
    if reduction == "corpus":
        total = counts.total.sum()
        return counts.corpus_distinct.double() / total.clamp_min(1).double()
    has = counts.total > 0
    ratio = counts.distinct[has].double() / counts.total[has].double()
    return ratio.mean() if ratio.numel() else torch.zeros((), dtype=torch.float64, device=tokens.device)


def type_token_ratio(tokens: Tensor, mask: Tensor | None = None) -> Tensor:
    """Type-token ratio (distinct tokens / tokens) per sequence, averaged over non-empty sequences: Hyperfitting's
    diversity measure, in model tokens. Equals ``distinct_n(tokens, 1, mask, reduction="mean")``; 0 when empty."""
    return distinct_n(tokens, 1, mask, reduction="mean")


def repetition_rate(tokens: Tensor, n: int = 4, mask: Tensor | None = None) -> Tensor:
    """Welleck et al.'s seq-rep-n: per sequence the fraction of n-grams that repeat an earlier one
    (``1 - distinct/total``), averaged over sequences with at least one n-gram.

    Args:
        tokens: ``(B, T)`` (or ``(T,)``) integer token ids.
        n: n-gram order >= 1 (default 4, as seq-rep-4).
        mask: optional ``(B, T)`` keep mask.

    Returns:
        0-dim float64 tensor in ``[0, 1)``: 0 = no repeated n-gram (or no n-gram at all); near 1 = a loop.

    Raises:
        EntrotrainError: as :func:`ngram_counts`.
    """
    counts = ngram_counts(tokens, n, mask)
    has = counts.total > 0
    rep = 1.0 - counts.distinct[has].double() / counts.total[has].double()
    return rep.mean() if rep.numel() else torch.zeros((), dtype=torch.float64, device=tokens.device)
