"""Adapter for HF transformers models: capture ``q, k, mask, scale`` at the attention function, without touching the model.

In transformers versions with ``masking_utils.AttentionMaskInterface`` (tested with 5.25), every attention layer calls
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)(module, query, key,
value, attention_mask, scaling=..., dropout=..., **kw)`` with ``query`` ``(B, H, N, D)`` after RoPE and ``key``
``(B, H_kv, S, D)`` before ``repeat_kv``. While a tap is armed, :class:`HFAttentionAdapter` hands each such call's
``q, k, mask, scale`` to the tap, then calls what the model would have called and returns its result untouched, so
outputs are bit for bit those of the untapped model. How, per implementation:

- ``sdpa``: each ``sdpa`` config of the tapped model is switched to ``entrotrain_sdpa``, a registered attention
  function that records and calls the registered ``sdpa`` (the model file's own registry when it overrides it), with
  a mask function that *is* the original one (without a registered mask function transformers passes ``mask=None``
  and causality is silently lost). Disarming restores each config's implementation exactly.
- ``eager``: the implementation is *not* renamed (model code such as GPT-2's ``using_eager =
  config._attn_implementation == "eager"`` must keep its branch). Instead the eager functions of the python modules
  defining the model's classes (the ``default`` of their ``get_interface(impl, default)`` calls, and
  ``eager_attention_forward``) are replaced in those modules' globals by a wrapper that records and calls the
  original; model code looks the name up at call time. Methods that compute the same ``softmax(scale·q·kᵀ + mask)``
  themselves on the eager path are wrapped on their class: GPT-2 / DecisionTransformer's
  ``_upcast_and_reordered_attn`` (``reorder_and_upcast_attn=True``, scale ``module.scaling``). Wrappers are shared
  by the armed taps (reference-counted) and put back when the last one disarms, on every exit path; an untapped
  model of the same file running meanwhile is not scored (the tap checks that the call runs inside its model).

What is recorded mirrors what the original function computes:

- ``sdpa``: the mask as passed (boolean, True = attend); a ``None`` mask means ``is_causal`` when the module is
  causal (``module.is_causal`` or an ``is_causal=`` argument) and there is more than one query, as
  ``sdpa_attention_forward`` decides; ``position_bias`` (T5-style) becomes an additive mask.
- ``eager``: the additive mask as passed (``finfo.min`` entries count as masked); ``None`` means no mask.
- Grouped-query attention: ``key`` keeps its ``H_kv`` heads; query head ``h`` is scored against key head
  ``h // (H / H_kv)``, which is what ``repeat_kv`` builds (each key head repeated ``H / H_kv`` times in a row).
- Padded queries: each ``PreTrainedModel`` in the tapped model reports the 2-D ``attention_mask`` of its forward to the
  tap while it runs (a forward pre-hook), and queries that it marks as padding are not scored (decoder stacks get
  ``decoder_attention_mask``; with a KV cache the last ``N`` positions; see :mod:`entrotrain.taps.query_padding`).

Not captured (checked against transformers 5.25's model files):

- calls whose scores are not ``scale·q·kᵀ + mask``: ``softcap`` (Gemma 2), attention sinks (gpt-oss), sparse
  ``indices`` (DeepSeek-V3.2-style indexers), relative position embeddings passed to the function, a paged cache:
  a warning names the site;
- implementations other than ``sdpa`` / ``eager`` (``flash_attention_*``, ``flex_attention``, ``paged|*``): a warning
  names the fix, ``model.set_attn_implementation("sdpa")``; their ``F.scaled_dot_product_attention`` calls, if any, are
  still seen by the tap's generic interception;
- ``sdpa`` models whose code branches on ``_attn_implementation == "sdpa"`` (Gemma 4, GLM-5 Next) are not switched
  (a warning says so): their ``F.scaled_dot_product_attention`` calls are captured by the generic interception;
- models whose attention does not go through the registry (``_can_set_attn_implementation()`` false, e.g.
  ImageGPT's own ``_attn``): only their ``F.scaled_dot_product_attention`` calls, if any, are seen;
- the ``timm`` models wrapped by ``TimmWrapperModel`` are timm's own attention: see
  :mod:`entrotrain.taps.timm_attention`.

This module imports transformers only when a tap is armed and transformers is already imported.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from entrotrain.errors import TapError
from entrotrain.taps.exclusive import capture_allowed
from entrotrain.taps.module_names import named_modules
from entrotrain.taps.query_padding import clear_model_masks, pop_model_mask, pretrained_model_class, push_model_mask

if TYPE_CHECKING:
    from entrotrain.taps.attention_tap import AttentionTap

__all__ = ["HFAttentionAdapter", "SUPPORTED_IMPLEMENTATIONS", "hf_attention_implementations", "wrapped_name"]

#: The HF attention implementations the adapter wraps.
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")
_PREFIX = "entrotrain_"
#: Attention-function arguments that change the scores in a way ``scale·q·kᵀ + mask`` cannot express.
_UNSCORABLE_ARGS = ("softcap", "s_aux", "sinks", "indices", "block_indices", "relative_position_embeddings")

_TAPS: list[AttentionTap] = []  # taps armed with this adapter installed, in arming order
_CALLERS: dict[CodeType, tuple[str, str]] = {}  # caller code -> (interface variable, eager default function name)
_FACTS: dict[str, tuple[frozenset[str], frozenset[str]]] = {}  # python module -> (compared names, eager functions)
_PATCHES: dict[tuple[int, str], _Patch] = {}  # (id(owner), attribute) -> what the armed taps hold installed there
_SIGNATURES: dict[Any, inspect.Signature | None] = {}
_ORIGINAL = "__entrotrain_original__"  # attribute of a wrapper: the function it wraps
#: Methods that compute ``softmax(scale·q·kᵀ + mask)`` themselves on the ``eager`` path (GPT-2's
#: ``reorder_and_upcast_attn=True``): ``(self, query, key, value, attention_mask=None)``.
_EAGER_METHODS = ("_upcast_and_reordered_attn",)
_REGISTRY: dict[str, Any] = {}  # transformers' ALL_ATTENTION_FUNCTIONS and AttentionInterface, set by _register
_COMPARISON = re.compile(r"_attn_implementation\s*(?:==|!=|\bnot\s+in\b|\bin\b)([^\n]*)")
_QUOTED = re.compile(r"""["']([\w|:/.-]+)["']""")
_GET_INTERFACE = re.compile(r"(\w+)\s*\.\s*get_interface\(\s*[^,()]+,\s*(\w+)\s*\)")


def wrapped_name(implementation: str) -> str:
    """The registry name an armed tap switches ``implementation`` to (``"sdpa"`` → ``"entrotrain_sdpa"``)."""
    return _PREFIX + implementation


# ---------------------------------------------------------------------------------------------------------- registry
def _transformers_api() -> Any | None:
    """The registry objects of the imported transformers, or ``None`` for older versions without them."""
    try:
        from transformers import masking_utils, modeling_utils
    except ImportError:
        return None
    needed = (
        (modeling_utils, "PreTrainedModel"),
        (modeling_utils, "AttentionInterface"),
        (modeling_utils, "ALL_ATTENTION_FUNCTIONS"),
        (masking_utils, "AttentionMaskInterface"),
        (masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS"),
    )
    if not all(hasattr(module, name) for module, name in needed):
        return None
    return modeling_utils, masking_utils


def _register(api: Any) -> None:
    modeling_utils, masking_utils = api
    attention, masks = modeling_utils.AttentionInterface, masking_utils.AttentionMaskInterface
    _REGISTRY.update(functions=modeling_utils.ALL_ATTENTION_FUNCTIONS, interface=attention)
    for implementation in SUPPORTED_IMPLEMENTATIONS:
        name = wrapped_name(implementation)
        if name not in attention._global_mapping:
            attention.register(name, _attention_function(implementation))
        if name not in masks._global_mapping:
            masks.register(name, _mask_function(implementation, masking_utils.ALL_MASK_ATTENTION_FUNCTIONS))


def _mask_function(implementation: str, registry: Any) -> Callable[..., Any]:
    def entrotrain_mask(*args: Any, **kwargs: Any) -> Any:
        return registry[implementation](*args, **kwargs)

    entrotrain_mask.__name__ = f"entrotrain_{implementation}_mask"
    return entrotrain_mask


def _attention_function(implementation: str) -> Callable[..., Any]:
    def entrotrain_attention(
        module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, *args: Any, **kwargs: Any
    ) -> Any:
        original = _original_function(implementation, module, sys._getframe(1))
        if _TAPS:
            _record_call(
                implementation, module, query, key, attention_mask, lambda: _named_arguments(original, args, kwargs)
            )
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    entrotrain_attention.__name__ = f"entrotrain_{implementation}_attention"
    return entrotrain_attention


def _caller_names(code: CodeType) -> tuple[str, str]:
    """``(interface, default)`` of the ``interface.get_interface(impl, default)`` call in the calling function."""
    names = _CALLERS.get(code)
    if names is None:
        try:
            source = inspect.getsource(code)
        except (OSError, TypeError):
            source = ""
        match = _GET_INTERFACE.search(source)
        names = (match.group(1), match.group(2)) if match else ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")
        _CALLERS[code] = names
    return names


def _original_function(implementation: str, module: nn.Module, caller: FrameType) -> Callable[..., Any]:
    """The function the model would have called: its file's eager default, or its registry's entry."""
    interface_name, default_name = _caller_names(caller.f_code)
    namespace = caller.f_globals
    if implementation == "eager":
        function = namespace.get(default_name)
        function = getattr(function, _ORIGINAL, function)  # the global may be our wrapper while a tap is armed
        if not callable(function):
            function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if not callable(function):
            raise TapError(
                f"AttentionTap could not find the eager attention function of {type(module).__name__} (looked for "
                f"{default_name!r} where it calls the attention interface). Use attn_implementation='sdpa' while "
                "tapping, or exclude this module from the tap."
            )
        return function
    registry = namespace.get(interface_name)  # the model file's registry (it may override entries locally)
    if not isinstance(registry, _REGISTRY["interface"]):
        registry = _REGISTRY["functions"]
    return registry[implementation]


# ---------------------------------------------------------------------------------------------------------- capture
def _named_arguments(function: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments by name (``scaling``, ``is_causal``, ...), positional ones included."""
    if not args:
        return kwargs
    try:
        signature = inspect.signature(function)
        bound = signature.bind_partial(None, None, None, None, None, *args, **kwargs).arguments
    except (TypeError, ValueError):
        return kwargs
    named: dict[str, Any] = {}
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


def _with_position_bias(bias: Tensor, mask: Tensor | None, is_causal: bool, n_q: int, n_k: int) -> Tensor:
    """One additive mask: ``bias`` where a key is attended, ``-inf`` where it is masked."""
    valid: Tensor | None = None
    if is_causal:
        rows = torch.arange(n_q, device=bias.device)[:, None]
        valid = rows >= torch.arange(n_k, device=bias.device)[None, :]
    elif mask is not None and mask.dtype == torch.bool:
        valid = mask
    elif mask is not None:
        valid = mask > torch.finfo(mask.dtype).min
        bias = bias + torch.where(valid, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    if valid is None:
        return bias
    return torch.where(valid, bias, torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device))


def _scored_inputs(
    implementation: str, module: nn.Module, query: Tensor, key: Tensor, mask: Any, call: dict[str, Any]
) -> dict[str, Any] | str:
    """What the original function scores, as :meth:`AttentionTap.record` arguments; a reason string if unscorable."""
    for name in _UNSCORABLE_ARGS:
        if call.get(name) is not None:
            return f"the call passes `{name}`"
    if getattr(module, "sinks", None) is not None:
        return "the module has attention sinks"
    if call.get("cache") is not None:
        return "the call uses a paged cache"
    if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.dim() != 4 or key.dim() != 4:
        return "query/key are not (batch, heads, tokens, head_dim) tensors"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        return f"{query.shape[1]} query heads are not a multiple of {key.shape[1]} key heads"
    if mask is not None and not isinstance(mask, Tensor):
        return f"the mask is a {type(mask).__name__}, not a tensor"
    n_q, n_k = query.shape[2], key.shape[2]
    if mask is not None and mask.dim() == 4 and mask.shape[-1] > n_k:
        mask = mask[..., :n_k]  # as the eager functions that slice a longer cache-sized mask
    is_causal = False
    if implementation == "sdpa":  # as sdpa_attention_forward decides
        causal = call.get("is_causal")
        causal = getattr(module, "is_causal", True) if causal is None else causal
        is_causal = bool(n_q > 1 and mask is None and causal)
        if is_causal and n_k > n_q:  # sdpa drops the keys past the queries (empty static cache prefill)
            key, n_k = key[:, :, :n_q], n_q
    bias = call.get("position_bias")
    if isinstance(bias, Tensor):
        mask, is_causal = _with_position_bias(bias, mask, is_causal, n_q, n_k), False
    return {"attn_mask": mask, "is_causal": is_causal, "scale": call.get("scaling"), "k": key}


def _record_call(
    implementation: str,
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    mask: Any,
    arguments: Callable[[], dict[str, Any]],
) -> None:
    """Hand one attention call to the armed taps it runs under; ``arguments()`` gives its other arguments by name."""
    # the call runs inside these taps' models (and no other monitor's exclusive_capture block hides it from them)
    taps = [tap for tap in _TAPS if tap.current_module() is not None and capture_allowed(tap)]
    if implementation == "sdpa":  # a regulariser's tap scores the F.scaled_dot_product_attention call inside instead,
        taps = [tap for tap in taps if not tap._joint_candidate()]  # jointly with the attention (attention_joint)
    if not taps:
        return
    scored = _scored_inputs(implementation, module, query, key, mask, arguments())
    for tap in taps:
        site = tap.current_module()
        tap.claim(site)  # the SDPA call inside the original function is this one: do not score it again
        if isinstance(scored, str):
            if tap.wants(site):
                warnings.warn(
                    f"AttentionTap: HF attention at {site!r} ({type(module).__name__}) is not scored: {scored}.",
                    stacklevel=3,
                )
            continue
        with torch.set_grad_enabled(tap.differentiable and torch.is_grad_enabled()):
            tap.record(query, **scored)


# ---------------------------------------------------------------------------------------------------------- eager
def _signature(function: Callable[..., Any]) -> inspect.Signature | None:
    if function not in _SIGNATURES:
        try:
            _SIGNATURES[function] = inspect.signature(function)
        except (TypeError, ValueError):
            _SIGNATURES[function] = None
    return _SIGNATURES[function]


def _record_eager(original: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> None:
    """Score a call ``original(module, query, key, value, attention_mask, ...)`` of a model file's eager function."""
    signature = _signature(original)
    try:
        bound = signature.bind(*args, **kwargs) if signature is not None else None
    except TypeError:
        bound = None
    if bound is None or len(signature.parameters) < 5:
        return  # not the attention-function convention: left alone (the call itself goes on untouched)
    names = list(signature.parameters)
    values = bound.arguments
    module = values.get(names[0])
    if not isinstance(module, nn.Module):
        return

    def arguments() -> dict[str, Any]:
        named: dict[str, Any] = {}
        for name, value in values.items():
            kind = signature.parameters[name].kind
            if name in names[:5] or kind is inspect.Parameter.VAR_POSITIONAL:
                continue
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        return named

    _record_call("eager", module, values.get(names[1]), values.get(names[2]), values.get(names[4]), arguments)


def _eager_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """A model file's eager attention function that first hands ``q, k, mask, scale`` to the armed taps."""

    @functools.wraps(original)
    def entrotrain_eager_attention(*args: Any, **kwargs: Any) -> Any:
        if _TAPS:
            _record_eager(original, args, kwargs)
        return original(*args, **kwargs)

    setattr(entrotrain_eager_attention, _ORIGINAL, original)
    return entrotrain_eager_attention


def _reordered_scale(module: nn.Module, query: Tensor) -> float:
    """The ``alpha`` of GPT-2's ``_upcast_and_reordered_attn`` (``module.scaling``, or the older per-flag form)."""
    scaling = getattr(module, "scaling", None)
    if isinstance(scaling, (int, float)):
        return float(scaling)
    scale = 1.0
    if getattr(module, "scale_attn_weights", True):
        scale /= float(query.size(-1)) ** 0.5
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(getattr(module, "layer_idx", 0) + 1)
    return scale


def _method_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """An eager method ``(self, query, key, value, attention_mask=None)`` that first hands its inputs to the taps."""

    @functools.wraps(original)
    def entrotrain_eager_method(
        self: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any = None, *args: Any, **kwargs: Any
    ) -> Any:
        if _TAPS:
            _record_call(
                "eager", self, query, key, attention_mask, lambda: {"scaling": _reordered_scale(self, query)}
            )
        return original(self, query, key, value, attention_mask, *args, **kwargs)

    setattr(entrotrain_eager_method, _ORIGINAL, original)
    return entrotrain_eager_method


# ---------------------------------------------------------------------------------------------------------- patches
@dataclass(eq=False)
class _Patch:
    """``owner.attribute`` set to ``installed`` (its value was ``original``) while ``holders`` armed taps hold it."""

    owner: Any
    attribute: str
    original: Any
    installed: Any
    holders: int = 0

    def let_go(self) -> None:
        """One holder disarms; the last one puts the exact original value back, unless the attribute was changed
        by hand meanwhile (it no longer ``==`` the installed value: identity for functions). A no-op once restored."""
        key = (id(self.owner), self.attribute)
        if _PATCHES.get(key) is not self:
            return
        self.holders -= 1
        if self.holders > 0:
            return
        del _PATCHES[key]
        if getattr(self.owner, self.attribute, None) == self.installed:
            setattr(self.owner, self.attribute, self.original)


def _held(owner: Any, attribute: str) -> bool:
    """Whether an armed tap holds ``owner.attribute`` patched."""
    patch = _PATCHES.get((id(owner), attribute))
    return patch is not None and patch.owner is owner


def _hold(owner: Any, attribute: str, make: Callable[[Any], Any]) -> Callable[[], None]:
    """Set ``owner.attribute`` to ``make(original)``, or share it if an armed tap already did; returns the undo.

    The one install/restore mechanism of this module (configs switched to ``entrotrain_*`` and eager functions and
    methods wrapped alike): reference-counted, so several taps may be armed at once, nested or not, and disarm in any
    order; the first holder installs, the last one to let go restores the exact original value.
    """
    key = (id(owner), attribute)
    if not _held(owner, attribute):
        original = getattr(owner, attribute)
        installed = make(original)
        setattr(owner, attribute, installed)
        _PATCHES[key] = _Patch(owner, attribute, original, installed)
    patch = _PATCHES[key]
    patch.holders += 1
    return patch.let_go


def _eager_targets(model: nn.Module) -> list[tuple[Any, str, Callable[[Any], Any]]]:
    """What to wrap for the ``eager`` implementation: ``(owner, attribute, wrap)`` for each

    - eager attention function of the python modules of the model's classes (the ``default`` of their
      ``get_interface(impl, default)`` calls, and ``eager_attention_forward``): the model code looks the name up in
      its module's globals at call time, so the wrapper is called;
    - method in :data:`_EAGER_METHODS` defined by one of the model's classes.
    """
    targets: list[tuple[Any, str, Callable[[Any], Any]]] = []
    classes = {cls for m in model.modules() for cls in type(m).__mro__ if not _is_library(cls.__module__)}
    for module_name in sorted({cls.__module__ for cls in classes}):
        namespace = sys.modules.get(module_name)
        for name in sorted(_module_facts(module_name)[1]):
            if inspect.isfunction(vars(namespace).get(name) if namespace is not None else None):
                targets.append((namespace, name, _eager_wrapper))
    for cls in sorted(classes, key=lambda c: (c.__module__, c.__qualname__)):
        for name in _EAGER_METHODS:
            if inspect.isfunction(vars(cls).get(name)):
                targets.append((cls, name, _method_wrapper))
    return targets


# ---------------------------------------------------------------------------------------------------------- install
def _is_library(module_name: str) -> bool:
    return module_name.split(".")[0] in ("torch", "builtins", "typing", "abc", "collections")


def _module_facts(module_name: str) -> tuple[frozenset[str], frozenset[str]]:
    """What a python module's source says: the implementation names it compares ``_attn_implementation`` against,
    and the names of its eager attention functions."""
    facts = _FACTS.get(module_name)
    if facts is None:
        try:
            source = inspect.getsource(sys.modules[module_name])
        except (KeyError, OSError, TypeError):
            source = ""
        compared = frozenset(
            quoted for line in _COMPARISON.findall(source) for quoted in _QUOTED.findall(line.split("#")[0])
        )
        eager = frozenset(match.group(2) for match in _GET_INTERFACE.finditer(source)) | {"eager_attention_forward"}
        facts = _FACTS[module_name] = (compared, eager)
    return facts


def _compared_names(model: nn.Module) -> frozenset[str]:
    """Implementation names the model's code compares ``_attn_implementation`` against (its classes' files).

    Such code (``if config._attn_implementation == "sdpa": ...``) would take another branch under the wrapper's name.
    """
    files = {cls.__module__ for m in model.modules() for cls in type(m).__mro__}
    names: set[str] = set()
    for module_name in files:
        if not _is_library(module_name):
            names |= _module_facts(module_name)[0]
    return frozenset(names)


def _configs(model: nn.Module, pretrained: type) -> list[Any]:
    """Every distinct config of the HF (sub)models in ``model`` and their sub-configs."""
    seen: dict[int, Any] = {}
    stack = [m.config for m in model.modules() if isinstance(m, pretrained) and getattr(m, "config", None) is not None]
    while stack:
        config = stack.pop(0)
        if id(config) in seen:
            continue
        seen[id(config)] = config
        for key in getattr(config, "sub_configs", None) or {}:
            sub = getattr(config, key, None)
            if sub is not None and hasattr(sub, "_attn_implementation"):
                stack.append(sub)
    return list(seen.values())


def _implementation_attribute(config: Any) -> str:
    """The attribute that holds a config's own attention implementation: ``_attn_implementation_internal`` when the
    config has it (not the ``_attn_implementation`` property, whose setter recurses into sub-configs)."""
    internal = "_attn_implementation_internal"
    return internal if internal in vars(config) else "_attn_implementation"


def hf_attention_implementations(model: nn.Module) -> str:
    """``"model: 'flash_attention_2'"``-style list of the HF models in ``model`` (outermost ones) and their attention
    implementations, for error messages; empty when transformers is not imported or there is none."""
    pretrained = getattr(getattr(sys.modules.get("transformers"), "modeling_utils", None), "PreTrainedModel", None)
    if pretrained is None:
        return ""
    roots = _hf_roots(model, pretrained)
    return ", ".join(
        f"{name or type(m).__name__}: {getattr(getattr(m, 'config', None), '_attn_implementation', None)!r}"
        for name, m in roots[:4]
    )


def _hf_roots(model: nn.Module, pretrained: type) -> list[tuple[str, nn.Module]]:
    roots: list[tuple[str, nn.Module]] = []
    for name, module in named_modules(model):  # clean names (no wrapper segments)
        if isinstance(module, pretrained) and not any(
            prefix == "" or name.startswith(prefix + ".") for prefix, _ in roots
        ):
            roots.append((name, module))
    return roots


def _mask_argument(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """``(attention_mask, with_cache)`` of a ``PreTrainedModel.forward`` call (positional arguments included)."""
    named = kwargs
    if args:
        signature = _signature(type(module).forward)
        try:
            named = {**signature.bind_partial(module, *args, **kwargs).arguments, **kwargs} if signature else kwargs
        except TypeError:
            named = kwargs
    with_cache = any(named.get(name) is not None for name in ("past_key_values", "cache"))
    return named.get("attention_mask"), with_cache


class HFAttentionAdapter:
    """Captures HF transformers attention (``sdpa`` and ``eager``) through transformers' attention registry.

    Installed by default when transformers is imported. Site names are module names relative to the tapped model
    (``model.layers.0.self_attn`` for a ``LlamaForCausalLM``, ``model.model.layers.0.self_attn`` for a
    ``LightningModule`` holding it as ``self.model``). See the module docstring for what is scored.
    """

    def install(self, tap: AttentionTap, model: nn.Module) -> list[Callable[[], None]]:
        pretrained = pretrained_model_class()
        if pretrained is None:  # no HF model can exist: nothing to import, nothing to do
            return []
        roots = _hf_roots(model, pretrained)
        if not roots:
            return []
        api = _transformers_api()
        if api is None:
            warnings.warn(
                "AttentionTap: this transformers version has no AttentionMaskInterface; HF attention is captured only "
                "where it calls F.scaled_dot_product_attention (not 'eager'). Upgrade transformers for full capture.",
                stacklevel=3,
            )
            return []
        _register(api)
        undo: list[Callable[[], None]] = []
        captured = False
        try:
            for prefix, hf_model in roots:
                where = repr(prefix) if prefix else "the tapped model"
                captured |= self._switch(where, hf_model, pretrained, undo)
            self._watch_masks(tap, model, pretrained, undo)
        except BaseException:
            for fn in reversed(undo):
                fn()
            raise
        if not captured:
            return undo
        _TAPS.append(tap)
        undo.insert(0, lambda: _TAPS.remove(tap) if tap in _TAPS else None)
        return undo

    @staticmethod
    def _watch_masks(tap: AttentionTap, model: nn.Module, pretrained: type, undo: list[Callable[[], None]]) -> None:
        """Record the 2-D ``attention_mask`` of each HF (sub)model's forward while it runs: its real query positions.

        Every ``PreTrainedModel`` in ``model`` is watched (not only the roots): an encoder-decoder's decoder stack is
        called with ``decoder_attention_mask`` as its ``attention_mask`` (see :mod:`entrotrain.taps.query_padding`).
        """

        def before(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            push_model_mask(tap, *_mask_argument(module, args, kwargs))

        def after(module: nn.Module, args: tuple, output: Any) -> None:
            pop_model_mask(tap)

        undo.append(lambda: clear_model_masks(tap))
        for module in model.modules():
            if isinstance(module, pretrained):
                undo.append(module.register_forward_pre_hook(before, with_kwargs=True).remove)
                undo.append(module.register_forward_hook(after, always_call=True).remove)

    def _switch(self, where: str, hf_model: nn.Module, pretrained: type, undo: list[Callable[[], None]]) -> bool:
        """Switch the model's configs to the wrappers (undo callables appended); whether any config is wrapped."""
        can_set = getattr(type(hf_model), "_can_set_attn_implementation", None)
        if callable(can_set) and not can_set():
            return False  # its attention does not go through the registry (older-style model)
        compared = _compared_names(hf_model)
        captured = eager = False
        for config in _configs(hf_model, pretrained):
            current = getattr(config, "_attn_implementation", None)
            attribute = _implementation_attribute(config)
            if _held(config, attribute):
                pass  # switched by another armed tap: shared below
            elif isinstance(current, str) and current.startswith(_PREFIX):
                captured = True  # set by hand: the wrapper reports to every armed tap, nothing to restore
                continue
            elif current is None:
                continue  # a config without attention dispatch (e.g. a sub-config of a non-attention part)
            elif current == "eager":
                eager = True  # not renamed (model code may branch on "eager"): its eager function is wrapped below
                continue
            elif current not in SUPPORTED_IMPLEMENTATIONS:
                warnings.warn(
                    f"AttentionTap: {where} ({type(hf_model).__name__}) uses attn_implementation={current!r}; "
                    f"attention entropy is captured for {SUPPORTED_IMPLEMENTATIONS} only. Call "
                    "model.set_attn_implementation('sdpa') for the tapped run.",
                    stacklevel=4,
                )
                continue
            elif current in compared:
                warnings.warn(
                    f"AttentionTap: the code of {where} ({type(hf_model).__name__}) branches on "
                    f"attn_implementation == {current!r}, so the implementation is not switched; its "
                    "F.scaled_dot_product_attention calls are still captured.",
                    stacklevel=4,
                )
                continue
            undo.append(_hold(config, attribute, wrapped_name))  # the raw value is `current`, a supported name
            captured = True
        if eager:
            targets = _eager_targets(hf_model)
            for owner, attribute, wrap in targets:
                undo.append(_hold(owner, attribute, wrap))
            if not targets:
                warnings.warn(
                    f"AttentionTap: {where} ({type(hf_model).__name__}) uses attn_implementation='eager' but no eager "
                    "attention function was found in its code, so its attention is not captured. Call "
                    "model.set_attn_implementation('sdpa') for the tapped run.",
                    stacklevel=4,
                )
            captured |= bool(targets)
        return captured
