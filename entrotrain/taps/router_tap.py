"""Capture mixture-of-experts router logits from a live model as ``(rows, n_experts)`` matrices.

Forward hooks on the model's routers, installed by :meth:`RouterTap.arm` and removed by :meth:`RouterTap.disarm`
(also on ``with`` exit and on exception): a disarmed tap holds no hook and costs nothing. Captured logits are
detached copies (graph-keeping copies with ``differentiable=True``, for router regularisers), so the model computes,
bit for bit, what it computes without the tap.

Which modules are routers:

- ``include=None`` (default): discovery of HF transformers routers (5.x) — every module whose class name ends with
  ``TopKRouter`` or ``TopkRouter`` (``MixtralTopKRouter``, ``Qwen2MoeTopKRouter``, ``OlmoeTopKRouter``,
  ``Qwen3MoeTopKRouter``; the DeepSeek-V2/V3-style ``DeepseekV3TopkRouter``, ``Glm4MoeTopkRouter``,
  ``Dots1TopkRouter``, ``KimiLinearTopkRouter``, ...; DeepSeek-V4's ``DeepseekV4HashRouter`` and AFMoE's
  ``AfmoeTokenChoiceRouter``: they return ``(router_logits, weights, indices)``, the logits first, the experts they
  picked last), Llama 4's ``Llama4Router``, DBRX's ``DbrxRouter``, Zaya's ``ZayaRouter``, Gemma 4's
  ``Gemma4TextRouter`` (and DiffusionGemma's copy), Switch-Transformers' ``SwitchTransformersTop1Router``, NLLB-MoE's
  ``NllbMoeTop2Router``, HunYuan-MoE's ``HunYuanMoEV1Gate`` (``(router_logits, weights, indices)`` of a softmax top-k),
  and every ``nn.Linear`` named ``gate`` whose parent's class name mentions ``MoE`` / ``Moe`` / ``SparseMoe`` (the
  router of older HF releases and of most hand-written MoE blocks); ``exclude`` globs still apply. Qwen2-MoE's
  ``shared_expert_gate`` (a 1-output sigmoid gate) is not a router and is not matched.
- ``include=[globs]``: exactly the modules whose names match (``*`` = one name segment, ``**`` = any number; see
  :class:`~entrotrain.taps.name_filter.NameFilter`).

A router's output (its ``output_index``-th element for tuple/list outputs; by default 0, 1 for Llama 4's
``Llama4Router``, which returns ``(router_scores, router_logits)``, and 2 for Switch's and NLLB-MoE's
``(dispatch mask, probabilities, router_logits)``) is read as ``(..., E)`` and
flattened to ``(rows, E)``: HF's ``(batch·seq, E)`` layout, row-major over (batch, seq), so HF's ``attention_mask``
``(batch, seq)`` flattened lines up with the rows. Gemma 4's router returns softmax probabilities, not logits: its
logits are read from the output of its ``proj`` Linear (hooked while armed; :func:`logits_child`), so the entropy is
that of the softmax it routes with and a z-loss sees the real logits. Zaya's logits have ``E + 1`` columns, the last
its skip expert. The experts each row went to are read from the output by :func:`router_choice` (DBRX returns none:
its block takes the top ``moe_top_k`` of the softmax, which the statistics reproduce from the logits).

Padding (``token_masks=True``; a router regulariser's ``capture`` arms it so): the tap records the 2-D
``attention_mask`` of every HF ``PreTrainedModel`` forward while armed (else a
:func:`~entrotrain.taps.query_padding.query_padding` block's mask) and stores, per router call, the keep mask of its
rows in :attr:`RouterTap.masks` (``None``: every row real). A mask that does not fit the rows (``batch`` must divide
them and ``rows / batch`` match its length, or its last columns under a KV cache) keeps every row, warned once per
router.
"""

from __future__ import annotations

import inspect
import io
import re
import textwrap
import tokenize
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from entrotrain._validation import check_bool, check_int
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional.routing import SCORINGS
from entrotrain.taps._forward_hooks import ForwardHookTap
from entrotrain.taps.exclusive import capture_allowed
from entrotrain.taps.module_names import named_modules
from entrotrain.taps.name_filter import GLOB_SYNTAX, NameFilter
from entrotrain.taps.query_padding import ambient_row_batch, ambient_row_mask

__all__ = [
    "RouterTap", "chosen_experts", "discover_routers", "logits_child", "logits_element", "router_choice", "router_rows",
    "router_scoring", "router_top_k",
]

_MOE_PARENT = re.compile(r"moe", re.IGNORECASE)
_CHILD = "\0logits-child\0"  # joins a router's name and its logits child's in hook keys (names never hold a NUL)


#: Class-name endings (any case) of HF 5.x routers returning ``(router_logits, weights, indices)``: ``TopKRouter``
#: (Mixtral, ...), ``TopkRouter`` (DeepSeek-V2/V3 and the routers built like them), DeepSeek-V4's ``HashRouter``,
#: AFMoE's ``TokenChoiceRouter``.
_ROUTER_CLASS_ENDINGS = ("topkrouter", "hashrouter", "tokenchoicerouter")
#: Router classes (lower-case names) whose tuple output holds the logits at another element than 0: Llama 4's
#: ``Llama4Router`` (an ``nn.Linear`` picking the top k of its logits) returns ``(router_scores, router_logits)``;
#: Switch-Transformers' ``SwitchTransformersTop1Router`` and NLLB-MoE's ``NllbMoeTop2Router`` return
#: ``(dispatch mask, probabilities, router_logits)``.
_LOGITS_ELEMENT = {"llama4router": 1, "switchtransformerstop1router": 2, "nllbmoetop2router": 2}
#: Routers whose output holds no logits, with the child module whose output are its logits: Gemma 4's
#: ``Gemma4TextRouter`` (and DiffusionGemma's copy) returns ``(softmax probabilities, weights, indices)``; its
#: ``proj`` Linear computes the scores it takes the softmax of.
_LOGITS_CHILD = {"gemma4textrouter": "proj", "diffusiongemmatextrouter": "proj"}
#: Other router classes found by name: DBRX's ``DbrxRouter`` (returns the logits only; its ``DbrxFFN`` picks the top
#: ``moe_top_k`` of their softmax), Zaya's ``ZayaRouter`` (``(logits, weights, indices, router states)``) and
#: HunYuan-MoE's ``HunYuanMoEV1Gate`` (``(router_logits, weights, indices)``: the top ``top_k`` of the softmax of its
#: ``wg`` logits, renormalised; named ``gate`` but no ``nn.Linear``).
_OTHER_ROUTERS = ("dbrxrouter", "zayarouter", "hunyuanmoev1gate")
#: Experts per token of routers that hold no ``top_k``: Switch picks the top 1, NLLB-MoE the top 2.
_FIXED_TOP_K = {"switchtransformerstop1router": 1, "nllbmoetop2router": 2}


def _is_router_class(module: nn.Module | None) -> bool:
    if module is None:
        return False
    name = type(module).__name__.lower()
    return (
        name.endswith(_ROUTER_CLASS_ENDINGS) or name in _LOGITS_ELEMENT or name in _LOGITS_CHILD
        or name in _OTHER_ROUTERS
    )


def logits_child(module: nn.Module, output_index: int | None = None) -> str | None:
    """The name (relative to ``module``) of the child whose output are router ``module``'s logits, for routers that
    return probabilities instead (Gemma 4's ``proj``); ``None`` when the router's own output holds them or when
    ``output_index`` names an element of it."""
    if output_index is not None:
        return None
    child = _LOGITS_CHILD.get(type(module).__name__.lower())
    return child if child is not None and isinstance(getattr(module, child, None), nn.Module) else None


def logits_element(module: nn.Module, output_index: int | None = None) -> int:
    """The element of ``module``'s tuple/list output holding its router logits: ``output_index`` when given, else
    the router's own (0; 1 for Llama 4's ``(router_scores, router_logits)``)."""
    if output_index is not None:
        return output_index
    return _LOGITS_ELEMENT.get(type(module).__name__.lower(), 0)


def _is_router(name: str, module: nn.Module, parents: dict[str, nn.Module]) -> bool:
    if _is_router_class(module):
        return True
    if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] == "gate":
        parent = parents.get(name.rsplit(".", 1)[0] if "." in name else "")
        # a router class's own gate Linear (AFMoE) is read through the router, which returns its choice too
        return parent is not None and bool(_MOE_PARENT.search(type(parent).__name__)) and not _is_router_class(parent)
    return False


def discover_routers(model: nn.Module) -> list[str]:
    """Names (as in ``model.named_modules()``, without ``_orig_mod.``; in module order) of the HF-style routers of
    ``model``: class name ending with ``TopKRouter`` / ``TopkRouter`` / ``HashRouter`` / ``TokenChoiceRouter``,
    Llama 4's ``Llama4Router``, the DBRX / Zaya / Gemma 4 / Switch / NLLB-MoE / HunYuan-MoE router classes, or
    an ``nn.Linear`` named ``gate`` inside a module whose class name mentions MoE (and is not one of those router
    classes)."""
    modules = dict(named_modules(model))
    return [name for name, module in modules.items() if name and _is_router(name, module, modules)]


def router_rows(output: Any, *, name: str = "router", output_index: int = 0, detach: bool = True) -> Tensor:
    """A router's output as detached ``(rows, E)`` logits (a copy: later in-place ops cannot change it);
    ``detach=False`` keeps the graph (the copy is a differentiable function of the output).

    Raises:
        TapError: the output (or its ``output_index``-th element) is not a floating tensor with an expert dim.
    """
    if isinstance(output, (tuple, list)):
        if not -len(output) <= output_index < len(output):
            raise TapError(
                f"router {name!r} returned a {type(output).__name__} of {len(output)} elements; output_index="
                f"{output_index} is out of range. Pick the element holding the logits with output_index."
            )
        output = output[output_index]
    if not isinstance(output, Tensor) or not output.is_floating_point() or output.dim() < 1:
        what = f"a {output.dtype} tensor of shape {tuple(output.shape)}" if isinstance(output, Tensor) else type(output).__name__
        raise TapError(
            f"router {name!r} returned {what}; router logits must be a floating tensor (..., n_experts). Exclude it "
            "or include the module that computes the router logits."
        )
    return (output.detach() if detach else output).reshape(-1, output.shape[-1]).clone()


def chosen_experts(output: Any, rows: int) -> Tensor | None:
    """The expert ids a router returned beside its logits: the last integer tensor of ``rows`` rows after the first
    element of a tuple/list output (HF ``*TopKRouter`` / ``*TopkRouter``: ``(router_logits, weights, indices)``;
    Inkling's ``(logits, weights, indices, shared_gammas)``), as ``(rows, k)`` detached; ``None`` otherwise."""
    if not isinstance(output, (tuple, list)) or len(output) < 2:
        return None
    for ids in reversed(output[1:]):
        if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            continue
        if ids.dim() in (1, 2) and ids.shape[0] == rows:
            return ids.detach().reshape(rows, -1).clone()
    return None


def _dispatched(dispatch: Tensor, rows: int, k: int) -> Tensor | None:
    """``(rows, k)`` ids of the nonzero entries of a ``(..., E)`` dispatch mask or combine-weight tensor (at most
    ``k`` per row, -1 where a row has fewer: a token dropped by the expert capacity counts nowhere); ``None`` when it
    does not have ``rows`` rows."""
    if not isinstance(dispatch, Tensor) or dispatch.dim() < 1 or dispatch.numel() != rows * dispatch.shape[-1]:
        return None
    picked = dispatch.detach().reshape(rows, -1) != 0
    hit, ids = torch.topk(picked.to(torch.uint8), min(k, picked.shape[-1]), dim=-1)  # ones first
    return torch.where(hit.bool(), ids, torch.full_like(ids, -1))


def router_choice(module: nn.Module | None, output: Any, rows: int) -> Tensor | None:
    """The ``(rows, k)`` expert ids router ``module`` dispatched its ``rows`` rows to, read from its output
    (detached; ids outside ``[0, E)`` count nowhere in the load); ``None`` when its output does not say.

    - Switch-Transformers' ``SwitchTransformersTop1Router`` returns the one-hot dispatch mask first (a token over the
      expert capacity has no one: id -1); NLLB-MoE's ``NllbMoeTop2Router`` returns ``(top-1 mask, combine weights,
      logits)``: the experts with a nonzero combine weight (top 1 and top 2 after the capacity; -1 for a dropped
      one) are its choice. (transformers 5.25's ``NllbMoeExperts`` indexes ``one_hot`` of the 0/1 top-1 mask, so it
      computes every token's top 1 with ``expert_1`` and the rest with ``expert_0``: the load here is the router's
      dispatch, not what that experts module runs.)
    - Zaya's ``ZayaRouter`` scores ``E + 1`` classes, the last a skip expert with no compute; it returns a skip as
      id 0 with weight exactly 0. An id-0 entry of weight 0 is read back as the skip class ``E`` (the logits' last
      column), so the load counts it there and expert 0 only where it computes.
    - Any other router: :func:`chosen_experts` (the last integer tensor of its tuple output).
    """
    kind = type(module).__name__.lower() if module is not None else ""
    if kind == "switchtransformerstop1router" and isinstance(output, (tuple, list)) and output:
        return _dispatched(output[0], rows, 1)
    if kind == "nllbmoetop2router" and isinstance(output, (tuple, list)) and len(output) > 1:
        return _dispatched(output[1], rows, 2)
    ids = chosen_experts(output, rows)
    if (
        kind == "zayarouter" and ids is not None and len(output) > 2 and isinstance(output[1], Tensor)
        and output[1].numel() == ids.numel()
    ):
        weights, n_classes = output[1].detach().reshape(ids.shape), output[0].shape[-1]
        ids = torch.where((ids == 0) & (weights == 0), torch.full_like(ids, n_classes - 1), ids)
    return ids


def router_top_k(module: nn.Module | None, parent: nn.Module | None = None) -> int | None:
    """Experts per token of router ``module``: its ``top_k`` attribute (HF ``*TopKRouter``, Zaya), its config's
    ``top_k_experts`` (Gemma 4), 1 / 2 for Switch's top-1 / NLLB-MoE's top-2 router, else the ``top_k`` of the block
    holding it (DBRX's ``DbrxFFN``); ``None`` when none says."""
    if module is None:
        return None
    for value in (
        getattr(module, "top_k", None),
        getattr(getattr(module, "config", None), "top_k_experts", None),
        _FIXED_TOP_K.get(type(module).__name__.lower()),
        getattr(parent, "top_k", None) if _is_router_class(module) else None,
    ):
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


_SCORING_NAMES = ("scoring_func", "expert_selection_fn", "score_func")  # a str naming it (DeepSeek, Cohere2-MoE)
_SCORING_MODULES = ("score_fn", "scoring_function")  # an activation module applying it (DeepSeek-V4, Muse Spark)


def router_scoring(module: nn.Module | None) -> str:
    """How ``module`` scores its experts: ``'softmax'``, ``'sigmoid'`` or ``'sqrtsoftplus'`` (the
    ``scoring`` of :func:`~entrotrain.functional.routing.router_statistics`; see :meth:`RouterTap.scoring`)."""
    if module is None or isinstance(module, nn.Linear):
        return "softmax"
    for attr in _SCORING_NAMES:
        declared = getattr(module, attr, None)
        if isinstance(declared, str):
            return declared if declared in SCORINGS else "softmax"
    for attr in _SCORING_MODULES:
        fn = type(getattr(module, attr, None)).__name__.lower()
        found = [name for name in SCORINGS if name in fn]
        if found:
            return found[0]
    try:  # the names the class's forward calls, comments and strings left out
        source = textwrap.dedent(inspect.getsource(type(module).forward))
        names = {t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.NAME}
    except (OSError, TypeError, SyntaxError, tokenize.TokenError):
        return "softmax"
    return "sigmoid" if "sigmoid" in names and not names & {"softmax", "log_softmax"} else "softmax"


class RouterTap(ForwardHookTap):
    """Detached router logits of the MoE layers of ``model``, while armed.

    Args:
        model: the module to watch (names are relative to it).
        include: glob patterns of router module names; ``None`` = HF router discovery (module docstring).
        exclude: glob patterns of module names to skip.
        output_index: element read from tuple/list router outputs; ``None`` = each router's own (HF routers: 0, the
            raw logits; Llama 4's ``Llama4Router``: 1, its ``(router_scores, router_logits)``).
        on_capture: called as ``on_capture(name, logits)`` for every router call instead of storing the logits in
            :attr:`captures`.
        differentiable: keep the graph of the captured logits (for a router regulariser's loss, as
            ``RouterZLoss(...).capture(model)`` arms it) instead of detaching them.
        token_masks: record the padding mask of each call's rows in :attr:`masks` (module docstring, Padding).

    Attributes:
        names: the watched module names, in module order (forward order may differ: :attr:`order` records it).
        captures: ``{name: [(rows, E) logits per call]}`` since the last :meth:`reset`.
        masks: ``{name: [(rows,) bool keep mask or None per call]}``, parallel to :attr:`captures`
            (``token_masks=True``; else every entry is ``None``).
        chosen: ``{name: [(rows, k) expert ids or None per call]}``, parallel to :attr:`captures`: the experts the
            router itself picked, when its output says (:func:`router_choice`).
        batches: ``{name: [batch size or None per call]}``, parallel to :attr:`captures` (``token_masks=True``): the
            batch of the padding mask that fits the call's ``batch·seq`` rows, so its rows split into sequences
            (``None``: no 2-D mask in force, or one that does not fit).
        order: names in the order their first call was seen (since construction; never reset).

    Raises:
        EntrotrainError: ``model`` not a module, a bad ``output_index``.
        TapError: no router found (discovery) or no module matches ``include`` / ``exclude``; the message says what
            was searched and the fix.

    Example:
        >>> tap = RouterTap(model)             # finds MixtralTopKRouter / Qwen2MoeTopKRouter / OlmoeTopKRouter
        >>> with tap:
        ...     model(input_ids)
        >>> tap.captures["model.layers.0.mlp.gate"][0].shape   # (batch*seq, n_experts)
    """

    def __init__(
        self,
        model: nn.Module,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        *,
        output_index: int | None = None,
        on_capture: Callable[[str, Tensor], None] | None = None,
        differentiable: bool = False,
        token_masks: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise EntrotrainError(f"RouterTap needs an nn.Module, got {type(model).__name__}.")
        check_int(output_index, "output_index", none_ok=True)
        self.differentiable = check_bool(differentiable, "differentiable")
        self.watch_token_masks = check_bool(token_masks, "token_masks")
        if on_capture is not None and not callable(on_capture):
            raise EntrotrainError(
                f"on_capture must be None or a callable on_capture(name, logits), got {type(on_capture).__name__}."
            )
        self.model = model
        self.discover = include is None
        self._names = NameFilter(include, exclude)
        self.include, self.exclude = self._names.include, self._names.exclude
        self.output_index = output_index
        self.on_capture = on_capture
        self.captures: dict[str, list[Tensor]] = {}
        self.masks: dict[str, list[Tensor | None]] = {}
        self.chosen: dict[str, list[Tensor | None]] = {}
        self.batches: dict[str, list[int | None]] = {}
        self.order: list[str] = []
        self._scoring: dict[str, str] = {}
        self._corrects: dict[str, bool] = {}
        self._handles: list[Any] = []
        self._child_logits: dict[str, Any] = {}
        self.names = self._match()

    def _match(self) -> list[str]:
        modules = dict(named_modules(self.model))
        if self.discover:
            names = [n for n in discover_routers(self.model) if self._names(n)]
            if not names:
                raise TapError(
                    f"RouterTap found no MoE router in {type(self.model).__name__}: it searched for modules whose "
                    "class name ends with 'TopKRouter' / 'TopkRouter' (HF Mixtral, Qwen2-MoE, OLMoE, Qwen3-MoE, "
                    "DeepSeek-V2/V3, GLM-4-MoE, ...), Llama 4's Llama4Router, DBRX, Zaya, Gemma 4, "
                    "Switch-Transformers, NLLB-MoE and HunYuan-MoE routers, and nn.Linear "
                    f"modules named 'gate' inside a module whose class name mentions MoE (exclude={self.exclude}). "
                    "Name your router modules with include=['**.router'] (globs over named_modules()), or return "
                    "the router logits from training_step under 'router_logits'."
                )
            return names
        names = [
            n for n, m in modules.items() if n and not isinstance(m, (nn.ModuleList, nn.ModuleDict)) and self._names(n)
        ]
        if not names:
            available = [n for n in modules if n]
            raise TapError(
                f"no module of {type(self.model).__name__} matches include={self.include} exclude={self.exclude}. "
                f"Module names are: {available[:24]}{' ...' if len(available) > 24 else ''}. Fix the glob patterns "
                f"({GLOB_SYNTAX}), or leave include=None to discover HF routers."
            )
        return names

    def top_k(self, name: str) -> int | None:
        """Experts per token of router ``name`` as :func:`router_top_k` reads them (its ``top_k`` attribute, HF
        ``*TopKRouter``; Gemma 4's ``top_k_experts``; Switch 1, NLLB-MoE 2; DBRX's block ``top_k``), or ``None``."""
        modules = dict(named_modules(self.model))
        return router_top_k(modules.get(name), modules.get(name.rsplit(".", 1)[0] if "." in name else ""))

    def corrects_choice(self, name: str) -> bool:
        """Whether router ``name`` (or the block holding it) has an ``e_score_correction_bias`` (DeepSeek-V3-style
        balancing): it then picks other experts than the top k of its logits. Read once per router, as
        :meth:`scoring` (the monitor asks at every logging step)."""
        if name not in self._corrects:
            modules = dict(named_modules(self.model))
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            self._corrects[name] = any(
                hasattr(modules.get(n), "e_score_correction_bias") for n in (name, parent) if n in modules
            )
        return self._corrects[name]

    def scoring(self, name: str) -> str:
        """Router ``name``'s own scoring function (the distribution its statistics are of; ``scoring`` of
        :func:`~entrotrain.functional.routing.router_statistics`): a ``scoring_func`` / ``expert_selection_fn``
        string it holds (DeepSeek-V2/V4 configs, Cohere2-MoE), else the activation module it holds as ``score_fn`` /
        ``scoring_function`` (``Sigmoid``, ``SqrtSoftplusActivation``), else ``'sigmoid'`` when its class's
        ``forward`` calls a sigmoid and no softmax (DeepSeek-V3's ``router_logits.sigmoid()`` and the
        ``*TopkRouter`` classes built like it; MiniMax-M2, Laguna, Step3p7), else ``'softmax'`` (Mixtral, Qwen2-MoE,
        OLMoE, DeepSeek-V2, LongCat-Flash, an ``nn.Linear`` gate, a name ``include`` picked whose scoring is
        unknown)."""
        if name not in self._scoring:
            self._scoring[name] = router_scoring(dict(named_modules(self.model)).get(name))
        return self._scoring[name]

    # ------------------------------------------------------------------ lifecycle (arm, disarm, with: ForwardHookTap)
    def reset(self) -> None:
        """Forget stored captures (:attr:`order` is kept: layer numbers stay stable)."""
        self.captures = {}
        self.masks = {}
        self.chosen = {}
        self.batches = {}

    def arm(self) -> RouterTap:
        """Install the hooks (:class:`~entrotrain.taps._forward_hooks.ForwardHookTap`), and one on the logits child
        of every router returning probabilities (Gemma 4's ``proj``: :func:`logits_child`), which runs inside the
        router's forward, before the router's own hook reads what it kept."""
        if self.armed:
            return self
        super().arm()
        try:
            modules = dict(named_modules(self.model))
            for name in self.names:
                child = logits_child(modules[name], self.output_index)
                if child is not None:
                    hook = self._installed_hook(name + _CHILD + child)
                    self._handles.append(getattr(modules[name], child).register_forward_hook(hook))
        except BaseException:
            self.disarm()
            raise
        return self

    def _hook(self, name: str) -> Callable[..., None]:
        if _CHILD in name:  # a router's logits child: keep its output for the router's hook
            router = name.split(_CHILD, 1)[0]

            def keep(module: nn.Module | None, args: tuple, output: Any) -> None:
                self._child_logits[router] = output

            return keep

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            source = self._child_logits.pop(name, None)
            if not capture_allowed(self):
                return
            router = module if module is not None else dict(named_modules(self.model)).get(name)
            index = logits_element(router, self.output_index) if router is not None else (self.output_index or 0)
            if router is not None and logits_child(router, self.output_index) is not None:
                if source is None:
                    raise TapError(
                        f"router {name!r} ({type(router).__name__}) returns probabilities and its logits module "
                        f"{logits_child(router)!r} did not run inside it; pass output_index=... to read an element "
                        "of its output instead."
                    )
                logits_output, index = source, 0
            else:
                logits_output = output
            if self.differentiable:
                logits = router_rows(logits_output, name=name, output_index=index, detach=False)
            else:
                with torch.no_grad():
                    logits = router_rows(logits_output, name=name, output_index=index)
            if name not in self.order:
                self.order.append(name)
            if self.on_capture is not None:
                self.on_capture(name, logits)
            else:
                self.captures.setdefault(name, []).append(logits)
                self.masks.setdefault(name, []).append(self._row_mask(name, logits) if self.watch_token_masks else None)
                self.chosen.setdefault(name, []).append(router_choice(router, output, logits.shape[0]))
                batch = ambient_row_batch(self, logits.shape[0]) if self.watch_token_masks else None
                self.batches.setdefault(name, []).append(batch)

        return hook

    def _row_mask(self, name: str, logits: Tensor) -> Tensor | None:
        mask, misfit = ambient_row_mask(self, logits.shape[0], logits.device)
        if misfit is not None:
            self._warn_misfit_once(
                name,
                f"RouterTap: the padding mask of shape {misfit} does not fit the {logits.shape[0]} rows of router "
                f"{name!r}; all its rows count. Pass the logits and a keep mask of their rows to the loss yourself, "
                "or hand a fitting mask over with a query_padding(...) block.",
                stacklevel=3,
            )
        return mask

    def chosen_experts(self, name: str) -> Tensor | None:
        """The ``(rows, k)`` expert ids router ``name`` itself picked, in call order, parallel to :meth:`logits`;
        ``None`` unless every stored call returned them (HF ``*TopKRouter``: ``(logits, scores, indices)``)."""
        found = self.chosen.get(name, [])
        if not found or any(c is None for c in found):
            return None
        return torch.cat(found)  # type: ignore[arg-type]

    def row_mask(self, name: str) -> Tensor | None:
        """The ``(rows,)`` keep mask of all stored calls of router ``name``, parallel to :meth:`logits`
        (``token_masks=True``: the ``attention_mask`` of the HF model running each call); ``None`` unless every
        stored call has one."""
        found = self.masks.get(name, [])
        if not found or any(m is None for m in found):
            return None
        return torch.cat(found)  # type: ignore[arg-type]

    def logits(self, name: str) -> Tensor:
        """All stored logits of router ``name``, concatenated in call order ``(rows, E)``."""
        if name not in self.captures:
            raise TapError(f"nothing captured for {name!r}; captured: {sorted(self.captures)}. Arm the tap first.")
        return torch.cat(self.captures[name])
