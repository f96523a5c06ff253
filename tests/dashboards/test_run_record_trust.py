"""Trust under failure for the run record: bounded files at any run length, torn lines reported, one truthful status,
runs that stopped early, and resume into the same record."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from entrotrain.callbacks import AttentionEntropyMonitor
from entrotrain.dashboards.run_reader import STALE_AFTER_S, load_run, run_status
from entrotrain.dashboards.run_record import MAX_HISTOGRAM_VALUES, RunRecordLogger, find_run_record, record_media
from tests.helpers.lightning_models import TinyLM, quiet_trainer, token_loader

pytest.importorskip("matplotlib")

from entrotrain.cli import main  # noqa: E402
from entrotrain.dashboards.report import build_report  # noqa: E402

TORN = "ends with a torn line ({n} bytes) — the run was killed while writing"


def _files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _arrays(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "entropy/attn_norm/heatmap": rng.random((2, 3)),
        "entropy/repr/enc/spectrum": rng.random(5),
        "entropy/policy/hist": rng.normal(size=7),
    }


# ---------------------------------------------------------------------- media: bounded file count, both layouts
def test_media_file_count_is_bounded_and_reads_back(tmp_path):
    logger = RunRecordLogger(tmp_path, version="long")
    trainer = quiet_trainer(logger=[logger])
    kinds = {"entropy/attn_norm/heatmap": "heatmap", "entropy/repr/enc/spectrum": "spectrum", "entropy/policy/hist": "histogram"}
    counts = {}
    for step in range(2000):  # 2,000 logging steps x 3 media keys through the callbacks' helper
        for key, array in _arrays(step).items():
            record_media(trainer, key, torch.as_tensor(array), step, kind=kinds[key], layer=1)
        if step in (9, 1999):
            counts[step] = len(_files(logger.run_dir))
    assert counts[9] == counts[1999] <= 6  # meta.json, index.jsonl, one .bin per key: not one file per step
    logger.finalize("success")

    run = load_run(logger.run_dir)
    assert not run.warnings
    for key, kind in kinds.items():
        items = run.media[key]
        assert [m.step for m in items] == list(range(2000)) and all(m.kind == kind for m in items)
        assert items[0].meta == {"layer": 1}
    for step in (0, 1, 777, 1999):
        for key, array in _arrays(step).items():
            got = run.media[key][step].load()
            assert got.dtype == np.float64
            np.testing.assert_array_equal(got, array)


def test_records_of_earlier_versions_npy_per_step_are_still_read(tmp_path):
    """The layout written before the .bin files: media/<key>/<step>.npy and index rows without offsets."""
    run_dir = tmp_path / "old"
    (run_dir / "media" / "entropy__attn_norm__heatmap").mkdir(parents=True)
    meta = {"format": "entrotrain-run-record/1", "status": "finished", "name": "old", "start_time": 1.0, "end_time": 2.0}
    (run_dir / "meta.json").write_text(json.dumps(meta))
    rows = []
    for step in (0, 10):
        grid = np.arange(6.0).reshape(2, 3) + step
        file = f"media/entropy__attn_norm__heatmap/{step:>08}.npy"
        np.save(run_dir / file, grid)
        rows.append({"key": "entropy/attn_norm/heatmap", "step": step, "kind": "heatmap", "file": file, "shape": [2, 3], "meta": {}})
    (run_dir / "media" / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 0, "values": {"entropy/attn_norm/min": 0.5}}) + "\n")
    run = load_run(run_dir)
    assert [m.step for m in run.media["entropy/attn_norm/heatmap"]] == [0, 10]
    np.testing.assert_array_equal(run.media["entropy/attn_norm/heatmap"][1].load(), np.arange(6.0).reshape(2, 3) + 10)
    assert build_report([run_dir]).is_file()


def test_long_histograms_are_stored_as_quantiles(tmp_path):
    logger = RunRecordLogger(tmp_path, version="h")
    values = np.random.default_rng(0).gamma(2.0, size=50_000)
    logger.log_media("entropy/policy/hist", values, 0, kind="histogram")
    logger.log_media("entropy/policy/small", values[:100], 0, kind="histogram")
    run = load_run(logger.run_dir)
    (item,) = run.media["entropy/policy/hist"]
    stored = item.load()
    assert stored.size == MAX_HISTOGRAM_VALUES and item.meta["n_values"] == 50_000
    edges = np.linspace(values.min(), values.max(), 31)
    full = np.histogram(values, edges)[0] / values.size  # the histogram the report would draw, in float64
    summary = np.histogram(stored, edges)[0] / stored.size
    assert np.abs(full - summary).max() < 2.0 / MAX_HISTOGRAM_VALUES
    np.testing.assert_array_equal(run.media["entropy/policy/small"][0].load(), values[:100])  # short: kept exactly


def test_a_torn_media_array_is_skipped_with_a_warning(tmp_path):
    logger = RunRecordLogger(tmp_path, version="m")
    for step in range(3):
        logger.log_media("entropy/repr/enc/spectrum", np.arange(4.0) + step, step, kind="spectrum")
    logger.finalize("success")
    binary = logger.run_dir / "media" / "entropy__repr__enc__spectrum.bin"
    binary.write_bytes(binary.read_bytes()[:-5])  # killed while writing the last array
    run = load_run(logger.run_dir)
    assert [m.step for m in run.media["entropy/repr/enc/spectrum"]] == [0, 1]
    assert any("ends inside the array" in w and "killed while writing" in w for w in run.warnings)


# ---------------------------------------------------------------------- torn lines
@pytest.mark.parametrize("name", ["metrics.jsonl", "events.jsonl", "media/index.jsonl"])
def test_torn_last_line_is_reported_on_the_page_and_on_stderr(make_attention_run, tmp_path, capsys, name):
    run_dir = make_attention_run(tmp_path, "killed")  # finished, then a torn line (as if killed while writing)
    torn = '{"step": 120, "values": {"entropy/at'
    with open(run_dir / name, "a") as f:
        f.write(torn)
    run = load_run(run_dir)
    expected = f"{name} " + TORN.format(n=len(torn))
    assert any(expected in w for w in run.warnings), run.warnings
    assert run.last_step == 100 and len(run.media["entropy/attn_norm/heatmap"]) == 6 and len(run.events) == 1
    index = main(["report", str(run_dir)])
    assert expected in capsys.readouterr().err
    html = index.read_text()
    assert expected in html and "attention_summary.png" in html  # everything else still rendered


def test_a_resumed_writer_never_glues_its_line_onto_a_torn_one(tmp_path):
    logger = RunRecordLogger(tmp_path, version="r")
    logger.log_metrics({"entropy/attn_norm/min": 0.5}, step=0)
    with open(logger.run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "val')
    again = RunRecordLogger(tmp_path, version="r")  # another process appends to the same file
    again.log_metrics({"entropy/attn_norm/min": 0.25}, step=2)
    run = load_run(logger.run_dir)
    assert run.scalars["entropy/attn_norm/min"][0].tolist() == [0, 2]
    assert any("line 2 is not a JSON object" in w for w in run.warnings)


# ---------------------------------------------------------------------- one status, told the same everywhere
def _meta(run_dir: Path) -> dict:
    return json.loads((run_dir / "meta.json").read_text())


def _set_meta(run_dir: Path, **fields) -> None:
    (run_dir / "meta.json").write_text(json.dumps({**_meta(run_dir), **fields}))


def test_killed_run_is_killed_everywhere(make_attention_run, tmp_path, capsys):
    run_dir = make_attention_run(tmp_path, "k", finish=False)
    meta = _meta(run_dir)
    assert meta["pid"] == os.getpid() and meta["host"] == socket.gethostname() and meta["last_write"] >= meta["start_time"]
    assert load_run(run_dir).status == "running"
    _set_meta(run_dir, pid_start=-1)  # our pid, but another process's start time: the writer is gone, pid reused
    run = load_run(run_dir)
    status = run.decided_status
    assert status.state == "killed" and status.label.startswith("killed (no update since ")
    assert "stopped without finishing" in run.warnings[0] and "up to step 100" in run.warnings[0]
    index = main(["report", str(run_dir)])
    err, html = capsys.readouterr().err, index.read_text()
    assert "stopped without finishing" in err and "stopped without finishing" in html
    assert f">{status.label}<" in html
    assert "still in progress" not in html + err and ">running<" not in html


def test_heartbeat_is_written_at_most_every_heartbeat_s(tmp_path, monkeypatch):
    from entrotrain.dashboards import run_record

    logger = RunRecordLogger(tmp_path, version="hb")
    logger.log_metrics({"a": 1.0}, step=0)
    first = _meta(logger.run_dir)["last_write"]
    for step in range(1, 50):  # within HEARTBEAT_S: meta.json is not rewritten on every line
        logger.log_metrics({"a": 1.0}, step=step)
    assert _meta(logger.run_dir)["last_write"] == first
    monkeypatch.setattr(run_record, "HEARTBEAT_S", 0.0)
    logger.log_metrics({"a": 1.0}, step=50)
    assert _meta(logger.run_dir)["last_write"] > first
    assert _meta(logger.run_dir)["status"] == "running"


def test_stale_run_on_another_host(make_attention_run, tmp_path):
    run_dir = make_attention_run(tmp_path, "far", finish=False)
    meta = {**_meta(run_dir), "host": "some-other-host"}
    now = meta["last_write"] + 10
    assert run_status(meta, now=now).state == "running"  # cannot check the pid: recent updates mean running
    stale = run_status(meta, now=meta["last_write"] + STALE_AFTER_S + 60)
    assert stale.state == "stale" and "no update since" in stale.label and "some-other-host" in stale.message


def test_failed_run_records_the_reason(tmp_path):
    model = TinyLM()
    model.fail_at = 2
    logger = RunRecordLogger(tmp_path, version="f")
    trainer = quiet_trainer(max_steps=4, callbacks=[AttentionEntropyMonitor(every_n_steps=1, print_summary=False)], logger=[logger])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, token_loader())
    meta = _meta(logger.run_dir)
    assert meta["status"] == "failed" and meta["reason"] == "RuntimeError: boom" and meta["end_time"] is not None
    run = load_run(logger.run_dir)
    assert run.warnings[0].startswith("The run failed (RuntimeError: boom)")
    assert not list(logger.run_dir.glob("*.tmp"))  # meta.json is replaced atomically


def test_keyboard_interrupt_is_interrupted(tmp_path):
    class Interrupted(TinyLM):
        def training_step(self, batch, batch_idx):
            if self.global_step >= 2:
                raise KeyboardInterrupt
            return super().training_step(batch, batch_idx)

    logger = RunRecordLogger(tmp_path, version="i")
    trainer = quiet_trainer(max_steps=4, callbacks=[AttentionEntropyMonitor(every_n_steps=1, print_summary=False)], logger=[logger])
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning exits 1 after a graceful shutdown
            trainer.fit(Interrupted(), token_loader())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT from then on
    run = load_run(logger.run_dir)
    assert run.status == "interrupted" and run.meta["reason"].startswith("KeyboardInterrupt")
    assert "interrupted" in run.warnings[0] and run.last_step == 1


def test_killed_before_the_first_logging_step(tmp_path, capsys):
    model = TinyLM()
    model.fail_at = 0
    logger = RunRecordLogger(tmp_path, version="early")
    trainer = quiet_trainer(max_steps=4, callbacks=[AttentionEntropyMonitor(every_n_steps=1, print_summary=False)], logger=[logger])
    with pytest.raises(RuntimeError):
        trainer.fit(model, token_loader())
    _set_meta(logger.run_dir, status="running", end_time=None, reason=None, pid_start=-1)  # as if SIGKILLed
    run = load_run(logger.run_dir)
    assert run.status == "killed" and run.last_step is None
    assert "stopped before its monitors' first logging step" in run.warnings[1] and "meta.json" in run.warnings[1]
    index = main(["report", str(logger.run_dir)])
    html = index.read_text()
    assert "stopped before its monitors" in html and "Add a monitor" not in html + capsys.readouterr().err
    assert "Configuration" in html and "killed (no update since" in html


# ---------------------------------------------------------------------- resume continues the same record
def _fit(tmp_path: Path, max_steps: int, ckpt_path: str | None = None, version: str | None = None, early: bool = False) -> RunRecordLogger:
    torch.manual_seed(0)
    logger = RunRecordLogger(tmp_path / "runs", version=version)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = quiet_trainer(
        max_steps=max_steps,
        callbacks=[AttentionEntropyMonitor(every_n_steps=1, print_summary=False), checkpoints],
        logger=[logger],
        log_every_n_steps=1,
        enable_checkpointing=True,
    )
    if early:  # as `entrotrain fit` does: its config is saved (find_run_record) before the checkpoint is restored
        assert find_run_record(trainer) is logger
    trainer.fit(TinyLM(), token_loader(), ckpt_path=ckpt_path)
    return logger


@pytest.mark.parametrize("early", [False, True], ids=["trainer", "cli-order"])
def test_resumed_fit_continues_the_same_record(tmp_path, early):
    first = _fit(tmp_path, max_steps=6, version="first")
    ckpt = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    assert ckpt.is_file()
    old = load_run(first.run_dir).scalars["entropy/attn_norm/min"]
    assert old[0].tolist() == [0, 1, 2, 3, 4, 5]

    second = _fit(tmp_path, max_steps=4, ckpt_path=str(ckpt), early=early)  # a new folder without the checkpoint's
    assert second.run_dir == first.run_dir
    assert sorted(p.name for p in (tmp_path / "runs" / "records").iterdir()) == ["first"]
    run = load_run(first.run_dir)
    meta = run.meta
    assert meta["status"] == "finished" and len(meta["resumes"]) == 1 and meta["resumes"][0]["ckpt_path"] == str(ckpt)
    steps, values = run.scalars["entropy/attn_norm/min"]
    assert steps.tolist() == [0, 1, 2, 3]  # steps 4, 5 of the abandoned run are superseded, none twice
    rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    marker = next(i for i, r in enumerate(rows) if "resume" in r)
    resumed = {r["step"]: r["values"]["entropy/attn_norm/min"] for r in rows[marker:] if "entropy/attn_norm/min" in r.get("values", {})}
    before = {r["step"]: r["values"]["entropy/attn_norm/min"] for r in rows[:marker] if "entropy/attn_norm/min" in r.get("values", {})}
    assert sorted(resumed) == [2, 3] or sorted(resumed) == [3]
    for step, value in zip(steps.tolist(), values.tolist()):
        assert value == resumed.get(step, before[step])  # the last value written for each step
    heatmaps = run.media["entropy/attn_norm/heatmap"]
    assert [m.step for m in heatmaps] == [0, 1, 2, 3]
    assert not run.warnings

    class Validated(TinyLM):
        def validation_step(self, batch, batch_idx):
            return self.training_step(batch, batch_idx)

    trainer = quiet_trainer(logger=[RunRecordLogger(tmp_path / "runs", version="test")], enable_checkpointing=True)
    trainer.validate(Validated(), token_loader(), ckpt_path=str(ckpt), verbose=False)  # not a resume
    assert len(json.loads((first.run_dir / "meta.json").read_text())["resumes"]) == 1
