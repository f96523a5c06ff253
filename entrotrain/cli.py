"""The ``entrotrain`` console script.

``entrotrain fit --config recipes/attention_collapse.yaml`` runs a recipe through :class:`LightningCLI` (also
``validate`` / ``test`` / ``predict``, with every LightningCLI flag); ``entrotrain recipes`` lists the recipes.

wandb never prompts: when ``WANDB_MODE`` is unset and no API key is configured, runs are logged offline, and the
command to upload them (``wandb sync ...``) is printed when the run ends.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

import entrotrain.callbacks  # noqa: F401  (short class names in configs)
import entrotrain.tasks  # noqa: F401

__all__ = ["EntrotrainCLI", "console", "main"]

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _wandb_run_dir(trainer: Trainer) -> Path | None:
    from entrotrain.dashboards.wandb_media import wandb_loggers

    for logger in wandb_loggers(trainer.loggers):
        run_dir = getattr(logger.experiment, "dir", None)  # .../offline-run-*/files
        if run_dir and Path(run_dir).is_dir():  # a disabled run has a dir name but nothing on disk
            return Path(run_dir).parent
    return None


class RunDirSaveConfig(SaveConfigCallback):
    """Writes ``config.yaml`` into the wandb run's own folder (the default file collides across wandb runs)."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        run_dir = _wandb_run_dir(trainer)
        if run_dir is None:
            return super().save_config(trainer, pl_module, stage)
        self.parser.save(self.config, run_dir / "files" / "config.yaml", skip_none=False, overwrite=True)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": self.parser.dump(self.config, skip_none=False)})


class EntrotrainCLI(LightningCLI):
    """LightningCLI whose ``fit`` ends by closing the wandb run and printing where it is and how to sync it."""

    def after_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        monitors = ("entropy/", "sigma_reparam/", "lr-")  # shown by their monitors, or not results
        final = {k: float(v) for k, v in self.trainer.callback_metrics.items() if not k.startswith(monitors)}
        if final:
            print("final metrics: " + ", ".join(f"{k} = {v:.4f}" for k, v in sorted(final.items())[:12]))
        run_dir = _wandb_run_dir(self.trainer)
        if run_dir is None:
            return
        import wandb

        wandb.finish()
        print(f"\nentrotrain: run directory {run_dir}")
        if "offline" in run_dir.name:
            print(f"entrotrain: upload it with\n    wandb sync {run_dir}")


def _list_recipes() -> None:
    recipes = sorted(RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    if not recipes:
        print("No recipes found next to the package (clone the repository to get recipes/).")
        return
    for path in recipes:
        first = next((ln[1:].strip() for ln in path.read_text().splitlines() if ln.startswith("#")), "")
        print(f"{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}\n    {first}")


def main(args: ArgsType = None) -> Any:
    """Entry point of the ``entrotrain`` console script (and of in-process tests: ``main(["fit", ...])``)."""
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv is not None and argv[:1] == ["recipes"]:
        _list_recipes()
        return None
    if "WANDB_MODE" not in os.environ and not _wandb_configured():
        os.environ["WANDB_MODE"] = "offline"
        print("entrotrain: no wandb login found, logging offline (set WANDB_MODE to change this).")
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # lightning 2.6 on torch 2.13
    return EntrotrainCLI(
        model_class=None,
        datamodule_class=None,
        subclass_mode_model=True,
        save_config_callback=RunDirSaveConfig,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def console() -> None:
    """The console script: like :func:`main`, returning nothing (``sys.exit`` would print a returned object)."""
    main()


if __name__ == "__main__":
    console()
