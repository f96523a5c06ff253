"""What a long run, a rollback and a resume do to a wandb run: rows wandb would drop, and media that grow per step.

The fast tests log to :class:`tests.helpers.wandb_offline.SteppedRun` (wandb's step rules); one test runs real offline
wandb runs (``WANDB_MODE=offline``, every wandb folder under ``tmp_path``: no login, no network) in a fresh process
(``wandb_long_run_script.py``) and reads their ``.wandb`` files back (:func:`tests.helpers.wandb_offline.history_rows`).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from entrotrain.callbacks import AttentionEntropyMonitor, RepresentationEntropyMonitor
from entrotrain.dashboards.wandb_media import MAX_TIME_COLUMNS, heads_over_time_image, time_columns
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.gpt_module import GPTModule
from tests.helpers.loop_runs import train_steps
from tests.helpers.wandb_offline import SteppedRun

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ---------------------------------------------------------------------------------------------- media per step
def test_over_time_image_width_is_bounded_however_long_the_history():
    pytest.importorskip("PIL")
    history = [torch.full((2, 2), 0.5) for _ in range(1024)]  # a ThinnedHistory at its capacity
    history[0] = torch.zeros(2, 2)  # the first and the last steps are always drawn
    history[-1] = torch.ones(2, 2)
    pixels = np.array(heads_over_time_image(history, list(range(1024))).image)
    assert pixels.shape[1] <= 768  # was 2048 px (2 px per step)
    assert pixels[0, 0].tolist() == [68, 1, 84] and pixels[0, -1].tolist() == [253, 231, 37]


@pytest.mark.parametrize("count", [1, 2, MAX_TIME_COLUMNS, MAX_TIME_COLUMNS + 1, 1024, 5000])
def test_time_columns_keep_first_and_last_in_order(count):
    cols = time_columns(count)
    assert len(cols) == min(count, MAX_TIME_COLUMNS) and cols[0] == 0 and cols[-1] == count - 1
    assert cols == sorted(set(cols))


def _over_time_steps(**kw) -> list[int]:
    """The logging steps (of 5) whose media hold the heads-over-time image; every one holds the heatmap."""
    monitor = AttentionEntropyMonitor(print_summary=False, **kw)
    steps = []
    for step in range(5):
        normalized = torch.full((2, 2), 0.5)
        monitor._history.append(normalized)  # as a logging step does, before its media
        monitor._history_steps.append(step)
        media = monitor.media(normalized)
        assert "entropy/attn_norm/heatmap" in media and "entropy/attn_norm/hist" in media
        if "entropy/attn_norm/heads_over_time" in media:
            steps.append(step)
    return steps


def test_heads_over_time_image_is_paced_by_over_time_every():
    """Each heads-over-time image redraws the whole history: at every logging step a long run stored thousands
    (failed before: it was in every logging step's media)."""
    pytest.importorskip("PIL")
    pytest.importorskip("wandb")
    assert _over_time_steps() == [0]  # default 10
    assert _over_time_steps(over_time_every=2) == [0, 2, 4]
    assert _over_time_steps(over_time_every=1) == [0, 1, 2, 3, 4]
    assert _over_time_steps(over_time_every=0) == []
    with pytest.raises(EntrotrainError, match="over_time_every"):
        AttentionEntropyMonitor(over_time_every=-1)


def test_spectrum_charts_are_paced_by_spectrum_every():
    """Each spectrum chart is a wandb.Table (a file and a run-table artifact version per layer and step)."""
    pytest.importorskip("wandb")
    monitor = RepresentationEntropyMonitor(include=["model.blocks.0"], every_n_steps=1, stage="train",
                                           measures=("rankme",), print_summary=False, spectrum_every=2)
    monitors = EntropyMonitors([monitor], print_summary=False)
    charts = []
    with monitors.watch(GPTModule(seed=0), None):
        pass
    for _ in range(5):
        monitor.spectra = {"model.blocks.0": torch.tensor([3.0, 2.0, 1.0])}
        charts.append(bool(monitor.media()))
    assert charts == [True, False, True, False, True]
    with pytest.raises(EntrotrainError, match="spectrum_every"):
        RepresentationEntropyMonitor(spectrum_every=0)


def test_probe_position_heatmap_is_paced_by_over_time_every():
    """The prediction monitor's position × step heatmap redraws the whole history too (failed before: it was in
    every logging step's media)."""
    pytest.importorskip("PIL")
    pytest.importorskip("wandb")
    from entrotrain.callbacks import PredictionEntropyMonitor

    def paced(**kw) -> list[bool]:
        monitor = PredictionEntropyMonitor(print_summary=False, **kw)
        shown = []
        for step in range(5):
            monitor.profiles.append((step, [1.0, 0.5, 0.25]))
            shown.append("entropy/pred/probe/pos_heatmap" in monitor.media())
        return shown

    assert paced() == [True, False, False, False, False]
    assert paced(over_time_every=2) == [True, False, True, False, True]
    assert paced(over_time_every=0) == [False] * 5
    with pytest.raises(EntrotrainError, match="over_time_every"):
        PredictionEntropyMonitor(over_time_every=-1)


# ---------------------------------------------------------------------------------- steps that go backwards
def _loop(log):
    return EntropyMonitors([AttentionEntropyMonitor(every_n_steps=2, log_media=False, print_summary=False)],
                           log=log, print_summary=False)


def test_loop_resumed_into_the_same_wandb_run_loses_no_row(monkeypatch):
    """A loop resumed from an older checkpoint into the same wandb run logs steps below the run's: wandb drops them
    (silently under WANDB_SILENT) when they come with ``step=``. They now land after the run's step, plotted against
    ``trainer/global_step`` (failed before: the resumed steps 4 and 6 were dropped, step 8 overwrote the first run's
    step 8). The real offline run: :func:`test_real_offline_wandb_runs_keep_every_row`."""
    wandb = pytest.importorskip("wandb")
    run = SteppedRun()
    monkeypatch.setattr(wandb, "run", run)
    model = GPTModule(seed=0)
    saved: dict[int, dict] = {}
    train_steps(_loop(run.log), model, 9, saved=saved)
    resumed = _loop(run.log)
    resumed.load_state_dict(saved[3])  # the checkpoint of step 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(resumed, model, 9, start=4)
    run.finish()
    assert run.dropped == []
    behind = [str(w.message) for w in caught if "past the loop's step" in str(w.message)]
    assert len(behind) == 1 and "wandb run is at step 8, past the loop's step 4" in behind[0]  # once per run
    axis = {"step_metric": "trainer/global_step", "step_sync": True}  # entrotrain's keys plotted at the loop's step
    assert ("entropy/*", {"summary": "min,last", **axis}) in run.defined
    rows = [r for r in run.rows if "entropy/attn_norm/min" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 2, 4, 6, 8, 4, 6, 8]
    assert [r["_step"] for r in rows] == [0, 2, 4, 6, 8, 9, 10, 11]


def test_loop_resumed_at_the_run_s_current_step_does_not_overwrite_its_row(monkeypatch):
    """Resumed from the checkpoint of step 7, the loop's first logging step (8) equals the run's current step, whose
    pending row holds the first pass's step 8: ``step=8`` merged into it, overwriting those values (failed before:
    one row at step 8, the first pass's numbers lost). It now lands after it, like a lower step."""
    wandb = pytest.importorskip("wandb")
    run = SteppedRun("equal")
    monkeypatch.setattr(wandb, "run", run)
    model = GPTModule(seed=0)
    saved: dict[int, dict] = {}
    train_steps(_loop(run.log), model, 9, saved=saved)
    first = run._pending["entropy/attn_norm/min"]
    resumed = _loop(run.log)
    resumed.load_state_dict(saved[7])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_steps(resumed, model, 11, start=8)
    run.finish()
    assert any("wandb run is at step 8, at the loop's step 8" in str(w.message) for w in caught)
    rows = [r for r in run.rows if "entropy/attn_norm/min" in r]
    assert [r["trainer/global_step"] for r in rows] == [0, 2, 4, 6, 8, 8, 10]
    assert [r["_step"] for r in rows] == [0, 2, 4, 6, 8, 9, 10]
    assert rows[4]["entropy/attn_norm/min"] == first


def test_wandb_log_adapter_keeps_every_row_of_a_wrapper_and_the_loop_s_own_numbers(monkeypatch):
    """``log=`` a wrapper of the user's own (several sinks, as examples/plain_loop.py) was called with ``step=``
    whatever wandb's step: a resumed loop's rows were dropped (failed before: no wandb_log). Through
    :func:`wandb_log` the monitors' row and the loop's own loss at one step share a wandb row, and nothing is lost."""
    wandb = pytest.importorskip("wandb")
    from entrotrain.dashboards.wandb_media import wandb_log

    run = SteppedRun("adapter")
    monkeypatch.setattr(wandb, "run", run)
    to_wandb = wandb_log()

    def log(metrics, step):  # the user's wrapper: wandb and anything else
        to_wandb(metrics, step=step)

    model = GPTModule(seed=0)
    saved: dict[int, dict] = {}
    train_steps(_loop(log), model, 5, saved=saved, log=log)
    resumed = _loop(log)
    resumed.load_state_dict(saved[1])
    train_steps(resumed, model, 5, start=2, log=log)
    run.finish()
    assert run.dropped == []
    axis = {"step_metric": "trainer/global_step", "step_sync": True}
    assert ("entropy/*", {"summary": "min,last", **axis}) in run.defined
    assert [r["trainer/global_step"] for r in run.rows] == [0, 1, 2, 3, 4, 2, 3, 4]
    assert [sorted(k for k in r if k.startswith("entropy/attn_norm/min") or k == "train/loss")
            for r in run.rows] == [["entropy/attn_norm/min", "train/loss"], ["train/loss"]] * 2 + [
        ["entropy/attn_norm/min", "train/loss"], ["entropy/attn_norm/min", "train/loss"], ["train/loss"],
        ["entropy/attn_norm/min", "train/loss"]]


def test_wandb_log_without_an_active_run_says_to_call_wandb_init(monkeypatch):
    wandb = pytest.importorskip("wandb")
    from entrotrain.dashboards.wandb_media import wandb_log

    monkeypatch.setattr(wandb, "run", None)
    with pytest.raises(EntrotrainError, match="wandb.init"):
        wandb_log()({"x": 1.0}, step=0)


def test_loop_logs_through_wandb_log_taken_before_init(monkeypatch):
    """``EntropyMonitors(log=wandb.log)`` built before ``wandb.init`` holds wandb's pre-init stub, which raises
    "You must call wandb.init() before wandb.log()" at the first logging step (failed before); the active run's
    ``log`` gets the rows."""
    wandb = pytest.importorskip("wandb")
    from wandb.sdk.lib.preinit import PreInitCallable

    monitors = _loop(PreInitCallable("wandb.log"))  # what `wandb.log` is before wandb.init()
    run = SteppedRun()
    monkeypatch.setattr(wandb, "run", run)
    train_steps(monitors, GPTModule(seed=0), 3)
    run.finish()
    assert [r["trainer/global_step"] for r in run.rows] == [0, 2]


def test_any_other_log_callable_gets_the_step_as_before():
    calls = []
    monitors = _loop(lambda metrics, *, step: calls.append((sorted(metrics)[:1], step)))
    train_steps(monitors, GPTModule(seed=0), 3)
    assert [step for _, step in calls] == [0, 2] and all("trainer/global_step" not in k for k, _ in calls)


def test_real_offline_wandb_runs_keep_every_row(tmp_path):
    """Real offline wandb runs (in a fresh process: wandb's global state stays out of the suite), read back from the
    ``.wandb`` file: the loop resumed into the same run, ``log=wandb.log`` taken before ``wandb.init``, and a
    Lightning fit whose guard rolls back three times (the weights go back, not the clock: every row Lightning's
    ``WandbLogger`` hands wandb is in the file)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("wandb")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        (tmp_path / var.lower()).mkdir()
        env[var] = str(tmp_path / var.lower())
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    script = Path(__file__).with_name("wandb_long_run_script.py")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT ", 1)[1])
    assert out["resumed"]["global_steps"] == [0, 2, 4, 6, 8, 4, 6, 8]
    assert out["resumed"]["steps"][:5] == [0, 2, 4, 6, 8] and min(out["resumed"]["steps"][5:]) > 8
    assert out["resumed"]["warned"]
    assert out["preinit"] == [0, 2]
    assert out["lightning"]["rows"] == out["lightning"]["sent"]
    assert out["lightning"]["entropy"] == [0, 2, 4, 6, 8, 10] and out["lightning"]["alerts"] == [6, 7, 8]
