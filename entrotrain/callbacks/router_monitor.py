r"""Per-layer mixture-of-experts router entropy, expert load and dead experts, live in a Lightning ``Trainer``.

A MoE router that collapses onto a few experts wastes the others ("dead experts") and shows as falling router
entropy and load entropy; DynMoLE (Li et al. 2025) regularises the router's Tsallis entropy, Switch / Mixtral balance
the load with an auxiliary loss (Fedus et al. 2021). This callback shows all of it per MoE layer without touching the
model: the maths is :func:`entrotrain.functional.routing.router_statistics` / :func:`~entrotrain.functional.routing.
router_values`.

Where the router logits come from (per micro-batch of a logging step; the first that applies):

1. ``training_step`` returns a dict holding ``"router_logits"`` (a tuple/list of ``(rows, E)`` tensors, one per MoE
   layer in forward order, e.g. HF's ``outputs.router_logits`` with ``output_router_logits=True``) and optionally
   ``"router_mask"`` (a keep mask of ``rows`` entries). Layers are named ``router_logits[i]``. Once a step returned
   them, the tap is no longer armed.
2. Otherwise a :class:`~entrotrain.taps.router_tap.RouterTap` on the LightningModule: HF routers found by class name
   (``*TopKRouter`` / ``*TopkRouter``, Llama 4, DBRX, Zaya, Gemma 4, Switch-Transformers, NLLB-MoE, HunYuan-MoE,
   MoE ``gate`` Linears) or the modules named by ``include`` globs, armed only during the micro-batches of logging steps,
   capturing detached copies.

Which distribution the router statistics are of: the router's own scoring function
(:meth:`~entrotrain.taps.router_tap.RouterTap.scoring`). Softmax routers (Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V2):
:math:`\mathrm{softmax}(z)`. Sigmoid routers (DeepSeek-V3 and the HF ``*TopkRouter`` classes built like it: GLM-4-MoE,
dots1, Kimi-Linear, ...): the normalised sigmoid scores :math:`\sigma(z_e) / \sum_j \sigma(z_j)`, the routing
distribution of the DeepSeek-V3 report. The load counts the experts the router returned it picked (for DeepSeek-V3:
the group-limited top k of the sigmoid scores plus ``e_score_correction_bias``), else the top k of that distribution.
Logits returned from ``training_step`` are read as softmax logits.

**Padding is not data**: with tap captures the keep mask of a router's rows is the 2-D ``attention_mask`` the
innermost HF model running it received (the tap records it: an encoder-decoder's decoder routers get the
``decoder_attention_mask``), else ``batch[mask_key]`` (default ``"attention_mask"``, HF's 1 = keep) when the batch is
a mapping holding it, flattened to line up with the router's ``(batch·seq, E)`` rows; ``mask_key=None`` uses
neither. A ``"router_mask"`` returned by ``training_step`` takes precedence. A mask whose size does not match a layer's
rows (packed or cached inputs) is ignored for that layer, with a one-time warning; without a mask every row counts.

Logged keys (``{p}`` = ``prefix``, default ``entropy/router``; ``l`` numbers MoE layers in forward order, their
module names are logged once as the hyperparameter ``{p}/layers`` and printed at the first logging step):

=================================  ===================================================================================
``{p}/L{l}/entropy``               mean per-token Shannon entropy of the router distribution (nats; see above)
``{p}/L{l}/entropy_norm``          the same / ln E (1 = uniform router)
``{p}/L{l}/tsallis``               mean per-token Tsallis entropy of order ``q`` (nats, unnormalised; DynMoLE)
``{p}/L{l}/load/E{e}``             expert ``e``'s share of the top-k assignments (sums to 1 over ``e``): the experts
                                   the router returned it picked (HF ``*TopKRouter``), else the top k of the scores
``{p}/L{l}/load_entropy``          entropy of that load distribution (nats); ``_norm``: / ln E (1 = balanced)
``{p}/L{l}/dead_frac``             fraction of experts with no top-k assignment (or share < ``dead_threshold``)
``{p}/L{l}/top1_margin``           mean :math:`p_{(1)} - p_{(2)}` (sorted router probabilities)
``{p}/L{l}/topk_margin``           mean :math:`p_{(k)} - p_{(k+1)}` (how close the top-k boundary is)
``{p}/entropy_norm_mean``          mean over layers of ``entropy_norm``
``{p}/load_entropy_norm_min``      the least balanced layer's ``load_entropy_norm``
``{p}/dead_frac_max``              the worst layer's ``dead_frac``
``{p}/nonfinite``                  router rows holding NaN/Inf (counted, skipped; 0 when clean)
``{p}/load_heatmap`` (wandb)       layer × expert image of the load shares, viridis from 0 to ``2 / E`` (twice the
                                   balanced share: balanced is mid-scale, ≥ 2× overloaded saturates; grey = no expert)
=================================  ===================================================================================

The run record (``entrotrain report``) gets the ``{p}/load_heatmap`` array (layers × experts) every logging step.

Reduction: every layer's statistics are **sums and counts** (float64), accumulated over the micro-batches of a
logging step and all-reduced across DDP ranks in **one** collective, so the values equal one process on the union
batch. Before it the ranks exchange which layers they have seen (one small ``all_gather_object``): a rank whose
logging step ran no router (no forward, or one through none of the MoE layers) joins the reduce with zero sums and
publishes what the others publish; only when no rank captured anything does every rank raise the no-capture error.

Non-finite data (DESIGN.md §8): router rows holding NaN/Inf are counted in ``{p}/nonfinite``, warned about once per
fit and left out of every statistic; a layer with no usable row at a logging step publishes its keys to
``trainer.callback_metrics`` as NaN and to no logger. Lifecycle: per-fit state is reset in ``setup`` of every ``fit``
(layer numbers and history restored from the checkpoint on resume); hooks are removed on every exit path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from entrotrain._validation import check_bool, check_choice, check_int, check_real, check_str
from entrotrain.callbacks._history import ThinnedHistory
from entrotrain.callbacks._lifecycle import HookedMonitor
from entrotrain.callbacks._logging_window import LoggingWindow
from entrotrain.callbacks._nonfinite import NonFiniteCounter
from entrotrain.callbacks._publish import publish_scalars
from entrotrain.dashboards.run_record import RecordArray, record_arrays
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional._dist import gather_objects, world as dist_world
from entrotrain.functional.routing import (
    SCORINGS, RouterSums, RouterValues, check_order, router_statistics, router_values,
)
from entrotrain.taps.router_tap import RouterTap

__all__ = ["RouterEntropyMonitor"]

_SUMMARY = ("entropy_norm_mean", "load_entropy_norm_min", "dead_frac_max")


def _config_top_k(module: torch.nn.Module) -> int | None:
    """``num_experts_per_tok`` of the first HF config found in ``module`` (itself or a submodule)."""
    for m in module.modules():
        value = getattr(getattr(m, "config", None), "num_experts_per_tok", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class RouterEntropyMonitor(HookedMonitor):
    r"""Logs per-MoE-layer router entropy (Shannon, Tsallis), expert load, dead experts and top-k margins.

    Args:
        every_n_steps: log at optimizer steps ``0, n, 2n, ...`` (all micro-batches of those steps are pooled). With
            ``k`` optimizers stepped per batch (manual optimisation, GAN style), the batches whose first optimizer step
            is a multiple of ``n``: every lcm(n, k) optimizer steps
            (:class:`~entrotrain.callbacks._logging_window.LoggingWindow`).
        include: glob patterns of router module names; ``None`` = discover HF routers (``*TopKRouter``, MoE
            ``gate`` Linears). Not needed when ``training_step`` returns ``"router_logits"``.
        exclude: glob patterns of module names to skip.
        top_k: experts per token; ``None`` = the HF config's ``num_experts_per_tok`` (found on the LightningModule or
            a submodule), else the router module's ``top_k``; required otherwise.
        q: Tsallis order of ``{p}/L{l}/tsallis`` (DynMoLE 1.1), finite and > 0.
        dead_threshold: load share in ``[0, 1]`` below which an expert counts as dead; 0 = only experts that got no
            top-k assignment in the logging step (all micro-batches, all ranks).
        log_media: log the layer × expert load heatmap to wandb (rank zero).
        mask_key: key of the keep mask (1/True = real token) in a mapping batch, read for routers whose HF model's
            own ``attention_mask`` the tap did not record; ``None`` = no padding mask (never read the batch, record
            no model mask).
        output_index: element of a tuple/list router output holding the logits; ``None`` = each router's own (HF
            routers: 0; Llama 4's ``Llama4Router``: 1).
        scoring: the distribution the entropy, Tsallis entropy, margins and importance are of: ``"auto"`` = each
            router's own scoring function as :meth:`~entrotrain.taps.router_tap.RouterTap.scoring` reads it (a
            ``scoring_func`` attribute, a scoring module, else whether its ``forward`` calls sigmoid and not
            softmax; logits returned from ``training_step``: softmax), or ``"softmax"``, ``"sigmoid"``
            (normalised σ(z), DeepSeek-V3), ``"sqrtsoftplus"`` (DeepSeek-V4) for every router. Name it for a
            custom router picked with ``include`` whose scoring ``"auto"`` cannot read.
        prefix: key prefix.
        print_summary: print the first and last summaries when training ends (rank zero).

    Raises:
        EntrotrainError: on invalid arguments; at the first logging step when ``top_k`` cannot be found.
        TapError: ``include`` matches nothing (at setup); a logging step got no router logits (no router ran and
            ``training_step`` returned none).

    Example::

        trainer = Trainer(callbacks=[RouterEntropyMonitor(every_n_steps=50)])   # HF Mixtral / Qwen2-MoE / OLMoE
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        top_k: int | None = None,
        q: float = 1.1,
        dead_threshold: float = 0.0,
        log_media: bool = True,
        mask_key: str | None = "attention_mask",
        output_index: int | None = None,
        scoring: str = "auto",
        prefix: str = "entropy/router",
        print_summary: bool = True,
    ) -> None:
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", low=1)
        self.include = None if include is None else ([include] if isinstance(include, str) else list(include))
        self.exclude = [] if exclude is None else ([exclude] if isinstance(exclude, str) else list(exclude))
        self.top_k = check_int(top_k, "top_k", low=1, none_ok=True)
        self.q = check_order(q)
        self.dead_threshold = check_real(dead_threshold, "dead_threshold", low=0.0, high=1.0)
        self.log_media = check_bool(log_media, "log_media")
        self.mask_key = None if mask_key is None else check_str(mask_key, "mask_key")
        self.output_index = check_int(output_index, "output_index", none_ok=True)
        self.scoring = check_choice(scoring, "scoring", ("auto", *SCORINGS))
        self.prefix = check_str(prefix, "prefix").rstrip("/")
        self.print_summary = check_bool(print_summary, "print_summary")
        self.tap: RouterTap | None = None
        self._tap_error: str | None = None
        self._config_top_k: int | None = None
        self._window = LoggingWindow(self.every_n_steps)
        self._nonfinite = NonFiniteCounter("RouterEntropyMonitor", f"{self.prefix}/nonfinite")
        self._reset_fit_state()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, prefix=self.prefix)

    # ------------------------------------------------------------------ lifecycle
    def _reset_fit_state(self) -> None:
        """Forget everything a previous fit left: layer numbers, sums, history, warnings."""
        self._release()
        self.layer_names: list[str] = []
        self.n_experts: dict[str, int] = {}
        self._sums: dict[str, RouterSums] = {}
        self._from_outputs = False
        self._announced = False
        self.last_logged: dict[str, float] = {}
        self.history: list[tuple[int, dict[str, float]]] = ThinnedHistory()
        self.load_matrix: Tensor | None = None
        self._nonfinite.reset()

    def state_dict(self) -> dict[str, Any]:
        """Layer numbering (``L{l}`` stays the same module after a resume) and the summary history."""
        return {
            "layer_names": list(self.layer_names),
            "n_experts": dict(self.n_experts),
            "history": [(step, dict(row)) for step, row in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.layer_names = [str(n) for n in state_dict.get("layer_names", [])]
        self.n_experts = {str(k): int(v) for k, v in state_dict.get("n_experts", {}).items()}
        self.history = ThinnedHistory((int(step), dict(row)) for step, row in state_dict.get("history", []))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # per-fit reset (PerFitCallback)
        if stage != "fit":
            return
        self._config_top_k = _config_top_k(pl_module)
        if self.log_media and trainer.is_global_zero:
            from entrotrain.dashboards.wandb_media import setup_wandb_dashboard

            setup_wandb_dashboard(trainer.loggers)
        self._bind_tap(pl_module)

    def bind(self, model: torch.nn.Module) -> None:
        """Lightning-free core: fresh per-train state watching ``model`` (the HF ``Trainer`` integration's entry)."""
        self._reset_fit_state()
        self._config_top_k = _config_top_k(model)
        self._bind_tap(model)

    def _bind_tap(self, model: torch.nn.Module) -> None:
        if self.tap is None or self.tap.model is not model:  # a reused monitor watches the model being fit
            self._release()
            self.tap, self._tap_error = None, None
            try:
                self.tap = RouterTap(
                    model, self.include, self.exclude, output_index=self.output_index,
                    token_masks=self.mask_key is not None,
                )
            except TapError as err:
                if self.include is not None:  # the user named modules that do not exist: say so now
                    raise
                self._tap_error = str(err)  # maybe training_step returns router_logits: decided at the first step

    def _release(self) -> None:
        tap = getattr(self, "tap", None)
        if tap is not None:
            tap.disarm()
            tap.reset()
        self._window.close()

    # ------------------------------------------------------------------ capture
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.sanity_checking:
            return
        first = self._window.begin(trainer.global_step)
        if first is None:
            return
        if first:
            self._sums = {}
        if self.tap is not None and not self._from_outputs:
            self.tap.reset()
            self.tap.arm()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._window.open:
            return
        if self.tap is not None:
            self.tap.disarm()
        self._consume(outputs, batch, trainer.global_step)
        if self.tap is not None:
            self.tap.reset()
        step = self._window.end(trainer.global_step)
        if step is not None:  # the optimizer stepped: the window is complete
            self._flush(trainer, pl_module, step)

    def _micro_batch_logits(
        self, outputs: Any
    ) -> tuple[list[tuple[str, Tensor, Tensor | None, Tensor | None]], Tensor | None, bool]:
        """``[(layer name, (rows, E) logits, (rows, k) experts the router picked or None, (rows,) keep mask of the
        model running the router or None)]`` in forward order, a returned mask, and whether they came from
        ``training_step``."""
        if isinstance(outputs, Mapping) and outputs.get("router_logits") is not None:
            logits = outputs["router_logits"]
            if isinstance(logits, Tensor):
                logits = (logits,)
            if not isinstance(logits, (tuple, list)) or not all(isinstance(t, Tensor) for t in logits):
                raise EntrotrainError(
                    "training_step returned 'router_logits' of type "
                    f"{type(logits).__name__}; return a tuple/list of (rows, n_experts) tensors, one per MoE layer "
                    "(HF: outputs.router_logits with output_router_logits=True)."
                )
            mask = outputs.get("router_mask")
            if mask is not None and not isinstance(mask, Tensor):
                raise EntrotrainError(
                    f"training_step returned 'router_mask' of type {type(mask).__name__}; return a keep mask tensor "
                    "(bool True = real token, or HF's 0/1 attention_mask) with one entry per router row."
                )
            return [(f"router_logits[{i}]", t.detach(), None, None) for i, t in enumerate(logits)], mask, True
        if self.tap is None:
            return [], None, False
        tap = self.tap
        layers = [(n, tap.logits(n), tap.chosen_experts(n), tap.row_mask(n)) for n in tap.order if n in tap.captures]
        return layers, None, False

    def _batch_mask(self, batch: Any) -> Tensor | None:
        if self.mask_key is None or not isinstance(batch, Mapping):
            return None
        mask = batch.get(self.mask_key)
        return mask if isinstance(mask, Tensor) else None

    def _layer_top_k(self, name: str) -> int:
        top_k = self.top_k or self._config_top_k
        if top_k is None and self.tap is not None and name in self.tap.names:
            top_k = self.tap.top_k(name)
        if top_k is None:
            raise EntrotrainError(
                f"RouterEntropyMonitor cannot tell how many experts the router {name!r} picks per token: no HF config "
                "with num_experts_per_tok and no top_k attribute on the router. Pass top_k=... ."
            )
        return top_k

    def _consume(self, outputs: Any, batch: Any, step: int) -> None:
        layers, mask, from_outputs = self._micro_batch_logits(outputs)
        self._from_outputs = self._from_outputs or from_outputs
        if mask is None:
            mask = self._batch_mask(batch)
        for name, logits, chosen, model_mask in layers:
            rows = logits.reshape(-1, logits.shape[-1]).shape[0] if logits.dim() else 0
            layer_mask = mask
            if model_mask is not None and self.mask_key is not None:  # the mask the model running the router got
                layer_mask = model_mask
            elif mask is not None and mask.numel() != rows:
                if mask.numel() and rows % mask.numel() == 0:  # the router ran more than once (e.g. recomputation)
                    layer_mask = mask.reshape(-1).repeat(rows // mask.numel())
                else:
                    self._nonfinite.warn_once(
                        f"mask:{name}",
                        f"RouterEntropyMonitor: the keep mask has {mask.numel()} entries but router {name!r} produced "
                        f"{rows} rows at step {step} (packed or cached inputs?); every row of it counts, padding "
                        "included. Return 'router_mask' from training_step to fix it. Shown once per fit.",
                    )
                    layer_mask = None
            if chosen is None and not from_outputs and self.tap is not None and self.tap.corrects_choice(name):
                self._nonfinite.warn_once(
                    f"choice:{name}",
                    f"RouterEntropyMonitor: router {name!r} has an e_score_correction_bias (DeepSeek-V3-style "
                    "balancing) but does not return the experts it picks, so its load / dead_frac are counted from the "
                    "top k of softmax(logits), which are not its choice. Return the picked ids as the last element of "
                    "the router's output, (logits, ..., indices), as HF's *TopKRouter modules do. Shown once per fit.",
                )
            scoring = self.scoring
            if scoring == "auto":
                scoring = "softmax" if from_outputs or self.tap is None else self.tap.scoring(name)
            try:
                sums = router_statistics(
                    logits, self._layer_top_k(name), mask=layer_mask, q=self.q, chosen=chosen, scoring=scoring
                )
            except EntrotrainError as err:
                raise EntrotrainError(f"RouterEntropyMonitor, router {name!r}: {err}") from None
            if name not in self.layer_names:
                self.layer_names.append(name)
            known = self.n_experts.setdefault(name, sums.n_experts)
            if known != sums.n_experts:
                raise TapError(
                    f"router {name!r} produced {sums.n_experts} experts after {known} earlier; a layer's expert "
                    "count must not change during a fit."
                )
            self._sums[name] = sums if name not in self._sums else self._sums[name].merged(sums)

    # ------------------------------------------------------------------ reduce and log
    def _no_capture(self, step: int) -> None:
        if self.tap is None:
            raise TapError(
                f"RouterEntropyMonitor got no router logits at step {step}: {self._tap_error or 'no router found.'}"
            )
        raise TapError(
            f"RouterEntropyMonitor captured nothing at step {step}: none of the routers {self.tap.names[:8]} ran "
            "forward during the step's batches, and training_step returned no 'router_logits'. Include modules the "
            "training step calls."
        )

    def _reduce(
        self, reduce: Callable[[Tensor], Tensor] | None, device: torch.device | None = None
    ) -> dict[str, RouterValues]:
        """One SUM all-reduce of every layer's sums (layers missing on this step enter as zeros, on ``device`` when
        this rank captured nothing)."""
        if self._sums:
            device = next(iter(self._sums.values())).rows.device
        elif device is None:
            device = torch.device("cpu")
        parts = []
        for name in self.layer_names:
            e = self.n_experts[name]
            sums = self._sums.get(name)
            zeros = torch.zeros(6 + 2 * e, dtype=torch.float64, device=device)
            parts.append(sums.flat().to(device) if sums is not None else zeros)
        flat = torch.cat(parts)
        if reduce is not None:  # same model on every rank: same layers, same layout
            flat = reduce(flat)
        flat = flat.cpu()  # one device -> host transfer per logging step
        values: dict[str, RouterValues] = {}
        offset = 0
        for name in self.layer_names:
            size = 6 + 2 * self.n_experts[name]
            sums = RouterSums.from_flat(flat[offset : offset + size], self.n_experts[name])
            offset += size
            values[name] = router_values(sums, dead_threshold=self.dead_threshold)
        return values

    def _announce(self, trainer: Trainer) -> None:
        self._announced = True
        layers = {f"L{i}": name for i, name in enumerate(self.layer_names)}
        rank_zero_info("RouterEntropyMonitor layers: " + ", ".join(f"{k}={v}" for k, v in layers.items()))
        for logger in trainer.loggers:
            logger.log_hyperparams({f"{self.prefix}/layers": layers})

    def compute_metrics(
        self, step: int, reduce: Callable[[Tensor], Tensor] | None = None, device: torch.device | None = None
    ) -> dict[str, float]:
        """Lightning-free core of a logging step: reduce the window's sums (``reduce``: SUM over ranks, ``None`` =
        one process), return every key (NaN where no row was usable) and update ``last_logged``, ``history`` and
        ``load_matrix``. Under ``reduce`` with several ranks, every rank must call this at every logging step, one
        that captured nothing too: the ranks first exchange their layers (one ``all_gather_object``), so such a rank
        joins the reduce with zero sums (built on ``device``) and returns what the others return. Raises
        :class:`TapError` when the window captured nothing (on every rank: when no rank captured anything)."""
        if reduce is not None and dist_world()[1] > 1:
            layers = gather_objects((bool(self._sums), [(n, self.n_experts[n]) for n in self.layer_names]))
            for _, rank_layers in layers:  # rank order: the same layer_names on every rank
                for name, experts in rank_layers:
                    if name not in self.layer_names:
                        self.layer_names.append(name)
                    self.n_experts.setdefault(name, experts)
            if not any(captured for captured, _ in layers):
                self._no_capture(step)
        elif not self._sums:
            self._no_capture(step)
        values = self._reduce(reduce, device)
        self._sums = {}
        p = self.prefix
        metrics: dict[str, float] = {}
        norms, balance, dead = [], [], []
        nonfinite = 0.0
        width = max(self.n_experts[n] for n in self.layer_names)
        load = torch.full((len(self.layer_names), width), math.nan, dtype=torch.float64)
        for i, name in enumerate(self.layer_names):
            v = values[name]
            key = f"{p}/L{i}"
            for field in ("entropy", "entropy_norm", "tsallis", "load_entropy", "load_entropy_norm", "dead_frac",
                          "top1_margin", "topk_margin"):
                metrics[f"{key}/{field}"] = float(getattr(v, field))
            for e, share in enumerate(v.load.tolist()):
                metrics[f"{key}/load/E{e}"] = share
            load[i, : self.n_experts[name]] = v.load
            nonfinite += float(v.nonfinite)
            if float(v.rows) > 0:
                norms.append(float(v.entropy_norm))
                balance.append(float(v.load_entropy_norm))
                dead.append(float(v.dead_frac))
        summary = {
            f"{p}/entropy_norm_mean": sum(norms) / len(norms) if norms else math.nan,
            f"{p}/load_entropy_norm_min": min(balance) if balance else math.nan,
            f"{p}/dead_frac_max": max(dead) if dead else math.nan,
            f"{p}/nonfinite": nonfinite,
        }
        metrics.update(summary)
        self._nonfinite.add(nonfinite, "router rows held NaN/Inf logits", f"step {step}")
        self.last_logged = {k: v for k, v in metrics.items() if math.isfinite(v)}
        self.history.append((step, {k: v for k, v in summary.items() if math.isfinite(v)}))
        self.load_matrix = load
        return metrics

    def _flush(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        if not self._sums and trainer.world_size == 1:
            self._no_capture(step)

        def sum_ranks(t: Tensor) -> Tensor:
            return trainer.strategy.reduce(t, reduce_op="sum")

        reduce = sum_ranks if trainer.world_size > 1 else None

        metrics = self.compute_metrics(step, reduce, pl_module.device)  # (under DDP every rank joins the reduce)
        if not self._announced:
            self._announce(trainer)
        load = self.load_matrix
        assert load is not None
        width = load.shape[1]
        published_at = publish_scalars(trainer, pl_module, metrics, source=self.state_key)
        if trainer.is_global_zero:
            record_arrays(trainer, self.record_arrays(), published_at)
            if self.log_media:
                self._log_media(trainer, load, 2.0 / width, published_at)

    def record_arrays(self) -> list[RecordArray]:
        """The run record's arrays of the last logging step: the layer × expert load heatmap (empty before one)."""
        load = self.load_matrix
        if load is None:
            return []
        meta = {"vmin": 0.0, "vmax": 2.0 / load.shape[1], "rows": [f"L{i}" for i in range(len(self.layer_names))],
                "sites": list(self.layer_names)}
        return [RecordArray(f"{self.prefix}/load_heatmap", load.float(), "heatmap", meta)]

    def media(self) -> dict[str, Any]:
        """Lightning-free core: the wandb load heatmap of the last logging step, ``{key: image}`` (empty when there
        is nothing to show or wandb is missing)."""
        if self.load_matrix is None:
            return {}
        image = self._heatmap(self.load_matrix, 2.0 / self.load_matrix.shape[1])
        return {} if image is None else {f"{self.prefix}/load_heatmap": image}

    def _heatmap(self, load: Tensor, vmax: float) -> Any:
        from entrotrain.dashboards.wandb_media import heatmap_image

        return heatmap_image(
            load.float(),
            caption=f"expert load share, rows = MoE layers L0..L{load.shape[0] - 1}, cols = experts; 0 -> {vmax:.3g} "
            "(twice the balanced share)",
            vmin=0.0,
            vmax=vmax,
        )

    def _log_media(self, trainer: Trainer, load: Tensor, vmax: float, step: int) -> None:
        from entrotrain.dashboards.wandb_media import wandb_loggers

        loggers = wandb_loggers(trainer.loggers)
        if not loggers:
            return
        image = self._heatmap(load, vmax)
        if image is None:
            return
        for logger in loggers:
            logger.experiment.log({f"{self.prefix}/load_heatmap": image, "trainer/global_step": step})

    # ------------------------------------------------------------------ summary
    def summary_table(self) -> str:
        """The first and last logged summaries as a small text table."""
        (first_step, first), (last_step, last) = self.history[0], self.history[-1]
        rows = [(first_step, first)] if first_step == last_step and len(self.history) == 1 else [
            (first_step, first), (last_step, last)
        ]
        lines = [
            f"router entropy ({len(self.layer_names)} MoE layers)",
            "  step    entropy_norm_mean  load_entropy_norm_min  dead_frac_max",
        ]
        for step, row in rows:
            cells = [row.get(f"{self.prefix}/{k}", math.nan) for k in _SUMMARY]
            lines.append(f"  {step:<6d}  {cells[0]:17.3f}  {cells[1]:21.3f}  {cells[2]:13.3f}")
        return "\n".join(lines)

