"""``entrotrain.dashboards`` loads its names on first access (PEP 562): importing it, ``entrotrain report --help`` and
reading a run record back import neither lightning nor torch (the run record's writer and the wandb media do)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import entrotrain.dashboards as dashboards

HEAVY = ("torch", "lightning", "wandb", "matplotlib")


def test_import_report_help_and_reading_a_record_import_nothing_heavy(attention_run):
    code = (
        "import sys\n"
        "import entrotrain.dashboards\n"
        "from entrotrain.dashboards import build_report\n"
        "from entrotrain.dashboards.run_reader import load_run\n"
        "from entrotrain.cli import main\n"
        "try:\n"
        "    main(['report', '--help'])\n"
        "except SystemExit as exit:\n"
        "    assert exit.code == 0, exit.code\n"
        f"run = load_run({str(attention_run)!r})\n"
        "assert run.scalars, 'the record was not read'\n"
        f"print('HEAVY:', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "entrotrain report" in done.stdout and "RUN_DIR" in done.stdout  # the help was printed
    assert done.stdout.strip().splitlines()[-1] == "HEAVY: []"


@pytest.mark.parametrize("name", dashboards.__all__)
def test_every_public_name_is_its_module_s_object(name):
    module = importlib.import_module(dashboards._LAZY[name])
    assert getattr(dashboards, name) is getattr(module, name)
    assert name in dir(dashboards)


def test_submodules_load_on_access_and_unknown_names_are_attribute_errors():
    assert dashboards.run_reader is sys.modules["entrotrain.dashboards.run_reader"]
    assert dashboards.report_template is importlib.import_module("entrotrain.dashboards.report_template")
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        dashboards.nope  # noqa: B018
    with pytest.raises(AttributeError, match="no attribute '_private'"):
        dashboards._private  # noqa: B018


def test_status_and_the_ceiling_verdict_of_a_policy_run_import_no_torch(tmp_path):
    """`entrotrain status` on a PolicyEntropyMonitor run (its fit published: fit_a, fit_b, fit_r2) judges the fitted
    ceiling without importing torch (before: entrotrain.functional, ~2 CPU s, for the rules alone)."""
    import math

    from entrotrain.dashboards.run_record import RunRecordLogger

    logger = RunRecordLogger(tmp_path, name="records", version="policy")
    for step in range(0, 40, 2):
        h = 1.2 * math.exp(-step / 15) + 0.05
        metrics = {"entropy/policy/mean": h, "entropy/policy/reward_mean": -0.2 * math.exp(h) + 1.0}
        if step >= 16:
            metrics.update({"entropy/policy/fit_a": 0.2, "entropy/policy/fit_b": 1.0,
                            "entropy/policy/fit_ceiling": 0.8, "entropy/policy/fit_r2": 0.99})
        logger.log_metrics(metrics, step=step)
    logger.finalize("success")
    code = (
        "import sys\n"
        "from entrotrain.dashboards.terminal_status import status_main\n"
        f"status_main([{str(logger.run_dir)!r}])\n"
        f"print('HEAVY:', [m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "predicted reward ceiling when the entropy is spent b − a = 0.8" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "HEAVY: []"
