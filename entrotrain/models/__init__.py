"""Small reference models used by entrotrain recipes."""

from entrotrain.models.tiny_gpt import TinyGPT
from entrotrain.models.tiny_vit import TinyViT

__all__ = ["TinyGPT", "TinyViT"]
