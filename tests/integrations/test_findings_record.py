"""Bug hunt on run records written outside Lightning (``EntropyMonitors(record=)``, ``EntropyTrainerCallback(
record=)``), the guard's ``notify`` and "(last good: ...)" suffix, and ``define_entropy_summaries`` with a real
offline wandb run. The tests named for a bug failed before its fix (the bug-hunt round of 2026-12-06); the others
pin behaviour that held."""

from __future__ import annotations

import importlib
import json
import pickle
from pathlib import Path

import pytest

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
from entrotrain.dashboards.run_reader import find_records, load_run
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.gpt_module import GPTModule
from tests.helpers.loop_runs import token_batches

NOTIFIED: list[str] = []


def collect_notify(message: str) -> None:
    """An importable notify (``tests.integrations.test_findings_record.collect_notify``)."""
    NOTIFIED.append(message)


def interrupting_notify(message: str) -> None:
    raise KeyboardInterrupt


pytestmark = pytest.mark.usefixtures("one_thread")


def _monitors(root: Path, **kw) -> EntropyMonitors:
    monitor = AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)
    return EntropyMonitors([monitor], print_summary=False, record=root, **kw)


def _steps(monitors: EntropyMonitors, module: GPTModule, opt, steps: int, accumulate: int = 1, start: int = 0) -> None:
    batches = token_batches(steps * accumulate)
    for step in range(start, start + steps):
        with monitors.step(step):
            for micro in range(accumulate):
                loss = module.training_step(batches[(step - start) * accumulate + micro], step) / accumulate
                loss.backward()
            opt.step()
            opt.zero_grad()


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ loop records: what held
def test_accumulation_and_every_n_steps_give_one_row_per_logging_step(tmp_path: Path) -> None:
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    monitors = _monitors(tmp_path, every_n_steps=2)
    with monitors.watch(module, opt):
        _steps(monitors, module, opt, 5, accumulate=2)
    (path,) = find_records(tmp_path)
    rows = [r for r in _rows(path) if "values" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]  # one row per logging step, never None, no duplicate
    assert load_run(path).status == "finished"


def test_close_then_with_exit_and_an_exception_in_a_step(tmp_path: Path) -> None:
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    monitors = _monitors(tmp_path / "closed")
    with monitors.watch(module, opt):
        _steps(monitors, module, opt, 2)
        monitors.close()  # then the with exit: a no-op
    (path,) = find_records(tmp_path / "closed")
    assert load_run(path).status == "finished"

    monitors = _monitors(tmp_path / "boom")
    with pytest.raises(ValueError, match="inside the block"):
        with monitors.watch(module, opt):
            with monitors.step(0):
                raise ValueError("inside the block")
    (path,) = find_records(tmp_path / "boom")
    run = load_run(path, require_monitors=False)
    assert run.status == "failed" and "ValueError: inside the block" in run.meta["reason"]


def test_a_notify_that_raises_keyboard_interrupt_interrupts_and_the_record_says_so(tmp_path: Path) -> None:
    """``notify``'s exceptions are warned about; a KeyboardInterrupt (Ctrl+C while a webhook hangs) is not swallowed:
    it leaves the loop and the record says 'interrupted'."""
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, arm_on_good=False, notify=interrupting_notify)
    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)],
                               [guard], print_summary=False, record=tmp_path)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="EntropyCollapseGuard at step 0"):
        with monitors.watch(module, opt):
            _steps(monitors, module, opt, 2)
    (path,) = find_records(tmp_path)
    run = load_run(path)
    assert run.status == "interrupted" and [e["step"] for e in run.events] == [0]


# ------------------------------------------------------------------ guard: notify, last good
def test_a_guard_with_an_import_path_notify_pickles_for_ddp_spawn() -> None:
    guard = EntropyCollapseGuard(notify="tests.integrations.test_findings_record.collect_notify")
    clone = pickle.loads(pickle.dumps(guard))  # the resolved function travels by reference
    target = importlib.import_module("tests.integrations.test_findings_record")  # the module the path names
    target.NOTIFIED.clear()
    clone.send_notification("hello")
    assert clone.notify is guard.notify and target.NOTIFIED == ["hello"]
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a lambda cannot cross to spawned ranks
        pickle.dumps(EntropyCollapseGuard(notify=lambda message: None))


def test_last_good_reads_right_for_max_mode_max_drop_and_an_old_checkpoint() -> None:
    guard = EntropyCollapseGuard("entropy/attn/collapse_frac", threshold=0.1, mode="max")
    assert guard.observe(0.0, 50) is None
    assert guard.observe(0.25, 100) == "entropy/attn/collapse_frac = 0.25 rose above 0.1 (last good: 0 at step 50)"

    drop = EntropyCollapseGuard("entropy/attn_norm/min", threshold=None, max_drop=0.5)
    assert drop.observe(0.8, 0) is None
    assert drop.observe(0.2, 10).endswith("within 1 observation(s) (last good: 0.8 at step 0)")

    old = EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.05)
    state = old.state_dict()
    for name in ("last_good_step", "last_good_value", "armed"):
        state.pop(name)  # a checkpoint written before these fields
    old.load_state_dict(state)
    assert old.observe(0.01, 300) == "entropy/attn_norm/min = 0.01 fell below 0.05"  # no 'last good' known: none said


# ------------------------------------------------------------------ bugs
def test_watch_twice_leaves_no_record_running(tmp_path: Path) -> None:
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    monitors = _monitors(tmp_path)
    monitors.watch(module, opt)
    _steps(monitors, module, opt, 2)
    with monitors.watch(module, opt):
        _steps(monitors, module, opt, 2)
    states = sorted(load_run(path).status for path in find_records(tmp_path))
    assert "running" not in states, states


_REAL_WANDB = r"""
import json, sys, warnings
import torch
import wandb
from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.gpt_module import GPTModule
from tests.helpers.loop_runs import token_batches

torch.set_num_threads(1)
warnings.simplefilter("ignore")
out = {"loop": {}, "hf": []}
original = wandb.sdk.wandb_run.Run.define_metric

def spy(self, name, *args, **kwargs):
    if out.get("in_hf"):
        out["hf"].append(name)
    else:
        out["loop"][name] = kwargs
    return original(self, name, *args, **kwargs)

wandb.sdk.wandb_run.Run.define_metric = spy
run = wandb.init(dir=sys.argv[1], project="bughunt")
module = GPTModule(seed=0)
opt = module.configure_optimizers()
monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)],
                           print_summary=False, log=wandb.log)
with monitors.watch(module, opt):
    for step, batch in enumerate(token_batches(2)):
        with monitors.step(step):
            module.training_step(batch, step).backward()
            opt.step()
            opt.zero_grad()
out["loop_summary"] = dict(run.summary["entropy/attn_norm/min"])
wandb.finish()

out["in_hf"] = True
from entrotrain.integrations.transformers import EntropyTrainerCallback
from tests.integrations.test_hf_trainer import _model, _trainer
from pathlib import Path
trainer = _trainer(Path(sys.argv[1]), _model(), max_steps=2, report_to="wandb")
EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False, print_summary=False)]).attach(trainer)
trainer.train()
wandb.finish()
print("RESULT " + json.dumps(out))
"""


def test_real_offline_wandb_runs_get_the_entropy_summaries(tmp_path: Path) -> None:
    """A real offline wandb run (in a fresh process: wandb's global state stays out of the suite): the loop declares
    the summaries (the run's summary of an entropy key holds its min), and so does HF Trainer with
    ``report_to="wandb"``, whose ``WandbCallback`` starts the run after our ``on_train_begin`` (failed before)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("wandb")
    pytest.importorskip("transformers")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", _REAL_WANDB, str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.split("RESULT ", 1)[1])
    axis = {"step_metric": "trainer/global_step", "step_sync": True}  # log=wandb.log: rows carry the loop's step
    assert out["loop"]["entropy/*"] == {"summary": "min,last", **axis}
    assert out["loop"]["entropy/attn/collapse_frac"] == {"summary": "max,last", **axis}
    assert out["loop_summary"]["min"] <= out["loop_summary"]["last"]
    assert "train/entropy/*" in out["hf"], out["hf"]
def test_watch_twice_on_one_record_logger_never_overwrites_the_first_run(tmp_path: Path) -> None:
    from entrotrain.dashboards.run_record import RunRecordLogger
    from entrotrain.errors import EntrotrainError

    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    record = RunRecordLogger(tmp_path, version="one")
    monitors = _monitors(record)
    monitors.watch(module, opt)
    _steps(monitors, module, opt, 2)
    first = load_run(record.run_dir).scalars["entropy/attn_norm/min"][1].copy()
    with pytest.raises(EntrotrainError, match="records one run"):
        monitors.watch(module, opt)
        _steps(monitors, module, opt, 2)
    assert list(load_run(record.run_dir).scalars["entropy/attn_norm/min"][1]) == list(first)


def test_the_rollback_hint_never_names_a_checkpoint_of_an_earlier_run(tmp_path: Path) -> None:
    import os
    import time

    folder = tmp_path / "ckpts"
    folder.mkdir()
    stale = folder / "step_0.pt"
    stale.write_bytes(b"an earlier run's weights")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    module = GPTModule(seed=0)
    guard = EntropyCollapseGuard("loss", threshold=5.0, mode="max")
    monitors = EntropyMonitors(guards=[guard], print_summary=False, checkpoint_dir=folder)
    with monitors.watch(module), pytest.warns(UserWarning, match="EntropyCollapseGuard at step 1") as caught:
        for step, loss in enumerate([1.0, 10.0]):
            with monitors.step(step):
                monitors.observe(loss=loss)
    message = next(str(w.message) for w in caught if "EntropyCollapseGuard at step 1" in str(w.message))
    assert "(last good: 1 at step 0)" in message
    assert "step_0.pt" not in message, message


def test_trl_record_has_one_row_and_one_histogram_per_logged_step(tmp_path: Path) -> None:
    """TRL with ``logging_first_step``: the raw files (not the reader, which would hide duplicates) hold one training
    row per logged step (1, 2, 4), never a step None, and ``entropy/policy/hist`` exactly once per logged step."""
    pytest.importorskip("trl")
    from entrotrain.integrations.transformers import EntropyTrainerCallback
    from tests.integrations.test_trl import EntrotrainGRPOTrainer, _train, _trainer

    trainer = _trainer(EntrotrainGRPOTrainer, tmp_path / "out", max_steps=4, logging_steps=2, logging_first_step=True)
    EntropyTrainerCallback(record=tmp_path / "runs").attach(trainer)
    _train(trainer)
    (path,) = find_records(tmp_path / "runs")
    rows = _rows(path)
    assert all(isinstance(r.get("step"), int) for r in rows)
    training = [r["step"] for r in rows if "loss" in r["values"]]
    assert training == [1, 2, 4]
    index = [json.loads(line) for line in (path / "media" / "index.jsonl").read_text().splitlines()]
    assert [(r["key"], r["step"]) for r in index] == [("entropy/policy/hist", s) for s in (1, 2, 4)]


def test_hf_epoch_checkpoints_resume_into_the_same_record(tmp_path: Path) -> None:
    """``save_strategy="epoch"``: the record's folder is in the epoch checkpoint; resuming from it continues the same
    record, each step once, one resume noted with its checkpoint."""
    pytest.importorskip("transformers")
    from entrotrain.integrations.transformers import EntropyTrainerCallback
    from tests.integrations.test_hf_trainer import _data, _model, _trainer

    data = _data(rows=8)  # 2 steps per epoch at batch size 4
    kw = dict(max_steps=-1, num_train_epochs=2, save_strategy="epoch", data=data)
    first = _trainer(tmp_path, _model(), **kw)
    EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False, print_summary=False)],
                           record=tmp_path / "runs").attach(first)
    first.train()
    (path,) = find_records(tmp_path / "runs")
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert checkpoint.is_dir()
    again = _trainer(tmp_path, _model(), **kw)
    EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False, print_summary=False)],
                           record=tmp_path / "runs").attach(again)
    again.train(resume_from_checkpoint=str(checkpoint))
    assert find_records(tmp_path / "runs") == [path]
    run = load_run(path)
    assert run.status == "finished" and [(r["step"], r["ckpt_path"]) for r in run.meta["resumes"]] == [(2, str(checkpoint))]
    assert list(run.scalars["entropy/attn_norm/min"][0]) == [1, 2, 3, 4]
