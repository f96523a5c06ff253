"""Findings of the session-26 README walk, as tests that failed before their fix."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from entrotrain.cli import main

# lightning binds its log handler to sys.stderr when first imported: import it before a test captures stderr.
importlib.import_module("lightning.pytorch")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "attention_collapse.yaml"


def test_checkpoint_callback_with_checkpointing_disabled_is_one_paragraph(tmp_path, monkeypatch, capsys):
    """README "Roll back and cure": `--trainer.callbacks+=ModelCheckpoint` on a recipe with `enable_checkpointing:
    false` made Lightning's Trainer raise MisconfigurationException (not a ValueError), printed as a 30-line
    traceback; the README promises config mistakes are one paragraph with exit code 2."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("ENTROTRAIN_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(RECIPE), "--trainer.callbacks+=ModelCheckpoint",
              "--trainer.callbacks.every_n_train_steps", "50", "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(tmp_path / "runs")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("entrotrain fit: error:"))
    assert "enable_checkpointing=False" in line and "ModelCheckpoint" in line and "ENTROTRAIN_DEBUG=1" in line


def test_debug_env_keeps_the_misconfiguration_traceback(tmp_path, monkeypatch):
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("ENTROTRAIN_DEBUG", "1")
    with pytest.raises(MisconfigurationException):
        main(["fit", "--config", str(RECIPE), "--trainer.callbacks+=ModelCheckpoint", "--trainer.max_steps", "1",
              "--trainer.default_root_dir", str(tmp_path / "runs")])


def test_bundled_fragment_on_the_command_line_from_any_folder(tmp_path, monkeypatch, capsys):
    """README "Looking at the dashboard": `--trainer.logger configs/logger/csv.yaml` and `--config
    configs/trainer/ddp_cpu.yaml` after `--recipe` worked only from the repository root; from any other folder the
    parser said 'File does not exist' / 'Unexpected import path format'. Bundled fragments are found as in config
    files: the path relative to the working folder first, then the bundled configs."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--recipe", "attention_collapse", "--trainer.logger", "configs/logger/csv.yaml",
              "--config", "configs/trainer/ddp_cpu.yaml", "--print_config"])
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert "lightning.pytorch.loggers.CSVLogger" in out and "strategy: ddp" in out


def test_a_local_fragment_wins_over_the_bundled_one(tmp_path, monkeypatch):
    from entrotrain.cli import _expand_recipe

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "logger").mkdir(parents=True)
    (tmp_path / "configs" / "logger" / "csv.yaml").write_text("class_path: lightning.pytorch.loggers.CSVLogger\n")
    argv = _expand_recipe(["fit", "--trainer.logger=configs/logger/csv.yaml", "--config", "configs/trainer/gpu.yaml",
                           "--trainer.logger", "configs/logger/nope.yaml"])
    assert argv[1] == "--trainer.logger=configs/logger/csv.yaml"  # exists here: left as written
    assert argv[3].endswith("trainer/gpu.yaml") and Path(argv[3]).is_absolute() and Path(argv[3]).is_file()
    assert argv[5] == "configs/logger/nope.yaml"  # found nowhere: the parser's own error names it
