"""Bug hunt on "roll back and cure" (``entrotrain fit --ckpt_path`` with a changed configuration forks): the corners
of :mod:`entrotrain._forked_resume` and ``EntrotrainCLI._parse_ckpt_path`` / ``instantiate_trainer`` / ``fit`` /
``_rollback_lines``. Each test states what a user expects; the learning rates are read where a user reads them (the
``lr-AdamW`` values LearningRateMonitor logs into the run record).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from entrotrain.cli import main
from tests.helpers.fork_runs import copy_checkpoint, copy_record, record_bytes, records

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "attention_collapse.yaml"
LR = 0.01  # the recipe's
#: A small model and short run (as in tests/test_resume_fork.py), every step logged.
SMALL = (
    "--model.init_args.n_layer=1", "--model.init_args.n_embd=32", "--model.init_args.n_head=2",
    "--model.init_args.block_size=16", "--data.init_args.block_size=16", "--data.init_args.batch_size=4",
    "--data.init_args.max_chars=20000", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
    "--trainer.logger=false", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
)


def _checkpointing(dirpath: Path) -> tuple[str, ...]:
    return ("--trainer.enable_checkpointing=true", "--trainer.callbacks+=ModelCheckpoint",
            "--trainer.callbacks.every_n_train_steps=2", "--trainer.callbacks.save_top_k=-1",
            "--trainer.callbacks.save_last=true", f"--trainer.callbacks.dirpath={dirpath}")


def _fit(root: Path, *args: str, recipe: Path = RECIPE):
    return main(["fit", "--config", str(recipe), *SMALL, f"--trainer.default_root_dir={root}", *args])


def _lrs(record: Path, after: int = -1) -> dict[int, float]:
    """``step -> lr-AdamW/pg1`` as logged into the record (the last value of a step: a resume's rows win)."""
    out = {}
    for line in (record / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        values = row.get("values") or {}
        value = values.get("lr-AdamW/pg1", values.get("lr-AdamW"))
        if value is not None and row["step"] > after:
            out[row["step"]] = value
    return out


def _parent(root: Path, *args: str) -> tuple[Path, Path, object]:
    """A 4-step run saving a checkpoint every 2 steps (and last.ckpt); its step-2 checkpoint, record and CLI."""
    cli = _fit(root, "--trainer.max_steps=4", *_checkpointing(root / "ckpts"), *args)
    (record,) = records(root)
    return root / "ckpts" / "epoch=0-step=2.ckpt", record, cli


@pytest.fixture(scope="module")
def plain(tmp_path_factory, one_thread):
    """The recipe as is (no warmup): the step-2 checkpoint and the record."""
    return _parent(tmp_path_factory.mktemp("plain"))


@pytest.fixture(scope="module")
def warm(tmp_path_factory, one_thread):
    """With an 8-step linear warmup: the step-2 checkpoint is mid-warmup (lr = 0.01 * 3/8 at step 2)."""
    return _parent(tmp_path_factory.mktemp("warm"), "--model.init_args.warmup_steps=8")


# ---------------------------------------------------------------------------------------------------- schedules
def test_a_changed_warmup_gives_the_configured_schedule_from_the_first_resumed_step(warm, tmp_path, capsys):
    """Warmup 8 → 4 from the step-2 checkpoint (mid-warmup): the schedule keeps its position (README), so step 2
    runs at 0.01 * 3/4 and step 3 at 0.01. The restored optimizer's lr is the OLD schedule's (0.01 * 3/8) until the
    scheduler first steps: one step at the wrong rate, logged as such."""
    ckpt, _, _ = warm
    _fit(tmp_path, "--model.init_args.warmup_steps=4", "--trainer.max_steps=4", f"--ckpt_path={ckpt}")
    assert "model.warmup_steps: 8 → 4" in capsys.readouterr().out
    (fork,) = records(tmp_path)
    assert _lrs(fork, after=1) == pytest.approx({2: LR * 3 / 4, 3: LR})


def test_a_removed_warmup_runs_at_the_configured_rate(warm, tmp_path):
    ckpt, _, _ = warm
    _fit(tmp_path, "--model.init_args.warmup_steps=0", "--trainer.max_steps=4", f"--ckpt_path={ckpt}")
    (fork,) = records(tmp_path)
    assert _lrs(fork, after=1) == pytest.approx({2: LR, 3: LR})


def test_a_new_peak_mid_warmup_keeps_the_schedule_position(warm, tmp_path, capsys):
    """lr 0.01 → 0.002 at step 2 of an 8-step warmup: 0.002 * 3/8, then 0.002 * 4/8."""
    ckpt, _, _ = warm
    _fit(tmp_path, "--model.init_args.lr=0.002", "--model.init_args.warmup_steps=8", "--trainer.max_steps=4",
         f"--ckpt_path={ckpt}")
    assert "optimizer: lr 0.01 → 0.002" in capsys.readouterr().out
    (fork,) = records(tmp_path)
    assert _lrs(fork, after=1) == pytest.approx({2: 0.002 * 3 / 8, 3: 0.002 * 4 / 8})


def test_an_added_warmup_is_said_and_restarts_from_the_fork(plain, tmp_path, capsys):
    """No warmup → warmup 4 from step 2: the new scheduler starts at 0 (a re-warmup from the fork point: 1/4, 2/4);
    what is printed must not claim the learning rate changed permanently without saying why."""
    ckpt, _, _ = plain
    _fit(tmp_path, "--model.init_args.warmup_steps=4", "--trainer.max_steps=4", f"--ckpt_path={ckpt}")
    out = capsys.readouterr().out
    assert "model.warmup_steps: 0 → 4" in out
    assert "optimizer: lr" not in out  # was "optimizer: lr 0.01 → 0.0025": the peak did not change
    assert "schedule the checkpoint's run did not have starts at the fork (its step 0: lr 0.0025" in out
    (fork,) = records(tmp_path)
    assert _lrs(fork, after=1) == pytest.approx({2: LR * 1 / 4, 3: LR * 2 / 4})


# ---------------------------------------------------------------------------------------------------- optimizer
def test_betas_and_weight_decay_are_the_configured_ones_and_moments_kept(plain, tmp_path, monkeypatch, capsys):
    ckpt, _, _ = plain
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    seen = {}

    def spy(module):
        optimizer = module.trainer.optimizers[0]
        seen["groups"] = [(tuple(g["betas"]), g["weight_decay"], g["lr"]) for g in optimizer.param_groups]
        first = optimizer.param_groups[0]["params"][0]
        seen["exp_avg_sq"] = optimizer.state[first]["exp_avg_sq"].clone()

    from entrotrain.tasks import LanguageModelingTask

    monkeypatch.setattr(LanguageModelingTask, "on_train_start", spy)
    _fit(tmp_path, "--model.init_args.betas=[0.9,0.99]", "--model.init_args.weight_decay=0.05",
         "--trainer.max_steps=3", f"--ckpt_path={ckpt}")
    out = capsys.readouterr().out
    assert "model.betas: [0.9, 0.95] → [0.9, 0.99]" in out and "model.weight_decay: 0.0 → 0.05" in out
    assert seen["groups"] == [((0.9, 0.99), 0.05, LR), ((0.9, 0.99), 0.0, LR)]  # matrices decayed, the rest not
    assert torch.equal(seen["exp_avg_sq"], saved["state"][0]["exp_avg_sq"])


def test_a_data_only_change_forks_and_keeps_the_optimizer(plain, tmp_path, monkeypatch, capsys):
    ckpt, parent_record, _ = plain
    before = record_bytes(parent_record)
    saved = torch.load(ckpt, weights_only=False)["optimizer_states"][0]
    seen = {}

    def spy(module):
        optimizer = module.trainer.optimizers[0]
        seen["exp_avg"] = optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"].clone()

    from entrotrain.tasks import LanguageModelingTask

    monkeypatch.setattr(LanguageModelingTask, "on_train_start", spy)
    _fit(tmp_path, "--data.init_args.batch_size=8", "--trainer.max_steps=3", f"--ckpt_path={ckpt}")
    out = capsys.readouterr().out
    assert "data.batch_size: 4 → 8" in out and "start afresh" not in out
    assert torch.equal(seen["exp_avg"], saved["state"][0]["exp_avg"])
    (fork,) = records(tmp_path)
    assert json.loads((fork / "meta.json").read_text())["forked_from"]["changes"] == [["data.batch_size", 4, 8]]
    assert record_bytes(parent_record) == before


# ---------------------------------------------------------------------------------------------------- no fork
def test_max_steps_does_not_fork_and_continues_the_record(plain, tmp_path, capsys):
    """Trainer settings (max_steps) do not fork, nor does a drawn seed (seed_everything: true): the parent's record
    is continued."""
    ckpt, parent_record, _ = plain
    copied = copy_record(parent_record, tmp_path / "copy")
    moved = copy_checkpoint(ckpt, tmp_path / "step2.ckpt", str(copied))
    _fit(tmp_path / "run", "--trainer.max_steps=3", "--seed_everything=true", f"--ckpt_path={moved}")
    assert "changed configuration" not in capsys.readouterr().out
    meta = json.loads((copied / "meta.json").read_text())
    assert len(meta["resumes"]) == 1 and "forked_from" not in meta
    assert records(tmp_path / "run") == []


def test_a_new_seed_forks(plain, tmp_path, capsys):
    """A new seed is a new data order and new dropout (PaLM's cure for a loss spike: restart before it on other
    batches): a fork, and the parent's record (which ran with seed 0) is not rewritten to claim seed 7."""
    ckpt, parent_record, _ = plain
    before = record_bytes(parent_record)
    _fit(tmp_path, "--trainer.max_steps=3", "--seed_everything=7", f"--ckpt_path={ckpt}")
    assert "seed_everything: 0 → 7" in capsys.readouterr().out
    (fork,) = records(tmp_path)
    assert json.loads((fork / "meta.json").read_text())["forked_from"]["changes"] == [["seed_everything", 0, 7]]
    assert record_bytes(parent_record) == before


# ---------------------------------------------------------------------------------------------------- ckpt_path
def test_ckpt_path_last_with_a_changed_configuration_forks(plain, tmp_path, capsys):
    """``--ckpt_path last`` (Lightning resolves it to the ModelCheckpoint's last.ckpt) with a new learning rate: the
    configured rate must be used and the parent's record left alone, as with the file's path."""
    _, parent_record, _ = plain
    before = record_bytes(parent_record)
    dirpath = parent_record.parent.parent / "ckpts"
    work = tmp_path / "ckpts"
    shutil.copytree(dirpath, work)
    _fit(tmp_path, "--model.init_args.lr=0.001", "--trainer.max_steps=5", *_checkpointing(work), "--ckpt_path=last")
    out = capsys.readouterr().out
    assert "model.lr: 0.01 → 0.001" in out
    assert record_bytes(parent_record) == before  # not continued with the changed configuration
    (fork,) = records(tmp_path)
    assert _lrs(fork, after=3) == pytest.approx({4: 0.001})


def test_ckpt_path_last_unchanged_continues_the_record(plain, tmp_path, capsys):
    _, parent_record, _ = plain
    work = tmp_path / "copy"
    copied = copy_record(parent_record, work)
    copy_checkpoint(work / "ckpts" / "last.ckpt", work / "ckpts" / "last.ckpt", str(copied))
    _fit(tmp_path / "run", "--trainer.max_steps=5", *_checkpointing(work / "ckpts"), "--ckpt_path=last")
    assert "changed configuration" not in capsys.readouterr().out
    meta = json.loads((copied / "meta.json").read_text())
    assert len(meta["resumes"]) == 1 and "forked_from" not in meta
    assert records(tmp_path / "run") == []


def test_ckpt_path_hpc_without_an_hpc_checkpoint_keeps_the_configured_model(tmp_path, capsys):
    """A non-file ``ckpt_path`` never crashes the fork check; Lightning's own error for a missing hpc checkpoint."""
    with pytest.raises(ValueError, match="no HPC checkpoint"):
        _fit(tmp_path, "--model.init_args.sigma_reparam=true", "--trainer.max_steps=1", "--ckpt_path=hpc")


# ---------------------------------------------------------------------------------------------------- no record
def test_a_checkpoint_written_outside_the_cli_still_gets_the_configured_learning_rate(tmp_path, monkeypatch, capsys):
    """A Trainer run outside the CLI: no run-record entry and no ``_class_path`` in its hyperparameters. The
    configured lr (0.001) must still win over the checkpoint's (0.01), as for a CLI checkpoint."""
    import lightning.pytorch as pl

    from entrotrain.tasks import CharCorpusDataModule, LanguageModelingTask

    model = LanguageModelingTask(block_size=16, n_layer=1, n_head=2, n_embd=32, lr=LR)
    data = CharCorpusDataModule(block_size=16, batch_size=4, max_chars=20000)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path / "outside")
    trainer.fit(model, data)
    ckpt = tmp_path / "outside.ckpt"
    trainer.save_checkpoint(ckpt)
    assert "_class_path" not in torch.load(ckpt, weights_only=False)["hyper_parameters"]
    _fit(tmp_path / "run", "--model.init_args.lr=0.001", "--trainer.max_steps=3", f"--ckpt_path={ckpt}")
    assert "model.lr: 0.01 → 0.001" in capsys.readouterr().out
    (record,) = records(tmp_path / "run")
    assert set(_lrs(record, after=1).values()) == {0.001}  # the checkpoint's optimizer said 0.01


def test_a_deleted_parent_record_forks_from_the_hyperparameters(plain, tmp_path, capsys):
    ckpt, _, _ = plain
    moved = copy_checkpoint(ckpt, tmp_path / "step2.ckpt", str(tmp_path / "gone" / "records" / "x"))
    _fit(tmp_path / "run", "--model.init_args.lr=0.001", "--trainer.max_steps=3", f"--ckpt_path={moved}")
    out = capsys.readouterr().out
    assert "model.lr: 0.01 → 0.001" in out and "forked from" not in out
    (record,) = records(tmp_path / "run")
    meta = json.loads((record / "meta.json").read_text())
    assert meta["forked_from"]["run_dir"] is None and meta["forked_from"]["step"] == 2
    main(["status", str(record)])
    assert "forked from a checkpoint after step 2" in capsys.readouterr().out


def test_an_older_record_without_config_yaml_falls_back_to_the_hyperparameters(plain, tmp_path, capsys):
    ckpt, parent_record, _ = plain
    copied = copy_record(parent_record, tmp_path / "copy")
    (copied / "config.yaml").unlink()
    before = record_bytes(copied)
    moved = copy_checkpoint(ckpt, tmp_path / "step2.ckpt", str(copied))
    _fit(tmp_path / "run", "--model.init_args.lr=0.001", "--trainer.max_steps=3", f"--ckpt_path={moved}")
    assert "model.lr: 0.01 → 0.001" in capsys.readouterr().out
    (record,) = records(tmp_path / "run")
    assert json.loads((record / "meta.json").read_text())["forked_from"]["run_dir"] == str(copied)
    assert record_bytes(copied) == before


# ---------------------------------------------------------------------------------------------------- σReparam fork
@pytest.fixture(scope="module")
def sigma_fork(plain, tmp_path_factory, one_thread):
    """The plain run forked at step 2 with σReparam on, to step 4, checkpointing: its step-4 checkpoint and record."""
    ckpt, _, _ = plain
    root = tmp_path_factory.mktemp("sigma_fork")
    _fit(root, "--model.init_args.sigma_reparam=true", "--trainer.max_steps=4", *_checkpointing(root / "ckpts"),
         f"--ckpt_path={ckpt}")
    (record,) = records(root)
    return root / "ckpts" / "epoch=0-step=4.ckpt", record


def test_removing_sigma_reparam_on_resume_is_an_error_naming_it(sigma_fork, tmp_path, capsys):
    """The reverse change (σReparam checkpoint, plain model): gamma/u/sigma are unexpected keys. An error naming
    the change and saying σReparam cannot be removed on a resume; never a traceback."""
    ckpt, _ = sigma_fork
    with pytest.raises(SystemExit) as exc:
        _fit(tmp_path, "--trainer.max_steps=6", f"--ckpt_path={ckpt}")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "model.sigma_reparam" in err and "Traceback" not in err
    assert "σReparam cannot be removed" in err  # not only "σReparam ... can be added"


def test_a_fork_of_a_fork_names_the_first_fork_and_an_unchanged_resume_continues_it(sigma_fork, tmp_path, capsys):
    ckpt, fork_record = sigma_fork
    before = record_bytes(fork_record)
    _fit(tmp_path / "second", "--model.init_args.sigma_reparam=true", "--model.init_args.lr=0.001",
         "--trainer.max_steps=5", f"--ckpt_path={ckpt}")
    out = capsys.readouterr().out
    assert "model.lr: 0.01 → 0.001" in out and "sigma_reparam" not in out.split("recorded as")[0]
    (second,) = records(tmp_path / "second")
    meta = json.loads((second / "meta.json").read_text())["forked_from"]
    assert meta["run_dir"] == str(fork_record.resolve()) and meta["changes"] == [["model.lr", 0.01, 0.001]]
    assert record_bytes(fork_record) == before
    # an unchanged resume of the fork continues the fork's record (a copy of it)
    copied = copy_record(fork_record, tmp_path / "copy")
    moved = copy_checkpoint(ckpt, tmp_path / "step4.ckpt", str(copied))
    _fit(tmp_path / "run", "--model.init_args.sigma_reparam=true", "--trainer.max_steps=5", f"--ckpt_path={moved}")
    assert "changed configuration" not in capsys.readouterr().out
    meta = json.loads((copied / "meta.json").read_text())
    assert len(meta["resumes"]) == 1 and meta["forked_from"]["step"] == 2
    assert records(tmp_path / "run") == []


def test_validate_from_a_checkpoint_with_the_recipe(plain, sigma_fork, tmp_path, capsys):
    """validate --ckpt_path: the checkpoint's own model (the fork's σReparam one even with the plain recipe)."""
    for ckpt, sigma in ((plain[0], False), (sigma_fork[0], True)):
        cli = main(["validate", "--config", str(RECIPE), *SMALL, f"--trainer.default_root_dir={tmp_path}",
                    f"--ckpt_path={ckpt}"])
        qkv = type(cli.model.model.blocks[0].attn.qkv).__name__
        assert (qkv == "SigmaReparamLinear") is sigma
        assert "val/loss" in cli.trainer.callback_metrics
    assert "changed configuration" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- rollback lines
def _cli_with_rollback(recipe: str, argv: list[str] | None = None):
    """An EntrotrainCLI, as after a fit of bundled ``recipe`` whose guard named ``ckpts/step=50.ckpt``."""
    from types import SimpleNamespace

    from entrotrain._lightning_cli import EntrotrainCLI
    from entrotrain._recipes import find_recipe
    from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard

    guard = object.__new__(EntropyCollapseGuard)
    guard.rollback_checkpoint = Path("ckpts/step=50.ckpt")
    cli = object.__new__(EntrotrainCLI)
    path = find_recipe(recipe)
    cli.trainer, cli.subcommand = SimpleNamespace(callbacks=[guard]), "fit"
    cli.config = {"fit": {"config": [path]}}
    cli._argv = argv if argv is not None else ["fit", "--config", str(path)]
    return cli


@pytest.mark.parametrize(("recipe", "cures"), [
    # named in its header, no prefix
    ("grpo_baseline", ["grpo_clip_cov", "grpo_entropy_bonus", "grpo_kl_cov", "grpo_steer"]),
    ("moe_router_collapse", ["moe_router_tsallis"]),
    ("ssl_rank_collapse", ["ssl_rank_collapse_entropy_reg", "ssl_stop_gradient"]),
    ("attention_collapse", ["attention_collapse_entropy_floor", "attention_collapse_sigma_reparam"]),
    ("vit_digits_baseline", ["vit_digits_sigma_reparam"]),  # "# σReparam cure for vit_digits_baseline.yaml"
    ("attention_collapse_sigma_reparam", []),  # a cure's header names its disease: never suggested as a cure
    ("moe_router_tsallis", []),
])
def test_rollback_lines_name_the_recipes_cures(recipe, cures):
    lines = _cli_with_rollback(recipe)._rollback_lines()
    expected = [f"    entrotrain fit --recipe {cure} --ckpt_path ckpts/step=50.ckpt" for cure in cures]
    assert lines[1:] == (expected or [
        "    entrotrain fit --config <your config, with the cure> --ckpt_path ckpts/step=50.ckpt"])


def test_the_printed_rollback_command_runs_with_the_runs_own_overrides(plain, tmp_path, capsys):
    """The parent ran with overrides (a 1-layer model): the printed command, run as printed, must resume (the cure
    recipe's 4-layer defaults cannot take the checkpoint's weights)."""
    import shlex

    from entrotrain.callbacks import EntropyCollapseGuard

    ckpt, _, cli = plain
    (guard,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, EntropyCollapseGuard)]
    guard.rollback_checkpoint = ckpt
    try:
        lines = cli._rollback_lines()
    finally:
        guard.rollback_checkpoint = None
    command = shlex.split(lines[-1])  # ... --recipe attention_collapse_sigma_reparam ... --ckpt_path CKPT
    assert command[:4] == ["entrotrain", "fit", "--recipe", "attention_collapse_sigma_reparam"]
    assert "--model.init_args.n_layer=1" in command and command[-2:] == ["--ckpt_path", str(ckpt)]
    capsys.readouterr()
    fork = main([*command[1:-2], f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3", *command[-2:]])
    assert fork.trainer.global_step == 3 and "model.sigma_reparam: false → true" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------- DDP
def test_a_two_process_ddp_fork_is_printed_once_and_recorded_once(plain, tmp_path):
    """``--config configs/trainer/ddp_cpu.yaml`` (2 processes, gloo), the cure (σReparam) and a new learning rate:
    the plan is printed once, one new record is written (its meta names the parent, from rank 0), the parent's
    record is left as it was."""
    import os
    import subprocess
    import sys

    ckpt, parent_record, _ = plain
    before = record_bytes(parent_record)
    script = ROOT / "tests" / "helpers" / "fork_cli_run.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [sys.executable, str(script), "fit", "--config", str(RECIPE), "--config",
         str(ROOT / "configs" / "trainer" / "ddp_cpu.yaml"), *SMALL, f"--trainer.default_root_dir={tmp_path}",
         "--model.init_args.lr=0.001", "--model.init_args.sigma_reparam=true", "--trainer.max_steps=4",
         f"--ckpt_path={ckpt}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("with a changed configuration") == 1, proc.stdout[-3000:]
    assert proc.stdout.count("model.lr: 0.01 → 0.001") == 1 and proc.stdout.count("start afresh") == 1
    (record,) = records(tmp_path)
    meta = json.loads((record / "meta.json").read_text())
    assert meta["forked_from"]["run_dir"] == str(parent_record.resolve()) and meta["status"] == "finished"
    assert _lrs(record, after=1) == pytest.approx({2: 0.001, 3: 0.001})
    assert record_bytes(parent_record) == before


def test_a_record_from_an_older_version_missing_a_new_argument_does_not_fork(plain, tmp_path, capsys):
    """A parent record written before an init argument existed (its config.yaml lacks ``sigma_reparam``, now an
    argument whose default is kept): an unchanged resume continues the record, it is not a fork "null → false"."""
    ckpt, parent_record, _ = plain
    copied = copy_record(parent_record, tmp_path / "copy")
    config = copied / "config.yaml"
    text = config.read_text()
    assert "    sigma_reparam: false\n" in text
    config.write_text(text.replace("    sigma_reparam: false\n", ""))
    moved = copy_checkpoint(ckpt, tmp_path / "step2.ckpt", str(copied))
    _fit(tmp_path / "run", "--trainer.max_steps=3", f"--ckpt_path={moved}")
    assert "changed configuration" not in capsys.readouterr().out
    assert len(json.loads((copied / "meta.json").read_text())["resumes"]) == 1
    # the same argument set to a non-default value is a change, and forks (the resume above rewrote config.yaml)
    config.write_text(text.replace("    sigma_reparam: false\n", ""))
    _fit(tmp_path / "cure", "--model.init_args.sigma_reparam=true", "--trainer.max_steps=3", f"--ckpt_path={moved}")
    assert "model.sigma_reparam: null → true" in capsys.readouterr().out


def test_a_missing_checkpoint_file_is_an_error_before_anything_starts(tmp_path, capsys):
    """A typo in ``--ckpt_path``: a parser-style error naming it (not Lightning's FileNotFoundError traceback after
    the run record was started and left "running")."""
    with pytest.raises(SystemExit) as exc:
        _fit(tmp_path, "--trainer.max_steps=1", f"--ckpt_path={tmp_path / 'nope.ckpt'}")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"--ckpt_path {tmp_path / 'nope.ckpt'}" in err and "Traceback" not in err
    assert records(tmp_path) == []


def test_a_changed_nested_class_is_one_change_not_every_argument_of_both():
    """GRPO's cure recipes swap ``policy_loss`` (PPOClipLoss → ClipCovLoss): one change naming both classes and the
    new arguments, not nine lines such as ``model.policy_loss.global_agg: false → null`` (the argument is gone, not
    null) — the fork of grpo_baseline into grpo_clip_cov printed exactly that."""
    from entrotrain._forked_resume import ForkPlan, config_changes

    ppo = {"class_path": "entrotrain.regularizers.PPOClipLoss", "init_args": {"clip_low": 0.2, "global_agg": False}}
    cov = {"class_path": "entrotrain.regularizers.ClipCovLoss", "init_args": {"clip_ratio": 0.2, "cov_ub": 3.0}}
    before = {"model": {"class_path": "a.GRPOTask", "init_args": {"lr": 0.001, "policy_loss": ppo}}}
    after = {"model": {"class_path": "a.GRPOTask", "init_args": {"lr": 0.002, "policy_loss": cov}}}
    changes = config_changes(before, after)
    assert changes == [("model.lr", 0.001, 0.002), ("model.policy_loss", ppo, cov)]
    lines = ForkPlan("c.ckpt", 2, changes).lines()
    assert "    model.policy_loss: PPOClipLoss(clip_low=0.2, global_agg=false) → ClipCovLoss(clip_ratio=0.2, " \
           "cov_ub=3.0)" in lines
    # an argument of the same class still changes alone
    after["model"]["init_args"]["policy_loss"] = {**ppo, "init_args": {"clip_low": 0.3, "global_agg": False}}
    assert config_changes(before, after)[1] == ("model.policy_loss.clip_low", 0.2, 0.3)


# ---------------------------------------------------------------------------------------------------- optimizer kind
VIT = ROOT / "recipes" / "vit_digits_baseline.yaml"
VIT_SMALL = ("--model.init_args.n_layer=1", "--model.init_args.n_embd=16", "--model.init_args.n_head=2",
             "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.limit_val_batches=1",
             "--trainer.val_check_interval=2", "--data.init_args.batch_size=8")


def test_a_changed_optimizer_kind_starts_its_state_afresh(tmp_path, capsys):
    """DigitsViTTask's ``optimizer: sgd → adam`` on resume: SGD's state (momentum buffers, no ``step``) was loaded
    into AdamW (KeyError: 'step' traceback at the first step), and adam → sgd claimed "its moments are the
    checkpoint's" while SGD ignores Adam's moments. A different optimizer starts its state afresh, and says so."""
    def vit(root: Path, *args: str):
        return main(["fit", "--config", str(VIT), *VIT_SMALL, f"--trainer.default_root_dir={root}", *args])

    vit(tmp_path / "parent", "--model.init_args.optimizer=sgd", "--trainer.max_steps=2",
        *_checkpointing(tmp_path / "ckpts"))
    capsys.readouterr()
    cli = vit(tmp_path / "fork", "--trainer.max_steps=4", f"--ckpt_path={tmp_path / 'ckpts' / 'epoch=0-step=2.ckpt'}")
    out = capsys.readouterr().out
    assert cli.trainer.global_step == 4
    assert "model.optimizer: sgd → adam" in out and "its moments are the checkpoint's" not in out
    assert "the optimizer changed (now AdamW): its state (moments) and schedulers start afresh" in out


def test_adding_a_regulariser_with_a_learnable_parameter_on_resume(plain, tmp_path, capsys, monkeypatch):
    """EntropyBandRegularizer (a learnable per-head threshold, in the module's state) added on resume: the
    checkpoint has no ``regularizer...raw``. The fork must either start the new regulariser's parameter from its
    init (as σReparam's γ = σ(W) is filled in) or refuse with a message that does not say "regularisers can be
    added"."""
    ckpt, _, _ = plain
    band = ('[{"class_path": "entrotrain.regularizers.EntropyBandRegularizer", '
            '"init_args": {"n_layers": 1, "n_heads": 2}}]')
    seen = {}

    def spy(module):  # the weights as restored, before the first resumed step
        seen.update({k: v.detach().clone() for k, v in module.state_dict().items()})

    from entrotrain.tasks import LanguageModelingTask

    monkeypatch.setattr(LanguageModelingTask, "on_train_start", spy)
    cli = _fit(tmp_path, f"--model.init_args.regularizers={band}", "--trainer.max_steps=3", f"--ckpt_path={ckpt}")
    assert cli.trainer.global_step == 3  # was: exit 2, "... Missing key(s): regularizer.raw ... can be added"
    assert "new in the model, from their initial values: regularizer.raw" in capsys.readouterr().out
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert sorted(seen) == sorted([*saved, "regularizer.raw"])
    assert all(torch.equal(seen[k], v) for k, v in saved.items())  # every checkpoint weight loaded
    assert torch.equal(seen["regularizer.raw"], torch.zeros(1, 2))  # logit(0.5): its initial value
    assert cli.model.strict_loading  # restored after the fork's relaxed load


# ---------------------------------------------------------------------------------------------------- scheduler state
def test_a_changed_scheduler_setting_saved_in_its_state_is_the_configured_one(tmp_path, capsys):
    """A task whose scheduler keeps its setting in its state (CosineAnnealingLR's T_max): T_max 8 → 16 on resume.
    Lightning restores the saved scheduler state, so T_max went back to 8 from the second resumed step on."""
    import math

    def cosine(root: Path, *args: str):
        return _fit(root, "--model.class_path=tests.helpers.fork_models.CosineLM", *args)

    cosine(tmp_path / "parent", "--model.init_args.cosine_steps=8", "--trainer.max_steps=2",
           *_checkpointing(tmp_path / "ckpts"))
    cosine(tmp_path / "fork", "--model.init_args.cosine_steps=16", "--trainer.max_steps=5",
           f"--ckpt_path={tmp_path / 'ckpts' / 'epoch=0-step=2.ckpt'}")
    assert "model.cosine_steps: 8 → 16" in capsys.readouterr().out
    (record,) = records(tmp_path / "fork")
    lrs = {step: value for step, value in _lrs(record).items()}
    expected = {step: LR * (1 + math.cos(math.pi * step / 16)) / 2 for step in (2, 3, 4)}
    assert lrs == pytest.approx(expected)
