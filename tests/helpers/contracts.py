"""What the property tests share: the contract's two outcomes and the dtypes every function must take."""

from __future__ import annotations

import torch

from entrotrain.errors import EntrotrainError

__all__ = ["DTYPES", "INF", "NAN", "call"]

INF, NAN = float("inf"), float("nan")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def call(fn, *args, **kwargs):
    """``("ok", result)`` or ``("error", EntrotrainError)``; any other exception fails the test."""
    try:
        return "ok", fn(*args, **kwargs)
    except EntrotrainError as err:
        return "error", err
