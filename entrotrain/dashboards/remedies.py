"""What to try when a run record shows a collapse: the diagnosis, with the cures entrotrain ships and the recipe that
shows each on a CPU.

:func:`diagnose` reads the same numbers as the report's findings and names a failure only on a clear signal:

* **attention-entropy collapse** (Zhai et al. 2023): some heads end below the monitor's collapse threshold and more
  than at the first logging step (``entropy/attn/collapse_frac`` > 0 and risen; heads sharp from initialisation are
  not a collapse, as for the guard's ``arm_on_good``) → σReparam, the entropy floor, a lower learning rate / warmup;
* **policy-entropy collapse** (Cui et al. 2025): ``entropy/policy/mean`` ends below a quarter of its first value →
  KL-Cov / Clip-Cov, an adaptive entropy bonus, STEER; and when the fitted ``R = −a·e^H + b`` says the reward is
  within 5 % of its ceiling ``b − a`` (and that ceiling is a prediction:
  :func:`~entrotrain.functional.entropy_reward_fit.ceiling_verdict`), that more steps will not raise it;
* **representation rank collapse**: a layer's RankMe (or effective rank) ends below a fifth of its first value →
  matrix-entropy or MMCR regularisers, and in a Siamese SSL model the stop-gradient;
* **router collapse** (MoE): an expert is dead in some layer (``entropy/router/dead_frac_max`` > 0) or the least
  normalised load entropy ends below 0.5 → DynMoLE's Tsallis router loss, Switch load balancing.

A cure the run already uses is said to be on (``sigma_reparam/*`` keys, a logged ``reg/{name}`` term, a policy
loss's own metrics: ``policy/cov_selected`` for Clip-Cov / KL-Cov, ``policy/entropy_coef`` for the entropy bonus,
``policy/token_weight_mean`` for STEER) instead of suggested. The thresholds are deliberately coarse: this is a
pointer for the night the run goes wrong, with the evidence beside it, not a verdict. The report shows it as "What to
try", ``entrotrain status`` under its findings, and a run that writes a record prints it when it ends
(:func:`what_to_try`: ``entrotrain fit``, ``EntropyMonitors``, ``EntropyTrainerCallback``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from entrotrain.dashboards.report_figures import shown_ceiling
from entrotrain.dashboards.report_template import fmt
from entrotrain.dashboards.run_reader import RunData, load_run
from entrotrain.errors import EntrotrainError

__all__ = ["POLICY_FALL", "RANK_FALL", "Remedy", "diagnose", "what_to_try"]

#: Policy entropy ending below this fraction of its first value counts as a collapse.
POLICY_FALL = 0.25
#: RankMe / effective rank ending below this fraction of its first value counts as a rank collapse.
RANK_FALL = 0.2
_CEILING_GAP = 0.05  # reward within this fraction of the fitted ceiling b − a: at the ceiling
_LOAD_ENTROPY_FLOOR = 0.5


@dataclass(frozen=True)
class Remedy:
    """One diagnosed failure: what it is, the evidence from the record, and the cures to try (sentences)."""

    failure: str
    evidence: str
    cures: tuple[str, ...]

    def lines(self) -> list[str]:
        """The remedy as text: ``failure: evidence`` and one line per cure."""
        return [f"{self.failure}: {self.evidence}", *(f"  → {cure}" for cure in self.cures)]


def _uses(run: RunData, *names: str) -> bool:
    return any(key == f"reg/{name}" or key.startswith(f"reg/{name}/") for key in run.scalars for name in names)


def _logs_metric(run: RunData, name: str) -> bool:
    """Whether the run logs a policy loss's metric ``name`` (``policy/cov_selected`` ...) under any prefix
    (``grpo/`` in the GRPO task, TRL's own)."""
    return any(key == name or key.endswith("/" + name) for key in run.scalars)


def _last(run: RunData, key: str) -> float | None:
    fl = run.first_last(key)
    return None if fl is None else fl[1]


def _attention(run: RunData) -> Remedy | None:
    fl = run.first_last("entropy/attn/collapse_frac")
    if fl is None or not fl[1] > 0 or not fl[1] > fl[0]:  # a collapse is a rise: heads sharp from step 0 are not one
        return None
    share = fl[1]
    steps = run.scalars["entropy/attn/collapse_frac"][0]
    least = _last(run, "entropy/attn_norm/min")
    evidence = f"{100 * share:.0f} % of heads below the collapse threshold at step {int(steps[-1])}"
    evidence += f" (least normalised head entropy {fmt(least)})." if least is not None else "."
    cures = []
    if any(key.startswith("sigma_reparam/") for key in run.scalars):
        cures.append("σReparam is already on: add the entropy floor below, or lower the learning rate.")
    else:
        cures.append("σReparam (Zhai et al. 2023): `model = sigma_reparam(model)` bounds the attention logits' "
                     "spectral norm, function-preserving at step 0; `entrotrain fit --recipe "
                     "attention_collapse_sigma_reparam` shows it on the collapsing GPT.")
    if _uses(run, "entropy_floor"):
        cures.append("The entropy floor is already on: raise its weight or its floor.")
    else:
        cures.append("An entropy floor on the collapsing heads only: `EntropyFloorRegularizer(weight=1.0, floor=0.2)` "
                     "(recipe attention_collapse_entropy_floor).")
    cures.append("A lower learning rate or a warmup: the collapse follows a high learning rate without warmup "
                 "(recipe attention_baseline, lr 1e-3).")
    rollbacks = [e for e in run.guard_firings if e.get("level") == "rollback"]
    if rollbacks:
        cures.append(f"The guard rolled back {len(rollbacks)} time(s) and the heads fell again: raise its threshold "
                     "so that the state it holds is from before the fall began (the recipe's 0.2), hold more states "
                     "so that a fall that comes back goes further back (`rollback_states=4`, recipe "
                     "attention_rollback_states), or lower its lr_factor.")
    else:
        cures.append("Let the run roll itself back: `EntropyCollapseGuard(threshold=0.2, action=\"rollback\", "
                     "lr_factor=0.1)` holds the last good state in memory and goes back to it at a tenth of the "
                     "learning rate (recipe attention_rollback).")
    return Remedy("Attention-entropy collapse", evidence, tuple(cures))


def _policy(run: RunData) -> Remedy | None:
    fl = run.first_last("entropy/policy/mean")
    if fl is None or not (fl[0] > 0 and fl[1] < POLICY_FALL * fl[0]):
        return None
    evidence = f"policy entropy fell from {fmt(fl[0])} to {fmt(fl[1])} nats ({100 * (fl[1] / fl[0] - 1):+.0f} %)"
    ceiling, reward = _last(run, "entropy/policy/fit_ceiling"), _last(run, "entropy/policy/reward_mean")
    if (ceiling is not None and reward is not None and ceiling > 0 and reward >= (1 - _CEILING_GAP) * ceiling
            and shown_ceiling(run)):
        evidence += (f"; the reward {fmt(reward)} is at the fitted ceiling b − a = {fmt(ceiling)}: with the entropy "
                     "spent, more steps will not raise it (Cui et al. 2025)")
    cures = []
    if _logs_metric(run, "policy/cov_selected"):
        cures.append("Clip-Cov / KL-Cov is already on: a larger `clip_ratio` / `k_ratio` acts on more tokens and keeps "
                     "more entropy.")
    else:
        cures.append(
            "KL-Cov or Clip-Cov (Cui et al. 2025) on the few tokens with the largest log-prob × advantage covariance: "
            "`KLCovLoss(k_ratio=...)`, `ClipCovLoss(clip_ratio=...)` as the policy loss (TRL: "
            "`EntrotrainGRPOTrainer(policy_loss=...)`; verl: `loss_mode=entrotrain_kl_cov`); recipes grpo_kl_cov, "
            "grpo_clip_cov. A toy batch needs ratios far above the paper's."
        )
    if _logs_metric(run, "policy/entropy_coef"):
        cures.append("The entropy bonus is already on: raise its `target` (or `coef_max`).")
    elif not _logs_metric(run, "policy/token_weight_mean"):
        cures.append("An adaptive entropy bonus towards a target entropy: `EntropyBonus(coef=..., target=...)` "
                     "(recipe grpo_entropy_bonus), or STEER's token weights `SteerLoss()` (recipe grpo_steer).")
    return Remedy("Policy-entropy collapse", evidence + ".", tuple(cures))


def _representation(run: RunData) -> Remedy | None:
    fallen = []
    for key in sorted(run.scalars):
        if not key.startswith("entropy/repr/") or key.rsplit("/", 1)[-1] not in ("rankme", "effective_rank"):
            continue
        fl = run.first_last(key)
        if fl is not None and fl[0] > 0 and fl[1] < RANK_FALL * fl[0]:
            fallen.append((fl[1] / fl[0], key, fl))
    if not fallen:
        return None
    fallen.sort()
    ratio, key, (first, last) = fallen[0]
    more = f" ({len(fallen) - 1} more layer/measure pair(s) too)" if len(fallen) > 1 else ""
    evidence = f"{key} fell from {fmt(first)} to {fmt(last)} (×{ratio:.2g}){more}."
    cures = []
    for name, text in (
        ("matrix_entropy", "A spectral-entropy term on the collapsing layer: `MatrixEntropyRegularizer(weight=..., "
                           "include=...)` (recipe ssl_rank_collapse_entropy_reg)."),
        ("mmcr", "For multi-view SSL, MMCR (Yerxa et al. 2023): `MMCRLoss(n_views=...)` (recipe ssl_mmcr)."),
    ):
        cures.append(f"The {name} term is already on: raise its weight." if _uses(run, name) else text)
    cures.append("In a Siamese SSL model (SimSiam, BYOL), check the stop-gradient on the target branch "
                 "(recipe ssl_stop_gradient, against ssl_rank_collapse).")
    return Remedy("Representation rank collapse", evidence, tuple(cures))


def _router(run: RunData) -> Remedy | None:
    dead, least = _last(run, "entropy/router/dead_frac_max"), _last(run, "entropy/router/load_entropy_norm_min")
    signs = []
    if dead is not None and dead > 0:
        signs.append(f"{100 * dead:.0f} % of the experts of some layer are dead")
    if least is not None and least < _LOAD_ENTROPY_FLOOR:
        signs.append(f"the least normalised expert-load entropy is {fmt(least)}")
    if not signs:
        return None
    cures = []
    if _uses(run, "tsallis_router"):
        cures.append("The Tsallis router loss is already on: raise its weight.")
    else:
        cures.append("DynMoLE's Tsallis router entropy loss: `TsallisRouterLoss(weight=0.01, q=1.1)` "
                     "(recipe moe_router_tsallis, against moe_router_collapse).")
    if not _uses(run, "load_balancing"):
        cures.append("Switch-style load balancing: `LoadBalancingLoss(weight=0.01, top_k=...)`.")
    return Remedy("Router collapse", "; ".join(signs) + " at the last logging step.", tuple(cures))


def diagnose(run: RunData) -> list[Remedy]:
    """The failures ``run`` shows, each with its evidence and the cures to try (empty for a healthy run)."""
    found = (_attention(run), _policy(run), _representation(run), _router(run))
    return [remedy for remedy in found if remedy is not None]


def what_to_try(run_dir: str | os.PathLike[str]) -> list[str]:
    """The lines a run prints when it ends: ``diagnose`` of the record at ``run_dir`` (nothing for a healthy run, or
    a record that cannot be read: the end of a run never fails over this)."""
    try:
        found = diagnose(load_run(run_dir, require_monitors=False))
    except (EntrotrainError, OSError, ValueError):
        return []
    if not found:
        return []
    return ["entrotrain: what to try", *(f"  {line}" for remedy in found for line in remedy.lines())]
