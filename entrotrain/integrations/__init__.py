"""Adapters that plug entrotrain's losses into other RL trainers (imported lazily; their packages are optional)."""

from entrotrain.integrations.verl import make_verl_loss_fns, register_verl_losses

__all__ = ["make_verl_loss_fns", "register_verl_losses"]
