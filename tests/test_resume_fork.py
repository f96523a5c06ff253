"""``entrotrain fit --ckpt_path`` with a changed configuration forks: the configured model, learning rate and cure are
used (LightningCLI alone would take the checkpoint's hyperparameters), the optimizer state is adapted, and the run is
a new record naming its parent, whose record is left as it was. An unchanged resume continues its record as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from entrotrain._forked_resume import config_changes
from entrotrain.cli import main
from tests.helpers.fork_runs import copy_checkpoint, copy_record, record_bytes, records

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "attention_collapse.yaml"
#: A small model and short run: the recipe's own settings otherwise.
SMALL = (
    "--model.init_args.n_layer=1", "--model.init_args.n_embd=32", "--model.init_args.n_head=2",
    "--model.init_args.block_size=16", "--data.init_args.block_size=16", "--data.init_args.batch_size=4",
    "--data.init_args.max_chars=20000", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
    "--trainer.logger=false", "--trainer.val_check_interval=2",
)


def _fit(root: Path, *args: str):
    return main(["fit", "--config", str(RECIPE), *SMALL, f"--trainer.default_root_dir={root}", *args])


@pytest.fixture(scope="module")
def parent(tmp_path_factory, one_thread):
    """A 4-step run that saves a checkpoint every 2 steps, and its run record."""
    root = tmp_path_factory.mktemp("parent")
    cli = _fit(root, "--trainer.max_steps=4", "--trainer.enable_checkpointing=true",
               "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.every_n_train_steps=2",
               "--trainer.callbacks.save_top_k=-1", f"--trainer.callbacks.dirpath={root / 'ckpts'}")
    (record,) = (root / "records").iterdir()
    return root / "ckpts" / "epoch=0-step=2.ckpt", record, cli


def test_a_cure_on_resume_is_applied_and_recorded_as_a_fork(parent, tmp_path, capsys):
    ckpt, parent_record, _ = parent
    before = record_bytes(parent_record)
    cli = _fit(tmp_path, "--model.init_args.sigma_reparam=true", "--trainer.max_steps=4", f"--ckpt_path={ckpt}")
    out = capsys.readouterr().out
    assert "with a changed configuration" in out and "model.sigma_reparam: false → true" in out
    assert "start afresh" in out  # σReparam adds parameters: the optimizer cannot keep its moments
    model = cli.model.model
    assert type(model.blocks[0].attn.qkv).__name__ == "SigmaReparamLinear"  # the configured cure, not the ckpt's
    assert cli.trainer.global_step == 4  # resumed at step 2: two more steps
    (record,) = records(tmp_path)
    meta = json.loads((record / "meta.json").read_text())
    assert meta["forked_from"]["run_dir"] == str(parent_record.resolve())
    assert meta["forked_from"]["step"] == 2
    assert ["model.sigma_reparam", False, True] in meta["forked_from"]["changes"]
    assert meta["status"] == "finished" and not meta.get("resumes")
    assert "sigma_reparam: true" in (record / "config.yaml").read_text()
    assert record_bytes(parent_record) == before  # the parent's record is left exactly as it was
    assert f"entrotrain report {parent_record.resolve()} {record}" in out
    main(["status", str(record)])  # the fork says where it came from, in the terminal and in the report
    assert f"forked from {parent_record.name} after step 2 ({ckpt}); changed: model.sigma_reparam: false → true" in (
        capsys.readouterr().out)
    from entrotrain.dashboards.report import _header
    from entrotrain.dashboards.run_reader import load_run

    header = _header([load_run(record, require_monitors=False)])  # 2 steps: no monitor has logged yet
    assert f"forked from {parent_record.name} after step 2" in header


def test_a_new_learning_rate_on_resume_is_used_and_the_moments_are_kept(parent, tmp_path, capsys):
    ckpt, _, _ = parent
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    seen = {}

    def spy(module):  # the optimizer as restored, before the first resumed step
        optimizer = module.trainer.optimizers[0]
        seen["lr"] = [g["lr"] for g in optimizer.param_groups]
        first = optimizer.param_groups[0]["params"][0]
        seen["exp_avg"] = optimizer.state[first]["exp_avg"].clone()

    from entrotrain.tasks import LanguageModelingTask

    original = LanguageModelingTask.on_train_start
    LanguageModelingTask.on_train_start = spy
    try:
        _fit(tmp_path, "--model.init_args.lr=0.001", "--trainer.max_steps=3", f"--ckpt_path={ckpt}")
    finally:
        LanguageModelingTask.on_train_start = original
    out = capsys.readouterr().out
    assert "model.lr: 0.01 → 0.001" in out and "optimizer: lr 0.01 → 0.001" in out
    assert seen["lr"] == [0.001, 0.001]  # LightningCLI + the restored optimizer would both have kept 0.01
    assert torch.equal(seen["exp_avg"], saved["state"][0]["exp_avg"])  # Adam's moments are the checkpoint's


def test_an_unchanged_resume_continues_the_record(parent, tmp_path, capsys):
    ckpt, parent_record, _ = parent
    copied = copy_record(parent_record, tmp_path / "copy")  # resume into a copy: the shared fixture stays untouched
    moved = copy_checkpoint(ckpt, tmp_path / "step2.ckpt", str(copied))
    _fit(tmp_path / "run", "--trainer.max_steps=4", f"--ckpt_path={moved}")
    out = capsys.readouterr().out
    assert "changed configuration" not in out
    meta = json.loads((copied / "meta.json").read_text())
    assert len(meta["resumes"]) == 1 and "forked_from" not in meta
    assert records(tmp_path / "run") == []


def test_trainer_settings_do_not_make_a_fork(parent, tmp_path, capsys):
    ckpt, _, _ = parent
    _fit(tmp_path, "--trainer.max_steps=5", "--trainer.log_every_n_steps=1", f"--ckpt_path={ckpt}")
    assert "changed configuration" not in capsys.readouterr().out


def test_config_changes_lists_each_changed_leaf():
    before = {"model": {"class_path": "a.B", "init_args": {"lr": 0.01, "betas": (0.9, 0.95), "regularizers": None}},
              "data": {"init_args": {"seed": 0}}}
    after = {"model": {"class_path": "a.B", "init_args": {"lr": 0.001, "betas": [0.9, 0.95],
                                                          "regularizers": [{"class_path": "x.Floor"}]}},
             "data": {"init_args": {"seed": 0}}}
    assert config_changes(before, after) == [
        ("model.lr", 0.01, 0.001), ("model.regularizers", None, [{"class_path": "x.Floor"}]),
    ]
    assert config_changes(before, before) == []


def test_a_guard_that_named_a_checkpoint_gets_the_roll_back_and_cure_commands(parent):
    from entrotrain.callbacks import EntropyCollapseGuard

    ckpt, _, cli = parent
    (guard,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, EntropyCollapseGuard)]
    assert cli._rollback_lines() == []  # the guard never fired: nothing to roll back to
    guard.rollback_checkpoint = ckpt
    lines = cli._rollback_lines()
    assert lines[0].startswith("entrotrain: roll back to before the collapse")
    # the bundled cure recipes of attention_collapse, each a fork from the checkpoint, with the run's own model and
    # data settings (a cure for the 1-layer model, not the recipe's 4 layers) and none of its trainer settings
    overrides = " ".join(a for a in SMALL if a.startswith(("--model.", "--data.")))
    assert lines[1:] == [
        f"    entrotrain fit --recipe {cure} {overrides} --ckpt_path {ckpt}"
        for cure in ("attention_collapse_entropy_floor", "attention_collapse_sigma_reparam")
    ]


def test_a_change_of_shape_is_an_error_naming_it_not_a_traceback(parent, tmp_path, capsys):
    ckpt, _, _ = parent
    with pytest.raises(SystemExit) as exc:
        _fit(tmp_path, "--model.init_args.n_layer=2", "--trainer.max_steps=4", f"--ckpt_path={ckpt}")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "entrotrain fit: error: the checkpoint's weights do not fit the configured model" in err
    assert "model.n_layer" in err and "Traceback" not in err
    assert not list(tmp_path.glob("records/*"))  # no empty "failed" record left beside the parent's
