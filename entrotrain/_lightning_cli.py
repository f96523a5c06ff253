"""The LightningCLI behind ``entrotrain fit`` / ``validate`` / ``test`` / ``predict`` (imported only when one runs:
``entrotrain recipes``, ``entrotrain report`` and ``entrotrain --help`` never import lightning through it).

Adds to :class:`~lightning.pytorch.cli.LightningCLI`: a :class:`~entrotrain.dashboards.RunRecordLogger` beside the
recipe's loggers, the config written into the wandb run's own folder, fragment paths resolved against the bundled
``configs/`` (:mod:`entrotrain._recipes`), constructor errors as one-paragraph parser errors, the wandb offline notice
printed only when a run starts, and the end-of-fit summary (final metrics, run record, ``wandb sync`` hint).
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from entrotrain._recipes import register_fragment_loader
from entrotrain.cli import DEBUG_ENV, config_error_message

__all__ = ["EntrotrainCLI", "RunDirSaveConfig"]

for _module in ("entrotrain.callbacks", "entrotrain.tasks"):  # short class names in configs
    importlib.import_module(_module)

_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _wandb_run_dir(trainer: Trainer) -> Path | None:
    from entrotrain.dashboards.wandb_media import wandb_loggers

    for logger in wandb_loggers(trainer.loggers):
        run_dir = getattr(logger.experiment, "dir", None)  # .../offline-run-*/files
        if run_dir and Path(run_dir).is_dir():  # a disabled run has a dir name but nothing on disk
            return Path(run_dir).parent
    return None


def _drop_unset_wandb_anonymous(loggers: list[Any]) -> None:
    """Lightning's ``WandbLogger`` always hands ``wandb.init`` an ``anonymous`` argument (``None`` unless asked for),
    and wandb >= 0.19 warns "The anonymous setting has no effect" whenever the argument is passed at all. Drop it
    before the run starts when it was not asked for (``anonymous=True`` is passed on, and wandb's warning about it is
    then deserved)."""
    from entrotrain.dashboards.wandb_media import wandb_loggers

    for logger in wandb_loggers(loggers):
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and "anonymous" in init and init["anonymous"] is None:
            del init["anonymous"]


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


def _lightning_finds(ckpt_path: str) -> bool:
    """Whether ``ckpt_path`` is something Lightning may load: an existing file or folder (a sharded checkpoint), a
    special name it resolves (``last``, ``best``, ``hpc``, ``registry[:...]``) or a remote URL (``s3://...``)."""
    return (ckpt_path in ("last", "best", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path
            or Path(ckpt_path).exists())


_CURE_LINE = re.compile(r"#\s*(?:the\s+|\S+\s+)?cures?\b(?:\s+\d+)?(\s+for\b)?", re.IGNORECASE)


#: Command-line settings of what is trained, which a roll-back command repeats.
_TRAINED = ("--model.", "--data.", "--optimizer", "--lr_scheduler", "--model=", "--data=")


def _drop_empty_record(trainer: Trainer) -> None:
    """Remove the run record of a fork refused before its first step (nothing logged: a folder saying "failed" would
    only be noise beside the parent's)."""
    from entrotrain.dashboards.run_record import find_run_record

    record = find_run_record(trainer)
    if record is not None and trainer.is_global_zero and record.run_dir.is_dir():
        record.discard_if_empty()


def _cures(stem: str | None, bundled: dict[str, Path]) -> list[str]:
    """The bundled recipes that cure recipe ``stem``: its ``<stem>_*`` siblings, those its header comment lists on a
    line starting ``# Cures: ...`` / ``# The cure, ...: recipes/X.yaml``, and those whose header starts a line
    ``# Cure for <stem>.yaml`` (``# Cure 2 for``, ``# σReparam cure for``, ``# The cure for``)."""
    if not stem:
        return []
    found = {name for name in bundled if name.startswith(stem + "_")}
    for name, path in bundled.items():
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            match = _CURE_LINE.match(line)
            if match is None:
                continue
            named = {n for n in re.findall(r"([A-Za-z0-9_]+)\.yaml", line) if n in bundled}
            if match.group(1) and stem in named:  # "<name> is a cure for <stem>"
                found.add(name)
            elif not match.group(1) and name == stem:  # "<stem>'s cures: ..."
                found |= named
    return sorted(found - {stem})


class ConciseParser(LightningArgumentParser):
    """Lightning's parser, whose errors are the error alone (no 50-line usage above it), and an argument a class does
    not take (``--trainer.callbacks.treshold``) names the class and the argument meant."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get(DEBUG_ENV):
            super().error(message, ex)
        words = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "").split()
        prog = " ".join(["entrotrain", *words[1:]])  # (sys.argv[0] is __main__.py under python -m)
        sys.stderr.write(f"{prog}: error: {_unknown_argument(message) or message}\n"
                         f"(`{prog} --help` lists the options; {DEBUG_ENV}=1 shows the parser's own report)\n")
        self.exit(2)


def _unknown_argument(message: str) -> str | None:
    """For jsonargparse's "Problem with given class_path 'C': Option 'A' is not accepted": one sentence naming the
    class, the argument and the closest one the class takes; ``None`` for any other message."""
    for path, name in re.findall(r"class_path '([\w.]+)':\s*Option '([^']+)' is not accepted", message):
        module, _, attr = path.rpartition(".")
        if not module.startswith(("entrotrain", "lightning")):
            continue  # importing a module runs its code: only those already in use
        try:
            params = list(inspect.signature(getattr(importlib.import_module(module), attr)).parameters)
        except (ImportError, AttributeError, TypeError, ValueError):
            continue
        if attr == "Callback" and module.startswith("lightning"):
            continue  # the union's fallback member: says nothing about the class meant
        close = difflib.get_close_matches(name, params, n=1, cutoff=0.6)
        meant = f"; did you mean {close[0]!r}?" if close else f"; it takes {', '.join(params)}."
        return f"{attr} takes no argument {name!r}{meant}"
    return None


class EntrotrainCLI(LightningCLI):
    """LightningCLI that adds a :class:`~entrotrain.dashboards.RunRecordLogger` to every run and whose ``fit`` ends by
    closing the wandb run and printing where it and the run record are, how to sync and how to report them.

    Fragment paths in config files (``logger: ../configs/logger/wandb.yaml``) are resolved relative to the file,
    then against the bundled ``configs/`` (see :mod:`entrotrain._recipes`): a recipe copied anywhere still runs.

    A bad value that only a class's constructor can refuse (``every_n_steps: 0`` in a monitor's ``init_args``) is a
    parser-style error: one paragraph on stderr naming the class and the argument, exit code 2, no traceback (set
    ``ENTROTRAIN_DEBUG=1`` to get the traceback instead).

    Args:
        wandb_notice: printed (rank zero) once the trainer is built, when a wandb logger is among its loggers: the
            line saying why wandb logs offline (see :func:`entrotrain.cli.wandb_offline_notice`). Never printed for
            ``--help``, ``--print_config`` or a config error.
    """

    def __init__(self, *args: Any, wandb_notice: str | None = None, **kwargs: Any) -> None:
        self._wandb_notice = wandb_notice
        mode = register_fragment_loader()
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("parser_mode", mode)
        for name in _SUBCOMMANDS:
            parser_kwargs[name] = {"parser_mode": mode, **parser_kwargs.get(name, {})}
        kwargs.setdefault("parser_class", ConciseParser)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def _parse_ckpt_path(self) -> None:
        """Lightning replaces the configured model's arguments with a checkpoint's hyperparameters when ``ckpt_path``
        is given. For ``fit`` a configured model wins (a recipe names one): a checkpoint of a differently configured
        run forks (:mod:`entrotrain._forked_resume`). ``validate`` / ``test`` / ``predict`` (evaluate the checkpoint's
        model) and a ``fit`` with no model configured keep Lightning's behaviour."""
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else None
        ckpt_path = config.get("ckpt_path") if config is not None else None
        model = config.get("model") if config is not None else None
        if ckpt_path and not _lightning_finds(str(ckpt_path)):
            from entrotrain.dashboards.run_reader import missing_path

            fix = "Pass a checkpoint file (e.g. ckpts/epoch=0-step=50.ckpt) or one of Lightning's names: last, best, hpc."
            print(f"entrotrain {subcommand}: error: --ckpt_path {missing_path(Path(str(ckpt_path)), fix)}",
                  file=sys.stderr)
            raise SystemExit(2)
        if subcommand != "fit" or not ckpt_path or not getattr(model, "class_path", None):
            super()._parse_ckpt_path()
            return
        if Path(str(ckpt_path)).is_file():
            from entrotrain._forked_resume import fork_plan

            self._dump_config()
            self._fork = fork_plan(str(ckpt_path), self.config_dump)

    def instantiate_classes(self) -> None:
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            super().instantiate_classes()
        # EntrotrainError is a ValueError; so are jsonargparse's wrappers of it. Lightning's Trainer refuses a
        # contradictory trainer config (a ModelCheckpoint with enable_checkpointing: false) with its own exception.
        except (ValueError, MisconfigurationException) as err:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            print(config_error_message(err, self.subcommand), file=sys.stderr)
            raise SystemExit(2) from None

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        from entrotrain.dashboards.run_record import RunRecordLogger, unique_version
        from entrotrain.dashboards.wandb_media import wandb_loggers

        trainer = super().instantiate_trainer(**kwargs)
        _drop_unset_wandb_anonymous(trainer.loggers)
        self._resolve_special_ckpt_path(trainer)
        if self._wandb_notice and trainer.is_global_zero and wandb_loggers(trainer.loggers):
            print(self._wandb_notice)
        fork = getattr(self, "_fork", None)
        if not any(isinstance(lg, RunRecordLogger) for lg in trainer.loggers):
            recipe = _recipe_path(self.config.get(self.subcommand) if self.subcommand else self.config)
            stem = Path(recipe).stem if recipe else "run"
            record = RunRecordLogger(
                Path(trainer.default_root_dir), name="records",
                version=unique_version(Path(trainer.default_root_dir) / "records", stem), recipe=recipe,
                resume=fork is None,  # a fork is a new run: the parent's record is left as it was
            )
            trainer.loggers = [*trainer.loggers, record]
        if fork is not None:
            from entrotrain._forked_resume import ForkedResume, fork_run_records

            fork_run_records(trainer.loggers, fork)
            trainer.callbacks.append(ForkedResume(fork))
        return trainer

    def _resolve_special_ckpt_path(self, trainer: Trainer) -> None:
        """``fit --ckpt_path last`` / ``hpc`` (Lightning's names for a checkpoint it finds): the file it names, so a
        changed configuration forks as with the file's path (``_fork``) and ``fit`` resumes from that same file
        (``_resolved_ckpt_path``). Nothing found: Lightning's own warning or error when ``fit`` starts."""
        if self.subcommand != "fit" or hasattr(self, "_fork"):
            return
        config = self.config.get("fit")
        ckpt_path = config.get("ckpt_path") if config is not None else None
        if ckpt_path not in ("last", "hpc") or not getattr(config.get("model"), "class_path", None):
            return
        import warnings

        from lightning.pytorch.trainer.states import TrainerFn

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no last checkpoint": Lightning says it again when fit starts
                path = trainer._checkpoint_connector._parse_ckpt_path(
                    TrainerFn.FITTING, ckpt_path, model_provided=True, model_connected=False
                )
        except Exception:  # noqa: BLE001 - e.g. no hpc checkpoint: Lightning's error when fit starts
            return
        if path is None or not Path(str(path)).is_file():
            return
        from entrotrain._forked_resume import fork_plan

        self._resolved_ckpt_path = str(path)
        self._dump_config()
        self._fork = fork_plan(str(path), self.config_dump)

    def fit(self, **kwargs: Any) -> None:
        """``trainer.fit``; a fork whose changed model cannot take the checkpoint's weights (``n_layer``, widths) is
        a parser-style error naming the change, not a ``load_state_dict`` traceback."""
        if getattr(self, "_resolved_ckpt_path", None) is not None:
            kwargs["ckpt_path"] = self._resolved_ckpt_path  # the file "last" named when the fork was planned
        try:
            self.trainer.fit(**kwargs)
        except RuntimeError as err:
            fork = getattr(self, "_fork", None)
            if fork is None or "loading state_dict" not in str(err) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            changed = ", ".join(key for key, _, _ in fork.changes)
            first = str(err).strip().splitlines()
            unexpected = str(err).partition("Unexpected key(s) in state_dict:")[2].partition("\n")[0]
            from entrotrain._forked_resume import sigma_reparam_removed

            removed = sigma_reparam_removed(re.findall(r'"([^"]+)"', unexpected))  # the keys the error quotes
            removed += " (e.g. sigma_reparam: true)." if removed else ""
            print(
                f"entrotrain fit: error: the checkpoint's weights do not fit the configured model, whose configuration "
                f"changed ({changed}): {' '.join(line.strip() for line in first[:2])[:300]}{removed} A resume keeps "
                "the model's shape: σReparam and regularisers can be added (a plain layer's weights load into "
                "σReparam), layers, widths and heads cannot change.",
                file=sys.stderr,
            )
            _drop_empty_record(self.trainer)
            raise SystemExit(2) from None

    def parse_arguments(self, parser: Any, args: Any) -> None:
        """LightningCLI's; the command line is kept for the roll-back commands (:meth:`_model_overrides`)."""
        self._argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else list(sys.argv[1:])
        super().parse_arguments(parser, args)

    def _model_overrides(self) -> list[str]:
        """This run's command-line settings of what is trained (``--model.*``, ``--data.*``, ``--optimizer*``,
        ``--lr_scheduler*``, with their values): a roll-back command repeats them, so the cure runs on the same model
        and data. Trainer and callback settings are not repeated (a ``ModelCheckpoint`` dirpath would overwrite the
        checkpoints rolled back to)."""
        argv, out, i = list(getattr(self, "_argv", [])), [], 0
        while i < len(argv):
            arg = argv[i]
            name = arg.partition("=")[0]
            if name.startswith(_TRAINED):
                out.append(arg)
                if "=" not in arg and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                    out.append(argv[i + 1])
                    i += 1
            i += 1
        return out

    def _rollback_lines(self) -> list[str]:
        """When a guard named a checkpoint to roll back to: the command that resumes from it with a cure (a changed
        configuration forks the run, :mod:`entrotrain._forked_resume`); a bundled recipe's cure recipes by name."""
        from entrotrain._recipes import recipe_paths
        from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard

        named = [cb.rollback_checkpoint for cb in self.trainer.callbacks
                 if isinstance(cb, EntropyCollapseGuard) and cb.rollback_checkpoint is not None]
        if not named:
            return []
        ckpt = shlex.quote(str(named[0]))  # a path with spaces stays one argument when pasted
        recipe = _recipe_path(self.config.get(self.subcommand) if self.subcommand else self.config)
        stem = Path(recipe).stem if recipe else None
        bundled = {p.stem: p for p in recipe_paths()}
        cures = _cures(stem, bundled) if stem in bundled else []
        extra = "".join(f" {shlex.quote(arg)}" for arg in self._model_overrides())
        commands = [f"entrotrain fit --recipe {cure}{extra} --ckpt_path {ckpt}" for cure in cures]
        if not commands:
            commands = [f"entrotrain fit --config <your config, with the cure> --ckpt_path {ckpt}"]
        return ["entrotrain: roll back to before the collapse and go on with a cure (the changed configuration is "
                "used; a new run is recorded):", *(f"    {command}" for command in commands)]

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
            print(f"entrotrain: in the terminal\n    entrotrain status {record.run_dir}")
            from entrotrain.dashboards.remedies import what_to_try

            for line in what_to_try(record.run_dir):
                print(line)
            for line in self._rollback_lines():
                print(line)
            fork = getattr(self, "_fork", None)
            if fork is not None and fork.parent_record:
                print(f"entrotrain: beside the run it forked from\n    entrotrain report {fork.parent_record} "
                      f"{record.run_dir}")
        if run_dir is None:
            return
        import wandb

        wandb.finish()
        print(f"\nentrotrain: run directory {run_dir}")
        if "offline" in run_dir.name:
            print(f"entrotrain: upload it with\n    wandb sync {run_dir}")
