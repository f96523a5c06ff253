"""Lightning callbacks: when to capture, how to reduce across steps and ranks, what to log, what to do on collapse."""

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor, attention_summary
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor, policy_entropy_summary
from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor, qk_spectral_norms

__all__ = [
    "AttentionEntropyMonitor",
    "EntropyCollapseGuard",
    "PolicyEntropyMonitor",
    "SigmaReparamMonitor",
    "attention_summary",
    "policy_entropy_summary",
    "qk_spectral_norms",
]
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor  # noqa: E402

__all__ += ["RepresentationEntropyMonitor"]
from entrotrain.callbacks.router_monitor import RouterEntropyMonitor  # noqa: E402

__all__ += ["RouterEntropyMonitor"]
from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor, prediction_entropy_summary  # noqa: E402

__all__ += ["PredictionEntropyMonitor", "prediction_entropy_summary"]
from entrotrain.callbacks.information_plane_monitor import InformationPlaneMonitor  # noqa: E402

__all__ += ["InformationPlaneMonitor"]
from entrotrain.callbacks.resume_with_changes import ResumeWithChanges  # noqa: E402

__all__ += ["ResumeWithChanges"]
from entrotrain.callbacks.checkpoint_keeper import KeptPin, list_pins, release_abandoned  # noqa: E402
from entrotrain.callbacks.rollback_state import RollbackState  # noqa: E402

__all__ += ["KeptPin", "RollbackState", "list_pins", "release_abandoned"]
