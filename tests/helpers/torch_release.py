"""Skips for tests that need a newer torch than the floor ``torch>=2.3`` that pyproject promises.

A test that checks a feature older torch lacks (an API, or what its dynamo can trace) is skipped there with
:func:`needs_torch`, which names the version and why; the library itself must still work on the floor.
"""

from __future__ import annotations

import pytest
import torch

#: (major, minor) of the running torch: "2.3.1+cu121" -> (2, 3).
TORCH_RELEASE: tuple[int, int] = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def needs_torch(major: int, minor: int, why: str) -> pytest.MarkDecorator:
    """``skipif`` the running torch is older than ``major.minor``, with the reason ``why``."""
    return pytest.mark.skipif(TORCH_RELEASE < (major, minor), reason=f"needs torch>={major}.{minor}: {why}")
