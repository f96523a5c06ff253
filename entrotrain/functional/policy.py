r"""Per-token statistics of an RL policy and the loss aggregation of PPO/GRPO trainers.

Conventions (shapes): ``logits (..., V)``, per-token tensors ``(B, T)`` (sequences × response tokens),
``mask (B, T)`` (True/1 = a valid response token), advantages ``(B, T)`` or ``(B,)`` (broadcast over tokens).

Token masks: ``bool`` (True = valid), integer 0/1 or floating 0/1 (verl's float ``response_mask``); other values
are refused with the fix (the check reads the values, one small reduction; pass ``bool`` masks where that matters).
:func:`aggregate_loss`, on the loss's hot path, does not read the values of a floating mask: there a float mask
weighs each token by its value, as verl's ``agg_loss`` does. Every mask must have the shape of the tokens.

Contract: bad arguments raise :class:`~entrotrain.errors.EntrotrainError` naming the argument, what was received
and the fix; empty or all-masked input gives the documented finite value (a loss of 0 with zero gradient); a NaN/Inf
*token* gives a non-finite value only where it sits (batch statistics are taken over the finite valid tokens).

- :func:`token_entropy`: :math:`H_i = \operatorname{lse}(z_i/T) - \sum_j \mathrm{softmax}(z_i/T)_j z_{ij}/T`, per
  token, float32, chunked over rows (the temperature is applied inside the chunk: no scaled copy of the logits).
- :func:`token_logprobs`: :math:`\log \pi(y_i) = z_{i,y_i}/T - \operatorname{lse}(z_i/T)`, chunked, differentiable.
- :func:`aggregate_loss`: verl's ``agg_loss`` (``token-mean``, ``seq-mean-token-sum``, ``seq-mean-token-mean``,
  ``seq-mean-token-sum-norm``), with optional global denominators.
- :func:`policy_covariance`: the token covariance of Cui et al. 2025 (arXiv 2505.22617),
  :math:`\mathrm{Cov}_i = (\log\pi_i - \overline{\log\pi})(A_i - \bar A)` over valid tokens.
- :func:`high_entropy_mask`: the "80/20" high-entropy-minority mask of Wang et al. 2025 (arXiv 2506.01939).
- :func:`steer_weights`: STEER's per-token weights (Hao et al. 2025, arXiv 2510.10150).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from entrotrain._validation import check_choice, check_int, check_real, check_shape, check_tensor, token_mask
from entrotrain.errors import EntrotrainError
from entrotrain.functional.entropy import DEFAULT_CHUNK_ELEMENTS, entropy_from_logits

__all__ = [
    "AGG_MODES",
    "CovarianceSums",
    "TokenStats",
    "aggregate_loss",
    "covariance_sums",
    "high_entropy_mask",
    "policy_covariance",
    "quantile",
    "steer_weights",
    "token_entropy",
    "token_logprobs",
]

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


class TokenStats(NamedTuple):
    """Per-token ``entropy (N,)`` and ``logprobs (N,)`` (``None`` when no labels were given), float32."""

    entropy: Tensor
    logprobs: Tensor | None


def _check_temperature(temperature: float) -> float:
    return check_real(temperature, "temperature", low=0.0, low_open=True)


def _token_mask(mask: Tensor, shape: torch.Size | tuple[int, ...], name: str = "mask", *, like: str = "") -> Tensor:
    """A token mask as bool through the one rule :func:`~entrotrain._validation.token_mask`: bool as is, integer or
    floating 0/1 (values checked: one small reduction, for non-bool masks only); shape exactly ``shape``."""
    return token_mask(mask, shape, name, like=like or "the tokens")


def _loss_mask(mask: Tensor, shape: torch.Size, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(valid, weight)`` of a loss mask without reading its values: bool / integer 0/1 / float weights."""
    check_tensor(mask, "mask")
    check_shape(mask, shape, "mask", like="values, (B, T)")
    if mask.is_complex():
        raise EntrotrainError(f"mask must be bool, integer 0/1 or float 0/1, got dtype {mask.dtype}.")
    valid = mask if mask.dtype == torch.bool else mask != 0
    return valid, mask.to(dtype)


# --------------------------------------------------------------------------------------------- token statistics


def token_entropy(
    logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0, impl: str = "auto"
) -> Tensor:
    r"""Per-token entropy (nats) of ``softmax(logits / temperature)``.

    Args:
        logits: ``(..., V)`` any floating dtype.
        mask: optional ``(...)`` token mask (bool, or 0/1 integer / float; True = valid); masked tokens get
            entropy 0 (and zero gradient).
        temperature: the sampling temperature :math:`T`, finite and > 0; say which one you log (1 or the
            rollout's).
        impl: ``"auto"``, ``"torch"`` or ``"triton"``, as :func:`~entrotrain.functional.entropy_from_logits`.

    Returns:
        ``(...)`` float32 (float64 for float64 input), differentiable with
        :math:`\partial H/\partial z_j = -p_j (z_j/T - E_p[z/T]) / T`. Memory beyond the input: one chunk of rows.
        A token whose logits hold NaN/+Inf gets NaN (only that token); ``V = 0`` gives 0.

    Raises:
        EntrotrainError: ``logits`` not floating or a scalar, a bad ``temperature``, a mask that is not 0/1 or not
            shaped like the tokens, an unknown ``impl``.
    """
    temperature = _check_temperature(temperature)
    check_tensor(logits, "logits", floating=True, min_ndim=1, layout="(..., V)")
    if mask is not None:
        mask = _token_mask(mask, logits.shape[:-1], like="the logits without the last dim")
    h = entropy_from_logits(logits, temperature=temperature, impl=impl)
    if mask is not None:
        h = torch.where(mask, h, torch.zeros((), dtype=h.dtype, device=h.device))
    return h


class _ChunkedLogprobs(torch.autograd.Function):
    """``log softmax(z/T)[label]`` per row, chunked over rows; backward ``(onehot - p) / T`` recomputed per chunk.

    Saves only the input and the labels; each chunk goes through the fused ``log_softmax`` / ``softmax`` kernels.
    Labels are clamped into ``[0, V)`` for the gather (the caller checked them, or masks what is out of range).
    Backward: a row with a negative label gets zero gradient whatever its logits (``softmax`` of a NaN/Inf or
    all ``-inf`` row is NaN, and NaN times a zero upstream gradient is NaN); a row whose logits are all ``-inf`` has
    no distribution: ``p := 0`` there (as :func:`token_entropy` and the fused head), so its gradient is ``onehot/T``
    times the upstream gradient.
    """

    @staticmethod
    def _scaled(logits: Tensor, start: int, stop: int, acc: torch.dtype, temperature: float) -> Tensor:
        chunk = logits[start:stop]
        z = chunk.to(acc)
        if temperature == 1.0:
            return z
        return z.div_(temperature) if z.dtype != chunk.dtype else z / temperature  # in place on an upcast copy

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, rows: int, temperature: float) -> Tensor:  # type: ignore[override]
        n, _ = logits.shape
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        out = torch.empty(n, dtype=acc, device=logits.device)
        safe = labels.clamp(0, logits.shape[1] - 1)  # negative = ignored; ids >= V: checked or masked by the caller
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            z = _ChunkedLogprobs._scaled(logits, start, stop, acc, temperature)
            out[start:stop] = torch.log_softmax(z, dim=-1).gather(-1, safe[start:stop, None]).squeeze(-1)
            del z  # free this chunk before the next one is made
        ctx.save_for_backward(logits, labels, out)
        ctx.rows, ctx.temperature, ctx.acc = rows, temperature, acc
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        logits, labels, out = ctx.saved_tensors
        n, _ = logits.shape
        safe = labels.clamp(0, logits.shape[1] - 1)  # as in forward
        grad_logits = torch.empty_like(logits)
        g = grad.to(ctx.acc)
        if ctx.temperature != 1.0:
            g = g / ctx.temperature  # d(z/T)/dz
        # Only a row whose softmax is NaN (all -inf, or holding NaN / +Inf: exactly the rows whose log-prob is NaN)
        # needs p := 0; on the others p = 0 changes no bit (a padding row's upstream gradient is +0: p · -0 = 0 · -0).
        # On CPU one host read of those rows spares two passes over every chunk (amax, masked_fill); on an
        # accelerator, or while dynamo traces, every chunk takes them (no sync).
        host = logits.device.type == "cpu" and not torch.compiler.is_compiling()
        nan_rows = out.isnan() if host else None
        for start in range(0, n, ctx.rows):
            stop = min(start + ctx.rows, n)
            z = _ChunkedLogprobs._scaled(logits, start, stop, ctx.acc, ctx.temperature)
            gc = g[start:stop, None]
            # softmax straight into the gradient's rows when the dtypes agree (no chunk-sized copy)
            direct = grad_logits.dtype == z.dtype
            d = grad_logits[start:stop] if direct else torch.empty_like(z)
            torch.softmax(z, dim=-1, out=d)
            if nan_rows is None or bool(nan_rows[start:stop].any()):
                # p := 0 on a padding row (zero gradient whatever its logits) and on a row of -inf logits only
                d.masked_fill_((labels[start:stop, None] < 0) | (z.amax(dim=-1, keepdim=True) == float("-inf")), 0.0)
            d.mul_(-gc)
            d.scatter_add_(-1, safe[start:stop, None], gc)  # gc = 0 on a padding row (token_logprobs' where)
            if not direct:
                grad_logits[start:stop] = d
            del z, d  # free this chunk before the next one is made
        return grad_logits, None, None, None


def token_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    r"""Log-probability of ``labels`` under ``softmax(logits / temperature)``: :math:`z_y/T - \operatorname{lse}(z/T)`.

    Args:
        logits: ``(..., V)`` any floating dtype (computed in float32 per chunk; never a full float32 copy).
        labels: ``(...)`` integer token ids in ``[0, V)``; negative ids (e.g. ``-100`` padding) give 0 with zero
            gradient, whatever the token's logits (NaN, Inf, all ``-inf``). In eager mode a label ``>= V`` raises
            (one max-reduction over the labels: a device sync, small next to the logits); inside ``torch.compile``
            that check is skipped (a host read breaks the graph) and such a token gets NaN, with zero gradient.
        temperature: :math:`T > 0`, finite.

    Returns:
        ``(...)`` float32 (float64 for float64 input), differentiable (gradient ``(onehot - p)/T``). A token whose
        logits hold NaN/+Inf gets NaN (only that token; NaN gradient in its row); a label whose logit alone is
        ``-inf`` gets ``-inf``. A token whose logits are all ``-inf`` has no distribution: log-prob NaN, and
        ``p := 0`` in the gradient, which is ``onehot/T`` times the upstream gradient (0 where that is 0), as
        :func:`~entrotrain.functional.linear_entropy_and_logprobs` gives (and :func:`token_entropy`: 0, zero
        gradient).

    Raises:
        EntrotrainError: ``logits`` not floating or a scalar, ``labels`` not integer or not shaped like the logits
            without their last dim, a label ``>= V`` (eager mode), a bad ``temperature``.
    """
    temperature = _check_temperature(temperature)
    check_tensor(logits, "logits", floating=True, min_ndim=1, layout="(..., V)")
    check_tensor(labels, "labels", integer=True)
    check_shape(labels, logits.shape[:-1], "labels", like="the logits without the last dim")
    v = logits.shape[-1]
    _check_labels(labels, v)
    lab = labels.reshape(-1).long()
    if v == 0:  # every label is negative (checked): ignored tokens, log-prob 0
        zero = (logits.sum(-1) * 0).to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        return _nan_out_of_range(zero.reshape(-1), lab, v).reshape(labels.shape)
    rows = logits.reshape(-1, v)
    rows_per_chunk = max(1, (DEFAULT_CHUNK_ELEMENTS // 2) // max(v, 1))
    out = _ChunkedLogprobs.apply(rows, lab, rows_per_chunk, float(temperature))
    out = torch.where(lab >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return _nan_out_of_range(out, lab, v).reshape(labels.shape)


def _check_labels(labels: Tensor, vocab_size: int, name: str = "labels") -> None:
    """Token ids are ``< vocab_size`` (negative ids mean "ignored"). One max-reduction over the labels (a
    device sync: the labels are small next to the logits); a raw ``gather`` error or a silent wrong row otherwise.

    Skipped while ``torch.compile`` traces (reading the max is a graph break): there the callers clamp the ids for
    the gather and mark the tokens out of range NaN (:func:`_nan_out_of_range`)."""
    if labels.numel() == 0 or torch.compiler.is_compiling():
        return
    top = int(labels.max())
    if top >= vocab_size:
        raise EntrotrainError(
            f"{name} holds token id {top}, out of range for a vocabulary of {vocab_size} (the logits' last dim): "
            f"ids must be in [0, {vocab_size}), negative ids (e.g. -100) mark ignored tokens. Check the tokenizer "
            "and the head's vocabulary size."
        )


def _nan_out_of_range(logprobs: Tensor, labels: Tensor, vocab_size: int) -> Tensor:
    """NaN (zero gradient) where ``labels >= vocab_size``, while ``torch.compile`` traces (where
    :func:`_check_labels` does not read the labels); ``logprobs`` unchanged in eager mode (the check raised)."""
    if not torch.compiler.is_compiling():
        return logprobs
    return torch.where(labels < vocab_size, logprobs, torch.full((), float("nan"), dtype=logprobs.dtype,
                                                                device=logprobs.device))


# --------------------------------------------------------------------------------------------- aggregation


def _check_denominator(value: Tensor | float | None, name: str) -> Tensor | float | None:
    """A loss denominator given by the caller: ``None``, a finite number >= 0, or a one-element tensor (not read:
    no device sync; it keeps its dtype)."""
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise EntrotrainError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}.")
        return value.reshape(())
    return check_real(value, name, low=0.0)


def _nonzero(den: Tensor | float) -> Tensor | float:
    """1 where the denominator is 0: the numerator is 0 too there (empty or all-masked input), so the loss is 0 with
    zero gradient, as verl's masked mean gives."""
    if isinstance(den, Tensor):
        return torch.where(den != 0, den, torch.ones((), dtype=den.dtype, device=den.device))
    return den if den != 0 else 1.0


def aggregate_loss(
    values: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    *,
    num_tokens: Tensor | float | None = None,
    num_sequences: Tensor | float | None = None,
    max_length: float | None = None,
    dp_size: int = 1,
) -> Tensor:
    r"""verl's ``agg_loss``: reduce per-token ``values (B, T)`` over the valid tokens of ``mask (B, T)``.

    - ``token-mean``: :math:`\sum_{b,t} l m / N_{tok} \cdot d` (:math:`N_{tok}` = ``num_tokens`` or ``mask.sum()``).
    - ``seq-mean-token-sum``: :math:`\sum_b (\sum_t l m) / N_{seq} \cdot d`.
    - ``seq-mean-token-mean``: :math:`\sum_b \frac{\sum_t l m}{\sum_t m} / N_{seq} \cdot d`.
    - ``seq-mean-token-sum-norm`` (Dr. GRPO, Liu et al. 2025, arXiv 2503.20783): ``seq-mean-token-sum`` over a
      constant length, :math:`\sum_b (\sum_t l m) / N_{seq} / L \cdot d` (:math:`L` = ``max_length`` or ``T``), as
      verl >= 0.9's ``agg_loss`` (``loss_scale_factor`` = ``max_length``) and TRL's ``loss_type="dr_grpo"``
      (:math:`N_{seq} L` = batch size × ``max_completion_length``). verl <= 0.8, and the Entropy-Mechanism fork of it,
      divided the token sum by :math:`L` alone (:math:`N_{seq}` times larger): pass ``num_sequences=1`` for that.

    :math:`N_{seq}` = ``num_sequences`` or the number of sequences with at least one valid token (fully masked
    sequences are excluded, as in current verl); :math:`d` = ``dp_size``. Pass the *global* ``num_tokens`` /
    ``num_sequences`` of the mini-batch and ``dp_size`` = world size so that micro-batches and DDP ranks (whose
    gradients DDP averages) reproduce the loss of the whole batch. Masked entries never contribute, even if they
    hold ``inf``/``nan``.

    ``mask``: bool (True = valid), integer 0/1, or floating (verl's float ``response_mask``: its values weigh the
    tokens and are not read here, so give 0/1 unless you mean weights).

    Empty or all-masked input (``B = 0``, ``T = 0``, or no valid token), or a denominator of 0: the loss is 0 with
    zero gradient (a zero denominator is replaced by 1 over a zero numerator), never NaN. A NaN/Inf on a valid token
    makes the loss non-finite (it is one number over every valid token).

    Returns:
        A scalar in ``values``' dtype.

    Raises:
        EntrotrainError: ``values`` not a floating ``(B, T)`` tensor, ``mask`` not of its shape, an unknown
            ``mode``, a negative or non-finite ``num_tokens`` / ``num_sequences`` / ``max_length`` number, a
            denominator tensor with more than one element, ``dp_size`` not an int >= 1.
    """
    check_tensor(values, "values", floating=True, ndim=2, layout="(B, T)")
    check_choice(mode, "mode", AGG_MODES)
    check_int(dp_size, "dp_size", low=1)
    num_tokens = _check_denominator(num_tokens, "num_tokens")
    num_sequences = _check_denominator(num_sequences, "num_sequences")
    max_length = _check_denominator(max_length, "max_length")
    valid, m = _loss_mask(mask, values.shape, values.dtype)
    masked = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)) * m
    if mode == "token-mean":
        den = _nonzero(m.sum() if num_tokens is None else num_tokens)
        return masked.sum() / den * dp_size
    seq = masked.sum(dim=-1)
    counts = m.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        seq = seq / (counts + 1e-8)
    has = (counts > 0).to(values.dtype)
    den = _nonzero(has.sum() if num_sequences is None else num_sequences)
    loss = (seq * has).sum() / den * dp_size
    if mode == "seq-mean-token-sum-norm":  # verl >= 0.9: seq-mean-token-sum, then / loss_scale_factor
        loss = loss / _nonzero(values.shape[-1] if max_length is None else max_length)
    return loss


# --------------------------------------------------------------------------------------------- covariance


class CovarianceSums(NamedTuple):
    """Sums that fix the covariance centring: ``sum_logp``, ``sum_adv`` and ``count`` over the valid tokens.

    Add them across micro-batches or ranks (``all_reduce``) for the global means; ``means()`` divides.
    """

    sum_logp: Tensor
    sum_adv: Tensor
    count: Tensor

    def means(self) -> tuple[Tensor, Tensor]:
        den = self.count.clamp_min(1)
        return self.sum_logp / den, self.sum_adv / den


def _broadcast_adv(advantages: Tensor, like: Tensor) -> Tensor:
    check_tensor(advantages, "advantages", floating=True)
    if advantages.dim() == 1 and like.dim() == 2:
        if advantages.shape[0] != like.shape[0]:
            raise EntrotrainError(
                f"advantages of shape {tuple(advantages.shape)} must have one value per sequence ({like.shape[0]})."
            )
        return advantages[:, None].expand_as(like)
    if advantages.shape != like.shape:
        raise EntrotrainError(
            f"advantages of shape {tuple(advantages.shape)} must be (B,) or match the tokens {tuple(like.shape)}."
        )
    return advantages


def _check_tokens(logprobs: Tensor, name: str = "logprobs") -> Tensor:
    return check_tensor(logprobs, name, floating=True, ndim=2, layout="(B, T)")


def covariance_sums(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> CovarianceSums:
    r""":class:`CovarianceSums` of one batch (float64 sums, detached) over the valid tokens whose log-prob and
    advantage are finite (a NaN/Inf token is left out of the means, so it cannot poison every other token's
    covariance; it keeps a non-finite :math:`\mathrm{Cov}_i` of its own). Empty or all-masked: zero sums, count 0.

    Raises:
        EntrotrainError: ``logprobs`` not floating ``(B, T)``, ``advantages`` not ``(B,)`` / ``(B, T)``, ``mask``
            not a 0/1 mask of the tokens' shape.
    """
    _check_tokens(logprobs)
    valid = _token_mask(mask, logprobs.shape)
    a = _broadcast_adv(advantages, logprobs).detach().double()
    lp = logprobs.detach().double()
    valid = valid & torch.isfinite(lp) & torch.isfinite(a)
    zero = torch.zeros((), dtype=torch.float64, device=logprobs.device)
    return CovarianceSums(
        torch.where(valid, lp, zero).sum(),
        torch.where(valid, a, zero).sum(),
        valid.sum().double(),
    )


def policy_covariance(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, *, sums: CovarianceSums | None = None
) -> Tensor:
    r"""Token covariance :math:`\mathrm{Cov}_i = (\log\pi_i - \overline{\log\pi})(A_i - \bar A)` (Cui et al. 2025).

    Means over the valid, finite tokens of this batch, or from ``sums`` (e.g. all-reduced across ranks: global
    mode). Its mean over tokens predicts the entropy change :math:`\Delta H \approx -\eta\,\mathrm{Cov}`.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens (detached here).
        advantages: ``(B, T)`` or ``(B,)``.
        mask: ``(B, T)`` valid tokens (bool, or 0/1 integer / float).
        sums: optional precomputed :class:`CovarianceSums` fixing the means.

    Returns:
        ``(B, T)`` in ``logprobs``' dtype, 0 on masked tokens; no gradient. Empty or all-masked input: all zeros.
        A valid token with a NaN/Inf log-prob or advantage gets a non-finite value; the others stay finite.

    Raises:
        EntrotrainError: as :func:`covariance_sums`, or ``sums`` not a :class:`CovarianceSums`.
    """
    _check_tokens(logprobs)
    valid = _token_mask(mask, logprobs.shape)
    if sums is None:
        sums = covariance_sums(logprobs, advantages, valid)
    elif not isinstance(sums, CovarianceSums):
        raise EntrotrainError(f"sums must be a CovarianceSums (from covariance_sums), got {type(sums).__name__}.")
    mean_l, mean_a = sums.means()
    a = _broadcast_adv(advantages, logprobs).detach()
    cov = (logprobs.detach().double() - mean_l) * (a.double() - mean_a)
    return torch.where(valid, cov, torch.zeros_like(cov)).to(logprobs.dtype)


# --------------------------------------------------------------------------------------------- token selection


def quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` of a 1-D tensor (linear interpolation) via ``kthvalue``: no 2^24 size limit
    (pytorch#64947).

    Args:
        values: 1-D real tensor with at least one element (NaN entries make the result unreliable: filter them).
        q: the quantile, a finite number in ``[0, 1]``.

    Returns:
        A 0-dim tensor in ``values``' dtype (floating input).

    Raises:
        EntrotrainError: ``values`` not 1-D, empty (a quantile of nothing is undefined: check ``numel()`` first),
            or ``q`` outside ``[0, 1]`` / not finite.
    """
    check_tensor(values, "values", ndim=1, layout="(n,)")
    q = check_real(q, "q", low=0.0, high=1.0)
    n = values.numel()
    if n == 0:
        raise EntrotrainError(
            "values is empty: the quantile of no value is undefined; check values.numel() > 0 before calling."
        )
    pos = q * (n - 1)
    lo = min(int(pos), n - 1)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(values, lo + 1).values
    if frac == 0 or hi == lo:
        return v_lo
    v_hi = torch.kthvalue(values, hi + 1).values
    return v_lo + (v_hi - v_lo) * frac


def high_entropy_mask(entropy: Tensor, mask: Tensor, top_fraction: float = 0.2) -> Tensor:
    r"""The high-entropy-minority ("80/20") mask of Wang et al. 2025: tokens with :math:`H \ge \tau`.

    :math:`\tau` is the ``1 - top_fraction`` quantile (linear interpolation, like ``torch.quantile`` and TRL's
    ``get_high_entropy_mask``) of the valid tokens' finite entropies, computed with ``kthvalue`` (no 2^24 limit);
    :math:`\tau` and the comparison are in float32 (float64 for float64 entropies), as TRL compares half-precision
    entropies.
    Under ``torch.distributed`` the valid entropies of every rank are gathered first (global quantile, as TRL).

    Args:
        entropy: per-token entropies, any shape, floating.
        mask: token mask of ``entropy``'s shape (bool, or 0/1 integer / float; True = valid).
        top_fraction: the share of tokens kept, a finite number in ``(0, 1]``.

    Returns:
        Boolean tensor shaped like ``entropy``: ``entropy >= tau & mask``. All False when no valid token has a
        finite entropy (empty or all-masked input). A NaN entropy is never selected and does not move ``tau``.

    Raises:
        EntrotrainError: ``entropy`` not floating, a bad or mis-shaped ``mask``, ``top_fraction`` outside ``(0, 1]``.
    """
    top_fraction = check_real(top_fraction, "top_fraction", low=0.0, high=1.0, low_open=True)
    check_tensor(entropy, "entropy", floating=True)
    valid = _token_mask(mask, entropy.shape, like="the entropy")
    # tau and the comparison in float32 (float64 for float64 entropies): tau rounded to a half dtype would select
    # tokens below the true tau (TRL compares in float32), and a float32 tau would merge distinct float64 entropies
    acc = torch.promote_types(entropy.dtype, torch.float32)
    return _at_or_above_quantile(entropy.detach().to(acc), valid, 1.0 - top_fraction)


def _at_or_above_quantile(h: Tensor, valid: Tensor, level: float) -> Tensor:
    r"""``(h >= tau) & valid``, :math:`\tau` the ``level`` :func:`quantile` of the finite ``h[valid]`` pooled over
    every rank under ``torch.distributed`` (a global selection); all False when there is none. ``h`` is compared in
    its own dtype (the caller's choice). The rule of :func:`high_entropy_mask` and
    :func:`~entrotrain.functional.token_shaping.high_window_entropy_mask`."""
    vals = h[valid & torch.isfinite(h)]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from entrotrain.functional._dist import all_gather_varlen  # noqa: PLC0415

        vals = all_gather_varlen(vals)
    if vals.numel() == 0:
        return torch.zeros_like(valid)
    return (h >= quantile(vals, level)) & valid


def steer_weights(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    entropy: Tensor,
    mask: Tensor,
    *,
    w_min: float = 0.8,
    w_max: float = 1.0,
    linear: bool = False,
) -> Tensor:
    r"""STEER's per-token weights (Hao et al. 2025, ``compute_token_weights``), no gradient.

    .. math::

        x = \mathrm{clamp}(e^{\log\pi}, 10^{-8}, 1 - 10^{-8}),\quad
        \Omega = \Big|\frac{A}{\mathrm{clamp}(e^{\log\pi_{old}}, 10^{-8}, 1)}\, x(1-x)(\ln x + H)\Big|

    (non-finite :math:`\Omega \to 0`; statistics over valid tokens). Exp mode:
    :math:`k = -\ln w_{min} / \max(\max\Omega, 0.02)`, :math:`w = \mathrm{clamp}(e^{-k\Omega}, w_{min}, 1)`.
    Linear mode: :math:`w = \mathrm{clamp}(w_{max} - (\Omega - \min\Omega)\frac{w_{max}-w_{min}}{\max\Omega -
    \min\Omega}, w_{min}, w_{max})`, the mid value :math:`(w_{min}+w_{max})/2` when :math:`\max = \min`.

    ``entropy`` is the token entropy from the old-policy pass. Returns ``(B, T)`` weights (1 on masked tokens in
    exp mode before masking; callers multiply by the mask through :func:`aggregate_loss`). Always finite, in
    ``[w_min, 1]`` (exp) or ``[w_min, w_max]`` (linear); all ones when no token is valid (empty or all-masked).

    Raises:
        EntrotrainError: ``logprobs`` not floating ``(B, T)``; ``old_logprobs`` / ``entropy`` / ``mask`` not of its
            shape; ``advantages`` not ``(B,)`` / ``(B, T)``; ``w_min`` not in ``(0, 1]`` (exp mode: :math:`\ln
            w_{min}` must be finite) or, in linear mode, not ``0 <= w_min <= w_max`` (finite).
    """
    _check_tokens(logprobs)
    for name, x in (("old_logprobs", old_logprobs), ("entropy", entropy)):
        check_tensor(x, name, floating=True)
        check_shape(x, logprobs.shape, name, like="the logprobs")
    valid = _token_mask(mask, logprobs.shape, like="the logprobs")
    if not isinstance(linear, bool):
        raise EntrotrainError(f"linear must be a bool, got {type(linear).__name__} {linear!r}.")
    if linear:
        w_min = check_real(w_min, "w_min", low=0.0)
        w_max = check_real(w_max, "w_max", low=w_min)
    else:
        w_min = check_real(w_min, "w_min", low=0.0, high=1.0, low_open=True)
    with torch.no_grad():
        a = _broadcast_adv(advantages, logprobs)
        x = torch.clamp(torch.exp(logprobs), 1e-8, 1 - 1e-8)
        old_p = torch.clamp(torch.exp(old_logprobs), 1e-8, 1.0)
        omega = (a / old_p) * (x * (1 - x) * (torch.log(x) + entropy))  # STEER's order of operations
        omega = omega.abs()
        omega = torch.where(torch.isfinite(omega), omega, torch.zeros_like(omega))
        if not bool(valid.any()):
            return torch.ones_like(omega)
        vals = omega[valid]
        o_max = vals.max()
        if not linear:
            k = -torch.log(torch.tensor(w_min, dtype=omega.dtype, device=omega.device)) / torch.clamp(
                o_max, min=0.02
            )
            return torch.clamp(torch.exp(-k * omega), min=w_min, max=1.0)
        o_min = vals.min()
        span = o_max - o_min
        if float(span) == 0.0:
            return torch.full_like(omega, (w_min + w_max) / 2)
        w = w_max - (omega - o_min) * ((w_max - w_min) / span)
        return torch.clamp(w, min=w_min, max=w_max)
