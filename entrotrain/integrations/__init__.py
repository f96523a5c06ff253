"""Adapters to other trainers: your own training loop (``EntropyMonitors``), HF ``Trainer`` callbacks, TRL's
``GRPOTrainer`` and ``RLOOTrainer``, verl's policy-loss registry; and saved checkpoints (``entropy_snapshot``,
``entrotrain inspect``).

Thin glue over the same taps, functional maths and reductions as the Lightning callbacks, with the same keys. Their
packages are optional: ``import entrotrain.integrations`` imports none of them; each adapter is imported on first use.
"""

from __future__ import annotations

from typing import Any

from entrotrain.integrations.verl import make_verl_loss_fns, register_verl_losses

#: Public name → the submodule that defines it (imported on first access: transformers / trl are optional).
_LAZY = {
    "EntropyMonitors": "entrotrain.integrations.loop",
    "EntropyTrainerCallback": "entrotrain.integrations.transformers",
    "EntrotrainGRPOTrainer": "entrotrain.integrations.trl",
    "trl_grpo_loss": "entrotrain.integrations.trl",
    "EntrotrainRLOOTrainer": "entrotrain.integrations.trl_rloo",
    "PolicyStatsRecorder": "entrotrain.integrations.policy_stats",
    "entropy_snapshot": "entrotrain.integrations.snapshot",
    "EntropySnapshot": "entrotrain.integrations.snapshot",
}

__all__ = ["make_verl_loss_fns", "register_verl_losses", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'entrotrain.integrations' has no attribute {name!r}")
