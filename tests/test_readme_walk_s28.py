"""Findings of walking the README as a new user (session 28): guards, rollback, resume, inspect, status, report."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard
from entrotrain.callbacks._guard_keys import misspelt_key
from entrotrain.cli import main
from entrotrain.dashboards import RunRecordLogger
from entrotrain.dashboards.run_reader import load_run
from entrotrain.dashboards.terminal_status import _collect, runs_table, status_main
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.checkpoint_sources import find_checkpoints
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.gpt_module import GPTModule
from tests.helpers.loop_runs import fit_lightning, run_loop, token_batches

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on a shared machine

TYPO = "entropy/attn_norm/mni"


def _typo_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "watches a key no monitor publishes" in str(w.message)]


# ------------------------------------------------------------------ a typo in a guard's key
def test_misspelt_key_needs_a_close_key_of_the_same_folder() -> None:
    published = {"entropy/attn_norm/min", "entropy/attn_norm/mean", "entropy/pred/train/mean"}
    assert misspelt_key(TYPO, published) == "entropy/attn_norm/min"
    assert misspelt_key("entropy/attn_norm/min", published) is None  # published: no typo
    assert misspelt_key("entropy/pred/probe/mean", published) is None  # another folder, published elsewhere later
    assert misspelt_key("val/loss", published) is None and misspelt_key("loss", published) is None


@pytest.mark.parametrize("glue", ["lightning", "loop"])
def test_a_guard_key_with_a_typo_is_warned_about_once(glue: str) -> None:
    """`EntropyCollapseGuard("entropy/attn_norm/mni")` judged nothing, silently, in Lightning and in a loop: the
    default missing_ok=True waits 1000 steps for a key no monitor will ever publish."""
    batches = token_batches(6)
    guards = [EntropyCollapseGuard(TYPO), EntropyCollapseGuard("entropy/attn_norm/mean")]
    monitor = AttentionEntropyMonitor(every_n_steps=2, print_summary=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if glue == "lightning":
            fit_lightning(GPTModule(convert=False, seed=0), batches, [monitor, *guards], steps=6)
        else:
            run_loop(GPTModule(convert=False, seed=0), batches, EntropyMonitors([monitor], guards=guards), steps=6)
    said = _typo_warnings(caught)
    assert len(said) == 1, said  # one key, one warning (not one per logging step); the right key: none
    assert "'entropy/attn_norm/min'" in said[0] and "at step 0" in said[0]


# ------------------------------------------------------------------ entrotrain status
def test_the_runs_table_names_each_runs_folder(tmp_path: Path) -> None:
    """The same recipe run twice (or a cure resumed twice from one checkpoint) gave two rows both named after the
    recipe: the table now names each record's folder, the name `entrotrain status` / `report` take."""
    for version in ("cure-20261206-225131", "cure-20261206-225532"):
        record = RunRecordLogger(tmp_path, version=version, run_name="cure")
        record.log_metrics({"entropy/attn_norm/min": 0.5}, step=0)
        record.finalize("success")
    runs, _, _ = _collect([str(tmp_path)], 10)
    names = [line.split()[0] for line in runs_table(runs)[1:]]
    assert sorted(names) == ["cure-20261206-225131", "cure-20261206-225532"]


def test_status_rows_below_one_is_named_in_the_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        status_main(["--rows", "0"])
    assert "--rows" in capsys.readouterr().err.strip().splitlines()[-1]  # the error line, not the usage above it


# ------------------------------------------------------------------ entrotrain inspect
def _ckpt(path: Path, weight: float) -> None:
    torch.save({"global_step": 50, "state_dict": {"w": torch.full((2,), weight)}}, path)


def test_inspect_refuses_two_runs_saved_into_one_folder(tmp_path: Path) -> None:
    """The README's inspect command run twice in one folder: Lightning names the second run's files
    `epoch=0-step=50-v1.ckpt`, and `entrotrain inspect ckpts` read both runs as one trajectory (step 50 twice)."""
    _ckpt(tmp_path / "epoch=0-step=50.ckpt", 1.0)
    _ckpt(tmp_path / "epoch=0-step=50-v1.ckpt", 2.0)
    with pytest.raises(EntrotrainError, match="several runs: step 50 is saved as epoch=0-step=50.ckpt and "):
        find_checkpoints([tmp_path])
    _ckpt(tmp_path / "epoch=0-step=50-v1.ckpt", 1.0)  # the same weights (a deterministic rerun, two callbacks): one
    assert [c.path.name for c in find_checkpoints([tmp_path])] == ["epoch=0-step=50.ckpt"]


# ------------------------------------------------------------------ a path typed wrong
def test_a_path_that_does_not_exist_names_the_one_meant(tmp_path: Path) -> None:
    """`entrotrain inspect ckpt` (the folder is ckpts) said only 'ckpt does not exist.'; status and report named no
    close folder either."""
    (tmp_path / "ckpts").mkdir()
    record = RunRecordLogger(tmp_path / "runs", version="attention_collapse-20261206-224856")
    record.log_metrics({"entropy/attn_norm/min": 0.5}, step=0)
    record.finalize("success")
    with pytest.raises(EntrotrainError, match=r"ckpt does not exist \(did you mean .*ckpts\?\)\. Pass a checkpoint"):
        find_checkpoints([tmp_path / "ckpt"])
    with pytest.raises(EntrotrainError, match=r"did you mean .*runs\?\)\. Pass a run record folder"):
        _collect([str(tmp_path / "run")], 10)
    with pytest.raises(EntrotrainError, match=r"did you mean .*attention_collapse-20261206-224856\?\)"):
        load_run(tmp_path / "runs" / "records" / "attention_collapse-20261206-22485")


def test_a_ckpt_path_typed_wrong_names_the_checkpoint_meant(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`entrotrain fit ... --ckpt_path ckpts/entrotrain-last-good/epoch=0-step=5.ckpt` (one digit short) said only
    'no such file or folder'."""
    kept = tmp_path / "ckpts" / "entrotrain-last-good"
    kept.mkdir(parents=True)
    (kept / "epoch=0-step=50.ckpt").touch()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--recipe", "attention_collapse", "--ckpt_path", str(kept / "epoch=0-step=5.ckpt")])
    assert exit_.value.code == 2
    assert f"(did you mean {kept / 'epoch=0-step=50.ckpt'}?)" in capsys.readouterr().err


def test_an_argument_typed_wrong_is_one_line_naming_the_argument_meant(capsys: pytest.CaptureFixture[str]) -> None:
    """`--trainer.callbacks.treshold 0.1` printed 50 lines of usage above jsonargparse's union report."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--recipe", "attention_collapse", "--trainer.callbacks+=EntropyCollapseGuard",
              "--trainer.callbacks.treshold", "0.1"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and "Union subtypes" not in err
    assert "entrotrain fit: error: EntropyCollapseGuard takes no argument 'treshold'; did you mean 'threshold'?" in err
