"""Small reference models used by entrotrain recipes."""

from entrotrain.models.tiny_gpt import TinyGPT

__all__ = ["TinyGPT"]
