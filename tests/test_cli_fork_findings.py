"""False and missed forks of ``entrotrain fit --ckpt_path`` (:func:`entrotrain._forked_resume.fork_plan`: the
configuration dump against the checkpoint's run's ``config.yaml``). Each test failed before its fix."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from entrotrain._forked_resume import fork_plan

CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_steps": 4, "devices": 1, "gradient_clip_val": None, "gradient_clip_algorithm": None,
                "accumulate_grad_batches": 1, "precision": "32-true"},
    "model": {"class_path": "tests.callbacks.resume_changes_run.Net", "init_args": {"lr": 0.01, "width": 8}},
    "data": None,
    "optimizer": {"class_path": "torch.optim.AdamW",
                  "init_args": {"lr": 0.01, "weight_decay": 0.01, "foreach": None, "fused": None,
                                "capturable": False, "differentiable": False}},
    "lr_scheduler": None,
}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A checkpoint whose run record's ``config.yaml`` is :data:`CONFIG`."""
    record = tmp_path / "records" / "run-1"
    record.mkdir(parents=True)
    (record / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    (record / "meta.json").write_text(json.dumps({"status": "finished"}))
    path = tmp_path / "epoch=0-step=2.ckpt"
    torch.save({"global_step": 2, "state_dict": {}, "hyper_parameters": {"lr": 0.01, "width": 8},
                "entrotrain_run_record": {"run_dir": str(record), "step": 2}}, path)
    return path


def _with(**changes) -> dict:
    """:data:`CONFIG` with ``section__key=value`` set (``optimizer__fused=True``: optimizer.init_args.fused)."""
    config = copy.deepcopy(CONFIG)
    for name, value in changes.items():
        section, key = name.split("__")
        target = config[section]["init_args"] if "init_args" in (config[section] or {}) else config[section]
        target[key] = value
    return config


def test_an_unchanged_configuration_is_no_fork(ckpt):
    assert fork_plan(str(ckpt), copy.deepcopy(CONFIG)) is None


@pytest.mark.parametrize("flag, value", [("fused", True), ("foreach", True), ("capturable", True),
                                         ("differentiable", True)])
def test_an_optimizer_implementation_flag_is_no_fork(ckpt, flag, value):
    """``--optimizer.init_args.fused=true`` on the resume: the same AdamW. Before the fix: ``optimizer.fused:
    None → True``, a fork."""
    assert fork_plan(str(ckpt), _with(**{f"optimizer__{flag}": value})) is None


def test_a_real_optimizer_change_beside_a_flag_still_forks(ckpt):
    plan = fork_plan(str(ckpt), _with(optimizer__fused=True, optimizer__weight_decay=0.1))
    assert plan is not None and plan.changes == [("optimizer.weight_decay", 0.01, 0.1)]


@pytest.mark.parametrize("changes, expected", [
    ({"trainer__gradient_clip_val": 1.0}, [("trainer.gradient_clip_val", None, 1.0)]),
    ({"trainer__gradient_clip_val": 1.0, "trainer__gradient_clip_algorithm": "value"},
     [("trainer.gradient_clip_algorithm", "norm", "value"), ("trainer.gradient_clip_val", None, 1.0)]),
], ids=["on", "on-by-value"])
def test_gradient_clipping_turned_on_forks(ckpt, changes, expected):
    """Clipping is part of the update (as transformers' ``max_grad_norm``, which the HF fork compares). Before the
    fix the trainer section was not compared at all: the resume continued the parent's record with the changed
    update, superseding its history."""
    plan = fork_plan(str(ckpt), _with(**changes))
    assert plan is not None and plan.changes == expected


@pytest.mark.parametrize("changes", [
    {"trainer__max_steps": 8}, {"trainer__devices": 2}, {"trainer__accumulate_grad_batches": 2},
    {"trainer__precision": "bf16-mixed"}, {"trainer__gradient_clip_val": 0.0},
    {"trainer__gradient_clip_algorithm": "value"},  # clipping off: the algorithm is not used
], ids=["max_steps", "devices", "accumulate", "precision", "clip-0-is-off", "algorithm-unused"])
def test_other_trainer_settings_are_no_fork(ckpt, changes):
    assert fork_plan(str(ckpt), _with(**changes)) is None
