"""Lightning callbacks: when to capture, how to reduce across steps and ranks, what to log, what to do on collapse."""

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor, attention_summary
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard

__all__ = ["AttentionEntropyMonitor", "EntropyCollapseGuard", "attention_summary"]
