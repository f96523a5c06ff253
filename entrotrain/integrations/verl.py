r"""verl adapter: register entrotrain's Clip-Cov, KL-Cov and STEER losses as verl policy losses.

::

    from entrotrain.integrations.verl import register_verl_losses
    register_verl_losses()  # then: actor_rollout_ref.actor.policy_loss.loss_mode=entrotrain_clip_cov

Registered names: ``entrotrain_clip_cov``, ``entrotrain_kl_cov``, ``entrotrain_steer``. Each is a function with
verl's policy-loss call signature ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights)`` that reads verl's own config keys and runs the matching entrotrain module:

- Clip-Cov: ``config.clip_ratio_low`` / ``clip_ratio_high`` (fallback ``clip_ratio``),
  ``config.policy_loss.clip_cov_ratio`` / ``clip_cov_lb`` / ``clip_cov_ub`` (verl's fallbacks 2e-4, 1, 5).
- KL-Cov: ``config.policy_loss.kl_cov_ratio`` (2e-4) and ``ppo_kl_coef`` (fallback 1.0, the paper's β; note that
  verl's yaml default is 0.1).
- STEER: ``config.clip_ratio_low`` / ``_high``, ``config.clip_ratio_c`` (dual clip, fallback 10),
  ``config.policy_loss.token_weight_min`` / ``token_weight_max`` / ``token_weight_linear`` (0.8 / 1.0 / False). It
  needs the old-pass per-token entropy, which verl's call does not pass: give it as ``entropy=`` (e.g. from a
  patched actor that forwards ``data["entropys"]``), otherwise the call raises.

``mode="micro_batch"`` (default) reproduces verl's own functions bit for bit (selection per micro-batch and rank):
tested against the installed verl 0.9.1 through its ``ppo_loss`` (``tests/integrations/test_verl_real.py``, run by
``.ci/verl.sh``), float32, every ``loss_agg_mode``. ``mode="global"`` selects over all ranks with collective ops:
use it only when every rank calls the loss the same number of times per step (no dynamic batch size), or the
collectives will hang. The modules are built once per distinct configuration and reused (so the seeded generator and
the KL-Cov on-policy warning persist across calls).

Aggregation follows the verl that calls: when ``config`` has ``global_batch_info`` (verl >= 0.9, whose actor fills
it per micro-batch with the mini-batch's ``batch_num_tokens`` / ``global_batch_size`` over all ranks, ``dp_size``
and ``loss_scale_factor``), the loss is normalised as verl 0.9's ``agg_loss``: by those global counts, times
``dp_size``, so the engine's sum over micro-batches and the ranks' gradient mean give the mini-batch loss;
``token-sum`` is accepted, and ``seq-mean-token-sum-norm`` is ``seq-mean-token-sum`` / ``loss_scale_factor`` (default
``T``). Without it (older verl, plain dicts) each micro-batch is normalised by its own counts, as verl <= 0.5 and
the paper's fork (``seq-mean-token-sum-norm``: the token sum over ``T``). Choice stated: where verl divides 0 by 0
(an all-masked micro-batch with no batch info) the loss here is 0 with zero gradient. Inputs in half precision are
computed in float32 (verl computes in the input dtype), so bit parity holds for float32, verl's log-prob dtype.

Advantage estimator: :func:`register_verl_adv_estimators` registers ``entrotrain_canon`` (CANON, regrouping by the
old-pass entropy or the length; see :func:`make_verl_adv_fns`) for ``algorithm.adv_estimator=entrotrain_canon``.
PEAR acts on the scalar reward: call :func:`entrotrain.functional.token_shaping.pear_reward` from a reward manager
that sees the old-pass ``entropys`` (verl's default reward managers do not).

Return convention: verl's policy losses return either ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``
(older verl) or ``(pg_loss, metrics_dict)`` (newer). ``style="auto"`` reads the return annotation of verl's own
``compute_policy_loss_vanilla``; pass ``style="tuple"`` or ``"dict"`` to force one. In tuple style the second slot is
the real PPO clip fraction (clip_frac_low + clip_frac_high), never the cov-selected fraction. In dict style the
dict holds the keys verl's own loss logs, with verl's values (floats), so a dashboard curve keeps its meaning when
``loss_mode`` switches: ``entrotrain_clip_cov``: ``actor/pg_clipfrac`` (the cov-selected fraction, as verl's
``clip_cov``) and ``actor/ppo_kl``; ``entrotrain_kl_cov``: ``actor/ppo_kl`` (mean :math:`|\log r|`, as verl's
``kl_cov``); ``entrotrain_steer``: vanilla's ``actor/pg_clipfrac``, ``actor/ppo_kl``, ``actor/pg_clipfrac_lower``;
plus every entrotrain metric under an explicit name, ``actor/entrotrain/<name>`` (``clip_frac_low``,
``clip_frac_high``, ``cov_selected``, ``pg_loss``, ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_choice, check_int, check_real, token_mask
from entrotrain.errors import EntrotrainError
from entrotrain.functional.policy import AGG_MODES, aggregate_loss
from entrotrain.regularizers.policy_loss import ClipCovLoss, KLCovLoss, PolicyLoss, PolicyLossOutput, SteerLoss

__all__ = [
    "VERL_ADV_NAMES",
    "VERL_LOSS_NAMES",
    "make_verl_adv_fns",
    "make_verl_loss_fns",
    "register_verl_adv_estimators",
    "register_verl_losses",
]

VERL_LOSS_NAMES = ("entrotrain_clip_cov", "entrotrain_kl_cov", "entrotrain_steer")


def _get(obj: Any, name: str, default: Any) -> Any:
    """``obj.name`` or ``obj[name]``; ``default`` when missing or None."""
    if obj is None:
        return default
    value = obj.get(name, None) if isinstance(obj, dict) else getattr(obj, name, None)
    return default if value is None else value


def _real(obj: Any, name: str, default: float, where: str) -> float:
    """A finite number from verl's config (``where.name``), named in the error when it is not one. A numeric string
    (YAML 1.1 reads ``2e-4`` as a string) is parsed."""
    value = _get(obj, name, default)
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise EntrotrainError(f"{where}.{name} must be a finite number, got the string {value!r}.") from None
    return check_real(value, f"{where}.{name}")  # type: ignore[return-value]


class _VerlAgg(NamedTuple):
    """How verl aggregates this call: its ``loss_agg_mode`` and ``config.global_batch_info`` (``None``: a verl
    without it, whose ``agg_loss`` is :func:`~entrotrain.functional.policy.aggregate_loss` with local counts)."""

    mode: str
    info: dict | None


def _agg(loss_agg_mode: Any, config: Any = None) -> _VerlAgg:
    """verl's aggregation for this call, validated. With ``config.global_batch_info`` (verl >= 0.9) ``token-sum`` is
    allowed too and the info's ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size`` / ``loss_scale_factor``
    are checked (``None`` = verl's local default)."""
    info = _get(config, "global_batch_info", None)
    if info is None:
        return _VerlAgg(check_choice(loss_agg_mode, "loss_agg_mode", AGG_MODES), None)
    mode = check_choice(loss_agg_mode, "loss_agg_mode", (*AGG_MODES, "token-sum"))
    if not hasattr(info, "get"):
        raise EntrotrainError(
            f"config.global_batch_info must be a dict (verl's actor fills it), got {type(info).__name__}."
        )
    dp_size = check_int(_get(info, "dp_size", 1), "config.global_batch_info.dp_size", low=1)
    checked: dict[str, Any] = {"dp_size": dp_size}
    for name in ("batch_num_tokens", "global_batch_size", "loss_scale_factor"):
        value = info.get(name, None)
        if value is not None and not isinstance(value, Tensor):
            value = check_real(value, f"config.global_batch_info.{name}", low=0.0)
        checked[name] = value
    return _VerlAgg(mode, checked)


def _verl_aggregate(values: Tensor, maskf: Tensor, agg: _VerlAgg) -> Tensor:
    r"""verl 0.9's ``agg_loss(values, mask, mode, **config.global_batch_info)``, through
    :func:`~entrotrain.functional.policy.aggregate_loss` (same operations, so the same bits in float32):

    - ``token-mean``: :math:`\sum l m / N_{tok} \cdot d`; ``token-sum``: :math:`\sum l m \cdot d`;
    - ``seq-mean-token-sum`` / ``seq-mean-token-mean``: over :math:`N_{seq}` sequences, :math:`\cdot d`;
    - ``seq-mean-token-sum-norm``: ``seq-mean-token-sum`` divided by ``loss_scale_factor`` (default ``T``).

    :math:`N_{tok}` = ``batch_num_tokens`` (verl's actor: the valid tokens of the whole mini-batch over all ranks),
    :math:`N_{seq}` = ``global_batch_size``, :math:`d` = ``dp_size``; ``None`` = this micro-batch's count (verl
    refuses ``None`` when ``dp_size > 1``, so does this). Unlike verl, a zero count gives 0 with zero gradient, not
    0/0 = NaN (an all-masked micro-batch called without batch info).
    """
    info = agg.info or {}
    dp = info.get("dp_size", 1)
    if agg.mode in ("token-mean", "token-sum"):
        n_tok = 1.0 if agg.mode == "token-sum" else info.get("batch_num_tokens")
        if n_tok is None and dp > 1:
            raise EntrotrainError(
                "config.global_batch_info.batch_num_tokens is None with dp_size > 1: verl's actor sets it; pass the "
                "valid-token count of the whole mini-batch over all ranks."
            )
        return aggregate_loss(values, maskf, "token-mean", num_tokens=n_tok, dp_size=dp)
    n_seq = info.get("global_batch_size")
    if n_seq is None and dp > 1:
        raise EntrotrainError(
            "config.global_batch_info.global_batch_size is None with dp_size > 1: verl's actor sets it; pass the "
            "number of sequences of the whole mini-batch over all ranks."
        )
    return aggregate_loss(values, maskf, agg.mode, num_sequences=n_seq, max_length=info.get("loss_scale_factor"),
                          dp_size=dp)


class _VerlAggregated(PolicyLoss):
    """Mixin for the registered modules: while ``_verl_agg`` is set (one verl call), aggregate as verl does.

    ``micro_batch`` mode: always verl's ``agg_loss`` with the call's ``global_batch_info``. ``global`` mode: verl's
    denominators when the info gives them, otherwise the module's own global ones (counts over all ranks), with the
    mode's verl >= 0.9 meaning (``seq-mean-token-sum-norm``: the global seq-mean-token-sum over
    ``loss_scale_factor``, default the longest ``T`` over the ranks)."""

    _verl_agg: _VerlAgg | None = None

    def _aggregate(self, values: Tensor, maskf: Tensor, agg: str, global_agg: bool) -> Tensor:
        spec = self._verl_agg
        if spec is None or spec.info is None:  # no global_batch_info: verl <= 0.8's seq-mean-token-sum-norm
            return super()._aggregate(values, maskf, agg, global_agg, token_sum_norm=spec is not None)
        if getattr(self, "mode", "micro_batch") == "global" or global_agg:
            key = "batch_num_tokens" if spec.mode == "token-mean" else "global_batch_size"
            if spec.mode != "token-sum" and spec.info.get(key) is None:
                factor = spec.info.get("loss_scale_factor")
                if spec.mode != "seq-mean-token-sum-norm" or factor is None:
                    # the module's own global counts (seq-mean-token-sum-norm: over the longest T of the ranks)
                    return super()._aggregate(values, maskf, agg, True)
                loss = super()._aggregate(values, maskf, "seq-mean-token-sum", True)
                return loss / (factor if (isinstance(factor, Tensor) or factor != 0) else 1.0)
        return _verl_aggregate(values, maskf, spec)

    def verl_call(self, agg: _VerlAgg, *args: Any, **kwargs: Any) -> PolicyLossOutput:
        """``self(*args, **kwargs)`` aggregated per ``agg``."""
        self._verl_agg = agg
        try:
            return self(*args, **kwargs)
        finally:
            self._verl_agg = None


class _VerlClipCov(_VerlAggregated, ClipCovLoss):
    pass


class _VerlKLCov(_VerlAggregated, KLCovLoss):
    pass


class _VerlSteer(_VerlAggregated, SteerLoss):
    pass


def _module_agg(agg: _VerlAgg) -> str:
    """The module's own ``agg`` (used when verl gives no batch info); ``token-sum`` exists only with it."""
    return agg.mode if agg.mode in AGG_MODES else "token-mean"


def _clip_range(config: Any) -> tuple[float, float]:
    eps = _real(config, "clip_ratio", 0.2, "config")
    return _real(config, "clip_ratio_low", eps, "config"), _real(config, "clip_ratio_high", eps, "config")


def _verl_metrics(out: PolicyLossOutput, loss: str, response_mask: Tensor) -> dict[str, float]:
    r"""The keys and values verl's own loss logs (``actor/pg_clipfrac``, ``actor/ppo_kl``, ...), from entrotrain's
    explicit metrics. ``clip_cov`` logs the cov-selected fraction as ``actor/pg_clipfrac`` and ``kl_cov`` the mean
    :math:`|\log r|` as ``actor/ppo_kl``, as verl does; ``steer`` logs vanilla PPO's three keys."""
    m = out.metrics
    if loss == "clip_cov":
        n_sel = m["policy/cov_selected"]
        return {
            "actor/pg_clipfrac": float(n_sel / (response_mask.sum().to(n_sel.device) + 1e-8)),
            "actor/ppo_kl": float(m["policy/ppo_kl"]),
        }
    if loss == "kl_cov":
        return {"actor/ppo_kl": float(m["policy/ppo_kl_abs"])}
    zero = torch.zeros((), device=out.loss.device)
    return {
        "actor/pg_clipfrac": float(m["policy/clip_frac_low"] + m["policy/clip_frac_high"]),
        "actor/ppo_kl": float(m["policy/ppo_kl"]),
        "actor/pg_clipfrac_lower": float(m.get("policy/dual_clip_frac", zero)),
    }


def _finish(out: PolicyLossOutput, style: str, loss: str, response_mask: Tensor) -> tuple:
    m = out.metrics
    if style == "dict":
        metrics = _verl_metrics(out, loss, response_mask)
        metrics.update({f"actor/entrotrain/{k.split('/', 1)[-1]}": float(v) for k, v in m.items()})
        return out.loss, metrics
    zero = torch.zeros((), device=out.loss.device)
    clipfrac = m.get("policy/clip_frac_low", zero) + m.get("policy/clip_frac_high", zero)
    return out.loss, clipfrac, m.get("policy/ppo_kl", zero), m.get("policy/dual_clip_frac", zero)


def make_verl_loss_fns(
    mode: str = "micro_batch", seed: int | None = None, style: str = "tuple"
) -> dict[str, Callable[..., tuple]]:
    """The verl-signature loss functions (what :func:`register_verl_losses` registers), usable without verl.

    Args:
        mode: ``"micro_batch"`` (verl parity) or ``"global"`` (see the module docstring).
        seed: Clip-Cov's random pick: ``None`` = the global RNG (verl); an int = a seeded rank-aware generator.
        style: ``"tuple"`` (4-tuple) or ``"dict"`` (loss, metrics dict).
    """
    if style not in ("tuple", "dict"):
        raise EntrotrainError(f"style must be 'tuple' or 'dict' (or 'auto' in register_verl_losses), got {style!r}.")
    check_choice(mode, "mode", ("micro_batch", "global"))
    check_int(seed, "seed", none_ok=True)
    if mode == "global" and seed is None:
        seed = 0
    cache: dict[tuple, _VerlAggregated] = {}

    def module(key: tuple, build: Callable[[], _VerlAggregated]) -> _VerlAggregated:
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def check_weights(rollout_is_weights: Tensor | None, name: str) -> None:
        if rollout_is_weights is not None:
            raise EntrotrainError(
                f"{name} does not support rollout importance-sampling weights yet; disable rollout IS correction "
                "(algorithm.rollout_is=False) or use verl's built-in loss."
            )

    def clip_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
                 rollout_is_weights=None, **_: Any):  # fmt: skip
        check_weights(rollout_is_weights, "entrotrain_clip_cov")
        agg = _agg(loss_agg_mode, config)
        low, high = _clip_range(config)
        pl = _get(config, "policy_loss", None)
        ratio = _real(pl, "clip_cov_ratio", 2e-4, "config.policy_loss")
        lb = _real(pl, "clip_cov_lb", 1.0, "config.policy_loss")
        ub = _real(pl, "clip_cov_ub", 5.0, "config.policy_loss")
        key = ("clip_cov", low, high, ratio, lb, ub, _module_agg(agg))
        loss_fn = module(key, lambda: _VerlClipCov(ratio, lb, ub, low, high, _module_agg(agg), mode, seed))
        out = loss_fn.verl_call(agg, log_prob, old_log_prob, advantages, response_mask)
        return _finish(out, style, "clip_cov", response_mask)

    def kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
               rollout_is_weights=None, **_: Any):  # fmt: skip
        check_weights(rollout_is_weights, "entrotrain_kl_cov")
        agg = _agg(loss_agg_mode, config)
        pl = _get(config, "policy_loss", None)
        ratio = _real(pl, "kl_cov_ratio", 2e-4, "config.policy_loss")
        coef = _real(pl, "ppo_kl_coef", 1.0, "config.policy_loss")
        key = ("kl_cov", ratio, coef, _module_agg(agg))
        loss_fn = module(key, lambda: _VerlKLCov(ratio, coef, _module_agg(agg), mode))
        out = loss_fn.verl_call(agg, log_prob, old_log_prob, advantages, response_mask)
        return _finish(out, style, "kl_cov", response_mask)

    def steer(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
              rollout_is_weights=None, entropy=None, **_: Any):  # fmt: skip
        check_weights(rollout_is_weights, "entrotrain_steer")
        agg = _agg(loss_agg_mode, config)
        if entropy is None:
            raise EntrotrainError(
                "entrotrain_steer needs the per-token entropy of the old-policy pass: call it with entropy= "
                "(verl's batch key 'entropys'); verl's default actor does not pass it."
            )
        low, high = _clip_range(config)
        dual = _real(config, "clip_ratio_c", 10.0, "config")
        pl = _get(config, "policy_loss", None)
        w_min = _real(pl, "token_weight_min", 0.8, "config.policy_loss")
        w_max = _real(pl, "token_weight_max", 1.0, "config.policy_loss")
        linear = check_bool(_get(pl, "token_weight_linear", False), "config.policy_loss.token_weight_linear")
        key = ("steer", low, high, dual, w_min, w_max, linear, _module_agg(agg))
        loss_fn = module(key, lambda: _VerlSteer(w_min, w_max, linear, low, high, dual, _module_agg(agg)))
        out = loss_fn.verl_call(agg, log_prob, old_log_prob, advantages, response_mask, entropy=entropy)
        return _finish(out, style, "steer", response_mask)

    return {"entrotrain_clip_cov": clip_cov, "entrotrain_kl_cov": kl_cov, "entrotrain_steer": steer}


def _verl_style(core_algos: Any) -> str:
    fn = getattr(core_algos, "compute_policy_loss_vanilla", None)
    if fn is None:
        return "tuple"
    ret = inspect.signature(fn).return_annotation
    return "dict" if "dict" in str(ret).lower() else "tuple"


def register_verl_losses(mode: str = "micro_batch", seed: int | None = None, style: str = "auto") -> list[str]:
    """Register ``entrotrain_clip_cov``, ``entrotrain_kl_cov``, ``entrotrain_steer`` with verl's policy-loss registry.

    Select one with ``actor_rollout_ref.actor.policy_loss.loss_mode=entrotrain_clip_cov``. Returns the names.

    Raises:
        EntrotrainError: verl is not importable, or has no ``register_policy_loss`` (verl < 0.4.1).
    """
    try:
        from verl.trainer.ppo import core_algos  # noqa: PLC0415
    except ImportError as err:
        raise EntrotrainError(
            "register_verl_losses needs verl: pip install verl (>= 0.4.1, which has register_policy_loss)."
        ) from err
    register = getattr(core_algos, "register_policy_loss", None)
    if register is None:
        raise EntrotrainError("this verl has no register_policy_loss; upgrade to verl >= 0.4.1.")
    check_choice(style, "style", ("auto", "tuple", "dict"))
    fns = make_verl_loss_fns(mode, seed, _verl_style(core_algos) if style == "auto" else style)
    for name, fn in fns.items():
        register(name)(fn)
    return list(fns)


# --------------------------------------------------------------------------------------------- advantage estimators

VERL_ADV_NAMES = ("entrotrain_canon",)


def _group_order(index: Any, n: int) -> tuple[Tensor, int]:
    """A stable permutation putting each uid's responses together (first-appearance order of the uids, batch order
    within a uid) and the common group size; unequal groups are refused."""
    uids = list(index) if index is not None else None
    if uids is None or len(uids) != n:
        raise EntrotrainError(
            f"entrotrain_canon needs index= (one uid per response, {n} of them: verl's data['uid']), got "
            f"{None if uids is None else len(uids)} values."
        )
    codes: dict[Any, int] = {}
    code = torch.tensor([codes.setdefault(u, len(codes)) for u in uids], dtype=torch.int64)
    counts = torch.bincount(code, minlength=len(codes)) if n else torch.zeros(0, dtype=torch.int64)
    if n and int(counts.min()) != int(counts.max()):
        raise EntrotrainError(
            f"entrotrain_canon needs the same number of responses per uid, got group sizes from {int(counts.min())} "
            f"to {int(counts.max())}; disable group filtering that drops single responses (or pad the groups)."
        )
    return torch.sort(code, stable=True).indices, int(counts[0]) if n else 1


def make_verl_adv_fns(
    *,
    metric: str = "entropy",
    lam: float = 1.0,
    alpha: float = 1.0,
    beta: float = 0.0,
    length_norm: float = 1.0,
) -> dict[str, Callable[..., tuple]]:
    """verl-signature advantage estimators (what :func:`register_verl_adv_estimators` registers), usable without verl.

    ``entrotrain_canon(token_level_rewards, response_mask, index, config=None, entropy=None)``: CANON
    (:class:`~entrotrain.regularizers.token_shaping.CANONAdvantage`) on verl's tensors: the scalar reward is
    ``token_level_rewards.sum(-1)``, groups are verl's ``uid`` (any order, equal sizes; within a uid the batch order
    breaks metric ties, as CANON's code), the metric is the old-pass token entropy (``entropy=``, verl's
    ``data["entropys"]``, which verl's ``compute_advantage`` does not pass: forward it, or the call raises) or the
    length. Settings from ``config.canon`` when the config has one, else the keyword arguments given here (``lam``
    1, ``alpha`` 1, ``beta`` 0, ``metric`` "entropy", ``length_norm`` 1: set it to ``max_response_length`` with
    ``seq-mean-token-sum`` as CANON's scripts). verl 0.9's ``AlgoConfig`` refuses an extra ``canon`` field and its
    ``compute_advantage`` passes no entropy, so with stock verl register with the keywords, e.g.
    ``register_verl_adv_estimators(metric="length")``; the entropy metric needs a trainer that forwards
    ``entropy=`` (as CANON's own fork does). Returns ``(advantages, returns)``, both ``A[:, None] * response_mask``
    (no std normalisation).
    """
    defaults = {
        "metric": check_choice(metric, "metric", ("entropy", "length")),
        "lam": check_real(lam, "lam"),
        "alpha": check_real(alpha, "alpha"),
        "beta": check_real(beta, "beta"),
        "length_norm": check_real(length_norm, "length_norm"),
    }
    from entrotrain.functional.token_shaping import canon_advantage, sequence_entropy  # noqa: PLC0415

    def canon(token_level_rewards: Tensor, response_mask: Tensor, index: Any = None, config: Any = None,
              entropy: Tensor | None = None, **_: Any) -> tuple[Tensor, Tensor]:  # fmt: skip
        cfg = _get(config, "canon", None)
        metric = check_choice(_get(cfg, "metric", defaults["metric"]), "config.canon.metric", ("entropy", "length"))
        lam = _real(cfg, "lam", defaults["lam"], "config.canon")
        alpha = _real(cfg, "alpha", defaults["alpha"], "config.canon")
        beta = _real(cfg, "beta", defaults["beta"], "config.canon")
        length_norm = _real(cfg, "length_norm", defaults["length_norm"], "config.canon")
        # the policy code's one rule (values read: once per rollout, off the training step's hot path)
        mask = token_mask(response_mask, token_level_rewards.shape, "response_mask", like="token_level_rewards")
        if metric == "entropy":
            if entropy is None:
                raise EntrotrainError(
                    "entrotrain_canon needs the per-token entropy of the old-policy pass: call it with entropy= "
                    "(verl's batch key 'entropys'; stock verl's compute_advantage does not pass it), or use the "
                    "length metric: register_verl_adv_estimators(metric='length') or config.canon.metric='length'."
                )
            value = sequence_entropy(entropy, mask)
        else:
            value = mask.sum(-1).float()
        rewards = token_level_rewards.detach().sum(-1)
        order, group = _group_order(index, rewards.shape[0])
        adv = torch.empty(rewards.shape, dtype=torch.promote_types(rewards.dtype, torch.float32), device=rewards.device)
        adv[order.to(rewards.device)] = canon_advantage(
            rewards[order], value[order], group, lam=lam, alpha=alpha, beta=beta, variant=metric,
            length_norm=length_norm,
        ).to(adv.dtype)  # fmt: skip
        out = adv[:, None] * mask.to(adv.dtype)
        return out, out

    return {"entrotrain_canon": canon}


def register_verl_adv_estimators(**defaults: Any) -> list[str]:
    """Register ``entrotrain_canon`` with verl's advantage-estimator registry (``algorithm.adv_estimator=
    entrotrain_canon``); returns the names. ``defaults`` are :func:`make_verl_adv_fns`'s keywords (``metric``,
    ``lam``, ``alpha``, ``beta``, ``length_norm``), used when verl's config has no ``canon`` section.

    Raises:
        EntrotrainError: verl is not importable, or has no ``register_adv_est``.
    """
    try:
        from verl.trainer.ppo import core_algos  # noqa: PLC0415
    except ImportError as err:
        raise EntrotrainError("register_verl_adv_estimators needs verl: pip install verl.") from err
    register = getattr(core_algos, "register_adv_est", None)
    if register is None:
        raise EntrotrainError("this verl has no register_adv_est; upgrade verl.")
    fns = make_verl_adv_fns(**defaults)
    for name, fn in fns.items():
        register(name)(fn)
    return list(fns)
