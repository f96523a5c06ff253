r"""Mixture-of-experts router statistics: Tsallis entropy (DynMoLE) and per-layer routing sums.

**Tsallis entropy** of order :math:`q > 0` of a probability vector :math:`p \in \Delta^{N-1}`:

.. math::

    S_q(p) = \frac{1 - \sum_i p_i^q}{q - 1} = \sum_i p_i \ln_q(1/p_i), \qquad
    \ln_q(x) = \frac{x^{1-q} - 1}{1 - q}, \qquad \lim_{q \to 1} S_q = -\sum_i p_i \ln p_i,

normalised by its maximum (the uniform distribution) :math:`S_q^{\max} = \ln_q N = (1 - N^{1-q})/(q - 1)`
(:math:`\ln N` at :math:`q = 1`). DynMoLE (Li et al. 2025, "DynMoLE: Boosting Mixture of LoRA Experts Fine-Tuning
with a Hybrid Routing Mechanism"; code ``moe_peft/common/moe_utils.py::tsallis_entropy``) uses
:math:`q = 1.1` and :math:`p + 10^{-5}` *without renormalising*.

Choices this module makes (reference note ``representation_routing.md``, "Choices an implementation must state", 3):

- **Form.** We evaluate :math:`\sum_i p_i \ln_q(1/p_i)` with ``-p * expm1((q-1) ln p) / (q-1)``: no cancellation near
  :math:`q = 1`, so the value is continuous in :math:`q`; it equals the closed form when :math:`\sum_i p = 1` (the
  input is *assumed* normalised along ``dim``; this is not checked). For :math:`|q - 1| <` :data:`SHANNON_TOLERANCE`
  the Shannon branch is taken; the jump there is at most :math:`\tfrac{|q-1|}{2}\sum_i p_i \ln^2 p_i`.
- **eps.** ``eps = 0`` (default) is exact. ``eps > 0`` reproduces DynMoLE: :math:`p' = p + \epsilon`, not
  renormalised, and :math:`S = (1 - \sum_i p_i'^q)/(q-1)` *literally* (we add the offset :math:`(1 - \sum_i
  p'_i)/(q - 1)` to the stable sum), and :math:`-\sum_i p'_i \ln p'_i` on the Shannon branch, as DynMoLE does; with
  ``eps > 0`` the value is therefore discontinuous at :math:`q = 1` (offset :math:`-N\epsilon/(q-1)`), as in DynMoLE.
- **normalize.** Divides by :math:`S_q^{\max}` of the width :math:`N` along ``dim`` (DynMoLE's choice, also with
  ``eps``); :math:`N = 1` has :math:`S_q^{\max} = 0` and the normalised value is **defined as 0**.
- **Gradient at p_i = 0.** :math:`\partial S_q/\partial p_i = (1 - q p_i^{q-1})/(q-1)`: at :math:`p_i = 0` it is
  :math:`1/(q-1)` for :math:`q > 1` (returned exactly) and :math:`+\infty` for :math:`q \le 1` (Shannon included):
  there we return **0**, treating the absent expert like :math:`0 \ln 0 = 0`. Entries :math:`p_i \le 0` count as 0.
- **base.** The value is divided by :math:`\ln(\text{base})` (nats by default), so that the :math:`q \to 1` limit is
  Shannon entropy in that base; the normalised value does not depend on it.
- **Dtypes.** Computed in float32 (float64 stays float64); a row holding NaN/Inf gives a non-finite value in that row
  only.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_dim, check_int, check_real, check_tensor, keep_mask
from entrotrain.errors import EntrotrainError
from entrotrain.functional.entropy import accumulation_dtype, entropy_from_logits
from entrotrain.functional.representation import finite_row_mask

__all__ = [
    "RouterSums",
    "RouterValues",
    "SHANNON_TOLERANCE",
    "router_statistics",
    "router_values",
    "tsallis_entropy",
    "tsallis_entropy_from_logits",
    "tsallis_max",
]

#: :math:`|q - 1|` below which :func:`tsallis_entropy` takes the Shannon branch.
SHANNON_TOLERANCE = 1e-6
#: The largest order accepted: beyond it :math:`q - 1` and :math:`S_q^{\max} \approx 1/(q-1)` leave float32's range
#: (NaN); :math:`S_q \le 1/(q-1)` is 0 to float32 resolution long before.
MAX_ORDER = 1e30
#: The largest ``eps``: an offset added to probabilities (DynMoLE 1e-5), not a probability of its own.
MAX_EPS = 1.0


def check_order(q: float) -> float:
    """The Tsallis order: a finite real in ``(0, MAX_ORDER]``."""
    return check_real(q, "q", low=0.0, low_open=True, high=MAX_ORDER)  # type: ignore[return-value]


def check_eps(eps: float) -> float:
    """DynMoLE's probability offset: a finite real in ``[0, MAX_EPS]``."""
    return check_real(eps, "eps", low=0.0, high=MAX_EPS)  # type: ignore[return-value]


def _check_base(base: float) -> float:
    base = check_real(base, "base", low=0.0, low_open=True)
    if base == 1.0:
        raise EntrotrainError("base must be > 0 and != 1 (log base 1 is undefined), got 1.0; use math.e or 2.")
    return base


def _check_probs(x: Tensor, name: str, dim: int) -> int:
    check_tensor(x, name, floating=True, min_ndim=1, layout="(..., n_experts, ...)")
    return check_dim(dim, x.dim())


def _check_flag(value: object, name: str) -> bool:
    return bool(check_bool(value, name))


def _is_shannon(q: float) -> bool:
    return abs(q - 1.0) < SHANNON_TOLERANCE


def tsallis_max(n: int, q: float) -> float:
    r""":math:`S_q^{\max} = \ln_q N = (1 - N^{1-q})/(q-1)` in nats (:math:`\ln N` on the Shannon branch); 0 for
    :math:`N \le 1`. ``n``: an int ``>= 0``; ``q``: as :func:`tsallis_entropy`."""
    n = check_int(n, "n", low=0, high=2**63 - 1)
    q = check_order(q)
    if n <= 1:
        return 0.0
    if _is_shannon(q):
        return math.log(n)
    return -math.expm1((1.0 - q) * math.log(n)) / (q - 1.0)


def _finish(s: Tensor, n: int, q: float, normalize: bool, base: float) -> Tensor:
    if normalize:
        s_max = tsallis_max(n, q)
        return s / s_max if s_max > 0 else s * 0  # N = 1: defined 0 (NaN rows stay NaN)
    return s / math.log(base) if base != math.e else s


def _terms(p: Tensor, q: float) -> Tensor:
    r"""Per-entry :math:`p \ln_q(1/p)` with the gradient conventions of the module docstring."""
    positive = ~(p <= 0)  # p > 0, and NaN: a NaN probability gives a NaN row, never a hidden one
    safe = torch.where(positive, p, torch.ones_like(p))
    log_p = torch.log(safe)
    if _is_shannon(q):
        pos = -safe * log_p
    else:
        pos = -safe * torch.expm1((q - 1.0) * log_p) / (q - 1.0)
    if q > 1.0 and not _is_shannon(q):  # exact value 0 and derivative 1/(q-1) at p = 0
        # p itself where p == 0 (gradient 1 through where), 0 elsewhere. Not clamp_min(0): its gradient at the
        # boundary x == min changed from 1 (torch <= 2.13) to 0 (torch 2.14), which zeroed this derivative.
        zero = torch.where(p == 0, p, torch.zeros_like(p))
        at_zero = (zero - zero.pow(q)) / (q - 1.0)
    else:  # infinite derivative at 0: value 0, gradient 0 (documented)
        at_zero = torch.zeros_like(p)
    return torch.where(positive, pos, at_zero)


def tsallis_entropy(
    probs: Tensor,
    q: float = 1.1,
    *,
    dim: int = -1,
    normalize: bool = False,
    eps: float = 0.0,
    base: float = math.e,
) -> Tensor:
    r"""Tsallis entropy :math:`S_q(p) = (1 - \sum_i p_i^q)/(q-1)` along ``dim`` (DynMoLE's router entropy).

    Evaluated as :math:`\sum_i p_i \ln_q(1/p_i)` (stable, continuous in :math:`q`); :math:`q \to 1` gives Shannon
    :math:`-\sum_i p_i \ln p_i`. See the module docstring for every choice (eps, normalisation, gradient at 0, base).

    Args:
        probs: ``(..., N, ...)`` probabilities summing to 1 along ``dim`` (assumed, not checked), any floating dtype;
            computed in float32 (float64 stays float64).
        q: the order, finite, > 0 and <= :data:`MAX_ORDER` (DynMoLE default 1.1; 2 gives the Gini–Simpson index
            :math:`1 - \sum p^2`).
        dim: the expert dimension (no wrap-around).
        normalize: divide by :math:`S_q^{\max} = (1 - N^{1-q})/(q-1)` (:math:`\ln N` at :math:`q = 1`), so the
            uniform distribution gives 1; :math:`N = 1` gives 0 by definition.
        eps: in ``[0, 1]``. ``0`` is exact; ``> 0`` reproduces DynMoLE's :math:`p + \epsilon` without
            renormalisation, literally :math:`(1 - \sum_i (p_i+\epsilon)^q)/(q-1)` (``-inf`` where
            :math:`(p_i+\epsilon)^q` overflows, e.g. :math:`q \gtrsim 10^7` at :math:`\epsilon = 10^{-5}`).
        base: log base of the Shannon limit (the value is divided by :math:`\ln` base); finite, > 0, != 1.

    Returns:
        ``probs.shape`` without ``dim``, float32 (float64 for float64 input). Differentiable with a finite gradient
        everywhere (at :math:`p_i = 0`: :math:`1/(q-1)` for :math:`q > 1`, 0 for :math:`q \le 1`). A row holding
        NaN/Inf gives a non-finite value in that row only; an empty ``dim`` (:math:`N = 0`) gives 0.

    Raises:
        EntrotrainError: ``probs`` not a floating tensor with a dim, ``dim`` out of range, ``q`` not in
            ``(0, MAX_ORDER]``, ``eps`` not in ``[0, 1]``, ``base`` not finite > 0 and != 1, ``normalize`` not a bool.

    Example:
        >>> round(tsallis_entropy(torch.full((4,), 0.25), q=2.0).item(), 6)  # 1 - 4 * 1/16
        0.75
    """
    dim = _check_probs(probs, "probs", dim)
    q = check_order(q)
    eps = check_eps(eps)
    base = _check_base(base)
    normalize = _check_flag(normalize, "normalize")
    p = probs.to(accumulation_dtype(probs.dtype))
    n = p.shape[dim]
    if eps > 0:
        p = p + eps
    s = _terms(p, q).sum(dim=dim)
    if eps > 0 and not _is_shannon(q):  # DynMoLE's literal 1 - Σ p'^q: the unrenormalised mass enters
        s = s + (1.0 - p.sum(dim=dim)) / (q - 1.0)
    return _finish(s, n, q, normalize, base)


def tsallis_entropy_from_logits(
    logits: Tensor,
    q: float = 1.1,
    *,
    dim: int = -1,
    normalize: bool = False,
    eps: float = 0.0,
    base: float = math.e,
) -> Tensor:
    r"""Tsallis entropy :math:`S_q(\mathrm{softmax}(z))` of raw logits along ``dim`` (e.g. router logits).

    .. math:: S_q = \sum_i -e^{\ell_i}\,\frac{\operatorname{expm1}((q-1)\ell_i)}{q-1}, \qquad \ell = \log\mathrm{softmax}(z)

    The softmax is taken in float32 for half-precision input (float64 stays float64). With ``eps = 0`` the log-domain
    form above is used (exact for tiny probabilities; ``-inf`` logits are absent experts, contributing 0 with a
    finite gradient); with ``eps > 0`` the probabilities go through :func:`tsallis_entropy` (DynMoLE's :math:`p +
    \epsilon`). Arguments and conventions as :func:`tsallis_entropy`. A row whose logits are all ``-inf`` or hold
    NaN/``+inf`` gives NaN in that row only.

    Example:
        >>> round(tsallis_entropy_from_logits(torch.zeros(8), q=1.0, normalize=True).item(), 6)
        1.0
    """
    check_tensor(logits, "logits", floating=True, min_ndim=1, layout="(..., n_experts, ...)")
    dim = check_dim(dim, logits.dim())
    q = check_order(q)
    eps = check_eps(eps)
    base = _check_base(base)
    normalize = _check_flag(normalize, "normalize")
    z = logits.to(accumulation_dtype(logits.dtype))
    n = z.shape[dim]
    if n == 0:
        return _finish(z.sum(dim=dim), n, q, normalize, base)
    if eps > 0:
        return tsallis_entropy(torch.softmax(z, dim=dim), q, dim=dim, normalize=normalize, eps=eps, base=base)
    log_p = torch.log_softmax(z, dim=dim)
    present = log_p != float("-inf")  # NaN stays in and propagates to its row
    safe = torch.where(present, log_p, torch.zeros_like(log_p))
    if _is_shannon(q):
        terms = -torch.exp(safe) * safe
    else:
        # q < 1 and a tiny p: e^ℓ·expm1((q-1)ℓ) is 0·inf (ℓ = -300); there p^q - p = e^{qℓ}·(-expm1((1-q)ℓ)) instead.
        # Each branch reads ℓ only where it is taken (0 elsewhere), so neither the value nor the gradient sees 0·inf.
        far = (q - 1.0) * safe > 1.0
        near_l = torch.where(far, torch.zeros_like(safe), safe)
        far_l = torch.where(far, safe, torch.zeros_like(safe))
        terms = torch.where(
            far,
            torch.exp(q * far_l) * torch.expm1((1.0 - q) * far_l) / (q - 1.0),
            -torch.exp(near_l) * torch.expm1((q - 1.0) * near_l) / (q - 1.0),
        )
    s = torch.where(present, terms, torch.zeros_like(terms)).sum(dim=dim)
    return _finish(s, n, q, normalize, base)


# ---------------------------------------------------------------------------------------------------------- routers
class RouterSums(NamedTuple):
    r"""Per-layer router statistics as **sums and counts** (float64), so that micro-batches and DDP ranks combine
    exactly by addition (:meth:`merged`, or an all-reduce SUM of :meth:`flat`). Over the kept, finite rows :math:`r`:

    - ``entropy``: :math:`\sum_r H(p_r)` (nats), ``tsallis``: :math:`\sum_r S_q(p_r)` (nats, order ``q``);
    - ``load_counts`` ``(E,)``: top-k assignments per expert, :math:`\sum_r 1[e \in \mathrm{topk}(p_r)]`;
    - ``prob_mass`` ``(E,)``: :math:`\sum_r p_{r,e}` (router importance, Switch's :math:`P_e` times rows);
    - ``top1_margin``: :math:`\sum_r p_{r,(1)} - p_{r,(2)}`, ``topk_margin``: :math:`\sum_r p_{r,(k)} - p_{r,(k+1)}`
      (sorted probabilities; a missing :math:`p_{(2)}` for :math:`E = 1` or :math:`p_{(k+1)}` for :math:`k = E` is 0);
    - ``rows``: kept finite rows; ``nonfinite``: kept rows holding NaN/Inf (skipped by every other field).
    """

    entropy: Tensor
    tsallis: Tensor
    load_counts: Tensor
    prob_mass: Tensor
    top1_margin: Tensor
    topk_margin: Tensor
    rows: Tensor
    nonfinite: Tensor

    @property
    def n_experts(self) -> int:
        return int(self.load_counts.shape[0])

    def merged(self, other: RouterSums) -> RouterSums:
        """Field-wise sum (two micro-batches, or two ranks, of the same layer)."""
        if other.n_experts != self.n_experts:
            raise EntrotrainError(
                f"cannot merge router statistics of {self.n_experts} and {other.n_experts} experts; merge one layer's "
                "statistics with the same layer's."
            )
        return RouterSums(*(a + b.to(a.device) for a, b in zip(self, other)))

    def flat(self) -> Tensor:
        """One float64 vector ``(6 + 2E,)`` (for a single all-reduce); :meth:`from_flat` inverts it."""
        scalars = torch.stack([self.entropy, self.tsallis, self.top1_margin, self.topk_margin, self.rows, self.nonfinite])
        return torch.cat([scalars, self.load_counts, self.prob_mass])

    @classmethod
    def from_flat(cls, flat: Tensor, n_experts: int) -> RouterSums:
        """Inverse of :meth:`flat` for a layer of ``n_experts`` experts."""
        if flat.shape != (6 + 2 * n_experts,):
            raise EntrotrainError(
                f"flat router statistics of {n_experts} experts must have shape ({6 + 2 * n_experts},), got "
                f"{tuple(flat.shape)}; pass the vector RouterSums.flat() returned."
            )
        e, t, m1, mk, rows, bad = flat[:6].unbind()
        return cls(e, t, flat[6 : 6 + n_experts], flat[6 + n_experts :], m1, mk, rows, bad)


class RouterValues(NamedTuple):
    r"""Final per-layer router statistics (:func:`router_values`). Scalars are 0-dim float64 tensors; NaN when no row
    was kept (a monitor publishes those as "not computable", never as a number).

    - ``entropy`` (nats) and ``entropy_norm`` = ``entropy / ln E``: mean per-token router entropy;
    - ``tsallis``: mean per-token Tsallis entropy :math:`S_q` (nats, unnormalised; divide by
      :func:`tsallis_max` ``(E, q)`` for the DynMoLE-normalised value);
    - ``load`` ``(E,)``: top-k assignment fractions :math:`f_e = c_e / \sum_j c_j` (sums to 1);
    - ``importance`` ``(E,)``: mean router probability per expert :math:`P_e` (sums to 1);
    - ``load_entropy`` :math:`-\sum_e f_e \ln f_e` and ``load_entropy_norm`` = ``/ ln E`` (1 = perfectly balanced);
    - ``dead_frac``: fraction of experts with no top-k assignment, or with :math:`f_e <` ``dead_threshold``;
    - ``top1_margin``, ``topk_margin``: mean margins; ``rows``, ``nonfinite``: counts.

    ``E = 1`` has :math:`\ln E = 0`: both normalised entropies are defined as 0.
    """

    entropy: Tensor
    entropy_norm: Tensor
    tsallis: Tensor
    load: Tensor
    importance: Tensor
    load_entropy: Tensor
    load_entropy_norm: Tensor
    dead_frac: Tensor
    top1_margin: Tensor
    topk_margin: Tensor
    rows: Tensor
    nonfinite: Tensor


def _as_router_rows(router_logits: Tensor) -> Tensor:
    check_tensor(router_logits, "router_logits", floating=True, min_ndim=2, layout="(rows, n_experts)")
    if router_logits.shape[-1] == 0:
        raise EntrotrainError(
            f"router_logits has 0 experts (shape {tuple(router_logits.shape)}); pass the router's (rows, n_experts) "
            "logits."
        )
    return router_logits.reshape(-1, router_logits.shape[-1])


def _row_mask(mask: Tensor | None, n_rows: int, device: torch.device) -> Tensor:
    keep = keep_mask(mask, "mask")
    if keep is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    if keep.numel() != n_rows:
        raise EntrotrainError(
            f"mask has {keep.numel()} entries (shape {tuple(keep.shape)}) but router_logits has {n_rows} rows; give "
            "one keep flag per row, e.g. HF's attention_mask (batch, seq) for logits of (batch*seq, n_experts)."
        )
    return keep.reshape(-1).to(device)


def router_statistics(
    router_logits: Tensor,
    top_k: int,
    *,
    mask: Tensor | None = None,
    q: float = 1.1,
    chosen: Tensor | None = None,
    scoring: str = "softmax",
) -> RouterSums:
    r"""Sums and counts of one MoE layer's routing (Shannon / Tsallis entropy, top-k load, importance, margins).

    :math:`p_r = \mathrm{softmax}(z_r)` of each row's raw router logits (``scoring='sigmoid'``: of
    :math:`\log\sigma(z_r)`, the normalised sigmoid scores), taken in float32 (float64 stays float64), and
    top-k chosen on :math:`p_r` as HF's Mixtral / Qwen2-MoE / OLMoE routers do (``torch.topk``, ties as it breaks
    them). Per-token entropy is :func:`~entrotrain.functional.entropy.entropy_from_logits` (exact), Tsallis is
    :func:`tsallis_entropy_from_logits` (``eps = 0``). Turn the (summed) result into means with :func:`router_values`.

    Choices (reference note, "Choices an implementation must state", 3–5): **pad rows are excluded** from every
    statistic when a ``mask`` is given (HF's ``output_router_logits`` include them; DynMoLE excludes them from load
    but not from entropy); load is counted from **hard top-k assignments** (not soft weights), **per layer** (not
    pooled across layers as HF's aux loss); probabilities are the **full softmax** (not renormalised over the top k).

    Args:
        router_logits: ``(rows, E)`` raw pre-softmax logits (HF layout: one tensor per MoE layer, ``(batch·seq, E)``);
            ``(..., E)`` is flattened to rows. Any floating dtype.
        top_k: experts chosen per token, ``1 <= top_k <= E`` (HF ``config.num_experts_per_tok``).
        mask: keep mask with one entry per row (any shape of ``rows`` elements, flattened row-major: HF's
            ``attention_mask`` ``(batch, seq)`` lines up with ``(batch·seq, E)``): bool ``True`` = keep, or integer
            0/1 with 1 = keep. ``None`` keeps every row.
        q: Tsallis order, finite and > 0 (DynMoLE 1.1).
        chosen: optional ``(rows, k)`` integer ids of the experts the router itself picked for each row (HF
            ``*TopKRouter`` modules return them third). The load is then counted from them instead of from the top
            ``top_k`` of ``softmax(z)``: routers that score experts otherwise (a sigmoid with DeepSeek-V3's
            ``e_score_correction_bias``, which exists to move the choice away from the top logits) pick other experts.
            Ids outside ``[0, E)`` count nowhere; masked and non-finite rows' ids are not counted either.
        scoring: the router's own scoring function, which sets the distribution :math:`p_r` every other statistic
            (entropy, Tsallis, importance, margins, and the load when ``chosen`` is ``None``) is of. ``'softmax'``
            (Mixtral, Qwen2-MoE, OLMoE, DeepSeek-V2): :math:`p_r = \mathrm{softmax}(z_r)`. ``'sigmoid'``
            (DeepSeek-V3 and the routers built like it: GLM-4-MoE, dots1, Kimi-Linear, ...): the normalised sigmoid
            affinities :math:`p_{r,e} = \sigma(z_{r,e}) / \sum_j \sigma(z_{r,j})`, the routing distribution of the
            DeepSeek-V3 report (its s'_{i,t} of the sequence-wise balance loss; HF's ``*TopkRouter`` scores the
            experts by ``router_logits.sigmoid()``), computed as :math:`\mathrm{softmax}(\log\sigma(z_r))` so the
            softmax path (one implementation) serves both. ``'sqrtsoftplus'`` (DeepSeek-V4's ``scoring_func``):
            :math:`\sqrt{\mathrm{softplus}(z)}` normalised the same way. The ``e_score_correction_bias`` only moves
            the choice (pass it as ``chosen``), not the distribution.

    Returns:
        :class:`RouterSums` (float64, on the logits' device; no host sync). Rows holding NaN/Inf are counted in
        ``nonfinite`` and skipped; masked rows are neither counted nor used. Zero rows give zero sums.

    Raises:
        EntrotrainError: logits not floating with >= 2 dims or with 0 experts, ``top_k`` not in ``[1, E]``, a mask
            that is not bool / 0-1 integer or has the wrong number of entries, ``q`` not finite > 0.
    """
    z = _as_router_rows(router_logits)
    n_rows, n_experts = z.shape
    top_k = check_int(top_k, "top_k", low=1, high=n_experts)
    q = check_order(q)
    check_scoring(scoring)
    keep = _row_mask(mask, n_rows, z.device)
    finite = finite_row_mask(z)
    use = keep & finite
    acc = accumulation_dtype(z.dtype)
    z = torch.where(use[:, None], z.to(acc), torch.zeros((), dtype=acc, device=z.device))  # skipped rows: no NaN
    z = scoring_logits(z, scoring)
    w = use.to(torch.float64)
    with torch.no_grad():
        entropy = (entropy_from_logits(z).double() * w).sum()
        tsallis = (tsallis_entropy_from_logits(z, q).double() * w).sum()
        p = torch.softmax(z, dim=-1)
        top_p, top_i = torch.topk(p, min(top_k + 1, n_experts), dim=-1)
        counts = torch.zeros(n_experts, dtype=torch.float64, device=z.device)
        if chosen is None:
            counts.scatter_add_(0, top_i[:, :top_k].reshape(-1), w.repeat_interleave(top_k))
        else:
            picked = _chosen_experts(chosen, n_rows, z.device)
            real = (picked >= 0) & (picked < n_experts)  # an id outside [0, E) (a -1 pad) counts nowhere
            weight = (w[:, None] * real).reshape(-1)
            counts.scatter_add_(0, torch.where(real, picked, 0).reshape(-1), weight)
        mass = (p.double() * w[:, None]).sum(0)
        padded = torch.cat([top_p, torch.zeros(n_rows, 1, dtype=top_p.dtype, device=z.device)], dim=1).double()
        top1 = ((padded[:, 0] - padded[:, 1]) * w).sum()
        topk = ((padded[:, top_k - 1] - padded[:, top_k]) * w).sum()
    return RouterSums(
        entropy=entropy,
        tsallis=tsallis,
        load_counts=counts,
        prob_mass=mass,
        top1_margin=top1,
        topk_margin=topk,
        rows=w.sum(),
        nonfinite=(keep & ~finite).sum().to(torch.float64),
    )


#: The routers' scoring functions :func:`router_statistics` takes: ``p_e`` proportional to ``exp(z_e)``,
#: ``sigmoid(z_e)`` or ``sqrt(softplus(z_e))`` (DeepSeek-V4).
SCORINGS = ("softmax", "sigmoid", "sqrtsoftplus")


def check_scoring(scoring: str) -> str:
    """``scoring`` if it is one of :data:`SCORINGS`, else :class:`EntrotrainError`."""
    if scoring not in SCORINGS:
        raise EntrotrainError(
            f"scoring must be one of {SCORINGS} (the router's own scoring function), got {scoring!r}."
        )
    return scoring


def scoring_logits(z: Tensor, scoring: str) -> Tensor:
    r"""Logits whose softmax is the router's normalised scores: :math:`z` (``'softmax'``), :math:`\log\sigma(z)`
    (``'sigmoid'``: :math:`\mathrm{softmax} = \sigma(z_e)/\sum_j\sigma(z_j)`) or
    :math:`\tfrac12\log\mathrm{softplus}(z)` (``'sqrtsoftplus'``). Differentiable; finite for finite ``z``."""
    if scoring == "sigmoid":
        return torch.nn.functional.logsigmoid(z)  # softmax(log sigma(z)) = sigma(z) / sum sigma(z)
    if scoring == "sqrtsoftplus":  # 0.5 log softplus(z); softplus(z) = e^z (to rounding) below -20, no log(0)
        return 0.5 * torch.where(z < -20, z, torch.log(torch.nn.functional.softplus(z).clamp_min(1e-30)))
    return z


def _chosen_experts(chosen: Tensor, n_rows: int, device: torch.device) -> Tensor:
    """``chosen`` as ``(rows, k)`` int64 expert ids on ``device`` (``(rows,)``: one per row), else
    :class:`EntrotrainError`. Values are not read (no host sync)."""
    check_tensor(chosen, "chosen", integer=True)
    if chosen.dim() == 1:
        chosen = chosen[:, None]
    if chosen.dim() != 2 or chosen.shape[0] != n_rows or chosen.shape[1] == 0:
        raise EntrotrainError(
            f"chosen must hold the (rows, k) ids of the experts picked for each of the {n_rows} router rows, got "
            f"shape {tuple(chosen.shape)}."
        )
    return chosen.to(device=device, dtype=torch.long)


def router_values(sums: RouterSums, *, dead_threshold: float = 0.0) -> RouterValues:
    r"""Means and distributions from (summed) :class:`RouterSums`.

    .. math::

        \bar H = \frac{1}{R}\sum_r H(p_r),\quad \bar H / \ln E,\quad f_e = \frac{c_e}{\sum_j c_j},\quad
        H(f) = -\sum_e f_e \ln f_e,\quad \mathrm{dead} = \frac{1}{E}\,\#\{e : c_e = 0 \text{ or } f_e <
        \text{dead\_threshold}\}

    Args:
        sums: one layer's statistics (summed over micro-batches / ranks).
        dead_threshold: load share :math:`f_e` (absolute, in ``[0, 1]``) below which an expert counts as dead;
            ``0`` (default) = only experts that received **no** top-k assignment. For a relative rule use e.g.
            ``0.1 / E`` (a tenth of the balanced share).

    Returns:
        :class:`RouterValues`; every mean / distribution is NaN when ``sums.rows == 0`` (nothing to average).
    """
    if not isinstance(sums, RouterSums):
        raise EntrotrainError(
            f"sums must be the RouterSums that router_statistics returns (summed with .merged() or "
            f"RouterSums.from_flat after an all-reduce), got {type(sums).__name__}."
        )
    dead_threshold = check_real(dead_threshold, "dead_threshold", low=0.0, high=1.0)
    n_experts = sums.n_experts
    rows = sums.rows.double()
    nan = torch.full((), math.nan, dtype=torch.float64, device=rows.device)
    has = rows > 0
    denom = torch.where(has, rows, torch.ones_like(rows))
    log_e = math.log(n_experts) if n_experts > 1 else 0.0

    def mean(x: Tensor) -> Tensor:
        return torch.where(has, x.double() / denom, nan)

    entropy = mean(sums.entropy)
    total = sums.load_counts.double().sum()
    load = torch.where(has, sums.load_counts.double() / torch.where(total > 0, total, torch.ones_like(total)), nan)
    importance = torch.where(has, sums.prob_mass.double() / denom, nan)
    safe = torch.where(load > 0, load, torch.ones_like(load))
    load_entropy = torch.where(has, -(torch.where(load > 0, load * safe.log(), torch.zeros_like(load))).sum(), nan)
    dead = (sums.load_counts <= 0) | (load < dead_threshold)
    dead_frac = torch.where(has, dead.double().mean(), nan)
    return RouterValues(
        entropy=entropy,
        entropy_norm=entropy / log_e if log_e > 0 else entropy * 0,
        tsallis=mean(sums.tsallis),
        load=load,
        importance=importance,
        load_entropy=load_entropy,
        load_entropy_norm=load_entropy / log_e if log_e > 0 else load_entropy * 0,
        dead_frac=dead_frac,
        top1_margin=mean(sums.top1_margin),
        topk_margin=mean(sums.topk_margin),
        rows=rows,
        nonfinite=sums.nonfinite.double(),
    )
