r"""The policy-entropy statistics shared by entrotrain's TRL trainers (``EntrotrainGRPOTrainer``,
``EntrotrainRLOOTrainer``): one mixin, placed before TRL's trainer class in the bases.

Glue only (DESIGN.md §8): the statistics are :class:`~entrotrain.integrations.policy_stats.PolicyStatsRecorder`'s,
i.e. :class:`~entrotrain.callbacks.policy_monitor.PolicyEntropyMonitor`'s own code. The mixin

* arms a capture on the optimizer steps that log (HF's ``logging_steps`` rule) and keeps, detached, the tensors TRL
  computes anyway: ``entropies`` from the loss's ``_get_per_token_logps_and_entropies`` call, the per-token log-probs
  of the rollout (the first such call of ``_generate_and_score_completions``, for trainers that ask:
  :attr:`PolicyStatsTrainerMixin._KEEP_ROLLOUT_LOGPS`), TRL's per-sequence reward (the weighted sum of
  ``_calculate_rewards``, NaN where no function scored the completion) — no extra forward, no change to training;
* at ``log`` adds the statistics of the logged step to ``logs`` (a collective: every rank), and the token-entropy
  histogram to an attached ``EntropyTrainerCallback(record=...)``'s run record;
* saves/restores the statistics' history (and an entrotrain loss's buffers, if the trainer has one) with checkpoints.

A trainer supplies :meth:`~PolicyStatsTrainerMixin._default_stats_agg` and
:meth:`~PolicyStatsTrainerMixin._stats_tensors` (which log-probs and mask its loss uses). Imports neither TRL nor
transformers.
"""

from __future__ import annotations

import functools
import json
import math
import os
from typing import Any

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_choice, check_int, check_real, check_str
from entrotrain.dashboards.run_record import RunRecordLogger
from entrotrain.functional._dist import world
from entrotrain.functional.policy import AGG_MODES
from entrotrain.integrations.policy_stats import PolicyStatsRecorder

__all__ = ["LOSS_FILE", "STATS_FILE", "PolicyStatsTrainerMixin"]

#: Files a checkpoint folder gets beside TRL's: the statistics' history (ΔH pairs, fit points) and the loss's state.
STATS_FILE = "entrotrain_policy_stats.json"
LOSS_FILE = "entrotrain_policy_loss.pt"

#: The ``inputs`` keys the mixin adds to TRL's generation output (this process's rows, split/shuffled with the rest).
REWARDS_KEY = "entrotrain_rewards"
LOGPS_KEY = "entrotrain_rollout_logps"


class PolicyStatsTrainerMixin:
    r"""``entropy/policy/*`` statistics for a TRL online trainer (first in the bases: ``class T(Mixin, GRPOTrainer)``).

    Keyword arguments (the rest go to TRL's trainer):

    Args:
        policy_stats: log ``entropy/policy/...`` on logging steps.
        stats_agg: the aggregation of ``entropy/policy/mean``; ``None``: the trainer's :meth:`_default_stats_agg`.
        top_fraction, cov_top_fraction, fit_min_points, window, window_align, hwe_threshold, entropy_length_corr:
            as :class:`~entrotrain.callbacks.policy_monitor.PolicyEntropyMonitor`.
        stats_prefix: key prefix (``"entropy/policy/"``).
        print_summary: print the first/last statistics and the entropy–reward fit when training ends (main process).

    Raises:
        EntrotrainError: a bad statistic argument (naming it), before TRL builds anything.
    """

    #: Keep the rollout's per-token log-probs (the trainer's inputs hold only their per-sequence sum: RLOO).
    _KEEP_ROLLOUT_LOGPS = False

    #: An entrotrain loss whose buffers a checkpoint keeps (``None``: TRL's own loss).
    policy_loss: Any = None

    def __init__(
        self,
        *args: Any,
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
        check_bool(policy_stats, "policy_stats")
        check_bool(print_summary, "print_summary")
        if stats_agg is not None:
            check_choice(stats_agg, "stats_agg", AGG_MODES)
        check_real(top_fraction, "top_fraction", low=0.0, low_open=True, high=1.0)
        check_real(cov_top_fraction, "cov_top_fraction", low=0.0, low_open=True, high=1.0)
        check_int(fit_min_points, "fit_min_points", low=2)
        check_str(stats_prefix, "stats_prefix", empty_ok=True)
        recorder = functools.partial(
            PolicyStatsRecorder, top_fraction=top_fraction, cov_top_fraction=cov_top_fraction,
            fit_min_points=fit_min_points, prefix=stats_prefix, window=window, window_align=window_align,
            hwe_threshold=hwe_threshold, entropy_length_corr=entropy_length_corr,
        )  # fmt: skip
        if policy_stats:
            recorder(agg=stats_agg or "token-mean")  # the monitor's own checks of the rest, before TRL builds anything
        self._et_capture: dict[str, Tensor] | None = None
        self._et_capturing = False
        self._et_step: int | None = None
        self._et_rollout: list[Tensor] | None = None
        self._et_rewards_per_func: Tensor | None = None
        super().__init__(*args, **kwargs)
        self.policy_stats: PolicyStatsRecorder | None = None
        if policy_stats:  # the default aggregation may read what TRL's __init__ set (GRPO's loss_type)
            agg = stats_agg or self._default_stats_agg()
            self.policy_stats = recorder(agg=agg, agg_max_length=self._stats_max_length(agg))
        self.print_summary = print_summary

    # ------------------------------------------------------------------------------------------------ trainer hooks
    def _default_stats_agg(self) -> str:
        """The aggregation of ``entropy/policy/mean`` when ``stats_agg`` is not given."""
        return "token-mean"

    def _stats_max_length(self, agg: str) -> int | None:
        """The constant length :math:`L` of ``agg="seq-mean-token-sum-norm"`` (``None``: the padded width)."""
        return None

    def _stats_tensors(self, inputs: dict[str, Any], captured: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(logprobs, mask)``, both ``(B, T)``, of this micro-batch for the statistics."""
        raise NotImplementedError

    def _loss(self, model: Any, inputs: dict[str, Any]) -> Tensor:
        """The training loss (TRL's own by default)."""
        return super()._compute_loss(model, inputs)  # type: ignore[misc]

    # ------------------------------------------------------------------------------------------------ capture
    def _stats_armed(self) -> bool:
        """Will the optimizer step now running be logged? (HF's DefaultFlowCallback rule for ``logging_steps``.)"""
        if self.policy_stats is None or not self.model.training:
            return False
        args = self.args
        step = self.state.global_step + 1
        if args.logging_first_step and step == 1:  # whatever the strategy, "no" included
            return True
        strategy = str(getattr(args.logging_strategy, "value", args.logging_strategy))
        if strategy != "steps":
            return strategy != "no"
        every = self.state.logging_steps or args.logging_steps
        every = max(1, int(math.ceil(every * self.state.max_steps)) if every < 1 else int(every))
        return step % every == 0

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):  # type: ignore[override]
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._et_rewards_per_func = rewards_per_func
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):  # type: ignore[override]
        self._et_rewards_per_func = None
        self._et_rollout = [] if self.policy_stats is not None and self._KEEP_ROLLOUT_LOGPS else None
        try:
            output = super()._generate_and_score_completions(inputs)
            per_func, rollout = self._et_rewards_per_func, self._et_rollout
        finally:
            self._et_rewards_per_func, self._et_rollout = None, None
        if self.policy_stats is None:
            return output
        if per_func is not None:
            # TRL's ``reward``: the weighted sum over reward functions, NaN where no function scored the completion
            rewards = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
            rewards[torch.isnan(per_func).all(dim=1)] = torch.nan
            n = output["prompt_ids"].shape[0]
            start = self.accelerator.process_index * n
            output[REWARDS_KEY] = rewards[start : start + n]  # this process's completions
        if rollout and rollout[0].shape == output["completion_ids"].shape:
            output[LOGPS_KEY] = rollout[0]  # the first call: the policy's rollout log-probs (before any reference)
        return output

    def _get_per_token_logps_and_entropies(self, *args, **kwargs):  # type: ignore[override]
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        if self._et_capturing and entropies is not None:
            self._et_capture = {"logps": logps.detach(), "entropy": entropies.detach()}
        elif self._et_rollout is not None:
            self._et_rollout.append(logps.detach())
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
        logprobs, mask = self._stats_tensors(inputs, captured)
        self.policy_stats.add(
            captured["entropy"], logprobs, inputs["advantages"], mask, rewards=inputs.get(REWARDS_KEY),
            temperature=self.temperature,
        )  # fmt: skip

    def _compute_loss(self, model, inputs):  # type: ignore[override]
        self._et_capturing = self._stats_armed()
        try:
            loss = self._loss(model, inputs)
            if self._et_capturing:
                self._record(inputs)
        finally:
            self._et_capturing = False
            self._et_capture = None
        return loss

    # ------------------------------------------------------------------------------------------------ logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:  # type: ignore[override]
        stats = self.policy_stats
        # under torch.distributed every rank joins the recorder's exchange at a training log, one that captured
        # nothing too (the others would wait for it in the gather): a mismatch is an error on every rank
        if stats is not None and self.model.training and "loss" in logs and (stats.pending or world()[1] > 1):
            if self._et_step != self.state.global_step - 1:  # not this logged step's tensors
                stats.clear()
            logs = {**logs, **stats.compute(int(self.state.global_step))}
            self._record_arrays(stats.last_arrays, int(self.state.global_step))
        super().log(logs, start_time)  # type: ignore[misc]

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
        output = super().train(*args, **kwargs)  # type: ignore[misc]
        if self.print_summary and self.policy_stats is not None and self.accelerator.is_main_process:
            print(self.policy_stats_table())
        return output

    def policy_stats_table(self) -> str:
        """First and last logged policy statistics and the entropy–reward fit, as text."""
        if self.policy_stats is None:
            return "policy entropy: statistics off (policy_stats=False)"
        return self.policy_stats.summary_table()

    # ------------------------------------------------------------------------------------------------ resume
    def _save_checkpoint(self, model, trial):  # type: ignore[override]
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        if not self.args.should_save:
            return
        folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
        if self.policy_stats is not None:
            with open(os.path.join(folder, STATS_FILE), "w") as f:
                json.dump(self.policy_stats.state_dict(), f)
        if self.policy_loss is not None and self.policy_loss.state_dict():
            torch.save(self.policy_loss.state_dict(), os.path.join(folder, LOSS_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):  # type: ignore[override]
        super()._load_optimizer_and_scheduler(checkpoint)  # type: ignore[misc]
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATS_FILE)
        if self.policy_stats is not None and os.path.exists(path):
            with open(path) as f:
                self.policy_stats.load_state_dict(json.load(f))
        path = os.path.join(checkpoint, LOSS_FILE)
        if self.policy_loss is not None and os.path.exists(path):
            self.policy_loss.load_state_dict(torch.load(path, map_location=self.accelerator.device))
