r"""The information plane, live: I(X;T) and I(T;Y) of every chosen layer T on a fixed probe set, per estimator.

Shwartz-Ziv & Tishby (2017, "Opening the Black Box of Deep Neural Networks via Information"), Saxe et al. (2018, "On
the Information Bottleneck Theory of Deep Learning"), Chelombiev et al. (2019, "Adaptive Estimators Show Information
Compression in Deep Neural Networks"): the picture depends on the estimator, so every value is published under the
estimator's name and its parameters are logged beside it. The estimators are those of
:mod:`entrotrain.functional.information` (``information_plane_point``); this callback only schedules, captures,
gathers and publishes.

When: at the **start** of a training batch, before its update (IDNNs records "at the start of epoch j"):

* ``every_n_epochs=n`` (default 1): at the first batch of epochs ``0, n, 2n, ...``;
* ``log_spaced=K`` (recommended for long runs: dense early, sparse late): epochs
  ``unique(int(logspace(log2 1, log2 E, K, base 2))) − 1`` over the fit's ``E`` epochs — exactly IDNNs' schedule
  (``E = 8000, K = 400`` gives its 274 epochs); ``E`` is ``max_epochs`` or ``ceil(max_steps / optimizer steps per
  epoch)``, the smaller when both are set (the fit stops at the first);
* ``every_n_steps=n``: at optimizer steps ``0, n, 2n, ...`` (the first micro-batch of the step).

What: the probe set (``probe``) goes through ``pl_module(x)`` in eval mode under ``torch.no_grad()`` (each module's
train/eval flag restored afterwards); :class:`~entrotrain.taps.ActivationTap` forward hooks, installed only for that
pass, capture detached outputs; the pass runs under :func:`~entrotrain.taps.exclusive_capture`, so other monitors'
taps never score it, whatever the order of the callbacks. No RNG is touched (the probe subsample has its own seeded generator), no parameter
or buffer changes (BatchNorm in eval mode does not update its statistics), so training is bit-for-bit the same with
the monitor on. The pass runs in the module's own precision, outside the trainer's autocast.

Probe set (choice 5 of the reference note: which data MI is computed on): ``"all"`` = the training then the
validation dataset (for the 12-bit task: all 4,096 patterns, the paper's choice; the training dataset alone when the
fit has no validation data; of several validation loaders, the first), ``"train"``, ``"val"``, or
``"datamodule"`` = ``trainer.datamodule.information_probe()`` returning ``(x, labels)``. Datasets are read by index
(no loader iteration, no augmentation RNG); beyond ``max_probe`` rows a seeded subsample (sorted indices) is used.
The probe is read once per fit.

Layers (choice 9): ``include=None`` taps, for every ``nn.Linear``, its **activation output** — the last of the
parameter-free modules that follow it inside its ``nn.Sequential`` (``Linear → Tanh`` gives the tanh output,
``Linear → Softmax`` the probabilities), or the Linear's own output when nothing follows. Globs choose modules
explicitly. Layers are named ``L1, L2, ...`` in ``named_modules()`` order; the mapping is logged once as the
hyperparameter ``info/layers`` and printed. A module called more than once per forward is refused.

DDP: the probe is cut into chunks of ``probe_batch_size`` rows and rank ``r`` forwards chunks ``r, r + W, ...``;
one ``all_gather`` of all layers' activations (one buffer) rebuilds the whole probe on every rank, in the original
row order. Each chunk is forwarded exactly as one process forwards it, so the activations — and every estimate,
which each rank then computes on the same data — are bit-identical to a single process's (tested on 2 gloo ranks).

Logged keys (``{p}`` = ``prefix``, default ``info``; ``{layer}`` = ``L1``...; ``{estimator}`` as given):

===================================  ========================================================================
``{p}/{layer}/{estimator}/I_XT``     I(X;T) in ``base`` units (default 2 = bits, as the papers plot)
``{p}/{layer}/{estimator}/I_TY``     I(T;Y)
``{p}/nonfinite``                    probe rows with NaN/Inf activations, summed over layers (0 when clean)
``{p}/epoch``                        the epoch of the evaluation (evaluations happen before its updates)
hyperparameters                      ``{p}/layers`` (name map), ``{p}/{estimator}/params`` (the parameters the
                                     estimator used, ``estimator_parameters``, a callable by its qualified name),
                                     ``{p}/probe`` (source, rows, base)
``{p}/plane`` (wandb, at fit end)    a ``wandb.Table`` (step, epoch, layer, estimator, I_XT, I_TY) of the history,
                                     and ``{p}/plane/{estimator}`` a ``wandb.plot.scatter`` of I_TY against I_XT
===================================  ========================================================================

Non-finite data (DESIGN.md §8): a layer whose probe activations hold NaN/Inf in any row is skipped at that
evaluation (MI over a subset of the probe would be another quantity): its rows are counted in ``{p}/nonfinite``,
warned about once per fit, and its keys go to ``trainer.callback_metrics`` as NaN and to no logger. An estimator that
refuses the data (:class:`~entrotrain.errors.EntrotrainError`) is treated the same way. Training never stops.
``binning`` activations outside its ``range`` (default ``(-1, 1)``: a ReLU layer) are clipped into the edge bins,
which can only lower both values: the first such layer is warned about once per fit, with the share clipped.

Lifecycle: history (bounded, :class:`~entrotrain.callbacks._history.ThinnedHistory`) and warnings reset at every
``fit``; the history survives a resume (``state_dict``); hooks are removed on every exit path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from entrotrain._validation import check_choice, check_int, check_real
from entrotrain.callbacks._history import ThinnedHistory
from entrotrain.callbacks._lifecycle import HookedMonitor
from entrotrain.callbacks._loaders import first_loader
from entrotrain.callbacks._nonfinite import NonFiniteCounter, is_finite_number
from entrotrain.callbacks._publish import publish_scalars
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional import information as _info
from entrotrain.functional._dist import reshard_fsdp
from entrotrain.taps.activation_tap import ActivationTap, Capture
from entrotrain.taps.exclusive import exclusive_capture
from entrotrain.taps.module_names import named_modules

__all__ = ["InformationPlaneMonitor", "activation_output_names", "chunk_layout", "log_spaced_epochs"]

Probe = Literal["all", "train", "val", "datamodule"]


def log_spaced_epochs(total_epochs: int, points: int) -> list[int]:
    """IDNNs' evaluation epochs: ``unique(logspace(log2 1, log2 total, points, base=2, dtype=int)) − 1``.

    ``log_spaced_epochs(8000, 400)`` gives the paper's 274 epochs (0…31 every epoch, then sparser). numpy's
    ``dtype=int`` truncation is kept (exact reproduction): ``2**log2(E)`` can land just below ``E``, so the last
    evaluation is epoch ``E − 1`` or ``E − 2``.
    """
    check_int(total_epochs, "total_epochs", low=1)
    check_int(points, "points", low=1)
    grid = np.logspace(np.log2(1), np.log2(total_epochs), points, base=2, dtype=int)
    return [int(e) - 1 for e in np.unique(grid)]


def activation_output_names(model: nn.Module) -> list[str]:
    """For every ``nn.Linear`` of ``model`` (``named_modules()`` order): the name of the last parameter-free module
    that follows it in its parent ``nn.Sequential`` (its activation output), or the Linear's own name."""
    modules = dict(named_modules(model))  # clean names, as ActivationTap matches them (no wrapper segments)
    names: list[str] = []
    for name, module in modules.items():
        if not name or not isinstance(module, nn.Linear):
            continue
        parent_name, _, key = name.rpartition(".")
        parent = modules.get(parent_name)
        chosen = name
        if isinstance(parent, nn.Sequential):
            keys = list(parent._modules)
            for follower in keys[keys.index(key) + 1 :]:
                sub = parent._modules[follower]
                if sub is None or any(True for _ in sub.parameters()):
                    break
                chosen = f"{parent_name}.{follower}" if parent_name else follower
        names.append(chosen)
    return names


def _dataset_length(dataset: Any, what: str) -> int:
    try:
        return len(dataset)
    except TypeError:
        raise EntrotrainError(
            f"InformationPlaneMonitor: the {what} dataset ({type(dataset).__name__}) has no length, so no fixed probe "
            "set can be drawn from it; use probe='datamodule' with a datamodule.information_probe() -> (x, labels)."
        ) from None


def _probe_index(n: int, max_probe: int, seed: int) -> Tensor:
    """All of ``0..n-1``, or a seeded subsample of ``max_probe`` sorted indices (own generator, global RNG untouched)."""
    if n <= max_probe:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_probe].sort().values


def _dataset_rows(dataset: Any, index: Tensor, input_index: int | str, label_index: int | str,
                  what: str) -> tuple[Tensor, Tensor]:
    """Inputs and labels of the items ``index`` of ``dataset``, read by index (no loader, no sampler)."""
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and isinstance(input_index, int) and isinstance(label_index, int):
        return tensors[input_index][index], tensors[label_index][index]
    items = [dataset[int(i)] for i in index]
    try:
        x = torch.stack([torch.as_tensor(item[input_index]) for item in items])
        y = torch.stack([torch.as_tensor(item[label_index]) for item in items])
    except (KeyError, IndexError, TypeError, RuntimeError) as e:
        raise EntrotrainError(
            f"InformationPlaneMonitor: could not read inputs item[{input_index!r}] and labels item[{label_index!r}] "
            f"from the {what} dataset ({e}); set input_index / label_index, or use probe='datamodule'."
        ) from None
    return x, y


def chunk_layout(sizes: Sequence[int], world: int) -> tuple[list[tuple[int, int]], int]:
    """Where chunk ``c`` (of ``sizes[c]`` rows) sits after an ``all_gather`` when rank ``c % world`` forwards it:
    ``(rank, row offset in that rank's buffer)`` per chunk, and the buffer length every rank pads to."""
    check_int(world, "world", low=1)
    offsets = [0] * world
    where = []
    for c, size in enumerate(sizes):
        r = c % world
        where.append((r, offsets[r]))
        offsets[r] += int(size)
    return where, max(offsets)


class InformationPlaneMonitor(HookedMonitor):
    r"""Logs I(X;T) and I(T;Y) of every chosen layer on a fixed probe set, for each estimator, over training.

    Args:
        include: glob patterns of module names whose outputs are the layers T; ``None`` = the activation output of
            every ``nn.Linear`` (:func:`activation_output_names`).
        exclude: glob patterns of module names to skip.
        estimators: names from :data:`entrotrain.functional.information.ESTIMATORS` (``"binning"``,
            ``"adaptive_binning"``, ``"kde"``, ``"ksg"``, ...).
        estimator_params: per estimator, keyword parameters passed to ``information_plane_point`` (e.g.
            ``{"binning": {"n_bins": 30}, "kde": {"noise_variance": 1e-3}}``); the values used are logged.
        every_n_epochs: evaluate at the first batch of epochs ``0, n, 2n, ...``.
        log_spaced: evaluate at IDNNs' ``log_spaced`` log-spaced epochs over the fit (:func:`log_spaced_epochs`).
        every_n_steps: evaluate at optimizer steps ``0, n, 2n, ...``. Exactly one of the three is set (``log_spaced``
            or ``every_n_steps`` given turns ``every_n_epochs`` off).
        probe: ``"all"`` (train then validation dataset), ``"train"``, ``"val"`` or ``"datamodule"``
            (``trainer.datamodule.information_probe()``).
        max_probe: most probe rows; a seeded subsample (sorted) beyond.
        probe_batch_size: rows per forward of the probe pass (under DDP the unit of sharding: a probe of at most
            this many rows is forwarded by rank 0 alone).
        input_index: where the inputs are in a dataset item (index or key).
        label_index: where the integer class labels are in a dataset item (bool labels are the classes 0 and 1).
        base: logarithm base of the values (2 = bits, the papers' plots; ``math.e`` = nats).
        output_index: element read from tuple/list module outputs.
        seed: seed of the probe subsample.
        prefix: key prefix.
        log_table: on rank zero with a wandb logger, log the history as ``{p}/plane`` table and scatter plots at
            fit end.
        print_summary: print per layer and estimator I(X;T) first / peak / end and I(T;Y) end when training ends.

    Raises:
        EntrotrainError: on invalid arguments or an unreadable probe set; when no module matches.
        TapError: when a chosen module does not run once per probe row.

    Example::

        trainer = Trainer(callbacks=[InformationPlaneMonitor(estimators=["binning", "kde"], log_spaced=100)])
    """

    def __init__(
        self,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        estimators: Sequence[str] = ("binning", "kde"),
        estimator_params: dict[str, dict[str, Any]] | None = None,
        every_n_epochs: int | None = 1,
        log_spaced: int | None = None,
        every_n_steps: int | None = None,
        probe: Probe = "all",
        max_probe: int = 4096,
        probe_batch_size: int = 1024,
        input_index: int | str = 0,
        label_index: int | str = 1,
        base: float = 2.0,
        output_index: int = 0,
        seed: int = 0,
        prefix: str = "info",
        log_table: bool = True,
        print_summary: bool = True,
    ) -> None:
        estimators = list(estimators)
        known = list(_info.ESTIMATORS)
        unknown = [e for e in estimators if e not in known]
        if unknown or not estimators:
            raise EntrotrainError(f"estimators: unknown or empty {unknown or estimators}; choose from {known}.")
        if len(set(estimators)) != len(estimators):
            raise EntrotrainError(f"estimators lists a name twice: {estimators}.")
        params = dict(estimator_params or {})
        if not all(isinstance(v, dict) for v in params.values()) or set(params) - set(estimators):
            raise EntrotrainError(
                f"estimator_params must map names of the chosen estimators {estimators} to dicts of parameters, got "
                f"{params!r}."
            )
        for name in estimators:  # fail at construction on a bad parameter, not mid-fit
            _info.estimator_parameters(name, **params.get(name, {}))
        if log_spaced is not None or every_n_steps is not None:
            every_n_epochs = None
        if sum(v is not None for v in (every_n_epochs, log_spaced, every_n_steps)) != 1:
            raise EntrotrainError(
                "set exactly one schedule: every_n_epochs, log_spaced or every_n_steps, got "
                f"every_n_epochs={every_n_epochs}, log_spaced={log_spaced}, every_n_steps={every_n_steps}."
            )
        check_int(every_n_epochs, "every_n_epochs", low=1, none_ok=True)
        check_int(log_spaced, "log_spaced", low=1, none_ok=True)
        check_int(every_n_steps, "every_n_steps", low=1, none_ok=True)
        check_choice(probe, "probe", ("all", "train", "val", "datamodule"))
        check_int(max_probe, "max_probe", low=2)
        check_int(probe_batch_size, "probe_batch_size", low=1)
        check_real(base, "base", low=1.0, low_open=True)
        check_int(output_index, "output_index")
        check_int(seed, "seed")
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else []
        self.estimators = estimators
        self.estimator_params = {name: dict(params.get(name, {})) for name in estimators}
        self.every_n_epochs, self.log_spaced, self.every_n_steps = every_n_epochs, log_spaced, every_n_steps
        self.probe, self.max_probe, self.probe_batch_size = probe, max_probe, probe_batch_size
        self.input_index, self.label_index = input_index, label_index
        self.base = float(base)
        self.output_index, self.seed = output_index, seed
        self.prefix = prefix.rstrip("/")
        self.log_table, self.print_summary = log_table, print_summary
        self.tap: ActivationTap | None = None
        self.layer_names: dict[str, str] = {}  # short name (L1...) -> module name
        self.history: list[tuple[int, int, dict[str, tuple[float, float]]]] = ThinnedHistory()
        self.last_logged: dict[str, float] = {}
        self.eval_seconds: list[float] = []
        self._probe_data: tuple[Tensor, Tensor] | None = None
        self._epochs: set[int] | None = None
        self._last_step: int | None = None
        self._announced = False
        self._rows: dict[str, list[Tensor]] = {}
        self._nonfinite = NonFiniteCounter("InformationPlaneMonitor", f"{self.prefix}/nonfinite")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, prefix=self.prefix)

    # ------------------------------------------------------------------ lifecycle
    def _reset_fit_state(self) -> None:
        """Forget the previous fit: history, timings, probe, schedule, warnings."""
        self._release()
        self.history = ThinnedHistory()
        self.last_logged = {}
        self.eval_seconds = []
        self._probe_data = None
        self._epochs = None
        self._last_step = None
        self._announced = False
        self._nonfinite.reset()

    def state_dict(self) -> dict[str, Any]:
        """The history (the end-of-fit summary and table survive a resume)."""
        return {"history": [(s, e, {k: list(v) for k, v in row.items()}) for s, e, row in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = ThinnedHistory(
            (int(s), int(e), {k: (float(v[0]), float(v[1])) for k, v in row.items()})
            for s, e, row in state_dict.get("history", [])
        )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.tap is None or self.tap.model is not pl_module:
            self._release()
            include = self.include if self.include is not None else activation_output_names(pl_module)
            if not include:
                raise EntrotrainError(
                    f"InformationPlaneMonitor(include=None) found no nn.Linear in {type(pl_module).__name__}; name the "
                    "layers with include=[glob, ...]."
                )
            self.tap = ActivationTap(
                pl_module, include=include, exclude=self.exclude, output_index=self.output_index,
                on_capture=self._consume,
            )
            self.layer_names = {f"L{i + 1}": name for i, name in enumerate(self.tap.names)}

    def _release(self) -> None:
        if self.tap is not None:
            self.tap.disarm()
        self._rows = {}

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._release()
        if not trainer.is_global_zero or not self.history:
            return
        if self.log_table:
            self._log_table(trainer)
        if self.print_summary:
            print(self.summary_table())

    # ------------------------------------------------------------------ schedule
    def _schedule(self, trainer: Trainer) -> set[int] | None:
        if self.log_spaced is None:
            return None
        if self._epochs is None:
            total = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
            batches = trainer.num_training_batches
            if trainer.max_steps not in (None, -1) and math.isfinite(batches) and batches > 0:
                # Lightning steps on every accumulate-th batch and on an epoch's last batch: ceil, not floor
                per_epoch = -(-int(batches) // max(1, trainer.accumulate_grad_batches))
                by_steps = math.ceil(trainer.max_steps / per_epoch)  # the fit stops at whichever limit comes first
                total = by_steps if total is None else min(total, by_steps)
            if total is None:
                raise EntrotrainError(
                    "InformationPlaneMonitor(log_spaced=...) needs the fit's length: set trainer max_epochs, or "
                    "max_steps with a sized training loader; or use every_n_epochs / every_n_steps."
                )
            self._epochs = set(log_spaced_epochs(max(1, int(total)), self.log_spaced))
        return self._epochs

    def _due(self, trainer: Trainer, batch_idx: int) -> bool:
        step = trainer.global_step
        if step == self._last_step:
            return False  # a later micro-batch of a step already evaluated
        if self.every_n_steps is not None:
            return step % self.every_n_steps == 0
        if batch_idx != 0:
            return False
        epoch = trainer.current_epoch
        epochs = self._schedule(trainer)
        return epoch in epochs if epochs is not None else epoch % int(self.every_n_epochs) == 0  # type: ignore[arg-type]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.tap is None or trainer.sanity_checking or not self._due(trainer, batch_idx):
            return
        self._last_step = trainer.global_step
        self.evaluate(trainer, pl_module)

    # ------------------------------------------------------------------ probe
    def _dataset(self, trainer: Trainer, which: str) -> Any:
        """The dataset of the ``which`` (``"train"`` / ``"val"``) loader; ``None`` for ``"val"`` when the fit has no
        validation data (none given, or loaders given to ``trainer.fit`` with ``limit_val_batches=0``)."""
        loader = None
        dm = trainer.datamodule
        if which == "train":
            loader = trainer.train_dataloader
            if loader is None and dm is not None:
                loader = dm.train_dataloader()
        else:
            loader = trainer.val_dataloaders
            if loader is None:
                # only a hook the user wrote: Lightning's default *_dataloader() raises MisconfigurationException
                source = next((s for s in (dm, trainer.lightning_module) if is_overridden("val_dataloader", s)), None)
                loader = source.val_dataloader() if source is not None else None
            if loader is None:
                return None
        loader = first_loader(loader)  # of several validation loaders, the first (dataloader_idx=0)
        dataset = getattr(loader, "dataset", None)
        if dataset is None:
            raise EntrotrainError(
                f"InformationPlaneMonitor(probe={self.probe!r}) found no single {which} DataLoader to read a dataset "
                f"from (got {type(loader).__name__}); pass one, or use probe='datamodule' with "
                "datamodule.information_probe() -> (x, labels)."
            )
        return dataset

    def _load_probe(self, trainer: Trainer, pl_module: LightningModule) -> tuple[Tensor, Tensor]:
        if self.probe == "datamodule":
            fn = getattr(trainer.datamodule, "information_probe", None)
            if not callable(fn):
                raise EntrotrainError(
                    "InformationPlaneMonitor(probe='datamodule') needs trainer.datamodule.information_probe() returning "
                    f"(x, labels); the datamodule is {type(trainer.datamodule).__name__}. Use probe='all' otherwise."
                )
            x, y = fn()
            if not isinstance(x, Tensor) or len(torch.as_tensor(y)) != len(x):
                raise EntrotrainError(
                    "InformationPlaneMonitor: datamodule.information_probe() must return (x, labels): a tensor of "
                    f"inputs and one label per input, got {type(x).__name__} and {len(torch.as_tensor(y))} labels."
                )
            index = _probe_index(len(x), self.max_probe, self.seed)
            x, y = x[index], torch.as_tensor(y)[index]
        else:
            parts = ["train", "val"] if self.probe == "all" else [self.probe]
            datasets = [self._dataset(trainer, p) for p in parts]
            if datasets[-1] is None:  # no validation data
                if self.probe == "val":
                    raise EntrotrainError(
                        "InformationPlaneMonitor(probe='val') found no validation data in this fit (none given, or "
                        "limit_val_batches=0); pass val_dataloaders to trainer.fit (or a datamodule with "
                        "val_dataloader()), or use probe='train' or 'all'."
                    )
                rank_zero_info("InformationPlaneMonitor(probe='all'): no validation data in this fit; the probe set "
                               "is the training dataset alone.")
                parts, datasets = parts[:-1], datasets[:-1]
            sizes = [_dataset_length(d, p) for d, p in zip(datasets, parts)]
            index = _probe_index(sum(sizes), self.max_probe, self.seed)  # over the concatenation, read only those
            got, start = [], 0
            for dataset, part, size in zip(datasets, parts, sizes):
                mine = index[(index >= start) & (index < start + size)] - start
                got.append(_dataset_rows(dataset, mine, self.input_index, self.label_index, part))
                start += size
            x, y = torch.cat([g[0] for g in got]), torch.cat([g[1] for g in got])
        y = torch.as_tensor(y)
        if y.dim() != 1 or y.is_floating_point() or y.is_complex() or len(y) != len(x):
            raise EntrotrainError(
                f"InformationPlaneMonitor: probe labels must be a 1-D integer (or bool) tensor with one label per "
                f"input, got {y.dtype} {tuple(y.shape)} for inputs {tuple(x.shape)}; set label_index (or fix "
                "information_probe)."
            )
        if len(x) < 2:
            raise EntrotrainError(f"InformationPlaneMonitor: the probe set has {len(x)} row(s); it needs at least 2.")
        if y.dtype == torch.bool:
            y = y.long()  # the classes 0 and 1, as the estimators read bool labels
        return x.to(pl_module.device), y.to(pl_module.device)

    # ------------------------------------------------------------------ capture
    def _consume(self, name: str, capture: Capture) -> None:
        self._rows.setdefault(name, []).append(capture.rows)

    def _forward(self, pl_module: LightningModule, chunks: list[Tensor]) -> dict[str, Tensor]:
        """Each layer's activations ``(rows, d)`` of the input ``chunks`` (one forward each), in eval mode, without
        gradient, hooks removed after."""
        assert self.tap is not None
        modes = [(m, m.training) for m in pl_module.modules()]
        self._rows = {}
        try:
            pl_module.eval()
            with torch.no_grad(), self.tap, exclusive_capture(self.tap):  # other monitors' taps never see it
                for chunk in chunks:
                    if len(chunk):
                        pl_module(chunk)
            rows = {name: torch.cat(parts) for name, parts in self._rows.items()}
            calls = {name: len(parts) for name, parts in self._rows.items()}
        finally:
            for module, mode in modes:
                module.training = mode
            self._rows = {}
        n = sum(len(c) for c in chunks)
        forwards = sum(1 for c in chunks if len(c))
        for name in self.tap.names:
            got = len(rows[name]) if name in rows else 0
            if n == 0 and got == 0:  # a rank with no chunk: empty activations of the right width, from a dry run
                continue
            if got != n and calls.get(name) == forwards:  # called once per forward, several rows per input
                raise TapError(
                    f"InformationPlaneMonitor: module {name!r} gave {got} activation rows for {n} probe inputs in "
                    "one call per forward: its output has a token / position axis (e.g. (batch, seq, features)), "
                    "and the information plane needs one representation per input. Include modules whose output "
                    "is (batch, features), e.g. after pooling over the sequence."
                )
            if got != n:
                raise TapError(
                    f"InformationPlaneMonitor: module {name!r} gave {got} activation rows for {n} probe inputs; "
                    "a layer must run exactly once per input in forward(). Include modules of that kind only."
                )
        return {name: rows[name] for name in self.tap.names}

    def _idle_forward(self, pl_module: LightningModule, x: Tensor) -> None:
        """One forward whose activations nobody reads (eval mode, no gradient, no tap sees it, modes restored)."""
        modes = [(m, m.training) for m in pl_module.modules()]
        try:
            pl_module.eval()
            with torch.no_grad(), exclusive_capture():
                pl_module(x)
        finally:
            for module, mode in modes:
                module.training = mode

    def _width(self, pl_module: LightningModule, x: Tensor) -> dict[str, Tensor]:
        """Zero-row activations of every layer (a rank that holds no probe chunk still sends its buffer)."""
        return {name: t[:0] for name, t in self._forward(pl_module, [x[:1]]).items()}

    def _gather(self, trainer: Trainer, pl_module: LightningModule, x: Tensor) -> dict[str, Tensor]:
        """Activations of the whole probe on every rank. The probe is cut into chunks of ``probe_batch_size`` rows;
        rank ``r`` forwards chunks ``r, r + W, ...`` (each chunk exactly as one process forwards it, so the values are
        bit-identical to one process's) and one ``all_gather`` of all layers (one buffer) rebuilds the probe."""
        world, rank = trainer.world_size, trainer.global_rank
        chunks = list(x.split(self.probe_batch_size))
        if world == 1:
            return self._forward(pl_module, chunks)
        mine = chunks[rank::world]
        rows = self._forward(pl_module, mine) if mine else self._width(pl_module, x)
        # FSDP: a forward's all-gathers are collectives, so every rank runs as many forwards as the busiest one
        for _ in range(-(-len(chunks) // world) - max(len(mine), 1)):
            self._idle_forward(pl_module, x[:1])
        reshard_fsdp(pl_module)  # FSDP2 keeps the root gathered after a forward until a backward that never comes
        names = self.tap.names if self.tap is not None else list(rows)
        dims = [rows[n].shape[1] for n in names]
        dtype = torch.float32  # one buffer whose dtype holds every layer exactly (a float64 layer stays float64)
        for n in names:
            dtype = torch.promote_types(dtype, rows[n].dtype)
        where, per = chunk_layout([len(c) for c in chunks], world)
        buf = torch.zeros(per, sum(dims), dtype=dtype, device=x.device)
        local = torch.cat([rows[n].to(dtype) for n in names], dim=1)
        buf[: len(local)] = local
        gathered = trainer.strategy.all_gather(buf)  # (world, per, D)
        full = torch.cat([gathered[r, o : o + len(chunk)] for (r, o), chunk in zip(where, chunks)])
        out, offset = {}, 0
        for n, d in zip(names, dims):
            out[n] = full[:, offset : offset + d].to(rows[n].dtype)  # back to the layer's own dtype (exact)
            offset += d
        return out

    # ------------------------------------------------------------------ evaluate and publish
    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Run the probe set, estimate every layer × estimator, publish, and append to the history."""
        start = time.perf_counter()
        if self._probe_data is None:
            self._probe_data = self._load_probe(trainer, pl_module)
        x, y = self._probe_data
        activations = self._gather(trainer, pl_module, x)
        inputs = x.reshape(len(x), -1).float()
        step, epoch = trainer.global_step, trainer.current_epoch
        metrics: dict[str, float] = {}
        row: dict[str, tuple[float, float]] = {}
        nonfinite = 0
        short = {name: s for s, name in self.layer_names.items()}
        for name, t in activations.items():
            layer = short[name]
            bad = int((~torch.isfinite(t).all(dim=1)).sum()) if t.numel() else 0
            if bad:
                nonfinite += bad
                self._nonfinite.add(bad, f"probe rows of {layer} ({name!r}) held NaN/Inf; the layer is skipped",
                                    f"step {step}")
                continue
            for est in self.estimators:
                self._warn_clipped(est, layer, name, t)
                try:
                    ixt, ity = _info.information_plane_point(
                        t, y, est, x=inputs, base=self.base, **self.estimator_params[est]
                    )
                except EntrotrainError as e:
                    self._nonfinite.warn_once(
                        f"estimator:{layer}:{est}",
                        f"InformationPlaneMonitor: {est} on {layer} ({name!r}) could not be computed ({e}); published "
                        "as NaN to trainer.callback_metrics only (never to a logger). Shown once per fit.",
                    )
                    continue
                ixt, ity = float(ixt), float(ity)
                if is_finite_number(ixt) and is_finite_number(ity):
                    metrics[f"{self.prefix}/{layer}/{est}/I_XT"] = ixt
                    metrics[f"{self.prefix}/{layer}/{est}/I_TY"] = ity
                    row[f"{layer}/{est}"] = (ixt, ity)
        metrics[f"{self.prefix}/nonfinite"] = float(nonfinite)
        metrics[f"{self.prefix}/epoch"] = float(epoch)
        if not self._announced:
            self._announce(trainer, len(x))
        self.history.append((step, epoch, row))
        self.last_logged = metrics
        publish_scalars(trainer, pl_module, metrics, source=self.state_key)
        self.eval_seconds.append(time.perf_counter() - start)
        return metrics

    def _warn_clipped(self, est: str, layer: str, name: str, t: Tensor) -> None:
        """Warn once per fit and estimator when the fixed binning grid clips (or, ``scheme="idnns"``, wraps) a layer's
        activations: values outside ``range`` share the edge bins, which reads as less information (a ReLU layer
        under the default ``(-1, 1)``)."""
        if est != "binning" or not t.numel():
            return
        lo, hi = _info.estimator_parameters(est, **self.estimator_params[est])["range"]
        outside = float(((t < lo) | (t > hi)).double().mean())
        if outside > 0:
            self._nonfinite.warn_once(
                f"clipped:{est}",
                f"InformationPlaneMonitor: {100 * outside:.3g} % of the activations of {layer} ({name!r}) fall outside "
                f"the binning range ({lo:g}, {hi:g}) and are clipped into its edge bins, which can only lower both "
                "estimates; set estimator_params={'binning': {'range': (lo, hi)}} to cover the layers (ReLU: (0, "
                "their max)). Shown once per fit.",
            )

    def _announce(self, trainer: Trainer, rows: int) -> None:
        self._announced = True
        rank_zero_info(
            "InformationPlaneMonitor layers: " + ", ".join(f"{k}={v}" for k, v in self.layer_names.items())
        )
        params: dict[str, Any] = {
            f"{self.prefix}/layers": dict(self.layer_names),
            f"{self.prefix}/probe": {"source": self.probe, "rows": rows, "base": self.base},
        }
        for est in self.estimators:
            params[f"{self.prefix}/{est}/params"] = _info.loggable_parameters(  # a callable by its name
                _info.estimator_parameters(est, base=self.base, **self.estimator_params[est])
            )
        for logger in trainer.loggers:
            logger.log_hyperparams(params)

    # ------------------------------------------------------------------ media and summary
    def _table_rows(self) -> list[list[Any]]:
        out = []
        for step, epoch, row in self.history:
            for key, (ixt, ity) in sorted(row.items()):
                layer, est = key.split("/", 1)
                out.append([step, epoch, layer, est, ixt, ity])
        return out

    def _log_table(self, trainer: Trainer) -> None:
        from entrotrain.dashboards.wandb_media import wandb_loggers

        loggers = wandb_loggers(trainer.loggers)
        if not loggers:
            return
        import wandb

        columns = ["step", "epoch", "layer", "estimator", "I_XT", "I_TY"]
        rows = self._table_rows()
        media: dict[str, Any] = {f"{self.prefix}/plane": wandb.Table(columns=columns, data=rows)}
        for est in self.estimators:
            sub = wandb.Table(columns=columns, data=[r for r in rows if r[3] == est])
            media[f"{self.prefix}/plane/{est}"] = wandb.plot.scatter(
                sub, "I_XT", "I_TY", title=f"information plane ({est}, base {self.base:g}): I(T;Y) vs I(X;T)"
            )
        for logger in loggers:
            logger.experiment.log({**media, "trainer/global_step": trainer.global_step})

    def summary(self) -> dict[str, dict[str, float]]:
        """Per ``"{layer}/{estimator}"``: I(X;T) ``first``, ``peak``, ``peak_epoch``, ``end``, and I(T;Y) ``ty_end``."""
        out: dict[str, dict[str, float]] = {}
        for step, epoch, row in self.history:
            for key, (ixt, ity) in row.items():
                s = out.setdefault(key, {"first": ixt, "peak": ixt, "peak_epoch": epoch, "end": ixt, "ty_end": ity})
                if ixt > s["peak"]:
                    s["peak"], s["peak_epoch"] = ixt, epoch
                s["end"], s["ty_end"] = ixt, ity
        return out

    def summary_table(self) -> str:
        """The per layer × estimator summary as text (what the monitor prints at fit end)."""
        stats = self.summary()
        unit = "bits" if self.base == 2 else ("nats" if abs(self.base - math.e) < 1e-12 else f"base {self.base:g}")
        first, last = self.history[0], self.history[-1]
        lines = [
            f"information plane ({unit}; {len(self.history)} evaluations kept, epoch {first[1]} -> {last[1]}, "
            f"step {first[0]} -> {last[0]})",
            "  " + ", ".join(f"{k}={v}" for k, v in self.layer_names.items()),
            f"  {'layer':<6}{'estimator':<18}{'I_XT first':>11}{'peak':>9}{'@epoch':>8}{'end':>9}{'peak-end':>10}"
            f"{'I_TY end':>10}",
        ]
        for layer in self.layer_names:
            for est in self.estimators:
                s = stats.get(f"{layer}/{est}")
                if s is None:
                    continue
                lines.append(
                    f"  {layer:<6}{est:<18}{s['first']:11.3f}{s['peak']:9.3f}{int(s['peak_epoch']):8d}{s['end']:9.3f}"
                    f"{s['peak'] - s['end']:10.3f}{s['ty_end']:10.3f}"
                )
        if self.eval_seconds:
            times = sorted(self.eval_seconds)
            lines.append(
                f"  one evaluation ({len(self._probe_data[0]) if self._probe_data else '?'} probe rows, "
                f"{len(self.layer_names)} layers x {len(self.estimators)} estimators): median "
                f"{times[len(times) // 2] * 1e3:.1f} ms over {len(times)}"
            )
        return "\n".join(lines)
