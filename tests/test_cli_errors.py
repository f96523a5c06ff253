"""`entrotrain fit` turns a bad value that only a constructor can refuse into a parser-style error: one paragraph
naming the class and the argument, exit code 2, no traceback (ENTROTRAIN_DEBUG=1 keeps the traceback)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from entrotrain.cli import config_error_message, main
from entrotrain.errors import EntrotrainError

# lightning binds its log handler to sys.stderr as it is when lightning is first imported, and entrotrain.cli imports it
# only when a run starts: import it now, before a test captures (and closes) stderr.
importlib.import_module("lightning.pytorch")

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "attention_collapse.yaml"
BAD_MONITOR = """\
trainer:
  callbacks:
    - class_path: entrotrain.callbacks.AttentionEntropyMonitor
      init_args:
        every_n_steps: 0
"""


@pytest.fixture
def bad_fragment(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.delenv("ENTROTRAIN_DEBUG", raising=False)
    path = tmp_path / "bad_monitor.yaml"
    path.write_text(BAD_MONITOR)
    return path


def _fit(*extra: str, root: Path) -> None:
    main(["fit", "--config", str(RECIPE), *extra, "--trainer.default_root_dir", str(root)])


def test_bad_monitor_value_in_a_yaml_fragment_is_a_parser_error(bad_fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _fit("--config", str(bad_fragment), root=tmp_path / "runs")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Does not validate against any of the Union subtypes" not in err
    line = next(ln for ln in err.splitlines() if ln.startswith("entrotrain fit: error:"))
    assert "AttentionEntropyMonitor from the config failed" in line
    assert re.search(r"failed: every_n_steps .*got 0", line) and "ENTROTRAIN_DEBUG=1" in line  # the monitor's own words
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_bad_model_value_names_the_configured_class(bad_fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        _fit("--model.init_args.n_head", "3", root=tmp_path / "runs")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "building entrotrain.tasks.LanguageModelingTask from the config failed: n_embd (128) must be divisible by n_head (3)." in err


def test_debug_env_keeps_the_traceback(bad_fragment, tmp_path, monkeypatch):
    monkeypatch.setenv("ENTROTRAIN_DEBUG", "1")
    with pytest.raises(ValueError, match="every_n_steps .*got 0"):
        _fit("--config", str(bad_fragment), root=tmp_path / "runs")


def test_message_prefers_the_entrotrain_error_in_the_chain():
    class Monitor:
        def __init__(self, every_n_steps: int) -> None:
            raise EntrotrainError(f"every_n_steps must be a positive integer, got {every_n_steps}; pass 1 or more.")

    try:
        try:
            Monitor(0)
        except EntrotrainError as inner:
            raise ValueError("Problem with given class_path 'x.Monitor'") from inner
    except ValueError as err:
        message = config_error_message(err, "fit")
    assert message.startswith("entrotrain fit: error: building ")
    assert "Monitor from the config failed: every_n_steps must be a positive integer, got 0; pass 1 or more." in message


def test_message_unwraps_a_jsonargparse_union_error():
    """What jsonargparse raises for a list of callbacks when the monitor refuses its value (the monitor's error is
    only in the text): its real reason and class_path, not the alternatives that did not apply."""
    err = ValueError(
        "Does not validate against any of the Union subtypes\nSubtypes: [list[Callback], Callback, NoneType]\nErrors:\n"
        "  - every_n_steps must be >= 1, got 0.\n  - Not a valid subclass of Callback\n    Subclass types expect one of:\n"
        "    - a class path (str)\n  - Expected a <class 'NoneType'>\nGiven value type: <class 'list'>\n"
        "Given value: [Namespace(class_path='entrotrain.callbacks.AttentionEntropyMonitor', init_args=Namespace(every_n_steps=0))]"
    )
    assert config_error_message(err, "fit") == (
        "entrotrain fit: error: building entrotrain.callbacks.AttentionEntropyMonitor from the config failed: "
        "every_n_steps must be >= 1, got 0. Fix the value in the config file or on the command line "
        "(set ENTROTRAIN_DEBUG=1 to see the traceback)."
    )


def test_a_tap_error_is_an_entrotrain_error_and_still_a_runtime_error() -> None:
    from entrotrain.errors import EntrotrainError, TapError

    assert issubclass(TapError, EntrotrainError) and issubclass(TapError, RuntimeError)  # one except catches all
