r"""Token-level entropy shaping as composable pieces of a GRPO step: PEAR (a reward shaper), CANON (an advantage
estimator).

They sit where the papers put them, *before* the policy loss, and follow the policy losses' call conventions
(``nn.Module``; keyword ``entropy=`` / ``step=``; a named output of ``(value, metrics)`` with detached scalar metrics
under explicit names)::

    shaped = shaper(rewards, entropy, mask, token_ids=response_ids, step=step)   # ShapedRewards
    adv = estimator(shaped.rewards, group_size, entropy=entropy, mask=mask, step=step)  # AdvantageOutput
    loss = policy_loss(logprobs, old_logprobs, adv.advantages, mask, entropy=entropy, step=step).loss

``rewards (B,)`` are the scalar outcome rewards (one prompt's ``group_size`` responses adjacent), ``entropy (B, T)``
the per-token entropies of the rollout's old-policy pass at the rollout temperature (no gradient: every shaping term
is detached, as in all reference code), ``mask (B, T)`` the valid response tokens, ``token_ids (B, T)`` the response
ids (for a delimiter-based phase split). Shapers compose with ``+`` (their reward terms add).

With :class:`~entrotrain.tasks.grpo.GRPOTask` from YAML::

    model:
      class_path: entrotrain.tasks.grpo.GRPOTask
      init_args:
        reward_shaping:
          class_path: entrotrain.regularizers.token_shaping.PEARShaping
          init_args: {delimiter_ids: [12], think_coef: 0.1}
        advantage_estimator:
          class_path: entrotrain.regularizers.token_shaping.CANONAdvantage
          init_args: {lam: 1.0}

Contract: bad constructor arguments or inputs raise :class:`~entrotrain.errors.EntrotrainError` naming the argument;
empty input gives empty outputs and zero metrics; NaN/Inf data stays in the rows (reward shaping) or groups (CANON)
that hold it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from entrotrain._validation import check_choice, check_int, check_real, check_shape, check_tensor
from entrotrain.errors import EntrotrainError
from entrotrain.functional.token_shaping import (
    _delimiter,
    _mask,
    canon_advantage,
    canon_split,
    pear_reward,
    phase_entropy,
    phase_ids_from_delimiter,
    sequence_entropy,
)

__all__ = [
    "AdvantageEstimator",
    "AdvantageOutput",
    "CANONAdvantage",
    "PEARShaping",
    "RewardShaper",
    "RewardShaperSum",
    "ShapedRewards",
]


class ShapedRewards(NamedTuple):
    """``rewards (B,)``: the shaped rewards; ``metrics``: detached scalars by name; ``phase_ids (B, T)`` or None:
    the phases the shaper used (a task can return them for :class:`~entrotrain.callbacks.PolicyEntropyMonitor`)."""

    rewards: Tensor
    metrics: dict[str, Tensor]
    phase_ids: Tensor | None = None


class AdvantageOutput(NamedTuple):
    """``advantages (B,)`` (one per response, broadcast over its tokens); ``metrics``: detached scalars by name."""

    advantages: Tensor
    metrics: dict[str, Tensor]


def _rewards(rewards: Tensor) -> Tensor:
    check_tensor(rewards, "rewards", ndim=1, layout="(B,): one scalar reward per response")
    if rewards.is_complex() or rewards.dtype == torch.bool:
        raise EntrotrainError(f"rewards must be real numbers, got dtype {rewards.dtype}; use rewards.float().")
    return rewards


def _tokens_like(x: Tensor | None, name: str, rewards: Tensor, who: str) -> Tensor:
    if x is None:
        raise EntrotrainError(f"{who} needs {name}= ((B, T) per response token), got None.")
    check_tensor(x, name, ndim=2, layout="(B, T)")
    if x.shape[0] != rewards.shape[0]:
        raise EntrotrainError(
            f"{name} has {x.shape[0]} rows but rewards has {rewards.shape[0]} responses; give one row per response."
        )
    return x


def _finite_mean(x: Tensor, keep: Tensor | None = None) -> Tensor:
    """Mean of the finite entries (of ``keep``) as a float32 scalar; 0 when there is none."""
    x = x.detach().double()
    ok = torch.isfinite(x) if keep is None else torch.isfinite(x) & keep
    n = ok.sum()
    return (torch.where(ok, x, torch.zeros_like(x)).sum() / n.clamp_min(1)).float()


# --------------------------------------------------------------------------------------------- reward shapers


class RewardShaper(nn.Module):
    """Base of the reward shapers: ``forward`` adds :meth:`term` to the rewards; ``+`` composes."""

    def term(  # pragma: no cover - abstract
        self,
        rewards: Tensor,
        entropy: Tensor,
        mask: Tensor,
        *,
        token_ids: Tensor | None = None,
        phase_ids: Tensor | None = None,
        step: int | None = None,
    ) -> ShapedRewards:
        """The reward *term* ``(B,)`` (returned in ``ShapedRewards.rewards``), its metrics and phases."""
        raise NotImplementedError

    def forward(  # type: ignore[override]
        self,
        rewards: Tensor,
        entropy: Tensor,
        mask: Tensor,
        *,
        token_ids: Tensor | None = None,
        phase_ids: Tensor | None = None,
        step: int | None = None,
    ) -> ShapedRewards:
        """``rewards + term`` (in float32 at least; the rewards' dtype when it is wider) and the term's metrics."""
        rewards = _rewards(rewards)
        out = self.term(rewards, entropy, mask, token_ids=token_ids, phase_ids=phase_ids, step=step)
        dtype = torch.promote_types(rewards.dtype, torch.float32) if rewards.is_floating_point() else torch.float32
        return ShapedRewards(rewards.detach().to(dtype) + out.rewards.to(dtype), out.metrics, out.phase_ids)

    def __add__(self, other: RewardShaper) -> RewardShaperSum:
        if not isinstance(other, RewardShaper):
            return NotImplemented
        left = list(self.terms) if isinstance(self, RewardShaperSum) else [self]
        right = list(other.terms) if isinstance(other, RewardShaperSum) else [other]
        return RewardShaperSum(left + right)


class RewardShaperSum(RewardShaper):
    """The sum of several shapers' reward terms (metrics merged; the first phases any term reports are kept)."""

    def __init__(self, terms: Sequence[RewardShaper]) -> None:
        super().__init__()
        if not terms or not all(isinstance(t, RewardShaper) for t in terms):
            raise EntrotrainError(f"RewardShaperSum needs one or more RewardShaper terms, got {terms!r}.")
        self.terms = nn.ModuleList(terms)

    def term(self, rewards, entropy, mask, *, token_ids=None, phase_ids=None, step=None) -> ShapedRewards:
        total = torch.zeros(rewards.shape, dtype=torch.float64, device=rewards.device)
        metrics: dict[str, Tensor] = {}
        phases = phase_ids
        for t in self.terms:
            out = t.term(rewards, entropy, mask, token_ids=token_ids, phase_ids=phase_ids, step=step)
            total = total + out.rewards.double()
            for k, v in out.metrics.items():
                name, i = k, 1
                while name in metrics:
                    name, i = f"{k}.{i}", i + 1
                metrics[name] = v
            if phases is None:
                phases = out.phase_ids
        return ShapedRewards(total.float(), metrics, phases)


class PEARShaping(RewardShaper):
    r"""PEAR's phase-entropy-aware reward (Huang, Lu, Zhang 2025, arXiv 2510.08026): ``r + pear_reward(...)``.

    .. math::

        r'_b = r_b - \operatorname{clip}(c_{think}\,\bar H_{b,0} + c_{ans}\,\bar H_{b,1}, 0, P_{max})

    with :math:`\bar H_{b,p}` the token-mean entropy of phase :math:`p` (0 = thinking, before the first delimiter;
    1 = answer, from the delimiter on; no delimiter: all thinking). The formula's published structure only; the
    weights, the free answer phase and the token mean are this implementation's choices (see
    :func:`~entrotrain.functional.token_shaping.pear_reward`). It acts on the scalar reward only; GRPO's group
    normalisation follows as usual.

    Args:
        delimiter_ids: the token id(s) that end the thinking phase (a multi-token ``</think>`` as a list), or None
            when the caller passes ``phase_ids=`` (then ``phase_ids`` wins).
        think_coef: weight of the thinking-phase mean entropy (>= 0).
        answer_coef: weight of the answer-phase mean entropy (0: the answer phase is free).
        max_penalty: cap on the penalty (> 0) or None.

    Metrics (detached): ``pear/penalty`` (mean term over responses, <= 0), ``pear/think_entropy`` /
    ``pear/answer_entropy`` (token-mean over the batch's tokens of that phase with a finite entropy),
    ``pear/think_length`` / ``pear/answer_length`` (mean tokens per response).
    """

    def __init__(
        self,
        delimiter_ids: int | Sequence[int] | None = None,
        think_coef: float = 0.1,
        answer_coef: float = 0.0,
        max_penalty: float | None = None,
    ) -> None:
        super().__init__()
        self.delimiter_ids = None if delimiter_ids is None else _delimiter(delimiter_ids)
        self.think_coef = check_real(think_coef, "think_coef", low=0.0)
        self.answer_coef = check_real(answer_coef, "answer_coef")
        self.max_penalty = check_real(max_penalty, "max_penalty", low=0.0, low_open=True, none_ok=True)

    def _phase_ids(self, mask: Tensor, token_ids: Tensor | None, phase_ids: Tensor | None) -> Tensor:
        if phase_ids is not None:
            check_tensor(phase_ids, "phase_ids", integer=True, ndim=2)
            check_shape(phase_ids, mask.shape, "phase_ids", like="the mask")
            return phase_ids
        if token_ids is None or self.delimiter_ids is None:
            raise EntrotrainError(
                "PEARShaping needs phase_ids= ((B, T) phases: 0 thinking, 1 answer), or token_ids= together with "
                "PEARShaping(delimiter_ids=...) (the ids of the token(s) that end the thinking phase)."
            )
        check_tensor(token_ids, "token_ids", integer=True, ndim=2)
        check_shape(token_ids, mask.shape, "token_ids", like="the mask")
        return phase_ids_from_delimiter(token_ids, _mask(mask, mask.shape), self.delimiter_ids)

    def term(self, rewards, entropy, mask, *, token_ids=None, phase_ids=None, step=None) -> ShapedRewards:
        entropy = _tokens_like(entropy, "entropy", rewards, "PEARShaping")
        check_tensor(mask, "mask")
        check_shape(mask, entropy.shape, "mask", like="the entropy")
        phases = self._phase_ids(mask, token_ids, phase_ids)
        bonus = pear_reward(
            entropy, mask, phases, think_coef=self.think_coef, answer_coef=self.answer_coef,
            max_penalty=self.max_penalty,
        )  # fmt: skip
        with torch.no_grad():
            count = phase_entropy(entropy, mask, phases, n_phases=2).count.double()
            valid = _mask(mask, mask.shape)
            # pooled over the phase's valid tokens with a finite entropy (a NaN token leaves its row's phase mean
            # NaN; weighing that row's tokens as 0 pulled the pooled mean down)
            think, answer = (_finite_mean(entropy, valid & (phases == p)) for p in (0, 1))
            n = max(rewards.shape[0], 1)
            metrics = {
                "pear/penalty": _finite_mean(bonus),
                "pear/think_entropy": think,
                "pear/answer_entropy": answer,
                "pear/think_length": (count[:, 0].sum() / n).float(),
                "pear/answer_length": (count[:, 1].sum() / n).float(),
            }
        return ShapedRewards(bonus, metrics, phases)

    def extra_repr(self) -> str:
        return (
            f"delimiter_ids={self.delimiter_ids}, think_coef={self.think_coef}, answer_coef={self.answer_coef}, "
            f"max_penalty={self.max_penalty}"
        )


# --------------------------------------------------------------------------------------------- advantage estimators


class AdvantageEstimator(nn.Module):
    """Base of the advantage estimators: ``forward(rewards, group_size, *, entropy, mask, step) -> AdvantageOutput``."""

    def forward(  # type: ignore[override]  # pragma: no cover - abstract
        self,
        rewards: Tensor,
        group_size: int,
        *,
        entropy: Tensor | None = None,
        mask: Tensor | None = None,
        step: int | None = None,
    ) -> AdvantageOutput:
        raise NotImplementedError


class CANONAdvantage(AdvantageEstimator):
    r"""CANON's conditional advantage (Chen et al. 2025, arXiv 2509.23962), exactly as ``biuboomc/CANON``.

    Regroups each prompt's responses into a low and a high group by ``metric`` (token-mean entropy of the
    old-policy pass, verl's ``masked_mean``; or the response length), stable sort, median to the high group, and
    computes :func:`~entrotrain.functional.token_shaping.canon_advantage` (inter-group weight ``lam``, ``alpha``,
    ``beta`` with the variant's α placement, divisor ``length_norm``; no std normalisation). Defaults are the
    code's: ``lam=1`` (pure inter-group), ``alpha=1``, ``beta=0``; ``length_norm`` is 1 (CANON divides by
    ``max_response_length`` = 8192 under verl's ``seq-mean-token-sum``: set it when you use that aggregation).

    ``lam_schedule="batch_reward"`` is CANON's ``dr_entropy_token_budget_annel`` variant: the inter-group weight is
    the mean reward of the whole batch (as this call sees it: per rank under DDP), :math:`\lambda = \bar r`, with
    :math:`\alpha = 1, \beta = 0` (that variant has no α/β; ``lam``, ``alpha`` and ``beta`` are then unused). The
    cosine-with-restart variants (hard-coded 30/150-step schedules) are not reproduced.

    Metrics (detached): ``canon/reward_high`` / ``canon/reward_low`` (mean reward of the high / low groups),
    ``canon/metric_high`` / ``canon/metric_low`` (their mean metric), ``canon/adv_abs`` (mean :math:`|A|`),
    ``canon/lam`` (the inter-group weight used).
    """

    def __init__(
        self,
        lam: float = 1.0,
        alpha: float = 1.0,
        beta: float = 0.0,
        metric: str = "entropy",
        length_norm: float = 1.0,
        lam_schedule: str = "constant",
    ) -> None:
        super().__init__()
        self.lam_schedule = check_choice(lam_schedule, "lam_schedule", ("constant", "batch_reward"))
        self.lam = check_real(lam, "lam")
        self.alpha = check_real(alpha, "alpha")
        self.beta = check_real(beta, "beta")
        self.metric = check_choice(metric, "metric", ("entropy", "length"))
        self.length_norm = check_real(length_norm, "length_norm", low=0.0, low_open=True)

    def forward(self, rewards, group_size, *, entropy=None, mask=None, step=None) -> AdvantageOutput:  # type: ignore[override]
        rewards = _rewards(rewards)
        check_int(group_size, "group_size", low=1)
        mask = _tokens_like(mask, "mask", rewards, "CANONAdvantage")
        if self.metric == "entropy":
            entropy = _tokens_like(entropy, "entropy", rewards, "CANONAdvantage(metric='entropy')")
            check_shape(mask, entropy.shape, "mask", like="the entropy")
            value = sequence_entropy(entropy, mask)
        else:
            value = _mask(mask, mask.shape).sum(1).float()
        lam, alpha, beta = self.lam, self.alpha, self.beta
        if self.lam_schedule == "batch_reward":
            r = rewards.detach().double()
            lam = float(r.mean()) if r.numel() else 0.0
            lam = lam if lam == lam else 0.0  # NaN rewards: those groups are NaN anyway; keep lam a number
            alpha, beta = 1.0, 0.0
        adv = canon_advantage(
            rewards, value, group_size, lam=lam, alpha=alpha, beta=beta, variant=self.metric,
            length_norm=self.length_norm,
        )  # fmt: skip
        with torch.no_grad():
            high = canon_split(value, group_size)
            r = rewards.detach().double()
            metrics = {
                "canon/reward_high": _finite_mean(r, high),
                "canon/reward_low": _finite_mean(r, ~high),
                "canon/metric_high": _finite_mean(value, high),
                "canon/metric_low": _finite_mean(value, ~high),
                "canon/adv_abs": _finite_mean(adv.abs()),
                "canon/lam": torch.tensor(float(lam)),
            }
        return AdvantageOutput(adv, metrics)

    def extra_repr(self) -> str:
        return (
            f"lam={self.lam}, alpha={self.alpha}, beta={self.beta}, metric={self.metric!r}, "
            f"length_norm={self.length_norm}, lam_schedule={self.lam_schedule!r}"
        )
