"""One description of which keys each query may attend to, shared by every attention-entropy path.

Masks follow :func:`torch.nn.functional.scaled_dot_product_attention`:

- ``attn_mask`` boolean: ``True`` = the key takes part; floating: an additive bias. Bias entries equal to ``-inf`` or
  to the dtype's most negative value (what HF transformers writes for masked keys) mask the key out.
- ``is_causal``: query ``i`` sees keys ``j <= i`` (top-left aligned, as SDPA).
- ``key_padding_mask`` ``(batch, keys)``: boolean, ``True`` marks padding (the :class:`torch.nn.MultiheadAttention`
  convention). Integer masks are refused: HF's ``attention_mask`` (1 = keep) is the opposite convention and would
  silently mark every real key as padding; pass ``key_padding_mask=attention_mask == 0``.
- integer ``attn_mask`` is refused the same way (is 1 "attend" or "blocked"?): pass ``attn_mask.bool()``.
- ``window``: a sliding window of ``w`` keys: ``0 <= i - j < w`` when causal, ``|i - j| < w`` otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor

from entrotrain._validation import check_int, check_tensor, padding_mask
from entrotrain.errors import EntrotrainError

__all__ = ["AttentionMask"]


def _to_4d(mask: Tensor, name: str) -> Tensor:
    if mask.dim() > 4:
        raise EntrotrainError(f"{name} must have at most 4 dims (batch, heads, queries, keys), got {tuple(mask.shape)}.")
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))


class AttentionMask:
    """Which keys each query attends to, and any additive bias, served block by block of queries.

    Args:
        shape: ``(batch, heads, queries, keys)`` of the attention scores.
        attn_mask, key_padding_mask, is_causal, window: as in the module docstring.
        device: where the scores live.

    Raises:
        EntrotrainError: ``shape`` not four sizes >= 0, ``window`` not an int >= 1, an integer ``attn_mask`` or
            ``key_padding_mask`` (conventions above), a mask that does not fit ``shape``.
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        window: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        if len(shape) != 4:
            raise EntrotrainError(f"shape must be (batch, heads, queries, keys), got {tuple(shape)}.")
        self.shape = tuple(shape)
        batch, heads, n_q, n_k = shape
        self.is_causal = bool(is_causal)
        for name, size in zip(("batch", "heads", "queries", "keys"), shape):
            check_int(size, f"shape[{name}]", low=0)
        self.window = check_int(window, "window", low=1, none_ok=True)
        self.device = device
        self.valid: Tensor | None = None
        self.bias: Tensor | None = None
        if attn_mask is not None:
            check_tensor(attn_mask, "attn_mask")
            mask = _to_4d(attn_mask, "attn_mask").to(device)
            try:
                torch.broadcast_shapes(mask.shape, shape)
            except RuntimeError as err:
                raise EntrotrainError(
                    f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to the scores' shape {shape} "
                    "(batch, heads, queries, keys); give it as (queries, keys) or (batch, 1, queries, keys)."
                ) from err
            if mask.dtype == torch.bool:
                self.valid = mask
            elif mask.is_floating_point():
                blocked = mask <= torch.finfo(mask.dtype).min  # -inf, or HF's finfo.min for masked keys
                # Eager: look at the values (one host sync each) to drop an all-True `valid` / all-zero `bias`, which
                # keeps the fused value := key path open. Traced by torch.compile: no data-dependent branch (a
                # `.item()` would break the graph); keep both, which gives the same numbers on the general path.
                traced = torch.compiler.is_compiling()
                if traced or bool(blocked.any()):
                    self.valid = ~blocked
                    mask = torch.where(blocked, torch.zeros_like(mask), mask)
                if traced or bool((mask != 0).any()):
                    self.bias = mask
            else:
                raise EntrotrainError(
                    f"attn_mask must be boolean (True = attend) or floating (additive bias), got dtype {mask.dtype}; "
                    "for a 0/1 mask with 1 = attend use attn_mask.bool(), for one with 1 = blocked use "
                    "attn_mask == 0."
                )
        if key_padding_mask is not None:
            key_padding_mask = padding_mask(key_padding_mask, "key_padding_mask")
            if key_padding_mask.dim() != 2 or key_padding_mask.shape[-1] != n_k or key_padding_mask.shape[0] not in (
                1,
                batch,
            ):
                raise EntrotrainError(
                    f"key_padding_mask must have shape (batch, keys) = ({batch}, {n_k}), got "
                    f"{tuple(key_padding_mask.shape)}; True marks padding (nn.MultiheadAttention's convention)."
                )
            keep = ~key_padding_mask.to(device=device)[:, None, None, :]
            self.valid = keep if self.valid is None else self.valid & keep

    @property
    def has_bias(self) -> bool:
        """Whether finite additive biases remain (then the value := key identity does not hold)."""
        return self.bias is not None

    def _position_valid(self, rows: Tensor) -> Tensor | None:
        if not self.is_causal and self.window is None:
            return None
        rows = rows[:, None]
        cols = torch.arange(self.shape[3], device=self.device)[None, :]
        keep = torch.ones(rows.shape[0], self.shape[3], dtype=torch.bool, device=self.device)
        if self.is_causal:
            keep &= cols <= rows
        if self.window is not None:
            keep &= (rows - cols) < self.window
            if not self.is_causal:
                keep &= (cols - rows) < self.window
        return keep

    def block(self, start: int, stop: int) -> tuple[Tensor | None, Tensor | None]:
        """``(valid, bias)`` for queries ``start:stop``: boolean and float tensors broadcastable to the block."""
        return self.select(torch.arange(start, stop, device=self.device))

    def select(self, rows: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """``(valid, bias)`` for the query positions ``rows`` (a 1-D index tensor), e.g. a sample of queries."""
        valid = self._position_valid(rows)
        if self.valid is not None:
            part = self.valid.index_select(2, rows) if self.valid.shape[2] != 1 else self.valid
            valid = part if valid is None else part & valid
        bias = None
        if self.bias is not None:
            bias = self.bias.index_select(2, rows) if self.bias.shape[2] != 1 else self.bias
        return valid, bias

    def key_counts(self, block_queries: int) -> Tensor:
        """Number of valid keys per query, broadcastable to ``(batch, heads, queries)``."""
        n_q, n_k = self.shape[2], self.shape[3]
        if self.valid is None and not self.is_causal and self.window is None:
            return torch.full((1, 1, n_q), n_k, device=self.device)
        if self.valid is None:  # causal and/or window only: closed form, O(queries) instead of O(queries · keys)
            i = torch.arange(n_q, device=self.device)
            hi = i.clamp(max=n_k - 1) if self.is_causal else torch.full_like(i, n_k - 1)
            lo = torch.zeros_like(i)
            if self.window is not None:
                lo = (i - (self.window - 1)).clamp_min(0)
                if not self.is_causal:
                    hi = (i + (self.window - 1)).clamp(max=n_k - 1)
            return (hi - lo + 1).clamp_min(0).reshape(1, 1, n_q)
        parts = []
        for start in range(0, n_q, block_queries):
            stop = min(start + block_queries, n_q)
            valid, _ = self.block(start, stop)
            valid = _to_4d(valid, "valid")
            parts.append(valid.expand(*valid.shape[:2], stop - start, n_k).sum(-1))
        return torch.cat(parts, dim=-1)

    def dense_additive(self, dtype: torch.dtype, positions: bool = True) -> Tensor | None:
        """The mask as one additive float tensor (0 / -inf plus bias), for kernels that take one.

        ``positions=False`` leaves out the causal / window part (for a kernel that applies ``is_causal`` itself).
        """
        if positions:
            valid, bias = self.block(0, self.shape[2])
        else:
            valid, bias = self.valid, self.bias
        if valid is None and bias is None:
            return None
        out = bias.to(dtype) if bias is not None else torch.zeros((), dtype=dtype, device=self.device)
        if valid is not None:
            out = torch.where(valid, out, torch.tensor(float("-inf"), dtype=dtype, device=self.device))
        return out
