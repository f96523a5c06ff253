r"""Policy-gradient losses that control policy entropy: PPO/GRPO clip, Clip-Cov, KL-Cov, STEER, entropy bonus.

Every loss is an ``nn.Module`` with the same call::

    out = loss_fn(logprobs, old_logprobs, advantages, mask, entropy=None, step=None)
    out.loss.backward(); log(out.metrics)

``logprobs (B, T)`` (differentiable, current policy), ``old_logprobs (B, T)`` (behaviour policy, no gradient),
``advantages (B, T)`` or ``(B,)``, ``mask (B, T)`` (bool or 0/1), ``entropy (B, T)`` per-token entropy (needed by
:class:`EntropyBonus` — differentiable — and :class:`SteerLoss` — from the old-policy pass).
``forward`` returns :class:`PolicyLossOutput` ``(loss, metrics)``; metrics are detached scalars under explicit
names (``policy/clip_frac_low``, ``policy/clip_frac_high``, ``policy/ppo_kl``, ``policy/cov_selected``, ...), never
verl's overloaded ``pg_clipfrac``. Losses compose: ``PPOClipLoss() + EntropyBonus(0.01)``.

PPO terms, with :math:`r = e^{\log\pi - \log\pi_{old}}`:
:math:`\ell_1 = -A r`, :math:`\ell_2 = -A\,\mathrm{clip}(r, 1-\epsilon_{low}, 1+\epsilon_{high})`,
:math:`\ell = \max(\ell_1, \ell_2)`; dual clip (verl's ``clip_ratio_c`` = :math:`c`): for :math:`A < 0`,
:math:`\ell = \min(\ell, -A c)`.

Clip-Cov / KL-Cov (Cui et al. 2025, arXiv 2505.22617) select tokens by the covariance
:math:`\mathrm{Cov}_i = (\log\pi_i - \overline{\log\pi})(A_i - \bar A)`. Two modes:

- ``"micro_batch"``: verl's ``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov`` bit for bit: means
  and selection over this call's tokens only, at least one token selected (``max(1, int(r N))``), Clip-Cov's random
  pick through ``torch.randperm`` on the global RNG (``seed=None``) or on a generator seeded from ``(seed, rank,
  call counter)`` (the counter is saved in ``state_dict``: a resumed run continues the stream).
- ``"global"``: means and selection over the whole batch across DDP ranks (``all_reduce`` / ``all_gather`` when a
  process group is up): 2 ranks give the result of one process on the concatenated batch. The budget is the exact
  fraction ``floor(r N_global)`` (``min_selected`` adds a floor). Clip-Cov's random pick uses counter-based keys
  ``hash(seed, step, global token index)``, so it is independent of how the batch is split. The loss is
  aggregated with global denominators times the world size (DDP averages gradients), so the DDP-averaged gradient
  equals the single-process one. One host sync per call (the integer budget).

Contracts (DESIGN.md §8), shared by every loss here:

- **Inputs.** ``logprobs``, ``old_logprobs`` and ``entropy`` are floating ``(B, T)`` (``B`` or ``T`` may be 0),
  ``advantages`` floating ``(B,)`` or ``(B, T)``; ``mask`` is bool (True = valid token), integer 0/1 (1 = valid)
  or floating 0/1 (verl's ``response_mask``), by the policy code's one rule
  (:func:`~entrotrain._validation.token_mask`). Anything else — a wrong shape or dtype, a mask with other values,
  a bad constructor argument (a NaN ratio, ``cov_lb >= cov_ub``, a negative coefficient, an unknown mode) — raises
  :class:`~entrotrain.errors.EntrotrainError` naming the argument. Reading a non-bool mask's values is one host
  sync: Clip-Cov, KL-Cov and the adaptive entropy bonus in training, which sync anyway, read them for integer and
  floating masks; PPO-clip, STEER and a fixed entropy bonus, which never sync otherwise, read an integer mask's
  values only (as before) and take a floating one as ``mask != 0`` unread (pass a bool mask to skip every check).
- **Compute dtype.** float32 for fp16/bf16/fp32 inputs, float64 for fp64 (the loss and metrics come back in it).
- **Empty or all-masked input** (no valid token here, or on every rank for the global aggregations): the loss is
  exactly 0 with a zero gradient (verl's masked mean; a 0 denominator is replaced by 1, a positive one is used as
  is, so finite input stays bit-identical to verl). Every metric is then 0 (``policy/token_weight_min|max``: 1,
  no token down-weighted), never NaN.
- **Masked positions never leak.** They are replaced by 0 with ``torch.where`` before any arithmetic, so NaN/Inf
  there changes neither the loss nor the metrics nor the (zero) gradient at those positions. verl multiplies by
  the mask instead (its ``seq-mean-*`` modes give NaN when a masked entry is NaN/Inf); on finite input the two
  agree bit for bit. NaN/Inf at a *valid* position is data: the loss is then NaN/Inf, as verl's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from entrotrain._validation import (
    check_bool,
    check_choice,
    check_int,
    check_real,
    check_shape,
    check_tensor,
    token_mask,
)
from entrotrain.errors import EntrotrainError
from entrotrain.functional._dist import all_reduce_max, all_reduce_sum, world
from entrotrain.functional.policy import AGG_MODES, aggregate_loss, steer_weights
from entrotrain.regularizers.policy_selection import (
    call_seed,
    counter_uniform,
    global_index,
    global_topk_mask,
    rank_seed,
)

__all__ = [
    "ClipCovLoss",
    "EntropyBonus",
    "KLCovLoss",
    "PPOClipLoss",
    "PolicyLoss",
    "PolicyLossOutput",
    "PolicyLossSum",
    "SteerLoss",
]


class PolicyLossOutput(NamedTuple):
    """``loss``: scalar with the graph; ``metrics``: detached scalars by name (``policy/...``)."""

    loss: Tensor
    metrics: dict[str, Tensor]


# --------------------------------------------------------------------------------------------------- helpers


def _check_agg(agg: str) -> str:
    return check_choice(agg, "agg", AGG_MODES)


def _check_normaliser(agg: str, max_length: int | None, all_sequences: bool) -> tuple[int | None, bool]:
    """``max_length`` (an int >= 1, only with ``agg='seq-mean-token-sum-norm'``) and ``all_sequences`` (a bool)."""
    max_length = check_int(max_length, "max_length", low=1, none_ok=True)
    if max_length is not None and agg != "seq-mean-token-sum-norm":
        raise EntrotrainError(
            f"max_length is the constant length L of agg='seq-mean-token-sum-norm' (Dr. GRPO, TRL's dr_grpo: "
            f"max_completion_length), got max_length={max_length} with agg={agg!r}, which does not use it. Fix: "
            "agg='seq-mean-token-sum-norm', or leave max_length=None."
        )
    return max_length, check_bool(all_sequences, "all_sequences")


def _check_mode(mode: str) -> str:
    return check_choice(mode, "mode", ("global", "micro_batch"))


def _check_clip(clip_low: float, clip_high: float) -> tuple[float, float]:
    """PPO's clip range: ``clip_low`` in [0, 1] (the ratio's floor ``1 - clip_low`` stays >= 0), ``clip_high`` >= 0."""
    low = check_real(clip_low, "clip_low", low=0.0, high=1.0)
    high = check_real(clip_high, "clip_high", low=0.0)
    return low, high  # type: ignore[return-value]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (DESIGN §2: accumulate in float32 at least)."""
    return torch.promote_types(dtype, torch.float32)


def _token_mask(mask: Tensor, shape: torch.Size, name: str = "mask", *, check_floats: bool = True) -> Tensor:
    """The valid-token mask ``(B, T)`` as bool through the one rule :func:`~entrotrain._validation.token_mask`:
    bool (True = valid), integer 0/1 or floating 0/1 (verl's ``response_mask``), other values refused. The values
    of a non-bool mask are read (one host sync); ``check_floats=False`` (a loss whose call never syncs otherwise:
    PPO-clip, STEER, a fixed entropy bonus) leaves a floating mask's values unread, read as ``mask != 0``."""
    return token_mask(mask, shape, name, like="the logprobs", check_floats=check_floats)


def _check_entropy(entropy: Tensor | None, shape: torch.Size | None, who: str) -> Tensor:
    if entropy is None:
        raise EntrotrainError(
            f"{who} needs entropy= (the per-token entropy, (B, T) like the logprobs), got None; pass entropy=H."
        )
    check_tensor(entropy, "entropy", floating=True, ndim=2, layout="(batch, tokens)")
    if shape is not None:
        check_shape(entropy, shape, "entropy", like="the logprobs")
    return entropy


def _check_step(step: int | None) -> int | None:
    if isinstance(step, Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step.item())
    return check_int(step, "step", low=0, none_ok=True)


class _Batch(NamedTuple):
    """A validated batch in the compute dtype (>= float32); masked positions hold 0 in ``logp``, ``old`` and
    ``adv``, so NaN/Inf there never reaches a value or a gradient."""

    logp: Tensor
    old: Tensor
    adv: Tensor
    maskf: Tensor
    valid: Tensor


def _prepare(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, *, check_floats: bool = True
) -> _Batch:
    """Checks shapes and dtypes; returns the batch with masked positions zeroed (``torch.where``, not ``* 0``).

    ``logprobs`` / ``old_logprobs`` floating ``(B, T)``; ``advantages`` floating ``(B,)`` or ``(B, T)``; ``mask``
    per :func:`_token_mask` (``check_floats`` passed on). ``old`` and ``adv`` are detached. On finite input the
    valid positions are unchanged, so every value verl computes from them (micro-batch mode) is reproduced bit for bit.
    """
    check_tensor(logprobs, "logprobs", floating=True, ndim=2, layout="(batch, tokens)")
    shape = logprobs.shape
    check_tensor(old_logprobs, "old_logprobs", floating=True)
    check_shape(old_logprobs, shape, "old_logprobs", like="the logprobs")
    check_tensor(advantages, "advantages", floating=True, ndim=(1, 2), layout="(batch,) or (batch, tokens)")
    if advantages.dim() == 1:
        check_shape(advantages, shape[:1], "advantages", like="one per sequence of the logprobs")
        advantages = advantages[:, None].expand(shape)
    else:
        check_shape(advantages, shape, "advantages", like="the logprobs, or (B,) one per sequence")
    valid = _token_mask(mask, shape, check_floats=check_floats)
    cdtype = _compute_dtype(logprobs.dtype)
    zero = torch.zeros((), dtype=cdtype, device=logprobs.device)
    logp = torch.where(valid, logprobs.to(cdtype), zero)
    old = torch.where(valid, old_logprobs.detach().to(cdtype), zero)
    adv = torch.where(valid, advantages.detach().to(cdtype), zero)
    return _Batch(logp, old, adv, valid.to(cdtype), valid)


def _masked_mean(values: Tensor, maskf: Tensor) -> Tensor:
    """verl's ``masked_mean``: ``sum(where(m, v, 0) * m) / (sum(m) + 1e-8)`` (0 when nothing is valid)."""
    valid = torch.where(maskf.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))
    return (valid * maskf).sum() / (maskf.sum() + 1e-8)


def _masked_extreme(values: Tensor, keep: Tensor, largest: bool, empty: float = 0.0) -> Tensor:
    """``max`` (``largest``) or ``min`` of ``values`` over ``keep``; ``empty`` when nothing is kept (also for 0
    elements, where ``Tensor.max`` raises). No host sync."""
    fill = torch.full((1,), -torch.inf if largest else torch.inf, dtype=values.dtype, device=values.device)
    flat = torch.cat([torch.where(keep, values, fill[0]).reshape(-1), fill])
    ext = flat.max() if largest else flat.min()
    return torch.where(keep.any(), ext, torch.full((), empty, dtype=values.dtype, device=values.device))


def _ppo_terms(
    logp: Tensor, old: Tensor, adv: Tensor, clip_low: float, clip_high: float, log_ratio_clamp: float | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(log_ratio, ratio, l1, l2)`` of the clipped surrogate."""
    d = logp - old
    if log_ratio_clamp is not None:
        d = torch.clamp(d, min=-log_ratio_clamp, max=log_ratio_clamp)
    ratio = torch.exp(d)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    return d, ratio, l1, l2


def _ppo_metrics(d: Tensor, ratio: Tensor, adv: Tensor, maskf: Tensor, clip_low: float, clip_high: float) -> dict:
    with torch.no_grad():
        low = ((ratio < 1 - clip_low) & (adv < 0)).to(maskf.dtype)
        high = ((ratio > 1 + clip_high) & (adv > 0)).to(maskf.dtype)
        return {
            "policy/clip_frac_low": _masked_mean(low, maskf),
            "policy/clip_frac_high": _masked_mean(high, maskf),
            "policy/ppo_kl": _masked_mean(-d.detach(), maskf),
        }


# --------------------------------------------------------------------------------------------------- base


class PolicyLoss(nn.Module):
    """Base of the policy losses: the common ``forward`` signature and ``+`` composition."""

    def forward(  # type: ignore[override]
        self,
        logprobs: Tensor,
        old_logprobs: Tensor,
        advantages: Tensor,
        mask: Tensor,
        *,
        entropy: Tensor | None = None,
        step: int | None = None,
    ) -> PolicyLossOutput:
        raise NotImplementedError

    def __add__(self, other: PolicyLoss) -> PolicyLossSum:
        if not isinstance(other, PolicyLoss):
            return self._add_number(other)
        left = list(self.terms) if isinstance(self, PolicyLossSum) else [self]
        right = list(other.terms) if isinstance(other, PolicyLossSum) else [other]
        return PolicyLossSum(left + right)

    def __radd__(self, other: object) -> PolicyLossSum:
        return self._add_number(other)  # 0 + loss: Python's sum([a, b])

    def _add_number(self, other: object) -> PolicyLossSum:
        """``loss + 0`` / ``0 + loss`` (``sum([a, b])`` starts from 0); anything else raises."""
        if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
            return self if isinstance(self, PolicyLossSum) else PolicyLossSum([self])
        raise EntrotrainError(
            f"a PolicyLoss can only be added to another PolicyLoss (or 0, as in sum([a, b])), got "
            f"{type(other).__name__} {other!r}; compose losses, e.g. PPOClipLoss() + EntropyBonus(0.01), and add "
            "numbers to the computed loss: out.loss + x."
        )

    #: ``seq-mean-token-sum-norm``'s constant length :math:`L` (``None``: the padded width ``T``, the largest over
    #: ranks with ``global_agg``); set by the losses' ``max_length=``.
    max_length: int | None = None
    #: ``N_seq`` counts every row of the batch (TRL's ``grpo`` / ``dr_grpo``: ``B``), not only the rows with a valid
    #: token (verl's default); set by the losses' ``all_sequences=``.
    all_sequences: bool = False
    #: A ``token-mean`` denominator given from outside for one call (``None``: the loss's own count); set only
    #: inside :meth:`_token_mean_over`.
    _window_tokens: Tensor | None = None

    @contextmanager
    def _token_mean_over(self, num_tokens: Tensor) -> Iterator[None]:
        r"""Within the block, every ``token-mean`` aggregation of this loss and of its terms is
        :math:`\sum l m / D`, :math:`D` = ``num_tokens`` (a one-element tensor, used as is: no world-size factor,
        no collective, also under ``global_agg`` / ``mode="global"``); the other modes keep their own counts.

        Private: the TRL adapter's ``dapo`` / ``cispo`` / ``vespo`` window (:math:`D` = this process's share of the
        accumulation window's valid tokens over all processes, TRL's normaliser), which a micro-batch cannot count.
        """
        parts = [m for m in self.modules() if isinstance(m, PolicyLoss)]
        for part in parts:
            part._window_tokens = num_tokens
        try:
            yield
        finally:
            for part in parts:
                part._window_tokens = None

    def _aggregate(
        self, values: Tensor, maskf: Tensor, agg: str, global_agg: bool, *, token_sum_norm: bool = False
    ) -> Tensor:
        """``aggregate_loss`` with local denominators, or global ones × world size (DDP averages the gradients).

        A denominator of 0 (no valid token or sequence, here or on every rank) is replaced by 1, so an empty or
        all-masked batch gives exactly 0 with a zero gradient (verl's masked mean) instead of 0/0; a positive
        denominator is passed unchanged, so the result stays bit-identical to verl's ``agg_loss``.
        ``token_sum_norm``: ``seq-mean-token-sum-norm`` as verl <= 0.8 (the token sum over ``T``, no ``N_seq``).
        ``N_seq`` is the number of rows with a valid token, or every row (``B``) with :attr:`all_sequences`; ``L`` is
        :attr:`max_length`, else the padded width ``T``. Inside :meth:`_token_mean_over`, ``token-mean`` divides by
        the given count instead.
        """
        if self._window_tokens is not None and agg == "token-mean":
            return aggregate_loss(values, maskf, agg, num_tokens=self._window_tokens)
        if self.all_sequences:
            rows = torch.full((), float(values.shape[0]), dtype=maskf.dtype, device=maskf.device)
        else:
            rows = (maskf.sum(-1) > 0).to(maskf.dtype).sum()
        counts = torch.stack([maskf.sum(), rows])
        t_max, ws = float(values.shape[-1]), 1
        if global_agg:
            _, ws = world()
            counts = all_reduce_sum(counts.double()).to(values.dtype)
            if self.max_length is None:
                t_max = float(
                    all_reduce_max(torch.tensor([values.shape[-1]], dtype=torch.float64, device=values.device))
                )
        if self.max_length is not None:
            t_max = float(self.max_length)
        counts = torch.where(counts > 0, counts, torch.ones_like(counts))
        n_seq = 1.0 if token_sum_norm and agg == "seq-mean-token-sum-norm" else counts[1]
        return aggregate_loss(
            values, maskf, agg, num_tokens=counts[0], num_sequences=n_seq, max_length=max(t_max, 1.0), dp_size=ws
        )


class PolicyLossSum(PolicyLoss):
    """Sum of policy losses: same call, losses added, metrics merged (a repeated key gets ``.1``, ``.2``)."""

    def __init__(self, terms: list[PolicyLoss]) -> None:
        super().__init__()
        terms = list(terms)
        if not terms or not all(isinstance(t, PolicyLoss) for t in terms):
            raise EntrotrainError(
                f"PolicyLossSum needs a non-empty list of PolicyLoss modules, got {[type(t).__name__ for t in terms]}; "
                "compose losses with +, e.g. PPOClipLoss() + EntropyBonus(0.01)."
            )
        self.terms = nn.ModuleList(terms)

    def forward(self, logprobs, old_logprobs, advantages, mask, *, entropy=None, step=None):  # type: ignore[override]
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        for term in self.terms:
            out = term(logprobs, old_logprobs, advantages, mask, entropy=entropy, step=step)
            total = out.loss if total is None else total + out.loss
            for key, value in out.metrics.items():
                name, i = key, 0
                while name in metrics:
                    i += 1
                    name = f"{key}.{i}"
                metrics[name] = value
        assert total is not None
        return PolicyLossOutput(total, metrics)


# --------------------------------------------------------------------------------------------------- PPO


class PPOClipLoss(PolicyLoss):
    r"""Vanilla PPO / GRPO clipped surrogate, as verl's ``compute_policy_loss_vanilla``.

    :math:`\ell = \max(-A r, -A\,\mathrm{clip}(r, 1-\epsilon_{low}, 1+\epsilon_{high}))`, optionally dual-clipped
    for :math:`A<0` at :math:`-A c` (``dual_clip`` = verl's ``clip_ratio_c``, e.g. 3 or 10), aggregated by ``agg``.

    Args:
        clip_low, clip_high: :math:`\epsilon_{low}`, :math:`\epsilon_{high}` (DAPO's clip-higher: 0.2 / 0.28).
        dual_clip: :math:`c > 1` or ``None`` (off).
        agg: aggregation mode of :func:`~entrotrain.functional.aggregate_loss`.
        log_ratio_clamp: clamp :math:`\log r` to ``±log_ratio_clamp`` before ``exp`` (verl: 20); ``None``: off.
        global_agg: aggregate with the global token/sequence counts across ranks × world size.
        max_length: the constant length :math:`L` of ``agg="seq-mean-token-sum-norm"`` (TRL ``dr_grpo``'s
            ``max_completion_length``, verl's ``loss_scale_factor``); ``None``: the padded width ``T`` of the batch
            (the largest over ranks with the global aggregation). Refused with any other ``agg``.
        all_sequences: ``N_seq`` of the ``seq-mean-*`` modes counts every row of the batch (TRL's ``grpo`` and
            ``dr_grpo`` divide by ``B``, also over completions ``mask_truncated_completions`` zeroed); ``False``
            (default, verl): only rows with a valid token.

    Metrics: ``policy/pg_loss``, ``policy/clip_frac_low`` (:math:`r < 1-\epsilon_{low}, A<0`),
    ``policy/clip_frac_high`` (:math:`r > 1+\epsilon_{high}, A>0`), ``policy/ppo_kl`` (mean
    :math:`\log\pi_{old} - \log\pi`), ``policy/dual_clip_frac`` (when dual-clip is on).
    """

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        agg: str = "token-mean",
        *,
        log_ratio_clamp: float | None = 20.0,
        global_agg: bool = False,
        max_length: int | None = None,
        all_sequences: bool = False,
    ) -> None:
        super().__init__()
        self.clip_low, self.clip_high = _check_clip(clip_low, clip_high)
        self.dual_clip = check_real(dual_clip, "dual_clip", low=1.0, low_open=True, none_ok=True)
        self.agg = _check_agg(agg)
        self.max_length, self.all_sequences = _check_normaliser(self.agg, max_length, all_sequences)
        self.log_ratio_clamp = check_real(log_ratio_clamp, "log_ratio_clamp", low=0.0, low_open=True, none_ok=True)
        self.global_agg = check_bool(global_agg, "global_agg")

    def per_token(
        self, logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token PPO loss ``(B, T)`` (before aggregation; 0 on masked tokens) and its metrics."""
        return self._per_token(_prepare(logprobs, old_logprobs, advantages, mask, check_floats=False))

    def _per_token(self, batch: _Batch) -> tuple[Tensor, dict[str, Tensor]]:
        logp, old, adv, maskf, _ = batch
        d, ratio, l1, l2 = _ppo_terms(logp, old, adv, self.clip_low, self.clip_high, self.log_ratio_clamp)
        loss = torch.maximum(l1, l2)
        metrics = _ppo_metrics(d, ratio, adv, maskf, self.clip_low, self.clip_high)
        if self.dual_clip is not None:
            l3 = -adv * self.dual_clip
            metrics["policy/dual_clip_frac"] = _masked_mean(((loss > l3) & (adv < 0)).to(maskf.dtype), maskf)
            loss = torch.where(adv < 0, torch.minimum(l3, loss), loss)
        return loss, metrics

    def forward(self, logprobs, old_logprobs, advantages, mask, *, entropy=None, step=None):  # type: ignore[override]
        batch = _prepare(logprobs, old_logprobs, advantages, mask, check_floats=False)  # no sync here: none added
        per_token, metrics = self._per_token(batch)
        loss = self._aggregate(per_token, batch.maskf, self.agg, self.global_agg)
        metrics["policy/pg_loss"] = loss.detach()
        return PolicyLossOutput(loss, metrics)


# --------------------------------------------------------------------------------------------------- covariance losses


class _CovLoss(PolicyLoss):
    """Shared state of Clip-Cov / KL-Cov: mode, selection budget, counter, and the global covariance."""

    def __init__(
        self,
        ratio: float,
        agg: str,
        mode: str,
        min_selected: int | None,
        nonzero_adv_only: bool,
        ratio_name: str,
        max_length: int | None = None,
        all_sequences: bool = False,
    ) -> None:
        super().__init__()
        ratio = check_real(ratio, ratio_name)  # type: ignore[assignment]
        if not 0 < ratio <= 1:
            raise EntrotrainError(
                f"{ratio_name} is the selected fraction of tokens and must be in (0, 1] (a fraction, not a percent), "
                f"got {ratio!r}; e.g. 2e-4."
            )
        self.ratio = float(ratio)
        self.agg = _check_agg(agg)
        self.max_length, self.all_sequences = _check_normaliser(self.agg, max_length, all_sequences)
        self.mode = _check_mode(mode)
        if min_selected is None:
            min_selected = 1 if mode == "micro_batch" else 0
        self.min_selected = check_int(min_selected, "min_selected", low=0)
        self.nonzero_adv_only = check_bool(nonzero_adv_only, "nonzero_adv_only")
        self._calls = 0

    # The call counter is training state: it picks Clip-Cov's random stream (the counter-based keys when no ``step``
    # is given, the micro-batch generator's seed), so it travels in ``state_dict`` and a resumed run goes on where it
    # stopped instead of replaying the picks of the first steps.
    def get_extra_state(self) -> dict[str, int]:
        return {"calls": self._calls}

    def set_extra_state(self, state: Any) -> None:
        calls = state.get("calls") if isinstance(state, Mapping) else None
        if isinstance(calls, Tensor) and calls.numel() == 1:
            calls = int(calls.item())
        self._calls = check_int(calls, "state_dict call counter ('calls')", low=0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):  # type: ignore
        """A checkpoint saved before the counter was saved (no ``_extra_state`` key) still loads: the counter stays."""
        n_missing = len(missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        key = prefix + "_extra_state"
        if key in missing_keys[n_missing:]:
            missing_keys.remove(key)

    def _global_cov(self, logp: Tensor, adv: Tensor, maskf: Tensor) -> tuple[Tensor, Tensor]:
        """Covariance ``(B, T)`` float64 with means over all ranks, and the global token count of the budget."""
        valid = maskf.bool()
        zero = torch.zeros((), dtype=torch.float64, device=logp.device)
        l64, a64 = logp.detach().double(), adv.double()
        sums = torch.stack(
            [
                torch.where(valid, l64, zero).sum(),
                torch.where(valid, a64, zero).sum(),
                valid.sum().double(),
                (valid & (adv != 0)).sum().double(),
            ]
        )
        sums = all_reduce_sum(sums)
        den = sums[2].clamp_min(1)
        cov = (l64 - sums[0] / den) * (a64 - sums[1] / den)
        # the budget counts every valid token, or (nonzero_adv_only) only those with A != 0
        return torch.where(valid, cov, zero), sums[3] if self.nonzero_adv_only else sums[2]

    def _budget(self, count: float | Tensor) -> int:
        return max(self.min_selected, int(self.ratio * float(count)))

    @staticmethod
    def _selection_metrics(selected: Tensor, cov: Tensor, maskf: Tensor, cov_all: Tensor) -> dict[str, Tensor]:
        """Selection statistics; with no valid token every one of them is 0 (never NaN)."""
        with torch.no_grad():
            n_sel = selected.sum().to(maskf.dtype)
            valid = maskf.bool()
            cov = cov.to(maskf.dtype)
            zero = torch.zeros((), dtype=maskf.dtype, device=maskf.device)
            n_valid = maskf.sum().clamp_min(1)
            return {
                "policy/cov_selected": n_sel,
                "policy/cov_selected_frac": n_sel / n_valid,
                "policy/cov_min_selected": _masked_extreme(cov, selected, largest=False),
                "policy/cov_max_selected": _masked_extreme(cov, selected, largest=True),
                "policy/cov_mean": torch.where(valid, cov_all.to(maskf.dtype), zero).sum() / n_valid,
            }


class ClipCovLoss(_CovLoss):
    r"""Clip-Cov (Cui et al. 2025): drop the policy-gradient term of a few random high-covariance tokens.

    Per token the single-clip PPO loss :math:`\max(-A r, -A\,\mathrm{clip}(r, 1-\epsilon_{low}, 1+\epsilon_{high}))`
    (no log-ratio clamp, no dual clip, as verl). Among valid tokens *not* already clipped by PPO whose
    :math:`\mathrm{Cov}_i \in (lb, ub)` (strict), ``clip_ratio · N`` are picked uniformly at random and their loss is
    zeroed; they still count in the aggregation's denominator.

    Args:
        clip_ratio: fraction :math:`r` of tokens to pick (verl ``clip_cov_ratio``, 2e-4).
        cov_lb, cov_ub: the open covariance band (1, 5).
        clip_low, clip_high: PPO's :math:`\epsilon` (the paper's scripts use 1 / 1).
        agg: aggregation mode.
        mode: ``"global"`` (default; exact over all ranks) or ``"micro_batch"`` (verl bit for bit).
        seed: ``None``: ``torch.randperm`` on the global RNG (verl; micro_batch only). An int: a generator seeded
            from ``(seed, rank, number of calls)`` (micro_batch) or the counter-based keys (global; the counter is
            ``step`` or, if ``step`` is not given, the number of calls). The number of calls is saved in
            ``state_dict``, so a resumed run continues the random stream (each rank its own).
        min_selected: floor on the number of picked tokens; ``None`` = 1 in micro_batch (verl), 0 in global.
        nonzero_adv_only: only tokens with :math:`A \ne 0` may be picked, and the budget is ``r`` times their
            count (GRPO groups with equal rewards have :math:`A = 0` and would waste it).
        max_length: the constant length :math:`L` of ``agg="seq-mean-token-sum-norm"`` (TRL ``dr_grpo``'s
            ``max_completion_length``, verl's ``loss_scale_factor``); ``None``: the padded width ``T`` of the batch
            (the largest over ranks with the global aggregation). Refused with any other ``agg``.
        all_sequences: ``N_seq`` of the ``seq-mean-*`` modes counts every row of the batch (TRL's ``grpo`` and
            ``dr_grpo`` divide by ``B``, also over completions ``mask_truncated_completions`` zeroed); ``False``
            (default, verl): only rows with a valid token.

    Metrics: the PPO ones plus ``policy/cov_selected``, ``policy/cov_selected_frac``, ``policy/cov_min_selected``,
    ``policy/cov_max_selected``, ``policy/cov_mean``, ``policy/cov_candidates``.
    """

    def __init__(
        self,
        clip_ratio: float = 2e-4,
        cov_lb: float = 1.0,
        cov_ub: float = 5.0,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        agg: str = "token-mean",
        mode: str = "global",
        seed: int | None = 0,
        min_selected: int | None = None,
        *,
        nonzero_adv_only: bool = False,
        max_length: int | None = None,
        all_sequences: bool = False,
    ) -> None:
        super().__init__(
            clip_ratio, agg, mode, min_selected, nonzero_adv_only, "clip_ratio", max_length, all_sequences
        )
        self.cov_lb = check_real(cov_lb, "cov_lb")
        self.cov_ub = check_real(cov_ub, "cov_ub")
        if not self.cov_lb < self.cov_ub:  # type: ignore[operator]
            raise EntrotrainError(
                f"cov_lb must be < cov_ub (the open covariance band), got cov_lb={cov_lb!r} and cov_ub={cov_ub!r}; "
                "e.g. cov_lb=1, cov_ub=5."
            )
        self.seed = check_int(seed, "seed", none_ok=True)
        if mode == "global" and seed is None:
            raise EntrotrainError("mode='global' needs an int seed (the counter-based keys), got None; use seed=0.")
        self.clip_low, self.clip_high = _check_clip(clip_low, clip_high)

    def _randperm(self, n: int) -> Tensor:
        """A random permutation of ``n``: on the global CPU RNG (``seed=None``, as verl), else on a generator seeded
        from ``(seed, rank, call counter)``, so each rank has its own stream and a run resumed from ``state_dict``
        continues it (nothing rank-specific is saved: the rank is read again)."""
        if self.seed is None:
            return torch.randperm(n)  # the global CPU RNG, as verl
        generator = torch.Generator().manual_seed(call_seed(rank_seed(self.seed), self._calls))
        return torch.randperm(n, generator=generator)

    def forward(self, logprobs, old_logprobs, advantages, mask, *, entropy=None, step=None):  # type: ignore[override]
        logp, old, adv, maskf, valid = _prepare(logprobs, old_logprobs, advantages, mask)
        step = _check_step(step)
        d, ratio, l1, l2 = _ppo_terms(logp, old, adv, self.clip_low, self.clip_high, None)
        clipped = (l2 > l1) & valid
        if self.mode == "micro_batch":
            # verl compute_policy_loss_clip_cov, step for step
            cov_all = (adv - _masked_mean(adv, maskf)) * (logp.detach() - _masked_mean(logp.detach(), maskf))
            cov = cov_all.masked_fill(~valid | clipped, -torch.inf)
            n_budget = maskf.sum() if not self.nonzero_adv_only else (valid & (adv != 0)).sum()
            budget = max(int(self.ratio * n_budget.item()), self.min_selected)
            cand = (cov < self.cov_ub) & (cov > self.cov_lb) & valid
            if self.nonzero_adv_only:
                cand = cand & (adv != 0)
            idx = torch.nonzero(cand)
            n_cand = torch.tensor(float(len(idx)), device=maskf.device)
            if len(idx) > 0:
                idx = idx[self._randperm(len(idx))[: min(budget, len(idx))]]
            selected = torch.zeros_like(valid)
            selected[idx[:, 0], idx[:, 1]] = True
            corr = torch.ones_like(adv)
            corr[idx[:, 0], idx[:, 1]] = 0
            loss = self._aggregate(torch.maximum(l1, l2) * corr, maskf, self.agg, False)
        else:
            cov_all, count = self._global_cov(logp, adv, maskf)
            cand = valid & ~clipped & (cov_all > self.cov_lb) & (cov_all < self.cov_ub)
            if self.nonzero_adv_only:
                cand = cand & (adv != 0)
            n_cand = cand.sum().to(maskf.dtype)
            gidx = global_index(logp.shape, logp.device)
            counter = self._calls if step is None else int(step)
            keys = counter_uniform(int(self.seed), counter, gidx)  # type: ignore[arg-type]
            selected = global_topk_mask(keys, cand, gidx, self._budget(count))
            pg = torch.where(selected, torch.zeros((), dtype=l1.dtype, device=l1.device), torch.maximum(l1, l2))
            loss = self._aggregate(pg, maskf, self.agg, True)
        self._calls += 1
        metrics = _ppo_metrics(d, ratio, adv, maskf, self.clip_low, self.clip_high)
        zero = torch.zeros((), dtype=cov_all.dtype, device=valid.device)
        cov_for_metrics = torch.where(valid, cov_all.detach(), zero)
        metrics.update(self._selection_metrics(selected, cov_for_metrics, maskf, cov_for_metrics))
        metrics["policy/cov_candidates"] = n_cand.to(maskf.dtype).detach()
        metrics["policy/pg_loss"] = loss.detach()
        return PolicyLossOutput(loss, metrics)


class KLCovLoss(_CovLoss):
    r"""KL-Cov (Cui et al. 2025): add :math:`\beta|\log\pi - \log\pi_{old}|` to the top-covariance tokens.

    Per token the *unclipped* policy gradient :math:`-A r` (PPO's clip is not applied, as verl); for the
    ``k_ratio · N`` tokens with the largest :math:`\mathrm{Cov}_i`, :math:`-A r + \beta |\log r|`.

    On-policy (``old_logprobs`` equal to ``logprobs``) the penalty has zero (sub)gradient: KL-Cov does nothing.
    A UserWarning says so once. Use several mini-batches per rollout (off-policy updates), or :class:`ClipCovLoss`.

    Args:
        k_ratio: fraction of tokens (verl ``kl_cov_ratio``; paper 2e-3 for 7B, 2e-4 for 32B; *not* a percent).
        kl_coef: :math:`\beta` (verl ``ppo_kl_coef``; the paper uses 1).
        agg, mode, min_selected, nonzero_adv_only, max_length, all_sequences: as :class:`ClipCovLoss`.

    Metrics: ``policy/ppo_kl`` (mean :math:`\log\pi_{old}-\log\pi`), ``policy/ppo_kl_abs``, the ``policy/cov_*`` ones.
    """

    def __init__(
        self,
        k_ratio: float = 2e-3,
        kl_coef: float = 1.0,
        agg: str = "token-mean",
        mode: str = "global",
        min_selected: int | None = None,
        *,
        nonzero_adv_only: bool = False,
        max_length: int | None = None,
        all_sequences: bool = False,
    ) -> None:
        super().__init__(k_ratio, agg, mode, min_selected, nonzero_adv_only, "k_ratio", max_length, all_sequences)
        self.kl_coef = check_real(kl_coef, "kl_coef", low=0.0)
        self._warned = False

    def _warn_on_policy(self, logp: Tensor, old: Tensor) -> None:
        if self._warned:
            return
        if old.data_ptr() == logp.data_ptr() or torch.equal(old, logp.detach()):
            self._warned = True
            warnings.warn(
                "KLCovLoss called with old_logprobs equal to logprobs (on-policy): the |log pi - log pi_old| "
                "penalty has zero gradient at 0, so KL-Cov does nothing. Fix: update off-policy (several "
                "mini-batches or epochs per rollout, old_logprobs from the rollout policy), or use ClipCovLoss.",
                UserWarning,
                stacklevel=3,
            )

    def forward(self, logprobs, old_logprobs, advantages, mask, *, entropy=None, step=None):  # type: ignore[override]
        logp, old, adv, maskf, valid = _prepare(logprobs, old_logprobs, advantages, mask)
        _check_step(step)
        self._warn_on_policy(logprobs, old_logprobs)
        d = logp - old
        abs_kl = d.abs()
        ratio = torch.exp(d)
        pg = -adv * ratio
        pg_kl = -adv * ratio + self.kl_coef * abs_kl
        if self.mode == "micro_batch":
            # verl compute_policy_loss_kl_cov, step for step (the covariance on the CPU over the flat valid tokens)
            valid_idx = torch.nonzero(valid.reshape(-1), as_tuple=True)[0]
            a_valid = adv[valid].detach().reshape(-1).cpu()
            l_valid = logp[valid].detach().reshape(-1).cpu()
            selected = torch.zeros_like(valid)
            cov_all = torch.zeros_like(logp.detach())
            if len(a_valid) > 0:
                cov_list = (a_valid - a_valid.mean()) * (l_valid - l_valid.mean())
                score, n_budget = cov_list, len(cov_list)
                if self.nonzero_adv_only:  # A = 0 tokens cannot be picked (the metric keeps their covariance)
                    score = cov_list.masked_fill(a_valid == 0, -torch.inf)
                    n_budget = int((a_valid != 0).sum())
                k = min(max(self.min_selected, int(n_budget * self.ratio)), len(cov_list))
                top = torch.topk(score, k, largest=True).indices
                if self.nonzero_adv_only:
                    top = top[torch.isfinite(score[top])]
                flat = valid_idx[top.to(valid_idx.device)]
                rows, cols = flat // adv.shape[1], flat % adv.shape[1]
                selected[rows, cols] = True
                cov_all[valid] = cov_list.to(cov_all.device, cov_all.dtype).nan_to_num(neginf=0.0)
            pg = torch.where(selected, pg_kl, pg)
            loss = self._aggregate(pg, maskf, self.agg, False)
        else:
            cov_all, count = self._global_cov(logp, adv, maskf)
            cand = valid & (adv != 0) if self.nonzero_adv_only else valid
            gidx = global_index(logp.shape, logp.device)
            selected = global_topk_mask(cov_all, cand, gidx, self._budget(count))
            pg = torch.where(selected, pg_kl, pg)
            loss = self._aggregate(pg, maskf, self.agg, True)
        self._calls += 1
        metrics = {
            "policy/ppo_kl": _masked_mean(-d.detach(), maskf),
            "policy/ppo_kl_abs": _masked_mean(abs_kl.detach(), maskf),
        }
        metrics.update(self._selection_metrics(selected, cov_all.detach(), maskf, cov_all.detach()))
        metrics["policy/pg_loss"] = loss.detach()
        return PolicyLossOutput(loss, metrics)


# --------------------------------------------------------------------------------------------------- STEER


class SteerLoss(PolicyLoss):
    r"""STEER (Hao et al. 2025): the dual-clip PPO loss times per-token weights :math:`w_i \in [w_{min}, w_{max}]`.

    Weights from :func:`~entrotrain.functional.steer_weights` (no gradient) down-weight tokens whose first-order
    entropy change :math:`|\Omega_i|` is large. Needs ``entropy`` (the per-token entropy of the old-policy pass).
    Paper: exp mode ``w_min=0.8, w_max=1``; linear mode ``0.8``–``1.2``; ``clip 0.2/0.28``, ``dual_clip=10``.
    ``agg``, ``max_length``, ``all_sequences``, ``global_agg``: as :class:`PPOClipLoss`.

    Metrics: the PPO ones plus ``policy/token_weight_mean``, ``policy/token_weight_min``, ``policy/token_weight_max``.
    """

    def __init__(
        self,
        w_min: float = 0.8,
        w_max: float = 1.0,
        linear: bool = False,
        clip_low: float = 0.2,
        clip_high: float = 0.28,
        dual_clip: float | None = 10.0,
        agg: str = "token-mean",
        *,
        log_ratio_clamp: float | None = 20.0,
        global_agg: bool = False,
        max_length: int | None = None,
        all_sequences: bool = False,
    ) -> None:
        super().__init__()
        self.w_max = check_real(w_max, "w_max", low=0.0, low_open=True)
        self.w_min = check_real(w_min, "w_min", low=0.0, low_open=True, high=self.w_max)
        self.linear = check_bool(linear, "linear")
        self.ppo = PPOClipLoss(clip_low, clip_high, dual_clip, agg, log_ratio_clamp=log_ratio_clamp)
        self.agg = _check_agg(agg)
        self.max_length, self.all_sequences = _check_normaliser(self.agg, max_length, all_sequences)
        self.global_agg = check_bool(global_agg, "global_agg")

    def forward(self, logprobs, old_logprobs, advantages, mask, *, entropy=None, step=None):  # type: ignore[override]
        batch = _prepare(logprobs, old_logprobs, advantages, mask, check_floats=False)  # no sync here: none added
        entropy = _check_entropy(entropy, batch.logp.shape, "SteerLoss (the old-policy pass's entropy)")
        _check_step(step)
        per_token, metrics = self.ppo._per_token(batch)
        zero = torch.zeros((), dtype=batch.logp.dtype, device=batch.logp.device)
        ent = torch.where(batch.valid, entropy.detach().to(batch.logp.dtype), zero)
        w = steer_weights(
            batch.logp.detach(), batch.old, batch.adv, ent, batch.valid,
            w_min=self.w_min, w_max=self.w_max, linear=self.linear,
        )  # fmt: skip
        loss = self._aggregate(per_token * w, batch.maskf, self.agg, self.global_agg)
        with torch.no_grad():
            metrics["policy/token_weight_mean"] = _masked_mean(w, batch.maskf)
            metrics["policy/token_weight_min"] = _masked_extreme(w, batch.valid, largest=False, empty=1.0)
            metrics["policy/token_weight_max"] = _masked_extreme(w, batch.valid, largest=True, empty=1.0)
        metrics["policy/pg_loss"] = loss.detach()
        return PolicyLossOutput(loss, metrics)


# --------------------------------------------------------------------------------------------------- entropy bonus


class EntropyBonus(PolicyLoss):
    r"""Entropy bonus :math:`-c\,\bar H` with a fixed or adaptive coefficient.

    :math:`\bar H` = ``aggregate_loss(entropy, mask, agg)`` of the differentiable per-token entropy. Fixed: ``coef``.
    Adaptive (``target`` set; Skywork-OR1 / TRL's ``use_adaptive_entropy``): once per window (a new ``step``, or
    every call when ``step`` is not given) the window's entropy :math:`H_w` (token mean over all ranks) updates
    :math:`c \leftarrow \mathrm{clamp}(c + \delta\,\mathrm{sign}(H^* - H_w), c_{min}, c_{max})` (:math:`+\delta`
    when :math:`H_w \le H^*`), and the bonus is applied only while the last window's :math:`H_w \le H^*`
    (applied from the start, before any window). Typical RLVR targets are 0.2–1 nats, not TRL's "2–10".
    The coefficient and controller state live in buffers: saved in ``state_dict``. Non-finite entropy values are
    left out of the window (a window with no finite value changes nothing).

    ``agg``, ``max_length``, ``all_sequences``, ``global_agg``: as :class:`PPOClipLoss`.

    Call as ``bonus(entropy=H, mask=m)`` or with the common signature (composition: ``PPOClipLoss() +
    EntropyBonus(0.01)``). Metrics: ``policy/entropy``, ``policy/entropy_coef`` (the applied one),
    ``policy/entropy_bonus``.
    """

    def __init__(
        self,
        coef: float = 0.0,
        target: float | None = None,
        delta: float = 0.005,
        coef_min: float = 0.0,
        coef_max: float = 1.0,
        agg: str = "token-mean",
        *,
        global_agg: bool = False,
        max_length: int | None = None,
        all_sequences: bool = False,
    ) -> None:
        super().__init__()
        coef = check_real(coef, "coef", low=0.0)
        self.target = check_real(target, "target", low=0.0, none_ok=True)
        self.delta = check_real(delta, "delta", low=0.0)
        self.coef_min = check_real(coef_min, "coef_min", low=0.0)
        self.coef_max = check_real(coef_max, "coef_max", low=self.coef_min)
        self.agg = _check_agg(agg)
        self.max_length, self.all_sequences = _check_normaliser(self.agg, max_length, all_sequences)
        self.global_agg = check_bool(global_agg, "global_agg")
        self.register_buffer("coef", torch.tensor(float(coef), dtype=torch.float64))
        self.register_buffer("active", torch.tensor(True))
        self.register_buffer("window", torch.zeros(2, dtype=torch.float64))  # entropy sum, token count
        self.register_buffer("last_step", torch.tensor(-1, dtype=torch.int64))

    def _close_window(self) -> None:
        total = all_reduce_sum(self.window)
        if float(total[1]) > 0:
            h = total[0] / total[1]
            below = bool(h <= self.target)
            c = self.coef + (self.delta if below else -self.delta)
            self.coef.copy_(c.clamp(self.coef_min, self.coef_max))
            self.active.fill_(below)
        self.window.zero_()

    def forward(  # type: ignore[override]
        self, logprobs=None, old_logprobs=None, advantages=None, mask=None, *, entropy=None, step=None
    ) -> PolicyLossOutput:
        shape = logprobs.shape if isinstance(logprobs, Tensor) else None
        entropy = _check_entropy(entropy, shape, "EntropyBonus (differentiable)")
        if mask is None:
            raise EntrotrainError("EntropyBonus needs mask= (valid tokens, (B, T) like entropy), got None.")
        adaptive = self.target is not None
        # the adaptive controller syncs in training (it reads its window): a float mask's values are checked there
        valid = _token_mask(mask, entropy.shape, check_floats=adaptive and self.training)
        step = _check_step(step)
        if adaptive and self.training and step is not None and step != int(self.last_step):
            if int(self.last_step) >= 0:
                self._close_window()
            self.last_step.fill_(step)
        cdtype = _compute_dtype(entropy.dtype)
        maskf = valid.to(cdtype)
        entropy = torch.where(valid, entropy.to(cdtype), torch.zeros((), dtype=cdtype, device=entropy.device))
        h_bar = self._aggregate(entropy, maskf, self.agg, self.global_agg)
        coef = self.coef * self.active if adaptive else self.coef
        loss = -coef.to(h_bar.dtype) * h_bar
        if adaptive and self.training:
            with torch.no_grad():  # non-finite entropy is skipped: it would steer the coefficient by a NaN
                seen = valid & torch.isfinite(entropy.detach())
                self.window += torch.stack(
                    [torch.where(seen, entropy.detach().double(), 0.0).sum(), seen.sum().double()]
                )
            if step is None:
                self._close_window()
        return PolicyLossOutput(
            loss,
            {
                "policy/entropy": h_bar.detach(),
                "policy/entropy_coef": coef.detach().to(h_bar.dtype),
                "policy/entropy_bonus": loss.detach(),
            },
        )
