"""Adapter for timm's ViT attention (``timm.layers.Attention``, used by ``timm.models.vision_transformer``).

timm decides at module construction (``use_fused_attn()``, env ``TIMM_FUSED_ATTN``) whether an ``Attention`` runs

- **fused**: ``F.scaled_dot_product_attention(q, k, v, attn_mask=..., is_causal=...)``. The tap's generic SDPA
  interception scores these calls (site = the ``Attention`` module's name); this adapter does nothing for them;
- **non-fused**: ``attn = (q * scale) @ kᵀ (+ mask)``, softmax, dropout: no function the tap can intercept. This
  adapter reads ``q`` and ``k`` where the module itself produces them, as the outputs of its ``q_norm`` / ``k_norm``
  (``nn.Identity`` unless ``qk_norm=True``: after the qkv projection and the optional norm, exactly what the scores
  are made of), through forward hooks, and the call's ``attn_mask`` / ``is_causal`` through a forward pre-hook.
  Nothing is recomputed (a σReparam or LoRA ``qkv`` runs once, as without the tap) and no output is touched.

Scored: ``softmax(scale·q·kᵀ + mask)`` with ``scale = module.scale``; ``is_causal`` takes precedence over
``attn_mask`` (as timm's ``resolve_self_attn_mask``); a boolean ``attn_mask`` is True = attend, a float one additive.
The decision is read at each call (``module.fused_attn``), so toggling it on a built model works.

Not covered: attention classes with rotary embeddings applied after ``q_norm``/``k_norm`` (``AttentionRope``,
EVA), differential attention, and timm's other attention families; their ``F.scaled_dot_product_attention`` calls,
if fused, are still captured generically. Pass ``classes=`` for other modules that follow the same contract.

The adapter is one of :func:`~entrotrain.taps.attention_tap.default_adapters` (so the monitor uses it); it does
nothing unless timm is imported.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from entrotrain.taps.exclusive import capture_allowed
from entrotrain.taps.module_names import named_modules

if TYPE_CHECKING:
    from entrotrain.taps.attention_tap import AttentionTap

__all__ = ["TimmAttentionAdapter", "timm_attention_classes"]

_CLASS_PATHS = ("timm.layers.attention", "timm.layers", "timm.models.vision_transformer")


def timm_attention_classes() -> tuple[type, ...]:
    """timm's ViT ``Attention`` class(es) of the imported timm (none when timm is not imported)."""
    if sys.modules.get("timm") is None:
        return ()
    found: list[type] = []
    for path in _CLASS_PATHS:
        cls = getattr(sys.modules.get(path), "Attention", None)
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls not in found:
            found.append(cls)
    return tuple(found)


def _call_masks(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """``(attn_mask, is_causal)`` of an ``Attention.forward(x, attn_mask=None, is_causal=False)`` call."""
    named = dict(kwargs)
    if len(args) > 1:
        try:
            named = {**inspect.signature(type(module).forward).bind_partial(module, *args).arguments, **kwargs}
        except (TypeError, ValueError):
            pass
    return named.get("attn_mask"), bool(named.get("is_causal") or False)


class TimmAttentionAdapter:
    """Captures timm ``Attention`` modules running non-fused (fused ones are captured through SDPA).

    Args:
        classes: the attention classes to watch; default :func:`timm_attention_classes`. Each must have ``q_norm``,
            ``k_norm`` (modules applied to ``q``, ``k`` of shape ``(B, H, N, head_dim)`` right before the scores),
            ``scale`` and ``fused_attn``.
    """

    def __init__(self, classes: Sequence[type] | None = None) -> None:
        self.classes = None if classes is None else tuple(classes)

    def install(self, tap: AttentionTap, model: nn.Module) -> list[Callable[[], None]]:
        classes = timm_attention_classes() if self.classes is None else self.classes
        if not classes:
            return []
        undo: list[Callable[[], None]] = []
        for name, module in named_modules(model):  # clean names (no wrapper segments), the modules that run
            if isinstance(module, classes) and tap.wants(name):
                undo.extend(self._watch(tap, name, module))
        return undo

    @staticmethod
    def _watch(tap: AttentionTap, name: str, module: nn.Module) -> list[Callable[[], None]]:
        call: dict[str, Any] = {}  # the running non-fused call: its masks, then its q

        def before(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            call.clear()
            if not getattr(mod, "fused_attn", False) and capture_allowed(tap):
                call["masks"] = _call_masks(mod, args, kwargs)

        def on_q(norm: nn.Module, args: tuple, output: Tensor) -> None:
            if "masks" in call:
                call["q"] = output

        def on_k(norm: nn.Module, args: tuple, output: Tensor) -> None:
            if "q" not in call:
                return
            attn_mask, is_causal = call.pop("masks")
            q = call.pop("q")
            with torch.set_grad_enabled(tap.differentiable and torch.is_grad_enabled()):
                tap.record(
                    q,
                    output,
                    name=tap._site_name(name),
                    attn_mask=None if is_causal else attn_mask,
                    is_causal=is_causal,
                    scale=float(module.scale),
                )

        def after(mod: nn.Module, args: tuple, output: Any) -> None:
            call.clear()

        return [
            module.register_forward_pre_hook(before, with_kwargs=True).remove,
            module.q_norm.register_forward_hook(on_q).remove,
            module.k_norm.register_forward_hook(on_k).remove,
            module.register_forward_hook(after, always_call=True).remove,
        ]
