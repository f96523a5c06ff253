"""Forwards that no other tap sees: a monitor's own probe or generation forwards.

A monitor that runs extra forwards of the model (a held-out probe set, greedy generation, an information-plane
probe) does so while other monitors' taps may still be armed for the training step. Without care those taps would
score the extra forwards as if they were training data. Inside ``with exclusive_capture(*taps):`` every armed tap
that is not one of ``taps`` ignores what runs (attention calls, module outputs, router logits), so what each
monitor reports does not depend on the order of the callbacks.

    >>> with exclusive_capture(my_tap), torch.no_grad():
    ...     model(probe)          # only my_tap records; every other tap skips these calls

Nests: the innermost block decides. The state is process-wide (taps hook modules, which are process-wide too).

Backward is never data either: activation checkpointing (``torch.utils.checkpoint``, reentrant or not, HF
``gradient_checkpointing_enable()``, ``checkpoint_wrapper`` / ``offload_wrapper``, Lightning's
``activation_checkpointing_policy``) runs a region's forward a second time inside ``backward()`` to recompute what it
did not save. No tap records what runs inside a backward pass (:func:`in_backward`), so a checkpointed module is
captured once per forward, with the same values as without checkpointing. (Under ``torch.compile`` the
recomputation is part of the compiled backward and runs no hook.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["exclusive_capture", "capture_allowed", "in_backward", "training_forwards_only"]

#: Stack of the tap sets allowed by the enclosing ``exclusive_capture`` blocks (innermost last).
_ALLOWED: list[frozenset[int]] = []


@contextmanager
def exclusive_capture(*taps: object) -> Iterator[None]:
    """Within the block only ``taps`` record (none when called without arguments); every other tap skips."""
    _ALLOWED.append(frozenset(id(tap) for tap in taps))
    try:
        yield
    finally:
        _ALLOWED.pop()


#: The grad mode of each forward of a watched root model under way (:func:`training_forwards_only`), innermost last.
_ROOT_GRAD: list[bool] = []


def training_forwards_only(model: nn.Module) -> Callable[[], None]:
    """Until the returned function is called, taps record only inside forwards of ``model`` called with gradient
    enabled: the training forward of a step, not the no-grad forwards a trainer runs on the same model inside the
    same step (TRL's generation and rollout log-probs, an RL loop's sampling). Forward pre- and post-hooks on
    ``model``, its direct children (a LightningModule's ``training_step`` calls ``self.model(...)``) and every HF
    model inside it (a PEFT wrapper's generation) note the grad mode of each call, the outermost deciding (the taps'
    own work toggles grad, so it is read where the model is called): what a training forward runs without gradient
    (a frozen backbone under ``torch.no_grad()``, a child checkpointed with ``use_reentrant=True``) is part of it and
    recorded. ``EntropyTrainerCallback`` and ``EntropyMonitors`` use it for their capture windows. A compiled model
    gets no hooks (they would run inside its graph): there every forward of the window is recorded."""
    from entrotrain.taps.module_names import is_compiled

    if is_compiled(model):
        return lambda: None

    def pre(module: nn.Module, args: tuple) -> None:
        # a call inside a noted one is part of it (a frozen child under no_grad, a reentrant-checkpointed child)
        _ROOT_GRAD.append(_ROOT_GRAD[-1] if _ROOT_GRAD else torch.is_grad_enabled())

    def post(module: nn.Module, args: tuple, output: object) -> None:
        if _ROOT_GRAD:
            _ROOT_GRAD.pop()

    # the note is taken before every other pre-hook and dropped after the post-hooks registered before this call (the
    # taps': call it once they are armed), so their hooks on the model and its children see it too
    handles = [handle for module in _noted(model)
               for handle in (module.register_forward_pre_hook(pre, prepend=True),
                              module.register_forward_hook(post, always_call=True))]

    def remove() -> None:
        for handle in handles:
            handle.remove()
        _ROOT_GRAD.clear()

    return remove


def _noted(model: nn.Module) -> list[nn.Module]:
    """The modules whose calls :func:`training_forwards_only` notes: ``model``, its direct children, and every
    ``transformers`` model inside it (PEFT's ``PeftModelForCausalLM.generate`` calls the wrapped HF model's own
    ``generate``, whose forwards run neither the root nor a child)."""
    modeling = sys.modules.get("transformers.modeling_utils")  # loaded wherever an HF model exists: no import here
    pretrained = getattr(modeling, "PreTrainedModel", None)
    noted = [model, *model.children()]
    if pretrained is not None:
        noted += [m for m in model.modules() if isinstance(m, pretrained) and not any(m is n for n in noted)]
    return noted


def capture_allowed(tap: object) -> bool:
    """Whether ``tap`` may record now: outside any ``exclusive_capture`` block, or named by the innermost one, not
    inside a backward pass (activation checkpointing's recomputation: module docstring), and not inside a forward of
    a model watched with :func:`training_forwards_only` that was called (outermost) without gradient."""
    if _ALLOWED and id(tap) not in _ALLOWED[-1]:
        return False
    if _ROOT_GRAD and not _ROOT_GRAD[-1]:
        return False
    return torch.compiler.is_compiling() or not in_backward()


_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def in_backward() -> bool:
    """Whether the calling code runs inside an autograd backward pass (``torch._C._current_graph_task_id() != -1``,
    what ``torch.utils.checkpoint`` itself reads): a forward run there is activation checkpointing recomputing a
    region (reentrant: ``CheckpointFunction.backward``; non-reentrant: the unpack hook of a saved tensor). ``False``
    when torch cannot tell."""
    return _GRAPH_TASK_ID is not None and _GRAPH_TASK_ID() != -1
