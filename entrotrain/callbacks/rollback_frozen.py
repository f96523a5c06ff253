"""Frozen parameters a rollback does not copy: ``EntropyCollapseGuard(action="rollback", hold="trainable")``.

Fine-tuning with adapters (LoRA through PEFT, in TRL's GRPO or an SFT run) trains well under 1 % of the parameters;
holding the whole ``state_dict()`` in host memory at each good observation would copy the frozen base every time (14
GB for a 7 B model in bf16, times ``rollback_states``). With ``hold="trainable"`` the parameters with
``requires_grad=False`` at the observation are not copied, and a rollback leaves them as they are, which is exact as
long as they do not change. That is checked, not assumed, on a fingerprint of each one (its sum and its 2-norm,
computed on its device, one sync per device; for one holding a NaN or an Inf, those of its finite entries and the
counts of NaN, +Inf and -Inf, so that an unchanged one matches and a change of its finite entries shows):

- at each observation, against the fingerprint taken at the last one (whichever held state holds it): a "frozen"
  parameter that changes between observations (an EMA target network updated through ``.data``, as MoCo and BYOL
  do) is refused early, naming it and the fix (``hold="all"``);
- at a rollback, before anything is copied, against the fingerprint taken with the held state: a changed one refuses
  the rollback (the model is left as it was). A layer unfrozen later is held from the next observation on; a
  rollback to a state from before, which did not hold it, is refused once it trained: the guard then goes to the
  next newer held state (from the unfreezing on, they hold it), and stops training with the reason when none is.

"Changed" means a sum or norm that moved by more than 1e-6 relative (a re-computed sum of the same values is equal
on the same device; an update that moves neither is below what a rollback could be wrong by), or a count of
non-finite entries that moved. Buffers and trainable
parameters are held as with ``hold="all"``, and so are all the parameters of an averaged copy (``AveragedModel``, an
EMA: its averaging writes them whatever their flag).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from entrotrain.errors import EntrotrainError

__all__ = ["FrozenParameters", "frozen_keys"]

_RTOL = 1e-6


def frozen_keys(model: nn.Module, live: dict[str, Any]) -> list[str]:
    """The keys of ``live`` (``model.state_dict()``) that are parameters with ``requires_grad=False``, but not those
    of an averaged copy (``AveragedModel``: its ``update_parameters`` writes every parameter, whatever its flag; an
    EMA of a frozen weight moves by rounding; or a module ``model`` lists in ``held_whole``: the averages passed to
    the guard, e.g. ``copy.deepcopy(model).requires_grad_(False)`` updated under ``no_grad``), which are held.

    Raises:
        EntrotrainError: one is a DTensor (FSDP2): use ``hold="all"``.
    """
    whole = [*(m for m in model.modules() if isinstance(m, AveragedModel)), *getattr(model, "held_whole", ())]
    averaged = {id(p) for module in whole for p in module.parameters()}
    names = {name for name, param in model.named_parameters(remove_duplicate=False)
             if not param.requires_grad and id(param) not in averaged}
    keys = [key for key in live if key in names]
    if any(type(live[key]).__name__ == "DTensor" for key in keys):
        raise EntrotrainError(
            "EntropyCollapseGuard(hold='trainable') holds a frozen parameter's fingerprint on one device; under "
            "FSDP2 each rank holds only its shards already: use hold='all'."
        )
    return keys


def _comparable(value: torch.Tensor) -> torch.Tensor:
    """``value`` as a real floating tensor: a complex one as its real and imaginary parts, an integer, bool or float8
    one (a quantized base's packed weights (QLoRA), an FP8 base: no norm of its own) as float32."""
    value = value.detach()
    if value.is_complex():
        value = torch.view_as_real(value)
    if not value.is_floating_point() or value.element_size() == 1:
        value = value.to(torch.float32)
    return value


def _fingerprints(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[float, ...]]:
    """Each tensor's (sum, 2-norm) in float64: reduced on its device (float32 accumulation; float64 for float64), one
    sync per device. Any dtype (:func:`_comparable`). A tensor whose sum or norm is not finite (it holds a NaN or an
    Inf, or its norm overflows float32) gets :func:`_nonfinite_fingerprint` instead."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        with torch.no_grad():
            value = _comparable(value)
            wide = torch.float64 if value.dtype == torch.float64 else torch.float32
            pair = torch.stack([value.sum(dtype=wide), torch.linalg.vector_norm(value, dtype=wide)]).double()
        by_device.setdefault(value.device, []).append((key, pair))
    prints: dict[str, tuple[float, ...]] = {}
    for pairs in by_device.values():
        values = torch.stack([pair for _, pair in pairs]).double().tolist()
        prints.update((key, (total, norm)) for (key, _), (total, norm) in zip(pairs, values))
    for key, (total, norm) in list(prints.items()):
        if not (math.isfinite(total) and math.isfinite(norm)):
            prints[key] = _nonfinite_fingerprint(tensors[key])
    return prints


def _nonfinite_fingerprint(value: torch.Tensor) -> tuple[float, ...]:
    """(sum, 2-norm) of the finite entries in float64, then the counts of NaN, +Inf and -Inf entries. A NaN makes the
    plain sum NaN whatever the other entries are (and NaN != NaN: an unchanged parameter read as changed), an Inf
    makes it Inf (a change of the other entries went unseen). One sync; only for such tensors."""
    with torch.no_grad():
        v = _comparable(value).double()
        kept = torch.where(torch.isfinite(v), v, torch.zeros((), dtype=v.dtype, device=v.device))
        stats = torch.stack([
            kept.sum(), torch.linalg.vector_norm(kept), torch.isnan(v).sum(), (v == math.inf).sum(),
            (v == -math.inf).sum(),
        ])
    return tuple(stats.tolist())


def _moved(before: tuple[float, ...], after: tuple[float, ...]) -> bool:
    """Whether a fingerprint moved: its (sum, norm) by more than 1e-6 relative (equal ones did not), its non-finite
    counts at all, or its kind (a NaN or Inf appeared or went)."""
    if len(before) != len(after):
        return True
    scale = max(abs(before[1]), abs(after[1]), 1e-30)  # the norm bounds the sum: it sets the scale of both
    return any(a != b and not abs(a - b) <= _RTOL * scale for a, b in zip(before[:2], after[:2])) or (
        before[2:] != after[2:]
    )


class FrozenParameters:
    """The frozen parameters one held state did not copy, with the fingerprint each had when it was taken."""

    def __init__(self) -> None:
        self.prints: dict[str, tuple[float, ...]] = {}
        self.step: int | None = None

    @property
    def keys(self) -> set[str]:
        return set(self.prints)

    def fingerprint(
        self, model: nn.Module, live: dict[str, Any], step: int, last: FrozenParameters | None = None
    ) -> dict[str, tuple[float, ...]]:
        """The fingerprints of the frozen parameters of ``live`` (``model.state_dict()``) at ``step``, by key (not to
        be copied); :meth:`keep` them once the state is held. ``last``: the fingerprints of the last observation's
        state, when another state holds them (``rollback_states`` > 1), compared instead of this one's.

        Raises:
            EntrotrainError: one that was frozen at the last take changed since (or a parameter is a DTensor).
        """
        last = self if last is None else last
        keys = frozen_keys(model, live)
        prints = _fingerprints({key: live[key] for key in keys})
        changed = [key for key in keys if key in last.prints and _moved(last.prints[key], prints[key])]
        if changed:
            raise EntrotrainError(
                f"EntropyCollapseGuard(hold='trainable'): the parameter(s) {changed[:3]} have requires_grad=False but "
                f"changed between steps {last.step} and {step} (an EMA target network updated through .data?): a "
                "rollback could not bring them back. Use hold='all' (every parameter is held), or keep them out of "
                "the model the guard tracks."
            )
        return prints

    def keep(self, prints: dict[str, tuple[float, ...]], step: int) -> None:
        """The fingerprints of the state just held (from :meth:`fingerprint`)."""
        self.prints, self.step = prints, int(step)

    def verify(self, current: dict[str, Any]) -> None:
        """Before a rollback: each frozen parameter not held is unchanged since the take (``current``:
        ``model.state_dict()`` now).

        Raises:
            EntrotrainError: naming the ones that changed (the model is left as it was).
        """
        prints = _fingerprints({key: current[key] for key in self.prints if key in current})
        changed = [key for key, value in prints.items() if _moved(self.prints[key], value)]
        if changed:
            raise EntrotrainError(
                f"EntropyCollapseGuard(hold='trainable') cannot roll back to step {self.step}: the parameter(s) "
                f"{changed[:3]} were frozen, so not held, and changed since. Use hold='all' (every parameter is held)."
            )

    def clear(self) -> None:
        self.prints, self.step = {}, None
