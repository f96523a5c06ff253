"""The ``entrotrain`` console script.

``entrotrain fit --recipe attention_collapse`` runs a bundled recipe by name (``--config FILE`` runs any recipe file,
a copied one included) through :class:`LightningCLI` (also ``validate`` / ``test`` / ``predict``, with every
LightningCLI flag); ``entrotrain recipes`` lists the recipes; ``entrotrain report RUN_DIR [RUN_DIR2] [-o OUT]`` turns
a run record into an HTML report; ``entrotrain status [RUN_DIR | FOLDER]`` says in the terminal where runs stand
(``--follow SECONDS`` redraws); ``entrotrain inspect CHECKPOINT ...`` runs the monitors on saved checkpoints
(:mod:`entrotrain.integrations.inspect_checkpoints`); ``entrotrain --help`` lists all eight.

Every run writes a local run record (:class:`~entrotrain.dashboards.RunRecordLogger`, beside whatever logger the
recipe names) under ``<default_root_dir>/records/``; its folder is printed when the run ends.

wandb never prompts: when ``WANDB_MODE`` is unset and no API key is configured, runs are logged offline (said once,
when a run with a wandb logger starts), and the command to upload them (``wandb sync ...``) is printed when it ends.

This module imports neither lightning nor the tasks, so ``entrotrain recipes``, ``entrotrain --help`` and
``entrotrain report`` cost only the import of the ``entrotrain`` package and what they use (``report`` reads the run
record with :mod:`entrotrain.dashboards.run_reader`, without lightning or torch; matplotlib only to draw).
The LightningCLI subclass lives in :mod:`entrotrain._lightning_cli` (``entrotrain.cli.EntrotrainCLI`` imports it on
first access).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from entrotrain._lightning_cli import EntrotrainCLI  # lazy at run time: see __getattr__

__all__ = ["DEBUG_ENV", "EntrotrainCLI", "config_error_message", "console", "main"]

_RUN_SUBCOMMANDS = ("fit", "validate", "test", "predict")

#: One line per subcommand for ``entrotrain --help`` (the LightningCLI ones are the first line of the docstring of the
#: ``Trainer`` method, as LightningCLI prints them; a test keeps them in step).
SUBCOMMAND_HELP: dict[str, str] = {
    "fit": "Runs the full optimization routine.",
    "validate": "Perform one evaluation epoch over the validation set.",
    "test": "Perform one evaluation epoch over the test set.",
    "predict": "Run inference on your data.",
    "report": "Write an HTML report (with PNG figures) of a run record; two runs are overlaid (failure vs cure).",
    "status": "Where runs stand, in the terminal: status, key numbers with trends, what happened (from run records).",
    "inspect": "The entropy of saved checkpoints (Lightning or HF), per head and over steps: date a collapse after "
    "the fact.",
    "recipes": "List the bundled recipes and the command that runs each.",
}


def __getattr__(name: str) -> Any:
    """``EntrotrainCLI`` and ``RunDirSaveConfig`` are imported (with lightning) on first access."""
    if name in ("EntrotrainCLI", "RunDirSaveConfig"):
        from entrotrain import _lightning_cli

        return getattr(_lightning_cli, name)
    raise AttributeError(f"module 'entrotrain.cli' has no attribute {name!r}")


def _wandb_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_offline_notice() -> str | None:
    """Make wandb log offline instead of prompting when no login is configured (sets ``WANDB_MODE``); returns the
    line that says so (printed by the CLI when a run with a wandb logger starts), or ``None`` when nothing changed."""
    if _wandb_configured():
        return None
    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        os.environ["WANDB_MODE"] = "offline"
        return "entrotrain: no wandb login found, logging offline (set WANDB_MODE to change this)."
    if mode in ("online", "run"):  # wandb would ask for a key on the terminal: never prompt
        os.environ["WANDB_MODE"] = "offline"
        return (
            f"entrotrain: WANDB_MODE={mode} but no wandb login found (WANDB_API_KEY or `wandb login`); logging "
            "offline instead of prompting. Upload later with `wandb sync`."
        )
    return None


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


def _print_help(file: Any = None) -> None:
    """``entrotrain --help``: every subcommand with its line, and how to run a recipe (no lightning import)."""
    width = max(len(name) for name in SUBCOMMAND_HELP)
    lines = [
        f"usage: entrotrain [-h] {{{','.join(SUBCOMMAND_HELP)}}} ...",
        "",
        "entrotrain: entropy monitors, regularisers and recipes for Lightning training.",
        "",
        "subcommands:",
        *(f"  {name:<{width}}  {text}" for name, text in SUBCOMMAND_HELP.items()),
        "",
        "run a bundled recipe by name:    entrotrain fit --recipe attention_collapse   (entrotrain recipes lists them)",
        "run a recipe or config file:     entrotrain fit --config my_recipe.yaml",
        "fit/validate/test/predict take every LightningCLI flag (--trainer.max_steps=100, --print_config, ...);",
        "add --help after a subcommand for its options.",
    ]
    print("\n".join(lines), file=file or sys.stdout)


def _recipes_main(argv: list[str]) -> None:
    """``entrotrain recipes``: each bundled recipe's name and first sentence, then the command that runs one."""
    from entrotrain._recipes import bundled_dir, recipe_paths

    argparse.ArgumentParser(prog="entrotrain recipes", description=SUBCOMMAND_HELP["recipes"]).parse_args(argv)
    recipes = recipe_paths()
    if not recipes:
        print("No recipes found: this installation ships no entrotrain/recipes folder (reinstall entrotrain).")
        return
    width = max(len(p.stem) for p in recipes)
    for path in recipes:
        print(f"{path.stem:<{width}}  {_recipe_summary(path)}")
    example = "attention_collapse" if any(p.stem == "attention_collapse" for p in recipes) else recipes[0].stem
    print(f"\nrun one with:  entrotrain fit --recipe <name>      e.g. entrotrain fit --recipe {example}")
    print(f"recipe files:  {bundled_dir('recipes')}  (copy one anywhere and run it with --config FILE)")


def _expand_recipe(argv: list[str]) -> list[str]:
    """``argv`` (a run subcommand and its arguments) with ``--recipe NAME`` / ``--recipe=NAME`` replaced by
    ``--config <the bundled recipe's file>``. An unknown name is a parser-style error (exit code 2) listing the
    recipes. A value naming a ``configs/...`` fragment (``--trainer.logger configs/logger/csv.yaml``, ``--config
    configs/trainer/gpu.yaml``) that does not exist relative to the working folder becomes the bundled fragment's
    path, as in config files (a path found in neither is left for the parser's error)."""
    from entrotrain._recipes import RecipeNotFoundError, find_recipe

    out: list[str] = argv[:1]
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--recipe" or arg.startswith("--recipe="):
            if arg == "--recipe":
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    _usage_error(argv[0], "--recipe needs a name, e.g. --recipe attention_collapse "
                                 "(`entrotrain recipes` lists them).")
                name, i = argv[i + 1], i + 2
            else:
                name, i = arg.split("=", 1)[1], i + 1
            try:
                out += ["--config", str(find_recipe(name))]
            except RecipeNotFoundError as err:
                _usage_error(argv[0], str(err))
            continue
        out.append(_bundled_fragment(arg))
        i += 1
    return out


def _bundled_fragment(arg: str) -> str:
    """``arg`` (a value, or ``--key=value``) with a ``configs/...`` fragment path that is missing from the working
    folder replaced by the bundled fragment's absolute path; ``arg`` itself otherwise."""
    from entrotrain._recipes import FragmentNotFoundError, resolve_fragment

    key, sep, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
    if arg.startswith("-") and not sep:
        return arg
    try:
        return key + sep + resolve_fragment(value, Path.cwd())
    except FragmentNotFoundError:
        return arg


def _usage_error(subcommand: str | None, message: str) -> None:
    """A parser-style error: ``entrotrain SUBCOMMAND: error: message`` on stderr, exit code 2."""
    prog = f"entrotrain {subcommand}" if subcommand else "entrotrain"
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(args: Any = None) -> Any:
    """Entry point of the ``entrotrain`` console script (and of in-process tests: ``main(["fit", ...])``).

    ``args``: the command-line arguments (default ``sys.argv[1:]``), or a dict / Namespace handed to LightningCLI as
    is. Returns the :class:`EntrotrainCLI` of a run subcommand, the report's path for ``report``, else ``None``."""
    from_argv = args is None or isinstance(args, (list, tuple))
    argv = list(sys.argv[1:] if args is None else args) if from_argv else None
    if argv is not None:
        if not argv or argv[0] in ("-h", "--help"):
            _print_help()
            if not argv:
                raise SystemExit(2)
            return None
        if argv[0] == "recipes":
            _recipes_main(argv[1:])
            return None
        if argv[0] == "report":
            from entrotrain.dashboards.report import report_main

            return report_main(argv[1:])
        if argv[0] == "status":
            from entrotrain.dashboards.terminal_status import status_main

            code = status_main(argv[1:])
            if code:
                raise SystemExit(code)
            return None
        if argv[0] == "inspect":
            from entrotrain.integrations.inspect_checkpoints import inspect_main

            inspect_main(argv[1:])
            return None
        if argv[0] in _RUN_SUBCOMMANDS:
            argv = _expand_recipe(argv)
        args = argv
    notice = wandb_offline_notice()
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")  # lightning 2.6 on torch 2.13
    # main() hands LightningCLI sys.argv[1:] itself (with --recipe expanded): not the mistake that warning is about
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    from entrotrain._lightning_cli import EntrotrainCLI, RunDirSaveConfig
    from entrotrain._recipes import FragmentNotFoundError

    try:
        return EntrotrainCLI(
            model_class=None,
            datamodule_class=None,
            subclass_mode_model=True,
            save_config_callback=RunDirSaveConfig,
            save_config_kwargs={"overwrite": True},
            args=args,
            wandb_notice=notice,
        )
    except FragmentNotFoundError as err:  # raised while a config file is read: a parser error, not a traceback
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        subcommand = argv[0] if argv and argv[0] in _RUN_SUBCOMMANDS else None
        _usage_error(subcommand, str(err))


def console() -> None:
    """The console script: like :func:`main`, returning nothing (``sys.exit`` would print a returned object).

    Before a run starts (and before torch is imported: ``import entrotrain`` does not import it), the CPU threading
    defaults of :func:`entrotrain._cpu_threads.configure_cpu_threads` are applied: ``OMP_WAIT_POLICY=PASSIVE`` unless
    the user set their own (same results, far less CPU time on a busy machine)."""
    if sys.argv[1:2] and sys.argv[1] in (*_RUN_SUBCOMMANDS, "inspect"):
        from entrotrain._cpu_threads import configure_cpu_threads

        configure_cpu_threads()
    try:
        main()
    except BrokenPipeError:  # `entrotrain status | head`: the reader left; end quietly, as Unix tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's flush of stdout at exit must not raise again
        raise SystemExit(0) from None


if __name__ == "__main__":
    console()
