"""The lifecycle every forward-hook tap shares: one hook per chosen module, installed by ``arm`` and removed by
``disarm`` (also on ``with`` exit and when installing fails half-way), so a disarmed tap holds no hook.

Under ``torch.compile`` the hooks run inside the traced graph: there they only queue a detached copy of the output
(:mod:`entrotrain.taps.deferred`), which the subclass's capture receives, eagerly and in call order, when the tap
is disarmed (or at the next eager hook call). The same hook objects are installed at every arming, and on a compiled
model an :class:`~entrotrain.taps.deferred.ArmedMarker` mode is pushed while armed, so a compiled model compiles the
armed state once, not at every logging step, and never runs its unarmed graph while armed. Module names never
contain ``_orig_mod`` (:mod:`entrotrain.taps.module_names`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from entrotrain.taps.deferred import ArmedMarker, DeferredCaptures, compiling, remove_mode, snapshot
from entrotrain.taps.exclusive import capture_allowed
from entrotrain.taps.fastpath import FastpathHold
from entrotrain.taps.module_names import is_compiled, named_modules

__all__ = ["ForwardHookTap"]

_T = TypeVar("_T", bound="ForwardHookTap")
#: Queue entries of an HF model's forward starting (with its ``attention_mask``) and ending, replayed in call order
#: with the captures (not module names: those never hold a NUL).
_PUSH, _POP = "\0push-mask", "\0pop-mask"


class _ModeHandle:
    """Removes a pushed torch-function mode like a hook handle removes a hook."""

    def __init__(self, mode: ArmedMarker) -> None:
        self.mode = mode

    def remove(self) -> None:
        remove_mode(self.mode)


class _ClearMasks:
    """Forgets the HF model masks recorded for a tap, like a hook handle removes a hook."""

    def __init__(self, tap: Any) -> None:
        self.tap = tap

    def remove(self) -> None:
        from entrotrain.taps.query_padding import clear_model_masks

        clear_model_masks(self.tap)


class ForwardHookTap:
    """Base of :class:`~entrotrain.taps.ActivationTap` and :class:`~entrotrain.taps.RouterTap`.

    Subclasses set ``self.model`` and ``self._handles = []``, and provide ``names`` (the modules to hook, in order,
    as :func:`entrotrain.taps.module_names.named_modules` names them) and ``_hook(name)`` (the capture of one module,
    called as ``hook(module, args, output)``; a call queued by compiled code gets ``module=None, args=()``).
    Subclasses with ``differentiable = True`` get the output itself (graph kept), others a detached copy.
    """

    model: nn.Module
    names: list[str]
    _handles: list[Any]
    #: Record the 2-D ``attention_mask`` of every HF ``PreTrainedModel`` forward while armed, so that captures can
    #: leave padded token positions out (:func:`~entrotrain.taps.query_padding.ambient_token_mask`).
    watch_token_masks = False

    def _hook(self, name: str) -> Callable[..., None]:
        raise NotImplementedError

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self: _T) -> _T:
        """Install one forward hook per chosen module (nothing when already armed)."""
        if self.armed:
            return self
        modules = dict(named_modules(self.model))
        try:
            # torch's fused encoder paths would hand hooks nested tensors
            self._handles.append(FastpathHold(self.model))
            if self.watch_token_masks:
                self._handles.extend(self._mask_handles())
            for name in self.names:
                self._handles.append(modules[name].register_forward_hook(self._installed_hook(name)))
            if is_compiled(self.model):  # make the arming visible to dynamo's guards (module docstring)
                marker = self.__dict__.setdefault("_marker", ArmedMarker())
                marker.__enter__()
                self._handles.append(_ModeHandle(marker))
        except BaseException:
            self.disarm()
            raise
        return self

    def disarm(self) -> None:
        """Remove every hook (after handing over what compiled code queued). Safe to call twice, and after an
        exception."""
        try:
            self.replay_deferred()
        finally:
            self._queue().clear()
            handles, self._handles = self._handles, []
            for handle in handles:
                handle.remove()

    def _warn_misfit_once(self, name: str, message: str, stacklevel: int) -> None:
        """Warn ``message`` (a padding mask that does not fit module ``name``'s output) once per module and tap;
        ``stacklevel`` as the caller's own ``warnings.warn`` would take it."""
        warned = self.__dict__.setdefault("_warned_misfit", set())
        if name not in warned:
            warned.add(name)
            warnings.warn(message, stacklevel=stacklevel + 1)

    def replay_deferred(self) -> None:
        """Run the capture of every module call that compiled code queued, oldest first (no-op when none)."""
        from entrotrain.taps.query_padding import pop_model_mask, push_model_mask

        for name, output in self._queue().drain():
            if name == _PUSH:
                push_model_mask(self, *output)
            elif name == _POP:
                pop_model_mask(self)
            else:
                self._captures()[name](None, (), output)

    def _mask_handles(self) -> list[Any]:
        """Hooks on every HF ``PreTrainedModel`` inside the model recording its ``attention_mask`` while it runs
        (queued in call order under ``torch.compile``, as :mod:`entrotrain.taps.compiled_padding` does for attention);
        none when transformers is not imported."""
        from entrotrain.taps.query_padding import pretrained_model_class

        pretrained = pretrained_model_class()
        models = [m for m in self.model.modules() if isinstance(m, pretrained)] if pretrained is not None else []
        if not models:
            return []
        before, after, positions = self._mask_hooks()
        from entrotrain.taps.compiled_padding import _positions

        handles: list[Any] = [_ClearMasks(self)]
        for module in models:
            if type(module) not in positions:
                positions[type(module)] = _positions(type(module).forward)
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after))
        return handles

    def _mask_hooks(self) -> tuple[Callable[..., None], Callable[..., None], dict[type, dict[str, int]]]:
        """One pair of mask hooks per tap for its lifetime (dynamo guards on the hooks it traces)."""
        cached = self.__dict__.get("_mask_hook_fns")
        if cached is not None:
            return cached
        from entrotrain.taps.compiled_padding import call_mask
        from entrotrain.taps.query_padding import pop_model_mask, push_model_mask

        positions: dict[type, dict[str, int]] = {}
        queue = self._queue()

        def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            mask, with_cache = call_mask(positions, module, args, kwargs)
            if compiling():
                queue.add(_PUSH, (mask, with_cache))
            else:
                self.replay_deferred()
                push_model_mask(self, mask, with_cache)

        def after(module: nn.Module, args: tuple, output: Any) -> None:
            if compiling():
                queue.add(_POP, None)
            else:
                self.replay_deferred()
                pop_model_mask(self)

        self.__dict__["_mask_hook_fns"] = (before, after, positions)
        return before, after, positions

    def _queue(self) -> DeferredCaptures:
        queue = self.__dict__.get("_deferred")
        if queue is None:
            queue = self.__dict__["_deferred"] = DeferredCaptures()
        return queue

    def _captures(self) -> dict[str, Callable[..., None]]:
        return self.__dict__.setdefault("_capture_fns", {})

    def _installed_hook(self, name: str) -> Callable[..., None]:
        """The hook installed on module ``name``: one object per name for the tap's lifetime (dynamo guards on it)."""
        hooks = self.__dict__.setdefault("_installed_hooks", {})
        if name in hooks:
            return hooks[name]
        self._captures()[name] = capture = self._hook(name)
        queue = self._queue()

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if compiling():  # traced: queue a copy, captured eagerly later (no graph break)
                if capture_allowed(self):  # decided now: an exclusive_capture block is over when the queue is read
                    queue.add(name, output if getattr(self, "differentiable", False) else snapshot(output))
                return
            self.replay_deferred()
            capture(module, args, output)

        hook.__qualname__ = getattr(capture, "__qualname__", hook.__qualname__)  # names the tap class in hook listings
        hooks[name] = hook
        return hook

    def __enter__(self: _T) -> _T:
        return self.arm()

    def __exit__(self, *exc: object) -> None:
        self.disarm()
