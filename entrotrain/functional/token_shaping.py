r"""Token-level entropy shaping for RL on reasoning models: window entropy (ARES/AEPO), phase entropy (PEAR), CANON.

Pure tensor maths (no hooks, no Lightning); regularisers, tasks and monitors call these functions.

Conventions: per-token tensors are ``(B, T)`` (sequences × response tokens), ``mask (B, T)`` the valid response tokens
(bool, or 0/1 integer / float; True = valid), per-response tensors ``(B,)``. Every quantity is computed in float64
and returned in float32 (float64 for float64 input); half-precision input is never accumulated in half precision.
All shaping terms are detached (the reference code uses old-pass, no-grad entropies): nothing here has a gradient.

- :func:`window_entropy`: the sliding-window mean of ARES/AEPO (Chen et al. 2025, arXiv 2510.08457).
- :func:`high_window_entropy_mask`: the "HWE tokens" (window entropy :math:`\ge \tau`), global under DDP.
- :func:`phase_ids_from_delimiter` / :func:`phase_entropy`: per-phase token-mean entropy (PEAR, Huang et al. 2025,
  arXiv 2510.08026).
- :func:`pear_reward`: the PEAR reward term (the paper's exact formula is not published: see its docstring).
- :func:`sequence_entropy` / :func:`canon_advantage`: CANON (Chen et al. 2025, arXiv 2509.23962), exactly as
  ``compute_dr_entropy_per_token_group_outcome_advantage`` / ``compute_dr_length_on_mean_group_outcome_advantage``
  in ``biuboomc/CANON``.

Contract (DESIGN.md §8): bad arguments raise :class:`~entrotrain.errors.EntrotrainError` naming the argument, what
was received and the fix; empty input (``B = 0`` or ``T = 0``), all-padding rows and empty windows or phases give
the documented finite value (0, with a count of 0); a NaN/Inf *valid* token gives NaN only in the values that
average it (its windows, its row's phase), never elsewhere. Padding never enters a mean, quantile or split.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from entrotrain._validation import check_choice, check_int, check_real, check_shape, check_tensor, token_mask
from entrotrain.errors import EntrotrainError
from entrotrain.functional.policy import _at_or_above_quantile

__all__ = [
    "WINDOW_ALIGNS",
    "CANON_VARIANTS",
    "PhaseEntropy",
    "WindowEntropy",
    "canon_advantage",
    "canon_split",
    "high_window_entropy_mask",
    "pear_reward",
    "phase_entropy",
    "phase_ids_from_delimiter",
    "sequence_entropy",
    "window_entropy",
]

WINDOW_ALIGNS = ("forward", "trailing", "centred")
CANON_VARIANTS = ("entropy", "length")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _mask(mask: Tensor, shape: torch.Size, name: str = "mask") -> Tensor:
    """A 0/1 token mask as bool (bool / integer 0/1 / floating 0/1; other values refused), shaped like the tokens:
    :func:`~entrotrain._validation.token_mask`, the policy code's one rule."""
    return token_mask(mask, shape, name, like="the entropy, (B, T)")


def _tokens(entropy: Tensor, name: str = "entropy") -> Tensor:
    return check_tensor(entropy, name, floating=True, ndim=2, layout="(B, T): sequences x response tokens")


# --------------------------------------------------------------------------------------------- window entropy


class WindowEntropy(NamedTuple):
    """``mean (B, T)``: the window means (0 where ``count`` is 0); ``count (B, T)`` int64: valid tokens averaged."""

    mean: Tensor
    count: Tensor


def _window_bounds(t: int, window: int, align: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """``[start, stop)`` of each position's window, clamped to ``[0, T]``."""
    pos = torch.arange(t, device=device)
    if align == "forward":  # ARES: the next w tokens, anchor excluded
        start, stop = pos + 1, pos + 1 + window
    elif align == "trailing":  # the anchor and the w - 1 tokens before it
        start, stop = pos - window + 1, pos + 1
    else:  # centred: floor((w-1)/2) tokens before the anchor, ceil((w-1)/2) after
        start = pos - (window - 1) // 2
        stop = start + window
    return start.clamp(0, t), stop.clamp(0, t)


def window_entropy(
    entropy: Tensor, mask: Tensor, window: int = 4, *, align: str = "forward", return_counts: bool = False
) -> Tensor | WindowEntropy:
    r"""Sliding-window mean of per-token entropies over the *valid* tokens of each row (ARES/AEPO's window entropy).

    .. math::

        \bar H_{b,t} = \frac{\sum_{s \in W(t)} m_{b,s} H_{b,s}}{\sum_{s \in W(t)} m_{b,s}}

    with the window :math:`W(t)` (positions of the same row, clamped to ``[0, T)``):

    - ``align="forward"`` (default, ARES's ``window_size`` code: forward-looking, the anchor *excluded*):
      :math:`W(t) = \{t+1, \dots, t+w\}`;
    - ``"trailing"``: :math:`\{t-w+1, \dots, t\}` (anchor included);
    - ``"centred"``: :math:`\{t - \lfloor (w-1)/2 \rfloor, \dots, t + \lceil (w-1)/2 \rceil\}` (anchor included; an
      even ``w`` has one more token after the anchor).

    A window never leaves its row, and padding (``mask`` False) never enters a sum or a count: near the end of a
    response (or when ``window`` exceeds the sequence) the window is *truncated* and averages the valid tokens it
    still holds (ARES skips triggers with fewer than ``w`` following tokens: select ``count == window`` for that).
    Vectorised with one float64 cumulative sum per row (no loop over tokens). The entropies are whatever the caller
    gives: entrotrain's :func:`~entrotrain.functional.policy.token_entropy` is over the full vocabulary at the
    sampling temperature (ARES estimates it from vLLM's top-10 log-probs plus a lumped tail bucket).

    Args:
        entropy: ``(B, T)`` per-token entropies (any floating dtype; accumulated in float64).
        mask: ``(B, T)`` valid tokens (bool, or 0/1 integer / float).
        window: ``w >= 1`` tokens.
        align: ``"forward"``, ``"trailing"`` or ``"centred"``.
        return_counts: also return the number of valid tokens in each window.

    Returns:
        ``(B, T)`` float32 (float64 for float64 input), no gradient; or :class:`WindowEntropy` ``(mean, count)``.
        The value is **0 (count 0)** at invalid anchors and where the window holds no valid token (the last valid
        token under ``"forward"``, all-padding rows, ``B = 0`` / ``T = 0``). A window holding a valid NaN/Inf
        entropy is NaN (only that window).

    Raises:
        EntrotrainError: ``entropy`` not floating ``(B, T)``, a bad ``mask``, ``window`` not an int >= 1, an unknown
            ``align``.
    """
    _tokens(entropy)
    valid = _mask(mask, entropy.shape)
    check_int(window, "window", low=1)
    check_choice(align, "align", WINDOW_ALIGNS)
    b, t = entropy.shape
    h = entropy.detach().double()
    finite = torch.isfinite(h)
    zero = torch.zeros((), dtype=torch.float64, device=h.device)
    vals = torch.where(valid & finite, h, zero)
    bad = (valid & ~finite).to(torch.int64)
    pad = torch.zeros(b, 1, dtype=torch.float64, device=h.device)
    c_val = torch.cat([pad, vals.cumsum(1)], 1)  # C[k] = sum_{s<k}
    c_cnt = torch.cat([pad.long(), valid.to(torch.int64).cumsum(1)], 1)
    c_bad = torch.cat([pad.long(), bad.cumsum(1)], 1)
    start, stop = _window_bounds(t, window, align, h.device)
    start, stop = start.expand(b, t), stop.expand(b, t)
    total = c_val.gather(1, stop) - c_val.gather(1, start)
    count = c_cnt.gather(1, stop) - c_cnt.gather(1, start)
    n_bad = c_bad.gather(1, stop) - c_bad.gather(1, start)
    count = torch.where(valid, count, torch.zeros_like(count))
    mean = torch.where(count > 0, total / count.clamp_min(1).double(), zero)
    mean = torch.where((n_bad > 0) & (count > 0), torch.full_like(mean, float("nan")), mean)
    mean = mean.to(_out_dtype(entropy.dtype))
    return WindowEntropy(mean, count) if return_counts else mean


def high_window_entropy_mask(
    window_entropy: Tensor, mask: Tensor, *, quantile: float | None = None, threshold: float | None = None
) -> Tensor:
    r"""ARES's high-window-entropy ("HWE") tokens: :math:`\bar H_t \ge \tau` on the positions of ``mask``.

    Exactly one of:

    - ``threshold``: a fixed :math:`\tau` in nats, compared in float64 (ARES's fallback is 1.5; its trainer adapts
      :math:`\tau` by an EMA of the batch-median per-sample 95th percentile, which the caller can feed in here);
    - ``quantile``: :math:`\tau` = the ``quantile`` level (e.g. 0.95, ARES's percentile; linear interpolation as
      ``np.percentile``) of the finite window entropies of all positions of ``mask``, **pooled over the batch and,
      under ``torch.distributed``, gathered from every rank** (global, like :func:`~entrotrain.functional.policy.
      high_entropy_mask`). ARES takes per-sample percentiles; the pooled one is what a global selection needs.

    The comparison is :math:`\ge` (ties included). ``mask`` should hold the positions to evaluate: pass
    ``count > 0`` from :func:`window_entropy` (``return_counts=True``), or ``count == window`` to skip truncated
    windows as ARES does. ARES counts HWE tokens only at "reasoning trigger" words (its own word list, not shipped
    here): to reproduce that, ``& is_trigger`` with a mask built from the *sampled* tokens (ARES's code matches the
    argmax of the top-10 log-probs instead, a quirk not reproduced).

    Returns:
        Boolean ``(B, T)`` (the shape of ``window_entropy``): ``window_entropy >= tau & mask``. All False when no
        position of ``mask`` has a finite value. NaN values are never selected and do not move :math:`\tau`.

    Raises:
        EntrotrainError: ``window_entropy`` not floating, a bad or mis-shaped ``mask``, both or neither of
            ``quantile`` / ``threshold``, ``quantile`` outside ``[0, 1]``, a non-finite ``threshold``.
    """
    check_tensor(window_entropy, "window_entropy", floating=True)
    valid = _mask(mask, window_entropy.shape)
    if (quantile is None) == (threshold is None):
        raise EntrotrainError(
            f"give exactly one of quantile= (a level in [0, 1], e.g. 0.95) or threshold= (nats), got quantile="
            f"{quantile!r}, threshold={threshold!r}."
        )
    h = window_entropy.detach()
    if threshold is not None:
        tau = check_real(threshold, "threshold")
        return (h.double() >= tau) & valid  # float64: a bf16/float32 comparison would round tau to that dtype
    q = check_real(quantile, "quantile", low=0.0, high=1.0)
    return _at_or_above_quantile(h.double(), valid, q)


# --------------------------------------------------------------------------------------------- phases


class PhaseEntropy(NamedTuple):
    """``mean (B, P)``: token-mean entropy of each phase of each sequence (0 where ``count`` is 0);
    ``count (B, P)`` int64: its valid tokens."""

    mean: Tensor
    count: Tensor


def _delimiter(delimiter_ids: int | Sequence[int] | Tensor) -> list[int]:
    if isinstance(delimiter_ids, Tensor):
        if delimiter_ids.is_floating_point() or delimiter_ids.dim() > 1:
            raise EntrotrainError(
                f"delimiter_ids must be a token id or a 1-D sequence of integer ids, got a tensor of dtype "
                f"{delimiter_ids.dtype} and shape {tuple(delimiter_ids.shape)}."
            )
        delimiter_ids = delimiter_ids.reshape(-1).tolist()
    if isinstance(delimiter_ids, int) and not isinstance(delimiter_ids, bool):
        delimiter_ids = [delimiter_ids]
    ids = list(delimiter_ids) if isinstance(delimiter_ids, (list, tuple)) else None
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not -(2**63) <= i < 2**63 for i in ids):
        raise EntrotrainError(
            f"delimiter_ids must be a token id or a non-empty sequence of token ids (int64, e.g. the ids that "
            f"tokenizer.encode('</think>', add_special_tokens=False) gives), got {delimiter_ids!r}."
        )
    return ids


def phase_ids_from_delimiter(
    token_ids: Tensor, mask: Tensor, delimiter_ids: int | Sequence[int] | Tensor, *, n_phases: int = 2
) -> Tensor:
    r"""Phase index of every response token, the phases separated by a delimiter token sequence (PEAR's ``</think>``).

    A delimiter *occurrence* is a run of valid tokens equal to ``delimiter_ids`` (a multi-token delimiter is matched
    as a sequence of ids: this fixes the PEAR derivatives' string match, which misses a ``</think>`` split over
    several tokens). The phase of token :math:`t` is the number of occurrences that *start* at or before
    :math:`t`, capped at ``n_phases - 1``: the first occurrence ends phase 0, and **the delimiter tokens belong to
    the phase they open** (phase 1 for the first one), so phase 0 is exactly the PEAR derivatives' thinking span
    ``entropys[:idx]``. No delimiter: the whole response is phase 0 (as PEAR). Overlapping occurrences each count.

    Args:
        token_ids: ``(B, T)`` integer token ids of the responses.
        mask: ``(B, T)`` valid tokens; padding is never matched and gets phase -1.
        delimiter_ids: one id or a sequence of ids.
        n_phases: number of phases ``>= 1``.

    Returns:
        ``(B, T)`` int64 phase ids in ``[0, n_phases)`` on valid tokens, ``-1`` on padding.

    Raises:
        EntrotrainError: ``token_ids`` not an integer ``(B, T)`` tensor, a bad ``mask``, bad ``delimiter_ids``,
            ``n_phases < 1``.
    """
    check_tensor(token_ids, "token_ids", integer=True, ndim=2, layout="(B, T)")
    valid = _mask(mask, token_ids.shape)
    ids = _delimiter(delimiter_ids)
    check_int(n_phases, "n_phases", low=1)
    b, t = token_ids.shape
    k = len(ids)
    starts = torch.zeros(b, t, dtype=torch.bool, device=token_ids.device)
    if t >= k:
        hit = torch.ones(b, t - k + 1, dtype=torch.bool, device=token_ids.device)
        for j, d in enumerate(ids):  # a loop over the delimiter's ids, not over tokens
            hit &= (token_ids[:, j : t - k + 1 + j] == d) & valid[:, j : t - k + 1 + j]
        starts[:, : t - k + 1] = hit
    phase = starts.to(torch.int64).cumsum(1).clamp_max(n_phases - 1)
    return torch.where(valid, phase, torch.full_like(phase, -1))


def phase_entropy(
    entropy: Tensor,
    mask: Tensor,
    phase_ids: Tensor | None = None,
    *,
    token_ids: Tensor | None = None,
    delimiter_ids: int | Sequence[int] | Tensor | None = None,
    n_phases: int = 2,
) -> PhaseEntropy:
    r"""Per-phase token-mean entropy of each sequence (PEAR's thinking / answer phases) and the phases' token counts.

    .. math::

        \bar H_{b,p} = \frac{\sum_t m_{b,t} [\phi_{b,t} = p] H_{b,t}}{\sum_t m_{b,t} [\phi_{b,t} = p]}

    Phases :math:`\phi` come from ``phase_ids`` or, when it is None, from ``token_ids`` and ``delimiter_ids`` through
    :func:`phase_ids_from_delimiter` (the delimiter belongs to the phase it opens; no delimiter: all phase 0).
    Aggregation is the token mean (PEAR's aggregation is not published; the mean keeps entropy apart from length,
    which the counts report).

    Args:
        entropy: ``(B, T)`` per-token entropies (float64 accumulation).
        mask: ``(B, T)`` valid tokens.
        phase_ids: ``(B, T)`` integer phase of each token: ``0 .. n_phases - 1``; a negative id puts the token in no
            phase (ignored). Ids ``>= n_phases`` on valid tokens are refused (one reduction reads them).
        token_ids: ``(B, T)`` token ids, with ``delimiter_ids``, when ``phase_ids`` is None.
        delimiter_ids: one id or a sequence of ids.
        n_phases: number of phases ``P >= 1``.

    Returns:
        :class:`PhaseEntropy` ``(mean (B, P), count (B, P))``; ``mean`` float32 (float64 for float64 input), no
        gradient. An **empty phase** (and every phase of an all-padding row) has mean **0** and count 0. A phase
        holding a valid NaN/Inf entropy has mean NaN (only that phase of that row; its count is unaffected).

    Raises:
        EntrotrainError: bad shapes or dtypes, neither ``phase_ids`` nor ``token_ids`` + ``delimiter_ids``, a phase
            id ``>= n_phases``, ``n_phases < 1``.
    """
    _tokens(entropy)
    valid = _mask(mask, entropy.shape)
    check_int(n_phases, "n_phases", low=1)
    if phase_ids is None:
        if token_ids is None or delimiter_ids is None:
            raise EntrotrainError(
                "phase_entropy needs phase_ids ((B, T) integer phases) or token_ids with delimiter_ids (the ids that "
                "end a phase, e.g. those of '</think>'); got neither."
            )
        check_tensor(token_ids, "token_ids", integer=True, ndim=2)
        check_shape(token_ids, entropy.shape, "token_ids", like="the entropy")
        phase_ids = phase_ids_from_delimiter(token_ids, valid, delimiter_ids, n_phases=n_phases)
    else:
        check_tensor(phase_ids, "phase_ids", integer=True, ndim=2, layout="(B, T)")
        check_shape(phase_ids, entropy.shape, "phase_ids", like="the entropy")
        if phase_ids.numel() and bool((valid & (phase_ids >= n_phases)).any()):
            top = int(phase_ids[valid].max())
            raise EntrotrainError(
                f"phase_ids holds phase {top} on a valid token, but n_phases={n_phases}: ids must be in "
                f"[0, {n_phases}) (negative = no phase); raise n_phases."
            )
    h = entropy.detach().double()
    in_phase = valid & (phase_ids >= 0)
    onehot = (phase_ids.clamp_min(0)[..., None] == torch.arange(n_phases, device=h.device)) & in_phase[..., None]
    finite = torch.isfinite(h)
    zero = torch.zeros((), dtype=torch.float64, device=h.device)
    sums = (torch.where(finite, h, zero)[..., None] * onehot).sum(1)
    count = onehot.to(torch.int64).sum(1)
    n_bad = (onehot & ~finite[..., None]).sum(1)
    mean = torch.where(count > 0, sums / count.clamp_min(1).double(), zero)
    mean = torch.where(n_bad > 0, torch.full_like(mean, float("nan")), mean)
    return PhaseEntropy(mean.to(_out_dtype(entropy.dtype)), count)


def pear_reward(
    entropy: Tensor,
    mask: Tensor,
    phase_ids: Tensor | None = None,
    *,
    token_ids: Tensor | None = None,
    delimiter_ids: int | Sequence[int] | Tensor | None = None,
    think_coef: float = 0.1,
    answer_coef: float = 0.0,
    max_penalty: float | None = None,
) -> Tensor:
    r"""The PEAR reward term (Huang, Lu, Zhang 2025, "PEAR: Phase Entropy Aware Reward", arXiv 2510.08026).

    .. math::

        s_b = -\operatorname{clip}\big(c_{think}\,\bar H_{b,0} + c_{ans}\,\bar H_{b,1},\; 0,\; P_{max}\big)

    to be **added to the scalar outcome reward** before the group normalisation (PEAR acts on the reward only:
    no change to the loss or the mask). :math:`\bar H_{b,p}` is the token-mean entropy of phase :math:`p` of
    response :math:`b` (:func:`phase_entropy`; phase 0 = thinking, before the delimiter; phase 1 = answer, from the
    delimiter on; an empty phase contributes 0).

    What is chosen here, and why: the paper's formula, weights, clipping and phase aggregation are **not published**
    (only "penalise excessive thinking-phase entropy, allow moderate answer-phase exploration"). So:

    - a linear penalty on the thinking-phase mean entropy with an explicit weight ``think_coef`` (default 0.1, small
      next to a 0/1 correctness reward so that accuracy dominates);
    - the answer phase is left **free** by default (``answer_coef = 0``: "allows exploration"); a positive
      ``answer_coef`` (``< think_coef`` to keep PEAR's asymmetry) penalises it too, a negative one rewards it;
    - token means, not sums: a sum would be a plain length penalty; the mean penalises uncertainty, and the
      group-relative advantage then prefers the more decisive (empirically shorter) responses of a prompt;
    - ``max_penalty`` optionally caps the magnitude (the penalty is clipped to ``[0, max_penalty]``; with a
      negative ``answer_coef`` the lower clip at 0 keeps the term a penalty).
    - the entropies should be those of the old-policy (rollout) pass at the rollout temperature (PEAR's
      ``old_log_prob["entropys"]``); the term is detached.

    Args:
        entropy, mask, phase_ids, token_ids, delimiter_ids: as :func:`phase_entropy` (two phases).
        think_coef: weight of the thinking-phase entropy, finite and >= 0.
        answer_coef: weight of the answer-phase entropy, finite (default 0).
        max_penalty: cap on the penalty, finite and > 0, or None.

    Returns:
        ``(B,)`` float32 (float64 for float64 input), ``<= 0`` wherever finite; 0 for an all-padding row. NaN for a
        row whose weighted phase holds a NaN/Inf entropy (only that row).

    Raises:
        EntrotrainError: as :func:`phase_entropy`, a bad coefficient, or coefficients so large that the reward of a
            row with finite entropies overflows the output dtype (e.g. ``think_coef=1e39`` in float32).
    """
    think_coef = check_real(think_coef, "think_coef", low=0.0)
    answer_coef = check_real(answer_coef, "answer_coef")
    max_penalty = check_real(max_penalty, "max_penalty", low=0.0, low_open=True, none_ok=True)
    ph = phase_entropy(entropy, mask, phase_ids, token_ids=token_ids, delimiter_ids=delimiter_ids, n_phases=2)
    m = ph.mean.double()
    think = m[:, 0] * think_coef if think_coef else torch.zeros_like(m[:, 0])
    answer = m[:, 1] * answer_coef if answer_coef else torch.zeros_like(m[:, 1])
    penalty = (think + answer).clamp_min(0.0)  # NaN stays NaN
    if max_penalty is not None:
        penalty = penalty.clamp_max(max_penalty)
    reward = (-penalty).to(ph.mean.dtype)
    # finite weighted phase means whose reward overflows (a coefficient far beyond order 1): refused, not -inf / NaN
    weighted = (torch.isfinite(m[:, 0]) | (think_coef == 0)) & (torch.isfinite(m[:, 1]) | (answer_coef == 0))
    if bool((weighted & ~torch.isfinite(reward)).any()):
        top = float(torch.where(torch.isfinite(m), m.abs(), 0.0).max())
        raise EntrotrainError(
            f"pear_reward overflows {reward.dtype}: think_coef={think_coef!r}, answer_coef={answer_coef!r} times "
            f"phase-mean entropies up to {top:.3g} nats. PEAR's penalty sits next to a 0/1 correctness reward: use "
            "coefficients of order 0.1, or cap the penalty with max_penalty=."
        )
    return reward


# --------------------------------------------------------------------------------------------- CANON


def sequence_entropy(entropy: Tensor, mask: Tensor) -> Tensor:
    r"""Token-mean entropy of each response, CANON's metric: verl's ``masked_mean(entropy, mask, axis=-1)``,
    :math:`\sum_t m_t H_t / (\sum_t m_t + 10^{-8})` (so a response with no valid token gets 0).

    Returns ``(B,)`` float32 (float64 for float64 input); NaN for a row holding a valid NaN/Inf entropy.
    """
    _tokens(entropy)
    valid = _mask(mask, entropy.shape)
    h = entropy.detach().double()
    zero = torch.zeros((), dtype=torch.float64, device=h.device)
    total = torch.where(valid, h, zero).sum(1)
    mean = total / (valid.sum(1).double() + 1e-8)
    bad = (valid & ~torch.isfinite(h)).any(1)  # a valid Inf gives NaN too, as in every other function here
    return torch.where(bad, torch.full_like(mean, float("nan")), mean).to(_out_dtype(entropy.dtype))


def canon_split(metric: Tensor, group_size: int) -> Tensor:
    r"""CANON's regrouping: ``(B,)`` bool, True = the response is in its group's *high* group :math:`C^+`.

    Per group of ``group_size`` consecutive responses: stable ascending sort of ``metric`` (ties keep batch order),
    sorted ranks ``>= G // 2`` are high (the median of an odd group is high; ``G = 1``: high). A NaN metric sorts
    above every number.

    Raises:
        EntrotrainError: ``metric`` not a real 1-D tensor, its length not a multiple of ``group_size >= 1``.
    """
    check_tensor(metric, "metric", ndim=1, layout="(B,)")
    if metric.is_complex():
        raise EntrotrainError(f"metric must be real, got dtype {metric.dtype}.")
    check_int(group_size, "group_size", low=1)
    if metric.numel() % group_size:
        raise EntrotrainError(
            f"metric has {metric.numel()} responses, not a multiple of group_size={group_size}; give every prompt "
            "group_size adjacent responses."
        )
    m = metric.detach().double().reshape(-1, group_size)
    order = torch.sort(m, dim=1, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(group_size, device=order.device).expand_as(order).contiguous())
    return (rank >= group_size // 2).reshape(-1)


def canon_advantage(
    rewards: Tensor,
    metric: Tensor,
    group_size: int,
    *,
    lam: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.0,
    variant: str = "entropy",
    length_norm: float = 1.0,
) -> Tensor:
    r"""CANON's conditional advantage (Chen et al. 2025, arXiv 2509.23962; ``biuboomc/CANON``'s ``core_algos``).

    Per group (``group_size`` consecutive responses of one prompt): sort by ``metric`` ascending with a **stable**
    sort (ties keep batch order, as Python's ``sorted``), ``mid = G // 2``; sorted ranks ``< mid`` form the low group
    :math:`C^-`, ranks ``>= mid`` the high group :math:`C^+` (for odd ``G`` **the median goes to the high group**).
    :math:`\mu^\pm` are the groups' mean rewards. With :math:`\lambda` = ``lam``, :math:`\alpha`, :math:`\beta`,
    :math:`L` = ``length_norm``:

    ``variant="entropy"`` (``compute_dr_entropy_per_token_group_outcome_advantage``; metric = token-mean entropy,
    :func:`sequence_entropy`):

    .. math::

        A^+ = [\lambda (r - \alpha\mu^- + \beta) + (1-\lambda)(r - \mu^+)] / L, \qquad
        A^- = [\lambda (\alpha r - \mu^+ - \beta) + (1-\lambda)(r - \mu^-)] / L

    ``variant="length"`` (``compute_dr_length_on_mean_group_outcome_advantage``; metric = response length): the
    :math:`\alpha` placement is **mirrored**:
    :math:`A^+ = [\lambda(\alpha r - \mu^- + \beta) + (1-\lambda)(r - \mu^+)]/L`,
    :math:`A^- = [\lambda(r - \alpha\mu^+ - \beta) + (1-\lambda)(r - \mu^-)]/L`.

    The :math:`\lambda` term is the inter-group advantage (against the *other* group's mean), the :math:`1-\lambda`
    term the intra-group one. No standard-deviation normalisation. Defaults are the code's (``alpha=1``,
    ``lam=1``: pure inter-group, ``beta=0``); :math:`L` is ``max_response_length`` under verl's
    ``seq-mean-token-sum`` (8192 in CANON's scripts), 1 otherwise. With :math:`\lambda = 0.5, \alpha = 1,
    \beta = 0` and even ``G`` this is Dr. GRPO's :math:`r - \bar r`. **G = 1**: :math:`\mu^\pm = 0` and the
    response is in the high group, :math:`A = (r + \lambda\beta)/L` (nonzero, as the code; not GRPO's 0).
    All rewards equal: :math:`A = 0` only when :math:`\alpha = 1, \beta = 0`.

    Args:
        rewards: ``(B,)`` scalar outcome rewards, ``B`` a multiple of ``group_size`` (one prompt's responses adjacent).
        metric: ``(B,)`` the per-response metric the groups split on.
        group_size: responses per prompt ``G >= 1``.
        lam, alpha, beta: finite numbers.
        variant: ``"entropy"`` or ``"length"`` (the α placement).
        length_norm: the divisor :math:`L`, finite and > 0.

    Returns:
        ``(B,)`` float32 (float64 for float64 rewards), computed in float64, no gradient; ``B = 0`` gives an empty
        tensor. A NaN/Inf reward makes its group's advantages non-finite (the group means are shared; other groups
        are unaffected); a NaN metric sorts above every number (``torch.sort``), so it lands in the high group.

    Raises:
        EntrotrainError: ``rewards`` / ``metric`` not real 1-D tensors of one length, ``B`` not a multiple of
            ``group_size``, a bad coefficient or ``variant``, or coefficients (or rewards) so large that a group of
            finite rewards gets a non-finite advantage (e.g. ``lam=1e300``: inf, or NaN from inf - inf).
    """
    check_tensor(rewards, "rewards", ndim=1, layout="(B,)")
    check_tensor(metric, "metric", ndim=1, layout="(B,)")
    for name, x in (("rewards", rewards), ("metric", metric)):
        if x.is_complex():
            raise EntrotrainError(f"{name} must be real, got dtype {x.dtype}.")
    check_shape(metric, rewards.shape, "metric", like="one value per response, like the rewards")
    check_int(group_size, "group_size", low=1)
    if rewards.numel() % group_size:
        raise EntrotrainError(
            f"rewards has {rewards.numel()} responses, not a multiple of group_size={group_size}; give every prompt "
            "group_size adjacent responses."
        )
    lam = check_real(lam, "lam")
    alpha = check_real(alpha, "alpha")
    beta = check_real(beta, "beta")
    length_norm = check_real(length_norm, "length_norm", low=0.0, low_open=True)
    check_choice(variant, "variant", CANON_VARIANTS)
    out_dtype = _out_dtype(rewards.dtype) if rewards.is_floating_point() else torch.float32
    g = group_size
    r = rewards.detach().double().reshape(-1, g)
    mid = g // 2
    high = canon_split(metric, g).reshape(-1, g)
    zero = torch.zeros((), dtype=torch.float64, device=r.device)
    if g == 1:  # the code: a single response has mu+ = mu- = 0
        mu_hi = mu_lo = torch.zeros(r.shape[0], 1, dtype=torch.float64, device=r.device)
    else:
        mu_hi = torch.where(high, r, zero).sum(1, keepdim=True) / (g - mid)
        mu_lo = torch.where(~high, r, zero).sum(1, keepdim=True) / mid
    if variant == "entropy":
        a_hi = lam * (r - alpha * mu_lo + beta) + (1 - lam) * (r - mu_hi)
        a_lo = lam * (alpha * r - mu_hi - beta) + (1 - lam) * (r - mu_lo)
    else:
        a_hi = lam * (alpha * r - mu_lo + beta) + (1 - lam) * (r - mu_hi)
        a_lo = lam * (r - alpha * mu_hi - beta) + (1 - lam) * (r - mu_lo)
    adv = (torch.where(high, a_hi, a_lo) / length_norm).to(out_dtype)
    # a group of finite rewards whose advantage overflows (coefficients far beyond order 1): refused, not inf / NaN
    if bool((torch.isfinite(r).all(1, keepdim=True) & ~torch.isfinite(adv)).any()):
        top = float(torch.where(torch.isfinite(r), r.abs(), zero).max())
        raise EntrotrainError(
            f"canon_advantage overflows {out_dtype} on finite rewards (max |r| = {top:.3g}) with lam={lam!r}, "
            f"alpha={alpha!r}, beta={beta!r}, length_norm={length_norm!r}: CANON's coefficients are of order 1 "
            "(lam in [0, 1], alpha = 1, beta = 0, length_norm = max_response_length or 1); scale them (or the "
            "rewards) down."
        )
    return adv.reshape(-1)
