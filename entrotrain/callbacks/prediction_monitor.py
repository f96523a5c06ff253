r"""Entropy of the model's own predictions (next-token or class), on training batches and a held-out probe set,
with greedy-generation diversity: the hyperfitting signal, live in a Lightning ``Trainer``.

Carlsson et al. (2025, "The Hyperfitting Phenomenon", arXiv 2412.04318): fine-tuning a pre-trained LM to near-zero
loss on a few sequences collapses its next-token entropy (nearly all probability on one token), also on held-out
text whose loss gets *worse*, while greedy continuations become *less* repetitive. This callback shows all three.

Where the predictive distribution comes from (``source``):

* ``"output"``: the logits ``training_step`` returns, ``{"loss": ..., "logits": logits}`` (``(B, V)`` classifier
  or ``(B, T, V)`` sequence), read detached; no extra forward. The probe forward reads the model's output
  (a tensor, an object with ``.logits`` or a mapping with ``"logits"``).
* ``"head"``: a forward pre-hook on the output head (the one module whose name matches the ``head`` glob, e.g.
  ``"**.lm_head"``), installed only during logging batches, reads its input hidden states (detached) and computes
  the statistics right there, with the head weight of that forward (the optimizer changes it before the batch
  ends), through the fused ``hidden × head`` path
  (:func:`~entrotrain.functional.prediction_entropy.prediction_stats_from_hidden`), which never holds more than
  ``chunk_size × V`` float32 logits (no second copy of huge-vocabulary logits). Labels for the NLL come from the
  batch in this mode.

Which positions count (padding is not data): ``keep = mask & attention_mask & (labels != ignore_index)``, each
taken from the dict ``training_step`` returns (keys ``mask``, ``attention_mask``, ``labels``) or else from the batch
(a dict batch's ``attention_mask`` / ``labels``; a tuple batch ``(x, y)``'s ``y`` when it is an integer tensor of
the logits' leading shape). Labels must be aligned with the predictions (label at ``t`` = target of the
prediction at ``t``, as :class:`~entrotrain.tasks.language_modeling.LanguageModelingTask`); HF-style unshifted
labels: ``shift_labels=True``. Labels also give the NLL (the loss) beside the entropy.

The probe set (held-out): the first ``probe_batches`` batches of ``trainer.datamodule.val_dataloader()`` (the
datamodule's own loader, so every rank sees the same batches; of several validation loaders, the first,
``dataloader_idx=0``), taken once at fit start with the global RNG states restored afterwards (training draws the
same random numbers with or without the monitor) and kept on the CPU, or the
batches given as ``probe`` (a ``(inputs, labels)`` pair or a list of such pairs / ``{"input_ids", "labels",
"attention_mask"}`` dicts). It is measured at every logging step in this callback's ``on_train_batch_end`` — after
the step's optimizer update — in eval mode, without gradient and without touching any RNG, then the module modes
are restored. Under DDP rank ``r`` scores probe rows ``r, r + W, ...`` and the sums are all-reduced. List this
callback *after* other monitors whose taps are armed during logging training batches (they disarm in their
``on_train_batch_end``), so the probe and generation forwards are not captured by them.

Greedy generation (``generation_prompts``): an int ``k`` takes the first ``prompt_length`` tokens of the first
``k`` probe sequences (the paper continues validation contexts); a list gives token-id prompts. Each is continued
greedily (argmax, no sampling: no RNG) for ``max_new_tokens`` tokens, the context cropped to the last
``context_size`` tokens (default ``hparams.block_size`` when the module has it), every
``generate_every_n_steps`` steps (a multiple of ``every_n_steps``). Every rank generates every prompt (identical
weights give identical continuations; no collective). Diversity is measured on the continuations only, in model
tokens, with no citation blocker: distinct-n pooled over continuations (Li et al. 2016), the mean type-token ratio
(Hyperfitting's TTR; the paper uses 96-token continuations) and Welleck et al.'s seq-rep-``repetition_n``.

Logged keys (``{p}`` = ``prefix``, default ``entropy/pred``; ``{s}`` = ``train`` or ``probe``), entropies in nats
at temperature 1 over the full vocabulary, averaged over every valid position of the reference (teacher-forced)
tokens, never over generated ones:

=====================================  ===============================================================================
``{p}/{s}/mean``                       mean entropy over valid positions (exact over micro-batches and ranks)
``{p}/{s}/p10|p50|p90``                quantiles of the positions' entropies (all ranks gathered; linear interpolation)
``{p}/{s}/top1_prob``                  mean top-1 probability
``{p}/{s}/below_floor_frac``           fraction of positions with entropy ``< floor``
``{p}/{s}/nll``                        mean NLL of the labels (when labels are known): the loss, on the probe the
                                       held-out loss
``{p}/{s}/tokens``                     valid positions scored
``{p}/probe/pos/{i}``                  mean probe entropy at sequence position ``i`` (the ``positions`` chosen)
``{p}/probe/pos_heatmap`` (wandb)      image: every position (rows) × logging step (columns, at most 384 evenly
                                       spaced), the whole profile; at every ``over_time_every``-th logging step
``{p}/gen/distinct_{n}``               distinct-n of the greedy continuations, for each ``n``
``{p}/gen/ttr``                        mean type-token ratio of the continuations
``{p}/gen/repetition``                 mean seq-rep-``repetition_n`` of the continuations
``{p}/nonfinite``                      valid positions with a NaN/Inf prediction (train + probe), left out
=====================================  ===============================================================================

Probe and generation forwards run in eval mode, without gradient and under :func:`~entrotrain.taps.exclusive_capture`:
other monitors' taps never score them, whatever the order of the callbacks.

Non-finite data (DESIGN.md §8): positions whose logits (or hidden states) hold NaN/Inf are counted in
``{p}/nonfinite``, warned about once per fit and left out of every statistic; a statistic with no finite position
goes to ``trainer.callback_metrics`` as NaN and to no logger. Training is bit-for-bit the same with the monitor on:
it only reads detached tensors, its forwards run without gradient in eval mode and use no RNG.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from entrotrain._validation import check_bool, check_choice, check_int, check_real, check_str, keep_mask
from entrotrain.callbacks._history import ThinnedHistory
from entrotrain.callbacks._lifecycle import HookedMonitor
from entrotrain.callbacks._loaders import first_loader
from entrotrain.callbacks._logging_window import LoggingWindow
from entrotrain.callbacks._nonfinite import NonFiniteCounter, is_finite_number
from entrotrain.callbacks._publish import publish_scalars
from entrotrain.dashboards.run_record import RecordArray, record_arrays
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional._dist import all_gather_varlen, reshard_fsdp
from entrotrain.functional.generation_diversity import distinct_n, repetition_rate, type_token_ratio
from entrotrain.functional.policy import quantile
from entrotrain.functional.prediction_entropy import (
    DEFAULT_CHUNK,
    PredictionStats,
    check_label_range,
    hidden_stats,
    prediction_stats_from_logits,
)
from entrotrain.taps.exclusive import exclusive_capture
from entrotrain.taps.module_names import named_modules
from entrotrain.taps.name_filter import NameFilter

__all__ = ["PredictionEntropyMonitor", "prediction_entropy_summary"]

_QUANTILES = (0.1, 0.5, 0.9)
_SUM_FIELDS = ("tokens", "entropy", "top1", "below", "nonfinite", "nll", "nll_tokens")


def prediction_entropy_summary(sums: Mapping[str, float], entropies: Tensor) -> dict[str, float]:
    """The logged statistics (without prefix) of one reduced set of positions.

    Args:
        sums: ``tokens`` (finite valid positions), ``entropy``, ``top1`` and ``below`` (sums over them), ``nll`` and
            ``nll_tokens`` (sum and count of the labelled ones), ``nonfinite``.
        entropies: the 1-D entropies of those positions (for the quantiles), any order.

    Returns:
        ``tokens``, ``nonfinite`` always; ``mean``, ``p10``, ``p50``, ``p90``, ``top1_prob``, ``below_floor_frac``
        when a position is left; ``nll`` when a labelled one is.
    """
    out = {"tokens": float(sums["tokens"]), "nonfinite": float(sums["nonfinite"])}
    n = float(sums["tokens"])
    if n > 0 and entropies.numel():
        out["mean"] = float(sums["entropy"]) / n
        values = entropies.double()
        for q in _QUANTILES:
            out[f"p{round(100 * q)}"] = float(quantile(values, q))
        out["top1_prob"] = float(sums["top1"]) / n
        out["below_floor_frac"] = float(sums["below"]) / n
    if float(sums["nll_tokens"]) > 0:
        out["nll"] = float(sums["nll"]) / float(sums["nll_tokens"])
    return out


@contextmanager
def _rng_untouched() -> Iterator[None]:
    """Restore the global RNGs (torch CPU, Python ``random``, NumPy) on exit: taking the probe batches must not shift
    the training run's random stream (a ``DataLoader`` iterator draws its base seed from it, and a dataset may
    augment at random)."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    np_state = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def _logits_of(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise EntrotrainError(
        f"the model returned {type(output).__name__}, with no logits: PredictionEntropyMonitor reads a tensor, an "
        "object with .logits or a mapping with 'logits'. Return the logits from forward, or use source='head'."
    )


class _Positions:
    """Per-micro-batch results of one logging window (train) or one probe pass."""

    def __init__(self, profile_len: int = 0) -> None:
        self.entropies: list[Tensor] = []
        self.sums = torch.zeros(len(_SUM_FIELDS), dtype=torch.float64)
        self.pos_sum = torch.zeros(profile_len, dtype=torch.float64)
        self.pos_count = torch.zeros(profile_len, dtype=torch.float64)


class PredictionEntropyMonitor(HookedMonitor):
    r"""Logs the entropy of the model's predictive distribution on training batches and a held-out probe set, and
    the diversity of greedy generations (module docstring: sources, masks, probe, keys).

    Args:
        every_n_steps: log at optimizer steps ``0, n, 2n, ...`` (all micro-batches of the step). With ``k`` optimizers
            stepped per batch (manual optimisation, GAN style), the batches whose first optimizer step is a multiple of
            ``n``: every lcm(n, k) optimizer steps (:class:`~entrotrain.callbacks._logging_window.LoggingWindow`).
        source: ``"output"`` (``training_step`` returns ``{"logits": ...}``) or ``"head"`` (hook on the output head,
            fused ``hidden × head`` statistics).
        head: with ``source="head"``, the glob matching exactly one module name (``"**.lm_head"``).
        probe: held-out probe batches (see the module docstring); ``None`` = the datamodule's validation data.
        probe_batches: with ``probe=None``, how many validation batches form the probe set (``0`` = no probe).
        floor: entropy floor (nats) of ``below_floor_frac``.
        positions: probe positions logged as scalars: an int ``k`` = ``k`` evenly spaced positions (first and last
            included), or a list of positions; ``0`` / empty = none. The whole profile goes to the heatmap.
        generation_prompts: ``None`` (no generation), an int ``k`` (the first ``prompt_length`` tokens of the first
            ``k`` probe sequences) or a list of token-id prompts.
        prompt_length: prompt tokens taken from probe sequences.
        generate_every_n_steps: generation cadence, a multiple of ``every_n_steps`` (``None`` = ``every_n_steps``).
        max_new_tokens: greedy tokens generated per prompt.
        n: distinct-n orders logged.
        repetition_n: n-gram order of the repetition rate (seq-rep-n).
        context_size: generation context (tokens); ``None`` = ``hparams.block_size`` when present, else no crop.
        ignore_index: label value of positions that are not scored.
        shift_labels: labels are the inputs (HF causal LM): the target of position ``t`` is ``labels[t + 1]``.
        chunk_size: rows per float32 logits block.
        log_media: log the position × step heatmap when a ``WandbLogger`` is attached (rank zero).
        over_time_every: log that heatmap at the first logging step with a probe profile and every
            ``over_time_every``-th one after it (``1`` = every one, ``0`` = never): each image redraws the whole
            history, so at every logging step a million-step run logging every 50 steps would store 20 000 of them.
        prefix: key prefix.
        print_summary: print the trajectory (train / probe entropy and NLL, diversity) when training ends.
        reference_step: a step whose row the summary always shows and compares with the last (e.g. the end of
            pre-training before a fine-tuning phase): the last logged step at or before it.

    Raises:
        EntrotrainError: on invalid arguments; at setup when ``head`` matches no module or several; at the first
            logging batch when ``training_step`` returned no logits (``source="output"``).
        TapError: when the head did not run during a logging batch, or ran more than once.
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        source: Literal["output", "head"] = "output",
        head: str = "**.lm_head",
        probe: Any = None,
        probe_batches: int = 2,
        floor: float = 0.5,
        positions: int | list[int] = 8,
        generation_prompts: int | list[list[int]] | None = None,
        prompt_length: int = 16,
        generate_every_n_steps: int | None = None,
        max_new_tokens: int = 64,
        n: Sequence[int] = (1, 2, 3),
        repetition_n: int = 4,
        context_size: int | None = None,
        ignore_index: int = -100,
        shift_labels: bool = False,
        chunk_size: int = DEFAULT_CHUNK,
        log_media: bool = True,
        prefix: str = "entropy/pred",
        print_summary: bool = True,
        reference_step: int | None = None,
        over_time_every: int = 10,
    ) -> None:
        check_int(every_n_steps, "every_n_steps", low=1)
        check_int(over_time_every, "over_time_every (0 = never log the position × step heatmap)", low=0)
        check_choice(source, "source", ("output", "head"))
        check_str(head, "head")
        check_int(probe_batches, "probe_batches", low=0)
        check_real(floor, "floor", low=0.0)
        if isinstance(positions, bool) or not isinstance(positions, (int, list, tuple)):
            raise EntrotrainError(f"positions must be an int or a list of positions, got {positions!r}.")
        if isinstance(positions, int):
            check_int(positions, "positions", low=0)
        else:
            for i in positions:
                check_int(i, "positions[i]", low=0)
        if generation_prompts is not None and not isinstance(generation_prompts, bool):
            if isinstance(generation_prompts, int):
                check_int(generation_prompts, "generation_prompts", low=1)
            elif not (
                isinstance(generation_prompts, (list, tuple))
                and generation_prompts
                and all(isinstance(p, (list, tuple)) and p and all(isinstance(t, int) for t in p) for p in generation_prompts)
            ):
                raise EntrotrainError(
                    "generation_prompts must be None, an int (prompts taken from the probe set) or a non-empty list "
                    f"of non-empty token-id lists, got {generation_prompts!r}."
                )
        elif isinstance(generation_prompts, bool):
            raise EntrotrainError(f"generation_prompts must be None, an int or a list, got {generation_prompts!r}.")
        check_int(prompt_length, "prompt_length", low=1)
        check_int(generate_every_n_steps, "generate_every_n_steps", low=1, none_ok=True)
        if generate_every_n_steps is not None and generate_every_n_steps % every_n_steps:
            raise EntrotrainError(
                f"generate_every_n_steps ({generate_every_n_steps}) must be a multiple of every_n_steps "
                f"({every_n_steps}): generation runs on logging steps."
            )
        check_int(max_new_tokens, "max_new_tokens", low=1)
        orders = list(n)
        if not orders:
            raise EntrotrainError("n must list at least one n-gram order, e.g. [1, 2, 3].")
        for order in orders:
            check_int(order, "n[i]", low=1)
        check_int(repetition_n, "repetition_n", low=1)
        check_int(context_size, "context_size", low=1, none_ok=True)
        check_int(ignore_index, "ignore_index")
        check_bool(shift_labels, "shift_labels")
        check_int(chunk_size, "chunk_size", low=1)
        check_int(reference_step, "reference_step", low=0, none_ok=True)
        self.reference_step = reference_step
        self.every_n_steps = every_n_steps
        self.source = source
        self.head = head
        self.probe = probe
        self.probe_batches = probe_batches
        self.floor = float(floor)
        self.positions = positions if isinstance(positions, int) else list(positions)
        self.generation_prompts = generation_prompts
        self.prompt_length = prompt_length
        self.generate_every_n_steps = generate_every_n_steps or every_n_steps
        self.max_new_tokens = max_new_tokens
        self.n = orders
        self.repetition_n = repetition_n
        self.context_size = context_size
        self.ignore_index = ignore_index
        self.shift_labels = shift_labels
        self.chunk_size = chunk_size
        self.log_media = log_media
        self.over_time_every = over_time_every
        self.prefix = prefix.rstrip("/")
        self.print_summary = print_summary
        self._window = LoggingWindow(every_n_steps)
        self._nonfinite = NonFiniteCounter("PredictionEntropyMonitor", f"{self.prefix}/nonfinite")
        self._head_module: nn.Module | None = None
        self._hook: Any = None
        self._captured: list[tuple[tuple[int, ...], PredictionStats]] = []
        self._head_labels: Tensor | None = None
        self._probe_set: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
        self._prompts: list[Tensor] = []
        self.last_profile: Tensor | None = None
        self._reset_fit_state()

    # ------------------------------------------------------------------ lifecycle
    def _reset_fit_state(self) -> None:
        """Forget the previous fit: history, profiles, the open window, warnings."""
        self._release()
        self.history: list[tuple[int, dict[str, float]]] = ThinnedHistory()
        self.profiles: list[tuple[int, list[float]]] = ThinnedHistory()
        self._media_steps = 0  # logging steps whose media were asked for in this fit (paces the heatmap)
        self._train = _Positions()
        self._nonfinite.reset()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix, source=self.source)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": [(step, dict(row)) for step, row in self.history],
            "profiles": [(step, list(p)) for step, p in self.profiles],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = ThinnedHistory((int(s), dict(r)) for s, r in state_dict.get("history", []))
        self.profiles = ThinnedHistory((int(s), list(p)) for s, p in state_dict.get("profiles", []))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._head_module = self._find_head(pl_module) if self.source == "head" else None
        if self.log_media and trainer.is_global_zero:
            from entrotrain.dashboards.wandb_media import setup_wandb_dashboard

            setup_wandb_dashboard(trainer.loggers)

    def bind(self, model: nn.Module) -> None:
        """Lightning-free core: fresh per-train state watching ``model`` (the HF ``Trainer`` integration's entry):
        finds the head (``source="head"``), takes the ``probe`` set (there is no datamodule: ``probe=None`` means no
        probe set) and the generation prompts."""
        self._reset_fit_state()
        self._head_module = self._find_head(model) if self.source == "head" else None
        self._probe_set = self._collect_probe(None) if self.probe is not None else []
        self._prompts = self._collect_prompts()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._probe_set = self._collect_probe(trainer)
        self._prompts = self._collect_prompts()

    def _release(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured = []
        self._window.close()

    # ------------------------------------------------------------------ head hook
    def _find_head(self, pl_module: LightningModule) -> nn.Module:
        match = NameFilter(self.head)
        found = [(name, m) for name, m in named_modules(pl_module) if name and match(name)]
        if len(found) != 1 or not isinstance(getattr(found[0][1], "weight", None), Tensor):
            names = [name for name, _ in found][:8]
            linear = [name for name, m in named_modules(pl_module) if isinstance(m, nn.Linear)][-4:]
            raise EntrotrainError(
                f"PredictionEntropyMonitor(source='head'): head={self.head!r} must match exactly one module with a "
                f"(V, D) weight, matched {names or 'none'}; e.g. one of the last linear layers {linear}."
            )
        return found[0][1]

    def _arm(self, labels: Tensor | None = None) -> None:
        """Hook the head; each call's statistics are computed in the hook, with the head's weight *of that forward*
        (the optimizer updates it before ``on_train_batch_end``). ``labels`` (aligned, ``-1`` = unscored) give the
        NLL when their shape is the hidden states' leading shape."""
        if self._head_module is None or self._hook is not None:
            return
        if labels is not None:  # checked here, before the forward: labels.max() inside a compiled one breaks its graph
            check_label_range(labels, self._head_module.weight.shape[0])
        self._head_labels = labels

        def capture(module: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], Tensor):
                return
            hidden = args[0].detach()
            lead = tuple(hidden.shape[:-1])
            lab = self._head_labels
            lab = lab.to(hidden.device).reshape(-1) if lab is not None and tuple(lab.shape) == lead else None
            bias = getattr(module, "bias", None)
            stats = hidden_stats(
                hidden.reshape(-1, hidden.shape[-1]), module.weight, bias if isinstance(bias, Tensor) else None,
                lab, chunk_size=self.chunk_size, labels_in_range=True,
            )
            self._captured.append((lead, stats))

        self._captured = []
        self._hook = self._head_module.register_forward_pre_hook(capture)

    def _disarm(self) -> list[tuple[tuple[int, ...], PredictionStats]]:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        captured, self._captured = self._captured, []
        self._head_labels = None
        return captured

    # ------------------------------------------------------------------ which positions count
    def _keep(self, lead: tuple[int, ...], found: Mapping[str, Any], device: torch.device) -> tuple[Tensor, Tensor | None]:
        keep = torch.ones(lead, dtype=torch.bool, device=device)
        for name in ("mask", "attention_mask"):
            mask = found.get(name)
            if isinstance(mask, Tensor) and tuple(mask.shape) == lead:
                keep &= keep_mask(mask, name).to(device)
        labels, _ = self._labels_only(found)
        if labels is not None and tuple(labels.shape) == lead:
            labels = labels.to(device)
            keep &= labels != self.ignore_index
            return keep, torch.where(keep, labels, torch.full_like(labels, -1))
        return keep, None

    def _labels_only(self, found: Mapping[str, Any]) -> tuple[Tensor | None, Tensor | None]:
        """``(labels, scored)``: the (shifted) integer labels of ``found`` and the same with unscored ones at -1."""
        labels = found.get("labels")
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.dtype == torch.bool:
            return None, None
        labels = labels.long()
        if self.shift_labels and labels.dim() == 2:
            pad = torch.full_like(labels[:, :1], self.ignore_index)
            labels = torch.cat([labels[:, 1:], pad], dim=1)
        return labels, torch.where(labels == self.ignore_index, torch.full_like(labels, -1), labels)

    @staticmethod
    def _batch_fields(batch: Any) -> dict[str, Any]:
        if isinstance(batch, Mapping):
            return {k: batch.get(k) for k in ("attention_mask", "labels", "mask")}
        if isinstance(batch, (tuple, list)) and len(batch) >= 2:
            return {"labels": batch[1]}
        return {}

    # ------------------------------------------------------------------ scoring
    def _score(
        self,
        acc: _Positions,
        lead: tuple[int, ...],
        keep: Tensor,
        labels: Tensor | None,
        *,
        logits: Tensor | None = None,
        head_stats: PredictionStats | None = None,
    ) -> None:
        """Add the valid positions of one forward to ``acc`` (entropy list, sums, per-position profile): from
        ``logits`` (scored on the kept rows) or from the head hook's per-row statistics of every row."""
        flat_keep = keep.reshape(-1)
        lab = None if labels is None else labels.reshape(-1)[flat_keep]
        if head_stats is not None:
            nll = head_stats.nll[flat_keep] if head_stats.nll is not None and lab is not None else None
            stats = PredictionStats(head_stats.entropy[flat_keep], head_stats.top1_prob[flat_keep], nll)
        else:
            assert logits is not None
            rows = logits.detach().reshape(-1, logits.shape[-1])[flat_keep]
            stats = prediction_stats_from_logits(rows, lab, chunk_size=self.chunk_size)
        h = stats.entropy.double()
        finite = torch.isfinite(h) & torch.isfinite(stats.top1_prob)
        hf = h[finite]
        sums = {
            "tokens": float(finite.sum()),
            "entropy": float(hf.sum()),
            "top1": float(stats.top1_prob.double()[finite].sum()),
            "below": float((hf < self.floor).sum()),
            "nonfinite": float((~finite).sum()),
            "nll": 0.0,
            "nll_tokens": 0.0,
        }
        if stats.nll is not None and lab is not None:
            scored = finite & (lab >= 0) & torch.isfinite(stats.nll)
            sums["nll"] = float(stats.nll.double()[scored].sum())
            sums["nll_tokens"] = float(scored.sum())
        acc.sums += torch.tensor([sums[k] for k in _SUM_FIELDS], dtype=torch.float64)
        acc.entropies.append(hf.cpu())
        if acc.pos_sum.numel() and len(lead) == 2:
            pos = torch.arange(lead[1], device=keep.device).expand(lead).reshape(-1)[flat_keep][finite]
            pos = pos.cpu().clamp(max=acc.pos_sum.numel() - 1)
            acc.pos_sum.index_add_(0, pos, hf.cpu())
            acc.pos_count.index_add_(0, pos, torch.ones_like(hf.cpu()))

    # ------------------------------------------------------------------ training batches
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.sanity_checking:
            return
        first = self._window.begin(trainer.global_step)
        if first is None:
            return
        if first:
            self._train = _Positions()
        if self.source == "head":
            _, labels = self._labels_only(self._batch_fields(batch))
            self._arm(labels)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._window.open:
            return
        captured = self._disarm()
        found = {**self._batch_fields(batch), **(dict(outputs) if isinstance(outputs, Mapping) else {})}
        if self.source == "head":
            if len(captured) != 1:
                raise TapError(
                    f"PredictionEntropyMonitor: the head {self.head!r} ran {len(captured)} times during a logging "
                    "training batch; it must run exactly once per micro-batch (one forward). Use source='output' "
                    "and return the logits from training_step instead."
                )
            lead, stats = captured[0]
            keep, labels = self._keep(lead, found, stats.entropy.device)
            self._score(self._train, lead, keep, labels, head_stats=stats)
        else:
            logits = found.get("logits")
            if not isinstance(logits, Tensor) or logits.dim() < 2 or not logits.is_floating_point():
                raise EntrotrainError(
                    "PredictionEntropyMonitor(source='output') needs training_step to return a dict with 'logits' "
                    f"((B, V) or (B, T, V), floating), got {type(outputs).__name__}"
                    f"{' keys ' + str(sorted(outputs)) if isinstance(outputs, Mapping) else ''}. Return "
                    "{'loss': loss, 'logits': logits.detach()} or use source='head'."
                )
            lead = tuple(logits.shape[:-1])
            keep, labels = self._keep(lead, found, logits.device)
            self._score(self._train, lead, keep, labels, logits=logits)
        step = self._window.end(trainer.global_step)
        if step is not None:
            self._flush(trainer, pl_module, step)

    # ------------------------------------------------------------------ probe
    def _collect_probe(self, trainer: Trainer | None) -> list[tuple[Tensor, Tensor | None, Tensor | None]]:
        batches: list[Any]
        if self.probe is not None:
            probe = self.probe
            single = isinstance(probe, Mapping) or (
                isinstance(probe, (tuple, list)) and len(probe) == 2 and isinstance(probe[0], Tensor)
            )
            batches = [probe] if single else list(probe)
        elif self.probe_batches == 0:
            return []
        else:
            datamodule = getattr(trainer, "datamodule", None)
            # only a val_dataloader() the user wrote: Lightning's default raises MisconfigurationException
            defined = datamodule is not None and is_overridden("val_dataloader", datamodule)
            loader_fn = datamodule.val_dataloader if defined else None
            if loader_fn is None:
                self._nonfinite.warn_once(
                    "no_probe",
                    "PredictionEntropyMonitor: no datamodule with val_dataloader() and no probe given: no probe set "
                    "(entropy/pred/probe/* not logged). Pass probe=(inputs, labels) or use a datamodule.",
                )
                return []
            batches = []
            with _rng_untouched():  # iterating a DataLoader draws its base seed from the global RNG
                loader = first_loader(loader_fn())
                for batch in loader if loader is not None else ():
                    batches.append(batch)
                    if len(batches) >= self.probe_batches:
                        break
        out = []
        for batch in batches:
            if isinstance(batch, Mapping):
                inputs = batch.get("input_ids")
                fields = {k: batch.get(k) for k in ("labels", "attention_mask")}
            elif isinstance(batch, (tuple, list)) and batch:
                inputs = batch[0]
                fields = {"labels": batch[1] if len(batch) > 1 else None, "attention_mask": None}
            else:
                inputs, fields = batch, {"labels": None, "attention_mask": None}
            if not isinstance(inputs, Tensor):
                raise EntrotrainError(
                    f"a probe batch must be a tensor, an (inputs, labels) pair or a dict with 'input_ids', got "
                    f"{type(batch).__name__}."
                )
            out.append((inputs.detach().cpu(), *(f.detach().cpu() if isinstance(f, Tensor) else None for f in fields.values())))
        return out

    def _profile_len(self) -> int:
        return max((inp.shape[1] for inp, _, _ in self._probe_set if inp.dim() >= 2 and not inp.is_floating_point()), default=0)

    def _forward(self, pl_module: LightningModule, inputs: Tensor, attention_mask: Tensor | None) -> Any:
        if attention_mask is not None:
            return pl_module(input_ids=inputs, attention_mask=attention_mask)
        return pl_module(inputs)

    def _run_probe(self, pl_module: nn.Module, rank: int, world: int, device: torch.device) -> _Positions:
        acc = _Positions(self._profile_len())
        for inputs, labels, attention_mask in self._probe_set:
            rows = slice(rank, None, world)
            x = inputs[rows].to(device)
            if x.shape[0] == 0:
                if world > 1:  # FSDP: a forward's all-gathers are collectives; every rank runs it (scores nothing)
                    self._forward(pl_module, inputs[:1].to(device), None if attention_mask is None else attention_mask[:1].to(device))
                continue
            am = None if attention_mask is None else attention_mask[rows].to(device)
            found = {"labels": None if labels is None else labels[rows], "attention_mask": am}
            if self.source == "head":
                self._arm(self._labels_only(found)[1])
                try:
                    self._forward(pl_module, x, am)
                finally:
                    captured = self._disarm()
                if len(captured) != 1:
                    raise TapError(f"PredictionEntropyMonitor: the head {self.head!r} ran {len(captured)} times in one probe forward (expected 1).")
                lead, stats = captured[0]
                keep, lab = self._keep(lead, found, device)
                self._score(acc, lead, keep, lab, head_stats=stats)
            else:
                logits = _logits_of(self._forward(pl_module, x, am))
                lead = tuple(logits.shape[:-1])
                keep, lab = self._keep(lead, found, device)
                self._score(acc, lead, keep, lab, logits=logits)
        return acc

    # ------------------------------------------------------------------ generation
    def _collect_prompts(self) -> list[Tensor]:
        spec = self.generation_prompts
        if spec is None:
            return []
        if isinstance(spec, int):
            seqs = [row for inp, _, _ in self._probe_set if inp.dim() == 2 and not inp.is_floating_point() for row in inp]
            if len(seqs) < spec or (seqs and seqs[0].numel() < self.prompt_length):
                raise EntrotrainError(
                    f"generation_prompts={spec} takes {spec} prompts of prompt_length={self.prompt_length} tokens from "
                    f"the probe set, which holds {len(seqs)} token sequences of length "
                    f"{seqs[0].numel() if seqs else 0}; raise probe_batches, lower them, or give token-id prompts."
                )
            return [s[: self.prompt_length].long() for s in seqs[:spec]]
        return [torch.tensor(p, dtype=torch.long) for p in spec]

    def _context(self, pl_module: LightningModule) -> int | None:
        if self.context_size is not None:
            return self.context_size
        size = getattr(getattr(pl_module, "hparams", {}), "get", lambda *_: None)("block_size")
        return int(size) if isinstance(size, int) else None

    def _generate(self, pl_module: nn.Module, device: torch.device) -> dict[str, float]:
        """Greedy continuations of every prompt (grouped by length) and their diversity."""
        context = self._context(pl_module)
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(self._prompts):
            groups.setdefault(p.numel(), []).append(i)
        continuations: list[Tensor] = [torch.empty(0)] * len(self._prompts)
        for length, members in groups.items():
            idx = torch.stack([self._prompts[i] for i in members]).to(device)
            for _ in range(self.max_new_tokens):
                window = idx if context is None else idx[:, -context:]
                logits = _logits_of(self._forward(pl_module, window, None))
                idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            for row, i in enumerate(members):
                continuations[i] = idx[row, length:].cpu()
        tokens = torch.stack(continuations)
        out = {f"distinct_{k}": float(distinct_n(tokens, k)) for k in self.n}
        out["ttr"] = float(type_token_ratio(tokens))
        out["repetition"] = float(repetition_rate(tokens, self.repetition_n))
        self.last_continuations = tokens
        return out

    # ------------------------------------------------------------------ reduce and publish
    def _reduce(
        self, acc: _Positions, reduce: Callable[[Tensor], Tensor] | None, device: torch.device
    ) -> tuple[dict[str, float], Tensor, Tensor, Tensor]:
        """One SUM all-reduce of sums and profile, one gather of the entropies (quantiles): union-batch values."""
        entropies = torch.cat(acc.entropies) if acc.entropies else torch.zeros(0, dtype=torch.float64)
        flat = torch.cat([acc.sums, acc.pos_sum, acc.pos_count])
        if reduce is not None:
            flat = reduce(flat.to(device)).cpu()
            entropies = all_gather_varlen(entropies.to(device)).cpu()
        k, p = len(_SUM_FIELDS), acc.pos_sum.numel()
        sums = dict(zip(_SUM_FIELDS, flat[:k].tolist()))
        return sums, entropies, flat[k : k + p], flat[k + p :]

    def _position_keys(self, length: int) -> list[int]:
        if isinstance(self.positions, int):
            if self.positions == 0 or length == 0:
                return []
            k = min(self.positions, length)
            return sorted({round(i * (length - 1) / max(k - 1, 1)) for i in range(k)})
        return [i for i in self.positions if i < length]

    def compute_metrics(
        self,
        model: nn.Module,
        step: int,
        world: int = 1,
        rank: int = 0,
        reduce: Callable[[Tensor], Tensor] | None = None,
        device: torch.device | None = None,
    ) -> tuple[dict[str, float], dict[str, float]]:
        """Lightning-free core of a logging step, after its optimizer update: reduce the training window (``reduce``:
        SUM over the ``world`` ranks, ``None`` = one process; ``device``: where collectives run, default the model's),
        score the probe set on ``model`` (rank ``rank`` takes rows ``rank, rank + world, ...``) and generate when due
        (eval mode, no gradient, no RNG, modes restored). Returns ``(metrics, generation metrics)``, NaN where no
        position was usable; appends the history and profile rows (:attr:`last_profile`)."""
        if device is None:
            device = next((t.device for t in model.parameters()), torch.device("cpu"))
        metrics: dict[str, float] = {}
        sums, entropies, _, _ = self._reduce(self._train, reduce, device)
        train = prediction_entropy_summary(sums, entropies)
        nonfinite = train.pop("nonfinite")
        metrics.update({f"{self.prefix}/train/{k}": v for k, v in train.items()})
        self._train = _Positions()
        self.last_profile = None
        gen: dict[str, float] = {}
        if self._probe_set or (self._prompts and step % self.generate_every_n_steps == 0):
            modes = {m: m.training for m in model.modules()}
            model.eval()
            try:  # no other monitor's tap sees these forwards, whatever the order of the callbacks
                with torch.no_grad(), exclusive_capture():
                    if self._probe_set:
                        acc = self._run_probe(model, rank, world, device)
                    if self._prompts and step % self.generate_every_n_steps == 0:
                        gen = self._generate(model, device)
            finally:
                for m, mode in modes.items():
                    m.training = mode
                reshard_fsdp(model)  # FSDP2 keeps the root gathered after a forward until a backward that never comes
            if self._probe_set:
                sums, entropies, pos_sum, pos_count = self._reduce(acc, reduce, device)
                probe = prediction_entropy_summary(sums, entropies)
                nonfinite += probe.pop("nonfinite")
                metrics.update({f"{self.prefix}/probe/{k}": v for k, v in probe.items()})
                profile = torch.where(pos_count > 0, pos_sum / pos_count.clamp_min(1), torch.nan)
                for i in self._position_keys(profile.numel()):
                    metrics[f"{self.prefix}/probe/pos/{i}"] = float(profile[i])
                self.last_profile = profile
        metrics[f"{self.prefix}/nonfinite"] = self._nonfinite.add(
            nonfinite, "predicted positions held NaN/Inf", f"step {step}"
        )
        gen_metrics = {f"{self.prefix}/gen/{k}": v for k, v in gen.items()}
        self.history.append((step, {k: v for k, v in {**metrics, **gen_metrics}.items() if is_finite_number(v)}))
        if self.last_profile is not None:
            self.profiles.append((step, self.last_profile.tolist()))
        return metrics, gen_metrics

    def _flush(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        def sum_ranks(t: Tensor) -> Tensor:
            return trainer.strategy.reduce(t, reduce_op="sum")

        reduce = sum_ranks if trainer.world_size > 1 else None

        device = trainer.strategy.root_device if trainer.world_size > 1 else pl_module.device
        metrics, gen_metrics = self.compute_metrics(
            pl_module, step, trainer.world_size, trainer.global_rank, reduce, device
        )
        published = publish_scalars(trainer, pl_module, metrics, source=self.state_key)
        if gen_metrics:
            publish_scalars(trainer, pl_module, gen_metrics, source=self.state_key + "/gen")
        record_arrays(trainer, self.record_arrays(), published)
        if self.last_profile is not None and self.log_media and trainer.is_global_zero:
            self._log_media(trainer, published)

    def record_arrays(self) -> list[RecordArray]:
        """The run record's arrays of the last logging step: the probe's entropy per position (none without a
        probe)."""
        profile = self.last_profile
        return [] if profile is None else [RecordArray(f"{self.prefix}/probe/pos_profile", profile, "values")]

    def media(self) -> dict[str, Any]:
        """Lightning-free core: the wandb position × logging-step heatmap of the probe entropy (empty without a
        probe set or wandb, and at the logging steps ``over_time_every`` skips: each call with a profile counts one
        logging step)."""
        if not self.profiles:
            return {}
        due = self.over_time_every > 0 and self._media_steps % self.over_time_every == 0
        self._media_steps += 1
        if not due:
            return {}
        from entrotrain.dashboards.prediction_media import position_profile_over_time_image

        image = position_profile_over_time_image(
            [torch.tensor(p) for _, p in self.profiles], [s for s, _ in self.profiles]
        )
        return {} if image is None else {f"{self.prefix}/probe/pos_heatmap": image}

    def _log_media(self, trainer: Trainer, step: int) -> None:
        from entrotrain.dashboards.wandb_media import wandb_loggers

        loggers = wandb_loggers(trainer.loggers)
        media = self.media() if loggers else {}
        for logger in loggers:
            for key, image in media.items():
                logger.experiment.log({key: image, "trainer/global_step": step})

    # ------------------------------------------------------------------ summary
    def summary_table(self, max_rows: int = 10) -> str:
        """The logged trajectory (at most ``max_rows`` evenly spaced logging steps) and a first → last line."""
        p = self.prefix
        cols = [
            ("train H", f"{p}/train/mean"), ("train nll", f"{p}/train/nll"), ("probe H", f"{p}/probe/mean"),
            ("probe nll", f"{p}/probe/nll"), ("probe top1", f"{p}/probe/top1_prob"),
            *[(f"dist-{k}", f"{p}/gen/distinct_{k}") for k in self.n], ("rep", f"{p}/gen/repetition"),
        ]
        rows = list(self.history)
        reference = None
        if self.reference_step is not None:
            before = [i for i, (step, _) in enumerate(rows) if step <= self.reference_step]
            reference = before[-1] if before else None
        if len(rows) > max_rows:
            keep = {round(i * (len(rows) - 1) / (max_rows - 1)) for i in range(max_rows)}
            if reference is not None:
                keep.add(reference)
            rows = [rows[i] for i in sorted(keep)]
        lines = [
            "prediction entropy (nats; probe = held-out set; gen = greedy continuations)",
            "  step    " + " ".join(f"{name:>10}" for name, _ in cols),
        ]
        for step, row in rows:
            cells = [f"{row[key]:10.4f}" if key in row else f"{'-':>10}" for _, key in cols]
            lines.append(f"  {step:<7d} " + " ".join(cells))
        ref_step = self.history[reference][0] if reference is not None else None

        def values(key: str) -> list[tuple[int, float]]:
            return [(step, row[key]) for step, row in self.history if key in row]

        for label, key in [("held-out entropy", f"{p}/probe/mean"), ("train loss (nll)", f"{p}/train/nll"),
                           ("held-out nll", f"{p}/probe/nll"), *[(f"greedy distinct-{k}", f"{p}/gen/distinct_{k}") for k in self.n],
                           ("greedy repetition", f"{p}/gen/repetition")]:
            seen = values(key)
            if not seen:
                continue
            text = f"  {label:<20} step {seen[0][0]}: {seen[0][1]:.4f}"
            if ref_step is not None:
                at_ref = [v for v in seen if v[0] <= ref_step]
                if at_ref and at_ref[-1] != seen[0]:
                    text += f" -> step {at_ref[-1][0]}: {at_ref[-1][1]:.4f}"
            text += f" -> step {seen[-1][0]}: {seen[-1][1]:.4f}"
            lines.append(text)
        return "\n".join(lines)
