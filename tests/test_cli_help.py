"""`entrotrain --help` lists every subcommand, stays light (no lightning import for --help / recipes), and the
"no wandb login" notice is printed only when a run with a wandb logger starts."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entrotrain.cli import SUBCOMMAND_HELP, main

# lightning binds its log handler to sys.stderr as it is when lightning is first imported, and entrotrain.cli imports it
# only when a run starts: import it now, before a test captures (and closes) stderr.
importlib.import_module("lightning.pytorch")

ROOT = Path(__file__).resolve().parents[1]
NOTICE = "no wandb login found"


def _no_wandb_login(monkeypatch, tmp_path) -> None:
    """As on a fresh machine: no WANDB_MODE, no API key, no ~/.netrc."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_help_lists_every_subcommand_with_its_line(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "{fit,validate,test,predict,report,status,inspect,recipes}" in out
    for name, line in SUBCOMMAND_HELP.items():
        assert f"  {name}" in out and line in out
    assert "entrotrain fit --recipe attention_collapse" in out


def test_no_arguments_prints_the_help_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "recipes" in capsys.readouterr().out


def test_lightning_subcommand_lines_are_lightnings_own():
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import _get_short_description

    for name in ("fit", "validate", "test", "predict"):
        first_sentence = _get_short_description(getattr(Trainer, name)).split(". ")[0].rstrip(".") + "."
        assert SUBCOMMAND_HELP[name] == first_sentence


def test_help_and_recipes_import_no_lightning_and_print_no_wandb_notice(tmp_path):
    """In a fresh interpreter, as the console script runs them (entrotrain/__init__ imports torch; lightning must
    not be imported by --help, recipes or the top-level dispatch)."""
    code = (
        "import sys\n"
        "from entrotrain.cli import main\n"
        "main(['--help']); main(['recipes'])\n"
        "print('LIGHTNING-IMPORTED' if any(m == 'lightning' or m.startswith('lightning.') for m in sys.modules) "
        "else 'NO-LIGHTNING')\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_MODE", "WANDB_API_KEY")}
    env["NETRC"] = str(tmp_path / "no-netrc")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "NO-LIGHTNING" in done.stdout
    assert NOTICE not in done.stdout + done.stderr
    assert "entrotrain fit --recipe attention_collapse" in done.stdout


def test_recipes_takes_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["recipes", "--help"])
    assert exc.value.code == 0
    assert "usage: entrotrain recipes" in capsys.readouterr().out


@pytest.mark.parametrize("extra", [["--help"], ["--print_config"]])
def test_no_wandb_notice_for_subcommand_help_or_print_config(extra, monkeypatch, tmp_path, capsys):
    _no_wandb_login(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--recipe", "attention_collapse", *extra])
    assert exc.value.code == 0
    captured = capsys.readouterr()
    assert NOTICE not in captured.out + captured.err
    assert "trainer" in captured.out  # it did print the help / config


def _fit_two_steps(tmp_path: Path, *extra: str):
    return main([
        "fit", "--recipe", "attention_collapse", "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}", *extra,
    ])


@pytest.mark.parametrize("mode", [None, "online"])
def test_wandb_notice_printed_once_when_a_wandb_run_starts_and_no_anonymous_warning(mode, monkeypatch, tmp_path, capfd):
    _no_wandb_login(monkeypatch, tmp_path)
    if mode is not None:
        monkeypatch.setenv("WANDB_MODE", mode)
    import wandb

    wandb.teardown()  # wandb caches its settings (mode=disabled from earlier tests) process-wide until torn down
    _fit_two_steps(tmp_path, f"--trainer.logger.init_args.save_dir={tmp_path}")
    captured = capfd.readouterr()
    text = captured.out + captured.err
    notice = NOTICE if mode is None else "WANDB_MODE=online but no wandb login found"
    assert text.count(notice) == 1
    assert list(tmp_path.rglob("offline-run-*"))  # it did log offline
    # Lightning's WandbLogger hands wandb.init anonymous=None, which wandb >= 0.19 warns about: dropped by the CLI
    assert "anonymous" not in text.lower()


def test_no_wandb_notice_when_the_run_has_no_wandb_logger(monkeypatch, tmp_path, capfd):
    _no_wandb_login(monkeypatch, tmp_path)
    csv = ROOT / "configs" / "logger" / "csv.yaml"
    _fit_two_steps(tmp_path, f"--trainer.logger={csv}", f"--trainer.logger.init_args.save_dir={tmp_path}")
    captured = capfd.readouterr()
    assert NOTICE not in captured.out + captured.err
