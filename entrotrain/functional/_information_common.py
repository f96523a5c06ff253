"""What the information-plane estimators share: input checks, the log base, and plug-in entropies of counts.

Private: the public names live in :mod:`entrotrain.functional.information`.

Conventions (DESIGN §2, §8), stated once for every estimator:

- Activations ``t`` are ``(n, d)`` (a 1-D ``(n,)`` tensor is one feature, ``(n, 1)``), any real dtype (fp16, bf16,
  fp32, fp64, integer); everything is computed in **float64**.
- ``labels`` are ``(n,)`` integer or bool class ids (any values; they are only compared for equality).
- Non-finite activations are **refused** with an :class:`~entrotrain.errors.EntrotrainError` that names the fix
  (drop the rows with :func:`entrotrain.functional.representation.finite_row_mask` and cut ``labels`` with the same
  mask): a mutual information of a sample holding NaN has no meaning, and monitors drop and count such rows.
- Results are 0-d float64 tensors in nats by default; ``base`` (> 1, e.g. 2 for bits) changes the unit. Base 2 and
  base e use ``log2`` / ``log`` directly, so dyadic tables give exact results in bits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from entrotrain._validation import check_real, check_shape, check_tensor
from entrotrain.errors import EntrotrainError

__all__ = [
    "as_rows64",
    "check_base",
    "check_labels",
    "class_ids",
    "count_entropy_sum",
    "log_base",
    "zero",
]


def check_base(base: Any) -> float:
    """The log base: a finite real > 1 (``math.e`` = nats, 2 = bits)."""
    return check_real(base, "base", low=1.0, low_open=True)  # type: ignore[return-value]


def log_base(x: Tensor, base: float) -> Tensor:
    """``log_base(x)``; exact ``log2`` / ``log`` for base 2 / e (so powers of two give exact bits)."""
    if base == 2.0:
        return torch.log2(x)
    if base == math.e:
        return torch.log(x)
    return torch.log(x) / math.log(base)


def zero(device: torch.device | str = "cpu") -> Tensor:
    """The documented value of a degenerate case: a 0-d float64 zero."""
    return torch.zeros((), dtype=torch.float64, device=device)


def as_rows64(t: Any, name: str = "t") -> Tensor:
    """``t`` as a float64 ``(n, d)`` matrix (a 1-D tensor becomes one column); non-finite entries are refused."""
    check_tensor(t, name, ndim=(1, 2), layout="(n, d) or (n,)")
    if t.is_complex() or t.dtype == torch.bool:
        raise EntrotrainError(f"{name} must hold real activations, got dtype {t.dtype}; cast it with {name}.double().")
    rows = t.detach().to(torch.float64)
    if rows.dim() == 1:
        rows = rows.unsqueeze(1)
    if rows.numel():
        bad = ~torch.isfinite(rows).all(dim=1)
        n_bad = int(bad.sum())
        if n_bad:
            raise EntrotrainError(
                f"{name} has {n_bad} row(s) with NaN/Inf entries (of {rows.shape[0]}); mutual information of such a "
                f"sample is undefined. Drop them first: keep = entrotrain.functional.representation.finite_row_mask"
                f"({name}); pass {name}[keep] and labels[keep] (monitors count the dropped rows)."
            )
    return rows


def check_labels(labels: Any, n: int, name: str = "labels") -> Tensor:
    """``labels`` is a ``(n,)`` integer or bool tensor of class ids."""
    check_tensor(labels, name, ndim=1, layout="(n,)")
    if labels.is_floating_point() or labels.is_complex():
        raise EntrotrainError(
            f"{name} must be integer (or bool) class ids, got dtype {labels.dtype}; use {name}.long() "
            f"(or {name}.argmax(-1) for one-hot rows)."
        )
    check_shape(labels, (n,), name, like="one class id per row of t")
    return labels


def class_ids(labels: Tensor) -> tuple[Tensor, int]:
    """Dense ids ``0..c-1`` for ``labels`` (any integer values) and the number of classes ``c``."""
    if labels.numel() == 0:
        return labels.to(torch.long), 0
    values, inverse = torch.unique(labels, return_inverse=True)
    return inverse.to(torch.long), int(values.numel())


def count_entropy_sum(counts: Tensor, base: float) -> Tensor:
    """``Σ c log c`` over positive counts (float64), the one term every plug-in entropy is built from:
    ``H = log n − (1/n) Σ_t c_t log c_t``."""
    c = counts[counts > 0].to(torch.float64)
    return (c * log_base(c, base)).sum()
