r"""Attention-entropy regularisers: AEM, the Jha & Reagen entropy band, and an entropy floor on collapsing heads.

Each reads the per-query results of a differentiable :class:`~entrotrain.taps.AttentionTap` — a list of
``(site, AttentionEntropy)`` with ``entropy``, ``normalized`` and ``n_keys`` of shape ``(batch, heads, queries)`` —
and returns a :class:`~entrotrain.regularizers.composition.RegularizerOutput`. Sites are the model's attention
layers in the order they first ran; a site recorded twice (two forwards in one capture) pools its queries.

One line in a LightningModule's ``training_step`` (register the regulariser as a submodule so a learnable
threshold reaches the optimizer)::

    def training_step(self, batch, batch_idx):
        with self.reg.capture(self, step=self.global_step):  # arms a differentiable AttentionTap (none at weight 0)
            logits = self(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        reg = self.reg(step=self.global_step)        # reads and releases what the capture recorded
        self.log_dict({f"reg/{k}": v for k, v in reg.parts.items()})
        return loss + reg.total

With a tap of your own: ``reg(tap.records)`` or ``reg(tap)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Union

import torch
from torch import Tensor, nn

from entrotrain._validation import check_bool, check_choice, check_int, check_real
from entrotrain.errors import EntrotrainError
from entrotrain.functional.attention import AttentionEntropy
from entrotrain.regularizers.composition import Regularizer, Schedule

__all__ = ["AttentionEntropyMaximization", "EntropyBandRegularizer", "EntropyFloorRegularizer", "AttentionRecords"]

#: What the attention regularisers accept: a tap's records, the tap itself, or one result (one site).
AttentionRecords = Union[Sequence[tuple[str, AttentionEntropy]], AttentionEntropy, Any]


def _as_records(records: AttentionRecords) -> list[tuple[str, AttentionEntropy]]:
    if isinstance(records, AttentionEntropy):
        return [("attention", records)]
    if hasattr(records, "records") and hasattr(records, "differentiable"):  # an AttentionTap
        if not records.differentiable:
            raise EntrotrainError(
                "the AttentionTap was not differentiable, so it kept no records: build it with "
                "AttentionTap(model, differentiable=True), or use `with reg.capture(model): ...`."
            )
        records = records.records
    try:
        out = [(str(site), result) for site, result in records]
    except (TypeError, ValueError):
        raise EntrotrainError(
            f"expected a list of (site, AttentionEntropy) (tap.records), an AttentionTap or an AttentionEntropy, "
            f"got {type(records).__name__}."
        ) from None
    if not out:
        raise EntrotrainError(
            "no attention was recorded: run the model's forward inside `with reg.capture(model):` (with gradients "
            "enabled), and check the tap's include=/exclude= patterns match your attention modules."
        )
    for site, result in out:
        if not isinstance(result, AttentionEntropy) or result.entropy.dim() != 3:
            raise EntrotrainError(
                f"record {site!r} must be an AttentionEntropy of (batch, heads, queries) tensors, got "
                f"{type(result).__name__}."
            )
    return out


def _per_site_sums(
    records: list[tuple[str, AttentionEntropy]], fn: Any
) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """For each site (first-seen order): ``Σ_{b,i} fn(...)`` and the count of the queries ``fn`` kept, per head.

    ``fn(site, result) -> (values, keep)`` with ``values`` and boolean ``keep`` of shape ``(B, H, N)``.
    """
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    for site, result in records:
        values, keep = fn(site, result)
        s = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(dim=(0, 2))
        c = keep.sum(dim=(0, 2)).to(values.dtype)
        if site in sums:
            if sums[site].shape != s.shape:
                raise EntrotrainError(f"site {site!r} changed its number of heads between calls: {s.shape[0]}.")
            sums[site], counts[site] = sums[site] + s, counts[site] + c
        else:
            sums[site], counts[site] = s, c
    sites = list(sums)
    return sites, [sums[s] for s in sites], [counts[s] for s in sites]


def _head_means(sums: list[Tensor], counts: list[Tensor]) -> list[Tensor]:
    """Per-head mean over kept queries; a head with none kept gives 0 (and no NaN gradient)."""
    return [s / c.clamp_min(1.0) for s, c in zip(sums, counts)]


def _mean_of_site_means(per_site: list[Tensor]) -> Tensor:
    r""":math:`\frac{1}{L}\sum_\ell \frac{1}{H_\ell}\sum_h x_{\ell h}` over the sites with at least one head
    (a site with 0 heads has nothing to average: skipped); 0, still attached to the graph, when no site has a head
    (never the NaN of an empty mean)."""
    kept = [x.mean() for x in per_site if x.numel() > 0]
    if kept:
        return torch.stack(kept).mean()
    return torch.stack([x.sum() for x in per_site]).sum()


class AttentionEntropyMaximization(Regularizer):
    r"""AEM: the negative mean attention entropy, :math:`R = -\lambda \cdot \overline{H}`.

    Zhang et al. 2024, "AEM: Attention Entropy Maximization for Multiple Instance Learning based Whole Slide Image
    Classification" (dazhangyu123/AEM @4a928a84, ``main.py``: ``div_loss = Σ softmax(a)·log_softmax(a) / n_heads``,
    ``loss = CE + λ·div_loss``). Here

    .. math::

        \overline{H} = \frac{1}{L}\sum_{\ell} \frac{1}{H_\ell}\sum_h
            \frac{1}{|Q_{\ell h}|}\sum_{(b,i) \in Q_{\ell h}} H_{\ell h b i}

    over the queries with at least one valid key (fully masked queries are excluded), in nats, or on the
    normalised entropy :math:`\hat H_i = H_i / \ln|V_i|` (queries with :math:`|V_i| \ge 2`) with ``normalized=True``.
    A head without such a query counts 0 (so empty, fully masked or single-key input gives a penalty of 0 with a
    finite gradient); a site with 0 heads is skipped (0 when no site has a head).
    With one query per head this is the reference's ``div_loss`` (golden vector T5: −1.166915662547658).

    Args:
        weight: :math:`\lambda`; 0.1 as the AEM README's example (its argparse default 0 is the baseline).
        normalized: penalise :math:`\hat H` instead of nats (scale-free across sequence lengths).
        schedule, final_weight, total_steps: weight schedule; ``schedule="cosine"`` is the paper's (v3) cosine
            weight annealing, which the reference code does not have.
    """

    name = "aem"

    def __init__(
        self,
        weight: float = 0.1,
        *,
        normalized: bool = False,
        schedule: Schedule = "constant",
        final_weight: float = 0.0,
        total_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.normalized = check_bool(normalized, "normalized")

    def mean_entropy(self, records: AttentionRecords) -> Tensor:
        """:math:`\\overline{H}` as defined in the class docstring (keeps the graph)."""
        if self.normalized:
            fn = lambda _, r: (r.normalized, r.n_keys >= 2)  # noqa: E731
        else:
            fn = lambda _, r: (r.entropy, r.n_keys >= 1)  # noqa: E731
        _, sums, counts = _per_site_sums(_as_records(records), fn)
        return _mean_of_site_means(_head_means(sums, counts))

    def penalty(self, records: AttentionRecords) -> Tensor:
        return -self.mean_entropy(records)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, normalized={self.normalized}"


class EntropyBandRegularizer(Regularizer):
    r"""Entropy band of Jha & Reagen 2025, "Entropy-Guided Attention for Private LLMs" (arXiv 2501.03489).

    Keeps each head's attention entropy within a dead-zone ``± margin`` of a **learnable** per-layer, per-head
    target :math:`\theta_{\ell h} \cdot H_{\max}`. The deviation :math:`d = E - \theta_{\ell h} H_{\max}`.

    ``preset="paper"`` reproduces ``EntropyRegularization.compute_loss`` (Nandan91/entropy-guided-attention-llm
    @728944df) exactly:

    .. math::

        H_{\max} = \ln T,\quad m = 0.2 \ln T,\quad
        \mathrm{pen}_{\ell h} = \sum_{b,i} \big(d_{\ell h b i}\,\mathbb 1[|d_{\ell h b i}| > m]\big)^2,\quad
        R = \frac{1}{L}\sum_\ell \frac{1}{H}\sum_h \mathrm{pen}_{\ell h}

    with :math:`T` the number of keys of the full sequence (global, not per query), the raw :math:`\theta` (no
    sigmoid, as the reference), every query counted (a fully masked query has :math:`E = 0`, as the reference's
    ``nansum``), and weight ``loss_coeff = 1e-5``. That is the reference's value on every batch with at least one
    query that has a key; on an empty or all-masked batch :math:`R = 0` with a zero gradient (DESIGN.md §8), where
    the reference, given ``context_size``, penalises every masked query (its :math:`E = 0`, so
    :math:`d = -\theta H_{\max}`). Entropy is exact from the logits, where the reference uses
    :math:`-\sum A \ln(A + 10^{-9})`; the two differ by about :math:`10^{-9}` per key.

    ``preset="default"`` (improved; the reference's scale depends on B·T and its dead-zone jumps):

    .. math::

        d = \hat H_i - \sigma(\rho_{\ell h}),\quad
        \mathrm{pen}_{\ell h} = \frac{1}{|Q|}\sum_{(b,i)\in Q} (|d| - m)_+^2,\quad
        R = \frac{1}{L}\sum_\ell \frac{1}{H}\sum_h \mathrm{pen}_{\ell h}

    on the normalised entropy :math:`\hat H_i = H_i / \ln|V_i|` (per-query maximum), with :math:`Q` the queries
    with :math:`|V_i| \ge 2`, margin :math:`m` = ``margin_factor`` in normalised units, :math:`\theta = \sigma(\rho)
    \in (0,1)`, weight 0.1.

    Threshold init: :math:`\theta_0 = 0.5` (``init``) for every head: the middle of the range between collapse
    (0) and entropic overload (1), where the sigmoid is steepest, so no head is pushed to either end before its
    threshold has adapted (the reference repository does not give its init). Stored as :attr:`raw` of shape
    ``(n_layers, n_heads)``: ``init`` itself for ``"paper"``, ``logit(init)`` for ``"default"``.

    Args:
        n_layers: attention sites the tap records (layer ``ℓ`` = the ``ℓ``-th distinct site in record order).
        n_heads: query heads per site.
        preset: ``"paper"`` or ``"default"`` (above).
        weight: coefficient; default 1e-5 (``"paper"``, the reference ``loss_coeff``) or 0.1 (``"default"``).
        margin_factor: dead-zone half-width as a fraction of :math:`H_{\max}` (0.2 as the reference).
        init: initial threshold :math:`\theta_0` (a fraction of :math:`H_{\max}`).
        context_size: :math:`T` for ``"paper"`` (the reference's ``context_size``); default the largest key count
            in the records, which is the sequence length for causal or unpadded attention.
        schedule, final_weight, total_steps: weight schedule (see :class:`Regularizer`).
    """

    name = "entropy_band"

    def __init__(
        self,
        n_layers: int,
        n_heads: int,
        *,
        preset: Literal["paper", "default"] = "default",
        weight: float | None = None,
        margin_factor: float = 0.2,
        init: float = 0.5,
        context_size: int | None = None,
        schedule: Schedule = "constant",
        final_weight: float = 0.0,
        total_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        check_choice(preset, "preset", ("paper", "default"))
        check_int(n_layers, "n_layers", low=1)
        check_int(n_heads, "n_heads", low=1)
        check_real(margin_factor, "margin_factor", low=0.0)
        check_int(context_size, "context_size", low=1, none_ok=True)
        init = check_real(init, "init")  # type: ignore[assignment]
        if preset == "default" and not 0.0 < init < 1.0:
            raise EntrotrainError(
                f"preset='default' bounds the threshold in (0, 1) by a sigmoid; got init={init}; use e.g. init=0.5."
            )
        if weight is None:
            weight = 1e-5 if preset == "paper" else 0.1
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.preset = preset
        self.n_layers, self.n_heads = n_layers, n_heads
        self.margin_factor = float(margin_factor)
        self.context_size = context_size
        raw = init if preset == "paper" else math.log(init / (1.0 - init))
        self.raw = nn.Parameter(torch.full((n_layers, n_heads), float(raw)))

    @property
    def threshold(self) -> Tensor:
        r""":math:`\theta` ``(n_layers, n_heads)``: the raw parameter (``"paper"``) or its sigmoid (``"default"``)."""
        return self.raw if self.preset == "paper" else torch.sigmoid(self.raw)

    def _layers(self, recs: list[tuple[str, AttentionEntropy]]) -> dict[str, int]:
        """Site name → layer index (first-seen order), checked against ``n_layers`` and ``n_heads``."""
        order: dict[str, int] = {}
        for site, result in recs:
            order.setdefault(site, len(order))
            if result.entropy.shape[1] != self.n_heads:
                raise EntrotrainError(
                    f"site {site!r} has {result.entropy.shape[1]} query heads but n_heads={self.n_heads}: set "
                    "n_heads to match."
                )
        if len(order) != self.n_layers:
            raise EntrotrainError(
                f"EntropyBandRegularizer has n_layers={self.n_layers} but the records hold {len(order)} attention "
                f"sites {list(order)}: set n_layers={len(order)}, or select the sites with the tap's include=/exclude=."
            )
        return order

    def penalty(self, records: AttentionRecords) -> Tensor:
        recs = _as_records(records)
        layer = self._layers(recs)
        theta = self.threshold
        if self.preset == "paper":
            t = self.context_size
            if t is None:
                t = max((int(r.n_keys.max()) if r.n_keys.numel() else 0) for _, r in recs)
            h_max = math.log(max(float(t), 1.0))
            margin = self.margin_factor * h_max
            # every query counts (the reference) when one has a key; none when all are masked (0, zero gradient);
            # decided on the device (no host sync)
            has_key = [(r.n_keys > 0).any() for _, r in recs]

            def paper(site: str, r: AttentionEntropy) -> tuple[Tensor, Tensor]:
                d = r.entropy - theta[layer[site]].to(r.entropy)[None, :, None] * h_max
                any_valid = torch.stack([flag.to(d.device) for flag in has_key]).any()
                return (d * (d.abs() > margin)) ** 2, any_valid.expand(d.shape)

            _, sums, _ = _per_site_sums(recs, paper)
            return _mean_of_site_means(sums)

        def default(site: str, r: AttentionEntropy) -> tuple[Tensor, Tensor]:
            d = r.normalized - theta[layer[site]].to(r.normalized)[None, :, None]
            return (d.abs() - self.margin_factor).clamp_min(0.0) ** 2, r.n_keys >= 2

        _, sums, counts = _per_site_sums(recs, default)
        return _mean_of_site_means(_head_means(sums, counts))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, preset={self.preset!r}, n_layers={self.n_layers}, n_heads={self.n_heads}, "
            f"margin_factor={self.margin_factor}"
        )


class EntropyFloorRegularizer(Regularizer):
    r"""Entropy floor on collapsing heads only: :math:`R = \lambda \cdot \frac{1}{LH}\sum_{\ell,h}
    (\tau - \bar{\hat H}_{\ell h})_+`.

    :math:`\bar{\hat H}_{\ell h}` is head :math:`(\ell, h)`'s mean normalised entropy :math:`H_i / \ln|V_i|` over
    its queries with :math:`|V_i| \ge 2`. A linear hinge: a head below the floor :math:`\tau` gets a constant pull
    (the gradient does not fade as it nears the floor, unlike a squared hinge), a head above it gets exactly zero
    gradient. The mean runs over *all* heads (those above the floor add 0), so :math:`\lambda` does not change
    meaning as heads cross the floor. A head with no query of :math:`|V_i| \ge 2` keys (fully masked or single-key
    rows only) has no defined normalised entropy: it adds 0, like a head above the floor (0 heads: penalty 0).
    After the σReparam paper's collapse diagnosis (Zhai et al. 2023) and the
    "target entropy / floor only on collapsing heads" item of entrotrain's regulariser menu.

    Args:
        weight: :math:`\lambda` (default 1.0: the penalty is at most :math:`\tau`).
        floor: :math:`\tau` in normalised-entropy units (default 0.2).
        schedule, final_weight, total_steps: weight schedule (see :class:`Regularizer`).
    """

    name = "entropy_floor"

    def __init__(
        self,
        weight: float = 1.0,
        *,
        floor: float = 0.2,
        schedule: Schedule = "constant",
        final_weight: float = 0.0,
        total_steps: int | None = None,
        name: str | None = None,
    ) -> None:
        floor = check_real(floor, "floor")  # type: ignore[assignment]
        if not 0.0 < floor <= 1.0:
            raise EntrotrainError(f"floor is in normalised-entropy units, (0, 1]; got {floor}; e.g. floor=0.2.")
        super().__init__(weight, schedule=schedule, final_weight=final_weight, total_steps=total_steps, name=name)
        self.floor = float(floor)

    def head_entropy(self, records: AttentionRecords) -> list[Tensor]:
        """Per site, the ``(heads,)`` mean normalised entropy (0 for a head with no query of ≥ 2 keys)."""
        _, sums, counts = _per_site_sums(_as_records(records), lambda _, r: (r.normalized, r.n_keys >= 2))
        return _head_means(sums, counts)

    def penalty(self, records: AttentionRecords) -> Tensor:
        _, sums, counts = _per_site_sums(_as_records(records), lambda _, r: (r.normalized, r.n_keys >= 2))
        heads = torch.cat(_head_means(sums, counts))
        measured = torch.cat(counts) > 0
        hinge = torch.where(measured, (self.floor - heads).clamp_min(0.0), torch.zeros_like(heads))
        return hinge.sum() / max(hinge.numel(), 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, floor={self.floor}"
