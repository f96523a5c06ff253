"""Pure tensor maths: entropy of logits, probabilities and attention. No hooks, no Lightning, no logging."""

from entrotrain.functional.attention import (
    AttentionEntropy,
    AttentionPath,
    attention_entropy,
    attention_entropy_from_probs,
    attention_entropy_from_scores,
    attention_entropy_stats,
    normalized_entropy,
)
from entrotrain.functional.attention_masks import AttentionMask
from entrotrain.functional.entropy import entropy_from_logits, entropy_from_probs, row_entropy

__all__ = [
    "AttentionEntropy",
    "AttentionMask",
    "AttentionPath",
    "attention_entropy",
    "attention_entropy_from_probs",
    "attention_entropy_from_scores",
    "attention_entropy_stats",
    "entropy_from_logits",
    "entropy_from_probs",
    "normalized_entropy",
    "row_entropy",
]
