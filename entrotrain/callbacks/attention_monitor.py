r"""Per layer × head attention entropy, live in a Lightning ``Trainer``.

Zhai et al. (2023), "Stabilizing Transformer Training by Preventing Attention Entropy Collapse": heads whose
attention entropy falls towards zero go with loss spikes and divergence. Jha & Reagen (2025), "Entropy-Guided
Attention for Private LLMs": heads near maximal entropy ("entropic overload") waste capacity. This callback shows
both, per head, without touching the model.

Logged keys (``{p}`` = ``prefix``, default ``entropy/``; ``l`` indexes attention sites in forward order, their module
names are logged once as hyperparameters ``{p}attn/layers`` and printed at the first logging step):

====================================  ===========================================================================
``{p}attn/L{l}/H{h}``                 mean entropy of head ``h`` of site ``l`` (nats)
``{p}attn_norm/L{l}/H{h}``            mean normalised entropy :math:`H_i/\ln|V_i|` (queries with ``|V_i|>=2``)
``{p}attn_norm/L{l}/mean``            mean over the heads of site ``l`` of the above
``{p}attn/min|mean|p05``              over all heads, nats
``{p}attn_norm/min|mean|p05``         over all heads, normalised
``{p}attn/collapse_frac``             fraction of heads with normalised entropy < ``collapse_threshold``
``{p}attn/overload_frac``             fraction of heads with normalised entropy > ``overload_threshold``
``{p}attn/nonfinite``                 queries whose entropy was NaN/Inf (non-finite q or k); never averaged in;
                                      published at every logging step (0 when clean)
``{p}attn_norm/heatmap`` (wandb)      layer × head image of normalised entropy (viridis, 0 → 1; grey = no data)
``{p}attn_norm/hist`` (wandb)         histogram of per-head normalised entropy
``{p}attn_norm/heads_over_time``      (wandb) image: rows = layer·head, columns = logging steps so far (at most
                                      384, evenly spaced); at every ``over_time_every``-th logging step (default
                                      10): each image holds the whole history, so it supersedes the one before
====================================  ===========================================================================

The run record (:class:`~entrotrain.dashboards.RunRecordLogger`, for ``entrotrain report``) gets the
``{p}attn_norm/heatmap`` array each logging step and the collapse / overload thresholds. ``{p}attn_norm/min`` and
``{p}attn/collapse_frac`` are shown on the progress bar.

Non-finite data (DESIGN.md §8): rows with NaN/Inf entropy are counted in ``{p}attn/nonfinite``, warned about once per
fit and left out of every mean; a statistic with no finite row left at a logging step (a model gone NaN) goes to
``trainer.callback_metrics`` as NaN and to no logger, so the last healthy value never looks current.

Padding (DESIGN.md §8, "padding is not data"): a query position is scored only if the model's own mask marks it as
real, so per-head means are over real tokens. HF models: the 2-D ``attention_mask`` passed to the model's forward
(``decoder_attention_mask`` for a decoder; the last ``N`` positions with a KV cache); ``nn.MultiheadAttention``
self-attention: its ``key_padding_mask``. Models captured through ``F.scaled_dot_product_attention`` or
``record_attention`` learn their padding from a block around the forward in ``training_step``::

    from entrotrain.taps.query_padding import query_padding
    with query_padding(batch["attention_mask"]):    # (batch, tokens), bool or 0/1 with 1 = real
        loss = self.model(batch["input_ids"])

or from ``record_attention(..., query_mask=...)``. A mask that does not fit an attention call (pooling queries, packed
sequences) is not guessed at: that call's queries are all scored, with a warning naming the site. ``max_queries``
picks evenly spaced positions, then drops the padded ones among them.

Lifecycle: per-fit state (site names ``L{l}``, summaries, heads-over-time history) is reset in ``setup`` of every
``fit`` and restored from the checkpoint on resume (Lightning restores callback state after ``setup`` and, for most
strategies, before ``on_fit_start``); the tap is removed on every exit path (end, exception, interrupt).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from entrotrain._validation import check_choice, check_int, check_real
from entrotrain.callbacks._history import ThinnedHistory
from entrotrain.callbacks._logging_window import LoggingWindow
from entrotrain.callbacks._nonfinite import NonFiniteCounter
from entrotrain.callbacks._lifecycle import HookedMonitor
from entrotrain.callbacks._publish import publish_scalars
from entrotrain.dashboards.run_record import RecordArray, RecordThreshold, record_arrays, record_thresholds
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional._dist import gather_objects, world as dist_world
from entrotrain.functional.attention import AttentionPath
from entrotrain.regularizers.composition import Regularizer
from entrotrain.taps.attention_stats import ENTROPY_SUM, N_STATS, NONFINITE, NORMALIZED_ROWS, NORMALIZED_SUM, ROWS
from entrotrain.taps.attention_tap import AttentionTap
from entrotrain.taps.hf import hf_attention_implementations
from entrotrain.taps.module_names import named_modules
from entrotrain.taps.sampling import check_budget

__all__ = ["AttentionEntropyMonitor", "attention_summary"]

_ATTENTION_LIKE = re.compile(r"attn|attention", re.IGNORECASE)


def _related(site: str, module: str) -> bool:
    """Whether an attention site was captured in, above or below ``module`` (``a.attn`` ~ ``a.attn[1]``, ``a``)."""
    return site == module or site.startswith((module + ".", module + "[")) or module.startswith(site + ".")


def _nanquantile(x: Tensor, q: float) -> float:
    return float(torch.quantile(x, q)) if x.numel() else float("nan")


def attention_summary(
    stats: Tensor, collapse_threshold: float, overload_threshold: float
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Per-head means and summary statistics from stacked sums ``(layers, 5, heads)``.

    Returns ``(entropy, normalized, summary)``: ``(layers, heads)`` means (NaN where a head had no scored query) and
    a dict of scalars keyed as in the module docstring, without prefix.
    """
    stats = stats.double()
    rows, norm_rows = stats[:, ROWS], stats[:, NORMALIZED_ROWS]
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    entropy = torch.where(rows > 0, stats[:, ENTROPY_SUM] / rows.clamp_min(1), nan)
    normalized = torch.where(norm_rows > 0, stats[:, NORMALIZED_SUM] / norm_rows.clamp_min(1), nan)
    h = entropy[torch.isfinite(entropy)]
    hn = normalized[torch.isfinite(normalized)]
    summary = {"attn/nonfinite": float(stats[:, NONFINITE].sum())}
    if h.numel():
        summary.update({"attn/min": float(h.min()), "attn/mean": float(h.mean()), "attn/p05": _nanquantile(h, 0.05)})
    if hn.numel():
        summary.update(
            {
                "attn_norm/min": float(hn.min()),
                "attn_norm/mean": float(hn.mean()),
                "attn_norm/p05": _nanquantile(hn, 0.05),
                "attn/collapse_frac": float((hn < collapse_threshold).double().mean()),
                "attn/overload_frac": float((hn > overload_threshold).double().mean()),
            }
        )
    return entropy, normalized, summary


class AttentionEntropyMonitor(HookedMonitor):
    r"""Logs per layer × head attention entropy every ``every_n_steps`` optimizer steps.

    Captures ``q, k`` at the attention boundary (``F.scaled_dot_product_attention``, ``nn.MultiheadAttention``, HF
    transformers, or :func:`entrotrain.taps.record_attention`) on logging steps only; on other steps nothing is
    installed. Sums over gradient-accumulation micro-batches and all-reduces once across DDP ranks per logging
    step, after one ``all_gather_object`` of the site names each rank captured: a rank that captured nothing (no
    forward in the window, or none through a tapped module) or fewer sites joins with zero sums and publishes what
    the others publish. Scalars go to ``trainer.callback_metrics`` (so :class:`EntropyCollapseGuard`,
    ``EarlyStopping`` or ``ModelCheckpoint`` can watch them) and to every logger; the heatmap and histogram go to
    wandb on rank zero.

    Args:
        every_n_steps: log at optimizer steps ``0, n, 2n, ...``. With ``k`` optimizers stepped per batch (manual
            optimisation, GAN style), the batches whose first optimizer step is a multiple of ``n``: every lcm(n, k)
            optimizer steps (:class:`~entrotrain.callbacks._logging_window.LoggingWindow`).
        include: glob patterns of attention site (module) names to score, e.g. ``["**.attn"]`` (``*`` = one name
            segment, ``**`` = any number of segments); default all.
        exclude: glob patterns of site names to skip.
        max_rows: batch rows scored per call (evenly spaced; ``None`` = all).
        max_queries: query positions scored per call (evenly spaced, all keys kept; ``None`` = all); padded
            positions among them are dropped (see "Padding" in the module docstring).
        path: ``"auto"``, ``"fused"``, ``"chunked"`` or ``"materialized"`` (same numbers).
        collapse_threshold: a head whose mean normalised entropy is below this counts as collapsed.
        overload_threshold: a head whose mean normalised entropy is above this counts as near-uniform (normal at
            initialisation; late in training, entropy overload).
        log_per_head: log ``attn/L{l}/H{h}`` keys (summaries and per-layer means are always logged).
        log_media: log the heatmap and histogram when a ``WandbLogger`` is attached.
        over_time_every: log the heads-over-time image at the first logging step with media and every
            ``over_time_every``-th one after it (``1`` = every logging step, ``0`` = never). Each image redraws the
            whole history (up to 768 × 576 px, ~0.1 MB of PNG on a 12 × 12 model): at every logging step a
            million-step run logging every 50 steps would store 20 000 of them; the heatmap and histogram are
            logged at every logging step regardless.
        strict: raise when a logging step captures no attention at all (else warn).
        prefix: key prefix.
        print_summary: print the first and last logged summary (min / mean normalised entropy, collapsed and
            near-uniform heads) when training ends, on rank zero.

    Raises:
        EntrotrainError: on invalid arguments.
        TapError: when no attention could be captured from the model (names the modules and the fix).

    Example::

        trainer = Trainer(callbacks=[AttentionEntropyMonitor(every_n_steps=50)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        max_rows: int | None = 4,
        max_queries: int | None = 256,
        path: AttentionPath = "auto",
        collapse_threshold: float = 0.1,
        overload_threshold: float = 0.9,
        log_per_head: bool = True,
        log_media: bool = True,
        strict: bool = True,
        prefix: str = "entropy/",
        print_summary: bool = True,
        over_time_every: int = 10,
    ) -> None:
        check_int(every_n_steps, "every_n_steps", low=1)
        check_int(over_time_every, "over_time_every (0 = never log the heads-over-time image)", low=0)
        check_real(collapse_threshold, "collapse_threshold", low=0.0, high=1.0)  # NaN/Inf refused too
        check_real(overload_threshold, "overload_threshold", low=0.0, high=1.0)
        if not collapse_threshold <= overload_threshold:
            raise EntrotrainError(
                "need 0 <= collapse_threshold <= overload_threshold <= 1 (normalised entropy), got "
                f"{collapse_threshold} and {overload_threshold}."
            )
        self.every_n_steps = every_n_steps
        self.include = include
        self.exclude = exclude
        self.max_rows = max_rows
        self.max_queries = max_queries
        self.path = path
        self.collapse_threshold = collapse_threshold
        self.overload_threshold = overload_threshold
        self.log_per_head = log_per_head
        self.log_media = log_media
        self.strict = strict
        self.prefix = prefix
        self.print_summary = print_summary
        self.over_time_every = over_time_every
        self._media_steps = 0  # logging steps whose media were built in this fit (paces the heads-over-time image)
        self.first_summary: tuple[int, dict[str, float]] | None = None
        self.last_summary: tuple[int, dict[str, float]] | None = None
        self.tap: AttentionTap | None = None
        self.site_names: list[str] = []
        self.last_logged: dict[str, float] = {}
        self._window = LoggingWindow(every_n_steps)
        self._announced = False
        # normalised (layers, heads) per logged step, for heads over time; bounded (ThinnedHistory) for long runs
        self._history: list[Tensor] = ThinnedHistory()
        self._history_steps: list[int] = ThinnedHistory()
        self._nonfinite = NonFiniteCounter("AttentionEntropyMonitor", f"{prefix}attn/nonfinite")
        check_budget(max_rows, "max_rows")  # validate now, not at the first logging step
        check_budget(max_queries, "max_queries")
        check_choice(path, "path", ("auto", "fused", "chunked", "materialized"))

    @property
    def state_key(self) -> str:
        return self._generate_state_key(include=self.include, exclude=self.exclude, prefix=self.prefix)

    # ------------------------------------------------------------------ lifecycle
    def _reset_fit_state(self) -> None:
        """Forget everything a previous fit left: site names, summaries, history, warnings, the window."""
        self._release()
        self.first_summary = None
        self.last_summary = None
        self.site_names = []
        self.last_logged = {}
        self._announced = False
        self._history = ThinnedHistory()
        self._history_steps = ThinnedHistory()
        self._media_steps = 0
        self._nonfinite.reset()

    def state_dict(self) -> dict[str, Any]:
        """What a resumed fit needs to keep the same ``L{l}`` names, first summary and heads-over-time history."""
        return {
            "site_names": list(self.site_names),
            "first_summary": self.first_summary,
            "last_summary": self.last_summary,
            "history": [h.tolist() for h in self._history],
            "history_steps": list(self._history_steps),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.site_names = list(state_dict.get("site_names", []))
        self.first_summary = state_dict.get("first_summary")
        self.last_summary = state_dict.get("last_summary")
        self._history = ThinnedHistory(torch.tensor(h, dtype=torch.float32) for h in state_dict.get("history", []))
        self._history_steps = ThinnedHistory(state_dict.get("history_steps", []))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.bind(pl_module)
        if trainer.is_global_zero:
            record_thresholds(trainer, self.record_thresholds())
            if self.log_media:
                from entrotrain.dashboards.wandb_media import setup_wandb_dashboard

                setup_wandb_dashboard(trainer.loggers)

    def bind(self, model: torch.nn.Module) -> None:
        """A fresh tap on ``model`` (installed only while armed); a tap left from an earlier fit holds nothing."""
        self._release()
        self.tap = AttentionTap(
            model,
            include=self.include,
            exclude=self.exclude,
            max_rows=self.max_rows,
            max_queries=self.max_queries,
            path=self.path,
        )

    def _release(self) -> None:
        if self.tap is not None:
            self.tap.disarm()
        self._window.close()

    def _has_summary(self) -> bool:
        return self.first_summary is not None

    def summary_table(self) -> str:
        """The first and last logged summaries as a small text table."""
        lines = ["attention entropy (normalised, over heads)", "  step    min     mean    p05   collapsed  near-uniform"]
        rows = [self.first_summary, self.last_summary] if self.last_summary is not self.first_summary else [self.first_summary]
        for step, row in rows:
            lines.append(
                f"  {step:<6d}  {row.get('attn_norm/min', float('nan')):.3f}   {row.get('attn_norm/mean', float('nan')):.3f}"
                f"   {row.get('attn_norm/p05', float('nan')):.3f}   {100 * row.get('attn/collapse_frac', 0.0):5.1f} %"
                f"      {100 * row.get('attn/overload_frac', 0.0):5.1f} %"
            )
        lines.append(
            f"  collapsed: < {self.collapse_threshold:g}; near-uniform: > {self.overload_threshold:g} (expected at "
            "initialisation; late in training it is entropy overload)"
        )
        return "\n".join(lines)

    # ------------------------------------------------------------------ capture
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.tap is None or trainer.sanity_checking:
            return
        first = self._window.begin(trainer.global_step)
        if first is None:
            return
        if first:
            self.tap.reset()
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

    # ------------------------------------------------------------------ reduce and log
    def _stacked(self, joined: bool = False, device: torch.device | None = None) -> Tensor | None:
        """This window's tap sums as ``(sites, N_STATS, heads)``, rows in ``site_names`` order (zeros for a site
        this rank did not capture); ``None`` when no site was captured.

        ``joined`` (several ranks, before their SUM reduce): the ranks first exchange which sites they captured
        (one ``all_gather_object``), so that every rank, one that captured nothing or fewer sites included, builds
        the same layout and joins the reduce; ``None`` only when no rank captured anything. ``device``: where a rank
        with no capture builds its zeros (the reduce's device)."""
        assert self.tap is not None
        stats = self.tap.stats
        local = [(name, int(s.shape[1])) for name, s in stats.items()]
        ranks = gather_objects(local) if joined else [local]
        for sites in ranks:  # rank order, each in its forward order: the same site_names on every rank
            for name, _ in sites:
                if name not in self.site_names:
                    self.site_names.append(name)
        heads = max((h for sites in ranks for _, h in sites), default=0)
        if heads == 0:
            return None
        if stats:
            device = next(iter(stats.values())).device
        out = torch.zeros(len(self.site_names), N_STATS, heads, dtype=torch.float64, device=device)
        for i, name in enumerate(self.site_names):
            if name in stats:
                out[i, :, : stats[name].shape[1]] = stats[name]
        return out

    def _no_capture(self, pl_module: LightningModule) -> None:
        candidates = [
            f"{name} ({type(m).__name__})"
            for name, m in named_modules(pl_module)  # clean names (no wrapper segments)
            if _ATTENTION_LIKE.search(type(m).__name__) and not isinstance(m, Regularizer)
        ]
        where = ", ".join(candidates[:8]) or "none found by class name"
        msg = (
            f"AttentionEntropyMonitor captured no attention in {type(pl_module).__name__} (attention-like modules: "
            f"{where}). The tap sees F.scaled_dot_product_attention, nn.MultiheadAttention and HF transformers "
            "attention ('sdpa' and 'eager'); "
        )
        hf = hf_attention_implementations(pl_module)
        if hf:
            msg += (
                f"HF models here use {hf}: for other implementations call model.set_attn_implementation('sdpa') "
                "for the tapped run; "
            )
        msg += (
            "for hand-written attention (softmax(q @ k.T)) call entrotrain.taps.record_attention(q, k, is_causal=...) "
            "in the module's forward, or switch it to F.scaled_dot_product_attention. Check include/exclude patterns "
            "too."
        )
        if self.strict:
            raise TapError(msg)
        self._nonfinite.warn_once("no_capture", msg + " (Shown once per fit.)")

    def _announce(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._announced = True
        layers = {f"L{i}": name for i, name in enumerate(self.site_names)}
        rank_zero_info("AttentionEntropyMonitor sites: " + ", ".join(f"{k}={v}" for k, v in layers.items()))
        for logger in trainer.loggers:
            logger.log_hyperparams({f"{self.prefix}attn/layers": layers})
        missed = [
            name
            for name, m in named_modules(pl_module)  # names as the sites have them (no "_orig_mod.")
            if name
            and _ATTENTION_LIKE.search(type(m).__name__)
            and not isinstance(m, Regularizer)  # e.g. AttentionEntropyMaximization: a loss, not attention
            and self.tap is not None
            and self.tap.wants(name)
            and not any(_related(site, name) for site in self.site_names)
        ]
        if missed:
            rank_zero_warn(
                f"AttentionEntropyMonitor saw no attention call inside {missed[:8]}: if they compute attention by "
                "hand, call entrotrain.taps.record_attention(q, k, ...) there, or exclude them."
            )

    def compute_metrics(
        self, step: int, reduce: Callable[[Tensor], Tensor] | None = None, device: torch.device | None = None
    ) -> tuple[dict[str, float], Tensor] | None:
        """The trainer-free core of a logging step: this window's tap sums → (metrics by key, normalised heads).

        ``reduce`` sums a tensor over ranks (``None`` = one process); it is called once, on the stacked sums, after
        one exchange of the captured site names. Under ``reduce`` every rank must call this at every logging step,
        also a rank that captured nothing (no forward this window, or none through a tapped module): it joins the
        reduce with zero sums (built on ``device``) and gets the same metrics as the others. Returns ``None`` when
        no rank captured anything (the caller reports it). Updates the site names, first / last summaries and the
        non-finite count; publishes nothing. Used by the Lightning path and by
        :mod:`entrotrain.integrations.transformers`, so both give the same keys and values.
        """
        stacked = self._stacked(joined=reduce is not None and dist_world()[1] > 1, device=device)
        if stacked is None:
            return None
        if reduce is not None:
            stacked = reduce(stacked)
        stacked = stacked.cpu()  # one device → host transfer per logging step
        entropy, normalized, summary = attention_summary(stacked, self.collapse_threshold, self.overload_threshold)
        metrics = {self.prefix + k: v for k, v in summary.items()}
        self.last_summary = (step, summary)
        if self.first_summary is None:
            self.first_summary = self.last_summary
        for layer in range(normalized.shape[0]):
            row = normalized[layer][torch.isfinite(normalized[layer])]
            if row.numel():
                metrics[f"{self.prefix}attn_norm/L{layer}/mean"] = float(row.mean())
            if self.log_per_head:
                for head in range(normalized.shape[1]):
                    if torch.isfinite(entropy[layer, head]):
                        metrics[f"{self.prefix}attn/L{layer}/H{head}"] = float(entropy[layer, head])
                    if torch.isfinite(normalized[layer, head]):
                        metrics[f"{self.prefix}attn_norm/L{layer}/H{head}"] = float(normalized[layer, head])
        self._nonfinite.add(summary["attn/nonfinite"], "attention rows had non-finite entropy (NaN/Inf in q or k)", f"step {step}")
        self.last_logged = metrics
        return metrics, normalized

    def _flush(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        assert self.tap is not None
        world = trainer.world_size > 1
        if not world and not self.tap.stats:
            computed = None
        else:  # under DDP every rank joins the reduce, one that captured nothing too (else the others hang)
            computed = self.compute_metrics(
                step, (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if world else None, pl_module.device
            )
        if computed is None:  # no rank captured anything
            self._no_capture(pl_module)
            publish_scalars(trainer, pl_module, {}, source=self.state_key)  # earlier values are stale now
            return
        metrics, normalized = computed
        if not self._announced:
            self._announce(trainer, pl_module)
        step = publish_scalars(trainer, pl_module, metrics, source=self.state_key)
        if trainer.is_global_zero:
            record_arrays(trainer, self.record_arrays(normalized), step)
            self._history.append(normalized.float())
            self._history_steps.append(step)
        if self.log_media and trainer.is_global_zero:
            self._log_media(trainer, normalized, step)

    def record_thresholds(self) -> list[RecordThreshold]:
        """The run record's reference lines on every ``attn_norm`` curve: the collapse and overload thresholds."""
        key = f"{self.prefix}attn_norm/*"
        return [RecordThreshold(key, self.collapse_threshold, "collapse"),
                RecordThreshold(key, self.overload_threshold, "overload")]

    def record_arrays(self, normalized: Tensor) -> list[RecordArray]:
        """The run record's arrays of a logging step: the layer × head heatmap of normalised entropy."""
        meta = {"vmin": 0.0, "vmax": 1.0, "rows": [f"L{i}" for i in range(normalized.shape[0])],
                "sites": list(self.site_names)}
        return [RecordArray(f"{self.prefix}attn_norm/heatmap", normalized, "heatmap", meta)]

    def media(self, normalized: Tensor) -> dict[str, Any]:
        """The wandb media of a logging step (histogram, heatmap, and the heads over time at every
        ``over_time_every``-th call: each call counts one logging step) keyed as logged; needs wandb."""
        from entrotrain.dashboards.wandb_media import heads_over_time_image, heatmap_image, histogram

        media: dict[str, Any] = {f"{self.prefix}attn_norm/hist": histogram(normalized)}
        image = heatmap_image(
            normalized, caption=f"normalised attention entropy, rows = layers L0..L{normalized.shape[0] - 1}, cols = heads"
        )
        if image is not None:
            media[f"{self.prefix}attn_norm/heatmap"] = image
        due = self.over_time_every > 0 and self._media_steps % self.over_time_every == 0
        self._media_steps += 1
        over_time = heads_over_time_image(self._history, self._history_steps) if due else None
        if over_time is not None:
            media[f"{self.prefix}attn_norm/heads_over_time"] = over_time
        return media

    def _log_media(self, trainer: Trainer, normalized: Tensor, step: int) -> None:
        from entrotrain.dashboards.wandb_media import wandb_loggers

        loggers = wandb_loggers(trainer.loggers)
        if not loggers:
            return
        media = self.media(normalized)
        for logger in loggers:
            logger.experiment.log({**media, "trainer/global_step": step})
