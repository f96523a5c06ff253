r"""TRL adapter: entrotrain's policy-entropy statistics and policy losses inside TRL's ``GRPOTrainer``.

::

    from entrotrain.integrations.trl import EntrotrainGRPOTrainer
    from entrotrain.regularizers.policy_loss import ClipCovLoss

    trainer = EntrotrainGRPOTrainer(
        model=model, reward_funcs=reward, args=GRPOConfig(...), train_dataset=ds, processing_class=tokenizer,
        policy_loss=ClipCovLoss(clip_ratio=0.02, mode="micro_batch", agg="seq-mean-token-mean"),  # None: TRL's own
    )
    trainer.train(); print(trainer.policy_stats_table())

Supported TRL: ``1.16.x`` (:data:`SUPPORTED_TRL`). The per-token tensors live inside the private
``GRPOTrainer._compute_loss`` (a ``TrainerCallback`` never sees them), so this module overrides TRL internals that move
between releases; any other version raises :class:`~entrotrain.errors.EntrotrainError` naming the range.

**Statistics** (``policy_stats=True``, the default). On the optimizer steps that log (``logging_steps``,
``logging_first_step``; every step for other logging strategies) the trainer keeps, detached, the per-token tensors of
every micro-batch of that step — TRL's ``entropies`` (at TRL's sampling ``temperature``, from TRL's fused LM head,
in the model's dtype), the rollout log-probs (``old_per_token_logps``, or the current ones detached when TRL skips
them on-policy), ``advantages``, the completion mask (times ``tool_mask``) and the per-sequence reward (the weighted
sum of the reward functions, as TRL's ``reward``) — and at ``log`` gathers them over ranks and computes
:class:`~entrotrain.callbacks.policy_monitor.PolicyEntropyMonitor`'s statistics with the monitor's own code
(:func:`~entrotrain.callbacks.policy_monitor.policy_entropy_summary` and the monitor's ΔH, shaping and
``R = -a·e^H + b`` fit state): same keys (``entropy/policy/mean``, ``p10|p50|p90``, ``top20_mean``, ``seq_mean``,
``tokens``, ``temperature``, ``cov_mean``, ``cov_pos_frac``, ``cov_top2_share``, ``delta``, ``delta_predicted``,
``eta_eff``, ``delta_corr``, ``reward_mean``, ``fit_a|fit_b|fit_ceiling|fit_r2|fit_extrapolation|fit_shown``,
``nonfinite``, ``reward_nonfinite``), same values on the same tensors. They go into the ``logs`` dict of
``Trainer.log``, so every ``report_to`` backend and ``trainer.state.log_history`` get them. A statistic that cannot
be computed (no finite token) is left out of ``logs`` (never NaN to a logger). The glue is
:class:`~entrotrain.integrations.policy_stats.PolicyStatsRecorder`. Monitoring reads tensors TRL computed anyway: no
extra forward, and training is bit-identical with and without it. Checkpoints hold the statistics' history
(``entrotrain_policy_stats.json``) and the loss's buffers (``entrotrain_policy_loss.pt``, e.g. EntropyBonus's
adaptive coefficient), restored on ``train(resume_from_checkpoint=...)``. ``entropy/policy/delta`` is the change since
the previous logged step (TRL has no post-update pass). ``agg`` of ``mean`` defaults to the aggregation of the loss in
use (:data:`_TRL_AGG`: TRL ``grpo``/``sapo`` → ``seq-mean-token-mean``, ``bnpo``/``dapo``/``cispo``/``vespo`` →
``token-mean``, ``dr_grpo`` → ``seq-mean-token-sum-norm`` with :math:`L` = ``max_completion_length``, ``luspo`` →
``seq-mean-token-sum``; an entrotrain loss's own ``agg`` and ``max_length``, else ``max_completion_length``): on one
micro-batch whose completions each hold a token it is TRL's normaliser of that ``loss_type`` applied to the entropies
(``seq-mean-token-mean`` to 1e-8 relative: verl's ``+ 1e-8`` in each row's count). Over a logging step the statistic
pools its micro-batches on every rank: that is ``dapo``'s window-wide token mean exactly, and the mean of the
micro-batch values for the other types when their micro-batches hold equal numbers of completions (TRL's
``per_device_train_batch_size``; for ``bnpo``, equal numbers of tokens). Rows TRL zeroed
(``mask_truncated_completions``) count in TRL's ``grpo``/``dr_grpo``/``luspo`` divisor :math:`B` but not in the
statistic's (padding is not data).

**Losses** (``policy_loss=``): any :class:`~entrotrain.regularizers.policy_loss.PolicyLoss` — ``PPOClipLoss``,
``ClipCovLoss``, ``KLCovLoss``, ``SteerLoss``, ``EntropyBonus``, or a sum (``PPOClipLoss(...) + EntropyBonus(0.01)``) —
replaces TRL's if/elif loss. It is called as ``loss_fn(per_token_logps, old_logps, advantages, mask, entropy=entropies,
step=global_step)`` (``entropies`` differentiable through TRL's fused head, needed by ``EntropyBonus``; ``SteerLoss``
detaches them) and divided by the gradient-accumulation steps, as TRL does for ``grpo``. When the config's
``loss_type`` is ``"dapo"`` (TRL's default), ``"cispo"`` or ``"vespo"`` and every term of the loss aggregates
``token-mean``, the loss is instead TRL's normaliser of those types: the token sum over :math:`D` =
``num_items_in_batch`` / processes × accumulation steps / ``steps_per_generation`` (this process's share of the
accumulation window's valid tokens; ``num_items_in_batch`` / processes in eval), not divided by the accumulation steps,
so every token of the window weighs alike (an ``EntropyBonus(agg="token-mean")`` term too: the window's token mean,
where TRL's own ``entropy_coef`` bonus is each micro-batch's mean / accumulation steps). A loss with a term of another
``agg`` keeps its own aggregation / accumulation steps under these types (each micro-batch weighs alike).
:func:`trl_grpo_loss` gives the loss of TRL's PPO-clip types (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``): ``grpo``,
``bnpo`` and ``dapo`` loss and gradients bit for bit (also with completions ``mask_truncated_completions`` zeroed, and
for ``dapo`` with gradient accumulation over micro-batches of unequal token counts: two steps with
``gradient_accumulation_steps=2`` end with bit-identical parameters), ``dr_grpo`` to rounding
(``max_length=max_completion_length``). The loss's metrics (``policy/...``) join TRL's metrics, averaged over ranks;
TRL's ``entropy`` metric is kept. TRL features that act inside its loss are refused with an entrotrain loss
(``beta != 0``, ``importance_sampling_level="sequence"``, ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``,
``delta``, ``entropy_coef`` / adaptive entropy, vLLM importance sampling): use the matching entrotrain piece
(``EntropyBonus``) or TRL's own loss.

``RLOOTrainer``: :class:`~entrotrain.integrations.trl_rloo.EntrotrainRLOOTrainer` (same statistics and keys, from the
same :class:`~entrotrain.integrations._trl_stats.PolicyStatsTrainerMixin`; no ``policy_loss``: RLOO's loss is
sequence-level).

Choices stated (rl_entropy.md): entropy in nats at TRL's sampling temperature (logged as ``temperature``);
statistics over the union of the logging step's micro-batches on all ranks; the realised ΔH is between logged steps.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from entrotrain.errors import EntrotrainError
from entrotrain.functional.policy import AGG_MODES
from entrotrain.integrations._trl_stats import LOSS_FILE, STATS_FILE, PolicyStatsTrainerMixin
from entrotrain.integrations.policy_stats import PolicyStatsRecorder
from entrotrain.regularizers.policy_loss import PolicyLoss, PolicyLossSum, PPOClipLoss

__all__ = [
    "LOSS_FILE",
    "STATS_FILE",
    "SUPPORTED_TRL",
    "EntrotrainGRPOTrainer",
    "PolicyStatsRecorder",
    "TRL_PPO_LOSS_TYPES",
    "check_trl_version",
    "trl_grpo_loss",
]

#: The TRL releases whose ``GRPOTrainer`` internals this adapter is written against.
SUPPORTED_TRL = ">=1.16,<1.17"
_LOW, _HIGH = (1, 16), (1, 17)

#: TRL ``loss_type`` → the aggregation mode of its loss (for ``entropy/policy/mean``).
_TRL_AGG = {
    "grpo": "seq-mean-token-mean",
    "sapo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "cispo": "token-mean",
    "vespo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "luspo": "seq-mean-token-sum",
}


def check_trl_version(version: str) -> str:
    """Refuse a TRL outside :data:`SUPPORTED_TRL` (its private ``GRPOTrainer`` internals move between releases).

    Returns:
        ``version`` unchanged.

    Raises:
        EntrotrainError: naming the version received, the supported range and the fix.
    """
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(str(version)).release[:2]
    except InvalidVersion:
        release = None
    if release is None or not _LOW <= release < _HIGH:
        raise EntrotrainError(
            f"entrotrain.integrations.trl supports trl{SUPPORTED_TRL} (it overrides GRPOTrainer internals that change "
            f"between releases), got trl {version!r}. Install a supported one: pip install 'entrotrain[trl]' "
            "(or 'trl>=1.16,<1.17')."
        )
    return version


try:
    import trl as _trl
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise EntrotrainError(
        f"entrotrain.integrations.trl needs TRL (trl{SUPPORTED_TRL}), which is not installed ({err}). "
        "Fix: pip install 'entrotrain[trl]'."
    ) from err
check_trl_version(_trl.__version__)

from trl import GRPOTrainer  # noqa: E402  (after the version check: a moved internal would fail obscurely)


#: TRL ``loss_type``s whose loss is the PPO clipped surrogate that :func:`trl_grpo_loss` reproduces.
TRL_PPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def trl_grpo_loss(
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    *,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
) -> PPOClipLoss:
    r"""The entrotrain loss equal to TRL's ``loss_type`` with these clip settings (TRL 1.16 ``_compute_loss``).

    :math:`\ell_t = \max(-A r_t, -A\,\mathrm{clip}(r_t, 1-\epsilon_{low}, 1+\epsilon_{high}))`, no log-ratio clamp,
    no dual clip, aggregated as TRL's normaliser of that ``loss_type`` (:math:`m` the completion mask, :math:`B` the
    micro-batch's rows; :class:`EntrotrainGRPOTrainer` divides by the gradient-accumulation steps, as TRL does for
    every type but ``dapo``, whose window count it gives the loss when the config's ``loss_type`` is ``dapo``):

    - ``grpo`` (DeepSeekMath's GRPO): :math:`\frac1B\sum_b \frac{\sum_t \ell m}{\max(1, \sum_t m)}` —
      ``agg="seq-mean-token-mean", all_sequences=True`` (TRL's mean runs over every row, also a completion
      ``mask_truncated_completions`` zeroed). Loss and gradients bit for bit.
    - ``bnpo``: :math:`\sum \ell m / \max(1, \sum m)` over the micro-batch — ``agg="token-mean"``. Bit for bit.
    - ``dr_grpo`` (Dr. GRPO): :math:`\sum \ell m / (B\,L)`, :math:`L` = ``max_completion_length`` (a constant,
      not the padded width) — ``agg="seq-mean-token-sum-norm", max_length=max_completion_length,
      all_sequences=True``. Gradients bit for bit when :math:`B` is a power of two; otherwise each token's weight
      :math:`(1/L)/B` may be an ulp from TRL's :math:`1/(BL)` (in float32 for 26 % of the pairs :math:`B \le 256`,
      :math:`L \le 4096`): entrotrain divides by :math:`N_{seq}` then :math:`L`, as verl 0.9. The loss value to
      rounding (TRL sums all tokens at once, entrotrain per sequence first, as verl; measured up to 8.5e-7
      relative on the tiny model).
    - ``dapo``: :math:`\sum \ell m / D`, :math:`D` = ``num_items_in_batch`` / processes × accumulation steps /
      ``steps_per_generation`` (the accumulation window's valid tokens per process), no division by the
      accumulation steps — ``agg="token-mean"``. Called alone it is the micro-batch's token mean (TRL's ``bnpo``);
      :class:`EntrotrainGRPOTrainer` with ``GRPOConfig(loss_type="dapo")`` gives it :math:`D` and does not divide
      by the accumulation steps: loss and gradients bit for bit under gradient accumulation too, every token of
      the window weighing alike. (With another config ``loss_type`` it stays the micro-batch mean / accumulation
      steps: TRL's ``bnpo``.)

    The other TRL types are not this surrogate: ``sapo`` (soft sigmoid gate), ``cispo`` / ``vespo`` (weighted
    log-prob, no ratio clip), ``luspo`` (sequence sum) are refused.

    Args:
        epsilon_low: TRL's ``epsilon``.
        epsilon_high: TRL's ``epsilon_high`` (``None``: ``epsilon_low``).
        loss_type: one of :data:`TRL_PPO_LOSS_TYPES`.
        max_completion_length: TRL's ``max_completion_length``; needed by ``dr_grpo`` only (ignored otherwise).

    Raises:
        EntrotrainError: another ``loss_type``, or ``dr_grpo`` without ``max_completion_length``.
    """
    if loss_type not in TRL_PPO_LOSS_TYPES:
        raise EntrotrainError(
            f"trl_grpo_loss reproduces TRL's PPO-clip loss types {TRL_PPO_LOSS_TYPES}, got loss_type={loss_type!r} "
            "(sapo, cispo, vespo and luspo are other surrogates). Fix: one of those four, or keep TRL's own loss "
            "(policy_loss=None)."
        )
    high = epsilon_low if epsilon_high is None else epsilon_high
    kw: dict[str, Any] = dict(clip_low=epsilon_low, clip_high=high, log_ratio_clamp=None)
    if loss_type == "grpo":
        return PPOClipLoss(**kw, agg="seq-mean-token-mean", all_sequences=True)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise EntrotrainError(
                "trl_grpo_loss(loss_type='dr_grpo') needs max_completion_length (TRL divides the token sum by "
                "batch size x max_completion_length, a constant), got None. Fix: pass "
                "max_completion_length=args.max_completion_length."
            )
        return PPOClipLoss(
            **kw, agg="seq-mean-token-sum-norm", max_length=max_completion_length, all_sequences=True
        )
    return PPOClipLoss(**kw, agg="token-mean")  # bnpo, dapo


def _loss_agg(loss: PolicyLoss) -> str | None:
    """The aggregation mode of an entrotrain loss (the first term's for a sum)."""
    term = _agg_term(loss)
    return None if term is None else term.agg


def _agg_term(loss: PolicyLoss) -> Any:
    """The first term of an entrotrain loss that has an aggregation mode, or ``None``."""
    if isinstance(loss, PolicyLossSum):
        for term in loss.terms:
            found = _agg_term(term)
            if found is not None:
                return found
        return None
    return loss if getattr(loss, "agg", None) in AGG_MODES else None


#: TRL ``loss_type``s whose loss divides by the accumulation window's valid tokens, not by the accumulation steps.
_WINDOW_TYPES = ("cispo", "dapo", "vespo")


def _token_mean_only(loss: PolicyLoss) -> bool:
    """Every term of the loss (every term of a sum, recursively) aggregates ``token-mean``."""
    if isinstance(loss, PolicyLossSum):
        return all(_token_mean_only(term) for term in loss.terms)
    return getattr(loss, "agg", None) == "token-mean"


class EntrotrainGRPOTrainer(PolicyStatsTrainerMixin, GRPOTrainer):
    r"""TRL's ``GRPOTrainer`` with entrotrain's policy-entropy statistics and, optionally, an entrotrain policy loss.

    Every positional and keyword argument of ``GRPOTrainer`` is accepted as is; the extra keywords are:

    Args:
        policy_loss: an entrotrain :class:`~entrotrain.regularizers.policy_loss.PolicyLoss` (``ClipCovLoss``,
            ``KLCovLoss``, ``SteerLoss``, ``EntropyBonus``, ``PPOClipLoss`` or a ``+`` sum) replacing TRL's loss;
            ``None`` keeps TRL's ``loss_type``.
        policy_stats: log ``entropy/policy/...`` on logging steps.
        stats_agg: the aggregation of ``entropy/policy/mean``; ``None``: the loss's (see the module docstring).
        top_fraction, cov_top_fraction, fit_min_points, window, window_align, hwe_threshold, entropy_length_corr:
            as :class:`~entrotrain.callbacks.policy_monitor.PolicyEntropyMonitor`.
        stats_prefix: key prefix (``"entropy/policy/"``).
        print_summary: print the first/last statistics and the entropy–reward fit when training ends (main process).

    The statistics' glue (capture, ``log``, checkpoint files, summary) is
    :class:`~entrotrain.integrations._trl_stats.PolicyStatsTrainerMixin`, shared with ``EntrotrainRLOOTrainer``.

    Raises:
        EntrotrainError: an unsupported TRL version, a ``policy_loss`` that is not a ``PolicyLoss``, bad statistic
            arguments, or TRL settings an entrotrain loss cannot honour (listed in the module docstring).
    """

    def __init__(self, *args: Any, policy_loss: PolicyLoss | None = None, **kwargs: Any) -> None:
        import trl

        check_trl_version(trl.__version__)
        if policy_loss is not None and not isinstance(policy_loss, PolicyLoss):
            raise EntrotrainError(
                f"policy_loss must be an entrotrain PolicyLoss (e.g. ClipCovLoss(), PPOClipLoss() + EntropyBonus(0.01))"
                f" or None for TRL's own loss, got {type(policy_loss).__name__}."
            )
        if policy_loss is not None:
            self._check_loss_settings(kwargs.get("args", args[2] if len(args) > 2 else None))
        self.policy_loss = policy_loss  # before TRL's __init__: the default statistics aggregation reads it
        super().__init__(*args, **kwargs)
        if policy_loss is not None:
            self._check_loss_settings(self.args)
            policy_loss.to(self.accelerator.device)

    def _default_stats_agg(self) -> str:
        """The aggregation of the loss in use: an entrotrain loss's ``agg``, else TRL's ``loss_type``'s."""
        agg = _loss_agg(self.policy_loss) if self.policy_loss is not None else None
        return agg or _TRL_AGG.get(self.loss_type, "token-mean")

    def _stats_max_length(self, agg: str) -> int | None:
        """``seq-mean-token-sum-norm``'s :math:`L`: the entrotrain loss's ``max_length``, else TRL's
        ``max_completion_length`` (``dr_grpo``'s constant; never the padded width of a logging step, which depends on
        its longest completion)."""
        if agg != "seq-mean-token-sum-norm":
            return None
        term = _agg_term(self.policy_loss) if self.policy_loss is not None else None
        length = getattr(term, "max_length", None)
        return int(length if length is not None else self.max_completion_length)

    def _window_tokens(self, inputs: dict[str, Any], mode: str) -> Tensor | None:
        """TRL's ``dapo`` / ``cispo`` / ``vespo`` normaliser (this process's share of the accumulation window's valid
        tokens, computed as ``_compute_loss`` does) when the config's ``loss_type`` is one of those and every term of
        the entrotrain loss aggregates ``token-mean``; ``None`` otherwise (the loss's own micro-batch aggregation,
        divided by the accumulation steps)."""
        if self.loss_type not in _WINDOW_TYPES or not _token_mean_only(self.policy_loss):  # type: ignore[arg-type]
            return None
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":  # in eval, the batch is neither split across steps nor accumulated (TRL's comment)
            normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
        return normalizer

    def _stats_tensors(self, inputs: dict[str, Any], captured: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The rollout log-probs (``old_per_token_logps``; the current ones, detached, when TRL skips them on-policy)
        and the completion mask times ``tool_mask``."""
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        return (captured["logps"] if old is None else old), mask

    # ------------------------------------------------------------------------------------------------ settings
    @staticmethod
    def _check_loss_settings(config: Any) -> None:
        """Refuse the ``GRPOConfig`` settings that act inside TRL's loss (checked before TRL builds anything)."""
        if config is None:
            return
        get = lambda name, default=None: getattr(config, name, default)  # noqa: E731
        refused = {
            "beta (reference-model KL)": (get("beta", 0.0) or 0.0) != 0.0,
            "importance_sampling_level='sequence'": get("importance_sampling_level", "token") != "token",
            "top_entropy_quantile < 1": (get("top_entropy_quantile", 1.0) or 1.0) < 1.0,
            "off_policy_mask_threshold": get("off_policy_mask_threshold") is not None,
            "delta (two-sided clipping)": get("delta") is not None,
            "entropy_coef / use_adaptive_entropy (use entrotrain's EntropyBonus)": bool(
                (get("entropy_coef", 0.0) or 0.0) != 0.0 or get("use_adaptive_entropy", False)
            ),
            "use_vllm with importance-sampling correction": bool(
                get("use_vllm", False) and get("vllm_importance_sampling_correction", False)
            ),
        }
        bad = [name for name, on in refused.items() if on]
        if bad:
            raise EntrotrainError(
                f"policy_loss= replaces TRL's loss, which is where these GRPOConfig settings act: {bad}. Fix: turn "
                "them off (beta=0.0, importance_sampling_level='token', top_entropy_quantile=1.0, "
                "off_policy_mask_threshold=None, delta=None, entropy_coef=0.0) and use the entrotrain pieces "
                "(e.g. + EntropyBonus(0.01)), or pass policy_loss=None to keep TRL's loss."
            )

    # ------------------------------------------------------------------------------------------------ loss
    def _loss(self, model, inputs):
        """TRL's loss, or the entrotrain one."""
        if self.policy_loss is None:
            return super()._loss(model, inputs)
        return self._entrotrain_loss(model, inputs)
    def _entrotrain_loss(self, model, inputs):
        """TRL's ``_compute_loss`` up to the per-token loss, then the entrotrain loss (TRL's normaliser)."""
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        extra = {
            k: inputs.get(k)
            for k in (
                "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes", "num_tiles",
                "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
            )
        }  # fmt: skip
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **extra,
        )  # fmt: skip
        advantages = inputs["advantages"]
        old = inputs.get("old_per_token_logps")
        old = per_token_logps.detach() if old is None else old
        mode = "train" if self.model.training else "eval"
        self.policy_loss.train(mode == "train")  # type: ignore[union-attr]  # controllers move in training only
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        window = self._window_tokens(inputs, mode)  # TRL's dapo/cispo/vespo: None unless every term is token-mean
        with nullcontext() if window is None else self.policy_loss._token_mean_over(window):  # type: ignore[union-attr]
            out = self.policy_loss(  # type: ignore[misc]
                per_token_logps, old, advantages, mask, entropy=entropies, step=int(self.state.global_step)
            )
        loss = out.loss / accumulation if window is None else out.loss  # the window mean: no division by the steps
        if self.aux_loss_enabled:  # TRL divides the router loss by the accumulation steps for every loss_type
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        metrics = self._metrics[mode]
        for key, value in sorted(out.metrics.items()):  # sorted: every rank gathers in the same order
            metrics[key].append(self.accelerator.gather(value.detach().float().reshape(1)).nanmean().item())
        with torch.no_grad():
            m = mask.to(entropies.dtype)
            totals = self.accelerator.reduce(torch.stack([(entropies.detach() * m).sum(), m.sum()]), reduction="sum")
            metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())  # TRL's own `entropy`
        return loss
