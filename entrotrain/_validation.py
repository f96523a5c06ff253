"""One place that checks what enters entrotrain: tensors, dims, masks, ranges (DESIGN.md §8).

Every public function and constructor validates its inputs with these helpers instead of pasting its own checks.
Each helper raises :class:`~entrotrain.errors.EntrotrainError` naming the argument, what was received and the fix;
none of them syncs with the device (no ``.item()``), so they cost nothing on the hot path, except the value check of
a non-bool mask in :func:`keep_mask` and :func:`token_mask` (one reduction and one sync; bool masks cost nothing).

Mask conventions (the one rule every function documents and follows):

- ``bool``: ``True`` = the entry takes part (a valid token, a key that may be attended to);
- floating, where an attention *bias* is expected: an additive bias (``-inf`` or ``finfo.min`` masks the key out);
- integer 0/1 (HF's ``attention_mask``): accepted where a *keep* mask is expected, 1 = keep, through
  :func:`keep_mask`; anywhere the convention would be ambiguous (``key_padding_mask``, where ``True`` marks padding
  as in :class:`torch.nn.MultiheadAttention`) an integer mask is refused with the fix;
- a *token* mask of the policy code (True / 1 = a real response token): bool, or integer / floating 0/1 (verl's
  and TRL's masks), through :func:`token_mask`; other values are refused with the fix, never guessed.

Non-finite *data* is not an input error: a NaN/Inf value gives a NaN/Inf result only for the rows that hold it
(monitors count and skip those rows); non-finite *parameters* (a NaN threshold, an Inf temperature) are refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import torch
from torch import Tensor

from entrotrain.errors import EntrotrainError

__all__ = [
    "check_choice",
    "check_dim",
    "check_int",
    "check_real",
    "check_shape",
    "check_tensor",
    "keep_mask",
    "padding_mask",
    "token_mask",
]

_FLOATING = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def check_tensor(
    x: Any,
    name: str,
    *,
    floating: bool = False,
    integer: bool = False,
    ndim: int | Sequence[int] | None = None,
    min_ndim: int | None = None,
    layout: str | None = None,
) -> Tensor:
    """``x`` is a dense (strided, not nested) tensor; optionally floating (fp16/bf16/fp32/fp64), integer, with ``ndim`` dims (one of them) or at
    least ``min_ndim``. ``layout`` names the dims for the message, e.g. ``"(batch, heads, queries, head_dim)"``."""
    if not isinstance(x, Tensor):
        raise EntrotrainError(f"{name} must be a torch.Tensor, got {type(x).__name__}; wrap it with torch.as_tensor.")
    if x.layout != torch.strided or x.is_nested:
        kind = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        fix = "torch.nested.to_padded_tensor(x, 0.0) with a mask" if x.is_nested else f"{name}.to_dense()"
        raise EntrotrainError(f"{name} must be a dense (strided) tensor, got {kind}; convert it with {fix}.")
    if floating and x.dtype not in _FLOATING:
        raise EntrotrainError(
            f"{name} must be a floating-point tensor (fp16, bf16, fp32 or fp64), got dtype {x.dtype}; "
            f"cast it with {name}.float()."
        )
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise EntrotrainError(f"{name} must be an integer tensor, got dtype {x.dtype}; use {name}.long().")
    want = f" {layout}" if layout else ""
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.dim() not in allowed:
            dims = " or ".join(str(d) for d in allowed)
            raise EntrotrainError(f"{name} must have {dims} dims{want}, got shape {_shape(x)}.")
    if min_ndim is not None and x.dim() < min_ndim:
        raise EntrotrainError(f"{name} must have at least {min_ndim} dim(s){want}, got shape {_shape(x)}.")
    return x


def check_dim(dim: Any, ndim: int, name: str = "dim") -> int:
    """``dim`` indexes a tensor of ``ndim`` dims (``-ndim <= dim < ndim``, no wrap-around); returns it non-negative."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise EntrotrainError(f"{name} must be an int, got {type(dim).__name__} {dim!r}.")
    if not -ndim <= dim < ndim:
        raise EntrotrainError(
            f"{name}={dim} is out of range for a tensor of {ndim} dim(s) (valid: {-ndim} to {ndim - 1})."
        )
    return dim % ndim


def check_shape(x: Tensor, shape: Sequence[int], name: str, *, like: str = "", broadcast: bool = False) -> Tensor:
    """``x`` has exactly ``shape`` (or broadcasts to it when ``broadcast``); ``like`` names where the shape comes
    from, e.g. ``"the logprobs"``. Returns ``x`` (broadcast when asked)."""
    shape = tuple(int(s) for s in shape)
    source = f" ({like})" if like else ""
    if broadcast:
        try:
            return torch.broadcast_to(x, shape)
        except RuntimeError:
            raise EntrotrainError(
                f"{name} of shape {_shape(x)} does not broadcast to {shape}{source}; give it that shape."
            ) from None
    if _shape(x) != shape:
        raise EntrotrainError(f"{name} must have shape {shape}{source}, got {_shape(x)}.")
    return x


def keep_mask(mask: Tensor | None, name: str = "mask") -> Tensor | None:
    """A *keep* mask as bool: bool as is; integer 0/1 (HF's ``attention_mask``) with 1 = keep.

    Floating masks are refused (they are ambiguous: a bias or weights?), as are integers other than 0 and 1 — the
    latter check reads the values, so it runs only for integer masks (use bool masks on hot paths)."""
    if mask is None:
        return None
    check_tensor(mask, name)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise EntrotrainError(
            f"{name} must be boolean (True = keep) or integer 0/1 (1 = keep, HF's attention_mask), got dtype "
            f"{mask.dtype}; use {name}.bool() (or {name} > 0.5 for a 0/1 float mask)."
        )
    if mask.numel() and bool(((mask != 0) & (mask != 1)).any()):
        raise EntrotrainError(
            f"{name} is an integer mask with values other than 0 and 1; give a bool mask (True = keep) or 0/1."
        )
    return mask != 0


def token_mask(
    mask: Tensor, shape: Sequence[int], name: str = "mask", *, like: str = "the tokens", check_floats: bool = True
) -> Tensor:
    """A token mask (True / 1 = a real response token) as bool, shaped exactly ``shape``: the one rule of every
    policy reader (the policy functions, losses, monitor and recorder; DESIGN.md §8).

    ``bool`` as is; integer or floating (verl's and TRL's ``response_mask`` / ``completion_mask``) when every value
    is 0 or 1, read as ``mask != 0``. Any other value (an integer 2, a float 0.5, a NaN) is an
    :class:`~entrotrain.errors.EntrotrainError` naming the values found and the fix (``mask.bool()`` or
    ``mask > 0``), never guessed. Reading the values of a non-bool mask costs one reduction and a host sync (bool
    masks cost nothing); ``check_floats=False`` leaves a *floating* mask's values unread (read as ``mask != 0``), for
    a caller whose path never syncs otherwise (integer masks are still checked, as :func:`keep_mask` does)."""
    check_tensor(mask, name)
    if mask.is_complex():
        raise EntrotrainError(f"{name} must be boolean (True = a real token), integer 0/1 or floating 0/1, got dtype "
                              f"{mask.dtype}; give a bool mask, e.g. {name}.real > 0.")
    check_shape(mask, shape, name, like=like)
    if mask.dtype == torch.bool:
        return mask
    if (check_floats or not mask.is_floating_point()) and mask.numel():
        bad = (mask != 0) & (mask != 1)
        if bool(bad.any()):
            found = torch.unique(mask[bad].detach().cpu().double())[:5].tolist()
            raise EntrotrainError(
                f"{name} ({mask.dtype}) holds values other than 0 and 1 (found {found}); a token mask is bool "
                f"(True = a real token) or 0/1: give {name}.bool() if every nonzero marks a real token, or "
                f"{name} > 0 (or > 0.5 for weights), not a guess made here."
            )
    return mask != 0


def padding_mask(mask: Tensor | None, name: str = "key_padding_mask") -> Tensor | None:
    """A *padding* mask (``True`` = padding, :class:`torch.nn.MultiheadAttention`'s convention) as bool.

    Integer masks are refused: HF's 1 = keep is the opposite of this convention, and guessing flips every key."""
    if mask is None:
        return None
    check_tensor(mask, name)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        raise EntrotrainError(
            f"{name} is floating ({mask.dtype}); pass a float additive mask as attn_mask, or a bool {name} "
            "(True = padding)."
        )
    raise EntrotrainError(
        f"{name} must be boolean with True = padding (nn.MultiheadAttention's convention), got dtype {mask.dtype}. "
        f"An HF attention_mask (1 = keep) becomes {name}=attention_mask == 0."
    )


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    none_ok: bool = False,
) -> float | None:
    """A finite real number in ``[low, high]`` (``(`` / ``)`` where open); ``None`` passes when ``none_ok``."""
    if value is None and none_ok:
        return None
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise EntrotrainError(f"{name} must be a finite number, got {value!r}.")
    value = float(value)
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    interval = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    if low is not None and (value < low or (low_open and value == low)):
        raise EntrotrainError(f"{name} must be in {interval}, got {value!r}.")
    if high is not None and (value > high or (high_open and value == high)):
        raise EntrotrainError(f"{name} must be in {interval}, got {value!r}.")
    return value


def check_int(value: Any, name: str, *, low: int | None = None, high: int | None = None, none_ok: bool = False) -> int:
    """An int (not a bool, not a float) in ``[low, high]``; ``None`` passes when ``none_ok``."""
    if value is None and none_ok:
        return None  # type: ignore[return-value]
    if isinstance(value, bool) or not isinstance(value, int):
        raise EntrotrainError(f"{name} must be an int, got {type(value).__name__} {value!r}.")
    if low is not None and value < low:
        raise EntrotrainError(f"{name} must be >= {low}, got {value}.")
    if high is not None and value > high:
        raise EntrotrainError(f"{name} must be <= {high}, got {value}.")
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """``value`` is one of ``choices``."""
    if value not in tuple(choices):
        raise EntrotrainError(f"{name} must be one of {tuple(choices)}, got {value!r}.")
    return value


def check_bool(value: Any, name: str, *, none_ok: bool = False) -> bool | None:
    """A real ``bool`` (not 0/1, not a string such as ``"false"``, which would be truthy); ``None`` passes when
    ``none_ok``."""
    if value is None and none_ok:
        return None
    if not isinstance(value, bool):
        raise EntrotrainError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")
    return value


def check_str(value: Any, name: str, *, empty_ok: bool = False) -> str:
    """A ``str`` (non-empty unless ``empty_ok``), e.g. a metric key."""
    if not isinstance(value, str):
        raise EntrotrainError(f"{name} must be a string, got {type(value).__name__} {value!r}.")
    if not empty_ok and not value.strip():
        raise EntrotrainError(f"{name} must be a non-empty string, got {value!r}; name the key, e.g. 'entropy/attn/min'.")
    return value


__all__ += ["check_bool", "check_str"]


def check_device(device: Any, name: str = "device", *, none_ok: bool = True) -> torch.device | None:
    """A ``torch.device`` (or a string such as ``"cuda:0"`` naming one); ``None`` passes when ``none_ok``."""
    if device is None and none_ok:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise EntrotrainError(
            f"{name} must be a torch.device or a device string such as 'cpu' or 'cuda:0', got {device!r}."
        ) from None


__all__ += ["check_device"]

#: The range of seeds ``torch.Generator.manual_seed`` takes (a signed or unsigned 64-bit integer).
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(value: Any, name: str = "seed", *, low: int = SEED_RANGE[0], offset: int = 0) -> int:
    """A generator seed: an int in ``[low, 2**64 - 1 - offset]``, ``offset`` the most the caller adds to it (a second
    generator seeded ``seed + 1``); beyond that ``manual_seed`` fails with a raw ``ValueError``."""
    return check_int(value, name, low=low, high=SEED_RANGE[1] - offset)


__all__ += ["SEED_RANGE", "check_seed"]
