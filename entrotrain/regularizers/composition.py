r"""A tiny base for loss regularisers: a weight, an optional weight schedule, and ``+`` / ``*`` composition.

A :class:`Regularizer` returns a :class:`RegularizerOutput`: ``total`` (weighted, keeps the graph: add it to the
loss) and ``parts`` (the weighted contribution of each named term, detached: log them).

Weight schedules, for step :math:`t` (passed as ``step=`` or set with :meth:`Regularizer.set_step`):

- ``"constant"``: :math:`w_t = w_0`.
- ``"cosine"``: :math:`w_t = w_T + (w_0 - w_T)\,\tfrac{1}{2}\big(1 + \cos(\pi \min(t, T)/T)\big)` with
  :math:`w_T` = ``final_weight`` and :math:`T` = ``total_steps`` (the AEM paper's cosine weight annealing, v3).
- ``"warmup"``: linear warm-up :math:`w_t = w_0 \min(t/T, 1)`.

Composition: ``a + b`` and ``c * a`` give a :class:`RegularizerSum` whose ``total`` is the (scaled) sum of the
terms' totals and whose ``parts`` merge the terms' parts (scaled; a repeated name gets a ``.1``, ``.2`` suffix).

Weight 0 costs nothing and changes nothing: a term whose weight (times its coefficient in a sum) is 0 at the call's
step is not evaluated, and its ``total`` is an exact 0 (float32, on the inputs' device), so ``loss + out.total`` and
its gradients are bit for bit those of ``loss`` (a penalty that is NaN or Inf there does not leak in as ``0 * NaN``).
:meth:`Regularizer.capture` arms no tap when the weight is 0 at every step (``weight=0``, or ``0 * reg``), or when it
is 0 at the ``step=`` passed to it (a warm-up's step 0): the forward then runs the model's own attention kernels.

Attention regularisers read the per-query results of a differentiable :class:`~entrotrain.taps.AttentionTap`.
:meth:`Regularizer.capture` arms one around a forward; the next call with no inputs uses (and releases) what it
recorded — one tap shared by every attention term of a sum:

    >>> with reg.capture(model):
    ...     logits = model(x)
    >>> loss = loss + reg(step=step).total

Regularisers of other inputs say what they capture with :attr:`Regularizer.capture_group`: ``"activation"`` (the
representation regularisers arm a differentiable :class:`~entrotrain.taps.ActivationTap` on their own ``include``
globs), ``"router"`` (the router losses arm a differentiable :class:`~entrotrain.taps.RouterTap` on their own
``include`` globs, or on the discovered HF routers). A sum that mixes groups arms one attention tap for all its
attention terms and each other term's own capture, and each term then reads what it captured:
``AttentionEntropyMaximization(0.01) + RouterZLoss(1e-3, include=["**.router"]) + MatrixEntropyRegularizer(1.0,
include=["proj"])`` works under one ``with reg.capture(model):``. Given inputs, every term of a sum of one group
gets the same ones; a sum of several groups takes them by group instead, ``reg(attention=tap.records,
router=router_logits, activation=act_tap)``, and raises on positional inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from entrotrain._validation import check_choice, check_int, check_real, check_str
from entrotrain.errors import EntrotrainError
from entrotrain.functional._dist import module_device

__all__ = ["Regularizer", "RegularizerOutput", "RegularizerSum", "Schedule", "combine_regularizers", "scheduled_weight"]

Schedule = Literal["constant", "cosine", "warmup"]
_SCHEDULES = ("constant", "cosine", "warmup")


class RegularizerOutput(NamedTuple):
    """What a regulariser returns.

    Attributes:
        total: the weighted penalty, a scalar that keeps the graph: ``loss = loss + out.total``.
        parts: named weighted contributions, detached (for ``self.log_dict``); they sum to ``total``.
    """

    total: Tensor
    parts: dict[str, Tensor]


def scheduled_weight(
    step: int,
    weight: float,
    schedule: Schedule = "constant",
    final_weight: float = 0.0,
    total_steps: int | None = None,
) -> float:
    """The weight at ``step`` under ``schedule`` (formulas in the module docstring); steps past ``total_steps`` hold,
    negative steps count as 0.

    ``weight`` and ``final_weight`` are finite and >= 0, ``schedule`` one of ``"constant"``, ``"cosine"``,
    ``"warmup"``, ``total_steps`` an int >= 1 for the last two, ``step`` an int; anything else raises
    :class:`~entrotrain.errors.EntrotrainError`. The result is finite and >= 0.
    """
    step = check_int(step, "step")
    weight = check_real(weight, "weight", low=0.0)  # type: ignore[assignment]
    final_weight = check_real(final_weight, "final_weight", low=0.0)  # type: ignore[assignment]
    check_choice(schedule, "schedule", _SCHEDULES)
    if schedule == "constant":
        return weight
    if total_steps is None:
        raise EntrotrainError(
            f"schedule={schedule!r} needs total_steps (the length of the schedule in steps), got None; e.g. "
            "total_steps=trainer.max_steps."
        )
    check_int(total_steps, "total_steps", low=1)
    frac = min(max(step, 0), total_steps) / total_steps
    if schedule == "cosine":  # the convex form: exact at both ends and never outside [weight, final_weight]
        c = 0.5 * (1.0 + math.cos(math.pi * frac))
        return weight * c + final_weight * (1.0 - c)
    return weight * frac  # warmup


def _add_non_regularizer(reg: Regularizer, other: Any) -> RegularizerSum:
    """``reg + 0`` / ``0 + reg`` (``sum([a, b])`` starts from 0): ``reg`` as a sum; anything else raises."""
    if isinstance(other, (int, float)) and not isinstance(other, bool) and other == 0:
        return reg if isinstance(reg, RegularizerSum) else RegularizerSum([(1.0, reg)])
    raise EntrotrainError(
        f"a Regularizer can only be added to another Regularizer (or 0, as in sum([a, b])), got "
        f"{type(other).__name__} {other!r}; scale with c * reg, and add the penalty to the loss as "
        "loss + reg(...).total."
    )


def _check_coefficient(coeff: float) -> float:
    """A composition coefficient ``c`` of ``c * reg``: finite and >= 0 (a negative one would reward the penalty)."""
    return check_real(coeff, "coefficient of c * regularizer", low=0.0)  # type: ignore[return-value]


class _Capture:
    """Per-regulariser holder of the records captured by :meth:`Regularizer.capture`."""

    def __init__(self) -> None:
        self.records: list[Any] | None = None


class _Skipped(NamedTuple):
    """What :meth:`Regularizer.capture` leaves when it armed nothing (the weight was 0): the step it saw and the
    model's device (for the exact-zero total)."""

    step: int
    device: torch.device


def _find_device(obj: Any, depth: int = 0) -> torch.device:
    """The device of the first tensor in ``obj`` (a tensor, records, a tap, a mapping or sequence of them); CPU if
    there is none."""
    if isinstance(obj, Tensor):
        return obj.device
    if isinstance(obj, _Skipped):
        return obj.device
    if depth < 4:
        if isinstance(obj, Mapping):
            obj = list(obj.values())
        elif not isinstance(obj, (list, tuple)):
            obj = [getattr(obj, a) for a in ("records", "captures", "rows", "router_logits") if hasattr(obj, a)]
        for item in obj:
            dev = _find_device(item, depth + 1)
            if dev.type != "cpu":
                return dev
    return torch.device("cpu")


def _exact_zero(inputs: Any) -> Tensor:
    """The total of a term of weight 0: an exact float32 0 on the inputs' device (``loss + 0`` is ``loss`` bit for
    bit); it requires grad when grad mode is on, so ``out.total.backward()`` still works (and touches no model)."""
    return torch.zeros((), dtype=torch.float32, device=_find_device(inputs), requires_grad=torch.is_grad_enabled())


class Regularizer(nn.Module):
    """Base class: subclasses implement :meth:`penalty` (unweighted, a scalar that keeps the graph).

    Args:
        weight: :math:`w_0`, the coefficient of the penalty.
        schedule: ``"constant"``, ``"cosine"`` (anneal to ``final_weight`` over ``total_steps``) or ``"warmup"``
            (linear from 0 to ``weight`` over ``total_steps``).
        final_weight: weight reached at ``total_steps`` under ``"cosine"``.
        total_steps: length of the schedule in steps.
        name: key of this term in :attr:`RegularizerOutput.parts` (default: the class's ``name``).
    """

    name: str = "regularizer"
    #: What :meth:`capture` arms: ``"attention"`` (one differentiable AttentionTap, shared by every attention term of
    #: a sum) or another group whose terms each arm their own capture (e.g. ``"activation"``).
    capture_group: str = "attention"

    def __init__(
        self,
        weight: float = 1.0,
        *,
        schedule: Schedule = "constant",
        final_weight: float = 0.0,
        total_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        scheduled_weight(0, weight, schedule, final_weight, total_steps)  # fail early on a bad weight or schedule
        self.weight = float(weight)
        self.schedule: Schedule = schedule
        self.final_weight = float(final_weight)
        self.total_steps = total_steps
        if name is not None:
            self.name = check_str(name, "name")
        self.step = 0
        self._capture = _Capture()

    # ------------------------------------------------------------------ weight
    def set_step(self, step: int) -> None:
        """Set the step the weight schedule reads (e.g. ``trainer.global_step``): an int (or a one-element integer
        tensor)."""
        if isinstance(step, Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = int(step.item())
        self.step = check_int(step, "step")

    def current_weight(self, step: int | None = None) -> float:
        """The scheduled weight at ``step`` (default: the last step set)."""
        return scheduled_weight(
            self.step if step is None else step, self.weight, self.schedule, self.final_weight, self.total_steps
        )

    def is_active(self, step: int | None = None) -> bool:
        """Whether the term contributes at ``step`` (default: the last step set): its weight there is > 0. A term
        that is not active is neither captured for nor evaluated (see the module docstring)."""
        return self.current_weight(step) > 0.0

    def always_inactive(self) -> bool:
        """Whether the weight is 0 at every step (``weight=0`` under any schedule but a cosine to a positive
        ``final_weight``)."""
        return self.weight == 0.0 and (self.schedule != "cosine" or self.final_weight == 0.0)

    # ------------------------------------------------------------------ capture
    def _skip_capture(self, model: nn.Module, step: int | None) -> bool:
        """Sets the step (if given) and, when the weight is 0 (at every step, or at that step), marks the capture as
        skipped and returns True."""
        if step is not None:
            self.set_step(step)
        if self.always_inactive() or (step is not None and not self.is_active()):
            self._capture.records = _Skipped(self.step, module_device(model))  # type: ignore[assignment]
            return True
        return False

    @contextmanager
    def capture(self, model: nn.Module, *, step: int | None = None, **tap_kwargs: Any) -> Iterator[Any]:
        """Arm a differentiable :class:`~entrotrain.taps.AttentionTap` on ``model`` for the ``with`` body.

        The next call of this regulariser without inputs reads the tap's records and releases them (so the graph
        they hold is freed with the loss). ``tap_kwargs`` go to the tap (``include=``, ``max_queries=``, ...).
        Yields the tap. Small CPU SDPA calls are computed jointly with their entropy (one pass, one backward; output
        equal to SDPA's to round-off): ``joint_attention=False`` keeps SDPA's kernel (see
        :class:`~entrotrain.taps.AttentionTap`).

        ``step`` sets the schedule's step first (as :meth:`set_step`). When the weight is 0 — at every step, or at
        ``step`` — no tap is armed (yields ``None``): the forward is the model's own, and the next call returns an
        exact 0 (it raises if called at a step whose weight is not 0: pass the same ``step`` to both).
        """
        from entrotrain.taps.attention_tap import AttentionTap  # regularisers sit above taps; import on use

        if tap_kwargs.pop("differentiable", True) is not True:
            raise EntrotrainError("Regularizer.capture needs a differentiable tap; drop differentiable=False.")
        if self._skip_capture(model, step):
            yield None
            return
        tap = AttentionTap(model, differentiable=True, **tap_kwargs)
        self._capture.records = None
        with tap:
            yield tap
        self._capture.records = tap.records

    def _take_captured(self) -> list[Any]:
        records, self._capture.records = self._capture.records, None
        if records is None:
            raise EntrotrainError(
                f"{type(self).__name__} was called without inputs and nothing was captured: run the forward inside "
                "`with reg.capture(model): ...` first, or pass the records: reg(tap.records)."
            )
        if isinstance(records, _Skipped) and self.is_active():
            raise EntrotrainError(
                f"{type(self).__name__}.capture(step={records.step}) saw weight 0 and recorded nothing, but the call "
                f"is at step {self.step} with weight {self.current_weight()}: pass the same step to both, "
                "`with reg.capture(model, step=s): ...` then `reg(step=s)`."
            )
        return records

    # ------------------------------------------------------------------ forward
    def penalty(self, *inputs: Any) -> Tensor:
        """The unweighted penalty (a scalar tensor that keeps the graph)."""
        raise NotImplementedError

    def _group_inputs(self, inputs: tuple[Any, ...], groups: dict[str, Any]) -> tuple[Any, ...]:
        """The inputs of this term: ``inputs``, or its :attr:`capture_group`'s entry of ``groups`` (the keyword form
        ``reg(attention=tap.records, router=router_logits)``; other groups' entries are for other terms)."""
        if not groups:
            return inputs
        if inputs:
            raise EntrotrainError(
                f"{type(self).__name__} got positional inputs and keyword inputs {sorted(groups)}: pass one form, "
                "reg(x) or reg(attention=..., router=..., activation=...) (one keyword per capture group)."
            )
        if self.capture_group not in groups:
            raise EntrotrainError(
                f"{type(self).__name__} reads the {self.capture_group!r} capture group but got keyword inputs "
                f"{sorted(groups)}: pass reg({self.capture_group}=...), or call it without inputs after "
                "`with reg.capture(model): ...`."
            )
        return (groups[self.capture_group],)

    def forward(self, *inputs: Any, step: int | None = None, **groups: Any) -> RegularizerOutput:
        """Weighted penalty of ``inputs`` (or of what :meth:`capture` recorded when called without inputs).

        ``step`` sets the schedule's step first (as :meth:`set_step`). Inputs may also be given by capture group,
        ``reg(attention=tap.records)`` (the form a sum of terms of several groups takes; :class:`RegularizerSum`).
        """
        if step is not None:
            self.set_step(step)
        inputs = self._group_inputs(inputs, groups)
        if not inputs:
            inputs = (self._take_captured(),)
        if not self.is_active():
            return self._zero_output(inputs)
        total = self.current_weight() * self.penalty(*inputs)
        return RegularizerOutput(total, {self.name: total.detach()})

    def _zero_output(self, inputs: Any) -> RegularizerOutput:
        """Weight 0: nothing is evaluated; an exact 0 (see :func:`_exact_zero`). The regulariser's own parameters (a
        learnable threshold) get a zero gradient, as ``0 * penalty`` gave them, so DDP (``find_unused_parameters=
        False``) still sees them used and an optimizer steps them as it did."""
        total = _exact_zero(inputs)
        if torch.is_grad_enabled():
            for param in self.parameters():
                if param.requires_grad:
                    total = total + param.sum().to(total) * 0.0
        return RegularizerOutput(total, {self.name: total.detach()})

    # ------------------------------------------------------------------ composition
    def __add__(self, other: Regularizer) -> RegularizerSum:
        if not isinstance(other, Regularizer):
            return _add_non_regularizer(self, other)
        return RegularizerSum([(1.0, self)]) + other

    def __radd__(self, other: Any) -> RegularizerSum:
        return _add_non_regularizer(self, other)  # 0 + reg: Python's sum([a, b])

    def __mul__(self, coeff: float) -> RegularizerSum:
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)):
            return NotImplemented
        return RegularizerSum([(_check_coefficient(coeff), self)])

    __rmul__ = __mul__

    def extra_repr(self) -> str:
        if self.schedule == "constant":
            return f"weight={self.weight}"
        return (
            f"weight={self.weight}, schedule={self.schedule!r}, final_weight={self.final_weight}, "
            f"total_steps={self.total_steps}"
        )


class RegularizerSum(Regularizer):
    """:math:`\\sum_k c_k R_k`: made by ``a + b`` and ``c * a``; every term gets the same step, and the same
    positional inputs when all read one capture group (else inputs go by group: :meth:`forward`).

    Args:
        terms: ``(coefficient, regulariser)`` pairs; nested sums are flattened.
    """

    name = "sum"

    def __init__(self, terms: Sequence[tuple[float, Regularizer]]) -> None:
        super().__init__(1.0)
        flat: list[tuple[float, Regularizer]] = []
        terms = list(terms)
        if not terms:
            raise EntrotrainError("RegularizerSum needs at least one (coefficient, regulariser) term, got none.")
        for coeff, reg in terms:
            if not isinstance(reg, Regularizer):
                raise EntrotrainError(
                    f"RegularizerSum terms must be Regularizers, got {type(reg).__name__}; compose with a + b or c * a."
                )
            coeff = _check_coefficient(coeff)
            if isinstance(reg, RegularizerSum):
                flat.extend((coeff * c, r) for c, r in reg.terms)
            else:
                flat.append((float(coeff), reg))
        self.coefficients = [c for c, _ in flat]
        self.regs = nn.ModuleList(r for _, r in flat)  # registered, so learnable thresholds reach the optimizer

    @property
    def terms(self) -> list[tuple[float, Regularizer]]:
        return list(zip(self.coefficients, self.regs))

    def set_step(self, step: int) -> None:
        super().set_step(step)
        for reg in self.regs:
            reg.set_step(step)

    @property
    def _mixed(self) -> bool:
        """True when the terms capture different things (attention and activations, say)."""
        return any(reg.capture_group != "attention" for reg in self.regs)

    def is_active(self, step: int | None = None) -> bool:
        """Whether any term has a coefficient > 0 and is active at ``step``."""
        return any(c > 0.0 and r.is_active(step) for c, r in self.terms)

    def always_inactive(self) -> bool:
        """Whether every term has coefficient 0 or is always inactive."""
        return all(c == 0.0 or r.always_inactive() for c, r in self.terms)

    @contextmanager
    def capture(self, model: nn.Module, *, step: int | None = None, **tap_kwargs: Any) -> Iterator[Any]:
        """As :meth:`Regularizer.capture` when every term reads attention (one shared tap; yields it). When the terms
        mix capture groups, arms one attention tap (given ``tap_kwargs``) for all attention terms and each other
        term's own :meth:`capture` (on its own ``include``), and yields the list of taps; each term then reads what it
        captured. A term of coefficient 0, or of weight 0 (at every step, or at ``step``), captures nothing."""
        if not self._mixed:
            with super().capture(model, step=step, **tap_kwargs) as tap:
                yield tap
            return
        if step is not None:
            self.set_step(step)

        def live(coeff: float, reg: Regularizer) -> bool:
            return coeff > 0.0 and not reg.always_inactive() and (step is None or reg.is_active())

        skipped = _Skipped(self.step, module_device(model))
        attention = [reg for reg in self.regs if reg.capture_group == "attention"]
        shared = [r for c, r in self.terms if r.capture_group == "attention" and live(c, r)]
        with ExitStack() as stack:
            taps = [stack.enter_context(shared[0].capture(model, **tap_kwargs))] if shared else []
            for coeff, reg in self.terms:
                if reg.capture_group == "attention":
                    continue
                if live(coeff, reg):
                    taps.append(stack.enter_context(reg.capture(model)))
                else:
                    reg._capture.records = skipped  # type: ignore[assignment]
            yield taps
        for reg in attention:  # one attention tap for all of them
            if not shared or reg is not shared[0]:
                reg._capture.records = shared[0]._capture.records if shared else skipped  # type: ignore[assignment]

    def forward(self, *inputs: Any, step: int | None = None, **groups: Any) -> RegularizerOutput:
        """``Σ c_k R_k``: every term gets ``inputs`` (only when every term reads the same capture group; a sum of
        several groups raises on positional inputs); with keyword inputs by capture group (``reg(attention=
        tap.records, router=router_logits, activation=act_tap)``) each term gets its group's; without inputs each
        term reads what :meth:`capture` recorded for it."""
        if step is not None:
            self.set_step(step)
        if groups and inputs:
            raise EntrotrainError(
                f"RegularizerSum got positional inputs and keyword inputs {sorted(groups)}: pass one form, reg(x) "
                "(every term gets x) or reg(attention=..., router=..., activation=...) (each term its group's)."
            )
        kinds = sorted({reg.capture_group for reg in self.regs})
        if inputs and len(kinds) > 1:  # one input cannot be attention records and router logits at once
            raise EntrotrainError(
                f"RegularizerSum of several capture groups {kinds} got positional inputs, which every term would "
                f"read as its own (router logits scored as activations, say): pass them by group, "
                f"reg({', '.join(f'{k}=...' for k in kinds)}), or call it without inputs after "
                "`with reg.capture(model): ...`."
            )
        if not inputs and not groups and not self._mixed:
            inputs = (self._take_captured(),)
        total: Tensor | None = None
        zero: Tensor | None = None
        parts: dict[str, Tensor] = {}
        for coeff, reg in self.terms:
            if coeff == 0.0 or not reg.is_active():  # not evaluated (module docstring: weight 0)
                held = (groups[reg.capture_group],) if reg.capture_group in groups else inputs
                if not held and groups:
                    held = tuple(groups.values())  # its group was not given: it needs none (the device of the 0)
                elif not held:
                    held, reg._capture.records = (reg._capture.records,), None
                out = reg._zero_output(held)
                zero = out.total if zero is None else zero
            else:
                out = reg(*reg._group_inputs(inputs, groups))
                total = coeff * out.total if total is None else total + coeff * out.total
            for key, value in out.parts.items():
                unique, n = key, 0
                while unique in parts:
                    n += 1
                    unique = f"{key}.{n}"
                parts[unique] = coeff * value
        if total is None:
            assert zero is not None  # terms is never empty
            total = zero
        return RegularizerOutput(total, parts)

    def __add__(self, other: Regularizer) -> RegularizerSum:
        if not isinstance(other, Regularizer):
            return _add_non_regularizer(self, other)
        return RegularizerSum([*self.terms, (1.0, other)])

    def __mul__(self, coeff: float) -> RegularizerSum:
        if isinstance(coeff, bool) or not isinstance(coeff, (int, float)):
            return NotImplemented
        coeff = _check_coefficient(coeff)
        return RegularizerSum([(coeff * c, r) for c, r in self.terms])

    __rmul__ = __mul__

    def extra_repr(self) -> str:
        return f"coefficients={self.coefficients}"


def combine_regularizers(regularizers: Sequence[Regularizer] | None) -> Regularizer | None:
    """One regulariser for a list from a config (``a + b + ...``), or ``None`` for an empty or missing list.

    Raises:
        EntrotrainError: ``regularizers`` is not ``None`` nor a list/tuple of :class:`Regularizer` (a string, a single
            regulariser, a number or a module among the terms), instead of Python's ``TypeError`` from ``+``.
    """
    if regularizers is None:
        return None
    if not isinstance(regularizers, (list, tuple, nn.ModuleList)):
        raise EntrotrainError(
            f"combine_regularizers(regularizers) must be a list of Regularizers or None, got "
            f"{type(regularizers).__name__} {regularizers!r}; wrap a single one in a list: [reg]."
        )
    for i, term in enumerate(regularizers):
        if not isinstance(term, Regularizer):
            raise EntrotrainError(
                f"combine_regularizers: regularizers[{i}] must be a Regularizer, got {type(term).__name__} {term!r}; "
                "pass regulariser modules (e.g. AttentionEntropyMaximization(...)) only."
            )
    if not regularizers:
        return None
    total = regularizers[0]
    for term in regularizers[1:]:
        total = total + term
    return total
