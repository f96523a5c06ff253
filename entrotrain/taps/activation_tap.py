"""Capture module outputs (activations) from a live model as ``(rows, features)`` matrices.

Forward hooks on the modules whose names match ``include`` globs (and no ``exclude`` glob). Hooks are installed by
:meth:`ActivationTap.arm` and removed by :meth:`ActivationTap.disarm` (also on ``with`` exit and on exception), so a
disarmed tap holds no hook and costs nothing. Captured tensors are detached copies: the model computes, bit for bit,
what it computes without the tap, and no RNG is touched (subsampling is evenly spaced, see
:mod:`entrotrain.taps.sampling`). With ``differentiable=True`` (for regularisers, e.g.
:class:`~entrotrain.regularizers.representation.MatrixEntropyRegularizer`) the captured rows keep the graph instead:
a loss on them backpropagates into the model; the forward values are still unchanged.

Outputs are turned into rows of features:

=======================  ================================================================================
``(B, C)``               one row per sample
``(B, T, C)``            one row per token (``max_tokens`` evenly spaced tokens of each sample)
``(B, C, H, W)``         one row per spatial position (``max_tokens`` evenly spaced of the ``H·W`` patches)
``(B, C, L)``            one row per position (``layout="channels_first"``, or a channels-first module below)
tuple / list             its ``output_index``-th element (default 0), then as above
=======================  ================================================================================

Under ``layout="auto"`` the module's type decides where its features are, whatever the number of dimensions:
convolutions, batch / instance / group norms and poolings (``nn.Conv1d``, ``nn.BatchNorm2d``, ``nn.MaxPool1d``, ...)
hold them in dim 1 (``(B, C, ...)``); ``nn.Linear``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.Embedding`` in the last
(``(B, ..., C)``). Any other module: 3-D outputs are read ``(B, T, C)``, 4-D ``(B, C, H, W)``; pass ``layout`` for
one whose output is laid out otherwise (a block returning ``(B, H, W, C)``, a 1-D CNN block returning ``(B, C, L)``).

``max_rows`` keeps evenly spaced samples of the batch first. Each capture also records the batch index of every row
(:attr:`Capture.sample`), so per-sample labels can be aligned with token rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from entrotrain._validation import check_bool, check_choice, check_int
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.taps.sampling import check_budget, evenly_spaced
from entrotrain.taps._forward_hooks import ForwardHookTap
from entrotrain.taps.exclusive import capture_allowed
from entrotrain.taps.module_names import named_modules
from entrotrain.taps.name_filter import GLOB_SYNTAX, NameFilter
from entrotrain.taps.query_padding import ambient_token_mask

__all__ = ["ActivationTap", "Capture", "activation_rows", "module_layout"]

Layout = Literal["auto", "channels_last", "channels_first"]


@dataclass
class Capture:
    """One module call: ``rows`` ``(n, d)`` detached activations and ``sample`` ``(n,)`` their batch indices."""

    rows: Tensor
    sample: Tensor


def _owned(rows: Tensor, output: Tensor) -> Tensor:
    """A copy when ``rows`` still views ``output``'s memory (a later in-place op, e.g. ``ReLU(inplace=True)``, must
    not change what was captured)."""
    if rows.untyped_storage().data_ptr() == output.untyped_storage().data_ptr():
        return rows.clone()
    return rows


def _pick(n: int, budget: int | None, device: torch.device) -> Tensor:
    idx = evenly_spaced(n, budget, device=device)
    return torch.arange(n, device=device) if idx is None else idx


#: Modules whose outputs hold their features in dim 1: ``(B, C, L)``, ``(B, C, H, W)``, ``(B, C, D, H, W)``.
_FEATURES_FIRST: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._LPPoolNd,
)
#: Modules whose outputs hold their features in the last dim: ``(B, ..., C)``.
_FEATURES_LAST: tuple[type, ...] = (nn.Linear, nn.Bilinear, nn.LayerNorm, nn.Embedding) + (
    (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
)


def module_layout(module: nn.Module | None, layout: Layout = "auto") -> Layout:
    """The layout to read ``module``'s output with: ``layout`` unless it is ``"auto"``; then ``"channels_first"`` for
    the modules that keep features in dim 1 (convolutions, batch / instance / group norms, poolings),
    ``"channels_last"`` for those that keep them last (``Linear``, ``LayerNorm``, ``RMSNorm``, ``Embedding``), and
    ``"auto"`` (3-D = ``(B, T, C)``, 4-D = ``(B, C, H, W)``) for any other module."""
    if layout != "auto":
        return layout
    if isinstance(module, _FEATURES_FIRST):
        return "channels_first"
    if isinstance(module, _FEATURES_LAST):
        return "channels_last"
    return "auto"


def activation_rows(
    output: Any,
    *,
    name: str = "module",
    max_rows: int | None = None,
    max_tokens: int | None = None,
    output_index: int = 0,
    layout: Layout = "auto",
    detach: bool = True,
    token_mask: Tensor | None = None,
) -> Capture:
    """Turn a module output into a :class:`Capture` of detached ``(rows, features)`` activations.

    Args:
        output: a tensor ``(B, C)``, ``(B, T, C)``, ``(B, C, H, W)``, or a tuple/list holding one.
        name: module name for error messages.
        max_rows: keep at most this many samples of the batch (evenly spaced); ``None`` = all.
        max_tokens: keep at most this many tokens / spatial positions per sample (evenly spaced); ``None`` = all.
        output_index: which element of a tuple/list output to read.
        layout: ``"auto"`` treats 3-D outputs as ``(B, T, C)`` and 4-D as ``(B, C, H, W)``; ``"channels_last"``
            treats every ``(B, ..., C)`` as tokens × channels; ``"channels_first"`` every ``(B, C, ...)``.
        detach: ``False`` keeps the graph (the rows are a differentiable function of ``output``).
        token_mask: ``(B, T)`` bool, True = a real token, for a ``(B, T, C)`` output read channels-last: padded
            positions are left out (after the evenly spaced ``max_rows`` / ``max_tokens`` pick, so the same positions
            are taken at every step; a heavily padded batch gives fewer rows). Ignored for other shapes.

    Raises:
        TapError: the output (or its chosen element) is not a floating tensor of 2 to 4 dimensions.
    """
    check_budget(max_rows, "max_rows")
    check_budget(max_tokens, "max_tokens")
    check_int(output_index, "output_index")
    check_choice(layout, "layout", ("auto", "channels_last", "channels_first"))
    check_bool(detach, "detach")
    if isinstance(output, (tuple, list)):
        if not -len(output) <= output_index < len(output):
            raise TapError(
                f"module {name!r} returned a {type(output).__name__} of {len(output)} elements; output_index="
                f"{output_index} is out of range. Pick the element holding the activations with output_index."
            )
        output = output[output_index]
    if not isinstance(output, Tensor):
        raise TapError(
            f"module {name!r} returned {type(output).__name__}, not a tensor: its activations cannot be captured. "
            "Exclude it (exclude=[...]) or include the submodule that produces the representation."
        )
    if not output.is_floating_point() or not 2 <= output.dim() <= 4:
        raise TapError(
            f"module {name!r} returned a {output.dtype} tensor of shape {tuple(output.shape)}; activations must be a "
            "floating tensor (B, C), (B, T, C) or (B, C, H, W). Exclude it or include another module."
        )
    x = output.detach() if detach else output
    b = x.shape[0]
    keep = _pick(b, max_rows, x.device)
    x = x.index_select(0, keep) if len(keep) < b else x
    if x.dim() == 2:
        return Capture(_owned(x, output), keep)
    channels_first = layout == "channels_first" or (layout == "auto" and x.dim() == 4)
    if channels_first:
        x = x.flatten(2).transpose(1, 2)  # (B, C, ...) -> (B, P, C)
    else:
        x = x.flatten(1, -2)  # (B, ..., C) -> (B, T, C)
    full_tokens = x.shape[1]
    tokens = _pick(full_tokens, max_tokens, x.device)
    if len(tokens) < x.shape[1]:
        x = x.index_select(1, tokens)
    sample = keep.repeat_interleave(x.shape[1])
    x = x.reshape(-1, x.shape[-1])
    if token_mask is not None and not channels_first and tuple(token_mask.shape) == (b, full_tokens):
        real = token_mask.to(x.device).index_select(0, keep).index_select(1, tokens).reshape(-1)
        x, sample = x[real], sample[real]
    return Capture(_owned(x, output), sample)



class ActivationTap(ForwardHookTap):
    """Detached (or, with ``differentiable=True``, graph-keeping) activations of the modules of ``model`` chosen by
    name glob, while armed.

    Args:
        model: the module to watch (names are relative to it, as in ``model.named_modules()``).
        include: glob patterns of module names (``"encoder.*"``, ``"model.layers.1"``); ``"*"`` = every module that
            is not a bare container (``ModuleList``/``ModuleDict``) and not ``model`` itself.
        exclude: glob patterns of module names to skip.
        max_rows: samples of each batch kept per call (evenly spaced); ``None`` = all.
        max_tokens: tokens / spatial positions kept per sample (evenly spaced); ``None`` = all.
        output_index: element read from tuple/list outputs.
        layout: how 3-D/4-D outputs are read (see :func:`activation_rows`); ``"auto"`` first asks the module's type
            (:func:`module_layout`: a ``Conv1d``'s ``(B, C, L)`` is read channels-first, a ``Linear``'s
            ``(B, H, W, C)`` channels-last).
        on_capture: called as ``on_capture(name, capture)`` for every captured call instead of storing it in
            :attr:`captures` (e.g. to stream into an accumulator and keep no tensor).
        differentiable: keep the graph of the captured rows (for a regulariser's loss) instead of detaching them.
            Default ``False``: monitors must never hold the graph. Under ``torch.no_grad`` there is no graph to keep.

    Raises:
        EntrotrainError: bad arguments, or no module matches ``include``/``exclude`` (the message lists the names).

    Example:
        >>> tap = ActivationTap(model, include=["encoder.*"], max_tokens=16)
        >>> with tap:                           # hooks installed inside, removed on exit or exception
        ...     model(x)
        >>> tap.captures["encoder.2"][0].rows   # (n, d), detached
    """

    watch_token_masks = True  # padded token positions of HF models / query_padding blocks are left out

    def __init__(
        self,
        model: nn.Module,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        max_rows: int | None = None,
        max_tokens: int | None = None,
        output_index: int = 0,
        layout: Layout = "auto",
        on_capture: Callable[[str, Capture], None] | None = None,
        differentiable: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise EntrotrainError(f"ActivationTap needs an nn.Module, got {type(model).__name__}.")
        check_choice(layout, "layout", ("auto", "channels_last", "channels_first"))
        check_int(output_index, "output_index")
        if on_capture is not None and not callable(on_capture):
            raise EntrotrainError(
                f"on_capture must be None or a callable on_capture(name, capture), got {type(on_capture).__name__}."
            )
        self.model = model
        self._names = NameFilter(include, exclude)
        self.include, self.exclude = self._names.include, self._names.exclude
        self.max_rows = check_budget(max_rows, "max_rows")
        self.max_tokens = check_budget(max_tokens, "max_tokens")
        self.output_index = output_index
        self.layout = layout
        self.on_capture = on_capture
        self.differentiable = check_bool(differentiable, "differentiable")
        self.captures: dict[str, list[Capture]] = {}
        self._handles: list[Any] = []
        self._grad_at_arming, self._warned_no_grad = True, False  # set at each arming
        self.names = self._match()

    def _match(self) -> list[str]:
        candidates = [  # no "_orig_mod." segments from torch.compile
            name
            for name, module in named_modules(self.model)
            if name and not isinstance(module, (nn.ModuleList, nn.ModuleDict))
        ]
        names = [name for name in candidates if self._names(name)]
        self._names.broad_match_warning(candidates, owner=type(self).__name__, stacklevel=4)
        if not names:
            available = [name for name, _ in named_modules(self.model) if name]
            raise EntrotrainError(
                f"no module of {type(self.model).__name__} matches include={self.include} exclude={self.exclude}. "
                f"Module names are: {available[:24]}{' ...' if len(available) > 24 else ''}. Fix the glob patterns "
                f"({GLOB_SYNTAX})."
            )
        return names

    # ------------------------------------------------------------------ lifecycle (arm, disarm, with: ForwardHookTap)
    def reset(self) -> None:
        """Forget stored captures."""
        self.captures = {}

    def arm(self) -> ActivationTap:
        """Install the hooks (see :class:`~entrotrain.taps._forward_hooks.ForwardHookTap`); notes whether gradients
        are on, so a differentiable capture that runs with them off (reentrant checkpointing) is warned about."""
        if not self.armed:
            self._grad_at_arming, self._warned_no_grad = torch.is_grad_enabled(), False
        return super().arm()

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not capture_allowed(self):
                return
            if self.differentiable and module is not None and not torch.is_grad_enabled() and self._grad_at_arming:
                self._warn_no_grad(name)
            layout = module_layout(module, self.layout)
            kwargs = dict(
                name=name,
                max_rows=self.max_rows,
                max_tokens=self.max_tokens,
                output_index=self.output_index,
                layout=layout,
                token_mask=self._token_mask(name, output, layout),
            )
            if self.differentiable:
                capture = activation_rows(output, detach=False, **kwargs)
            else:
                with torch.no_grad():
                    capture = activation_rows(output, **kwargs)
            if self.on_capture is not None:
                self.on_capture(name, capture)
            else:
                self.captures.setdefault(name, []).append(capture)

        return hook

    def _token_mask(self, name: str, output: Any, layout: Layout) -> Tensor | None:
        """The real positions ``(B, T)`` of a ``(B, T, C)`` output (see :mod:`entrotrain.taps.query_padding`): the
        ``attention_mask`` of the HF model running ``name``, else a ``query_padding`` block; ``None`` = all real. A
        mask that does not fit the output keeps every position, warned once per module."""
        if isinstance(output, (tuple, list)) and -len(output) <= self.output_index < len(output):
            output = output[self.output_index]
        if not isinstance(output, Tensor) or output.dim() != 3 or layout == "channels_first":
            return None
        mask, misfit = ambient_token_mask(self, output.shape[0], output.shape[1], output.device)
        if misfit is not None:
            self._warn_misfit_once(
                name,
                f"ActivationTap: the padding mask of shape {misfit} does not fit the output of {name!r} of shape "
                f"{tuple(output.shape)}; all its positions are kept. Hand a mask of that shape over with a "
                "query_padding(...) block, or exclude the module.",
                stacklevel=4,
            )
        return mask

    def _warn_no_grad(self, name: str) -> None:
        if self._warned_no_grad:
            return
        self._warned_no_grad = True
        warnings.warn(
            f"ActivationTap(differentiable=True): module {name!r} ran with gradients off inside a forward armed with "
            "them on, so a regulariser gets no gradient from it. This is what reentrant activation checkpointing "
            "does (torch.utils.checkpoint(..., use_reentrant=True), or HF gradient_checkpointing_enable() with "
            "use_reentrant=True): use use_reentrant=False.",
            stacklevel=4,
        )

    def rows(self, name: str) -> Tensor:
        """All stored rows of module ``name``, concatenated in call order ``(n, d)``."""
        if name not in self.captures:
            raise TapError(f"nothing captured for {name!r}; captured: {sorted(self.captures)}. Arm the tap first.")
        return torch.cat([c.rows for c in self.captures[name]])
