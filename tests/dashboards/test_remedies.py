"""``remedies``: a failure is named only on its signal (and not just below it), a cure the run already uses is said
to be on, every recipe and class a cure names exists, and the report and ``entrotrain status`` show them."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

import entrotrain.regularizers as regularizers
from entrotrain._recipes import recipe_paths
from entrotrain.dashboards.remedies import POLICY_FALL, RANK_FALL, diagnose
from entrotrain.dashboards.run_reader import load_run
from entrotrain.dashboards.run_record import RunRecordLogger
from entrotrain.dashboards.terminal_status import run_lines


def _run(tmp_path: Path, rows: list[dict[str, float]], name: str = "r"):
    record = RunRecordLogger(tmp_path, version=name)
    for step, row in enumerate(rows):
        record.log_metrics(row, step=step)
    record.finalize("success")
    return load_run(record.run_dir)


def _attention(share: float, **extra: float) -> list[dict[str, float]]:
    return [{"entropy/attn/collapse_frac": 0.0, "entropy/attn_norm/min": 0.9, **extra},
            {"entropy/attn/collapse_frac": share, "entropy/attn_norm/min": 0.01, **extra}]


def test_attention_collapse_only_when_a_head_is_below_the_threshold(tmp_path: Path) -> None:
    assert diagnose(_run(tmp_path, _attention(0.0), "healthy")) == []
    (remedy,) = diagnose(_run(tmp_path, _attention(0.25), "sick"))
    assert remedy.failure == "Attention-entropy collapse"
    assert remedy.evidence == "25 % of heads below the collapse threshold at step 1 (least normalised head entropy 0.01)."
    assert "sigma_reparam(model)" in remedy.cures[0] and "EntropyFloorRegularizer" in remedy.cures[1]
    (on,) = diagnose(_run(tmp_path, _attention(0.25, **{"sigma_reparam/qk_norm/max": 3.0, "reg/entropy_floor": 0.1}),
                          "cured"))
    assert on.cures[0].startswith("σReparam is already on") and on.cures[1].startswith("The entropy floor is already on")


@pytest.mark.parametrize(("last", "named"), [(POLICY_FALL * 0.99, True), (POLICY_FALL * 1.01, False)])
def test_policy_collapse_at_the_fall_threshold(tmp_path: Path, last: float, named: bool) -> None:
    rows = [{"entropy/policy/mean": 1.0}, {"entropy/policy/mean": last}]
    found = diagnose(_run(tmp_path, rows))
    assert [r.failure for r in found] == (["Policy-entropy collapse"] if named else [])


def _policy_law_rows(last_reward: float | None = None, r2: float = 0.99) -> list[dict[str, float]]:
    """10 steps along R = -0.1 exp(H) + 0.37 (ceiling 0.27) as the entropy falls 1.2 -> 0.1, the fit at the end."""
    rows = []
    for i in range(10):
        h = 1.2 * (0.1 / 1.2) ** (i / 9)
        rows.append({"entropy/policy/mean": h, "entropy/policy/reward_mean": -0.1 * math.exp(h) + 0.37})
    if last_reward is not None:
        rows[-1]["entropy/policy/reward_mean"] = last_reward
    rows[-1].update({"entropy/policy/fit_a": 0.1, "entropy/policy/fit_b": 0.37, "entropy/policy/fit_ceiling": 0.27,
                     "entropy/policy/fit_r2": r2})
    return rows


def test_policy_collapse_says_when_the_reward_is_at_its_fitted_ceiling(tmp_path: Path) -> None:
    below = diagnose(_run(tmp_path, _policy_law_rows(last_reward=0.2), "below"))[0]
    at = diagnose(_run(tmp_path, _policy_law_rows(), "at"))[0]
    assert "ceiling" not in below.evidence
    assert "is at the fitted ceiling b − a = 0.27" in at.evidence
    assert any("KLCovLoss" in cure and "ClipCovLoss" in cure for cure in at.cures)


def test_a_ceiling_that_is_no_prediction_is_not_evidence(tmp_path: Path) -> None:
    """A fit with R² 0.16 (or, in the old record, a bare ceiling without its points) says nothing about a ceiling."""
    low = diagnose(_run(tmp_path, _policy_law_rows(r2=0.16), "low_r2"))[0]
    bare = [{"entropy/policy/mean": 1.2},
            {"entropy/policy/mean": 0.1, "entropy/policy/fit_ceiling": 0.27, "entropy/policy/reward_mean": 0.266}]
    two = diagnose(_run(tmp_path, bare, "two_points"))[0]
    assert "ceiling" not in low.evidence and "ceiling" not in two.evidence


@pytest.mark.parametrize(("ratio", "named"), [(RANK_FALL * 0.9, True), (RANK_FALL * 1.1, False)])
def test_rank_collapse_names_the_worst_layer(tmp_path: Path, ratio: float, named: bool) -> None:
    rows = [{"entropy/repr/a/rankme": 40.0, "entropy/repr/b/effective_rank": 40.0, "entropy/repr/b/matrix_entropy": 3.0},
            {"entropy/repr/a/rankme": 40.0 * ratio, "entropy/repr/b/effective_rank": 39.0,
             "entropy/repr/b/matrix_entropy": 0.1}]  # matrix entropy is not a rank: never judged
    found = diagnose(_run(tmp_path, rows))
    if not named:
        assert found == []
        return
    (remedy,) = found
    assert remedy.evidence.startswith("entropy/repr/a/rankme fell from 40 to")
    assert "MatrixEntropyRegularizer" in remedy.cures[0] and "MMCRLoss" in remedy.cures[1]


def test_router_collapse_and_a_router_loss_already_on(tmp_path: Path) -> None:
    assert diagnose(_run(tmp_path, [{"entropy/router/dead_frac_max": 0.0,
                                     "entropy/router/load_entropy_norm_min": 0.9}], "fine")) == []
    (remedy,) = diagnose(_run(tmp_path, [{"entropy/router/dead_frac_max": 0.25,
                                          "entropy/router/load_entropy_norm_min": 0.3}], "dead"))
    assert remedy.evidence == ("25 % of the experts of some layer are dead; the least normalised expert-load entropy is "
                               "0.3 at the last logging step.")
    (on,) = diagnose(_run(tmp_path, [{"entropy/router/dead_frac_max": 0.25, "reg/tsallis_router": 0.01,
                                      "reg/load_balancing": 0.02}], "on"))
    assert on.cures == ("The Tsallis router loss is already on: raise its weight.",)


def test_every_named_recipe_and_class_exists(tmp_path: Path) -> None:
    """The cures name recipes and classes: a renamed one would send a user nowhere."""
    rows = [
        {**_attention(0.0)[0], "entropy/policy/mean": 1.0, "entropy/repr/x/rankme": 10.0,
         "entropy/router/dead_frac_max": 0.0},
        {**_attention(0.5)[1], "entropy/policy/mean": 0.1, "entropy/repr/x/rankme": 1.0,
         "entropy/router/dead_frac_max": 0.5},
    ]
    found = diagnose(_run(tmp_path, rows))
    assert len(found) == 4
    text = " ".join(cure for remedy in found for cure in remedy.cures)
    recipes = {p.stem for p in recipe_paths()}
    named = set(re.findall(r"recipes? ([a-z0-9_]+)", text)) | set(re.findall(r"--recipe ([a-z0-9_]+)", text))
    named |= {m for m in re.findall(r"against ([a-z0-9_]+)", text)}
    named |= {m for m in re.findall(r", (grpo_[a-z_]+)", text)}
    assert named and named <= recipes, named - recipes
    classes = set(re.findall(r"`([A-Z][A-Za-z]+)\(", text)) | {"sigma_reparam"}
    trl = Path(regularizers.__file__).parents[1] / "integrations" / "trl.py"  # not imported: TRL is optional
    assert "EntrotrainGRPOTrainer" in classes and "class EntrotrainGRPOTrainer(" in trl.read_text()
    import entrotrain.callbacks as callbacks

    missing = [c for c in classes - {"EntrotrainGRPOTrainer"}
               if not hasattr(regularizers, c) and not hasattr(callbacks, c)]
    assert len(classes) >= 8 and not missing, missing


def test_report_and_status_show_what_to_try(tmp_path: Path) -> None:
    from entrotrain.dashboards.report import build_report

    run = _run(tmp_path, _attention(0.5))
    html = build_report([run.path]).read_text()
    assert '<h2 id="remedies">What to try</h2>' in html and "<code>model = sigma_reparam(model)</code>" in html
    text = "\n".join(run_lines(run))
    assert "What to try" in text and "Attention-entropy collapse: 50 % of heads" in text
    healthy = _run(tmp_path, _attention(0.0), "healthy")
    assert "What to try" not in build_report([healthy.path]).read_text()
    assert "What to try" not in "\n".join(run_lines(healthy))


def test_what_to_try_is_printed_for_a_sick_run_only_and_never_fails(tmp_path: Path) -> None:
    from entrotrain.dashboards.remedies import what_to_try

    sick = _run(tmp_path, _attention(0.5), "sick")
    lines = what_to_try(sick.path)
    assert lines[0] == "entrotrain: what to try" and lines[1].startswith("  Attention-entropy collapse: 50 %")
    assert what_to_try(_run(tmp_path, _attention(0.0), "healthy").path) == []
    assert what_to_try(tmp_path / "missing") == [] and what_to_try(tmp_path) == []  # unreadable: nothing, no error


def test_a_policy_loss_already_on_is_said_to_be_on(tmp_path: Path) -> None:
    """A Clip-Cov run (``grpo/policy/cov_selected`` logged) whose entropy still fell: raise its ratio; an entropy
    bonus run: raise its target."""
    fell = [{"entropy/policy/mean": 1.0}, {"entropy/policy/mean": 0.1}]
    (cov,) = diagnose(_run(tmp_path, [{**row, "grpo/policy/cov_selected": 3.0} for row in fell], "cov"))
    assert cov.cures[0].startswith("Clip-Cov / KL-Cov is already on") and "EntropyBonus" in cov.cures[1]
    (bonus,) = diagnose(_run(tmp_path, [{**row, "grpo/policy/entropy_coef": 0.01} for row in fell], "bonus"))
    assert "KLCovLoss" in bonus.cures[0] and bonus.cures[1].startswith("The entropy bonus is already on")
    (steer,) = diagnose(_run(tmp_path, [{**row, "policy/token_weight_mean": 0.9} for row in fell], "steer"))
    assert len(steer.cures) == 1


def test_attention_collapse_names_the_rollback_guard_or_says_it_already_rolled_back(tmp_path: Path) -> None:
    (fresh,) = diagnose(_run(tmp_path, _attention(0.25), "no_guard"))
    assert 'action="rollback"' in fresh.cures[-1] and "attention_rollback" in fresh.cures[-1]
    record = RunRecordLogger(tmp_path, version="rolled")
    for step, row in enumerate(_attention(0.25)):
        record.log_metrics(row, step=step)
    for step in (1, 1):
        record.log_event("entropy/attn_norm/min", "EntropyCollapseGuard at step 1: ... Rolled back ...", step,
                         level="rollback")
    record.finalize("success")
    (rolled,) = diagnose(load_run(record.run_dir))
    assert rolled.cures[-1].startswith("The guard rolled back 2 time(s) and the heads fell again")
