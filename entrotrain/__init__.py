"""entrotrain: entropy as a first-class training signal.

Callbacks (:mod:`entrotrain.callbacks`) watch attention, RL policy and representation entropy live in a Lightning
``Trainer``; the maths lives in
:mod:`entrotrain.functional`, the capture in :mod:`entrotrain.taps`. Importing entrotrain never imports wandb.
"""

from entrotrain.errors import EntrotrainError, TapError
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


def __getattr__(name: str):
    """Lazy access to the Lightning callbacks, so ``import entrotrain`` stays light."""
    if name in (
        "AttentionEntropyMonitor",
        "EntropyCollapseGuard",
        "PolicyEntropyMonitor",
        "RepresentationEntropyMonitor",
        "SigmaReparamMonitor",
    ):
        from entrotrain import callbacks

        return getattr(callbacks, name)
    raise AttributeError(f"module 'entrotrain' has no attribute {name!r}")
