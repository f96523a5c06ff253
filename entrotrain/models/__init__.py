"""Small reference models used by entrotrain recipes."""

from entrotrain.models.attention_mil import AttentionMIL, MultiHeadAttentionPool
from entrotrain.models.tiny_gpt import TinyGPT
from entrotrain.models.tiny_vit import TinyViT

__all__ = ["AttentionMIL", "MultiHeadAttentionPool", "TinyGPT", "TinyViT"]
from entrotrain.models.mlp_classifier import MLPClassifier  # noqa: E402
from entrotrain.models.simsiam import SimSiam  # noqa: E402

__all__ += ["MLPClassifier", "SimSiam"]
from entrotrain.models.tiny_moe import MoELayer, TinyMoE  # noqa: E402

__all__ += ["MoELayer", "TinyMoE"]
from entrotrain.models.ib_mlp import IBMLP  # noqa: E402

__all__ += ["IBMLP"]
