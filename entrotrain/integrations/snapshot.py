r"""One look at a model's entropy, without training it: the monitors' statistics on a few batches.

::

    from entrotrain.integrations.snapshot import entropy_snapshot

    shot = entropy_snapshot(model, [batch_1, batch_2])           # AttentionEntropyMonitor() by default
    shot.metrics["entropy/attn_norm/min"], shot.sites             # same keys as in training; L0 = module name

The monitors a training run uses (:class:`~entrotrain.callbacks.AttentionEntropyMonitor`,
:class:`~entrotrain.callbacks.RepresentationEntropyMonitor` with ``stage="train"``,
:class:`~entrotrain.callbacks.SigmaReparamMonitor`, :class:`~entrotrain.callbacks.RouterEntropyMonitor`,
:class:`~entrotrain.callbacks.PredictionEntropyMonitor`) are armed for one logging window spanning every batch: the
statistics are those of the union of the batches (sums over the batches, as over the micro-batches of a
gradient-accumulation window), computed by the very code that runs in training, with the same keys. No statistic is
computed here: this is :class:`~entrotrain.integrations.loop.EntropyMonitors` driven for a single step with no
optimizer. ``entrotrain inspect`` uses it on a run's checkpoints, so a collapse can be found after the fact, and
its start dated, in a run that trained without monitors.

The model runs in eval mode (dropout off; its mode is restored after) under ``torch.no_grad()``: nothing in the
model, its parameters, buffers, gradients or hooks is changed. Under ``torch.distributed`` every rank must call it
with its own batches; the statistics are reduced over ranks, as in training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from entrotrain.dashboards.run_record import RecordArray, RecordThreshold
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors

__all__ = ["EntropySnapshot", "entropy_snapshot", "call_model"]

#: The key of the mean of the scalars ``forward`` returned (a loss), when it returned one for every batch.
LOSS_KEY = "loss"


@dataclass
class EntropySnapshot:
    """What :func:`entropy_snapshot` saw.

    Attributes:
        metrics: every statistic the monitors published (the keys of training: ``entropy/attn_norm/min``,
            ``entropy/attn/L{l}/H{h}``, ``entropy/repr/{layer}/rankme``, ...); a statistic that could not be computed
            (every row non-finite: see the ``…/nonfinite`` counts) is absent or NaN, never made up; plus ``loss``:
            the mean of the scalars ``forward`` returned, when it returned one for every batch.
        sites: what the ``L{l}`` of the attention keys are: ``{"L0": "blocks.0.attn"}``.
        arrays: the arrays a run record stores for the report (attention heatmap, spectra, ...).
        thresholds: the monitors' thresholds (collapse / overload lines), as a run record stores them.
        batches: how many batches were run.
    """

    metrics: dict[str, float]
    sites: dict[str, str] = field(default_factory=dict)
    arrays: list[RecordArray] = field(default_factory=list)
    thresholds: list[RecordThreshold] = field(default_factory=list)
    batches: int = 0


def call_model(model: nn.Module, batch: Any) -> Any:
    """The default ``forward`` of :func:`entropy_snapshot`: ``model(**batch)`` for a mapping (an HF batch),
    ``model(*batch)`` for a tuple or list, ``model(batch)`` otherwise."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def entropy_snapshot(
    model: nn.Module,
    batches: Iterable[Any] | Tensor,
    monitors: Sequence[Any] | None = None,
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> EntropySnapshot:
    """The monitors' statistics of ``model`` on ``batches``, as a training logging step would publish them.

    Args:
        model: the model (an ``nn.Module``; a ``LightningModule`` too, with a ``forward`` that runs its model).
        batches: the batches to run (an iterable, or one tensor for one batch); the statistics are over all of them.
        monitors: configured monitors (see the module docstring); their own ``every_n_steps`` is ignored. Default:
            ``[AttentionEntropyMonitor()]``. Each call needs fresh monitor objects or reuses them from scratch.
        forward: ``forward(model, batch)`` runs one batch (default :func:`call_model`). A 0-d tensor it returns
            (itself, as ``.loss`` or as ``["loss"]``) is averaged over the batches into ``metrics["loss"]``.

    Returns:
        An :class:`EntropySnapshot`.

    Raises:
        EntrotrainError: no batch, a model that is not an ``nn.Module``, a ``forward`` that is not callable, or an
            unsupported monitor.
        TapError: (attention monitor) a model whose attention cannot be tapped; the message names the fix.
    """
    if not isinstance(model, nn.Module):
        raise EntrotrainError(f"entropy_snapshot(model) needs an nn.Module, got {type(model).__name__}.")
    if forward is not None and not callable(forward):
        raise EntrotrainError(
            f"entropy_snapshot(forward) must be a callable forward(model, batch), got {type(forward).__name__}."
        )
    if isinstance(batches, Tensor):
        batches = [batches]
    elif not isinstance(batches, Iterable) or isinstance(batches, (str, bytes, Mapping)):
        raise EntrotrainError(
            f"entropy_snapshot(batches) must be an iterable of batches (a list, a DataLoader) or one tensor, got "
            f"{type(batches).__name__}; wrap a single dict batch in a list: [batch]."
        )
    if monitors is None:
        from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor

        monitors = [AttentionEntropyMonitor()]
    run = forward if forward is not None else call_model
    driver = EntropyMonitors(list(monitors), every_n_steps=1, print_summary=False, training_forwards_only=False)
    session = driver.session
    was_training = model.training
    losses: list[float] = []
    count = 0
    model.eval()
    try:
        with torch.no_grad(), driver.watch(model):
            with driver.step(0):
                for batch in batches:
                    out = run(model, batch)
                    count += 1
                    loss = getattr(out, "loss", out)  # an HF ModelOutput's loss, or the scalar returned
                    if isinstance(loss, Mapping):  # a Lightning step's {"loss": ...}
                        loss = loss.get("loss")
                    if isinstance(loss, Tensor) and loss.dim() == 0:  # a scalar, not a one-element output
                        losses.append(float(loss))
                if count == 0:
                    raise EntrotrainError(
                        "entropy_snapshot(batches) gave no batch; pass at least one (check the DataLoader's length "
                        "and any limit on the number of batches)."
                    )
            metrics = dict(driver.computed)  # NaN kept: a statistic that could not be computed shows as such
            arrays = [array for d in session.drivers for array in d.record_arrays()]
    finally:
        model.train(was_training)
    if losses and len(losses) == count:
        metrics[LOSS_KEY] = math.fsum(losses) / len(losses)
    thresholds = [t for m in session.monitors for t in getattr(m, "record_thresholds", lambda: [])()]
    return EntropySnapshot(metrics, _sites(session.monitors), arrays, thresholds, count)


def _sites(monitors: Sequence[Any]) -> dict[str, str]:
    sites: dict[str, str] = {}
    for monitor in monitors:
        for i, name in enumerate(getattr(monitor, "site_names", ()) or ()):
            sites[f"L{i}"] = name
    return sites
