"""Optional dependencies, checked lazily (never imported at package import time)."""

from __future__ import annotations

from lightning_utilities.core.imports import RequirementCache

_WANDB_AVAILABLE = RequirementCache("wandb>=0.19")
_PIL_AVAILABLE = RequirementCache("pillow")
_TRANSFORMERS_AVAILABLE = RequirementCache("transformers>=4.48")
_TRITON_AVAILABLE = RequirementCache("triton")
