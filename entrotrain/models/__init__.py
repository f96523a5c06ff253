"""Small reference models used by entrotrain recipes."""

from entrotrain.models.attention_mil import AttentionMIL, MultiHeadAttentionPool
from entrotrain.models.tiny_gpt import TinyGPT
from entrotrain.models.tiny_vit import TinyViT

__all__ = ["AttentionMIL", "MultiHeadAttentionPool", "TinyGPT", "TinyViT"]
