"""Shared test setup: wandb never touches the network or a login, and never leaks a run between tests.

Triton (when installed, without CUDA) is put in interpreter mode *before anything imports it*: triton fixes the mode
of its own language functions when ``triton.language`` is first imported, and importing lightning imports triton
(through torch). Every test then runs with ``TRITON_INTERPRET`` unset, so ``impl="auto"`` keeps the torch paths;
``tests/kernels`` sets it again for its own tests.
"""

from __future__ import annotations

import importlib.util
import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Property tests: a fixed, derandomised profile ("ci", the default) so every run draws the same examples and CI time
# is bounded; HYPOTHESIS_PROFILE=deep explores more (and randomly) when hunting for bugs.
settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile(
    "deep", max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _no_triton_interpreter_outside_kernel_tests(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(autouse=True)
def _wandb_isolated(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    import sys

    if "wandb" in sys.modules:  # WandbLogger never finishes its run; do it so the next test gets a fresh one
        import wandb

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wandb.finish()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster than two on a shared machine (restored after the module). Use it
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
