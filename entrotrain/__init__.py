"""entrotrain: entropy as a first-class training signal.

Callbacks (:mod:`entrotrain.callbacks`) watch attention, RL policy and representation entropy live in a Lightning
``Trainer``; the maths lives in :mod:`entrotrain.functional`, the capture in :mod:`entrotrain.taps`. Importing
entrotrain never imports wandb, transformers, trl, verl or triton.

Every public name here is loaded on first access (PEP 562), so ``import entrotrain`` imports nothing heavy, not
even torch: ``entrotrain recipes`` and ``entrotrain --help`` start at once, and the ``entrotrain`` command can set
the OpenMP environment (:mod:`entrotrain._cpu_threads`) before torch loads its OpenMP runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from entrotrain._lazy_package import lazy_attributes

from entrotrain.errors import EntrotrainError, TapError

if TYPE_CHECKING:
    from entrotrain.functional import (
        attention_entropy,
        attention_entropy_from_probs,
        attention_entropy_from_scores,
        attention_entropy_stats,
        entropy_from_logits,
        entropy_from_probs,
    )
    from entrotrain.taps import AttentionTap, record_attention

__version__ = "0.1.0"

_LAZY = {
    **dict.fromkeys(
        (
            "attention_entropy",
            "attention_entropy_from_probs",
            "attention_entropy_from_scores",
            "attention_entropy_stats",
            "entropy_from_logits",
            "entropy_from_probs",
        ),
        "entrotrain.functional",
    ),
    **dict.fromkeys(("AttentionTap", "record_attention"), "entrotrain.taps"),
    **dict.fromkeys(
        (
            "AttentionEntropyMonitor",
            "EntropyCollapseGuard",
            "PolicyEntropyMonitor",
            "RepresentationEntropyMonitor",
            "ResumeWithChanges",
            "SigmaReparamMonitor",
        ),
        "entrotrain.callbacks",
    ),
    "EntropyMonitors": "entrotrain.integrations.loop",  # the monitors in a hand-written training loop
}
_SUBPACKAGES = (
    "callbacks", "dashboards", "functional", "integrations", "kernels", "models", "regularizers", "taps", "tasks",
)

__all__ = [
    "AttentionTap",
    "EntrotrainError",
    "TapError",
    "attention_entropy",
    "attention_entropy_from_probs",
    "attention_entropy_from_scores",
    "attention_entropy_stats",
    "entropy_from_logits",
    "entropy_from_probs",
    "record_attention",
]


__getattr__, __dir__ = lazy_attributes(__name__, globals(), _LAZY, _SUBPACKAGES)
