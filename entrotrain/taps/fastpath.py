"""torch's fused transformer inference paths are off while a tap is armed on a model that has them.

In eval mode, without gradient, ``nn.TransformerEncoderLayer`` may run as one fused op
(``torch._transformer_encoder_layer_fwd``: its ``self_attn`` is never *called*, so no module hook and no
``F.scaled_dot_product_attention`` interception sees it), and ``nn.TransformerEncoder`` given a
``src_key_padding_mask`` packs its input into a nested tensor (``torch._nested_tensor_from_mask``) that its layers,
their ``self_attn`` and every hook on them then receive. A tap cannot score the first and fails on the second (torch's
``RuntimeError`` from a nested tensor in a hook). torch already refuses the fused layer when a forward hook sits on
it or a torch-function mode is active, but not the nested packing, which only reads the global switch
``torch.backends.mha.get_fastpath_enabled()``.

So every tap, while armed on a model that holds an ``nn.TransformerEncoder`` or ``nn.TransformerEncoderLayer``,
holds that switch off (:class:`FastpathHold`, taken in ``AttentionTap.arm`` and ``ForwardHookTap.arm``, released with
their hooks). It is never touched otherwise: not by an unarmed tap, and not for a model without these modules (a
bare ``nn.MultiheadAttention`` runs its native fast path inside its own ``forward``, where the tap sees it). Inside an
``nn.MultiheadAttention`` call whose ``q, k`` the attention tap has just captured, the switch is back to its earlier
value (:func:`lift`), so the module computes as it does untapped. The switch is process-wide (as torch's is); holds
are counted, so several taps (a monitor's and a regulariser's, two sessions) armed at once and released in any order
restore, when the last one is released, the value the first hold found; taps release on every exit path (disarm,
which ``with`` and the callbacks run on exceptions too, and a half-failed arming). A switch the user turned off stays
off; one turned on by the user while held is left on.

What it changes: nothing in training (the fused paths are eval-only) and nothing while no tap is armed. An armed eval
forward runs torch's regular per-module path, as torch itself does when a forward hook sits on the layer (what the
attention tap's name hooks already caused) and ``use_nested_tensor`` is off: it differs from the fused path by float
rounding (measured on float32 encoders with outputs of magnitude <= 3.2: at most 4.9e-6), and at the padded positions
of ``nn.TransformerEncoder``'s output, which the nested path fills with 0 and the regular path computes (padding
either way). A torch without ``torch.backends.mha.set_fastpath_enabled`` (before 2.2) keeps its own rules.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

__all__ = ["FastpathHold", "has_fastpath_modules", "lift", "drop"]

_FUSED = (nn.TransformerEncoder, nn.TransformerEncoderLayer)
_MHA = getattr(torch.backends, "mha", None)
_GET = getattr(_MHA, "get_fastpath_enabled", None)
_SET = getattr(_MHA, "set_fastpath_enabled", None)

_LOCK = threading.Lock()
_holds = 0
_before: bool | None = None  # the switch's value when the first of the current holds was taken
_lifts = 0  # taps now inside an nn.MultiheadAttention call they captured (lift / drop)


def has_fastpath_modules(model: nn.Module) -> bool:
    """Whether ``model`` holds a module with a fused inference path that bypasses the modules a tap watches
    (``nn.TransformerEncoder`` / ``nn.TransformerEncoderLayer``, subclasses included)."""
    return any(isinstance(module, _FUSED) for module in model.modules())


class FastpathHold:
    """Holds the switch off while a tap is armed on ``model`` (module docstring); holds nothing when ``model`` has
    no module with a fused path, or torch has no switch. :meth:`remove` (also calling the object) releases it, once;
    later calls do nothing: taps release it with their hook handles, on every exit path."""

    def __init__(self, model: nn.Module) -> None:
        global _holds, _before
        self._held = False
        if _GET is None or _SET is None or not has_fastpath_modules(model):
            return
        with _LOCK:
            if _holds == 0:
                _before = bool(_GET())
                if _before:
                    _SET(False)
            _holds += 1
            self._held = True

    @property
    def held(self) -> bool:
        return self._held

    def remove(self) -> None:
        global _holds, _before, _lifts
        if not self._held:
            return
        with _LOCK:
            self._held = False
            _holds -= 1
            if _holds == 0:
                if _before and not _GET():  # a user's own True, set while held, is left alone
                    _SET(True)
                _before = None
                _lifts = 0

    __call__ = remove


def lift() -> None:
    """Inside an ``nn.MultiheadAttention`` call whose ``q, k`` a tap has just captured (its adapter's pre-hook): the
    switch is back to its value before the holds for the call's duration, so the module's own native fast path
    (``torch._native_multi_head_attention``, run inside its ``forward``, after the tap's hook) computes as without
    the tap. Counted; each ``lift`` is undone by one :func:`drop` (the adapter's post-hook, or the tap's release)."""
    global _lifts
    if _SET is None:
        return
    with _LOCK:
        _lifts += 1
        if _lifts == 1 and _holds and _before:
            _SET(True)


def drop() -> None:
    """Undo one :func:`lift`: the switch is held off again when no tap is inside a captured call."""
    global _lifts
    if _SET is None:
        return
    with _LOCK:
        if _lifts == 0:
            return
        _lifts -= 1
        if _lifts == 0 and _holds:
            _SET(False)
