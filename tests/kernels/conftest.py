"""Kernel tests: the Triton kernels against the torch path (the oracle) and float64 brute force.

Runs on CUDA when present; on CPU through Triton's interpreter. The interpreter is chosen when a kernel is *defined*
(``@triton.jit`` reads ``TRITON_INTERPRET``), so on a machine without CUDA this file switches it on, imports the kernel
modules (their kernels become interpreted functions), and puts the variable back: the rest of the suite keeps its
environment (an ``impl="auto"`` call elsewhere must not start picking the slow interpreter). During each kernel test
an autouse fixture sets ``TRITON_INTERPRET=1`` again, so that the dispatch sees it. Without triton every kernel test
module is skipped (``pytest.importorskip``); ``test_dispatch.py`` runs either way.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
INTERPRET = DEVICE.type == "cpu"

if HAS_TRITON and INTERPRET:
    _previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import entrotrain.kernels.attention_entropy  # noqa: F401
        import entrotrain.kernels.linear_entropy  # noqa: F401
        import entrotrain.kernels.logits_entropy  # noqa: F401
    finally:
        if _previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = _previous


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.delenv("ENTROTRAIN_IMPL", raising=False)
    if INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def device() -> torch.device:
    return DEVICE
