r"""Statistics of a model's predictive distribution per position: entropy, top-1 probability, NLL of the label.

For logits :math:`z \in \mathbb{R}^V` (one position: the next-token distribution of an LM, or a classifier's
output) with :math:`p = \mathrm{softmax}(z)`:

.. math::

    H = \operatorname{lse}(z) - \sum_j p_j z_j, \qquad p_{\max} = e^{\max_j z_j - \operatorname{lse}(z)}, \qquad
    \mathrm{NLL}(y) = \operatorname{lse}(z) - z_y

in nats, computed in float32 (float64 stays float64) by :func:`entrotrain.functional.entropy.row_entropy` (the one
implementation of the entropy formula) a block of ``chunk_size`` rows at a time. The ``hidden × head`` form takes
the output head's input :math:`h` and weight :math:`W` (bias :math:`b`) and builds :math:`z = h W^\top + b` one
block at a time, so at most ``chunk_size × V`` float32 logits ever exist (the fused path of
:mod:`entrotrain.functional.policy_head`, without its gradient: these are monitoring statistics).

Hyperfitting (Carlsson et al. 2025, arXiv 2412.04318): a model fine-tuned to near-zero loss on a few sequences puts
nearly all probability on one token (:math:`H \to 0`, :math:`p_{\max} \to 1`) even on held-out text, while the
held-out NLL rises. Entropies are of the model's own distribution at temperature 1 over the full vocabulary, at
every valid position of the *reference* (teacher-forced) tokens, not of generated ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from entrotrain._validation import check_int, check_shape, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional.entropy import row_entropy
from entrotrain.functional.policy_head import check_output_head

__all__ = ["PredictionStats", "prediction_stats_from_hidden", "prediction_stats_from_logits"]

#: Rows per block (``DEFAULT_CHUNK × V`` float32 logits at a time), as ``functional.policy_head``.
DEFAULT_CHUNK = 512


class PredictionStats(NamedTuple):
    """Per row ``(N,)``: ``entropy`` (nats), ``top1_prob`` and ``nll`` of the label (``None`` without labels).
    float32 (float64 for float64 input); a row holding NaN or +Inf gives NaN in that row only. A ``−inf`` logit is a
    masked token (probability 0, as in ``softmax``): the row's statistics are those of the other tokens, and the
    ``nll`` of a masked label is +inf; a row with no token above ``−inf`` has entropy 0 (as
    :func:`~entrotrain.functional.entropy.row_entropy`) and NaN ``top1_prob`` and ``nll``. Finite logits give
    finite values, except an ``nll`` beyond the dtype's range (``lse − z_y > 3.4e38`` in float32), which is +inf; so
    do finite ``hidden`` and head whose product overflows float32 (those rows are computed again in float64)."""

    entropy: Tensor
    top1_prob: Tensor
    nll: Tensor | None


def _check_labels(labels: Tensor | None, n: int) -> Tensor | None:
    if labels is None:
        return None
    check_tensor(labels, "labels", integer=True)
    check_shape(labels, (n,), "labels", like="(N,) of the rows")
    return labels.long()


def _block_stats(z: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    stats = row_entropy(z)
    top1 = torch.exp(z.amax(-1) - stats.lse)
    nll = None
    if labels is not None:
        safe = labels.clamp(0, z.shape[-1] - 1)
        picked = z.gather(-1, safe[:, None]).squeeze(-1)
        nll = torch.where(labels >= 0, stats.lse - picked, torch.zeros_like(picked))
    return stats.entropy, top1, nll


def _run(n: int, chunk_size: int, block, labels: Tensor | None, dtype: torch.dtype, device) -> PredictionStats:
    entropy = torch.empty(n, dtype=dtype, device=device)
    top1 = torch.empty_like(entropy)
    nll = torch.empty_like(entropy) if labels is not None else None
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            lab = None if labels is None else labels[start:stop]
            h, p, l = _block_stats(block(start, stop), lab)
            entropy[start:stop], top1[start:stop] = h, p
            if nll is not None:
                nll[start:stop] = l
    return PredictionStats(entropy, top1, nll)


def prediction_stats_from_logits(
    logits: Tensor, labels: Tensor | None = None, *, chunk_size: int = DEFAULT_CHUNK
) -> PredictionStats:
    """Entropy, top-1 probability and label NLL of ``softmax(logits)`` per row (formulas in the module docstring).

    Args:
        logits: ``(N, V)`` logits in any floating dtype (flatten ``(B, T, V)`` and pick the valid rows first).
        labels: optional ``(N,)`` integer ids ``< V``; a negative id (``ignore_index``) gives NLL 0 (exclude the row).
        chunk_size: rows per float32 block (bounds the scratch memory to ``chunk_size × V``).

    Returns:
        :class:`PredictionStats`; ``N = 0`` gives empty tensors. No gradient.

    Raises:
        EntrotrainError: ``logits`` not a 2-D floating tensor or ``V = 0``; labels not ``(N,)`` integers or
            ``>= V``; ``chunk_size < 1``.
    """
    check_tensor(logits, "logits", floating=True, ndim=2, layout="(N, V)")
    if logits.shape[1] == 0:
        raise EntrotrainError(f"logits has no category (V = 0, shape {tuple(logits.shape)}): need V >= 1.")
    chunk_size = check_int(chunk_size, "chunk_size", low=1)
    labels = _check_labels(labels, logits.shape[0])
    check_label_range(labels, logits.shape[1])
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return _run(
        logits.shape[0], chunk_size, lambda a, b: logits[a:b].detach().to(acc), labels, acc, logits.device
    )


def prediction_stats_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> PredictionStats:
    """The statistics of ``softmax(hidden @ weight.T + bias)`` without materialising the ``(N, V)`` logits.

    Args:
        hidden: ``(N, D)`` inputs of the output head (e.g. what ``lm_head`` receives), any floating dtype.
        weight: ``(V, D)`` head weight; the product is taken in float32 (float64 when both are float64).
        bias: optional ``(V,)`` head bias.
        labels: optional ``(N,)`` integer ids ``< V``; negative ids give NLL 0.
        chunk_size: rows per block: at most ``chunk_size × V`` float32 logits at once.

    Returns:
        :class:`PredictionStats` equal (to float32 rounding) to :func:`prediction_stats_from_logits` on
        ``hidden @ weight.T + bias``. No gradient. A NaN/Inf row of ``hidden`` gives NaN in that row only; a finite
        row whose float32 logits overflow (``|h·W| > 3.4e38``) is computed again in float64 (finite statistics; one
        host sync per call, skipped inside a ``torch.compile``d region, where such a row stays NaN).

    Raises:
        EntrotrainError: shapes that do not fit (named), ``V = 0``, bad labels or ``chunk_size``.
    """
    return hidden_stats(hidden, weight, bias, labels, chunk_size=chunk_size)


def hidden_stats(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    labels: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    labels_in_range: bool = False,
) -> PredictionStats:
    """:func:`prediction_stats_from_hidden`; with ``labels_in_range`` the caller has already checked ``labels < V``
    (e.g. before a compiled forward: reading ``labels.max()`` inside one breaks its graph)."""
    check_output_head(hidden, weight, bias, same_dtype=False)
    chunk_size = check_int(chunk_size, "chunk_size", low=1)
    labels = _check_labels(labels, hidden.shape[0])
    if not labels_in_range:
        check_label_range(labels, weight.shape[0])
    acc = torch.float64 if hidden.dtype == weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(acc)
    b = None if bias is None else bias.detach().to(acc)

    def block(start: int, stop: int) -> Tensor:
        z = hidden[start:stop].detach().to(acc) @ w.t()
        return z if b is None else z.add_(b)

    stats = _run(hidden.shape[0], chunk_size, block, labels, acc, hidden.device)
    if acc == torch.float32 and hidden.shape[0] and not torch.compiler.is_compiling():
        stats = _redo_overflowed(stats, hidden, weight, bias, labels, chunk_size)
    return stats


def _redo_overflowed(
    stats: PredictionStats, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor | None, chunk: int
) -> PredictionStats:
    """The rows of finite ``hidden`` whose float32 logits ``h Wᵀ + b`` overflowed (``|z| > 3.4e38``: NaN entropy or
    top-1), computed again in float64, where they are finite (``|h|, |W| < 3.4e38`` give ``|z| < 1.2e77·D``), and
    stored back in float32 (``H <= ln V`` and ``p_max <= 1`` fit; an nll beyond float32's range is +inf, as
    documented). One host sync per call; skipped inside a compiled region (which it would break)."""
    redo = ~(torch.isfinite(stats.entropy) & torch.isfinite(stats.top1_prob))
    redo &= torch.isfinite(hidden.detach()).all(-1)  # a NaN/Inf row of hidden is data: NaN in that row
    if not bool(redo.any()):
        return stats
    rows = redo.nonzero().squeeze(1)
    h = hidden.detach()[rows].double()
    w = weight.detach().double()
    b = None if bias is None else bias.detach().double()

    def block(start: int, stop: int) -> Tensor:
        z = h[start:stop] @ w.t()
        return z if b is None else z.add_(b)

    again = _run(rows.numel(), chunk, block, None if labels is None else labels[rows], torch.float64, h.device)
    stats.entropy[rows] = again.entropy.float()
    stats.top1_prob[rows] = again.top1_prob.float()
    if stats.nll is not None and again.nll is not None:
        stats.nll[rows] = again.nll.float()
    return stats


def check_label_range(labels: Tensor | None, vocab: int) -> None:
    """``labels < vocab`` (negative ids are ignored), else :class:`~entrotrain.errors.EntrotrainError`."""
    if labels is not None and labels.numel() and int(labels.max()) >= vocab:
        raise EntrotrainError(
            f"labels hold id {int(labels.max())} but there are only V = {vocab} classes; labels must be < V "
            "(negative = ignored)."
        )
