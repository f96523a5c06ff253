"""Kernel tests: the Triton kernels against the torch path (the oracle) and float64 brute force.

Runs on CUDA when present; on CPU through Triton's interpreter. ``tests/conftest.py`` puts triton in interpreter mode
for the whole process before anything imports it (kernels are defined interpreted) and unsets ``TRITON_INTERPRET``
for every test, so that ``impl="auto"`` elsewhere keeps the torch paths; the autouse fixture below sets it again
during each kernel test, so that the dispatch picks the kernels. Without triton every kernel test module is skipped
(``pytest.importorskip``; so is a triton older than 3.0, which cannot compile them); ``test_dispatch.py`` runs either
way.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.delenv("ENTROTRAIN_IMPL", raising=False)
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def device() -> torch.device:
    return DEVICE
