"""``EntropyCollapseGuard(notify=...)``: called once per firing on rank zero with the firing's message, whatever the
action, in Lightning and in a plain loop (the session HF Trainer shares); an import path resolves; a failing notify
is warned about once and never reaches training; bad values are a clear error."""

from __future__ import annotations

import warnings

import pytest

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors
from tests.callbacks.test_collapse_guard import run
from tests.helpers import notify_sink
from tests.helpers.gpt_module import GPTModule
from tests.helpers.loop_runs import run_loop, token_batches


@pytest.mark.parametrize("action", ["warn", "alert", "stop", "reduce_lr"])
def test_lightning_calls_notify_once_per_firing_with_the_message(action: str) -> None:
    sent: list[str] = []
    guard = EntropyCollapseGuard("watched", threshold=0.5, action=action, notify=sent.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run([0.9, 0.4, 0.3, 0.8, 0.2], guard)
    expected = 1 if action == "stop" else 2  # two episodes (0.4, then 0.2), unless the first stops training
    assert guard.times_fired == expected and len(sent) == expected
    assert sent[0].startswith("EntropyCollapseGuard at step 1: watched = 0.4 fell below 0.5 (last good: 0.9 at step 0).")


def test_an_import_path_resolves_and_bad_values_are_clear_errors() -> None:
    notify_sink.RECEIVED.clear()
    for path in ("tests.helpers.notify_sink.collect", "tests.helpers.notify_sink:collect"):
        guard = EntropyCollapseGuard("watched", threshold=0.5, notify=path)
        assert guard.notify is notify_sink.collect
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run([0.9, 0.4], guard)
    assert len(notify_sink.RECEIVED) == 1 and "watched = 0.4" in notify_sink.RECEIVED[0]
    for bad, said in (
        ("tests.helpers.no_such_module.f", "cannot import it"),
        ("tests.helpers.notify_sink.missing", "cannot import it"),
        ("tests.helpers.notify_sink.NOT_CALLABLE", "names a int, not a callable"),
        ("collect", "is not an import path"),
        ("", "must be a callable"),
        (3, "must be a callable"),
    ):
        with pytest.raises(EntrotrainError, match=said):
            EntropyCollapseGuard("watched", threshold=0.5, notify=bad)


def test_a_failing_notify_is_warned_once_and_training_goes_on() -> None:
    def broken(message: str) -> None:
        raise ConnectionError("webhook unreachable")

    guard = EntropyCollapseGuard("watched", threshold=0.5, notify=broken)
    with pytest.warns(UserWarning) as record:
        trainer = run([0.9, 0.4, 0.8, 0.3, 0.2], guard)
    failed = [w for w in record if "notify failed (ConnectionError: webhook unreachable)" in str(w.message)]
    assert guard.times_fired == 2 and len(failed) == 1 and trainer.global_step == 5


def test_a_plain_loop_calls_notify_through_the_session() -> None:
    sent: list[str] = []
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, arm_on_good=False, action="stop",
                                 notify=sent.append)  # normalised entropy <= 1 < 1.5: fires at the first step
    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)],
                               guards=[guard], print_summary=False)
    with pytest.warns(UserWarning, match="Stopping training"):
        run_loop(GPTModule(seed=0), token_batches(2), monitors, 1)
    assert len(sent) == 1 and sent[0].startswith("EntropyCollapseGuard at step 0: entropy/attn_norm/min = ")
    assert sent[0].endswith("Stopping training.")


def test_a_recipe_names_notify_by_import_path() -> None:
    """LightningCLI's parser (jsonargparse) reads ``notify: package.module.function`` from a recipe's YAML."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(EntropyCollapseGuard, "guard")
    config = parser.parse_string("guard:\n  monitor: entropy/attn_norm/min\n  notify: tests.helpers.notify_sink.collect\n")
    assert EntropyCollapseGuard(**vars(config.guard)).notify is notify_sink.collect
