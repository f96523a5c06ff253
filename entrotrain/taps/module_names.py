"""Module names as the user wrote the model: without the segments that wrappers put into ``named_modules()``.

Four kinds of wrapper hold the user's module as a child and so add a segment to every name below them:

===================================  =========================  ====================================================
wrapper                              child (segment)            where it comes from
===================================  =========================  ====================================================
``OptimizedModule``                  ``_orig_mod``              ``torch.compile(model)`` (``model.compile()``, in
                                                                place, adds none)
``FullyShardedDataParallel``         ``_fsdp_wrapped_module``   FSDP1 (``torch.distributed.fsdp``, Lightning's
                                                                ``FSDPStrategy``), once per auto-wrapped module
``CheckpointWrapper`` /              ``_checkpoint_wrapped_     ``torch.distributed.algorithms._checkpoint.
``OffloadWrapper``                   module``                   checkpoint_wrapper``: ``checkpoint_wrapper``,
                                                                ``offload_wrapper``, ``apply_activation_
                                                                checkpointing`` (Lightning's
                                                                ``activation_checkpointing_policy``, FSDP1 and FSDP2)
``DistributedDataParallel`` /        ``module``                 a plain loop's ``DistributedDataParallel(model)``
``DataParallel``                                                (Lightning never wraps the LightningModule itself)
===================================  =========================  ====================================================

FSDP2 (``fully_shard``) adds no segment: it swaps the module's class in place (``FSDPBlock``), names unchanged.

So ``named_modules()`` of an FSDP1 model with checkpointed, compiled blocks yields
``_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module._checkpoint_wrapped_module._orig_mod.attn`` where the user wrote
``blocks.0.attn``. Every tap names its sites with :func:`clean_module_name` and walks modules with
:func:`named_modules`, so names (include / exclude globs included) and so the logged keys are the same with and
without these wrappers. Names are computed once, when a tap is armed or built, never inside a hook (hooks run inside
compiled graphs, where string work on module names would be traced).

Choices (stated):

* A wrapper is recognised by the name of its only child (:data:`WRAPPER_SEGMENTS`: those names are private to torch
  and chosen so as not to collide with user names), and DDP / DataParallel by class (their child ``module`` is a
  common user name, so it is never stripped from a string). Nothing from ``torch.distributed`` is imported.
* :func:`clean_module_name` drops *exact* segments only: ``my_fsdp_wrapped_module_x`` stays. It does not drop
  DDP's ``module`` (a string cannot tell it from a user's ``module``); :func:`named_modules` does, by class.
* :func:`named_modules` skips the wrappers themselves: the module inside takes the wrapper's clean name, so each name
  appears once and names the module whose ``forward`` runs (inside the compiled region, with FSDP1's parameters
  gathered, inside the checkpointed region). Under activation checkpointing that module's ``forward`` runs again
  in backward (the recomputation); taps ignore what runs inside backward (:func:`entrotrain.taps.exclusive.
  capture_allowed`), so a checkpointed module is captured once per forward, as without checkpointing.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

__all__ = [
    "COMPILE_WRAPPER_SEGMENT",
    "WRAPPER_SEGMENTS",
    "clean_module_name",
    "is_compile_wrapper",
    "is_compiled",
    "named_modules",
    "unwrap_module",
    "wrapped_module",
]

#: The child name under which ``torch.compile``'s ``OptimizedModule`` holds the original module.
COMPILE_WRAPPER_SEGMENT = "_orig_mod"

#: Child names under which a wrapper holds the user's module, stripped from every name (module docstring's table):
#: ``_orig_mod`` (``torch.compile``'s ``OptimizedModule``), ``_fsdp_wrapped_module`` (FSDP1's
#: ``FullyShardedDataParallel``), ``_checkpoint_wrapped_module`` (``CheckpointWrapper`` / ``OffloadWrapper`` of
#: ``torch.distributed.algorithms._checkpoint.checkpoint_wrapper``).
WRAPPER_SEGMENTS: tuple[str, ...] = (COMPILE_WRAPPER_SEGMENT, "_fsdp_wrapped_module", "_checkpoint_wrapped_module")

_SEGMENTS = frozenset(WRAPPER_SEGMENTS)


def clean_module_name(name: str) -> str:
    """``name`` without the wrapper segments :data:`WRAPPER_SEGMENTS` (exact segments only).

    ``"model._orig_mod.blocks.0"`` → ``"model.blocks.0"``; ``"blocks.0._fsdp_wrapped_module._checkpoint_wrapped_
    module.attn"`` → ``"blocks.0.attn"``; ``"_fsdp_wrapped_module"`` → ``""`` (the model itself);
    ``"my_fsdp_wrapped_module_x"`` unchanged."""
    if not any(segment in name for segment in WRAPPER_SEGMENTS):
        return name
    return ".".join(part for part in name.split(".") if part not in _SEGMENTS)


def is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is the ``OptimizedModule`` that ``torch.compile(model)`` returns (not the model inside)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(module, OptimizedModule)


def wrapped_module(module: nn.Module) -> nn.Module | None:
    """The module that ``module`` wraps (table in the module docstring), or ``None`` when it is no wrapper.

    A wrapper is a module whose only child is named by one of :data:`WRAPPER_SEGMENTS`, or a
    ``DistributedDataParallel`` / ``DataParallel`` (its ``.module``)."""
    children = module._modules
    if len(children) == 1:
        (name, child), = children.items()
        if name in _SEGMENTS and child is not None:
            return child
    if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return module.module
    return None


def unwrap_module(module: nn.Module) -> nn.Module:
    """The innermost module under nested wrappers (``module`` itself when it is none): the model the user wrote."""
    seen = {id(module)}
    inner = wrapped_module(module)
    while inner is not None and id(inner) not in seen:
        module = inner
        seen.add(id(module))
        inner = wrapped_module(module)
    return module


def named_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` (same order, each module once) with clean names and without the wrappers themselves.

    The module inside a wrapper takes the wrapper's clean name, so each name appears once and names the module
    whose ``forward`` runs. Hooks go on these modules: a hook on a compile wrapper would run outside the compiled
    region, one on an FSDP1 wrapper before its parameters are gathered."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:  # pre-order, children in definition order: as torch's named_modules
        prefix, module = stack.pop()
        while (inner := wrapped_module(module)) is not None and id(module) not in seen:
            seen.add(id(module))
            module = inner
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield prefix, module
        children = [(name, child) for name, child in module._modules.items() if child is not None]
        for name, child in reversed(children):
            stack.append((f"{prefix}.{name}" if prefix else name, child))


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs (partly) under ``torch.compile``: it holds an ``OptimizedModule`` (``torch.compile(m)``),
    a module compiled in place (``m.compile()``), or is a LightningModule that Lightning compiled
    (``trainer.fit(torch.compile(lit))``). A model called from a compiled function of the user's is not seen."""
    if getattr(model, "_compiler_ctx", None):
        return True
    return any(is_compile_wrapper(m) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
