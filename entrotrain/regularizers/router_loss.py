r"""Router auxiliary losses as composable regularisers: DynMoLE's Tsallis loss, load balancing, ST-MoE z-loss.

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
normalised sigmoid scores or its ``e_score_correction_bias`` choice (DeepSeek-V3 balances mainly with that bias; its small sequence-wise loss is
of the normalised sigmoid scores, which these losses are not). :class:`~entrotrain.callbacks.RouterEntropyMonitor` reports the model's own scoring and choice.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from entrotrain._validation import check_bool, check_int, check_real
from entrotrain.errors import EntrotrainError
from entrotrain.functional.router_losses import (
    RouterLogits,
    dynmole_router_terms,
    load_balancing_loss,
    router_z_loss,
)
from entrotrain.functional.routing import check_eps, check_order
from entrotrain.regularizers.composition import Regularizer, RegularizerOutput, Schedule

__all__ = ["LoadBalancingLoss", "RouterInputs", "RouterZLoss", "TsallisRouterLoss"]


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
        self._capture.records = _captured_inputs(tap)  # type: ignore[assignment]

    def forward(self, *inputs: Any, step: int | None = None, **groups: Any) -> RegularizerOutput:
        if step is not None:
            self.set_step(step)
        inputs = self._group_inputs(inputs, groups)
        captured = not inputs
        if captured:
            inputs = (self._take_captured(),)
        if not self.is_active():  # weight 0: not evaluated, an exact 0 (composition module docstring)
            return self._zero_output(inputs)
        x = router_inputs(*inputs)
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

    Args:
        weight: coefficient (Switch 0.01; HF Mixtral/Qwen 0.001, OLMoE 0.01).
        top_k: experts per token of the router (``1`` = Switch).
        normalize: divide by ``top_k`` (balanced value 1).
        per_layer: mean of per-layer losses instead of pooled statistics.
        include: router module globs :meth:`capture` taps (``None`` = HF router discovery).
        schedule, final_weight, total_steps, name: as :class:`Regularizer`.
    """

    name = "load_balancing"

    def __init__(
        self, weight: float = 0.01, top_k: int = 2, *, normalize: bool = False, per_layer: bool = False,
        schedule: Schedule = "constant", final_weight: float = 0.0, total_steps: int | None = None,
        name: str | None = None, include: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.include = include
        self.top_k = check_int(top_k, "top_k", low=1)
        self.normalize = check_bool(normalize, "normalize")
        self.per_layer = check_bool(per_layer, "per_layer")

    def penalty(self, x: RouterInputs) -> Tensor:
        return load_balancing_loss(
            x.router_logits, self.top_k, mask=x.mask, normalize=self.normalize, per_layer=self.per_layer
        )


class RouterZLoss(_RouterRegularizer):
    r"""ST-MoE router z-loss :math:`w\cdot\frac1T\sum_x \mathrm{lse}(z(x))^2`
    (:func:`~entrotrain.functional.router_losses.router_z_loss`; Zoph et al. 2022, weight 0.001).
    Args as :class:`Regularizer`; ``include``: router module globs :meth:`capture` taps (``None`` = HF router
    discovery)."""

    name = "router_z"

    def __init__(
        self, weight: float = 0.001, *, schedule: Schedule = "constant", final_weight: float = 0.0,
        total_steps: int | None = None, name: str | None = None, include: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.include = include

    def penalty(self, x: RouterInputs) -> Tensor:
        return router_z_loss(x.router_logits, mask=x.mask)


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
