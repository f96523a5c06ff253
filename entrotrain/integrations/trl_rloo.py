r"""TRL adapter: entrotrain's policy-entropy statistics inside TRL's ``RLOOTrainer`` (REINFORCE Leave-One-Out).

::

    from entrotrain.integrations.trl_rloo import EntrotrainRLOOTrainer

    trainer = EntrotrainRLOOTrainer(
        model=model, reward_funcs=reward, args=RLOOConfig(...), train_dataset=ds, processing_class=tokenizer,
    )
    trainer.train(); print(trainer.policy_stats_table())

Supported TRL: ``1.16.x`` (:data:`~entrotrain.integrations.trl.SUPPORTED_TRL`, the same rule and check as
``EntrotrainGRPOTrainer``: the tensors live inside ``RLOOTrainer``'s private methods); any other version raises
:class:`~entrotrain.errors.EntrotrainError` naming the range.

**Statistics** (``policy_stats=True``, the default): the same ``entropy/policy/*`` keys as ``EntrotrainGRPOTrainer``,
computed by the same code — :class:`~entrotrain.integrations._trl_stats.PolicyStatsTrainerMixin` feeding
:class:`~entrotrain.integrations.policy_stats.PolicyStatsRecorder`, i.e.
:class:`~entrotrain.callbacks.policy_monitor.PolicyEntropyMonitor`'s own statistics, ΔH and ``R = -a·e^H + b`` fit —
logged into ``logs`` on TRL's logging steps, kept in checkpoints (``entrotrain_policy_stats.json``) and restored on
``train(resume_from_checkpoint=...)``, and written into an attached ``EntropyTrainerCallback(record=...)`` run record
(with the token-entropy histogram). Monitoring reads tensors TRL computes anyway (no extra forward): training is
bit-identical with and without it.

Choices stated (rl_entropy.md, "Choices an implementation must state"):

* **Entropy**: TRL's own ``entropies`` of the loss's forward, in nats at TRL's sampling ``temperature`` (logged as
  ``temperature``), from TRL's fused head in the model's dtype (the statistics are computed in float64).
* **Log-probs** of the sampled tokens: the rollout's per-token log-probs that RLOO computes in
  ``_generate_and_score_completions`` and sums into ``old_logps`` (their sum over the completion is ``old_logps``
  exactly) — as ``EntrotrainGRPOTrainer`` uses ``old_per_token_logps``. They ride in the trainer's buffered inputs
  (one ``(B, T)`` tensor per rollout, like TRL's ``completion_mask``), so a rollout reused by ``num_iterations > 1``
  keeps them.
* **Advantage**: RLOO's advantage is one number per sequence, :math:`A_i = r_i - \frac{1}{k-1}\sum_{j\ne i} r_j`
  over the ``num_generations`` siblings (after ``normalize_advantages``, 0 for an unscorable completion), as TRL
  computes it. It is **broadcast over its completion's tokens** for the token covariance of Cui et al. 2025,
  :math:`\mathrm{Cov}_t = (\log\pi(y_t) - \overline{\log\pi})(A_{s(t)} - \bar A)`, both means over the valid tokens
  of the logging step (so a sequence weighs by its length, as in verl's estimator).
* **Mask**: ``completion_mask`` (padding and tokens after EOS out), the mask of RLOO's loss.
* **Reward**: TRL's logged ``reward`` (the weighted sum of the reward functions, NaN where none scored the
  completion), i.e. before ``reward_clip_range`` and the ``beta`` KL penalty that shape the advantage.
  ``entropy/policy/reward_mean`` is its mean over the completions the logged step trained on (the rows of its
  entropies, so the entropy–reward fit pairs like with like); it equals TRL's ``reward`` when that step trained on
  one whole rollout and ``logging_steps=1``. TRL's ``reward`` averages every rollout generated since the last log
  (several with ``logging_steps > 1``; none on a step that reuses an earlier rollout, ``steps_per_generation`` greater
  than the gradient-accumulation steps or ``num_iterations > 1``), so the two then differ.
* **Aggregation** of ``entropy/policy/mean``: ``token-mean`` (TRL's own ``entropy`` metric). RLOO's loss sums the
  log-probs of a completion (``seq-mean-token-sum``), but a summed entropy grows with the completion's length and is
  no per-token entropy for the ``e^H`` fit; pass ``stats_agg="seq-mean-token-sum"`` to follow the loss.
* Statistics over the union of the logging step's micro-batches on all ranks; the realised ΔH is between logged
  steps (TRL has no post-update pass).

**Losses**: ``policy_loss=`` is refused. RLOO's loss is sequence-level (one importance ratio
:math:`\exp(\sum_t \log\pi - \sum_t \log\pi_{old})` and one advantage per completion, clipped per sequence), while
entrotrain's :class:`~entrotrain.regularizers.policy_loss.PolicyLoss` objects (Clip-Cov, KL-Cov, STEER,
``EntropyBonus``, ``PPOClipLoss``) select, clip or weight single tokens: there is no exact combination. Use
:class:`~entrotrain.integrations.trl.EntrotrainGRPOTrainer` for a token-level entrotrain loss.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from entrotrain.errors import EntrotrainError
from entrotrain.integrations._trl_stats import LOGPS_KEY, PolicyStatsTrainerMixin
from entrotrain.integrations.trl import check_trl_version  # checks the installed TRL on import

from trl import RLOOTrainer  # noqa: E402,I001  (after the version check: a moved internal would fail obscurely)

__all__ = ["EntrotrainRLOOTrainer"]


class EntrotrainRLOOTrainer(PolicyStatsTrainerMixin, RLOOTrainer):
    r"""TRL's ``RLOOTrainer`` with entrotrain's policy-entropy statistics (the choices are in the module docstring).

    Every positional and keyword argument of ``RLOOTrainer`` is accepted as is; the extra keywords are those of
    ``EntrotrainGRPOTrainer`` except ``policy_loss``:

    Args:
        policy_stats: log ``entropy/policy/...`` on logging steps.
        stats_agg: the aggregation of ``entropy/policy/mean`` (default ``token-mean``).
        top_fraction, cov_top_fraction, fit_min_points, window, window_align, hwe_threshold, entropy_length_corr:
            as :class:`~entrotrain.callbacks.policy_monitor.PolicyEntropyMonitor`.
        stats_prefix: key prefix (``"entropy/policy/"``).
        print_summary: print the first/last statistics and the entropy–reward fit when training ends (main process).
        policy_loss: must be ``None`` (RLOO's loss is sequence-level; see the module docstring).

    Raises:
        EntrotrainError: an unsupported TRL version, a ``policy_loss``, or a bad statistic argument.
    """

    _KEEP_ROLLOUT_LOGPS = True

    def __init__(self, *args: Any, policy_loss: Any = None, **kwargs: Any) -> None:
        import trl

        check_trl_version(trl.__version__)
        if policy_loss is not None:
            raise EntrotrainError(
                f"EntrotrainRLOOTrainer does not take policy_loss (got {type(policy_loss).__name__}): RLOO's loss is "
                "sequence-level (one importance ratio of the summed log-probs and one leave-one-out advantage per "
                "completion), while entrotrain's PolicyLoss objects (ClipCovLoss, KLCovLoss, SteerLoss, EntropyBonus, "
                "PPOClipLoss) clip, select or weight single tokens, so no exact combination exists. Fix: use "
                "entrotrain.integrations.trl.EntrotrainGRPOTrainer(policy_loss=...) for a token-level loss, or drop "
                "policy_loss to train with RLOO's own loss (the entropy statistics are logged either way)."
            )
        super().__init__(*args, **kwargs)

    def _stats_tensors(self, inputs: dict[str, Any], captured: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The rollout's per-token log-probs (the current ones, detached, if a batch came without them) and
        ``completion_mask``."""
        logps = inputs.get(LOGPS_KEY)
        return (captured["logps"] if logps is None else logps), inputs["completion_mask"]
