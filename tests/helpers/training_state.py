"""Copies of a model's and an optimizer's state, and exact comparison of them: what the rollback tests compare."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``module.state_dict()``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def opt_state(opt: Any) -> list[dict[str, Any]]:
    """A copy of each parameter's optimizer state, in param-group order (an accelerate / Lightning wrapper is
    looked through)."""
    opt = getattr(opt, "optimizer", opt)
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state.get(p) or {}
            out.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()})
    return out


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of nested tensors / dicts / lists (dtypes included)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b
