"""The lifecycle every forward-hook tap shares: one hook per chosen module, installed by ``arm`` and removed by
``disarm`` (also on ``with`` exit and when installing fails half-way), so a disarmed tap holds no hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["ForwardHookTap"]

_T = TypeVar("_T", bound="ForwardHookTap")


class ForwardHookTap:
    """Base of :class:`~entrotrain.taps.ActivationTap` and :class:`~entrotrain.taps.RouterTap`.

    Subclasses set ``self.model`` and ``self._handles = []``, and provide ``names`` (the modules to hook, in order)
    and ``_hook(name)`` (the forward hook of one module).
    """

    model: nn.Module
    names: list[str]
    _handles: list[Any]

    def _hook(self, name: str) -> Callable[..., None]:
        raise NotImplementedError

    @property
    def armed(self) -> bool:
        return bool(self._handles)

    def arm(self: _T) -> _T:
        """Install one forward hook per chosen module (nothing when already armed)."""
        if self.armed:
            return self
        modules = dict(self.model.named_modules())
        try:
            for name in self.names:
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        except BaseException:
            self.disarm()
            raise
        return self

    def disarm(self) -> None:
        """Remove every hook. Safe to call twice, and after an exception."""
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()

    def __enter__(self: _T) -> _T:
        return self.arm()

    def __exit__(self, *exc: object) -> None:
        self.disarm()
