"""Lightning callbacks: when to capture, how to reduce across steps and ranks, what to log, what to do on collapse."""

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor, attention_summary
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor, qk_spectral_norms

__all__ = [
    "AttentionEntropyMonitor",
    "EntropyCollapseGuard",
    "SigmaReparamMonitor",
    "attention_summary",
    "qk_spectral_norms",
]
