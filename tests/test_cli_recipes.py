"""Recipes run from anywhere: by name (`entrotrain fit --recipe NAME`), or copied to any folder, their fragment paths
(`../configs/...`) resolved against the bundled configs; a wrong path or a typo gets its own clear error."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path

import pytest

from entrotrain._recipes import FragmentNotFoundError, bundled_dir, find_recipe, recipe_paths, resolve_fragment
from entrotrain.cli import main

# lightning binds its log handler to sys.stderr as it is when lightning is first imported, and entrotrain.cli imports it
# only when a run starts: import it now, before a test captures (and closes) stderr.
importlib.import_module("lightning.pytorch")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "attention_collapse.yaml"
SMALL = ["--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]  # wandb is disabled in tests


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """An empty folder outside the repository, as the current directory."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


def _run(*args: str, root: Path):
    return main([
        *args, "--trainer.max_steps=2", *SMALL, f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
    ])


def test_recipe_copied_to_an_empty_folder_runs(elsewhere):
    shutil.copy(RECIPE, elsewhere / "my_recipe.yaml")
    cli = _run("fit", "--config", "my_recipe.yaml", root=elsewhere / "runs")
    assert cli.trainer.global_step == 2
    names = {type(cb).__name__ for cb in cli.trainer.callbacks}  # the ../configs/monitors/*.yaml fragments
    assert {"AttentionEntropyMonitor", "EntropyCollapseGuard"} <= names
    assert "WandbLogger" in {type(lg).__name__ for lg in cli.trainer.loggers}  # ../configs/logger/wandb.yaml
    (record,) = (elsewhere / "runs" / "records").iterdir()
    assert record.name.startswith("my_recipe-")


def test_copied_recipe_keeps_its_wandb_logger_fragment(elsewhere, capsys):
    shutil.copy(RECIPE, elsewhere / "r.yaml")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "r.yaml", "--print_config"])
    assert exc.value.code == 0
    assert "class_path: lightning.pytorch.loggers.WandbLogger" in capsys.readouterr().out


def test_recipe_by_name_runs_from_any_folder(elsewhere):
    cli = _run("fit", "--recipe", "attention_collapse", root=elsewhere / "runs")
    assert cli.trainer.global_step == 2
    (record,) = (elsewhere / "runs" / "records").iterdir()
    meta = json.loads((record / "meta.json").read_text())
    assert record.name.startswith("attention_collapse-") and meta["recipe"].endswith("attention_collapse.yaml")


def test_validate_takes_a_recipe_name_with_equals(elsewhere):
    cli = main(["validate", "--recipe=attention_collapse.yaml", *SMALL, f"--trainer.default_root_dir={elsewhere}"])
    assert "val/loss" in cli.trainer.callback_metrics


def test_fragment_beside_the_copy_wins_over_the_bundled_one(elsewhere, capsys):
    (elsewhere / "configs" / "logger").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "logger" / "csv.yaml", elsewhere / "configs" / "logger" / "wandb.yaml")
    (elsewhere / "recipes").mkdir()
    shutil.copy(RECIPE, elsewhere / "recipes" / "r.yaml")
    with pytest.raises(SystemExit):
        main(["fit", "--config", "recipes/r.yaml", "--print_config"])
    out = capsys.readouterr().out
    assert "CSVLogger" in out and "WandbLogger" not in out


def test_wrong_fragment_path_is_a_clear_error(elsewhere, capsys, monkeypatch):
    monkeypatch.delenv("ENTROTRAIN_DEBUG", raising=False)
    text = RECIPE.read_text().replace("configs/logger/wandb.yaml", "configs/loger/wandb.yaml")
    (elsewhere / "r.yaml").write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "r.yaml"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("entrotrain fit: error: fragment '../configs/loger/wandb.yaml'")
    assert "Did you mean configs/logger/wandb.yaml?" in err and "Traceback" not in err
    assert str(elsewhere.parent / "configs" / "loger" / "wandb.yaml") in err  # where it looked


def test_typo_in_a_copied_recipe_gets_its_own_error(elsewhere, capsys):
    text = RECIPE.read_text().replace("n_layer: 4", "n_layr: 4")
    (elsewhere / "r.yaml").write_text(text)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", "r.yaml"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "n_layr" in err and "Unexpected import path" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--recipe", "attention_colapse"], "Did you mean attention_collapse"),
        (["--recipe"], "--recipe needs a name"),
        (["--recipe", "--trainer.max_steps=1"], "--recipe needs a name"),
        (["--recipe", "recipes/attention_collapse.yaml"], "given with --config recipes/attention_collapse.yaml"),
    ],
)
def test_bad_recipe_names_are_parser_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["test", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("entrotrain test: error:") and message in err


def test_recipes_command_prints_names_and_the_name_based_command(capsys):
    main(["recipes"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("attention_collapse ") for line in lines)
    assert "entrotrain fit --recipe attention_collapse" in out
    assert len([line for line in lines if line and not line.startswith(("run one", "recipe files"))]) == len(
        recipe_paths()
    )


def test_bundled_folders_hold_the_repository_files():
    assert bundled_dir("recipes") == (ROOT / "recipes").resolve()
    assert bundled_dir("configs") == (ROOT / "configs").resolve()
    assert find_recipe("attention_collapse") == find_recipe("attention_collapse.yaml") == RECIPE.resolve()


@pytest.mark.parametrize(
    "value",
    ["runs", "entrotrain.tasks.LanguageModelingTask", "configs", "data/train.yaml", "/abs/configs/x.yaml",
     "../configs", "configs/logger/wandb.txt", "line\nconfigs/x.yaml", "https://host/configs/x.yaml"],
)
def test_strings_that_are_not_fragment_paths_are_left_alone(value, tmp_path):
    assert resolve_fragment(value, tmp_path) == value


def test_fragment_resolution(tmp_path):
    bundled = ROOT / "configs" / "logger" / "wandb.yaml"
    for value in ("../configs/logger/wandb.yaml", "configs/logger/wandb.yaml", "../../configs/logger/wandb.yaml"):
        assert Path(resolve_fragment(value, tmp_path)) == bundled.resolve()
    (tmp_path / "configs" / "logger").mkdir(parents=True)
    (tmp_path / "configs" / "logger" / "wandb.yaml").write_text("{}")
    assert resolve_fragment("configs/logger/wandb.yaml", tmp_path) == "configs/logger/wandb.yaml"  # the local one
    with pytest.raises(FragmentNotFoundError, match="configs/nope.yaml"):
        resolve_fragment("../configs/nope.yaml", tmp_path)
