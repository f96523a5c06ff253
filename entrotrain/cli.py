"""The ``entrotrain`` console script.

``entrotrain fit --config recipes/attention_collapse.yaml`` runs a recipe through :class:`LightningCLI` (also
``validate`` / ``test`` / ``predict``, with every LightningCLI flag); ``entrotrain recipes`` lists the recipes;
``entrotrain report RUN_DIR [RUN_DIR2] [-o OUT]`` turns a run record into an HTML report.

Every run writes a local run record (:class:`~entrotrain.dashboards.RunRecordLogger`, beside whatever logger the
recipe names) under ``<default_root_dir>/records/``; its folder is printed when the run ends.

wandb never prompts: when ``WANDB_MODE`` is unset and no API key is configured, runs are logged offline, and the
command to upload them (``wandb sync ...``) is printed when the run ends.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback

import entrotrain.callbacks  # noqa: F401  (short class names in configs)
import entrotrain.tasks  # noqa: F401

__all__ = ["DEBUG_ENV", "EntrotrainCLI", "config_error_message", "console", "main"]

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
    """Writes ``config.yaml`` into the wandb run's own folder (the default file collides across wandb runs) and into
    the run record, and declares entrotrain's metric summaries to wandb."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        from entrotrain.dashboards.run_record import find_run_record
        from entrotrain.dashboards.wandb_media import setup_wandb_dashboard

        setup_wandb_dashboard(trainer.loggers)
        dump = self.parser.dump(self.config, skip_none=False)
        run_dir = _wandb_run_dir(trainer)
        if run_dir is None:
            super().save_config(trainer, pl_module, stage)
            record = find_run_record(trainer)
            if record is not None:
                record.log_hyperparams({"config": dump})
            return
        self.parser.save(self.config, run_dir / "files" / "config.yaml", skip_none=False, overwrite=True)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": dump})


def _as_path(path: Any) -> Path:
    """A jsonargparse ``Path`` (``.absolute`` is a str), a ``pathlib.Path`` (a method) or a str, as a Path."""
    absolute = getattr(path, "absolute", None)
    if callable(absolute):
        absolute = absolute()
    return Path(str(absolute if absolute is not None else path))


def _recipe_path(config: Any) -> str | None:
    """The recipe among a subcommand's ``--config`` files: the first one in a ``recipes/`` folder, else the first
    (fragments such as ``configs/trainer/ddp_cpu.yaml`` come after the recipe); relative to the cwd when inside it."""
    paths = config.get("config") if config is not None and hasattr(config, "get") else None
    if not paths:
        return None
    candidates = [_as_path(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    path = next((p for p in candidates if p.parent.name == "recipes"), candidates[0])
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


DEBUG_ENV = "ENTROTRAIN_DEBUG"


def _exception_chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling, outermost first (no cycles)."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return chain


def _constructing_class(err: BaseException) -> str | None:
    """The class whose ``__init__`` is the outermost one in ``err``'s traceback (the class the config names, not
    the sub-module whose own ``__init__`` raised inside it)."""
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            cls = type(frame.f_locals["self"])
            return f"{cls.__module__}.{cls.__qualname__}"
        tb = tb.tb_next
    return None


def _union_reasons(text: str) -> list[str]:
    """The real reasons in a jsonargparse "Does not validate against any of the Union subtypes" message (its
    ``Errors:`` items other than the "Expected a <class ...>" of the alternatives that did not apply)."""
    if "Errors:" not in text:
        return []
    items = re.findall(r"^  - (.+)$", text.split("Errors:", 1)[1].split("\nGiven value", 1)[0], re.M)
    return [item.strip() for item in items if not item.startswith(("Expected a ", "Not a valid subclass"))]


def config_error_message(err: BaseException, subcommand: str | None = None) -> str:
    """One paragraph for an error raised while building the config's classes: which class, what it said, the fix.

    The message of the innermost :class:`~entrotrain.errors.EntrotrainError` (which names the argument, what was
    received and the fix) is preferred; jsonargparse's "Does not validate against any of the Union subtypes"
    wrapper is unwrapped to the reason it carries."""
    from entrotrain.errors import EntrotrainError

    chain = _exception_chain(err)
    ours = [e for e in chain if isinstance(e, EntrotrainError)]
    union = next((r for e in chain for r in [_union_reasons(str(e))] if r), [])
    if ours:
        source, reason = ours[-1], str(ours[-1])
    elif union:
        source, reason = None, " ".join(union)
    else:
        source, reason = chain[-1], str(chain[-1]) or type(chain[-1]).__name__
    cls = _constructing_class(source) if source is not None else None
    if cls is None:
        match = next((m for e in chain for m in [re.search(r"class_path='([^']+)'", str(e))] if m), None)
        cls = match.group(1) if match else None
    where = f"building {cls} from the config failed" if cls else "building the classes of the config failed"
    prog = f"entrotrain {subcommand}" if subcommand else "entrotrain"
    reason = " ".join(reason.split())
    end = "" if reason.endswith((".", "!", "?")) else "."
    return (
        f"{prog}: error: {where}: {reason}{end} Fix the value in the config file or on the command line "
        f"(set {DEBUG_ENV}=1 to see the traceback)."
    )


class EntrotrainCLI(LightningCLI):
    """LightningCLI that adds a :class:`~entrotrain.dashboards.RunRecordLogger` to every run and whose ``fit`` ends by
    closing the wandb run and printing where it and the run record are, how to sync and how to report them.

    A bad value that only a class's constructor can refuse (``every_n_steps: 0`` in a monitor's ``init_args``) is a
    parser-style error: one paragraph on stderr naming the class and the argument, exit code 2, no traceback (set
    ``ENTROTRAIN_DEBUG=1`` to get the traceback instead)."""

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:  # EntrotrainError is a ValueError; so are jsonargparse's wrappers of it
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            print(config_error_message(err, self.subcommand), file=sys.stderr)
            raise SystemExit(2) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from entrotrain.dashboards.run_record import RunRecordLogger

        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(lg, RunRecordLogger) for lg in trainer.loggers):
            recipe = _recipe_path(self.config.get(self.subcommand) if self.subcommand else self.config)
            stem = Path(recipe).stem if recipe else "run"
            record = RunRecordLogger(
                Path(trainer.default_root_dir), name="records", version=_record_version(trainer, stem), recipe=recipe
            )
            trainer.loggers = [*trainer.loggers, record]
        return trainer

    def after_fit(self) -> None:
        from entrotrain.dashboards.run_record import find_run_record

        if not self.trainer.is_global_zero:
            return
        record = find_run_record(self.trainer)
        monitors = ("entropy/", "sigma_reparam/", "lr-")  # shown by their monitors, or not results
        final = {k: float(v) for k, v in self.trainer.callback_metrics.items() if not k.startswith(monitors)}
        if final:
            print("final metrics: " + ", ".join(f"{k} = {v:.4f}" for k, v in sorted(final.items())[:12]))
        run_dir = _wandb_run_dir(self.trainer)
        if record is not None:
            record.set_meta(wandb_dir=str(run_dir) if run_dir else None, global_step=self.trainer.global_step)
            print(f"\nentrotrain: run record {record.run_dir}")
            print(f"entrotrain: offline report with\n    entrotrain report {record.run_dir}")
        if run_dir is None:
            return
        import wandb

        wandb.finish()
        print(f"\nentrotrain: run directory {run_dir}")
        if "offline" in run_dir.name:
            print(f"entrotrain: upload it with\n    wandb sync {run_dir}")


def _record_version(trainer: Trainer, stem: str) -> str:
    """``<recipe stem>-YYYYmmdd-HHMMSS`` (made unique with ``-2``, ...) under ``default_root_dir/records``."""
    import time

    parent = Path(trainer.default_root_dir) / "records"
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    version, n = base, 1
    while (parent / version).exists():
        n += 1
        version = f"{base}-{n}"
    return version


def _recipe_summary(path: Path, width: int = 110) -> str:
    """The first sentence of a recipe's leading comment block, cut to ``width`` characters."""
    words: list[str] = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:].strip()
        if not text or text.startswith(("WANDB_MODE", "OMP_NUM_THREADS", "entrotrain ", "Scale up")):
            break
        words.append(text)
    summary = " ".join(words)
    end = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", summary)  # not "et al." / "e.g." / "i.e."
    summary = summary[: end.start() + 1] if end else summary
    return summary if len(summary) <= width else summary[: width - 1].rstrip() + "…"


def _list_recipes() -> None:
    recipes = sorted(RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    if not recipes:
        print("No recipes found next to the package (clone the repository to get recipes/).")
        return
    width = max(len(p.name) for p in recipes)
    for path in recipes:
        print(f"{path.name:<{width}}  {_recipe_summary(path)}")
    where = RECIPES_DIR.relative_to(Path.cwd()) if RECIPES_DIR.is_relative_to(Path.cwd()) else RECIPES_DIR
    print(f"\nrun one with: entrotrain fit --config {where}/<recipe>.yaml")


def main(args: ArgsType = None) -> Any:
    """Entry point of the ``entrotrain`` console script (and of in-process tests: ``main(["fit", ...])``)."""
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv is not None and argv[:1] == ["recipes"]:
        _list_recipes()
        return None
    if argv is not None and argv[:1] == ["report"]:
        from entrotrain.dashboards.report import report_main

        return report_main(argv[1:])
    if not _wandb_configured():
        mode = os.environ.get("WANDB_MODE")
        if mode is None:
            os.environ["WANDB_MODE"] = "offline"
            print("entrotrain: no wandb login found, logging offline (set WANDB_MODE to change this).")
        elif mode in ("online", "run"):  # wandb would ask for a key on the terminal: never prompt
            os.environ["WANDB_MODE"] = "offline"
            print(
                f"entrotrain: WANDB_MODE={mode} but no wandb login found (WANDB_API_KEY or `wandb login`); logging "
                "offline instead of prompting. Upload later with `wandb sync`."
            )
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
