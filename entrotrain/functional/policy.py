r"""Per-token statistics of an RL policy and the loss aggregation of PPO/GRPO trainers.

Conventions (shapes): ``logits (..., V)``, per-token tensors ``(B, T)`` (sequences × response tokens),
``mask (B, T)`` (True/1 = a valid response token), advantages ``(B, T)`` or ``(B,)`` (broadcast over tokens).

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


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise EntrotrainError(f"temperature must be > 0, got {temperature!r}.")


# --------------------------------------------------------------------------------------------- token statistics


def token_entropy(
    logits: Tensor, mask: Tensor | None = None, *, temperature: float = 1.0, impl: str = "auto"
) -> Tensor:
    r"""Per-token entropy (nats) of ``softmax(logits / temperature)``.

    Args:
        logits: ``(..., V)`` any floating dtype.
        mask: optional ``(...)`` token mask; masked tokens get entropy 0 (and zero gradient).
        temperature: the sampling temperature :math:`T`; say which one you log (1 or the rollout's).
        impl: ``"auto"``, ``"torch"`` or ``"triton"``, as :func:`~entrotrain.functional.entropy_from_logits`.

    Returns:
        ``(...)`` float32 (float64 for float64 input), differentiable with
        :math:`\partial H/\partial z_j = -p_j (z_j/T - E_p[z/T]) / T`. Memory beyond the input: one chunk of rows.
    """
    _check_temperature(temperature)
    h = entropy_from_logits(logits, temperature=temperature, impl=impl)
    if mask is not None:
        if mask.shape != h.shape:
            raise EntrotrainError(
                f"mask of shape {tuple(mask.shape)} must match the logits' token shape {tuple(h.shape)}."
            )
        h = torch.where(mask.bool(), h, torch.zeros((), dtype=h.dtype, device=h.device))
    return h


class _ChunkedLogprobs(torch.autograd.Function):
    """``log softmax(z/T)[label]`` per row, chunked over rows; backward ``(onehot - p) / T`` recomputed per chunk.

    Saves only the input and the labels; each chunk goes through the fused ``log_softmax`` / ``softmax`` kernels.
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
        safe = labels.clamp_min(0)  # negative = ignored; ids >= V fail in gather, never silently clamped
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            z = _ChunkedLogprobs._scaled(logits, start, stop, acc, temperature)
            out[start:stop] = torch.log_softmax(z, dim=-1).gather(-1, safe[start:stop, None]).squeeze(-1)
            del z  # free this chunk before the next one is made
        ctx.save_for_backward(logits, safe)
        ctx.rows, ctx.temperature, ctx.acc = rows, temperature, acc
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        logits, safe = ctx.saved_tensors
        n, _ = logits.shape
        grad_logits = torch.empty_like(logits)
        g = grad.to(ctx.acc)
        if ctx.temperature != 1.0:
            g = g / ctx.temperature  # d(z/T)/dz
        for start in range(0, n, ctx.rows):
            stop = min(start + ctx.rows, n)
            z = _ChunkedLogprobs._scaled(logits, start, stop, ctx.acc, ctx.temperature)
            gc = g[start:stop, None]
            d = torch.softmax(z, dim=-1).mul_(-gc)
            d.scatter_add_(-1, safe[start:stop, None], gc)
            grad_logits[start:stop] = d
            del z, d  # free this chunk before the next one is made
        return grad_logits, None, None, None


def token_logprobs(logits: Tensor, labels: Tensor, *, temperature: float = 1.0) -> Tensor:
    r"""Log-probability of ``labels`` under ``softmax(logits / temperature)``: :math:`z_y/T - \operatorname{lse}(z/T)`.

    Args:
        logits: ``(..., V)`` any floating dtype (computed in float32 per chunk; never a full float32 copy).
        labels: ``(...)`` integer token ids in ``[0, V)``; negative ids (e.g. ``-100`` padding) give 0.
        temperature: :math:`T > 0`.

    Returns:
        ``(...)`` float32 (float64 for float64 input), differentiable (gradient ``(onehot - p)/T``).
    """
    _check_temperature(temperature)
    if logits.shape[:-1] != labels.shape:
        raise EntrotrainError(
            f"labels of shape {tuple(labels.shape)} must match logits {tuple(logits.shape)} without the last dim."
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise EntrotrainError(f"labels must be an integer tensor, got {labels.dtype}; use labels.long().")
    v = logits.shape[-1]
    rows = logits.reshape(-1, v)
    lab = labels.reshape(-1).long()
    rows_per_chunk = max(1, (DEFAULT_CHUNK_ELEMENTS // 2) // max(v, 1))
    out = _ChunkedLogprobs.apply(rows, lab, rows_per_chunk, float(temperature))
    out = torch.where(lab >= 0, out, torch.zeros((), dtype=out.dtype, device=out.device))
    return out.reshape(labels.shape)


# --------------------------------------------------------------------------------------------- aggregation


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype) if mask.dtype == torch.bool else mask.to(like.dtype)


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
    - ``seq-mean-token-sum-norm`` (Dr. GRPO): :math:`\sum_{b,t} l m / L \cdot d` (:math:`L` = ``max_length`` or ``T``).

    :math:`N_{seq}` = ``num_sequences`` or the number of sequences with at least one valid token (fully masked
    sequences are excluded, as in current verl); :math:`d` = ``dp_size``. Pass the *global* ``num_tokens`` /
    ``num_sequences`` of the mini-batch and ``dp_size`` = world size so that micro-batches and DDP ranks (whose
    gradients DDP averages) reproduce the loss of the whole batch. Masked entries never contribute, even if they
    hold ``inf``/``nan``.

    Returns:
        A scalar in ``values``' dtype.
    """
    if values.dim() != 2 or mask.shape != values.shape:
        raise EntrotrainError(
            f"aggregate_loss needs values and mask of the same (B, T) shape, got {tuple(values.shape)} and "
            f"{tuple(mask.shape)}."
        )
    m = _float_mask(mask, values)
    masked = torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device)) * m
    if mode == "token-mean":
        den = m.sum() if num_tokens is None else num_tokens
        return masked.sum() / den * dp_size
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean"):
        seq = masked.sum(dim=-1)
        counts = m.sum(dim=-1)
        if mode == "seq-mean-token-mean":
            seq = seq / (counts + 1e-8)
        has = (counts > 0).to(values.dtype)
        den = has.sum() if num_sequences is None else num_sequences
        return (seq * has).sum() / den * dp_size
    if mode == "seq-mean-token-sum-norm":
        length = values.shape[-1] if max_length is None else max_length
        return masked.sum(dim=-1).sum() / length * dp_size
    raise EntrotrainError(f"mode must be one of {AGG_MODES}, got {mode!r}.")


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
    if advantages.dim() == 1:
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


def covariance_sums(logprobs: Tensor, advantages: Tensor, mask: Tensor) -> CovarianceSums:
    """:class:`CovarianceSums` of one batch (float64 sums, detached)."""
    a = _broadcast_adv(advantages, logprobs).detach().double()
    valid = mask.bool()
    zero = torch.zeros((), dtype=torch.float64, device=logprobs.device)
    return CovarianceSums(
        torch.where(valid, logprobs.detach().double(), zero).sum(),
        torch.where(valid, a, zero).sum(),
        valid.sum().double(),
    )


def policy_covariance(
    logprobs: Tensor, advantages: Tensor, mask: Tensor, *, sums: CovarianceSums | None = None
) -> Tensor:
    r"""Token covariance :math:`\mathrm{Cov}_i = (\log\pi_i - \overline{\log\pi})(A_i - \bar A)` (Cui et al. 2025).

    Means over the valid tokens of this batch, or from ``sums`` (e.g. all-reduced across ranks: global mode).
    Its mean over tokens predicts the entropy change :math:`\Delta H \approx -\eta\,\mathrm{Cov}`.

    Args:
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens (detached here).
        advantages: ``(B, T)`` or ``(B,)``.
        mask: ``(B, T)`` valid tokens.
        sums: optional precomputed :class:`CovarianceSums` fixing the means.

    Returns:
        ``(B, T)`` in ``logprobs``' dtype, 0 on masked tokens; no gradient.
    """
    if sums is None:
        sums = covariance_sums(logprobs, advantages, mask)
    mean_l, mean_a = sums.means()
    a = _broadcast_adv(advantages, logprobs).detach()
    cov = (logprobs.detach().double() - mean_l) * (a.double() - mean_a)
    return torch.where(mask.bool(), cov, torch.zeros_like(cov)).to(logprobs.dtype)


# --------------------------------------------------------------------------------------------- token selection


def quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` of a 1-D tensor (linear interpolation) via ``kthvalue``: no 2^24 size limit
    (pytorch#64947). NaN for an empty tensor."""
    n = values.numel()
    if n == 0:
        return torch.full((), float("nan"), dtype=values.dtype, device=values.device)
    pos = q * (n - 1)
    lo = int(pos)
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
    ``get_high_entropy_mask``) of the valid tokens' entropies, computed with ``kthvalue`` (no 2^24 limit). Under
    ``torch.distributed`` the valid entropies of every rank are gathered first (global quantile, as TRL).

    Returns:
        Boolean tensor shaped like ``entropy``: ``entropy >= tau & mask``. All False when no token is valid.
    """
    if not 0 < top_fraction <= 1:
        raise EntrotrainError(f"top_fraction must be in (0, 1], got {top_fraction!r}.")
    valid = mask.bool()
    vals = entropy.detach()[valid].float()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from entrotrain.functional._dist import all_gather_varlen  # noqa: PLC0415

        vals = all_gather_varlen(vals)
    if vals.numel() == 0:
        return torch.zeros_like(valid)
    tau = quantile(vals, 1.0 - top_fraction)
    return (entropy.detach() >= tau.to(entropy.dtype)) & valid


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
    exp mode before masking; callers multiply by the mask through :func:`aggregate_loss`).
    """
    with torch.no_grad():
        a = _broadcast_adv(advantages, logprobs)
        x = torch.clamp(torch.exp(logprobs), 1e-8, 1 - 1e-8)
        old_p = torch.clamp(torch.exp(old_logprobs), 1e-8, 1.0)
        omega = (a / old_p) * x * (1 - x) * (torch.log(x) + entropy)
        omega = omega.abs()
        omega = torch.where(torch.isfinite(omega), omega, torch.zeros_like(omega))
        valid = mask.bool()
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
        w = w_max - (omega - o_min) * (w_max - w_min) / span
        return torch.clamp(w, min=w_min, max=w_max)
