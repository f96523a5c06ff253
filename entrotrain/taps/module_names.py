"""Module names as the user wrote the model: without the ``_orig_mod`` segments that ``torch.compile`` adds.

``torch.compile(model)`` returns an ``OptimizedModule`` that holds the model as its child ``_orig_mod``, so
``named_modules()`` of anything holding a compiled model yields ``model._orig_mod.blocks.0.attn`` where the user
wrote ``model.blocks.0.attn``. ``model.compile()`` (in place) adds no segment. Every tap names its sites with
:func:`clean_module_name` and walks modules with :func:`named_modules`, so the names (and so the logged keys) are the
same with and without compilation. Names are computed once, when a tap is armed or built, never inside a hook (hooks
run inside compiled graphs, where string work on module names would be traced).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = ["COMPILE_WRAPPER_SEGMENT", "clean_module_name", "is_compile_wrapper", "is_compiled", "named_modules"]

#: The child name under which ``torch.compile``'s ``OptimizedModule`` holds the original module.
COMPILE_WRAPPER_SEGMENT = "_orig_mod"


def clean_module_name(name: str) -> str:
    """``name`` without ``_orig_mod`` segments: ``"model._orig_mod.blocks.0"`` → ``"model.blocks.0"``,
    ``"_orig_mod"`` → ``""`` (the model itself)."""
    if COMPILE_WRAPPER_SEGMENT not in name:
        return name
    return ".".join(part for part in name.split(".") if part != COMPILE_WRAPPER_SEGMENT)


def is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the ``OptimizedModule`` that ``torch.compile(model)`` returns (not the model inside)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(module, OptimizedModule)


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` with clean names and without the compile wrappers themselves.

    The module inside a wrapper takes the wrapper's (clean) name, so each name appears once and names the module
    whose ``forward`` runs. Hooks go on these modules: a hook on the wrapper would run outside the compiled region.
    """
    for name, module in model.named_modules():
        if not is_compile_wrapper(module):
            yield clean_module_name(name), module


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs (partly) under ``torch.compile``: it holds an ``OptimizedModule`` (``torch.compile(m)``),
    a module compiled in place (``m.compile()``), or is a LightningModule that Lightning compiled
    (``trainer.fit(torch.compile(lit))``). A model called from a compiled function of the user's is not seen."""
    if getattr(model, "_compiler_ctx", None):
        return True
    return any(is_compile_wrapper(m) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
