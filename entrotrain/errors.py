"""Errors raised by entrotrain. Every message names the problem and the fix (einops style)."""

from __future__ import annotations

__all__ = ["EntrotrainError", "TapError"]


class EntrotrainError(ValueError):
    """Bad input to an entrotrain function or class: wrong shape, dtype or option."""


class TapError(EntrotrainError, RuntimeError):
    """A model's attention (or another signal) cannot be captured as configured. An :class:`EntrotrainError` (one
    ``except`` catches every entrotrain refusal) and, as before, a ``RuntimeError``."""
