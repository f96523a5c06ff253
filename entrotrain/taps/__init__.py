"""Capture from a live model: attention ``q, k, mask, scale``. Knows ``nn.Module``, nothing of Lightning."""

from entrotrain.taps.attention_tap import (
    AttentionAdapter,
    AttentionTap,
    MultiheadAttentionAdapter,
    record_attention,
)
from entrotrain.taps.hf import HFAttentionAdapter
from entrotrain.taps.nn_attention import mha_query_key

__all__ = [
    "AttentionAdapter",
    "AttentionTap",
    "HFAttentionAdapter",
    "MultiheadAttentionAdapter",
    "mha_query_key",
    "record_attention",
]
from entrotrain.taps.activation_tap import ActivationTap, Capture, activation_rows  # noqa: E402
from entrotrain.taps.reservoir import Reservoir  # noqa: E402

__all__ += ["ActivationTap", "Capture", "Reservoir", "activation_rows"]
from entrotrain.taps.router_tap import RouterTap, discover_routers, router_rows  # noqa: E402

__all__ += ["RouterTap", "discover_routers", "router_rows"]
from entrotrain.taps.exclusive import capture_allowed, exclusive_capture  # noqa: E402

__all__ += ["capture_allowed", "exclusive_capture"]
