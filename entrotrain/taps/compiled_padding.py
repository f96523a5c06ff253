"""The padding rule of :mod:`entrotrain.taps.query_padding` for compiled HF models.

A compiled HF model's attention is captured at ``F.scaled_dot_product_attention`` (the HF adapter's registry
switch and frame inspection cannot run inside a graph), and scored after the graph has run. The real query positions
come, as for an uncompiled model, from the 2-D ``attention_mask`` handed to each HF ``PreTrainedModel``'s forward:
:class:`CompiledHFMasks` hooks every one of them and, inside the traced graph, only queues ``("push", mask)`` /
``("pop",)`` events in the tap's queue, in call order with the attention calls; the tap replays them eagerly, so each
attention call is scored with the mask of the HF model that was running it. A ``with query_padding(mask):`` block
around the compiled forward is recorded with each queued call the same way (see ``AttentionTap._defer_sdpa``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from torch import nn

from entrotrain.taps.deferred import compiling
from entrotrain.taps.query_padding import clear_model_masks, pop_model_mask, pretrained_model_class, push_model_mask

if TYPE_CHECKING:
    from entrotrain.taps.attention_tap import AttentionTap

__all__ = ["CompiledHFMasks"]

_CACHE_ARGS = ("past_key_values", "cache")


def _positions(forward: Callable[..., Any]) -> dict[str, int]:
    """Positional index (after ``self``) of ``attention_mask`` and the cache arguments in ``forward``'s signature."""
    try:
        params = list(inspect.signature(forward).parameters)[1:]
    except (TypeError, ValueError):
        return {}
    return {name: i for i, name in enumerate(params) if name in ("attention_mask", *_CACHE_ARGS)}


class CompiledHFMasks:
    """Adapter installed instead of :class:`~entrotrain.taps.hf.HFAttentionAdapter` on compiled models: it records
    each HF (sub)model's ``attention_mask`` for the padding rule and captures nothing itself."""

    def install(self, tap: AttentionTap, model: nn.Module) -> list[Callable[[], None]]:
        pretrained = pretrained_model_class()
        models = [m for m in model.modules() if isinstance(m, pretrained)] if pretrained is not None else []
        if not models:
            return []
        before, after, positions = _hooks(tap)
        undo: list[Callable[[], None]] = [lambda: clear_model_masks(tap)]
        for module in models:
            if type(module) not in positions:  # where attention_mask / the cache sit when passed positionally
                positions[type(module)] = _positions(type(module).forward)
            undo.append(module.register_forward_pre_hook(before, with_kwargs=True).remove)
            undo.append(module.register_forward_hook(after).remove)  # no always_call: its ids enter the guards
        return undo


def call_mask(
    positions: dict[type, dict[str, int]], module: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> tuple[Any, bool]:
    """The ``attention_mask`` an HF model's forward was called with (``None``: none) and whether it was given a cache,
    from its keyword or positional arguments (``positions``: :func:`_positions` of each model class's forward)."""
    def argument(name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        index = positions.get(type(module), {}).get(name)
        return args[index] if index is not None and index < len(args) else None

    return argument("attention_mask"), any(argument(name) is not None for name in _CACHE_ARGS)


def _hooks(tap: AttentionTap) -> tuple[Callable[..., None], Callable[..., None], dict[type, dict[str, int]]]:
    """One pair of hook objects per tap, the same at every arming (dynamo guards on the hooks it traces)."""
    cached = tap.__dict__.get("_compiled_mask_hooks")
    if cached is not None:
        return cached
    positions: dict[type, dict[str, int]] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask, with_cache = call_mask(positions, module, args, kwargs)
        # no tensor op here (not even detach: a mask has no graph): dynamo compiles a hook that runs eagerly under a
        # compiled call as a frame of its own, and a tensor op would make that frame a graph, one compile more
        if compiling():
            tap._deferred.add("push", None, None, (mask, with_cache), None)
        else:
            tap._replay_deferred()
            push_model_mask(tap, mask, with_cache)

    def after(module: nn.Module, args: tuple, output: Any) -> None:
        if compiling():
            tap._deferred.add("pop", None, None, (), None)
        else:
            tap._replay_deferred()
            pop_model_mask(tap)

    tap.__dict__["_compiled_mask_hooks"] = (before, after, positions)
    return before, after, positions
