"""RunRecordLogger: what it writes, that it never changes training, and the one-line helpers callbacks use."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities import rank_zero_only

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard
from entrotrain.callbacks._publish import publish_scalars
from entrotrain.dashboards.run_reader import load_run
from entrotrain.dashboards.run_record import RECORD_FORMAT, RunRecordLogger, record_event, record_media, record_threshold
from entrotrain.errors import EntrotrainError
from tests.helpers.lightning_models import TinyLM, quiet_trainer, token_loader


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_files_status_and_values(tmp_path):
    logger = RunRecordLogger(tmp_path, version="v", recipe="recipes/attention_collapse.yaml")
    logger.log_hyperparams({"config": "a: 1\n", "lr": 0.01, "shape": torch.ones(2)})
    logger.log_metrics({"x": torch.tensor(1.5), "y": float("nan"), "z": 2}, step=7)
    run_dir = tmp_path / "records" / "v"
    assert logger.log_dir == str(run_dir)
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["format"] == RECORD_FORMAT and meta["status"] == "running" and meta["end_time"] is None
    assert meta["name"] == "attention_collapse"
    assert (run_dir / "config.yaml").read_text() == "a: 1\n"
    assert json.loads((run_dir / "hparams.json").read_text()) == {"lr": 0.01, "shape": [1.0, 1.0]}
    # flushed line by line: readable before the run ends
    assert _rows(run_dir / "metrics.jsonl")[0]["values"] == {"x": 1.5, "y": None, "z": 2.0}
    assert _rows(run_dir / "metrics.jsonl")[0]["step"] == 7
    logger.finalize("success")
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["end_time"] >= meta["start_time"]
    logger.finalize("failed")  # a later finalize (e.g. trainer.test after fit) keeps the first status
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"


def test_failed_status_and_unique_default_versions(tmp_path):
    first, second = RunRecordLogger(tmp_path), RunRecordLogger(tmp_path)
    first.log_metrics({"a": 1.0}, step=0)
    second.log_metrics({"a": 1.0}, step=0)
    assert first.log_dir != second.log_dir
    first.finalize("failed")
    assert json.loads((first.run_dir / "meta.json").read_text())["status"] == "failed"


def test_media_thresholds_events(tmp_path):
    logger = RunRecordLogger(tmp_path, version="v")
    logger.log_media("entropy/repr/layer 1/spectrum", torch.arange(4.0), 10, kind="spectrum", meta={"n": 4})
    logger.log_threshold("entropy/attn_norm/*", 0.1, "collapse")
    logger.log_threshold("entropy/attn_norm/*", 0.1, "collapse")  # declared twice (two monitors): kept once
    logger.log_event("entropy/attn_norm/min", "fell", 12, "alert")
    run = load_run(logger.run_dir)  # media alone counts as monitor output
    (item,) = run.media["entropy/repr/layer 1/spectrum"]
    assert item.step == 10 and item.kind == "spectrum" and item.meta == {"n": 4}
    np.testing.assert_array_equal(item.load(), [0.0, 1.0, 2.0, 3.0])
    assert run.thresholds == [{"key": "entropy/attn_norm/*", "value": 0.1, "label": "collapse"}]
    assert run.events[0]["step"] == 12 and run.events[0]["message"] == "fell"
    with pytest.raises(EntrotrainError, match="kind must be one of"):
        logger.log_media("k", [1.0], 0, kind="image")  # type: ignore[arg-type]


def test_nothing_written_off_rank_zero(tmp_path, monkeypatch):
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    logger = RunRecordLogger(tmp_path, version="v")
    logger.log_metrics({"a": 1.0}, step=0)
    logger.log_media("k", [1.0], 0)
    logger.finalize("success")
    assert not (tmp_path / "records").exists()


def test_save_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(EntrotrainError, match="not a folder"):
        RunRecordLogger(tmp_path / "f")


def _train(tmp_path, with_record: bool, **trainer_kwargs):
    torch.manual_seed(0)
    model = TinyLM()
    callbacks = [
        AttentionEntropyMonitor(every_n_steps=2, print_summary=False),
        # fires at once (judged from the first observation): an event
        EntropyCollapseGuard("entropy/attn_norm/min", threshold=2.0, action="warn", arm_on_good=False),
    ]
    logger = [RunRecordLogger(tmp_path, version="r")] if with_record else False
    trainer = quiet_trainer(max_steps=5, callbacks=callbacks, logger=logger, log_every_n_steps=1, **trainer_kwargs)
    with pytest.warns(UserWarning, match="EntropyCollapseGuard"):
        trainer.fit(model, token_loader())
    return trainer, model


def test_trainer_run_writes_a_complete_record_and_training_is_unchanged(tmp_path):
    trainer, model = _train(tmp_path, with_record=True)
    _, reference = _train(tmp_path / "ref", with_record=False)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)  # the record consumes no RNG and never syncs

    run = load_run(tmp_path / "records" / "r")
    assert run.status == "finished" and not run.warnings
    assert run.scalars["entropy/attn_norm/min"][0].tolist() == [0, 2, 4]  # every_n_steps=2, steps 0..4
    assert "train/loss" in run.scalars and "entropy/attn_norm/L1/H3" in run.scalars
    heatmaps = run.media["entropy/attn_norm/heatmap"]
    assert [m.step for m in heatmaps] == [0, 2, 4] and heatmaps[0].load().shape == (2, 4)
    assert {"key": "entropy/attn_norm/*", "value": 0.1, "label": "collapse"} in run.thresholds
    assert {"key": "entropy/attn_norm/min", "value": 2.0, "label": "guard (warn)"} in run.thresholds
    (event,) = run.events
    assert event["key"] == "entropy/attn_norm/min" and event["step"] == 0 and event["level"] == "warn"
    assert run.scalars["entropy/attn_norm/min/alert"][1].tolist() == [1.0]
    assert run.hparams["entropy/attn/layers"] == {"L0": "blocks.0", "L1": "blocks.1"}
    # the headline figures go to the progress bar
    assert "entropy/attn_norm/min" in trainer.progress_bar_metrics
    assert "entropy/attn/collapse_frac" in trainer.progress_bar_metrics
    assert "entropy/attn_norm/mean" not in trainer.progress_bar_metrics


def test_failed_run_is_marked_failed(tmp_path):
    model = TinyLM()
    model.fail_at = 3
    trainer = quiet_trainer(
        max_steps=6, callbacks=[AttentionEntropyMonitor(every_n_steps=1, print_summary=False)],
        logger=[RunRecordLogger(tmp_path, version="r")],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, token_loader())
    run = load_run(tmp_path / "records" / "r")
    assert run.status == "failed" and "failed" in run.warnings[0]
    assert run.scalars["entropy/attn_norm/min"][0].tolist() == [0, 1, 2]


def test_helpers_are_no_ops_without_a_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = quiet_trainer(logger=False)
    record_media(trainer, "k", [1.0, 2.0], step=0, kind="spectrum")
    record_threshold(trainer, "k", 1.0)
    record_event(trainer, "k", "m", step=0)
    assert not list(tmp_path.rglob("*.json*"))


def test_publish_scalars_prog_bar_argument(tmp_path):
    seen = {}

    class Probe(TinyLM):
        def log(self, name, value, **kwargs):  # what publish_scalars asks Lightning for
            seen[name] = kwargs["prog_bar"]

    trainer = quiet_trainer(logger=False)
    model = Probe()
    model.trainer = trainer  # publish_scalars reads the step from the fit loop
    publish_scalars(trainer, model, {"entropy/policy/mean": 1.0, "other": 2.0})
    assert seen == {"entropy/policy/mean": True, "other": False}
    publish_scalars(trainer, model, {"entropy/policy/mean": 1.0, "other": 2.0}, prog_bar=["other"])
    assert seen == {"entropy/policy/mean": False, "other": True}


@pytest.mark.parametrize(
    "kwargs, fixed",
    [
        ({"version": "exp/1"}, "version='exp-1'"),  # nested records/exp/1 before
        ({"version": "../../escape"}, "version='escape'"),  # the record went two folders above save_dir/records
        ({"version": ".."}, "version='run'"),
        ({"version": "a\\b"}, "version='a-b'"),
        ({"name": "x/../.."}, "name='x'"),
        ({"version": ""}, "version='run'"),
        ({"version": 1.5}, "version='1.5'"),
    ],
)
def test_a_name_or_version_that_is_not_one_folder_name_is_refused(tmp_path, kwargs, fixed):
    with pytest.raises(EntrotrainError, match=re.escape(fixed)):
        RunRecordLogger(tmp_path / "runs", **kwargs)
    assert not (tmp_path / "escape").exists()
    assert RunRecordLogger(tmp_path, version=3).log_dir == str(tmp_path / "records" / "3")  # as Lightning's loggers
