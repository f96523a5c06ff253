"""CPU thread defaults for ``entrotrain fit`` that survive a busy machine, without changing results.

The problem (measured with ``benchmarks/cpu_load.py``): torch's CPU build runs its intra-op parallelism on the GNU
OpenMP runtime it bundles (``libgomp``), with one thread per core. At the end of every parallel region a worker that
finishes first *spins* (``GOMP_SPINCOUNT``, 300,000 iterations by default) waiting for its team-mates before it
sleeps. On a quiet machine that costs little. On a loaded one the team-mate is often descheduled, so each barrier
burns a time slice spinning, and the spinning thread steals the core the late one needs: the README main job went
from 53 s wall / 93 s CPU to 23 min wall / 7.5 min CPU at a load of 11.

The fix that keeps results **bit-identical**: ``OMP_WAIT_POLICY=PASSIVE``, so idle workers sleep at once. The thread
count, the work split and so the floating-point reduction order stay the same (unlike ``torch.set_num_threads(1)``,
which changes the trained parameters after the first steps). libgomp reads the variable **once, when it is loaded**,
i.e. at ``import torch``: setting it later in the same process does nothing (``benchmarks/cpu_load.py``'s
``passive-late`` row). Hence two entry points:

* :func:`prepare_cpu_env` (standard library only) must run **before torch is imported**: the ``entrotrain`` console
  script calls it (through :func:`configure_cpu_threads`) before a run subcommand imports anything heavy; ``import
  entrotrain`` imports no torch (its names load lazily) and never changes a user's environment.
* :func:`configure_cpu_threads`, called by the CLI before the run, prints the one line that says what was chosen and
  how to change it. If torch was imported before the variable was set (another entry point), it cannot take effect
  in this process: the line says so and how to set it in the shell; processes started from here (DDP workers,
  DataLoader workers started with ``spawn``) still inherit it.

Never overridden: any of ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` already in
the environment is the user's choice (nothing is set, nothing is printed), and ``ENTROTRAIN_CPU_THREADS=keep``
turns the whole mechanism off. The number of threads is never changed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping
from pathlib import Path

__all__ = ["OFF_SWITCH", "USER_KNOBS", "configure_cpu_threads", "openmp_loaded", "prepare_cpu_env"]

USER_KNOBS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""Environment variables that mean the user chose the threading already: never overridden."""

OFF_SWITCH = "ENTROTRAIN_CPU_THREADS"
"""``ENTROTRAIN_CPU_THREADS=keep``: leave the OpenMP settings exactly as they are."""

_CHOICE = {"OMP_WAIT_POLICY": "PASSIVE"}
_state: dict[str, object] = {"chosen": False, "openmp_before": False, "reported": False}


def openmp_loaded() -> bool:
    """Whether an OpenMP runtime (``libgomp`` / ``libiomp`` / ``libomp``) is already mapped into this process, i.e.
    too late for its environment variables. Falls back to ``"torch" in sys.modules`` where ``/proc`` is missing."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "torch" in sys.modules
    return any(lib in maps for lib in ("libgomp", "libiomp", "libomp"))


def _user_choice(env: MutableMapping[str, str]) -> bool:
    return env.get(OFF_SWITCH, "").strip().lower() in ("keep", "off", "0", "false", "no") or any(
        k in env for k in USER_KNOBS
    )


def prepare_cpu_env(env: MutableMapping[str, str] | None = None) -> bool:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` in ``env`` (default ``os.environ``) unless the user chose (:data:`USER_KNOBS`,
    :data:`OFF_SWITCH`). Standard library only: call it before ``import torch``. Idempotent.

    Returns:
        Whether entrotrain chose the setting (now or in an earlier call).
    """
    env = os.environ if env is None else env
    if _state["chosen"]:
        return True
    if _user_choice(env):
        return False
    _state["openmp_before"] = openmp_loaded()
    env.update(_CHOICE)
    _state["chosen"] = True
    return True


def configure_cpu_threads(env: MutableMapping[str, str] | None = None) -> str | None:
    """Choose the CLI's CPU threading (see the module docstring) and print what was chosen, once, on stderr.

    Calls :func:`prepare_cpu_env` (a no-op when the package ``__init__`` already did, before torch loaded).

    Args:
        env: the environment to read and update; default ``os.environ``.

    Returns:
        The line printed, or ``None`` when the user's own settings stand (nothing printed) or it was printed before.
    """
    if not prepare_cpu_env(env) or _state["reported"]:
        return None
    _state["reported"] = True
    how = "set OMP_WAIT_POLICY=ACTIVE (or ENTROTRAIN_CPU_THREADS=keep) to keep the spinning default"
    if _state["openmp_before"]:
        line = (
            "entrotrain: OMP_WAIT_POLICY=PASSIVE set for the processes started from here; THIS process loaded torch "
            "first, so its OpenMP threads still spin when idle (slow on a busy machine): run with "
            f"OMP_WAIT_POLICY=PASSIVE in the environment; {how}."
        )
    else:
        line = (
            "entrotrain: OMP_WAIT_POLICY=PASSIVE (idle CPU threads sleep instead of spinning: same results, far less "
            f"CPU time when the machine is busy; thread count unchanged); {how}."
        )
    print(line, file=sys.stderr, flush=True)
    return line
