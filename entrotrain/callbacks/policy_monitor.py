r"""RL policy entropy, its covariance driver and the entropy–reward law, live in a Lightning ``Trainer``.

Cui et al. (2025), "The Entropy Mechanism of Reinforcement Learning for Reasoning Language Models": policy entropy
drains early in RL fine-tuning, driven by the covariance between a token's log-probability and its advantage
(:math:`\Delta H \approx -\eta\,\mathrm{Cov}(\log\pi, A)`), and reward follows :math:`R = -a e^{H} + b`, so a
collapsed policy has hit its ceiling :math:`b - a`. This callback shows all three without an extra forward: it
reads the per-token tensors that ``training_step`` already computed (from the rollout's old-policy pass) out of
the dict ``training_step`` returns.

What ``training_step`` returns (names configurable with ``keys``)::

    return {"loss": ...,                 # as usual (optional under manual optimisation)
            "token_entropy": H,          # (B, T) per-token entropy of the sampling distribution, no grad
            "logprobs": logp,            # (B, T) sampled tokens' log-probs under the rollout policy
            "advantages": A,             # (B, T) or (B,)
            "response_mask": mask,       # (B, T) bool: response tokens (no prompt, no padding)
            "rewards": r,                # (B,) optional: enables the R = -a exp(H) + b fit
            "temperature": T,            # optional float: the temperature H was computed at (logged beside it)
            "post_token_entropy": H2,    # optional (B, T): entropy after this step's updates (realised ΔH)
            "phase_ids": phases}         # optional (B, T) int: phase of each token (-1: none), e.g. PEARShaping's

Logged keys (``{p}`` = ``prefix``, default ``entropy/policy/``), all reduced over DDP ranks exactly as one
process on the concatenated batch:

===============================  ====================================================================================
``{p}mean``                      mean token entropy under ``agg`` (verl's aggregation modes), nats
``{p}p10|p50|p90``               quantiles of the valid tokens' entropies (linear interpolation)
``{p}top{q}_mean``               mean entropy of the top ``top_fraction`` of tokens (the "forking" minority)
``{p}seq_mean``                  mean over sequences of the per-sequence mean entropy
``{p}temperature``               the sampling temperature the entropies are at (when given)
``{p}tokens``                    valid tokens scored
``{p}cov_mean``                  mean of :math:`\mathrm{Cov}_i = (\log\pi_i - \overline{\log\pi})(A_i - \bar A)`
``{p}cov_pos_frac``              fraction of tokens with :math:`\mathrm{Cov}_i > 0` (they lower entropy)
``{p}cov_top{k}_share``          share of the positive covariance held by the top ``cov_top_fraction`` of tokens
``{p}delta``                     realised entropy change (after − before this step's updates, or since the last
                                 logged step)
``{p}delta_predicted``           :math:`-\hat\eta\,\mathrm{Cov}` for the same interval, :math:`\hat\eta` fitted on
                                 earlier intervals (an honest out-of-sample prediction)
``{p}eta_eff``, ``{p}delta_corr``  the fitted :math:`\hat\eta` and the correlation of predicted and realised ΔH
``{p}reward_mean``               mean reward of the batch
``{p}fit_a|fit_b|fit_ceiling``   least-squares :math:`R = -a e^{H} + b` over the logged steps, ceiling :math:`b - a`
``{p}fit_r2``                    its :math:`R^2`
``{p}fit_extrapolation``         how far H = 0 lies outside the fitted entropies, in spans of :math:`e^H`
                                 (:func:`~entrotrain.functional.entropy_reward_fit.fit_extrapolation`)
``{p}fit_shown``                 1 when the ceiling is a prediction (at least 8 points, R² ≥ 0.5, extrapolation
                                 ≤ 1, within one span of the observed reward means), else 0: the report,
                                 ``entrotrain status`` and the end-of-run table then print it with the reasons,
                                 never as a headline (:func:`~entrotrain.functional.entropy_reward_fit.ceiling_verdict`)
``{p}nonfinite``                 valid tokens with NaN/Inf entropy: counted, warned about, never averaged in
``{p}reward_nonfinite``          NaN/Inf rewards (when ``rewards`` given): dropped from ``reward_mean`` and the fit
``{p}hist`` (wandb)              histogram of the token entropies
===============================  ====================================================================================

Token-level shaping statistics (ARES/AEPO window entropy, PEAR phases; off unless asked for, so the keys of existing
runs do not change), over the valid tokens with a finite entropy, on the union batch of all ranks:

===============================  ====================================================================================
``{p}window_mean``               mean window entropy (:func:`~entrotrain.functional.token_shaping.window_entropy`,
                                 ``window`` tokens, ``window_align``), over positions whose window holds a token
``{p}window_p50|p90``            its quantiles (linear interpolation)
``{p}hwe_frac``                  fraction of those positions with window entropy ``>= hwe_threshold`` (HWE tokens)
``{p}phase{k}/mean``             token-mean entropy of phase ``k`` over the batch (when ``training_step`` returns
                                 ``phase_ids (B, T)``; a phase with no token this batch is not logged)
``{p}phase{k}/length``           mean tokens of phase ``k`` per response (0 when empty)
``{p}entropy_length_corr``       Pearson correlation over responses of the per-response token-mean entropy and the
                                 response length (PEAR's observation; ``entropy_length_corr=True``)
===============================  ====================================================================================

Pair it with :class:`~entrotrain.callbacks.EntropyCollapseGuard` (``monitor="entropy/policy/mean"``) for alerts.

Non-finite data (DESIGN.md §8): NaN/Inf tokens and rewards are counted, warned about once per fit and left out of
every statistic; a statistic that cannot be computed at a logging batch (no finite token, no finite reward) goes to
``trainer.callback_metrics`` as NaN and to no logger. The state (history, ΔH pairs, the fit's points) only ever takes
finite values, so one NaN never poisons ``delta_predicted``, ``eta_eff`` or the fit of later batches. Per-fit state
is reset in ``setup`` of every ``fit`` and restored from the checkpoint on resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from entrotrain._validation import (
    check_bool, check_choice, check_int, check_real, check_shape, check_tensor, token_mask,
)
from entrotrain.callbacks._nonfinite import NonFiniteCounter, is_finite_number
from entrotrain.callbacks._lifecycle import PerFitCallback
from entrotrain.callbacks._logging_window import LoggingWindow
from entrotrain.callbacks._publish import publish_scalars
from entrotrain.dashboards.run_record import RecordArray, record_arrays
from entrotrain.errors import EntrotrainError
from entrotrain.functional.entropy_reward_fit import EntropyRewardFit, ceiling_verdict, fit_entropy_reward
from entrotrain.functional._dist import gather_padded_dict, world as dist_world
from entrotrain.functional.policy import AGG_MODES, aggregate_loss, policy_covariance, quantile
from entrotrain.functional.token_shaping import WINDOW_ALIGNS, phase_entropy, window_entropy

__all__ = ["PolicyEntropyMonitor", "policy_entropy_summary"]

#: What a logging batch gathers across ranks, and the padding of shorter sequences.
_GATHERED = (
    ("entropy", 0.0), ("logprobs", 0.0), ("advantages", 0.0), ("mask", False), ("post_entropy", 0.0), ("rewards", 0.0),
    ("phase_ids", -1),
)
#: The tensors every batch has; the others of :data:`_GATHERED` are optional.
_REQUIRED = ("entropy", "logprobs", "advantages", "mask")


def gather_union(
    found: Mapping[str, Tensor | None], temperature: Any, given: Callable[[str], str], where: str,
    refusal: EntrotrainError | None = None, refused: str = "could not read their batch",
) -> dict[str, Tensor]:
    """The union batch over ranks of this rank's tensors ``found`` (by the names of :data:`_GATHERED`; ``None`` or
    missing: not given), on the host: every rank's rows in rank order, shorter sequences padded (masked out). ``{}``
    when no rank gave any.

    Under ``torch.distributed`` with 2+ ranks the ranks first exchange what each holds (one ``all_gather_object`` of
    the names, dtypes and shapes, and ``temperature``: :func:`~entrotrain.functional._dist.gather_padded_dict`), then
    gather each tensor once. The statistics of the union are one process's only when every rank gave the same
    tensors, so a tensor that some ranks gave and others did not (``rewards`` on one rank: a reward mean and fit over
    a part of the batch) or different temperatures are an error on every rank alike, never a rank left waiting in a
    gather the others skipped. One process: ``found`` as it is, no collective.

    Args:
        given: the phrase for a rank that gave the tensor named (``"returned 'rewards' from training_step"``).
        where: the start of the error message after ``PolicyEntropyMonitor`` (``" at batch 4"``).
        refusal: this rank refused its tensors (``found`` empty; e.g. it could not read its batch): sent with the
            exchange, so that every rank raises the same error, naming the rank(s) that refused and quoting the
            first one's refusal (``refusal`` itself with one process). Refused on one rank alone, it would leave the
            others waiting in the gather.
        refused: the phrase for what such a rank did (``"could not read their batch"``).

    Raises:
        EntrotrainError: a rank refused its tensors, the ranks did not all give the same tensors, or gave different
            temperatures.
    """
    def check(held: list[frozenset[str]], extras: list[Any]) -> None:  # before any tensor is gathered
        refusals = [(rank, text) for rank, (_, text) in enumerate(extras) if text is not None]
        if refusal is not None and len(extras) == 1:
            raise refusal
        if refusals:  # the same error on every rank
            raise EntrotrainError(f"PolicyEntropyMonitor{where}: rank(s) {[rank for rank, _ in refusals]} {refused} "
                                  f"(raised on every rank): rank {refusals[0][0]}: {refusals[0][1]}")
        temperatures = [t for t, _ in extras]
        for name in ("entropy", *(name for name, _ in _GATHERED if name not in _REQUIRED)):
            ranks = [rank for rank, names in enumerate(held) if name in names]
            if 0 < len(ranks) < len(held):
                raise EntrotrainError(f"PolicyEntropyMonitor{where}: rank(s) {ranks} {given(name)} and the others did "
                                      "not. " + _ALIKE)
        if len({repr(t) for t in temperatures}) > 1:
            raise EntrotrainError(f"PolicyEntropyMonitor{where}: the ranks gave the temperatures {temperatures} (in "
                                  "rank order). " + _ALIKE)

    temperature = None if temperature is None else float(temperature)
    with torch.no_grad():
        batch = gather_padded_dict({name: found.get(name) for name, _ in _GATHERED}, dict(_GATHERED),
                                   (temperature, None if refusal is None else str(refusal)), check)
    return {name: value.cpu() for name, value in batch.tensors.items()}  # one device -> host transfer per tensor


_ALIKE = (
    "Under torch.distributed the tensors of every rank are gathered and the statistics computed on their union, as "
    "one process on the whole batch, so every rank gives the same tensors at the same steps, each optional one "
    "(rewards, post-update entropy, phase ids) on every rank or on none, at the same temperature; a rank with no "
    "sample this step gives empty (0, T) tensors of the same dtypes."
)


def _cat_padded(parts: list[Tensor], fill: float | bool) -> Tensor:
    """Concatenate along dim 0, trailing dims padded with ``fill``: ``(B_i, T_i)`` → ``(ΣB_i, max T_i)``."""
    if len(parts) == 1:
        return parts[0]
    if len({p.dim() for p in parts}) != 1:
        raise EntrotrainError(
            "PolicyEntropyMonitor: the micro-batches of an accumulated step returned tensors of different ranks "
            f"{[tuple(p.shape) for p in parts]}; return the same shapes from every training_step."
        )
    trailing = [max(p.shape[d] for p in parts) for d in range(1, parts[0].dim())]
    out = []
    for p in parts:
        if list(p.shape[1:]) != trailing:
            padded = torch.full((p.shape[0], *trailing), fill, dtype=p.dtype, device=p.device)
            padded[tuple(slice(0, n) for n in p.shape)] = p
            p = padded
        out.append(p)
    return torch.cat(out)


def _pooled(micro_batches: list[dict[str, Any]], keys: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One batch from the micro-batches of an accumulated optimizer step: each tensor concatenated over them (padded
    as across DDP ranks); the temperature they share.

    As across DDP ranks (:func:`gather_union`), an optional tensor (``rewards``, ``post_token_entropy``,
    ``phase_ids``) that some micro-batches returned and others did not, or different temperatures, is an
    :class:`~entrotrain.errors.EntrotrainError` naming the key and the micro-batches (0-based within the step):
    pooling the ones that have it would report a reward mean, fit, ΔH or phase statistic of part of the step under
    the step's name, and dropping it (as before) hid the statistic without a word. ``keys`` maps the logical names
    to the user's ``training_step`` keys for the message."""
    keys = keys or {}
    pooled: dict[str, Any] = dict(micro_batches[-1])
    for name, fill in _GATHERED:
        parts = [found[name] for found in micro_batches]
        held = [i for i, p in enumerate(parts) if p is not None]
        if 0 < len(held) < len(parts):
            lacking = [i for i in range(len(parts)) if i not in held]
            raise EntrotrainError(
                f"PolicyEntropyMonitor: under gradient accumulation micro-batch(es) {held} of the optimizer step "
                f"returned {keys.get(name, name)!r} from training_step and micro-batch(es) {lacking} did not; the "
                f"micro-batches of a step are pooled into one batch, so return {keys.get(name, name)!r} from every "
                "training_step of the step or from none (a part would be reported as the whole step)."
            )
        pooled[name] = None if not held else _cat_padded([p.detach() for p in parts], fill)
    temperatures = [found.get("temperature") for found in micro_batches]
    if len({repr(None if t is None else float(t)) for t in temperatures}) > 1:
        raise EntrotrainError(
            f"PolicyEntropyMonitor: under gradient accumulation the micro-batches of the optimizer step returned the "
            f"temperatures {[None if t is None else float(t) for t in temperatures]} as "
            f"{keys.get('temperature', 'temperature')!r}; the step is pooled into one batch at one temperature, so "
            "return the same one from every training_step of the step."
        )
    return pooled


_DEFAULT_KEYS = {
    "entropy": "token_entropy",
    "logprobs": "logprobs",
    "advantages": "advantages",
    "mask": "response_mask",
    "rewards": "rewards",
    "temperature": "temperature",
    "post_entropy": "post_token_entropy",
    "phase_ids": "phase_ids",
}


def _pct(fraction: float) -> str:
    return f"{100 * fraction:g}".replace(".", "_")


def policy_entropy_summary(
    entropy: Tensor,
    logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    agg: str = "token-mean",
    top_fraction: float = 0.2,
    cov_top_fraction: float = 0.02,
    max_length: int | None = None,
) -> dict[str, float]:
    r"""Entropy and covariance statistics of one RL batch (keys as in the module docstring, without prefix).

    Args:
        entropy: ``(B, T)`` per-token entropies.
        logprobs: ``(B, T)`` log-probabilities of the sampled tokens.
        advantages: ``(B, T)`` or ``(B,)``.
        mask: ``(B, T)`` valid (response) tokens.
        agg: aggregation mode of ``mean`` (see :func:`entrotrain.functional.aggregate_loss`).
        top_fraction: the high-entropy minority averaged in ``top{q}_mean``.
        cov_top_fraction: the top-covariance tokens whose share of the positive covariance is reported.
        max_length: the constant length :math:`L` of ``agg="seq-mean-token-sum-norm"`` (``None``: the padded
            width ``T``); the other modes do not read it.

    Returns:
        ``mean``, ``p10``, ``p50``, ``p90``, ``top{q}_mean``, ``seq_mean``, ``tokens``, ``nonfinite``, ``cov_mean``,
        ``cov_pos_frac``, ``cov_top{k}_share`` (NaN-free; entropy keys absent when no token is valid and finite).
        Tokens with a NaN/Inf entropy, log-prob or advantage are counted in ``nonfinite`` and left out.

    Raises:
        EntrotrainError: a tensor of the wrong kind or shape, an unknown ``agg``, a fraction outside ``(0, 1]``.
    """
    check_tensor(entropy, "entropy", floating=True, ndim=2, layout="(batch, tokens)")
    shape = tuple(entropy.shape)
    check_shape(check_tensor(logprobs, "logprobs", floating=True), shape, "logprobs", like="the entropy")
    mask = token_mask(mask, shape, "mask", like="the entropy")  # the policy code's one rule (values read)
    check_tensor(advantages, "advantages", floating=True, ndim=(1, 2))
    check_shape(advantages, shape[: advantages.dim()], "advantages", like="(B,) or (B, T) of the entropy")
    check_choice(agg, "agg", AGG_MODES)
    check_real(top_fraction, "top_fraction", low=0.0, low_open=True, high=1.0)
    check_real(cov_top_fraction, "cov_top_fraction", low=0.0, low_open=True, high=1.0)
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(entropy)
    finite = torch.isfinite(entropy) & torch.isfinite(logprobs) & torch.isfinite(advantages)
    valid = mask & finite
    out: dict[str, float] = {"nonfinite": float((mask & ~finite).sum()), "tokens": float(valid.sum())}
    if not bool(valid.any()):
        return out
    h = entropy.double()
    out["mean"] = float(aggregate_loss(torch.where(valid, h, 0.0), valid, agg, max_length=max_length))
    values = h[valid]
    for q in (0.1, 0.5, 0.9):
        out[f"p{round(100 * q)}"] = float(quantile(values, q))
    k = max(1, math.ceil(top_fraction * values.numel()))
    out[f"top{_pct(top_fraction)}_mean"] = float(values.topk(k).values.mean())
    out["seq_mean"] = float(aggregate_loss(torch.where(valid, h, 0.0), valid, "seq-mean-token-mean"))
    cov = policy_covariance(torch.where(valid, logprobs.double(), 0.0), advantages.double(), valid)[valid]
    out["cov_mean"] = float(cov.mean())
    out["cov_pos_frac"] = float((cov > 0).double().mean())
    positive = cov.clamp_min(0)
    total = float(positive.sum())
    k = max(1, math.ceil(cov_top_fraction * cov.numel()))
    top = float(positive.topk(k).values.sum())
    out[f"cov_top{_pct(cov_top_fraction)}_share"] = top / total if total > 0 else 0.0
    return out


def _pearson(x: list[float], y: list[float]) -> float:
    a = torch.tensor(x, dtype=torch.float64)
    b = torch.tensor(y, dtype=torch.float64)
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else float("nan")


class PolicyEntropyMonitor(PerFitCallback):
    r"""Logs RL policy entropy, the covariance term and the entropy–reward fit every ``every_n_batches`` batches.

    Reads the tensors ``training_step`` returns (see the module docstring), detached; no hook, no extra forward.
    Under DDP the batches of all ranks are gathered once per logging batch and every statistic is computed on their
    concatenation (so 2 ranks report exactly what one process on the union batch would): the ranks first exchange
    which tensors they returned (one small ``all_gather_object``), and an optional tensor (``rewards``,
    ``post_token_entropy``, ``phase_ids``) or a ``temperature`` that not every rank returned alike, or a rank whose
    ``training_step`` output cannot be read, raises an :class:`~entrotrain.errors.EntrotrainError` on every rank
    (:func:`gather_union`). Nothing runs on batches that do not log.

    Args:
        every_n_batches: log at training batches ``0, n, 2n, ...`` (a batch is one rollout in
            :class:`~entrotrain.tasks.GRPOTask`, whatever the number of optimizer steps it takes). Under gradient
            accumulation (``Trainer(accumulate_grad_batches=k)``, ``k > 1``) the ``k`` micro-batches of an optimizer
            step are pooled into one batch: logged at optimizer steps ``0, n, 2n, ...`` (``batch`` = that step); an
            optional tensor that only some of them return, or different temperatures, raises an
            :class:`~entrotrain.errors.EntrotrainError` naming the key and the micro-batches.
        agg: the loss-aggregation mode ``mean`` uses: ``"token-mean"``, ``"seq-mean-token-sum"``,
            ``"seq-mean-token-mean"`` or ``"seq-mean-token-sum-norm"`` (name the one your loss uses).
        agg_max_length: the constant length :math:`L` of ``agg="seq-mean-token-sum-norm"`` (Dr. GRPO's / TRL
            ``dr_grpo``'s ``max_completion_length``, a loss's ``max_length``); ``None``: the padded width ``T`` of the
            logged batch, which depends on its longest response. Refused with another ``agg``.
        top_fraction: the high-entropy minority reported as ``top{q}_mean`` (0.2: Wang et al.'s 80/20).
        cov_top_fraction: the top-covariance tokens whose share of the positive covariance is reported.
        fit_min_points: logged steps needed before ``R = -a exp(H) + b`` is fitted (needs ``rewards``).
        keys: rename the ``training_step`` output keys, e.g. ``{"mask": "completion_mask"}``. Logical names:
            ``entropy``, ``logprobs``, ``advantages``, ``mask``, ``rewards``, ``temperature``, ``post_entropy``,
            ``phase_ids``.
        log_media: log a histogram of the token entropies when a ``WandbLogger`` is attached (rank zero).
        prefix: key prefix.
        print_summary: print the first and last logged values and the fit when training ends (rank zero).
        window: log the window-entropy / HWE statistics with windows of this many tokens (ARES: 4); None: off.
        window_align: ``"forward"`` (ARES: the next ``window`` tokens, anchor excluded), ``"trailing"`` or
            ``"centred"``.
        hwe_threshold: the window entropy (nats) at or above which a position is an HWE token (ARES's fallback
            :math:`\tau` = 1.5; its trainer adapts :math:`\tau`, so read ``window_p90`` too).
        entropy_length_corr: log the correlation of response entropy and length.
        n_phases: the number of phases in ``phase_ids`` (None: the largest id in the batch + 1, at least 2).

    Raises:
        EntrotrainError: on invalid arguments, and at the first logging batch when ``training_step`` did not
            return the tensors (naming the missing keys and the fix).
    """

    def __init__(
        self,
        every_n_batches: int = 1,
        agg: str = "token-mean",
        top_fraction: float = 0.2,
        cov_top_fraction: float = 0.02,
        fit_min_points: int = 5,
        keys: dict[str, str] | None = None,
        log_media: bool = True,
        prefix: str = "entropy/policy/",
        print_summary: bool = True,
        window: int | None = None,
        window_align: str = "forward",
        hwe_threshold: float = 1.5,
        entropy_length_corr: bool = False,
        n_phases: int | None = None,
        agg_max_length: int | None = None,
    ) -> None:
        check_int(every_n_batches, "every_n_batches", low=1)
        check_choice(agg, "agg", AGG_MODES)
        check_int(agg_max_length, "agg_max_length", low=1, none_ok=True)
        if agg_max_length is not None and agg != "seq-mean-token-sum-norm":
            raise EntrotrainError(
                f"agg_max_length is the constant length of agg='seq-mean-token-sum-norm', got "
                f"agg_max_length={agg_max_length} with agg={agg!r}, which does not use it. Fix: "
                "agg='seq-mean-token-sum-norm', or agg_max_length=None."
            )
        check_real(top_fraction, "top_fraction", low=0.0, low_open=True, high=1.0)
        check_real(cov_top_fraction, "cov_top_fraction", low=0.0, low_open=True, high=1.0)
        check_int(fit_min_points, "fit_min_points (a line needs two points)", low=2)
        unknown = set(keys or {}) - set(_DEFAULT_KEYS)
        if unknown:
            raise EntrotrainError(f"unknown keys {sorted(unknown)}: the logical names are {sorted(_DEFAULT_KEYS)}.")
        self.every_n_batches = every_n_batches
        self.agg = agg
        self.agg_max_length = agg_max_length
        self.top_fraction = top_fraction
        self.cov_top_fraction = cov_top_fraction
        self.fit_min_points = fit_min_points
        self.keys = {**_DEFAULT_KEYS, **(keys or {})}
        self.log_media = log_media
        self.prefix = prefix
        self.print_summary = print_summary
        self.window = check_int(window, "window", low=1, none_ok=True)
        self.window_align = check_choice(window_align, "window_align", WINDOW_ALIGNS)
        self.hwe_threshold = check_real(hwe_threshold, "hwe_threshold")
        self.entropy_length_corr = check_bool(entropy_length_corr, "entropy_length_corr")
        self.n_phases = check_int(n_phases, "n_phases", low=1, none_ok=True)
        self._nonfinite = NonFiniteCounter("PolicyEntropyMonitor", f"{prefix}nonfinite")
        self._window = LoggingWindow(every_n_batches)
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        """Empty history, ΔH pairs, fit points, first/last values and warnings (every fit starts afresh)."""
        # history["entropy"], ["cov"]: one finite value per logged batch; ["reward"], ["reward_entropy"]: the fit's
        # points, one per logged batch with a finite reward mean (paired, so a batch without rewards shifts nothing)
        self.history: dict[str, list[float]] = {
            "batch": [], "entropy": [], "reward": [], "reward_entropy": [], "cov": []
        }
        self.delta_pairs: dict[str, list[float]] = {"cov": [], "delta": []}
        self.first_logged: dict[str, float] | None = None
        self.last_logged: dict[str, float] = {}
        self._nonfinite.reset()
        self._window.close()
        self._pending: list[dict[str, Any]] = []  # the micro-batches of the open accumulation window

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": self.history,
            "delta_pairs": self.delta_pairs,
            "first_logged": self.first_logged,
            "last_logged": self.last_logged,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reset_fit_state()
        history = state_dict["history"]
        self.history["batch"] = list(history.get("batch", []))
        self.history["entropy"] = list(history["entropy"])
        self.history["cov"] = list(history["cov"])
        # older checkpoints kept one reward per logged entropy (NaN where none): pair them and keep finite points
        points = zip(history.get("reward_entropy", history["entropy"]), history["reward"])
        kept = [(h, r) for h, r in points if is_finite_number(h) and is_finite_number(r)]
        self.history["reward_entropy"] = [h for h, _ in kept]
        self.history["reward"] = [r for _, r in kept]
        pairs = zip(state_dict["delta_pairs"]["cov"], state_dict["delta_pairs"]["delta"])
        finite = [(c, d) for c, d in pairs if is_finite_number(c) and is_finite_number(d)]
        self.delta_pairs = {"cov": [c for c, _ in finite], "delta": [d for _, d in finite]}
        self.first_logged = state_dict.get("first_logged")
        self.last_logged = dict(state_dict.get("last_logged") or {})

    # ------------------------------------------------------------------ read the batch
    def _tensors(self, outputs: Any) -> dict[str, Any]:
        required = ("entropy", "logprobs", "advantages", "mask")
        if not isinstance(outputs, Mapping) or any(self.keys[k] not in outputs for k in required):
            have = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise EntrotrainError(
                "PolicyEntropyMonitor reads per-token tensors from what training_step returns, but got "
                f"{have}. Return a dict with {[self.keys[k] for k in required]} ((B, T) tensors from the rollout's "
                f"old-policy pass; advantages may be (B,)) and optionally {self.keys['rewards']!r} (B,), or map "
                "your names with keys={...}."
            )
        found = {k: outputs.get(self.keys[k]) for k in self.keys}
        entropy = found["entropy"]
        for k in ("logprobs", "mask", "post_entropy", "phase_ids"):
            t = found[k]
            if t is not None and (not isinstance(t, Tensor) or t.shape != entropy.shape):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise EntrotrainError(
                    f"PolicyEntropyMonitor: {self.keys[k]!r} has shape {shape}, expected {tuple(entropy.shape)} like "
                    f"{self.keys['entropy']!r}."
                )
        if entropy.dim() != 2:
            raise EntrotrainError(
                f"PolicyEntropyMonitor: {self.keys['entropy']!r} must be (B, T), got {tuple(entropy.shape)}; "
                "reshape sequences to rows."
            )
        adv = found["advantages"]
        if adv.dim() == 1:
            adv = adv[:, None].expand_as(entropy)
        if adv.shape != entropy.shape:
            raise EntrotrainError(
                f"PolicyEntropyMonitor: {self.keys['advantages']!r} has shape {tuple(adv.shape)}, expected (B,) or "
                f"{tuple(entropy.shape)}."
            )
        found["advantages"] = adv
        rewards = found["rewards"]
        if rewards is not None:
            rewards = torch.as_tensor(rewards).detach().flatten()
            if rewards.numel() != entropy.shape[0]:
                raise EntrotrainError(
                    f"PolicyEntropyMonitor: {self.keys['rewards']!r} needs one reward per sequence "
                    f"({entropy.shape[0]}), got {rewards.numel()} values."
                )
            found["rewards"] = rewards
        return found

    def _read(self, trainer: Trainer, outputs: Any) -> dict[str, Any] | EntrotrainError:
        """:meth:`_tensors`; with 2+ ranks, its error is returned instead of raised, for :func:`gather_union` to raise
        on every rank (raised here, on one rank, it would leave the others waiting in the gather)."""
        try:
            return self._tensors(outputs)
        except EntrotrainError as error:
            if dist_world()[1] < 2:
                raise
            return error

    def _pool(self, micro_batches: list[dict[str, Any]]) -> dict[str, Any] | EntrotrainError:
        """:func:`_pooled`; with 2+ ranks its error is returned, as :meth:`_read`'s, for every rank to raise."""
        try:
            return _pooled(micro_batches, self.keys)
        except EntrotrainError as error:
            if dist_world()[1] < 2:
                raise
            return error

    # ------------------------------------------------------------------ per batch
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.sanity_checking or trainer.accumulate_grad_batches == 1:
            return
        if self._window.begin(trainer.global_step):  # the first micro-batch of a logging optimizer step
            self._pending = []

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.sanity_checking:
            return
        if trainer.accumulate_grad_batches > 1:
            # gradient accumulation: the micro-batches of one optimizer step are one logged batch (logged once, at
            # the step Lightning logs it at; one row per micro-batch would log the same step several times)
            if not self._window.open:
                return
            self._pending.append(self._read(trainer, outputs))
            index = self._window.end(trainer.global_step)
            if index is None:  # more micro-batches to come
                return
            refused = [part for part in self._pending if isinstance(part, EntrotrainError)]
            found, self._pending = (refused[0] if refused else self._pool(self._pending)), []
        else:
            index = trainer.fit_loop.epoch_loop.total_batch_idx
            if index % self.every_n_batches:
                return
            found = self._read(trainer, outputs)
        # under DDP: every rank's rows, T padded with masked-out tokens (the mask pads with False), once the ranks
        # agree on which tensors they hold (an optional one on some ranks only, or a rank whose training_step output
        # could not be read: an error on every rank)
        refusal = found if isinstance(found, EntrotrainError) else None
        found = {} if refusal is not None else found
        tensors = gather_union(found, found.get("temperature"), lambda name: f"returned {self.keys[name]!r} from "
                               "training_step", f" at batch {index}", refusal=refusal)
        summary, arrays = self._summary_and_arrays(tensors, index, temperature=found["temperature"])
        metrics = {self.prefix + k: v for k, v in summary.items()}
        if "mean" not in summary:  # NaN to trainer.callback_metrics, never to a logger
            publish_scalars(trainer, pl_module, metrics, source=self.state_key)
            return
        step = publish_scalars(trainer, pl_module, metrics, source=self.state_key)
        record_arrays(trainer, arrays, step)
        if self.log_media and trainer.is_global_zero:
            self._log_media(trainer, arrays[0].array, step)

    def _checked(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """``tensors`` with the mask as bool, by the policy code's one rule (:func:`~entrotrain._validation.token_mask`;
        host tensors: reading its values syncs nothing)."""
        return {**tensors, "mask": token_mask(tensors["mask"], tensors["entropy"].shape, self.keys["mask"],
                                              like="the entropy")}

    def _summary_and_arrays(
        self, tensors: dict[str, Tensor], index: int, *, temperature: float | Tensor | None = None, unit: str = "batch"
    ) -> tuple[dict[str, float], list[RecordArray]]:
        """:meth:`summarise` and :meth:`record_arrays` of one logging step with the mask read once (this callback and
        the loop / TRL recorder); no arrays when the summary has no ``mean``."""
        tensors = self._checked(tensors)
        summary = self._summarise(tensors, index, temperature=temperature, unit=unit)
        return summary, (self._arrays(tensors) if "mean" in summary else [])

    def record_arrays(self, tensors: dict[str, Tensor]) -> list[RecordArray]:
        """The run record's arrays of a logging step from its union batch: the histogram of the valid, finite token
        entropies (non-finite ones are counted in ``nonfinite``, not drawn)."""
        return self._arrays(self._checked(tensors))

    def _arrays(self, tensors: dict[str, Tensor]) -> list[RecordArray]:
        """:meth:`record_arrays` of tensors whose mask :meth:`_checked` made bool."""
        shown = tensors["entropy"][tensors["mask"] & torch.isfinite(tensors["entropy"])]
        return [RecordArray(f"{self.prefix}hist", shown, "histogram")]

    def summarise(
        self, tensors: dict[str, Tensor], index: int, *, temperature: float | Tensor | None = None, unit: str = "batch"
    ) -> dict[str, float]:
        """The statistics of one logging step, from the union batch's host tensors (``entropy``, ``logprobs``,
        ``advantages``, ``mask``, optional ``rewards``, ``post_entropy``, ``phase_ids``): the Lightning-free core this
        callback and the TRL integration share, so both give the same value under the same key.

        Counts non-finite tokens, adds the reward mean, the realised and predicted ΔH, the token-shaping statistics
        and the entropy–reward fit, and updates the first/last values. Returns the summary (unprefixed); without
        ``mean`` when no valid, finite response token was there (warned once per fit).
        """
        return self._summarise(self._checked(tensors), index, temperature=temperature, unit=unit)

    def _summarise(
        self, tensors: dict[str, Tensor], index: int, *, temperature: float | Tensor | None = None, unit: str = "batch"
    ) -> dict[str, float]:
        """:meth:`summarise` of tensors whose mask :meth:`_checked` made bool."""
        with torch.no_grad():
            summary = policy_entropy_summary(
                tensors["entropy"],
                tensors["logprobs"],
                tensors["advantages"],
                tensors["mask"],
                agg=self.agg,
                top_fraction=self.top_fraction,
                cov_top_fraction=self.cov_top_fraction,
                max_length=self.agg_max_length,
            )
        bad_tokens = "response tokens had NaN/Inf entropy, log-prob or advantage"
        self._nonfinite.add(summary["nonfinite"], bad_tokens, f"{unit} {index}")
        if temperature is not None:
            summary["temperature"] = float(temperature)
        if "rewards" in tensors:
            self._reward_mean(summary, tensors["rewards"], index)
        if "mean" not in summary:
            self._nonfinite.warn_once(
                "empty",
                f"{type(self).__name__}: {unit} {index} has no valid, finite response token; its entropy statistics "
                "are not logged (NaN in trainer.callback_metrics). This warning is shown once per fit.",
            )
            return summary
        self._dynamics(summary, tensors)
        self._shaping(summary, tensors)
        if "reward_mean" in summary:
            self._reward_fit(summary)
        self.last_logged = {"batch": float(index), **summary}
        if self.first_logged is None:
            self.first_logged = dict(self.last_logged)
        return summary

    def _dynamics(self, summary: dict[str, float], tensors: dict[str, Tensor]) -> None:
        """Realised ΔH beside the covariance prediction ``-η̂·Cov`` (η̂ fitted on earlier intervals only)."""
        pairs = self.delta_pairs
        if "post_entropy" in tensors:  # the change this batch's own updates made: pairs with this batch's Cov
            delta, cov = self._realised_delta(tensors), summary["cov_mean"]
        elif self.history["entropy"]:  # the change since the last logged batch: pairs with that batch's Cov
            delta, cov = summary["mean"] - self.history["entropy"][-1], self.history["cov"][-1]
        else:
            delta = cov = None
        if is_finite_number(delta) and is_finite_number(cov):  # the state takes finite values only
            summary["delta"] = delta
            x = torch.tensor(pairs["cov"], dtype=torch.float64)
            y = torch.tensor(pairs["delta"], dtype=torch.float64)
            sxx = float((x * x).sum())
            if len(pairs["cov"]) >= 2 and sxx > 0:  # least squares through the origin: ΔH = -η Cov
                eta = -float((x * y).sum()) / sxx
                summary["eta_eff"] = eta
                summary["delta_predicted"] = -eta * cov
            pairs["cov"].append(cov)
            pairs["delta"].append(delta)
            if len(pairs["cov"]) >= 3:
                corr = _pearson([-c for c in pairs["cov"]], pairs["delta"])
                if math.isfinite(corr):
                    summary["delta_corr"] = corr
        if is_finite_number(summary["mean"]) and is_finite_number(summary["cov_mean"]):
            self.history["entropy"].append(summary["mean"])
            self.history["cov"].append(summary["cov_mean"])

    def _shaping(self, summary: dict[str, float], tensors: dict[str, Tensor]) -> None:
        """Window / HWE statistics, per-phase entropy and length, the entropy–length correlation (when asked for).

        Tokens: valid (``mask``) with a finite entropy; lengths count every valid token."""
        mask = tensors["mask"]  # bool (summarise)
        h = tensors["entropy"].double()
        valid = mask & torch.isfinite(h)
        if self.window is not None:
            we = window_entropy(h, valid, self.window, align=self.window_align, return_counts=True)
            vals = we.mean[we.count > 0]
            if vals.numel():
                summary["window_mean"] = float(vals.mean())
                summary["window_p50"] = float(quantile(vals, 0.5))
                summary["window_p90"] = float(quantile(vals, 0.9))
                summary["hwe_frac"] = float((vals >= self.hwe_threshold).double().mean())
        phases = tensors.get("phase_ids")
        if phases is not None:
            phases = phases.long()
            top = int(phases[mask].max()) + 1 if bool(mask.any()) else 0
            n = self.n_phases if self.n_phases is not None else max(2, top)
            ph = phase_entropy(h, valid, phases, n_phases=n)
            lengths = phase_entropy(torch.zeros_like(h), mask, phases, n_phases=n).count.double()
            count = ph.count.double()
            rows = max(mask.shape[0], 1)
            for k in range(n):
                if count[:, k].sum() > 0:
                    summary[f"phase{k}/mean"] = float((ph.mean[:, k] * count[:, k]).sum() / count[:, k].sum())
                summary[f"phase{k}/length"] = float(lengths[:, k].sum() / rows)
        if self.entropy_length_corr:
            n_valid = valid.sum(1)
            keep = n_valid > 0
            if int(keep.sum()) >= 2:
                seq = torch.where(valid, h, 0.0).sum(1)[keep] / n_valid[keep]
                corr = _pearson(seq.tolist(), mask.sum(1)[keep].double().tolist())
                if math.isfinite(corr):
                    summary["entropy_length_corr"] = corr

    def _realised_delta(self, tensors: dict[str, Tensor]) -> float | None:
        """ΔH = H_after − H_before under ``agg``, both over the same tokens: valid, with finite entropy, log-prob,
        advantage and post-update entropy; ``None`` when no such token is left."""
        both = tensors["mask"].clone()  # bool (summarise)
        for name in ("entropy", "post_entropy", "logprobs", "advantages"):
            both &= torch.isfinite(tensors[name])
        if not bool(both.any()):
            return None
        agg, length = self.agg, self.agg_max_length
        h0, h1 = (torch.where(both, tensors[k].double(), 0.0) for k in ("entropy", "post_entropy"))
        before = aggregate_loss(h0, both, agg, max_length=length)
        after = aggregate_loss(h1, both, agg, max_length=length)
        return float(after - before)

    def _reward_mean(self, summary: dict[str, float], rewards: Tensor, index: int) -> None:
        """``reward_mean`` over the finite rewards, ``reward_nonfinite`` = how many were NaN/Inf (dropped)."""
        rewards = rewards.double()
        finite = torch.isfinite(rewards)
        summary["reward_nonfinite"] = self._nonfinite.add(float((~finite).sum()), "rewards were NaN/Inf", f"batch {index}")
        if bool(finite.any()):
            summary["reward_mean"] = float(rewards[finite].mean())

    def _reward_fit(self, summary: dict[str, float]) -> None:
        """Add this batch's (entropy, reward mean) point and fit ``R = -a exp(H) + b`` once there are enough."""
        self.history["reward_entropy"].append(summary["mean"])
        self.history["reward"].append(summary["reward_mean"])
        if len(self.history["reward"]) < self.fit_min_points:
            return
        try:
            fit = fit_entropy_reward(list(self.history["reward_entropy"]), list(self.history["reward"]))
        except EntrotrainError:  # all entropies equal so far: no slope yet
            return
        summary.update({"fit_a": fit.a, "fit_b": fit.b, "fit_ceiling": fit.ceiling})
        if math.isfinite(fit.r2):
            summary["fit_r2"] = fit.r2
        verdict = ceiling_verdict(fit, self.history["reward_entropy"], self.history["reward"])
        if math.isfinite(verdict.extrapolation):
            summary["fit_extrapolation"] = verdict.extrapolation
        summary["fit_shown"] = float(verdict.shown)

    def _log_media(self, trainer: Trainer, values: Tensor, step: int) -> None:
        from entrotrain.dashboards.wandb_media import histogram, wandb_loggers

        loggers = wandb_loggers(trainer.loggers)
        if not loggers or values.numel() == 0:
            return
        finite = values[torch.isfinite(values)]
        top = max(1e-6, float(finite.max())) if finite.numel() else 1.0
        media = {f"{self.prefix}hist": histogram(values, bins=30, range_=(0.0, top)), "trainer/global_step": step}
        for logger in loggers:
            logger.experiment.log(media)

    # ------------------------------------------------------------------ end of run
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.print_summary and self.first_logged is not None and trainer.is_global_zero:
            print(self.summary_table())

    def _shaping_lines(self) -> list[str]:
        """First → last of the shaping statistics that were logged (window / HWE, phases, entropy–length)."""
        first, last = self.first_logged or {}, self.last_logged
        names = [k for k in ("window_mean", "window_p90", "hwe_frac", "entropy_length_corr") if k in last]
        names += sorted(k for k in last if k.startswith("phase"))
        nan = float("nan")
        return [f"  {k:<20s} first {first.get(k, nan):.4f}  last {last[k]:.4f}" for k in names]

    def summary_table(self) -> str:
        """The first and last logged values (and the latest entropy–reward fit) as a small text table."""
        lines = [
            "policy entropy (nats, " + self.agg + ")",
            "  batch   entropy   p10     p90     cov_mean   reward",
        ]
        rows = [self.first_logged, self.last_logged] if self.last_logged != self.first_logged else [self.first_logged]
        nan = float("nan")
        for row in rows:
            assert row is not None
            lines.append(
                f"  {int(row['batch']):<6d}  {row.get('mean', nan):.4f}    {row.get('p10', nan):.3f}   "
                f"{row.get('p90', nan):.3f}   {row.get('cov_mean', nan):+.4f}    {row.get('reward_mean', nan):.3f}"
            )
        lines.extend(self._shaping_lines())
        if "fit_a" in self.last_logged:
            last = self.last_logged
            lines.append(
                f"  fit R = -a·exp(H) + b: a = {last['fit_a']:.4f}, b = {last['fit_b']:.4f}, "
                f"ceiling b - a = {last['fit_ceiling']:.4f} (R² = {last.get('fit_r2', nan):.3f})"
            )
            fit = EntropyRewardFit(last["fit_a"], last["fit_b"], last["fit_ceiling"], last.get("fit_r2", nan),
                                   len(self.history["reward"]))
            verdict = ceiling_verdict(fit, self.history["reward_entropy"], self.history["reward"])
            if not verdict.shown:
                lines.append("  the ceiling is not a prediction: " + "; ".join(verdict.reasons))
        return "\n".join(lines)
