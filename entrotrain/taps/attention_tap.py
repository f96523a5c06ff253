"""Capture attention ``q, k, mask, scale`` from a live model and reduce it to per-head entropy statistics.

Fused kernels never materialise attention weights, so the tap listens at the attention-function boundary:

- every call of :func:`torch.nn.functional.scaled_dot_product_attention` (however it was imported), through a
  :class:`~torch.overrides.TorchFunctionMode` that is pushed only while the tap is armed;
- module adapters (:class:`torch.nn.MultiheadAttention`, hence ``nn.TransformerEncoderLayer``; HF transformers'
  attention registry) that recompute ``q, k`` from a call's inputs;
- explicit :func:`record_attention` calls from custom attention code.

Each call is attributed to the innermost module running it (``blocks.3.attn``); a module that calls attention twice in
one forward gets ``name[1]`` for the second call. Disarmed, the tap holds no hook and no mode: it costs nothing and
changes nothing. Armed, it only reads detached copies of ``q`` and ``k`` (unless ``differentiable=True``) and never
touches the training RNG, so the model computes bit for bit what it computes without it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from entrotrain._validation import check_bool
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional.attention import AttentionEntropy, AttentionPath, _check_qk, attention_entropy_stats
from entrotrain.functional.attention_joint import joint_attention, joint_attention_applies
from entrotrain.functional.attention_masks import AttentionMask
from entrotrain.taps.attention_stats import per_head_sums
from entrotrain.taps.nn_attention import mha_query_key, watch_decoder_padding
from entrotrain.taps.query_padding import _USER as _USER_QUERY_MASKS
from entrotrain.taps.query_padding import ambient_query_mask, check_query_mask, mask_queries
from entrotrain.taps.query_padding import pop_model_mask, push_model_mask, query_padding
from entrotrain.taps.sampling import check_budget, evenly_spaced
from entrotrain.taps.deferred import DeferredCaptures, compiling, detached, in_fx_graph, remove_mode
from entrotrain.taps.exclusive import capture_allowed
from entrotrain.taps import fastpath
from entrotrain.taps.fastpath import FastpathHold
from entrotrain.taps.module_names import clean_module_name, is_compiled, named_modules, unwrap_module
from entrotrain.taps.name_filter import NameFilter

__all__ = ["AttentionTap", "AttentionAdapter", "MultiheadAttentionAdapter", "record_attention"]

_ACTIVE_TAPS: list[AttentionTap] = []
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class AttentionAdapter(Protocol):
    """Teaches a tap to capture one kind of attention. ``install`` returns callables that undo what it did."""

    def install(self, tap: AttentionTap, model: nn.Module) -> list[Callable[[], None]]: ...


class MultiheadAttentionAdapter:
    """Captures :class:`torch.nn.MultiheadAttention` (and the ``self_attn`` of ``nn.Transformer*Layer``)."""

    def install(self, tap: AttentionTap, model: nn.Module) -> list[Callable[[], None]]:
        undo: list[Callable[[], None]] = []
        compiled = is_compiled(model)
        for name, module in named_modules(model):
            if isinstance(module, nn.MultiheadAttention) and tap.wants(name):
                tap.claim(name)

                def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any], _name: str = name) -> None:
                    if not capture_allowed(tap):
                        return
                    if compiling():  # q, k from this call's weights, in the graph; scored after it (no graph break)
                        tap._defer_record(tap._site_name(_name), mha_query_key(mod, args, kwargs))
                        return
                    # q, k projected here save tensors: kept out of checkpointing's hooks, as record's own are
                    with torch.set_grad_enabled(tap.differentiable and torch.is_grad_enabled()), \
                            _entropy_saves_kept(tap.differentiable):
                        tap.record(name=tap._site_name(_name), **mha_query_key(mod, args, kwargs))
                    tap._suspend_sdpa()  # the module runs as without the tap (its native fast path stays on)

                def done(mod: nn.Module, args: tuple, output: Any) -> None:
                    tap._resume_sdpa()

                undo.append(module.register_forward_pre_hook(hook, with_kwargs=True).remove)
                # compiled: no always_call (its hook ids enter dynamo's guards: a recompile at every arming)
                undo.append(module.register_forward_hook(done, always_call=not compiled).remove)
        undo.extend(watch_decoder_padding(tap, model))  # cross-attention queries of nn.TransformerDecoderLayer
        return undo


def default_adapters() -> list[AttentionAdapter]:
    """The adapters a tap installs unless told otherwise (HF transformers' and timm's act only when imported)."""
    from entrotrain.taps.timm_attention import TimmAttentionAdapter

    adapters: list[AttentionAdapter] = [MultiheadAttentionAdapter(), TimmAttentionAdapter()]
    try:
        from entrotrain.taps.hf import HFAttentionAdapter
    except ImportError:
        return adapters
    adapters.append(HFAttentionAdapter())
    return adapters


#: Built-in adapters that capture eagerly: left out for compiled models (see ``AttentionTap._adapters_to_install``).
_EAGER_ONLY_ADAPTERS = ("HFAttentionAdapter",)


def _warn_eager_attention(model: nn.Module) -> None:
    eager = sorted(
        {type(m).__name__ for m in model.modules() if getattr(getattr(m, "config", None), "_attn_implementation", None) == "eager"}
    )
    if eager:
        warnings.warn(
            f"AttentionTap: {', '.join(eager)} is compiled and uses attn_implementation='eager', which a compiled model's "
            "tap cannot see (it captures compiled attention at F.scaled_dot_product_attention). Build the model with "
            "attn_implementation='sdpa' (same outputs), or tap it uncompiled.",
            stacklevel=4,
        )


class _SDPAInterceptor(TorchFunctionMode):
    """Sees every ``F.scaled_dot_product_attention`` call while pushed; forwards all calls unchanged.

    Under ``torch.compile`` (dynamo traces this method) the call is only queued (site name, detached arguments) and
    scored eagerly when the tap drains its queue (see :mod:`entrotrain.taps.deferred`): no graph break, no
    specialisation on the statistics. One instance per tap, pushed at every arming (dynamo guards on the mode).
    """

    def __init__(self, tap: AttentionTap) -> None:
        super().__init__()
        self.tap = tap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            if compiling():
                self.tap._defer_sdpa(args, kwargs)
            elif not in_fx_graph():  # a compiled graph run by an FX backend: queued when traced
                self.tap._replay_deferred()  # captures queued by compiled code first: keep the call order
                out = self.tap._on_sdpa(args, kwargs)
                if out is not None:  # computed with its entropy (attention_with_entropy)
                    return out
        return func(*args, **kwargs)


class AttentionTap:
    """Per-head attention-entropy statistics of every attention call in ``model`` while armed.

    Args:
        model: the module to watch (e.g. the ``LightningModule``; names are relative to it).
        include: glob patterns of attention site names to score (``"**.attn"``, ``"blocks.1.**"``; ``*`` = one
            name segment, ``**`` = any number); default all.
        exclude: glob patterns of site names to skip.
        max_rows: score at most this many batch rows (evenly spaced); ``None`` = all.
        max_queries: score at most this many query positions (evenly spaced, all keys kept); ``None`` = all.
        path: attention-entropy path (see :func:`~entrotrain.functional.attention_entropy_stats`).
        capture_sdpa: intercept ``F.scaled_dot_product_attention``.
        adapters: module adapters; default :class:`MultiheadAttentionAdapter` (+ HF transformers when installed).
        differentiable: keep the graph (for regularisers) and store per-query results in :attr:`records`.
        joint_attention: with ``differentiable=True``, compute each SDPA call that
            :func:`~entrotrain.functional.attention_joint.joint_attention_applies` accepts (CPU, float32/64, no
            dropout, causal, boolean or constant additive mask, ``B·H·Nq·Nk`` up to 4 Mi) *and* its entropy in one
            materialised pass with one shared backward, in place of SDPA's kernel followed by a separate entropy:
            the entropy then costs an elementwise pass instead of a second attention. The attention output equals
            SDPA's to float round-off, not bit for bit. Used only with ``path="auto"``, while gradients are on,
            without activation checkpointing, and when no torch-function mode other than another tap's sits below
            the tap's own (another tap below, e.g. a monitor's, is handed the call: the model computes the same with
            or without it). ``False``: SDPA runs untouched and the entropy apart.

    Padding: a query position is scored only if the model's own mask marks it as real: a ``query_mask`` given with
    the call (``record_attention``, or an ``nn.MultiheadAttention`` self-attention's ``key_padding_mask``), else the
    2-D ``attention_mask`` of the HF model running the call (``decoder_attention_mask`` for a decoder stack; the last
    ``N`` positions with a KV cache), else the mask of an enclosing ``with query_padding(mask):`` block
    (:mod:`entrotrain.taps.query_padding`). A mask that does not fit a call is not guessed at: all its queries are
    scored, with a warning naming the site. ``max_queries`` picks evenly spaced positions first, then drops the
    padded ones among them.

    Example:
        >>> tap = AttentionTap(model, max_queries=128)
        >>> with tap:                       # armed inside, removed on exit or exception
        ...     model(x)
        >>> tap.stats["blocks.0.attn"]      # (5, heads) sums, see entrotrain.taps.attention_stats
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        include: str | Sequence[str] | None = None,
        exclude: str | Sequence[str] | None = None,
        max_rows: int | None = None,
        max_queries: int | None = None,
        path: AttentionPath = "auto",
        capture_sdpa: bool = True,
        adapters: Sequence[AttentionAdapter] | None = None,
        differentiable: bool = False,
        joint_attention: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise EntrotrainError(f"AttentionTap needs an nn.Module, got {type(model).__name__}.")
        self.model = model
        self._root_name = type(unwrap_module(model)).__name__  # site name of calls in the root
        self._names = NameFilter(include, exclude)
        self.include, self.exclude = self._names.include, self._names.exclude
        self.max_rows = check_budget(max_rows, "max_rows")
        self.max_queries = check_budget(max_queries, "max_queries")
        self.path = path
        self.capture_sdpa = capture_sdpa
        self.adapters = list(default_adapters() if adapters is None else adapters)
        self.differentiable = differentiable
        self.joint_attention = check_bool(joint_attention, "joint_attention")
        self.stats: dict[str, Tensor] = {}
        self.records: list[tuple[str, AttentionEntropy]] = []
        self.calls = 0
        self._undo: list[Callable[[], None]] = []
        self._stack: list[str] = []
        self._calls_in_module: dict[str, int] = {}
        self._claimed: set[str] = set()
        self._mode: _SDPAInterceptor | None = None
        self._suspended = 0
        # kept across armings, so that compiled code sees the same hooks and mode each logging step (no recompile)
        self._interceptor: _SDPAInterceptor | None = None
        self._name_hooks: dict[str, tuple[Callable[..., None], Callable[..., None]]] = {}
        self._deferred = DeferredCaptures()
        self._grad_at_arming, self._warned_no_grad = True, False  # set at each arming
        # an eager-only adapter is installed (the model given is not compiled), yet its model ran traced by dynamo (a
        # compiled wrapper or function around it): warned once, at disarm
        self._eager_capture, self._traced_eagerly, self._warned_traced = False, False, False
        self._replaying: tuple[str, str] | None = None  # (module, site) of the deferred call being scored

    # ------------------------------------------------------------------ lifecycle
    @property
    def armed(self) -> bool:
        return self._mode is not None or bool(self._undo)

    def arm(self) -> AttentionTap:
        """Install the name-tracking hooks, the adapters and the SDPA interceptor."""
        if self.armed:
            return self
        self._calls_in_module.clear()  # same state at every arming: compiled code guards on it
        self._grad_at_arming, self._warned_no_grad = torch.is_grad_enabled(), False
        self._eager_capture = False
        try:
            self._undo.append(FastpathHold(self.model))  # torch's fused encoder paths bypass what the tap sees
            for name, module in named_modules(self.model):  # clean names: no "_orig_mod." from torch.compile
                if name not in self._name_hooks:
                    self._name_hooks[name] = (self._enter(name), self._exit(name))
                enter, exit_ = self._name_hooks[name]  # the same hook objects at every arming
                self._undo.append(module.register_forward_pre_hook(enter).remove)
                # no always_call: its hook ids would enter dynamo's guards (new ids at each arming, a recompile at
                # every logging step); _exit also pops what a child left when an exception was caught above it
                self._undo.append(module.register_forward_hook(exit_).remove)
            for adapter in self._adapters_to_install():
                undo = adapter.install(self, self.model)
                self._undo.extend(undo)
                if undo and type(adapter).__name__ in _EAGER_ONLY_ADAPTERS:
                    self._eager_capture = True  # (only on a model not compiled: _adapters_to_install)
            if self.capture_sdpa:
                if self._interceptor is None:
                    self._interceptor = _SDPAInterceptor(self)
                self._mode = self._interceptor
                self._mode.__enter__()
        except BaseException:
            self.disarm()
            raise
        _ACTIVE_TAPS.append(self)
        return self

    def _adapters_to_install(self) -> list[AttentionAdapter]:
        """The adapters, less the built-in ones that cannot run inside a compiled graph when the model is compiled.

        Their hooks and wrappers capture eagerly (frame inspection, torch-function-mode switching, the entropy maths):
        traced, they break the graph in every attention layer and recompile it per layer. Compiled HF models'
        attention is captured where it calls ``F.scaled_dot_product_attention`` (``sdpa``), queued by the
        interceptor (see :mod:`entrotrain.taps.deferred`); ``nn.MultiheadAttention``'s adapter queues its own calls."""
        if not (self.capture_sdpa and is_compiled(self.model)):
            return self.adapters
        keep = [a for a in self.adapters if type(a).__name__ not in _EAGER_ONLY_ADAPTERS]
        if len(keep) < len(self.adapters):
            from entrotrain.taps.compiled_padding import CompiledHFMasks  # HF models' padding masks, compile-safe

            _warn_eager_attention(self.model)
            keep.append(CompiledHFMasks())
        return keep

    def disarm(self) -> None:
        """Remove every hook, adapter and the interceptor. Safe to call twice, and after an exception.

        Calls that compiled code queued while armed are scored first (see :mod:`entrotrain.taps.deferred`)."""
        try:
            self._replay_deferred()
        finally:
            self._release_hooks()
        if self._traced_eagerly and not self._warned_traced:
            self._warned_traced = True
            warnings.warn(
                f"AttentionTap: {self._root_name} ran under torch.compile, but the tap was given the uncompiled module "
                "inside (a compiled wrapper or function around the model, e.g. transformers' "
                "TrainingArguments(torch_compile=True)), so its eager HF attention capture was traced: graph breaks "
                "in every layer and a recompile at each arming. Give the tap the compiled module "
                "(AttentionTap(torch.compile(model)) or that wrapper: same names), or compile the model itself rather "
                "than a function calling it.",
                stacklevel=2,
            )

    def _release_hooks(self) -> None:
        self._deferred.clear()
        if self._mode is not None:
            mode, self._mode = self._mode, None
            if not self._suspended:
                remove_mode(mode)  # not simply pop the top: another tap's mode may sit above ours
        if self._suspended:
            fastpath.drop()  # released inside a captured nn.MultiheadAttention call (an exception went through it)
        self._suspended = 0
        undo, self._undo = self._undo, []
        for fn in reversed(undo):
            fn()
        self._stack.clear()
        self._claimed.clear()
        self._calls_in_module.clear()
        if self in _ACTIVE_TAPS:
            _ACTIVE_TAPS.remove(self)

    def _suspend_sdpa(self) -> None:
        """An adapter captured the module now running: its SDPA calls are not intercepted, and its own native fast
        path is allowed again (:func:`entrotrain.taps.fastpath.lift`), until :meth:`_resume_sdpa`."""
        if self._suspended == 0:
            if self._mode is not None:
                remove_mode(self._mode)
            fastpath.lift()
        self._suspended += 1

    def _resume_sdpa(self) -> None:
        if self._suspended:
            self._suspended -= 1
            if self._suspended == 0:
                fastpath.drop()
                if self._mode is not None:
                    torch._C._push_on_torch_function_stack(self._mode)

    def __enter__(self) -> AttentionTap:
        return self.arm()

    def __exit__(self, *exc: object) -> None:
        self.disarm()

    def reset(self) -> None:
        """Forget accumulated statistics and records (sites and their order are kept)."""
        self.stats = {name: torch.zeros_like(value) for name, value in self.stats.items()}
        self.records.clear()
        self.calls = 0

    # ------------------------------------------------------------------ naming
    def _enter(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            if compiling() and self._eager_capture:
                self._traced_eagerly = True  # warned at disarm (eagerly)
            self._stack.append(name)
            self._calls_in_module[name] = 0

        return hook

    def _exit(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if name in self._stack:
                while self._stack.pop() != name:
                    pass

        return hook

    def current_module(self) -> str | None:
        """Name of the innermost module of ``model`` now running forward (``""`` = the model itself).

        Names are those of :func:`entrotrain.taps.module_names.named_modules`: no ``_orig_mod.`` segment."""
        if self._replaying is not None:
            return self._replaying[0]
        return self._stack[-1] if self._stack else None

    def wants(self, name: str) -> bool:
        """Whether a site name passes ``include`` / ``exclude``."""
        return self._names(clean_module_name(name))

    def claim(self, module_name: str) -> None:
        """An adapter captures this module itself: SDPA calls made inside it are not scored a second time."""
        self._claimed.add(clean_module_name(module_name))

    def _site_name(self, module: str) -> str:
        if self._replaying is not None:
            return self._replaying[1]  # decided when compiled code queued the call
        module = clean_module_name(module)
        count = self._calls_in_module.get(module, 0)
        self._calls_in_module[module] = count + 1
        base = module or self._root_name  # (not read off self.model here: dynamo traces this under compile)
        return base if count == 0 else f"{base}[{count}]"

    # ------------------------------------------------------------------ compiled code (torch.compile)
    def _defer_sdpa(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """Traced by dynamo: queue an SDPA call with its site, decided now as :meth:`_on_sdpa` would decide it."""
        module = self.current_module()
        if module is None or module in self._claimed or not capture_allowed(self):
            return
        site = self._site_name(module)
        if not self.differentiable:
            args, kwargs = detached(args), detached(kwargs)
        self._deferred.add("sdpa", module, site, args, kwargs)
        self._defer_user_mask(module, site)

    def _defer_record(self, site: str, call: dict[str, Any]) -> None:
        """Traced by dynamo: queue a :meth:`record` call (an adapter's or ``record_attention``'s: ``call`` holds
        ``q``, ``k``, masks, scale and an optional ``query_mask``)."""
        if not self.differentiable:
            call = detached(call)
        self._deferred.add("record", site, site, (), call)
        if call.get("query_mask") is None:  # no mask of its own: the enclosing query_padding block's applies
            self._defer_user_mask(site, site)

    def _defer_user_mask(self, module: str, site: str) -> None:
        """A `with query_padding(mask):` block is over when the queued call is scored: queue its mask after it."""
        if _USER_QUERY_MASKS:
            self._deferred.add("user_mask", module, site, (_USER_QUERY_MASKS[-1][0],), None)

    def _replay_deferred(self) -> None:
        """Score, eagerly and in order, the calls compiled code queued (no-op when none is queued)."""
        items = self._deferred.drain()
        for i, (kind, module, site, args, kwargs) in enumerate(items):
            if kind == "push":  # an HF model's forward starts / ends (compiled_padding)
                push_model_mask(self, *args)
                continue
            if kind == "pop":
                pop_model_mask(self)
                continue
            if kind == "user_mask":
                continue  # read with the call it follows
            after = items[i + 1] if i + 1 < len(items) else None
            user_mask = after[3][0] if after is not None and after[0] == "user_mask" else None
            self._replaying = (module, site)
            try:
                with query_padding(user_mask) if user_mask is not None else nullcontext():
                    if kind == "sdpa":
                        self._on_sdpa(args, kwargs)
                    else:
                        self.record(name=site, **kwargs)
            finally:
                self._replaying = None

    # ------------------------------------------------------------------ capture
    def _on_sdpa(self, args: tuple, kwargs: dict[str, Any], joint_allowed: bool = True) -> Tensor | None:
        """Score one SDPA call; returns its output when the tap computed it (``joint_attention``), else ``None``.

        A joint call does not reach the modes below this tap's: other taps' interceptors there are handed the call
        (with ``joint_allowed=False``), so a monitor armed beside a regulariser sees what it sees without it, and the
        model computes the same with or without the monitor. Any other torch-function mode below keeps SDPA."""
        module = self.current_module()
        if module is None or module in self._claimed or not capture_allowed(self):
            return None  # outside the tapped model (another model, plain code), captured by an adapter, or excluded
        site = self._site_name(module)
        if not self.wants(site):
            return None
        call = dict(zip(_SDPA_ARGS, args))
        call.update(kwargs)
        query, key = call["query"], call["key"]
        if query.dim() != 4:
            raise TapError(
                f"scaled_dot_product_attention in module {module!r} was called with {query.dim()}-D tensors; the "
                "attention tap needs (batch, heads, tokens, head_dim). Reshape to 4-D before the call, or exclude "
                "the module with exclude=[...]."
            )
        lower = _taps_below() if joint_allowed and self._joint(call) else None  # (a monitor's tap: never looked up)
        if lower is not None:
            out = self._record_joint(site, call)
            for tap in lower:  # the entrotrain taps whose interceptors sit below: they see the call as if it ran on
                tap._replay_deferred()
                tap._on_sdpa(args, kwargs, joint_allowed=False)
            return out
        with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
            self.record(
                query,
                key,
                name=site,
                attn_mask=call.get("attn_mask"),
                is_causal=bool(call.get("is_causal") or False),
                scale=call.get("scale"),
            )
        return None

    def _joint_candidate(self) -> bool:
        """Whether SDPA calls now may be computed jointly with their entropy (the call itself decides the rest): an
        adapter whose model calls ``F.scaled_dot_product_attention`` itself (HF's ``sdpa``) then leaves the call to
        the interceptor instead of recording it."""
        return (
            self.joint_attention
            and self.differentiable
            and self.path == "auto"
            and torch.is_grad_enabled()
            and self._mode is not None
            and not self._suspended
            and not compiling()
        )

    def _joint(self, call: dict[str, Any]) -> bool:
        """Whether this SDPA call is computed with its entropy (see ``joint_attention`` in the class docstring)."""
        if not self._joint_candidate():
            return False
        if self._replaying is not None:
            return False  # a replayed (compiled) call has its output already
        if _saved_tensor_hooks_active():
            return False  # activation checkpointing recomputes the region with SDPA: the saves must match
        query, key, value = call["query"], call["key"], call.get("value")
        if not (query.requires_grad or key.requires_grad):
            return False
        if not joint_attention_applies(
            query, key, value, call.get("attn_mask"), call.get("dropout_p") or 0.0, bool(call.get("enable_gqa"))
        ):
            return False
        # SDPA's own semantics for non-finite keys / values (its kernels skip hidden key blocks): one reduction each
        # decides (a finite sum that overflows only sends the call to SDPA)
        return math.isfinite(float(key.detach().sum() + value.detach().sum()))

    def _record_joint(self, site: str, call: dict[str, Any]) -> Tensor:
        """The call's output and its entropy from one :func:`~entrotrain.functional.attention_joint.joint_attention`
        (``attention_with_entropy`` without its checks); the entropy is stored as :meth:`record` stores it (sampling
        budgets applied to the per-query results)."""
        query = call["query"]
        out, result = joint_attention(  # the call was checked by _joint: k and v finite
            query,
            call["key"],
            call["value"],
            call.get("attn_mask"),
            bool(call.get("is_causal") or False),
            call.get("scale"),
            bool(call.get("enable_gqa")),
            finite_keys=True,
        )
        query_mask = _query_mask(self, site, query, None)
        rows = evenly_spaced(query.shape[0], self.max_rows, query.device)
        queries = evenly_spaced(query.shape[2], self.max_queries, query.device)
        for dim, index in ((0, rows), (2, queries)):
            if index is not None:
                result = AttentionEntropy(*(x.index_select(dim, index) for x in result))
                if query_mask is not None:
                    query_mask = query_mask.index_select(min(dim, 1), index)
        self._store(site, result, query_mask)
        return out

    def record(
        self,
        q: Tensor,
        k: Tensor,
        *,
        name: str | None = None,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        window: int | None = None,
        scale: float | None = None,
        query_mask: Tensor | None = None,
    ) -> None:
        """Score one attention call; arguments as :func:`~entrotrain.functional.attention_entropy_stats`.

        ``query_mask`` ``(batch, queries)``, bool or 0/1 (True / 1 = real): padded queries are not scored. ``None``:
        the mask of the HF model or ``query_padding`` block around the call, if any (see the class docstring).
        """
        if not capture_allowed(self):
            return  # inside another monitor's exclusive_capture block (its probe forwards)
        site = self._site_name(self.current_module()) if name is None else name
        if not self.wants(site):
            return
        _check_qk(q, k)  # before sampling indexes dims 0 and 2
        if self.differentiable and not torch.is_grad_enabled() and self._grad_at_arming and not self._warned_no_grad:
            self._warned_no_grad = True
            warnings.warn(
                f"AttentionTap(differentiable=True): the attention at {site!r} ran with gradients off inside a "
                "forward armed with them on, so a regulariser gets no gradient from it. This is what reentrant "
                "activation checkpointing does (torch.utils.checkpoint(..., use_reentrant=True), or HF "
                "gradient_checkpointing_enable() with use_reentrant=True): use use_reentrant=False.",
                stacklevel=3,
            )
        query_mask = _query_mask(self, site, q, query_mask)
        if not self.differentiable:
            q, k = q.detach(), k.detach()
            attn_mask = None if attn_mask is None else attn_mask.detach()
        q, k, attn_mask, key_padding_mask, is_causal, window, query_mask = self._sample(
            q, k, attn_mask, key_padding_mask, is_causal, window, query_mask
        )
        with _entropy_saves_kept(self.differentiable):
            result = attention_entropy_stats(
                q,
                k,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                is_causal=is_causal,
                window=window,
                scale=scale,
                path=self.path,
            )
        self._store(site, result, query_mask)

    def _store(self, site: str, result: AttentionEntropy, query_mask: Tensor | None) -> None:
        """Keep a call's per-query results (differentiable taps) and add its per-head sums to :attr:`stats`."""
        if self.differentiable:
            self.records.append((site, mask_queries(result, query_mask)))
        with torch.no_grad():
            sums = per_head_sums(result, query_mask)
        if site in self.stats and self.stats[site].shape == sums.shape:
            self.stats[site] += sums
        elif site in self.stats:
            raise TapError(f"attention site {site!r} changed its number of heads between calls: {sums.shape[1]}.")
        else:
            self.stats[site] = sums
        self.calls += 1

    def _sample(self, q, k, attn_mask, key_padding_mask, is_causal, window, query_mask=None):
        """Evenly spaced rows and query positions within the budgets (padded ones are dropped afterwards)."""
        rows = evenly_spaced(q.shape[0], self.max_rows, q.device)
        if rows is not None:
            q, k = q.index_select(0, rows), k.index_select(0, rows)
            query_mask = None if query_mask is None else query_mask.index_select(0, rows)
            if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[0] > 1:
                attn_mask = attn_mask.index_select(0, rows)
            if key_padding_mask is not None and key_padding_mask.shape[0] > 1:
                key_padding_mask = key_padding_mask.index_select(0, rows)
        queries = evenly_spaced(q.shape[2], self.max_queries, q.device)
        if queries is None:
            return q, k, attn_mask, key_padding_mask, is_causal, window, query_mask
        if query_mask is not None:
            query_mask = query_mask.index_select(1, queries)
        mask = AttentionMask(
            (q.shape[0], q.shape[1], q.shape[2], k.shape[2]),
            attn_mask=attn_mask,
            key_padding_mask=key_padding_mask,
            is_causal=is_causal,
            window=window,
            device=q.device,
        )
        valid, bias = mask.select(queries)
        if bias is not None:
            blocked = torch.tensor(float("-inf"), dtype=bias.dtype, device=bias.device)
            attn_mask = bias if valid is None else torch.where(valid, bias, blocked)
        else:
            attn_mask = valid
        return q.index_select(2, queries), k, attn_mask, None, False, None, query_mask


def record_attention(
    q: Tensor,
    k: Tensor,
    *,
    name: str | None = None,
    attn_mask: Tensor | None = None,
    key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    query_mask: Tensor | None = None,
) -> None:
    """Hand ``q, k`` of custom attention code to every armed :class:`AttentionTap`; a no-op when none is armed.

    Call it inside your attention module's ``forward`` with the tensors your scores come from (after RoPE, before
    softmax): ``q`` ``(batch, heads, queries, head_dim)``, ``k`` ``(batch, kv_heads, keys, head_dim)``; masks and
    ``scale`` as :func:`~entrotrain.functional.attention_entropy_stats`. ``query_mask`` ``(batch, queries)`` (bool or
    0/1, True / 1 = real token) leaves padded queries out; without it, an enclosing ``query_padding`` block's mask
    applies (:mod:`entrotrain.taps.query_padding`). The site is named after the module running it, or ``name``.
    Costs one list check when nothing is armed.
    """
    if not _ACTIVE_TAPS:
        return
    for tap in list(_ACTIVE_TAPS):
        if name is None and tap.current_module() is None:
            continue  # this call does not run inside the tap's model
        module = tap.current_module()
        if name is None and module in tap._claimed:
            continue
        if compiling():  # traced by dynamo: queue the call, scored eagerly after the forward (no graph break)
            if not capture_allowed(tap):
                continue
            site = name if name is not None else tap._site_name(module)
            call = dict(q=q, k=k, attn_mask=attn_mask, key_padding_mask=key_padding_mask, is_causal=is_causal,
                        window=window, scale=scale, query_mask=query_mask)
            tap._defer_record(site, call)
            continue
        with torch.set_grad_enabled(tap.differentiable and torch.is_grad_enabled()):
            tap.record(
                q,
                k,
                name=name,
                attn_mask=attn_mask,
                key_padding_mask=key_padding_mask,
                is_causal=is_causal,
                window=window,
                scale=scale,
                query_mask=query_mask,
            )


def _taps_below() -> list[AttentionTap] | None:
    """The taps whose SDPA interceptors sit below the running one on the torch-function mode stack (inside a mode's
    handler the stack holds only the modes below it), or ``None`` when a mode of another kind is among them."""
    stack = getattr(torch.overrides, "_get_current_function_mode_stack", None)
    if stack is None:  # a torch without the accessor: only an empty stack is known to be safe
        return None if torch._C._len_torch_function_stack() else []
    taps = []
    for mode in stack():
        if not isinstance(mode, _SDPAInterceptor):
            return None
        taps.append(mode.tap)
    return taps


def _kept(tensor: Tensor) -> Tensor:
    return tensor


def _entropy_saves_kept(differentiable: bool) -> Any:
    """A differentiable tap's entropy keeps its saved tensors itself, out of any enclosing saved-tensor hooks.

    Activation checkpointing (``torch.utils.checkpoint``, non-reentrant) packs every tensor the region saves and, in
    backward, recomputes the region to get them back, *without* the tap: a tensor the entropy had saved through its
    hooks would be missing from the recomputation (torch's ``CheckpointError``). Kept here, the region's own saves
    match, and the entropy's graph holds its few tensors as a plain autograd graph does."""
    if not differentiable:
        return nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_kept, _kept)


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks (activation checkpointing, CPU offloading) wrap the current forward."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


def _query_mask(tap: AttentionTap, site: str, q: Tensor, query_mask: Tensor | None) -> Tensor | None:
    """The call's query mask ``(batch, queries)`` bool: the one given (checked), else the ambient one, else ``None``."""
    if query_mask is not None:
        return check_query_mask(query_mask, q.shape[0], q.shape[2]).to(q.device)
    return ambient_query_mask(tap, site, q.shape[0], q.shape[2], q.device)
