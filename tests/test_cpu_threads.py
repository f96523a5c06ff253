"""entrotrain._cpu_threads: OMP_WAIT_POLICY=PASSIVE for the CLI unless the user chose, one line saying so, and proof
(libgomp's own OMP_DISPLAY_ENV report) that the variable works only when set before the OpenMP runtime loads."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from entrotrain import _cpu_threads
from entrotrain._cpu_threads import (
    OFF_SWITCH,
    USER_KNOBS,
    configure_cpu_threads,
    openmp_loaded,
    prepare_cpu_env,
)

MODULE = Path(_cpu_threads.__file__)


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(_cpu_threads, "_state", {"chosen": False, "openmp_before": False, "reported": False})


def test_sets_passive_wait_policy_when_the_user_chose_nothing():
    env = {"PATH": "/bin"}
    assert prepare_cpu_env(env) is True
    assert env == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert prepare_cpu_env(env) is True  # idempotent
    assert "OMP_NUM_THREADS" not in env  # the thread count (and so the results) never changes


@pytest.mark.parametrize("knob", USER_KNOBS)
def test_never_overrides_a_user_setting(knob, capsys):
    env = {knob: "1" if "THREADS" in knob or "SPIN" in knob else "ACTIVE"}
    before = dict(env)
    assert prepare_cpu_env(env) is False
    assert configure_cpu_threads(env) is None
    assert env == before and capsys.readouterr().err == ""


@pytest.mark.parametrize("value, off", [("keep", True), ("OFF", True), ("0", True), ("auto", False), ("", False)])
def test_off_switch(value, off):
    env = {OFF_SWITCH: value}
    assert prepare_cpu_env(env) is (not off)
    assert ("OMP_WAIT_POLICY" in env) is (not off)


def test_configure_prints_one_line_once_and_says_how_to_change_it(capsys):
    env: dict[str, str] = {}
    line = configure_cpu_threads(env)
    err = capsys.readouterr().err
    assert line is not None and err == line + "\n" and "\n" not in line
    assert "OMP_WAIT_POLICY=PASSIVE" in line and "OMP_WAIT_POLICY=ACTIVE" in line and OFF_SWITCH in line
    # this test process imported torch before: the line must not claim the setting took effect here
    assert openmp_loaded() and "THIS process loaded torch first" in line
    assert configure_cpu_threads(env) is None and capsys.readouterr().err == ""


def test_configure_after_an_early_prepare_reports_it_took_effect(monkeypatch, capsys):
    env: dict[str, str] = {}
    monkeypatch.setattr(_cpu_threads, "openmp_loaded", lambda: False)  # as if prepare ran before import torch
    assert prepare_cpu_env(env)
    monkeypatch.setattr(_cpu_threads, "openmp_loaded", lambda: True)
    line = configure_cpu_threads(env)
    assert line is not None and "same results" in line and "THIS process" not in line
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"


def test_the_console_script_sets_the_policy_before_torch_loads():
    """The wiring itself: ``entrotrain fit ...`` (the console script) chooses PASSIVE before anything imports torch,
    so the line says it took effect in this process (not "loaded torch first")."""
    env = {k: v for k, v in os.environ.items() if k not in USER_KNOBS and k != OFF_SWITCH}
    code = "import sys; sys.argv = ['entrotrain', 'fit', '--help']; from entrotrain.cli import console; console()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "entrotrain: OMP_WAIT_POLICY=PASSIVE (idle CPU threads sleep" in out.stderr
    assert "loaded torch first" not in out.stderr


def _libgomp() -> Path:
    spec = importlib.util.find_spec("torch")
    assert spec is not None and spec.submodule_search_locations
    found = sorted(Path(next(iter(spec.submodule_search_locations)), "lib").glob("libgomp*.so*"))
    if not found:
        pytest.skip("this torch build bundles no libgomp")
    return found[0]


LOAD = r"""
import ctypes, importlib.util, os, sys
spec = importlib.util.spec_from_file_location("_cpu_threads", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)                      # standard library only: no torch, no OpenMP yet
if sys.argv[3] == "late":
    ctypes.CDLL(sys.argv[2])                      # the OpenMP runtime loads (as at `import torch`) ...
mod.prepare_cpu_env()                             # ... before or after the variable is set
ctypes.CDLL(sys.argv[2])
print("torch" in sys.modules, mod.openmp_loaded(), os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.parametrize("when, spin", [("early", "'0'"), ("late", "'300000'")])
def test_libgomp_honours_the_policy_only_when_set_before_it_loads(when, spin):
    """libgomp's own report (OMP_DISPLAY_ENV=VERBOSE, printed when it initialises): PASSIVE = spin count 0; set after
    the runtime loaded, the default spin count (300000) stays."""
    env = {k: v for k, v in os.environ.items() if k not in USER_KNOBS and k != OFF_SWITCH}
    env["OMP_DISPLAY_ENV"] = "VERBOSE"
    out = subprocess.run([sys.executable, "-c", LOAD, str(MODULE), str(_libgomp()), when], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "PASSIVE"]
    assert f"GOMP_SPINCOUNT = {spin}" in out.stderr
