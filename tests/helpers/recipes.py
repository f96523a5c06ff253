"""Run a recipe through the CLI in this process, as ``entrotrain fit --config RECIPE`` does, for the recipe smoke
tests: the recipe's own settings, the test's overrides, and every file written under the test's ``tmp_path``."""

from __future__ import annotations

from pathlib import Path

from entrotrain.cli import main


def fit_recipe(recipe: Path, tmp_path: Path, *overrides: str, logger: bool = True):
    """``main(["fit", "--config", recipe, *overrides, ...])`` with, last, the logger's ``save_dir`` (or
    ``--trainer.logger=false`` when not ``logger``) and the trainer's ``default_root_dir`` set to ``tmp_path``.
    Returns the ``LightningCLI``."""
    where = f"--trainer.logger.init_args.save_dir={tmp_path}" if logger else "--trainer.logger=false"
    return main(["fit", "--config", str(recipe), *overrides, where, f"--trainer.default_root_dir={tmp_path}"])
