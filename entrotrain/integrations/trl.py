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
``eta_eff``, ``delta_corr``, ``reward_mean``, ``fit_a|fit_b|fit_ceiling|fit_r2``, ``nonfinite``,
``reward_nonfinite``), same values on the same tensors. They go into the ``logs`` dict of ``Trainer.log``, so every
``report_to`` backend and ``trainer.state.log_history`` get them. A statistic that cannot be computed (no finite token)
is left out of ``logs`` (never NaN to a logger). The glue is
:class:`~entrotrain.integrations.policy_stats.PolicyStatsRecorder`. Monitoring reads tensors TRL computed anyway: no
extra forward, and training is bit-identical with and without it. Checkpoints hold the statistics' history
(``entrotrain_policy_stats.json``) and the loss's buffers (``entrotrain_policy_loss.pt``, e.g. EntropyBonus's
adaptive coefficient), restored on ``train(resume_from_checkpoint=...)``. ``entropy/policy/delta`` is the change since
the previous logged step (TRL has no post-update pass). ``agg`` of ``mean`` defaults to the aggregation of the loss in
use (TRL ``grpo`` → ``seq-mean-token-mean``, ``bnpo``/``dapo`` → ``token-mean``, ``dr_grpo`` →
``seq-mean-token-sum-norm``; an entrotrain loss's own ``agg``).

**Losses** (``policy_loss=``): any :class:`~entrotrain.regularizers.policy_loss.PolicyLoss` — ``PPOClipLoss``,
``ClipCovLoss``, ``KLCovLoss``, ``SteerLoss``, ``EntropyBonus``, or a sum (``PPOClipLoss(...) + EntropyBonus(0.01)``)
— replaces TRL's if/elif loss. It is called as ``loss_fn(per_token_logps, old_logps, advantages, mask,
entropy=entropies, step=global_step)`` (``entropies`` differentiable through TRL's fused head, needed by
``EntropyBonus``; ``SteerLoss`` detaches them) and divided by the gradient-accumulation steps, as TRL does for
``grpo``. With ``PPOClipLoss(clip_low=epsilon_low, clip_high=epsilon_high, agg="seq-mean-token-mean",
log_ratio_clamp=None)`` (:func:`trl_grpo_loss`) it reproduces TRL's ``loss_type="grpo"`` loss and gradients bit for
bit (completions with at least one valid token, as TRL's are). The loss's metrics (``policy/...``) join TRL's
metrics, averaged over ranks; TRL's ``entropy`` metric is kept. TRL features that act inside its loss are refused with
an entrotrain loss (``beta != 0``, ``importance_sampling_level="sequence"``, ``top_entropy_quantile < 1``,
``off_policy_mask_threshold``, ``delta``, ``entropy_coef`` / adaptive entropy, vLLM importance sampling): use the
matching entrotrain piece (``EntropyBonus``) or TRL's own loss.

Choices stated (rl_entropy.md): entropy in nats at TRL's sampling temperature (logged as ``temperature``);
statistics over the union of the logging step's micro-batches on all ranks; the realised ΔH is between logged steps.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_choice, check_int, check_real
from entrotrain.dashboards.run_record import RunRecordLogger
from entrotrain.errors import EntrotrainError
from entrotrain.functional.policy import AGG_MODES
from entrotrain.integrations.policy_stats import PolicyStatsRecorder
from entrotrain.regularizers.policy_loss import PolicyLoss, PolicyLossSum, PPOClipLoss

__all__ = [
    "SUPPORTED_TRL",
    "EntrotrainGRPOTrainer",
    "PolicyStatsRecorder",
    "check_trl_version",
    "trl_grpo_loss",
]

#: The TRL releases whose ``GRPOTrainer`` internals this adapter is written against.
SUPPORTED_TRL = ">=1.16,<1.17"
_LOW, _HIGH = (1, 16), (1, 17)

#: Files a checkpoint folder gets beside TRL's: the statistics' history (ΔH pairs, fit points) and the loss's state.
STATS_FILE = "entrotrain_policy_stats.json"
LOSS_FILE = "entrotrain_policy_loss.pt"

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


def trl_grpo_loss(epsilon_low: float = 0.2, epsilon_high: float | None = None) -> PPOClipLoss:
    r"""The entrotrain loss equal (bit for bit) to TRL's ``loss_type="grpo"`` with these clip settings.

    :math:`\ell_t = \max(-A r_t, -A\,\mathrm{clip}(r_t, 1-\epsilon_{low}, 1+\epsilon_{high}))`, aggregated
    ``seq-mean-token-mean`` (DeepSeekMath's GRPO, Shao et al. 2024), no log-ratio clamp, no dual clip.

    Args:
        epsilon_low: TRL's ``epsilon``.
        epsilon_high: TRL's ``epsilon_high`` (``None``: ``epsilon_low``).
    """
    high = epsilon_low if epsilon_high is None else epsilon_high
    return PPOClipLoss(clip_low=epsilon_low, clip_high=high, agg="seq-mean-token-mean", log_ratio_clamp=None)


def _loss_agg(loss: PolicyLoss) -> str | None:
    """The aggregation mode of an entrotrain loss (the first term's for a sum)."""
    if isinstance(loss, PolicyLossSum):
        for term in loss.terms:
            agg = _loss_agg(term)
            if agg is not None:
                return agg
        return None
    agg = getattr(loss, "agg", None)
    return agg if agg in AGG_MODES else None


class EntrotrainGRPOTrainer(GRPOTrainer):
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

    Raises:
        EntrotrainError: an unsupported TRL version, a ``policy_loss`` that is not a ``PolicyLoss``, bad statistic
            arguments, or TRL settings an entrotrain loss cannot honour (listed in the module docstring).
    """

    def __init__(
        self,
        *args: Any,
        policy_loss: PolicyLoss | None = None,
        policy_stats: bool = True,
        stats_agg: str | None = None,
        top_fraction: float = 0.2,
        cov_top_fraction: float = 0.02,
        fit_min_points: int = 5,
        window: int | None = None,
        window_align: str = "forward",
        hwe_threshold: float = 1.5,
        entropy_length_corr: bool = False,
        stats_prefix: str = "entropy/policy/",
        print_summary: bool = True,
        **kwargs: Any,
    ) -> None:
        import trl

        check_trl_version(trl.__version__)
        if policy_loss is not None and not isinstance(policy_loss, PolicyLoss):
            raise EntrotrainError(
                f"policy_loss must be an entrotrain PolicyLoss (e.g. ClipCovLoss(), PPOClipLoss() + EntropyBonus(0.01))"
                f" or None for TRL's own loss, got {type(policy_loss).__name__}."
            )
        check_bool(policy_stats, "policy_stats")
        check_bool(print_summary, "print_summary")
        if stats_agg is not None:
            check_choice(stats_agg, "stats_agg", AGG_MODES)
        check_real(top_fraction, "top_fraction", low=0.0, low_open=True, high=1.0)
        check_real(cov_top_fraction, "cov_top_fraction", low=0.0, low_open=True, high=1.0)
        check_int(fit_min_points, "fit_min_points", low=2)
        if policy_loss is not None:
            self._check_loss_settings(kwargs.get("args", args[2] if len(args) > 2 else None))
        super().__init__(*args, **kwargs)
        self.policy_loss = policy_loss
        if policy_loss is not None:
            self._check_loss_settings(self.args)
            policy_loss.to(self.accelerator.device)
        agg = stats_agg or (_loss_agg(policy_loss) if policy_loss is not None else None)
        agg = agg or _TRL_AGG.get(self.loss_type, "token-mean")
        self.policy_stats: PolicyStatsRecorder | None = None
        if policy_stats:
            self.policy_stats = PolicyStatsRecorder(
                agg=agg, top_fraction=top_fraction, cov_top_fraction=cov_top_fraction, fit_min_points=fit_min_points,
                prefix=stats_prefix, window=window, window_align=window_align, hwe_threshold=hwe_threshold,
                entropy_length_corr=entropy_length_corr,
            )  # fmt: skip
        self.print_summary = print_summary
        self._et_capture: dict[str, Tensor] | None = None
        self._et_capturing = False
        self._et_step: int | None = None

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

    # ------------------------------------------------------------------------------------------------ capture
    def _stats_armed(self) -> bool:
        """Will the optimizer step now running be logged? (HF's DefaultFlowCallback rule for ``logging_steps``.)"""
        if self.policy_stats is None or not self.model.training:
            return False
        args = self.args
        step = self.state.global_step + 1
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if strategy != "steps":
            return strategy != "no"
        every = self.state.logging_steps or args.logging_steps
        every = max(1, int(math.ceil(every * self.state.max_steps)) if every < 1 else int(every))
        return (args.logging_first_step and step == 1) or step % every == 0

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # type: ignore[override]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._et_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):  # type: ignore[override]
        self._et_rewards_per_func = None
        output = super()._generate_and_score_completions(inputs)
        per_func = self._et_rewards_per_func
        self._et_rewards_per_func = None
        if self.policy_stats is not None and per_func is not None:
            # TRL's ``reward``: the weighted sum over reward functions, NaN where no function scored the completion
            rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
            rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
            n = output["prompt_ids"].shape[0]
            start = self.accelerator.process_index * n
            output["entrotrain_rewards"] = rewards[start : start + n]  # this process's completions
        return output

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):  # type: ignore[override]
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._et_capturing and entropies is not None:
            self._et_capture = {"logps": logps.detach(), "entropy": entropies.detach()}
        return logps, entropies, aux

    def _record(self, inputs: dict[str, Any]) -> None:
        """Keep this micro-batch's tensors for the statistics of the logging step."""
        captured, self._et_capture = self._et_capture, None
        assert self.policy_stats is not None
        if captured is None:
            return
        if self._et_step != self.state.global_step:  # a new optimizer step: drop a step that was not logged
            self.policy_stats.clear()
            self._et_step = self.state.global_step
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        old = inputs.get("old_per_token_logps")
        self.policy_stats.add(
            captured["entropy"],
            captured["logps"] if old is None else old,
            inputs["advantages"],
            mask,
            rewards=inputs.get("entrotrain_rewards"),
            temperature=self.temperature,
        )

    # ------------------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):  # type: ignore[override]
        self._et_capturing = self._stats_armed()
        try:
            if self.policy_loss is None:
                loss = super()._compute_loss(model, inputs)
            else:
                loss = self._entrotrain_loss(model, inputs)
            if self._et_capturing:
                self._record(inputs)
        finally:
            self._et_capturing = False
            self._et_capture = None
        return loss

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
        out = self.policy_loss(  # type: ignore[misc]
            per_token_logps, old, advantages, mask, entropy=entropies, step=int(self.state.global_step)
        )
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        loss = out.loss / normalizer
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / normalizer
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        metrics = self._metrics[mode]
        for key, value in sorted(out.metrics.items()):  # sorted: every rank gathers in the same order
            metrics[key].append(self.accelerator.gather(value.detach().float().reshape(1)).nanmean().item())
        with torch.no_grad():
            m = mask.to(entropies.dtype)
            totals = self.accelerator.reduce(torch.stack([(entropies.detach() * m).sum(), m.sum()]), reduction="sum")
            metrics["entropy"].append((totals[0] / totals[1].clamp(min=1.0)).item())  # TRL's own `entropy`
        return loss

    # ------------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # type: ignore[override]
        stats = self.policy_stats
        if stats is not None and self.model.training and stats.pending and "loss" in logs:
            if self._et_step == self.state.global_step - 1:  # the tensors are this logged step's
                logs = {**logs, **stats.compute(int(self.state.global_step))}
                self._record_arrays(stats.last_arrays, int(self.state.global_step))
            else:
                stats.clear()
        super().log(logs, start_time)

    def _record_arrays(self, arrays: list[Any], step: int) -> None:
        """The token-entropy histogram into the run record of an attached ``EntropyTrainerCallback(record=...)``, as
        Lightning's ``PolicyEntropyMonitor`` stores it (main process)."""
        if not arrays or not self.accelerator.is_main_process:
            return
        for callback in self.callback_handler.callbacks:
            record = getattr(callback, "record", None)
            if isinstance(record, RunRecordLogger):
                record.log_arrays(arrays, step)

    def train(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        if self.policy_stats is not None:
            self.policy_stats.reset()
        self._et_step = None
        output = super().train(*args, **kwargs)
        if self.print_summary and self.policy_stats is not None and self.accelerator.is_main_process:
            print(self.policy_stats_table())
        return output

    # ------------------------------------------------------------------------------------------------ resume
    def _save_checkpoint(self, model, trial):  # type: ignore[override]
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.policy_stats is not None:
            with open(os.path.join(folder, STATS_FILE), "w") as f:
                json.dump(self.policy_stats.state_dict(), f)
        if self.policy_loss is not None and self.policy_loss.state_dict():
            torch.save(self.policy_loss.state_dict(), os.path.join(folder, LOSS_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):  # type: ignore[override]
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATS_FILE)
        if self.policy_stats is not None and os.path.exists(path):
            with open(path) as f:
                self.policy_stats.load_state_dict(json.load(f))
        path = os.path.join(checkpoint, LOSS_FILE)
        if self.policy_loss is not None and os.path.exists(path):
            self.policy_loss.load_state_dict(torch.load(path, map_location=self.accelerator.device))

    def policy_stats_table(self) -> str:
        """First and last logged policy statistics and the entropy–reward fit, as text."""
        if self.policy_stats is None:
            return "policy entropy: statistics off (policy_stats=False)"
        return self.policy_stats.summary_table()
