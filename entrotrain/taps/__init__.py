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
from entrotrain.taps.name_filter import GLOB_SYNTAX, NameFilter  # noqa: E402
from entrotrain.taps.query_padding import query_padding  # noqa: E402
from entrotrain.taps.timm_attention import TimmAttentionAdapter  # noqa: E402
from entrotrain.taps.module_names import clean_module_name, is_compiled, named_modules  # noqa: E402

__all__ += [
    "GLOB_SYNTAX",
    "NameFilter",
    "TimmAttentionAdapter",
    "clean_module_name",
    "is_compiled",
    "named_modules",
    "query_padding",
]
