"""Run records written from ``transformers.Trainer`` by ``EntropyTrainerCallback(record=...)``: what ``Trainer`` logs
and what the monitors store (arrays, thresholds, guard events, status, hyperparameters) is in the record
``entrotrain report`` reads, the same as a Lightning fit on the same model and batches; failures, interrupts, resumes,
record-only and not-attached callbacks leave the record in the state they document."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lightning.pytorch as pl  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor  # noqa: E402
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard  # noqa: E402
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor  # noqa: E402
from entrotrain.dashboards.report import build_report  # noqa: E402
from entrotrain.dashboards.run_reader import load_run, run_status  # noqa: E402
from entrotrain.dashboards.run_record import RunRecordLogger  # noqa: E402
from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from tests.integrations.test_hf_trainer import _LitWrapper, _data, _leftovers, _model, _trainer  # noqa: E402

#: Keys the reader does not keep as scalars (``epoch``: a Lightning/HF bookkeeping value, dropped by ``load_run``).
_NOT_SCALARS = {"epoch", "step"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _monitors(include: str = "transformer.h.?") -> list:
    return [
        AttentionEntropyMonitor(log_media=False, max_rows=None, max_queries=None),
        RepresentationEntropyMonitor(
            stage="train", include=[include], measures=("rankme",), max_tokens=None,
        ),
    ]


def _guard() -> EntropyCollapseGuard:
    """Fires at the first observation (a tiny GPT-2 at initialisation is near uniform, normalised entropy ~1 < 1.5)."""
    return EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, action="warn", arm_on_good=False)


def _the_record(root: Path) -> Path:
    """The one run folder under ``root/records`` (fails when there are none or several)."""
    runs = sorted(p for p in (root / "records").iterdir() if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def _numeric_rows(history: list[dict]) -> dict[int, dict[str, float]]:
    """Every number of every ``log_history`` row, by step (rows of the same step merged)."""
    out: dict[int, dict[str, float]] = {}
    for row in history:
        numbers = {
            k: float(v) for k, v in row.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        out.setdefault(int(row["step"]), {}).update(numbers)
    return out


def _series(run, key: str) -> dict[int, float]:
    steps, values = run.scalars[key]
    return dict(zip(steps.tolist(), values.tolist()))


def _logged(trainer, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in trainer.state.log_history if key in row}


def _raw_rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ 1. what Trainer logs + the monitors' record
def test_trainer_record_holds_the_logs_arrays_thresholds_events_and_status(tmp_path: Path, capsys) -> None:
    """(a) every number of every ``log_history`` row is in the record at the same step with the same value (``epoch``
    aside: the reader drops it); (b) one ``entropy/attn_norm/heatmap`` (layers × heads) per logging step equal to that
    step's per-head scalars, one spectrum per layer and step whose shares are the centred covariance eigenvalue
    shares of the layer's output in that step (brute force, float64); (c) the collapse / overload / guard thresholds;
    (d) one event per guard firing, level = action; (e) status, hyperparameters, run name; (f) the report; and the
    folder is printed at train end."""
    model = _model()
    captured: dict[int, torch.Tensor] = {}  # the output of transformer.h.1 per optimizer step (one micro-batch each)

    def keep(module, args, output):
        if model.training:
            hidden = output[0] if isinstance(output, tuple) else output
            captured[len(captured) + 1] = hidden.detach().reshape(-1, hidden.shape[-1]).double()

    handle = model.transformer.h[1].register_forward_hook(keep)
    trainer = _trainer(tmp_path, model, max_steps=4, logging_steps=2, run_name="hf-record-run")
    guard = _guard()
    cb = EntropyTrainerCallback(_monitors(), guards=[guard], record=tmp_path / "runs").attach(trainer)
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 2"):
        trainer.train()
    handle.remove()
    run_dir = _the_record(tmp_path / "runs")
    assert f"entrotrain run record: {run_dir}" in capsys.readouterr().out
    assert cb.record is None  # closed at train end
    run = load_run(run_dir)

    # (a) every numeric key of every row, same steps, same values
    expected = _numeric_rows(trainer.state.log_history)
    assert sorted(expected) == [2, 4]
    keys = set().union(*(row.keys() for row in expected.values()))
    assert {"loss", "grad_norm", "learning_rate", "entropy/attn_norm/min", "entropy/attn_norm/min/alert",
            "entropy/repr/transformer.h.1/rankme", "train_loss"} <= keys
    assert keys == set(run.scalars)  # nothing missing, nothing added
    for step, row in expected.items():
        for key, value in row.items():
            assert _series(run, key)[step] == value, (key, step)  # the float Trainer logged, written and read back
    assert _series(run, "entropy/attn_norm/min/alert") == {2: 1.0}

    # (b) heatmap = per-head scalars of its step; spectra = brute-force covariance shares of the step's activations
    heatmaps = run.media["entropy/attn_norm/heatmap"]
    assert [(m.step, m.kind, m.shape) for m in heatmaps] == [(2, "heatmap", (2, 2)), (4, "heatmap", (2, 2))]
    assert heatmaps[0].meta["sites"] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    for item in heatmaps:
        grid = item.load()
        per_head = np.array([[expected[item.step][f"entropy/attn_norm/L{l}/H{h}"] for h in range(2)] for l in range(2)])
        np.testing.assert_allclose(grid, per_head, rtol=1e-6, atol=0)
    assert not np.array_equal(heatmaps[0].load(), heatmaps[1].load())  # each step its own heatmap
    for layer in (0, 1):
        spectra = run.media[f"entropy/repr/transformer.h.{layer}/spectrum"]
        assert [(m.step, m.kind, m.shape) for m in spectra] == [(2, "spectrum", (16,)), (4, "spectrum", (16,))]
    for item in run.media["entropy/repr/transformer.h.1/spectrum"]:
        x = captured[item.step]
        x = x - x.mean(0)
        brute = np.sort(torch.linalg.eigvalsh(x.T @ x).clamp_min(0).numpy())[::-1]
        stored = item.load()
        np.testing.assert_allclose(stored / stored.sum(), brute / brute.sum(), rtol=1e-5, atol=1e-9)

    # (c) thresholds: the attention monitor's collapse / overload lines and the guard's
    lines = {(t["key"], t["label"]): t["value"] for t in run.thresholds}
    assert lines == {
        ("entropy/attn_norm/*", "collapse"): cb.monitors[0].collapse_threshold,
        ("entropy/attn_norm/*", "overload"): cb.monitors[0].overload_threshold,
        ("entropy/attn_norm/min", "guard (warn)"): 1.5,
    }

    # (d) one event per firing, at its step, level = action
    assert guard.times_fired == 1
    assert [(e["step"], e["key"], e["level"]) for e in run.events] == [(2, "entropy/attn_norm/min", "warn")]
    assert "fell below 1.5" in run.events[0]["message"]

    # (e) status, hyperparameters, name
    assert run.status == "finished" and run.meta["status"] == "finished" and run.meta["reason"] is None
    assert run.meta["name"] == "hf-record-run" == run.label
    assert run.hparams["model"] == "GPT2LMHeadModel" and run.hparams["trainer"] == "transformers.Trainer"
    assert run.hparams["training_args"]["max_steps"] == 4 and run.hparams["training_args"]["logging_steps"] == 2

    # (f) the report
    index = build_report([run_dir])
    html = index.read_text()
    assert index.name == "index.html" and 'id="attention"' in html and "Attention entropy" in html
    assert 'id="repr"' in html and "fell below 1.5" in html  # the representation section, the guard's event


# ------------------------------------------------------------------ 2. same arrays and thresholds as Lightning
def test_trainer_record_arrays_and_thresholds_equal_a_lightning_records(tmp_path: Path) -> None:
    """One step (lr = 0) on the same weights and the same 8 rows: the Trainer record's heatmap, spectra, thresholds
    and monitor scalars equal those a Lightning fit writes with ``RunRecordLogger`` (module names aside: Lightning
    sees the wrapper's ``model.`` prefix)."""
    data = _data(rows=8)

    def guards():
        return [EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.05, action="warn")]

    lit_root = tmp_path / "lit"
    batch = {k: torch.stack([r[k] for r in data]) for k in ("input_ids", "labels")}
    pl.Trainer(
        max_steps=1, logger=RunRecordLogger(lit_root), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", log_every_n_steps=1,
        callbacks=[*_monitors("model.transformer.h.?"), *guards()],
    ).fit(_LitWrapper(copy.deepcopy(_model())), train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    lit = load_run(_the_record(lit_root))

    trainer = _trainer(tmp_path / "hf", _model(), data, max_steps=1, per_device_train_batch_size=8, learning_rate=0.0)
    EntropyTrainerCallback(_monitors(), guards=guards(), record=tmp_path / "hf_runs").attach(trainer)
    trainer.train()
    hf = load_run(_the_record(tmp_path / "hf_runs"))

    def unprefixed(key: str) -> str:
        return key.replace("/model.", "/")

    assert {unprefixed(k) for k in lit.media} == set(hf.media) == {
        "entropy/attn_norm/heatmap", "entropy/repr/transformer.h.0/spectrum", "entropy/repr/transformer.h.1/spectrum",
    }
    for key, items in lit.media.items():
        (ours,) = hf.media[unprefixed(key)]
        (theirs,) = items
        assert ours.kind == theirs.kind and ours.shape == theirs.shape, key
        np.testing.assert_allclose(ours.load(), theirs.load(), rtol=1e-6, atol=1e-12, err_msg=key)
    assert sorted(map(json.dumps, hf.thresholds)) == sorted(map(json.dumps, lit.thresholds))
    assert len(hf.thresholds) == 3
    monitor_keys = [k for k in lit.scalars if k.startswith("entropy/")]
    assert "entropy/attn_norm/L1/H1" in monitor_keys and "entropy/repr/model.transformer.h.0/rankme" in monitor_keys
    assert {unprefixed(k) for k in monitor_keys} == {k for k in hf.scalars if k.startswith("entropy/")}
    for key in monitor_keys:
        assert hf.scalars[unprefixed(key)][1][0] == pytest.approx(lit.scalars[key][1][0], rel=1e-6, abs=1e-9), key


# ------------------------------------------------------------------ 3. failures and interrupts
class _RaiseAt(TrainerCallback):
    """Raises ``exc`` in ``on_step_begin`` of optimizer step ``step`` (after entrotrain armed its taps there)."""

    def __init__(self, step: int, exc: BaseException, cb: EntropyTrainerCallback) -> None:
        self.step, self.exc, self.cb = step, exc, cb
        self.armed_when_raised: bool | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step + 1 == self.step:
            self.armed_when_raised = self.cb.session.armed and bool(_leftovers(kwargs["model"]))
            raise self.exc


@pytest.mark.parametrize(
    ("exc", "status", "reason"),
    [
        (RuntimeError("boom at step 2"), "failed", "RuntimeError: boom at step 2"),
        (KeyboardInterrupt(), "interrupted", "KeyboardInterrupt (Ctrl+C)"),
    ],
    ids=["exception", "keyboard-interrupt"],
)
def test_an_exception_in_training_closes_the_record_with_its_reason_and_releases_the_taps(
    tmp_path: Path, exc: BaseException, status: str, reason: str
) -> None:
    """With ``attach``, an exception raised by a later callback inside a logging step (taps armed) marks the record
    ``failed`` with the exception's text (``KeyboardInterrupt``: ``interrupted``), keeps what was logged before it,
    re-raises, and leaves no tap on the model."""
    model = _model()
    trainer = _trainer(tmp_path, model, max_steps=4)
    cb = EntropyTrainerCallback(_monitors(), record=tmp_path / "runs").attach(trainer)
    raiser = _RaiseAt(2, exc, cb)
    trainer.add_callback(raiser)  # after ours: ours has armed the taps for step 2 when it raises
    with pytest.raises(type(exc)):
        trainer.train()
    assert raiser.armed_when_raised is True
    assert not _leftovers(model)
    run = load_run(_the_record(tmp_path / "runs"))
    assert run.meta["status"] == run.status == status
    assert run.meta["reason"] == reason and run.meta["end_time"] is not None
    assert _series(run, "loss") == {1: trainer.state.log_history[0]["loss"]}  # step 1 logged, step 2 never ran
    assert [m.step for m in run.media["entropy/attn_norm/heatmap"]] == [1]
    assert cb.record is None


# ------------------------------------------------------------------ 4. resume continues the same record
@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A run checkpointed at steps 2 and 4 (logging every step), then a new Trainer resumed from checkpoint-2 up to
    step 6 on other data (so its steps 3-4 differ from the abandoned ones), both with ``record=`` the same folder."""
    tmp_path = tmp_path_factory.mktemp("resume")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    record = tmp_path / "runs"
    save = dict(save_strategy="steps", save_steps=2, logging_steps=1)
    first = _trainer(tmp_path, _model(), max_steps=4, **save)
    EntropyTrainerCallback(_monitors(), record=record).attach(first)
    first.train()
    run_dir = _the_record(record)
    resumed = _trainer(tmp_path, _model(seed=5), data=_data(seed=7), max_steps=6, **save)
    cb = EntropyTrainerCallback(_monitors(), record=record).attach(resumed)
    checkpoint = tmp_path / "out" / "checkpoint-2"
    resumed.train(resume_from_checkpoint=str(checkpoint))
    torch.set_num_threads(threads)
    return dict(record=record, run_dir=run_dir, first=first, resumed=resumed, cb=cb, checkpoint=checkpoint)


def test_resume_from_a_checkpoint_continues_the_same_record(resumed_run: dict) -> None:
    """Resumed from checkpoint-2: one folder, one resume at step 2 in meta, every logging step once, steps 3-4 from
    the resumed run (scalars, heatmaps), steps 1-2 from the first; the abandoned rows stay on disk before the
    resume marker."""
    run_dir = resumed_run["run_dir"]
    assert _the_record(resumed_run["record"]) == run_dir  # the same folder continued, no second one
    run = load_run(run_dir)
    assert run.status == "finished"
    assert [r["step"] for r in run.meta["resumes"]] == [2]
    old = _numeric_rows(resumed_run["first"].state.log_history)
    new = _numeric_rows(resumed_run["resumed"].state.log_history)  # steps 1-2: restored from the checkpoint
    assert sorted(new) == [1, 2, 3, 4, 5, 6] and all(new[s] == old[s] for s in (1, 2))
    for key in ("loss", "entropy/attn_norm/min", "entropy/attn_norm/L1/H0"):
        got = _series(run, key)
        assert sorted(got) == [1, 2, 3, 4, 5, 6]
        assert all(got[s] == old[s][key] for s in (1, 2)), key
        assert all(got[s] == new[s][key] for s in (3, 4, 5, 6)), key
        assert all(old[s][key] != new[s][key] for s in (3, 4)), key  # the abandoned run's values differ: can fail
    heatmaps = run.media["entropy/attn_norm/heatmap"]
    assert [m.step for m in heatmaps] == [1, 2, 3, 4, 5, 6]
    for item in heatmaps:
        source = old if item.step <= 2 else new
        assert item.load()[1, 0] == pytest.approx(source[item.step]["entropy/attn_norm/L1/H0"], rel=1e-6)
    raw = _raw_rows(run_dir)  # the abandoned rows are still on disk, before the marker: the reader drops them
    markers = [i for i, row in enumerate(raw) if "resume" in row]
    assert len(markers) == 1 and raw[markers[0]]["resume"]["step"] == 2
    assert sum(1 for row in raw if row.get("step") == 3 and "loss" in row["values"]) == 2
    assert run.hparams["training_args"]["max_steps"] == 6  # the resumed run's arguments win
    assert resumed_run["cb"].record is None


def test_resume_names_the_checkpoint_it_resumed_from(resumed_run: dict) -> None:
    """meta["resumes"] names the checkpoint folder the run resumed from (as a Lightning resume does), not 'None'."""
    meta = load_run(resumed_run["run_dir"]).meta
    assert meta["resumes"][0]["ckpt_path"] == str(resumed_run["checkpoint"])


# ------------------------------------------------------------------ 5. record only, and bad arguments
def test_record_only_callback_records_what_trainer_logs(tmp_path: Path) -> None:
    """``EntropyTrainerCallback(record=...)`` without monitor or guard is accepted and writes every number Trainer
    logs at its step, status ``finished``. ``load_run`` (hence ``entrotrain report``) refuses such a record as having
    no monitor output unless ``require_monitors=False``: this documents the current behaviour."""
    trainer = _trainer(tmp_path, _model(), max_steps=3)
    cb = EntropyTrainerCallback(record=tmp_path / "runs").attach(trainer)
    assert cb.drivers == [] and cb.guards == []
    trainer.train()
    run_dir = _the_record(tmp_path / "runs")
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "finished"
    written: dict[int, dict[str, float]] = {}
    for row in _raw_rows(run_dir):
        written.setdefault(row["step"], {}).update(row["values"])
    expected = _numeric_rows(trainer.state.log_history)
    assert sorted(written) == sorted(expected) == [1, 2, 3]
    for step, row in expected.items():
        assert {k: written[step][k] for k in row} == row
        assert written[step].keys() - row.keys() <= {"epoch"}
    with pytest.raises(EntrotrainError, match="no monitor output"):  # a report of it would be empty
        load_run(run_dir)
    run = load_run(run_dir, require_monitors=False)  # what `entrotrain status` reads
    assert run.status == "finished" and _series(run, "loss") == _logged(trainer, "loss")


def test_record_argument_is_checked() -> None:
    """No record, monitor or guard is refused; so is a ``record`` that is neither a folder nor a RunRecordLogger,
    with the fix in the message; a RunRecordLogger is accepted as is."""
    with pytest.raises(EntrotrainError, match="at least one monitor, guard or record"):
        EntropyTrainerCallback()
    with pytest.raises(EntrotrainError, match=r"record\) must be a folder .*RunRecordLogger.*got int"):
        EntropyTrainerCallback(record=42)
    logger = RunRecordLogger("unused-folder")
    assert EntropyTrainerCallback(record=logger)._record_spec is logger


def test_a_configured_run_record_logger_is_used_as_is(tmp_path: Path) -> None:
    """``record=RunRecordLogger(..., version=..., run_name=...)``: the record goes where that logger says, with its
    name (not ``TrainingArguments.run_name``)."""
    logger = RunRecordLogger(tmp_path / "mine", name="group", version="v1", run_name="configured")
    trainer = _trainer(tmp_path, _model(), max_steps=2, run_name="from-args")
    EntropyTrainerCallback(_monitors()[:1], record=logger).attach(trainer)
    trainer.train()
    run = load_run(tmp_path / "mine" / "group" / "v1")
    assert run.meta["name"] == "configured" and run.status == "finished"
    assert sorted(_series(run, "entropy/attn_norm/min")) == [1, 2]


# ------------------------------------------------------------------ 6. not attached
def test_not_attached_still_records_but_an_exception_leaves_it_running(tmp_path: Path) -> None:
    """Passed as ``callbacks=[cb]`` (no ``attach``): a normal run writes the same record (scalars, arrays,
    ``finished``). When training raises, nothing closes it: meta stays ``running``, ``load_run`` says ``running``
    while the writing process lives and ``killed`` once that pid is gone; the taps stay armed until ``release()``."""
    cb = EntropyTrainerCallback(_monitors()[:1], record=tmp_path / "ok")
    trainer = _trainer(tmp_path / "a", _model(), max_steps=2, callbacks=[cb])
    trainer.train()
    run = load_run(_the_record(tmp_path / "ok"))
    assert run.status == "finished"
    assert _series(run, "loss") == _logged(trainer, "loss")
    assert [m.step for m in run.media["entropy/attn_norm/heatmap"]] == [1, 2]

    model = _model()
    cb = EntropyTrainerCallback(_monitors()[:1], record=tmp_path / "bad")
    trainer = _trainer(tmp_path / "b", model, max_steps=4, callbacks=[cb])
    trainer.add_callback(_RaiseAt(2, RuntimeError("boom"), cb))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert _leftovers(model)  # armed for step 2, nobody released them
    cb.release()
    assert not _leftovers(model)
    run_dir = _the_record(tmp_path / "bad")
    run = load_run(run_dir)
    assert run.meta["status"] == "running" and run.meta["reason"] is None
    assert run.meta["pid"] == os.getpid() and run.status == "running"
    assert _series(run, "loss") == {1: trainer.state.log_history[0]["loss"]}
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert run_status({**run.meta, "pid": gone.pid, "pid_start": None}, run_dir).state == "killed"


def test_nan_statistics_never_reach_the_record(tmp_path: Path) -> None:
    """A statistic that vanishes after step 1 is NaN to the guard but is neither in the logs nor in the record (the
    record holds what the backends got), while the guard's alert is."""
    trainer = _trainer(tmp_path, _model(), max_steps=4)
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.0, action="stop")
    cb = EntropyTrainerCallback(_monitors()[:1], guards=[guard], record=tmp_path / "runs").attach(trainer)
    compute = cb.drivers[0].compute
    cb.drivers[0].compute = lambda step, *a: compute(step, *a) if step == 1 else {}
    with pytest.warns(UserWarning, match="is nan"):
        trainer.train()
    run = load_run(_the_record(tmp_path / "runs"))
    assert sorted(_series(run, "entropy/attn_norm/min")) == [1]
    assert all(math.isfinite(v) for _, values in run.scalars.values() for v in values)
    assert _series(run, "entropy/attn_norm/min/alert") == {2: 1.0}
    assert [(e["step"], e["level"]) for e in run.events] == [(2, "stop")]
    assert run.status == "finished"  # a guard's stop is a normal end


def test_evaluation_logs_are_recorded_at_their_step(tmp_path: Path) -> None:
    """``eval_loss`` and the other evaluation numbers Trainer logs go into the record at ``state.global_step``, beside
    the training log of that step (the same step, both kept)."""
    base = _trainer(tmp_path, _model(), max_steps=4, logging_steps=2)
    args = TrainingArguments(**{**base.args.to_dict(), "eval_strategy": "steps", "eval_steps": 2})
    trainer = Trainer(model=base.model, args=args, train_dataset=_data(), eval_dataset=_data(rows=4, seed=3))
    EntropyTrainerCallback(_monitors()[:1], record=tmp_path / "runs").attach(trainer)
    trainer.train()
    run = load_run(_the_record(tmp_path / "runs"))
    assert _series(run, "eval_loss") == _logged(trainer, "eval_loss") and sorted(_series(run, "eval_loss")) == [2, 4]
    assert sorted(_series(run, "loss")) == sorted(_series(run, "entropy/attn_norm/min")) == [2, 4]


def test_a_second_train_does_not_overwrite_the_first_record(tmp_path: Path) -> None:
    """Two ``train()`` calls with the same ``record=RunRecordLogger(...)``: the first run's finished record keeps its
    own values (a fresh record, or a clear error, for the second; never the second run's numbers under the first
    run's meta)."""
    cb = EntropyTrainerCallback(_monitors()[:1], record=RunRecordLogger(tmp_path / "runs"))
    first = _trainer(tmp_path / "a", _model(), max_steps=2)
    cb.attach(first)
    first.train()
    run_dir = _the_record(tmp_path / "runs")
    assert _series(load_run(run_dir), "loss") == _logged(first, "loss")
    second = _trainer(tmp_path / "b", _model(seed=3), data=_data(seed=9), max_steps=2)
    cb.attach(second)
    try:
        second.train()
    except EntrotrainError:
        pass
    assert _logged(second, "loss") != _logged(first, "loss")  # the runs differ, so an overwrite shows
    assert _series(load_run(run_dir), "loss") == _logged(first, "loss")
