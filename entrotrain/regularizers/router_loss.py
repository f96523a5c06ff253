r"""Router auxiliary losses as composable regularisers: DynMoLE's Tsallis loss, load balancing, ST-MoE z-loss,
DeepSeek-V3's sequence-wise balance loss.

The maths lives in :mod:`entrotrain.functional.router_losses` (formulas, choices and papers there); these classes add
the weight, its schedule, ``+`` composition and named ``parts``.

**Call convention** (every term of a sum gets the same inputs):

- ``reg(router_logits)`` — a ``(rows, E)`` tensor or a tuple/list of them, one per MoE layer (HF's
  ``outputs.router_logits``, :class:`~entrotrain.models.tiny_moe.TinyMoE`'s second output);
- ``reg(router_logits, mask)`` or ``reg(RouterInputs(router_logits, mask))`` — with a keep mask of one element per
  row (HF's ``(batch, seq)`` ``attention_mask``), applied to every layer;
- ``reg(outputs)`` — a mapping with ``"router_logits"`` (and optionally ``"attention_mask"`` or ``"mask"``), or an
  object with a ``router_logits`` attribute (an HF ``MoeCausalLMOutputWithPast``).

A plain tuple is always the per-layer logits (a tuple of two layers is not a (logits, mask) pair): use
:class:`RouterInputs` or two arguments for a mask. In a LightningModule::

    out = self.router_reg(router_logits, step=self.global_step)
    self.log_dict({f"reg/{k}": v for k, v in out.parts.items()})
    loss = loss + out.total

**Capture** (``capture_group = "router"``): ``with reg.capture(model): ...`` arms a differentiable
:class:`~entrotrain.taps.RouterTap` on the routers named by ``include`` (globs; ``None`` = HF router discovery), and
the next call without inputs reads its logits (one tensor per router, its calls concatenated) and leaves padding out
as HF's ``load_balancing_loss_func(..., attention_mask)`` does: the tap records the 2-D ``attention_mask`` of each HF
model forward it runs in (else a :func:`~entrotrain.taps.query_padding.query_padding` block's mask) and the loss gets
it as its keep mask. A mask that does not fit a router's ``batch·seq`` rows keeps every row, with one warning. So
router losses compose with attention and representation
regularisers under one capture::

    reg = AttentionEntropyMaximization(0.01) + RouterZLoss(1e-3, include=["layers.*.router"])
    with reg.capture(model):
        logits = model(x)
    loss = loss + reg(step=step).total

or, given inputs, by capture group: ``reg(attention=tap.records, router=router_logits)``.

Sigmoid-scored routers (DeepSeek-V3 and the HF ``*TopkRouter`` classes built like it, which the tap discovers): the
losses are still of :math:`\mathrm{softmax}(z)` and its top k (:mod:`entrotrain.functional.router_losses`), as HF's
own ``load_balancing_loss_func`` computes them for every family (MiniMax-M2's included), not of the model's
normalised sigmoid scores or its ``e_score_correction_bias`` choice. DeepSeek-V3 balances mainly with that bias, plus
a small sequence-wise loss of the normalised sigmoid scores and the experts the router picked:
:class:`SequenceBalanceLoss`, which captures the router's own ids and scoring (its call convention differs: it needs
those ids). :class:`~entrotrain.callbacks.RouterEntropyMonitor` reports the model's own scoring and choice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from entrotrain._validation import check_bool, check_int, check_real, keep_mask
from entrotrain.errors import EntrotrainError
from entrotrain.functional.router_losses import (
    RouterLogits,
    dynmole_router_terms,
    load_balancing_loss,
    router_z_loss,
    sequence_balance_sums,
)
from entrotrain.functional.routing import check_eps, check_order, check_scoring
from entrotrain.regularizers.composition import Regularizer, RegularizerOutput, Schedule

__all__ = [
    "ChosenRouterInputs",
    "LoadBalancingLoss",
    "RouterInputs",
    "RouterZLoss",
    "SequenceBalanceLoss",
    "TsallisRouterLoss",
]


class RouterInputs(NamedTuple):
    """Router logits (one ``(rows, E)`` tensor per MoE layer) and an optional keep mask of the rows."""

    router_logits: RouterLogits
    mask: Tensor | None = None


def router_inputs(*inputs: Any) -> RouterInputs:
    """Normalise the accepted call forms (module docstring) to :class:`RouterInputs`."""
    if len(inputs) == 2:
        return RouterInputs(inputs[0], inputs[1])
    if len(inputs) != 1:
        raise EntrotrainError(
            f"router regularisers take (router_logits), (router_logits, mask) or one RouterInputs, got {len(inputs)} "
            "inputs; or none, after `with reg.capture(model): ...`."
        )
    (x,) = inputs
    if isinstance(x, RouterInputs):
        return x
    if isinstance(x, Mapping):
        if "router_logits" not in x:
            raise EntrotrainError(
                f"a mapping given to a router regulariser needs a 'router_logits' key, got keys {sorted(x)}."
            )
        return RouterInputs(x["router_logits"], x.get("attention_mask", x.get("mask")))
    if not isinstance(x, (Tensor, tuple, list)) and hasattr(x, "router_logits"):
        if x.router_logits is None:
            raise EntrotrainError("the model output has router_logits=None: call the model with output_router_logits=True.")
        return RouterInputs(x.router_logits)
    return RouterInputs(x)


def _captured_inputs(tap: Any) -> RouterInputs:
    """A :class:`~entrotrain.taps.RouterTap`'s logits as inputs: one tensor per router (module order), its calls
    concatenated, and the keep mask of their rows (the padding mask the tap recorded per call; ``None`` when every row
    is real). The functional losses take one mask for every layer: when the routers' masks differ (routers run in
    different calls), each router's padded rows are dropped instead, which pools the same real rows."""
    names = [n for n in tap.names if tap.captures.get(n)]
    logits = [_cat(tap.captures[n]) for n in names]
    masks = [_cat_masks(tap.captures[n], tap.masks.get(n, [])) for n in names]
    if all(m is None for m in masks):
        return RouterInputs(tuple(logits))
    keep = [_keep(z, m) for z, m in zip(logits, masks)]
    if all(k.shape == keep[0].shape and torch.equal(k, keep[0]) for k in keep[1:]):
        return RouterInputs(tuple(logits), keep[0])
    return RouterInputs(tuple(z[k] for z, k in zip(logits, keep)))


def _cat(tensors: list[Tensor]) -> Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


def _cat_masks(calls: list[Tensor], masks: list[Tensor | None]) -> Tensor | None:
    """The keep mask of a router's concatenated calls (``None`` when every call's rows are all real)."""
    if len(masks) != len(calls) or all(m is None for m in masks):
        return None
    return _cat([_keep(z, m) for z, m in zip(calls, masks)])


def _keep(logits: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device) if mask is None else mask


class _RouterRegularizer(Regularizer):
    """Router input handling and ``capture`` (a differentiable RouterTap on ``include``)."""

    capture_group = "router"
    include: str | Sequence[str] | None = None

    @contextmanager
    def capture(self, model: nn.Module, *, step: int | None = None, **tap_kwargs: Any) -> Iterator[Any]:
        """Arm a differentiable :class:`~entrotrain.taps.RouterTap` on ``model`` for the ``with`` body (routers from
        ``include=`` here or this regulariser's ``include``; ``None`` = HF router discovery); the next call without
        inputs uses and releases its logits, with the padding mask the tap recorded (module docstring).
        ``tap_kwargs`` go to the tap (``exclude=``, ``output_index=``).
        ``step`` and weight 0 as :meth:`Regularizer.capture <entrotrain.regularizers.composition.Regularizer.capture>`
        (no tap, yields ``None``)."""
        from entrotrain.taps.router_tap import RouterTap  # regularisers sit above taps; import on use

        if tap_kwargs.pop("differentiable", True) is not True:
            raise EntrotrainError("Regularizer.capture needs a differentiable tap; drop differentiable=False.")
        include = tap_kwargs.pop("include", self.include)
        if self._skip_capture(model, step):
            yield None
            return
        tap = RouterTap(model, include=include, differentiable=True, token_masks=True, **tap_kwargs)
        self._capture.records = None
        with tap:
            yield tap
        self._capture.records = self._captured(tap)  # type: ignore[assignment]

    def _captured(self, tap: Any) -> Any:
        """What :meth:`capture` leaves for the next call: the tap's logits and keep mask as :class:`RouterInputs`."""
        return _captured_inputs(tap)

    def _inputs(self, *inputs: Any) -> Any:
        return router_inputs(*inputs)

    def forward(self, *inputs: Any, step: int | None = None, **groups: Any) -> RegularizerOutput:
        if step is not None:
            self.set_step(step)
        inputs = self._group_inputs(inputs, groups)
        captured = not inputs
        if captured:
            inputs = (self._take_captured(),)
        if not self.is_active():  # weight 0: not evaluated, an exact 0 (composition module docstring)
            return self._zero_output(inputs)
        x = self._inputs(*inputs)
        if captured and not x.router_logits:
            raise EntrotrainError(
                f"{type(self).__name__}.capture recorded no router call: no router ran inside the `with` block. "
                "Run the model's forward there, and name its routers with include=[globs] (e.g. ['layers.*.router'])."
            )
        return self._weighted(x)

    def _weighted(self, x: RouterInputs) -> RegularizerOutput:
        total = self.current_weight() * self.penalty(x)
        return RegularizerOutput(total, {self.name: total.detach()})


class LoadBalancingLoss(_RouterRegularizer):
    r"""Switch/HF load balancing :math:`w\cdot E\sum_i f_i P_i` (:func:`~entrotrain.functional.router_losses.
    load_balancing_loss`: top-k counts, pooled over layers, balanced value ``top_k``, 1 with ``normalize``).

    Against Megatron-LM's ``aux_loss`` (``switch_load_balancing_loss_func`` times ``moe_aux_loss_coeff``): the
    defaults follow HF (balanced value ``top_k``; :math:`f, P` pooled over all layers; softmax). Megatron divides by
    ``top_k`` (balanced value 1), lets every MoE layer add its own loss with the full coefficient (a sum over layers,
    :math:`L` times a per-layer mean) and, with ``moe_router_score_function="sigmoid"``, uses the normalised sigmoid
    scores and their top k. ``LoadBalancingLoss(coeff, k, normalize=True, sum_layers=True, scoring=...)`` is
    Megatron's loss of one micro-batch (to 1e-6 relative, tests/regularizers/test_router_losses_megatron.py);
    its ``global_aux_loss`` (counts all-reduced over data-parallel ranks) is not reproduced.

    Args:
        weight: coefficient (Switch 0.01; HF Mixtral/Qwen 0.001, OLMoE 0.01).
        top_k: experts per token of the router (``1`` = Switch).
        normalize: divide by ``top_k`` (balanced value 1; Megatron-LM).
        per_layer: mean of per-layer losses instead of pooled statistics.
        sum_layers: sum of per-layer losses (Megatron-LM: each MoE layer adds its own; implies ``per_layer``).
        scoring: ``'softmax'`` (default), or the normalised ``'sigmoid'`` / ``'sqrtsoftplus'`` scores of routers
            scoring so (Megatron's ``moe_router_score_function``); :math:`f` counts the top k of the same scores.
        include: router module globs :meth:`capture` taps (``None`` = HF router discovery).
        schedule, final_weight, total_steps, name: as :class:`Regularizer`.
    """

    name = "load_balancing"

    def __init__(
        self, weight: float = 0.01, top_k: int = 2, *, normalize: bool = False, per_layer: bool = False,
        sum_layers: bool = False, scoring: str = "softmax",
        schedule: Schedule = "constant", final_weight: float = 0.0, total_steps: int | None = None,
        name: str | None = None, include: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.include = include
        self.top_k = check_int(top_k, "top_k", low=1)
        self.normalize = check_bool(normalize, "normalize")
        self.per_layer = check_bool(per_layer, "per_layer")
        self.sum_layers = check_bool(sum_layers, "sum_layers")
        self.scoring = check_scoring(scoring)

    def penalty(self, x: RouterInputs) -> Tensor:
        return load_balancing_loss(
            x.router_logits, self.top_k, mask=x.mask, normalize=self.normalize, per_layer=self.per_layer,
            sum_layers=self.sum_layers, scoring=self.scoring,
        )


class RouterZLoss(_RouterRegularizer):
    r"""ST-MoE router z-loss :math:`w\cdot\frac1T\sum_x \mathrm{lse}(z(x))^2`
    (:func:`~entrotrain.functional.router_losses.router_z_loss`; Zoph et al. 2022, weight 0.001).
    Args as :class:`Regularizer`; ``include``: router module globs :meth:`capture` taps (``None`` = HF router
    discovery); ``sum_layers``: the sum over MoE layers of each layer's mean (Megatron-LM's ``z_loss_func`` times
    ``moe_z_loss_coeff``, added by every layer) instead of the mean over all layers' rows (default; :math:`1/L` of
    Megatron's value for :math:`L` layers of equal rows)."""

    name = "router_z"

    def __init__(
        self, weight: float = 0.001, *, sum_layers: bool = False, schedule: Schedule = "constant",
        final_weight: float = 0.0, total_steps: int | None = None, name: str | None = None,
        include: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.include = include
        self.sum_layers = check_bool(sum_layers, "sum_layers")

    def penalty(self, x: RouterInputs) -> Tensor:
        return router_z_loss(x.router_logits, mask=x.mask, sum_layers=self.sum_layers)


class TsallisRouterLoss(_RouterRegularizer):
    r"""DynMoLE's router loss :math:`\beta\,\overline{\hat S_q} + \alpha\,E\sum_i f_i P_i`
    (:func:`~entrotrain.functional.router_losses.dynmole_router_loss`; Li et al. 2025).

    ``weight`` is β (the Tsallis-entropy term, ``router_dyn_loss_coef`` 0.01) and follows the schedule;
    ``aux_weight`` is α (the soft load-balance term, ``router_aux_loss_coef`` 0.001), constant. ``parts``:
    ``{name}/entropy`` = β·S̄ and ``{name}/balance`` = α·E·Σ f P (they sum to ``total``).

    Args:
        weight: β, the entropy coefficient (minimising sharpens each token's routing).
        q: Tsallis order (1.1).
        aux_weight: α, the load-balance coefficient.
        top_p, keep_top_k, entropy_threshold: DynMoLE's hybrid routing that defines the weights :math:`f` averages
            (0.75, 2, 0.9). For a plain top-k router: ``top_p=0, keep_top_k=k, entropy_threshold=1``.
        eps: added to the probabilities in the entropy, not renormalised (1e-5).
        mask_entropy: exclude masked rows from the entropy mean (``False`` = DynMoLE, pads included).
        include: router module globs :meth:`capture` taps (``None`` = HF router discovery).
        schedule, final_weight, total_steps, name: as :class:`Regularizer` (the schedule scales β).
    """

    name = "tsallis_router"

    def __init__(
        self, weight: float = 0.01, q: float = 1.1, aux_weight: float = 0.001, *, top_p: float = 0.75,
        keep_top_k: int = 2, entropy_threshold: float = 0.9, eps: float = 1e-5, mask_entropy: bool = True,
        schedule: Schedule = "constant", final_weight: float = 0.0, total_steps: int | None = None,
        name: str | None = None, include: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.include = include
        self.q = check_order(q)
        self.aux_weight = check_real(aux_weight, "aux_weight", low=0.0)
        self.top_p = check_real(top_p, "top_p", low=0.0, high=1.0)
        self.keep_top_k = check_int(keep_top_k, "keep_top_k", low=0)
        self.entropy_threshold = check_real(entropy_threshold, "entropy_threshold", low=0.0)
        self.eps = check_eps(eps)
        self.mask_entropy = check_bool(mask_entropy, "mask_entropy")

    def _terms(self, x: RouterInputs):
        return dynmole_router_terms(
            x.router_logits, q=self.q, eps=self.eps, top_p=self.top_p, keep_top_k=self.keep_top_k,
            entropy_threshold=self.entropy_threshold, mask=x.mask, mask_entropy=self.mask_entropy,
        )

    def penalty(self, x: RouterInputs) -> Tensor:
        """:math:`\\beta_t \\bar S + \\alpha B` at the current (scheduled) β: the weights are inside (β may be 0)."""
        terms = self._terms(x)
        return self.current_weight() * terms.entropy + self.aux_weight * terms.balance

    def is_active(self, step: int | None = None) -> bool:
        """β at ``step`` or α is > 0."""
        return self.aux_weight > 0.0 or super().is_active(step)

    def always_inactive(self) -> bool:
        return self.aux_weight == 0.0 and super().always_inactive()

    def _zero_output(self, inputs: Any) -> RegularizerOutput:
        out = super()._zero_output(inputs)
        return RegularizerOutput(out.total, {f"{self.name}/entropy": out.total.detach(),
                                             f"{self.name}/balance": out.total.detach()})

    def _weighted(self, x: RouterInputs) -> RegularizerOutput:
        terms = self._terms(x)
        entropy = self.current_weight() * terms.entropy
        balance = self.aux_weight * terms.balance
        total = entropy + balance
        return RegularizerOutput(
            total, {f"{self.name}/entropy": entropy.detach(), f"{self.name}/balance": balance.detach()}
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, q={self.q}, aux_weight={self.aux_weight}, keep_top_k={self.keep_top_k}"


class ChosenRouterInputs(NamedTuple):
    """Router calls with the experts each router picked, for :class:`SequenceBalanceLoss`: per call ``(B·S, E)``
    logits, ``(B·S, K)`` ids, the ``(B, S)`` keep mask (or ``None``: all real, then ``seq_len`` is needed) and
    the router's scoring; ``router`` groups the calls of one router (one MoE layer)."""

    router_logits: Sequence[Tensor]
    chosen: Sequence[Tensor | None]
    masks: Sequence[Tensor | None]
    seq_lens: Sequence[int | None]
    scorings: Sequence[str]
    routers: Sequence[str]


class SequenceBalanceLoss(_RouterRegularizer):
    r"""DeepSeek-V3's complementary sequence-wise balance loss :math:`w\cdot\sum_{\text{layers}}
    \overline{\sum_i f_i P_i}^{\,\text{sequences}}` on the model's own choice and scores.

    DeepSeek-AI 2024, "DeepSeek-V3 Technical Report" (arXiv 2412.19437), §2.1.2, eqs. 17–20: per sequence of
    :math:`T` real tokens, :math:`f_i = \frac{N_r}{K_r T}\sum_t \mathbf 1[i\in\mathrm{chosen}_t]`,
    :math:`s'_{i,t} = s_{i,t}/\sum_j s_{j,t}`, :math:`P_i = \frac1T\sum_t s'_{i,t}`,
    :math:`L_{\mathrm{Bal}} = \sum_i f_i P_i` (:func:`~entrotrain.functional.router_losses.sequence_balance_loss`):
    a mean over the sequences of each router, summed over routers (the weight is the paper's per-layer α; DeepSeek-V3
    used 0.0001 beside its bias-based balancing). 1 per layer at balance. Gradient through :math:`P` only.

    :meth:`capture` reads, per router call, the logits, the expert ids **the router returned** (HF ``*TopkRouter``:
    ``(router_logits, weights, indices)``; DeepSeek-V3's biased, group-limited choice, not a recomputed top-k), the
    router's own scoring (:meth:`RouterTap.scoring <entrotrain.taps.RouterTap.scoring>`: sigmoid for DeepSeek-V3) and
    the ``(batch, seq)`` padding mask in force (the HF ``attention_mask``, else a ``query_padding`` block): padded
    tokens are left out, and the mask's batch splits the ``batch·seq`` rows into sequences. It refuses
    (:class:`~entrotrain.errors.EntrotrainError`) a router that returns no ids, and a call with no fitting 2-D mask
    (pass ``attention_mask`` to the model, or run it in ``with query_padding(mask):``) unless ``seq_len`` is given.
    Given inputs: a :class:`ChosenRouterInputs`, or a mapping with ``"router_logits"``, ``"chosen"`` (one tensor
    or one per layer) and ``"attention_mask"`` (``(batch, seq)``) or ``"seq_len"``.

    Against Megatron-LM's ``seq_aux_loss`` (``sequence_load_balancing_loss_func`` times ``moe_aux_loss_coeff``,
    added by every MoE layer: a sum over layers, as here): the same per-sequence :math:`\sum_i f_i P_i` averaged over
    the batch, but Megatron's :math:`f` counts the top :math:`K_r` of the scores :math:`s'`, not the experts the
    router picked with its ``expert_bias``: ``top_k=K_r`` reproduces it (to 1e-6 relative,
    tests/regularizers/test_router_losses_megatron.py, ``scoring`` = its ``moe_router_score_function``). Megatron
    orders tokens ``[seq, batch]`` and counts every position of a sequence (no padding mask); here rows are
    ``(batch, seq)`` row-major and padded tokens are left out.

    Args:
        weight: α (DeepSeek-V3: 0.0001).
        scoring: ``'sigmoid'`` / ``'softmax'`` / ``'sqrtsoftplus'`` for every router; ``None`` = each captured
            router's own (given inputs without one: ``'sigmoid'``).
        seq_len: tokens per sequence, used when no 2-D mask gives it.
        top_k: count the top ``top_k`` experts of the scores instead of the ids the routers returned (Megatron-LM's
            ``seq_aux_loss``; routers that return no ids can then be captured); ``None`` = the routers' own ids.
        include: router module globs :meth:`capture` taps (``None`` = HF router discovery).
        schedule, final_weight, total_steps, name: as :class:`Regularizer`.
    """

    name = "sequence_balance"

    def __init__(
        self, weight: float = 1e-4, *, scoring: str | None = None, seq_len: int | None = None,
        top_k: int | None = None, schedule: Schedule = "constant", final_weight: float = 0.0,
        total_steps: int | None = None,
        name: str | None = None, include: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.include = include
        self.scoring = None if scoring is None else check_scoring(scoring)
        self.seq_len = check_int(seq_len, "seq_len", low=1, none_ok=True)
        self.top_k = check_int(top_k, "top_k", low=1, none_ok=True)

    def _captured(self, tap: Any) -> Any:
        return _TapCapture(tap)  # read when called: a router without ids or sequences is refused there, not at exit

    def _inputs(self, *inputs: Any) -> ChosenRouterInputs:
        if len(inputs) == 1 and isinstance(inputs[0], ChosenRouterInputs):
            return inputs[0]
        if len(inputs) == 1 and isinstance(inputs[0], _TapCapture):
            return self._from_tap(inputs[0].tap)
        if len(inputs) == 1 and isinstance(inputs[0], Mapping) and ("chosen" in inputs[0] or self.top_k is not None):
            return self._from_mapping(inputs[0])
        raise EntrotrainError(
            "SequenceBalanceLoss needs the experts each router picked, not only its logits: call it after "
            "`with reg.capture(model): ...`, or pass ChosenRouterInputs(...) or a mapping with 'router_logits', "
            "'chosen' and 'attention_mask' (batch, seq)."
        )

    def _from_mapping(self, x: Mapping) -> ChosenRouterInputs:
        logits, chosen = x["router_logits"], x.get("chosen")
        logits = [logits] if isinstance(logits, Tensor) else list(logits)
        if chosen is None and self.top_k is not None:  # the top k of the scores are counted: no ids needed
            chosen = [None] * len(logits)
        chosen = [chosen] if isinstance(chosen, Tensor) else list(chosen)
        if len(chosen) != len(logits):
            raise EntrotrainError(
                f"'chosen' must hold one (rows, K) tensor of expert ids per router layer ({len(logits)}), got "
                f"{len(chosen)}."
            )
        mask = x.get("attention_mask", x.get("mask"))
        seq_len = x.get("seq_len", self.seq_len)
        scoring = self.scoring or "sigmoid"
        n = len(logits)
        return ChosenRouterInputs(logits, chosen, [mask] * n, [seq_len] * n, [scoring] * n, [str(i) for i in range(n)])

    def _from_tap(self, tap: Any) -> ChosenRouterInputs:
        logits, chosen, masks, seq_lens, scorings, routers = [], [], [], [], [], []
        for name in [n for n in tap.names if tap.captures.get(n)]:
            for i, z in enumerate(tap.captures[name]):
                ids = tap.chosen[name][i]
                if ids is None and self.top_k is None:
                    raise EntrotrainError(
                        f"router {name!r} returned no expert ids (no (rows, k) integer tensor beside its logits), and "
                        "SequenceBalanceLoss counts the experts the router itself picked. Tap routers that return "
                        "(logits, weights, indices) (HF *TopkRouter), e.g. include=['**.mlp.gate'], or pass "
                        "ChosenRouterInputs(...) with the ids."
                    )
                batch = tap.batches[name][i]
                if batch is None and self.seq_len is None:
                    raise EntrotrainError(
                        f"the {z.shape[0]} rows of router {name!r} cannot be split into sequences: no (batch, seq) "
                        "padding mask that fits them was in force. Pass attention_mask to the model's forward (HF), "
                        "run it inside `with query_padding(mask):`, or give SequenceBalanceLoss(seq_len=...)."
                    )
                logits.append(z)
                chosen.append(ids)
                masks.append(tap.masks[name][i])
                seq_lens.append(z.shape[0] // batch if batch is not None else self.seq_len)
                scorings.append(self.scoring or tap.scoring(name))
                routers.append(name)
        return ChosenRouterInputs(logits, chosen, masks, seq_lens, scorings, routers)

    def penalty(self, x: ChosenRouterInputs) -> Tensor:
        if not x.router_logits:
            raise EntrotrainError("SequenceBalanceLoss got no router call.")
        sums: dict[str, list[Tensor]] = {}
        for z, ids, mask, seq_len, scoring, router in zip(*x):
            keep = None
            if mask is not None:
                if mask.dim() == 2 and seq_len not in (None, mask.shape[1]):
                    raise EntrotrainError(
                        f"seq_len={seq_len} contradicts the (batch, seq) mask of shape {tuple(mask.shape)} of router "
                        f"{router!r}; drop seq_len or pass the mask of that call."
                    )
                if mask.dim() == 2:
                    seq_len = mask.shape[1]
                keep = _keep_mask(mask, z.shape[0], router)
            if seq_len is None:
                raise EntrotrainError(
                    f"the {z.shape[0]} rows of router {router!r} cannot be split into sequences (rows = batch*seq): "
                    "give its (batch, seq) attention_mask, or seq_len."
                )
            loss_sum, n_seq = sequence_balance_sums(
                z, ids, keep=keep, seq_len=seq_len, scoring=scoring, top_k=self.top_k
            )
            sums.setdefault(router, [loss_sum.new_zeros(()), n_seq.new_zeros(())])
            sums[router][0] = sums[router][0] + loss_sum
            sums[router][1] = sums[router][1] + n_seq
        return sum(total / count.clamp_min(1) for total, count in sums.values())  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scoring={self.scoring}, seq_len={self.seq_len}, top_k={self.top_k}"


class _TapCapture(NamedTuple):
    """The :class:`~entrotrain.taps.RouterTap` a :class:`SequenceBalanceLoss` capture left for its next call."""

    tap: Any


def _keep_mask(mask: Tensor, rows: int, router: str) -> Tensor:
    """The flat keep flags of one router call's ``rows`` (the per-call check; ``router_losses._layers`` checks one
    mask against every layer of a functional call)."""
    keep = keep_mask(mask, "mask")
    if keep is None or keep.numel() != rows:
        raise EntrotrainError(
            f"the mask of router {router!r} has {mask.numel()} elements (shape {tuple(mask.shape)}) but that call has "
            f"{rows} rows: SequenceBalanceLoss needs one keep flag per row of each router call, the (batch, seq) "
            "attention_mask of its (batch*seq, E) logits."
        )
    return keep.reshape(-1)
