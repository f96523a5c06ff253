r"""Per-layer representation entropy / rank, live in a Lightning ``Trainer``.

Garrido et al. (2023, RankMe), Roy & Vetterli (2007, effective rank), Wei et al. (2024, matrix entropy),
Friedman & Dieng (2023, Vendi), Liao et al. (2023, diffusion spectral entropy and mutual information): how many
directions a layer's representation really uses. A falling rank is the signature of representation collapse (e.g.
SimSiam without stop-gradient); DSE / DSMI trace how a classifier's layers compress and organise by class.

Modules are chosen by name glob and watched with :class:`~entrotrain.taps.ActivationTap` forward hooks that are
installed only while a logging step (``stage="train"``) or the probe batches of a validation run (``stage="validation"``)
go through the model; captured activations are detached copies, subsampled deterministically (evenly spaced batch
rows and tokens / patches), and no RNG is touched, so training is bit-for-bit the same with the monitor on.

Two kinds of statistics, so that values are comparable across steps and ranks:

* **streamed** (``rankme``, ``effective_rank``, ``vendi`` with the cosine or linear kernel): float64
  :class:`~entrotrain.functional.covariance.CovarianceAccumulator` sums of every captured row — exact over all
  micro-batches of the step and, under DDP, over all ranks (equal to one process on the union batch);
* **sampled** (``matrix_entropy``, ``matrix_entropy_normalized``, ``matrix_erank``, ``nuclear_norm``, ``dse``,
  ``dsmi``, RBF ``vendi``): a seeded :class:`~entrotrain.taps.Reservoir` of ``max_samples`` rows (its own generator,
  so the same probe set gives the same rows), computed at a fixed ``n``.

Both are all-reduced across DDP ranks in **one** collective per logging step (the reservoirs travel in rank slots of
the same float64 buffer); the union of the ranks' reservoirs is cut back to ``max_samples`` evenly spaced rows. Before
it the ranks exchange their layers' names and widths (one small ``all_gather_object``): a rank that captured nothing
in the window, or fewer layers, joins the reduce with empty layers and publishes what the others publish; only when
no rank captured anything does every rank raise the no-capture error.

Logged keys (``{p}`` = ``prefix``, default ``entropy/repr``; ``{layer}`` = module name as in ``named_modules()``):

========================================  ==========================================================================
``{p}/{layer}/{measure}``                 the measure (names of :data:`REPRESENTATION_MEASURES`, plus ``dsmi``)
``{p}/{layer}/n``, ``/d``                 rows of the sample the sampled measures used, and feature dimension
``{p}/{layer}/n_streamed``                rows in the streamed (covariance) statistics
``{p}/{layer}/dse_sigma``, ``/dse_t``     DSE / DSMI kernel width σ and diffusion time t (when measured)
``{p}/{layer}/vendi_q``                   Vendi order q (when measured); ``rankme_eps`` likewise
``{p}/{layer}/median_dist``               median pairwise distance of the sample (audit σ; when DSE/DSMI measured)
``{p}/{layer}/nonfinite``                 captured rows holding NaN/Inf, dropped before any statistic (0 when clean)
``{p}/{layer}/spectrum`` (wandb)          line chart of ``log10`` eigenvalue shares of the (centred) covariance, at
                                          every ``spectrum_every``-th logging step (default 10)
========================================  ==========================================================================

Memory: two ``d × d`` float64 matrices per layer (one with the cosine ``vendi``) between the first capture and the
end of a logging step, plus the reservoir. Under DDP every rank must capture the same layers (same model and
forward), since the statistics travel in one buffer of a fixed layout. Activation checkpointing re-runs forwards
inside backward; taps ignore what runs there (:mod:`entrotrain.taps.exclusive`), so a checkpointed module is captured
once per forward, and ``{layer}`` is its name without wrapper segments (:mod:`entrotrain.taps.module_names`).

Non-finite data (DESIGN.md §8): a captured row holding NaN/Inf is dropped before it reaches any accumulator or
reservoir, counted in ``{p}/{layer}/nonfinite`` and warned about once per fit; the measures are computed on the
remaining rows. A layer left with fewer than two finite rows gets no measure at that step: its keys go to
``trainer.callback_metrics`` as NaN and to no logger. Training never stops because of the data.

Lifecycle: per-fit state (history, warnings, the tap bound to the model being fit) is reset in ``setup`` of every
``fit``; the history is restored from the checkpoint on resume; hooks are removed on every exit path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from entrotrain._validation import check_choice, check_int, check_real
from entrotrain.callbacks._history import ThinnedHistory
from entrotrain.callbacks._logging_window import LoggingWindow
from entrotrain.callbacks._nonfinite import NonFiniteCounter, is_finite_number
from entrotrain.callbacks._lifecycle import HookedMonitor
from entrotrain.callbacks._publish import publish_scalars
from entrotrain.dashboards.run_record import RecordArray, record_arrays
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional._dist import gather_objects
from entrotrain.functional.covariance import CovarianceAccumulator
from entrotrain.functional.representation import (
    REPRESENTATION_MEASURES,
    diffusion_spectral_mutual_information,
    finite_row_mask,
    median_pairwise_distance,
)
from entrotrain.taps.activation_tap import ActivationTap, Capture
from entrotrain.taps.reservoir import Reservoir
from entrotrain.taps.sampling import check_budget, evenly_spaced

__all__ = ["RepresentationEntropyMonitor", "STREAMED_MEASURES"]

#: Measures computed exactly from streamed float64 covariance statistics (all rows of the step, all ranks).
STREAMED_MEASURES = ("rankme", "effective_rank", "vendi")
_EXTRA_MEASURES = ("dsmi",)
_KERNEL_MEASURES = ("dse", "dsmi")


class _Layer:
    """Per-layer state of one logging window: raw / row-normalised accumulators and a reservoir."""

    def __init__(self, dim: int, device: torch.device, normalized: bool, capacity: int, seed: int) -> None:
        self.dim = dim
        self.raw = CovarianceAccumulator(dim, device=device)
        self.unit = CovarianceAccumulator(dim, normalize_rows=True, device=device) if normalized else None
        self.reservoir = Reservoir(capacity, seed=seed)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)  # rows dropped for NaN/Inf


class RepresentationEntropyMonitor(HookedMonitor):
    r"""Logs rank / entropy measures of chosen layers' representations, with ``n``, ``d`` and parameters beside.

    Args:
        include: glob patterns of module names to watch (``["model.backbone", "model.layers.*"]``: ``*`` is one name
            segment, ``**`` any number, see :class:`~entrotrain.taps.name_filter.NameFilter`); ``"**"`` = every module
            but containers.
        exclude: glob patterns of module names to skip.
        measures: names from :data:`entrotrain.functional.representation.REPRESENTATION_MEASURES` (``rankme``,
            ``effective_rank``, ``matrix_entropy``, ``matrix_entropy_normalized``, ``matrix_erank``, ``vendi``,
            ``dse``, ``nuclear_norm``) and ``dsmi`` (diffusion spectral mutual information with the batch labels).
        every_n_steps: with ``stage="train"``, log at optimizer steps ``0, n, 2n, ...``. With ``k`` optimizers stepped
            per batch (manual optimisation, GAN style), the batches whose first optimizer step is a multiple of ``n``:
            every lcm(n, k) optimizer steps (:class:`~entrotrain.callbacks._logging_window.LoggingWindow`).
        stage: ``"train"`` (the training batches of logging steps, all micro-batches) or ``"validation"`` (the first
            ``probe_batches`` validation batches, a fixed probe set, at every validation run — including the sanity
            check when it covers the probe set, which gives a step-0 value).
        max_samples: rows kept (seeded reservoir) for the sampled measures; fixes their ``n``.
        max_rows: batch rows captured per call (evenly spaced); ``None`` = all.
        max_tokens: tokens / patches captured per sample of ``(B, T, C)`` / ``(B, C, H, W)`` outputs (evenly
            spaced); ``None`` = all. Padded tokens of ``(B, T, C)`` outputs (the HF model's ``attention_mask``, a
            :func:`~entrotrain.taps.query_padding` block) are then left out, so ``n`` counts real tokens.
        dse_sigma: Gaussian kernel width σ of DSE / DSMI (absolute: it depends on the activation scale).
        dse_t: diffusion time t of DSE / DSMI.
        vendi_q: order q of the Vendi score.
        vendi_kernel: ``"cosine"`` or ``"linear"`` (streamed, exact) or ``"rbf"`` (sampled, width ``dse_sigma``).
        rankme_eps: RankMe's ε.
        dsmi_repetitions: random subsets per class in DSMI.
        label_index: where the labels are in a batch (index of a tuple/list batch or key of a dict batch), for DSMI.
        probe_batches: with ``stage="validation"``, how many validation batches form the probe set (``None`` = all).
        log_spectrum: log each layer's covariance eigenvalue spectrum as a wandb chart (rank zero).
        spectrum_every: log the spectrum charts at the first logging step and every ``spectrum_every``-th one after
            it (``1`` = every logging step). Each chart is a ``wandb.Table`` (up to 256 points) stored as a file and a
            run-table artifact version per layer and step, and wandb shows only the latest: every step, a million-step
            run logging every 50 steps would store 20 000 of them per layer. The run record's spectra are kept at
            every logging step regardless.
        output_index: element read from tuple/list module outputs.
        layout: where the features of 3-D / 4-D outputs are (:class:`~entrotrain.taps.ActivationTap`): ``"auto"``
            reads convolutions, norms and poolings channels-first and ``Linear`` / ``LayerNorm`` / ``Embedding``
            channels-last, any other module's 3-D output as ``(B, T, C)`` and 4-D as ``(B, C, H, W)``;
            ``"channels_last"`` for blocks returning ``(B, H, W, C)``, ``"channels_first"`` for ``(B, C, L)``.
        seed: reservoir seed.
        prefix: key prefix.
        print_summary: print the first and last values of every layer and measure when training ends (rank zero).

    Raises:
        EntrotrainError: on invalid arguments; when no module matches (at setup).
        TapError: when a matched module returns no tensor, or a logging step captures nothing.

    Example::

        trainer = Trainer(callbacks=[RepresentationEntropyMonitor(include=["model.backbone"], every_n_steps=100)])
    """

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        measures: Sequence[str] = ("rankme", "effective_rank", "matrix_entropy"),
        every_n_steps: int = 50,
        stage: Literal["train", "validation"] = "train",
        max_samples: int = 512,
        max_rows: int | None = None,
        max_tokens: int | None = 16,
        dse_sigma: float = 10.0,
        dse_t: int = 1,
        vendi_q: float = 1.0,
        vendi_kernel: Literal["cosine", "linear", "rbf"] = "cosine",
        rankme_eps: float = 1e-7,
        dsmi_repetitions: int = 5,
        label_index: int | str | None = 1,
        probe_batches: int | None = None,
        log_spectrum: bool = True,
        output_index: int = 0,
        seed: int = 0,
        prefix: str = "entropy/repr",
        print_summary: bool = True,
        spectrum_every: int = 10,
        layout: Literal["auto", "channels_last", "channels_first"] = "auto",
    ) -> None:
        check_int(every_n_steps, "every_n_steps", low=1)
        check_choice(layout, "layout", ("auto", "channels_last", "channels_first"))
        check_int(spectrum_every, "spectrum_every", low=1)
        check_choice(stage, "stage", ("train", "validation"))
        measures = list(measures)
        known = sorted(REPRESENTATION_MEASURES) + list(_EXTRA_MEASURES)
        unknown = [m for m in measures if m not in known]
        if unknown or not measures:
            raise EntrotrainError(f"unknown representation measure(s) {unknown or measures}; choose from {known}.")
        if len(set(measures)) != len(measures):
            raise EntrotrainError(f"measures lists a name twice: {measures}.")
        check_budget(max_samples, "max_samples")
        if max_samples < 2:
            raise EntrotrainError(f"max_samples must be at least 2 (a spectrum needs 2 rows), got {max_samples}.")
        check_budget(max_rows, "max_rows")
        check_budget(max_tokens, "max_tokens")
        check_budget(probe_batches, "probe_batches")
        check_budget(dsmi_repetitions, "dsmi_repetitions")
        check_real(dse_sigma, "dse_sigma", low=0.0, low_open=True)  # finite: an Inf width is refused
        check_int(dse_t, "dse_t", low=1)
        if isinstance(vendi_q, bool) or not isinstance(vendi_q, (int, float)) or not vendi_q >= 0:  # q = inf is valid
            raise EntrotrainError(f"vendi_q must be a number >= 0 (inf = min-entropy order), got {vendi_q!r}.")
        check_choice(vendi_kernel, "vendi_kernel", ("cosine", "linear", "rbf"))
        check_real(rankme_eps, "rankme_eps", low=0.0, high=1.0, high_open=True)
        if "dsmi" in measures and label_index is None:
            raise EntrotrainError("measure 'dsmi' needs labels: set label_index to where the batch holds them.")
        self.include = list(include) if include is not None else ["**"]
        self.exclude = list(exclude) if exclude is not None else []
        self.measures = measures
        self.every_n_steps = every_n_steps
        self.stage = stage
        self.max_samples = max_samples
        self.max_rows = max_rows
        self.max_tokens = max_tokens
        self.dse_sigma = float(dse_sigma)
        self.dse_t = dse_t
        self.vendi_q = float(vendi_q)
        self.vendi_kernel = vendi_kernel
        self.rankme_eps = float(rankme_eps)
        self.dsmi_repetitions = dsmi_repetitions
        self.label_index = label_index
        self.probe_batches = probe_batches
        self.log_spectrum = log_spectrum
        self.spectrum_every = spectrum_every
        self._media_steps = 0  # logging steps whose spectrum charts were asked for in this fit (paces them)
        self.output_index = output_index
        self.layout = layout
        self.seed = seed
        self.prefix = prefix.rstrip("/")
        self.print_summary = print_summary
        self.tap: ActivationTap | None = None
        self.layers: dict[str, _Layer] = {}
        self.last_logged: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = ThinnedHistory()  # bounded for long runs
        self.spectra: dict[str, Tensor] = {}
        self._window = LoggingWindow(every_n_steps)
        self._probing = False
        self._labels: Tensor | None = None
        self._warned_missing = False
        self._deferred: dict[str, float] | None = None
        self._nonfinite = NonFiniteCounter("RepresentationEntropyMonitor", f"{self.prefix}/{{layer}}/nonfinite")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, prefix=self.prefix, stage=self.stage)

    # ------------------------------------------------------------------ which statistic feeds which measure
    def _streamed(self, measure: str) -> bool:
        return measure in STREAMED_MEASURES and not (measure == "vendi" and self.vendi_kernel == "rbf")

    @property
    def _needs_sample(self) -> bool:
        return any(not self._streamed(m) for m in self.measures)

    @property
    def _needs_labels(self) -> bool:
        return "dsmi" in self.measures

    # ------------------------------------------------------------------ lifecycle
    def _reset_fit_state(self) -> None:
        """Forget everything a previous fit left: history, last values, spectra, deferred metrics, warnings."""
        self._release()
        self.layers = {}
        self.last_logged = {}
        self.history = ThinnedHistory()
        self.spectra = {}
        self._media_steps = 0
        self._warned_missing = False
        self._deferred = None
        self._nonfinite.reset()

    def state_dict(self) -> dict[str, Any]:
        """The logged history (first and last values of the summary table survive a resume)."""
        return {"history": [(step, dict(row)) for step, row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = ThinnedHistory((int(step), dict(row)) for step, row in state_dict.get("history", []))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # per-fit reset (PerFitCallback)
        if self.log_spectrum and trainer.is_global_zero:
            from entrotrain.dashboards.wandb_media import setup_wandb_dashboard

            setup_wandb_dashboard(trainer.loggers)
        self.bind(pl_module)

    def bind(self, model: torch.nn.Module) -> None:
        """Watch ``model`` (a reused monitor watches the model being fit); hooks are installed only when armed."""
        if self.tap is None or self.tap.model is not model:
            self._release()
            self.tap = ActivationTap(
                model,
                include=self.include,
                exclude=self.exclude,
                max_rows=self.max_rows,
                max_tokens=self.max_tokens,
                output_index=self.output_index,
                layout=self.layout,
                on_capture=self._consume,
            )

    def _release(self) -> None:
        if self.tap is not None:
            self.tap.disarm()
        self._window.close()
        self._probing = False
        self._labels = None

    # ------------------------------------------------------------------ capture
    def _begin_window(self) -> None:
        self.layers = {}

    def _set_labels(self, batch: Any) -> None:
        if not self._needs_labels:
            return
        try:
            labels = batch[self.label_index]  # type: ignore[index]
        except (KeyError, IndexError, TypeError) as e:
            raise EntrotrainError(
                f"measure 'dsmi' reads labels from batch[{self.label_index!r}], which failed ({e}); set label_index "
                "to the index (tuple batch) or key (dict batch) of the labels."
            ) from None
        if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.is_floating_point():
            raise EntrotrainError(
                f"batch[{self.label_index!r}] must be a 1-D integer tensor of class labels for 'dsmi', got "
                f"{type(labels).__name__} {tuple(getattr(labels, 'shape', ()))}."
            )
        self._labels = labels.detach()

    def _consume(self, name: str, capture: Capture) -> None:
        keep = finite_row_mask(capture.rows)  # NaN/Inf rows never enter a statistic
        rows, sample, dropped = capture.rows[keep], capture.sample[keep], (~keep).sum()
        layer = self.layers.get(name)
        if layer is None:
            layer = self.layers[name] = _Layer(
                rows.shape[1],
                rows.device,
                normalized="vendi" in self.measures and self.vendi_kernel == "cosine",
                capacity=self.max_samples,
                seed=self.seed,
            )
        if rows.shape[1] != layer.dim:
            raise TapError(
                f"module {name!r} produced {rows.shape[1]} features after {layer.dim} earlier in the same step; a "
                "module called on differently shaped inputs cannot be pooled. Include a fixed-width module instead."
            )
        layer.nonfinite += dropped
        layer.raw.update(rows)
        if layer.unit is not None:  # cosine kernel: an all-zero row has no direction (e.g. a dead ReLU layer)
            layer.unit.update(rows[torch.linalg.vector_norm(rows, dim=1) > 0])
        if self._needs_sample:
            labels = None
            if self._needs_labels and self._labels is not None:
                if len(capture.sample) and int(capture.sample.max()) >= len(self._labels):
                    raise TapError(
                        f"module {name!r} saw a batch of {int(capture.sample.max()) + 1} rows but the batch holds "
                        f"{len(self._labels)} labels (e.g. two augmented views stacked): 'dsmi' cannot pair rows with "
                        "labels there. Measure dsmi on a module that sees the labelled batch, or drop 'dsmi'."
                    )
                labels = self._labels.to(sample.device)[sample]
            layer.reservoir.add(rows, labels)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._deferred is not None:
            metrics, self._deferred = self._deferred, None
            self._publish(trainer, pl_module, metrics)
        if self.stage != "train" or self.tap is None or trainer.sanity_checking:
            return
        first = self._window.begin(trainer.global_step)
        if first is None:
            return
        if first:
            self._begin_window()
        self._set_labels(batch)
        self.tap.arm()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.tap is None or not self._window.open:
            return
        self.tap.disarm()
        step = self._window.end(trainer.global_step)
        if step is not None:  # the optimizer stepped: the window is complete
            self._flush(trainer, pl_module, step)

    def _probe_covered_by_sanity_check(self, trainer: Trainer) -> bool:
        full = trainer.num_val_batches[0] if trainer.num_val_batches else 0
        probe = min(self.probe_batches or math.inf, full)
        sanity = trainer.num_sanity_val_batches[0] if trainer.num_sanity_val_batches else 0
        return probe > 0 and sanity >= probe

    def _last_probe_batch(self, trainer: Trainer) -> int:
        """Index of the last validation batch of the probe set in the running loop."""
        batches = trainer.num_sanity_val_batches if trainer.sanity_checking else trainer.num_val_batches
        available = batches[0] if batches else 0
        probe = min(self.probe_batches or math.inf, available)
        if math.isinf(probe):
            raise EntrotrainError(
                "RepresentationEntropyMonitor(stage='validation') over a validation set of unknown length: set "
                "probe_batches to the number of validation batches that form the probe set."
            )
        return int(probe) - 1

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.stage != "validation" or self.tap is None:
            return
        if trainer.sanity_checking and not self._probe_covered_by_sanity_check(trainer):
            return
        self._begin_window()
        self._probing = True

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not self._probing or self.tap is None or dataloader_idx != 0:
            return
        if batch_idx > self._last_probe_batch(trainer):
            return
        self._set_labels(batch)
        self.tap.arm()

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.tap is not None:
            self.tap.disarm()
        if self._probing and dataloader_idx == 0 and batch_idx == self._last_probe_batch(trainer):
            # flushed here, not at epoch end: Lightning allows step-level logging only from batch hooks
            self._probing = False
            self._flush(trainer, pl_module, trainer.global_step)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._probing = False

    # ------------------------------------------------------------------ reduce
    def _join_layers(self, device: torch.device | None) -> None:
        """Add, empty, the layers other ranks captured in this window and this one did not (one
        ``all_gather_object`` of names and widths), so that every rank reduces the same layout."""
        for rank_layers in gather_objects([(name, layer.dim) for name, layer in self.layers.items()]):
            for name, dim in rank_layers:
                if name not in self.layers:
                    self.layers[name] = _Layer(
                        dim,
                        device if device is not None else torch.device("cpu"),
                        normalized="vendi" in self.measures and self.vendi_kernel == "cosine",
                        capacity=self.max_samples,
                        seed=self.seed,
                    )

    def _reduce(
        self, world: int, rank: int, reduce: Callable[[Tensor], Tensor] | None
    ) -> dict[str, tuple[Tensor | None, Tensor | None]]:
        """One SUM all-reduce (``reduce``, over ``world`` ranks; this is ``rank``) of every layer's statistics and
        reservoir (rank slots); returns the union samples."""
        names = sorted(self.layers)
        parts: list[Tensor] = []
        for name in names:
            layer = self.layers[name]
            parts.append(layer.nonfinite.reshape(-1).to(layer.raw.count))
            for acc in (layer.raw, layer.unit):
                if acc is not None:
                    parts.extend(t.reshape(-1) for t in acc.state())
            if self._needs_sample:
                rows, labels = layer.reservoir.rows, layer.reservoir.labels
                slots = torch.zeros(world, self.max_samples, layer.dim + 1, dtype=torch.float64, device=layer.raw.sum.device)
                count = torch.zeros(world, dtype=torch.float64, device=slots.device)
                if rows is not None:
                    slots[rank, : len(rows), : layer.dim] = rows.to(slots)
                    if labels is not None:
                        slots[rank, : len(rows), layer.dim] = labels.to(slots)
                    count[rank] = len(rows)
                parts.extend([count, slots.reshape(-1)])
        flat = torch.cat(parts)
        if world > 1 and reduce is not None:  # every rank captured the same layers (same model, same forward)
            flat = reduce(flat)
        samples: dict[str, tuple[Tensor | None, Tensor | None]] = {}
        offset = 0

        def take(shape: tuple[int, ...]) -> Tensor:
            nonlocal offset
            size = math.prod(shape)
            out = flat[offset : offset + size].reshape(shape)
            offset += size
            return out

        for name in names:
            layer = self.layers[name]
            d = layer.dim
            layer.nonfinite = take(())
            for acc in (layer.raw, layer.unit):
                if acc is not None:
                    acc.load_state([take(()), take((d,)), take((d, d))])
            if self._needs_sample:
                count = take((world,)).round().long()
                slots = take((world, self.max_samples, d + 1))
                union = torch.cat([slots[r, : int(count[r])] for r in range(world)])
                idx = evenly_spaced(len(union), self.max_samples, device=union.device)
                if idx is not None:
                    union = union[idx]
                labels = union[:, d].round().long() if self._needs_labels else None
                samples[name] = (union[:, :d], labels)
            else:
                samples[name] = (None, None)
        return samples

    # ------------------------------------------------------------------ compute and log
    def _measure(self, name: str, measure: str, layer: _Layer, x: Tensor | None, y: Tensor | None) -> float | None:
        """The measure's value, or ``None`` when it cannot be computed at this step: too few finite rows, or
        degenerate data the measure refuses (all-zero activations of a dead layer, a spectrum the eigensolver cannot
        handle). Warned once per layer and measure, never raised from the callback: the arguments were validated in
        ``__init__``, so what fails here is the data."""
        try:
            value = self._compute(measure, layer, x, y)
        except (torch.linalg.LinAlgError, EntrotrainError) as e:
            self._nonfinite.warn_once(
                f"linalg:{name}:{measure}",
                f"RepresentationEntropyMonitor: {measure} of {name!r} could not be computed ({e}); it is published "
                "as NaN to trainer.callback_metrics (never to a logger) until it can be again.",
            )
            return None
        return value if is_finite_number(value) else None

    def _compute(self, measure: str, layer: _Layer, x: Tensor | None, y: Tensor | None) -> float | None:
        if self._streamed(measure):
            if float(layer.raw.count) < 2:
                return None
            if measure == "rankme":
                return float(layer.raw.rankme(eps=self.rankme_eps))
            if measure == "effective_rank":
                return float(layer.raw.effective_rank())
            acc = layer.unit if self.vendi_kernel == "cosine" else layer.raw
            assert acc is not None
            return float(acc.vendi_score(self.vendi_q))
        if x is None or len(x) < 2:
            return None
        if measure == "dsmi":
            if y is None:
                return None
            return float(
                diffusion_spectral_mutual_information(
                    x, y, sigma=self.dse_sigma, t=self.dse_t, n_repetitions=self.dsmi_repetitions, seed=self.seed
                )
            )
        spec = REPRESENTATION_MEASURES[measure]
        overrides: dict[str, Any] = {}
        if measure == "dse":
            overrides = {"sigma": self.dse_sigma, "t": self.dse_t, "max_n": None}
        elif measure == "vendi":
            overrides = {"q": self.vendi_q, "kernel": "rbf", "sigma": self.dse_sigma}
        elif measure == "rankme":
            overrides = {"eps": self.rankme_eps}
        return float(spec(x, **overrides))

    def _params(self, name: str, layer: _Layer, x: Tensor | None) -> dict[str, float]:
        key = f"{self.prefix}/{name}"
        out = {
            f"{key}/d": float(layer.dim),
            f"{key}/n_streamed": float(layer.raw.count),
            f"{key}/nonfinite": float(layer.nonfinite),
        }
        if x is not None:
            out[f"{key}/n"] = float(len(x))
        if any(m in _KERNEL_MEASURES for m in self.measures) or (
            "vendi" in self.measures and self.vendi_kernel == "rbf"
        ):
            out[f"{key}/dse_sigma"] = self.dse_sigma
            out[f"{key}/dse_t"] = float(self.dse_t)
            if x is not None and len(x) >= 2:
                out[f"{key}/median_dist"] = float(median_pairwise_distance(x))
        if "vendi" in self.measures:
            out[f"{key}/vendi_q"] = self.vendi_q
        if "rankme" in self.measures:
            out[f"{key}/rankme_eps"] = self.rankme_eps
        return out

    def _flush(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
        metrics = self.compute_metrics(step, trainer.world_size, trainer.global_rank, reduce, pl_module.device)
        if trainer.sanity_checking:
            # Lightning clears logged metrics after the sanity check: publish at the first training batch (step 0)
            self._deferred = metrics
            return
        self._publish(trainer, pl_module, metrics)

    def compute_metrics(
        self, step: int, world: int = 1, rank: int = 0, reduce: Callable[[Tensor], Tensor] | None = None,
        device: torch.device | None = None,
    ) -> dict[str, float]:
        """The trainer-free core of a logging step: this window's captures → metrics by key (finite values only).

        ``reduce`` sums a tensor over the ``world`` ranks (this one is ``rank``); it is called once. Fills
        ``spectra``, ``last_logged`` and ``history`` and frees the window's statistics; publishes nothing. Used by
        the Lightning path and by :mod:`entrotrain.integrations.transformers` (same keys, same values). With
        ``world > 1`` and ``reduce``, every rank must call this at every logging step, one that captured nothing
        too: the ranks first exchange their layers' names and widths (one ``all_gather_object``), so such a rank
        joins the reduce with empty layers (on ``device``) and returns what the others return.

        Raises:
            TapError: nothing was captured in this window (under DDP: by no rank, raised on every rank).
        """
        if world > 1 and reduce is not None:
            self._join_layers(device)
        if not self.layers:
            assert self.tap is not None
            raise TapError(
                f"RepresentationEntropyMonitor captured nothing at step {step}: none of the modules {self.tap.names[:8]} "
                "ran forward during the captured batches. Include modules that the training/validation step calls."
            )
        if not self._warned_missing and self.tap is not None:
            missing = [n for n in self.tap.names if n not in self.layers]
            if missing:
                rank_zero_warn(f"RepresentationEntropyMonitor: modules {missing[:8]} matched but never ran forward.")
            rank_zero_info("RepresentationEntropyMonitor layers: " + ", ".join(sorted(self.layers)))
            self._warned_missing = True
        samples = self._reduce(world, rank, reduce)
        metrics: dict[str, float] = {}
        self.spectra = {}
        with torch.no_grad():
            for name in sorted(self.layers):
                layer = self.layers[name]
                x, y = samples[name]
                for measure in self.measures:
                    value = self._measure(name, measure, layer, x, y)
                    if value is not None:
                        metrics[f"{self.prefix}/{name}/{measure}"] = value
                metrics.update(self._params(name, layer, x))
                self._nonfinite.add(float(layer.nonfinite), f"activation rows of {name!r} held NaN/Inf", f"step {step}")
                if self.log_spectrum and float(layer.raw.count) >= 2:
                    try:
                        self.spectra[name] = layer.raw.spectrum(centered=True).cpu()
                    except (torch.linalg.LinAlgError, EntrotrainError):
                        pass  # no spectrum chart this step; the measures say why (warned once)
        metrics = {k: v for k, v in metrics.items() if is_finite_number(v)}  # never NaN into history
        self.layers = {}  # free the d×d statistics until the next logging step
        self.last_logged = metrics
        self.history.append((step, metrics))
        return metrics

    def _publish(self, trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> None:
        published_at = publish_scalars(trainer, pl_module, metrics, source=self.state_key)
        record_arrays(trainer, self.record_arrays(), published_at)  # no-op without a run record
        if self.log_spectrum and trainer.is_global_zero:
            self._log_media(trainer, published_at)

    def record_arrays(self) -> list[RecordArray]:
        """The run record's arrays of the last logging step: each layer's covariance eigenvalues (the report's
        spectra)."""
        return [RecordArray(f"{self.prefix}/{name}/spectrum", eigs, "spectrum") for name, eigs in self.spectra.items()]

    def media(self) -> dict[str, Any]:
        """The wandb spectrum charts of the last logging step, keyed as logged (empty when there are none, and at the
        logging steps ``spectrum_every`` skips: each call counts one logging step)."""
        from entrotrain.dashboards.spectrum_plot import spectrum_plot

        due = self._media_steps % self.spectrum_every == 0
        self._media_steps += 1
        if not due:
            return {}
        return {
            f"{self.prefix}/{name}/spectrum": spectrum_plot(eigs, title=f"{name}: covariance eigenvalue shares (log10)")
            for name, eigs in self.spectra.items()
        }

    def _log_media(self, trainer: Trainer, step: int) -> None:
        from entrotrain.dashboards.wandb_media import wandb_loggers

        loggers = wandb_loggers(trainer.loggers)
        if not loggers or not self.spectra:
            return
        media = self.media()
        if not media:
            return
        for logger in loggers:
            logger.experiment.log({**media, "trainer/global_step": step})

    # ------------------------------------------------------------------ summary
    def summary_table(self) -> str:
        """The first and last logged value of every layer × measure as a small text table."""
        (first_step, first), (last_step, last) = self.history[0], self.history[-1]
        layers = sorted({k[len(self.prefix) + 1 :].rsplit("/", 1)[0] for k in last if k.startswith(self.prefix)})
        width = max([len(n) for n in layers] + [5])
        lines = [
            f"representation entropy ({self.stage}, step {first_step} -> step {last_step})",
            f"  {'layer':<{width}}  {'measure':<26} {'first':>10} {'last':>10}   ratio",
        ]
        for name in layers:
            for measure in self.measures:
                key = f"{self.prefix}/{name}/{measure}"
                if key in first and key in last:
                    a, b = first[key], last[key]
                    ratio = f"{b / a:6.2f}x" if a not in (0.0,) and math.isfinite(a) else "   -"
                    lines.append(f"  {name:<{width}}  {measure:<26} {a:10.4f} {b:10.4f}  {ratio}")
        return "\n".join(lines)
