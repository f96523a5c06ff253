"""entrotrain report: token-shaping statistics in the policy section (PolicyEntropyMonitor's phase, window / HWE and
entropy–length keys).

Run records are synthetic, written through RunRecordLogger the way a PolicyEntropyMonitor run with ``window``,
``phase_ids`` and ``entropy_length_corr`` writes them: the PEAR run's thinking-phase entropy and length fall, the
baseline's stay put. Every expected number below is recomputed from what the writer logged.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from entrotrain.dashboards import report_figures_policy_shaping as shaping_figs  # noqa: E402
from entrotrain.dashboards.report import write_report  # noqa: E402
from entrotrain.dashboards.report_template import fmt  # noqa: E402
from entrotrain.dashboards.run_reader import RunData, load_run  # noqa: E402
from entrotrain.dashboards.run_record import RunRecordLogger  # noqa: E402
from tests.helpers.report_page import parse_page  # noqa: E402

P = "entropy/policy"
STEPS = list(range(0, 101, 10))


def series(step: int, pear: bool) -> dict[str, float]:
    a = step / STEPS[-1]
    think = 1.5 - (0.3 if pear else 0.05) * a
    answer = 0.6 - 0.2 * a
    return {
        f"{P}/mean": 0.5 * (think + answer),
        f"{P}/reward_mean": 0.2 + 0.5 * a,
        f"{P}/phase0/mean": think,
        f"{P}/phase1/mean": answer,
        f"{P}/phase0/length": 9.1 - (3.8 if pear else 0.5) * a,
        f"{P}/phase1/length": 3.0,
        f"{P}/window_mean": think * 0.9,
        f"{P}/window_p50": think * 0.85,
        f"{P}/window_p90": think * 1.2,
        f"{P}/hwe_frac": 0.4 - 0.25 * a,
        f"{P}/entropy_length_corr": 0.2 + 0.3 * a,
        f"{P}/tokens": 128.0,
    }


def write_policy_run(root: Path, name: str, pear: bool, keep: tuple[str, ...] | None = None,
                     extra_phase: bool = False) -> Path:
    logger = RunRecordLogger(root, name="records", version=name, run_name=name)
    for step in STEPS:
        m = series(step, pear)
        if keep is not None:
            m = {k: v for k, v in m.items() if k[len(P) + 1 :] in keep}
        if extra_phase:
            m[f"{P}/phase2/mean"] = 0.1 + step / 1000
        logger.log_metrics(m, step=step)
    logger.finalize("success")
    return root / "records" / name


def _findings(page) -> list[str]:
    return [t for t in page.text if "Policy shaping:" in t]


def test_phase_and_window_figures_and_findings(tmp_path):
    run_dir = write_policy_run(tmp_path, "pear", pear=True)
    page = parse_page(write_report([load_run(run_dir)]))
    assert {"policy_entropy_reward.png", "policy_phases.png", "policy_window_entropy.png"} <= set(page.images)
    first, last = series(STEPS[0], True), series(STEPS[-1], True)
    text = page.joined
    assert (f"entropy at the end (step 100): thinking (phase 0) {fmt(last[f'{P}/phase0/mean'])} nats vs answer (phase 1) "
            f"{fmt(last[f'{P}/phase1/mean'])} nats") in text
    assert f"thinking (phase 0) length {fmt(first[f'{P}/phase0/length'])} → {fmt(last[f'{P}/phase0/length'])} tokens" in text
    assert f"HWE tokens {100 * first[f'{P}/hwe_frac']:.0f} % → {100 * last[f'{P}/hwe_frac']:.0f} %" in text
    assert f"window entropy {fmt(first[f'{P}/window_mean'])} → {fmt(last[f'{P}/window_mean'])} nats" in text
    corr = [series(s, True)[f"{P}/entropy_length_corr"] for s in STEPS]
    assert f"entropy–length correlation {fmt(corr[-1], 2)} at step 100 (mean {fmt(float(np.mean(corr)), 2)} over 11" in text


def test_drawn_keys_leave_the_generic_grid():
    for key in (f"{P}/phase0/mean", f"{P}/phase12/length", f"{P}/window_p90", f"{P}/hwe_frac", f"{P}/entropy_length_corr"):
        assert shaping_figs.shaping_drawn(key), key
    for key in (f"{P}/mean", f"{P}/p90", f"{P}/phase0/other", "entropy/pred/probe/mean", f"{P}/window"):
        assert not shaping_figs.shaping_drawn(key), key


def test_phase_names():
    assert shaping_figs.phase_name(0, [0, 1]).startswith("thinking") and shaping_figs.phase_name(1, [0, 1]).startswith("answer")
    assert shaping_figs.phase_name(2, [0, 1, 2]) == "phase 2" and shaping_figs.phase_name(0, [0, 1, 2]) == "phase 0"


def test_three_phases_are_named_by_number(tmp_path):
    run = load_run(write_policy_run(tmp_path, "three", pear=False, extra_phase=True))
    page = parse_page(write_report([run], tmp_path / "out"))
    assert shaping_figs.phase_ids([run]) == [0, 1, 2]
    assert "phase 0 " in page.joined and "phase 2 " in page.joined and "thinking" not in " ".join(_findings(page))


def test_two_runs_overlaid(tmp_path):
    a = load_run(write_policy_run(tmp_path, "baseline", pear=False))
    b = load_run(write_policy_run(tmp_path, "pear", pear=True))
    page = parse_page(write_report([a, b], tmp_path / "out"))
    assert {"policy_phases.png", "policy_window_entropy.png"} <= set(page.images)
    lengths = [t for t in _findings(page) if "length" in t and "tokens" in t]
    assert len(lengths) == 2  # one per run
    end_a, end_b = series(100, False)[f"{P}/phase0/length"], series(100, True)[f"{P}/phase0/length"]
    assert any(f"→ {fmt(end_a)} tokens" in t for t in lengths) and any(f"→ {fmt(end_b)} tokens" in t for t in lengths)
    assert (f"At the end, the thinking (phase 0) length is {fmt(end_a)} tokens in baseline and {fmt(end_b)} tokens in "
            "pear.") in page.joined
    hwe = series(100, True)[f"{P}/hwe_frac"]
    assert f"At the end, HWE tokens are {100 * hwe:.0f} % in baseline and {100 * hwe:.0f} % in pear." in page.joined


def test_missing_keys_give_no_figure(tmp_path):
    only_mean = load_run(write_policy_run(tmp_path, "plain", pear=False, keep=("mean", "reward_mean")))
    page = parse_page(write_report([only_mean], tmp_path / "plain_out"))
    assert "policy_entropy_reward.png" in page.images
    assert "policy_phases.png" not in page.images and "policy_window_entropy.png" not in page.images
    assert _findings(page) == []
    # only the HWE share: the window figure has just that panel; no phase figure
    hwe = load_run(write_policy_run(tmp_path, "hwe", pear=False, keep=("hwe_frac",)))
    page = parse_page(write_report([hwe], tmp_path / "hwe_out"))
    assert "policy_window_entropy.png" in page.images and "policy_phases.png" not in page.images
    assert len(_findings(page)) == 1


def test_nonfinite_values_never_break_a_figure_or_a_finding(tmp_path):
    run = load_run(write_policy_run(tmp_path, "poisoned", pear=True))
    scalars = {k: (s.copy(), v.copy()) for k, (s, v) in run.scalars.items()}
    scalars[f"{P}/phase0/mean"][1][[0, -1]] = [np.nan, np.inf]
    scalars[f"{P}/phase1/mean"][1][-1] = -np.inf
    scalars[f"{P}/phase0/length"][1][-1] = np.nan
    scalars[f"{P}/hwe_frac"][1][:] = np.nan
    scalars[f"{P}/entropy_length_corr"][1][-1] = np.nan
    scalars[f"{P}/window_p90"][1][3] = np.inf
    poisoned = RunData(path=run.path, meta=dict(run.meta), scalars=scalars, hparams=run.hparams)
    page = parse_page(write_report([poisoned], tmp_path / "out"))
    assert {"policy_phases.png", "policy_window_entropy.png"} <= set(page.images)
    findings = _findings(page)
    assert not any(re.search(r"\b(nan|inf)\b", t) for t in findings)
    s90 = series(90, True)
    assert f"thinking (phase 0) {fmt(s90[f'{P}/phase0/mean'])} nats vs answer (phase 1) {fmt(s90[f'{P}/phase1/mean'])} nats" in page.joined
    assert f"length {fmt(series(0, True)[f'{P}/phase0/length'])} → {fmt(s90[f'{P}/phase0/length'])} tokens" in page.joined
    assert "HWE tokens" not in page.joined.split("What happened")[1].split("Policy entropy")[0]
    assert "at step 90 (mean" in page.joined


def test_real_grpo_pear_fit_record(tmp_path):
    """A short real GRPOTask + PEARShaping fit with the monitor's shaping statistics on: its record gives both figures
    and the phase findings quote the logged values."""
    import torch

    from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor
    from entrotrain.regularizers.token_shaping import PEARShaping
    from entrotrain.tasks.arithmetic import EOS, ArithmeticDataModule
    from entrotrain.tasks.grpo import GRPOTask
    from tests.helpers.lightning_models import quiet_trainer

    torch.manual_seed(0)
    dm = ArithmeticDataModule(num_digits=1, operation="add", prompts_per_batch=4, num_batches=2, seed=0)
    task = GRPOTask(n_layer=1, n_head=2, n_embd=32, block_size=12, group_size=4, ppo_epochs=1, num_mini_batches=1,
                    sft_steps=1, sft_batch_size=8, reward_shaping=PEARShaping(delimiter_ids=EOS, think_coef=0.2))
    monitor = PolicyEntropyMonitor(window=2, entropy_length_corr=True, print_summary=False, log_media=False)
    logger = RunRecordLogger(tmp_path, name="records", version="pear", run_name="pear")
    trainer = quiet_trainer(callbacks=[monitor], max_epochs=1, max_steps=-1, deterministic=False, log_every_n_steps=1,
                            logger=logger)
    trainer.fit(task, dm)
    run = load_run(tmp_path / "records" / "pear")
    assert shaping_figs.phase_ids([run]) == [0, 1]
    page = parse_page(write_report([run], tmp_path / "out"))
    assert {"policy_phases.png", "policy_window_entropy.png"} <= set(page.images)
    steps, think = run.scalars[f"{P}/phase0/length"]
    assert len(steps) >= 2
    assert f"thinking (phase 0) length {fmt(float(think[0]))} → {fmt(float(think[-1]))} tokens" in page.joined
