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

``mode="micro_batch"`` (default) reproduces verl's own functions bit for bit (selection per micro-batch and rank).
``mode="global"`` selects over all ranks with collective ops: use it only when every rank calls the loss the same
number of times per step (no dynamic batch size), or the collectives will hang. Aggregation is per micro-batch, as
in verl ≤ 0.5 and the paper's fork. The modules are built once per distinct configuration and reused (so the seeded
generator and the KL-Cov on-policy warning persist across calls).

Return convention: verl's policy losses return either ``(pg_loss, pg_clipfrac, ppo_kl, pg_clipfrac_lower)``
(older verl) or ``(pg_loss, metrics_dict)`` (newer). ``style="auto"`` reads the return annotation of verl's own
``compute_policy_loss_vanilla``; pass ``style="tuple"`` or ``"dict"`` to force one. In tuple style the second slot is
the real PPO clip fraction (clip_frac_low + clip_frac_high), never the cov-selected fraction.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from entrotrain._validation import check_bool, check_choice, check_int, check_real
from entrotrain.errors import EntrotrainError
from entrotrain.functional.policy import AGG_MODES
from entrotrain.regularizers.policy_loss import ClipCovLoss, KLCovLoss, PolicyLoss, PolicyLossOutput, SteerLoss

__all__ = ["VERL_LOSS_NAMES", "make_verl_loss_fns", "register_verl_losses"]

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


def _agg(loss_agg_mode: Any) -> str:
    return check_choice(loss_agg_mode, "loss_agg_mode", AGG_MODES)


def _clip_range(config: Any) -> tuple[float, float]:
    eps = _real(config, "clip_ratio", 0.2, "config")
    return _real(config, "clip_ratio_low", eps, "config"), _real(config, "clip_ratio_high", eps, "config")


def _finish(out: PolicyLossOutput, style: str) -> tuple:
    m = out.metrics
    if style == "dict":
        return out.loss, {f"actor/entrotrain/{k.split('/', 1)[-1]}": float(v) for k, v in m.items()}
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
    cache: dict[tuple, PolicyLoss] = {}

    def module(key: tuple, build: Callable[[], PolicyLoss]) -> PolicyLoss:
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
        loss_agg_mode = _agg(loss_agg_mode)
        low, high = _clip_range(config)
        pl = _get(config, "policy_loss", None)
        ratio = _real(pl, "clip_cov_ratio", 2e-4, "config.policy_loss")
        lb = _real(pl, "clip_cov_lb", 1.0, "config.policy_loss")
        ub = _real(pl, "clip_cov_ub", 5.0, "config.policy_loss")
        key = ("clip_cov", low, high, ratio, lb, ub, loss_agg_mode)
        loss_fn = module(key, lambda: ClipCovLoss(ratio, lb, ub, low, high, loss_agg_mode, mode, seed))
        return _finish(loss_fn(log_prob, old_log_prob, advantages, response_mask), style)

    def kl_cov(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
               rollout_is_weights=None, **_: Any):  # fmt: skip
        check_weights(rollout_is_weights, "entrotrain_kl_cov")
        loss_agg_mode = _agg(loss_agg_mode)
        pl = _get(config, "policy_loss", None)
        ratio = _real(pl, "kl_cov_ratio", 2e-4, "config.policy_loss")
        coef = _real(pl, "ppo_kl_coef", 1.0, "config.policy_loss")
        key = ("kl_cov", ratio, coef, loss_agg_mode)
        loss_fn = module(key, lambda: KLCovLoss(ratio, coef, loss_agg_mode, mode))
        return _finish(loss_fn(log_prob, old_log_prob, advantages, response_mask), style)

    def steer(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode="token-mean", config=None,
              rollout_is_weights=None, entropy=None, **_: Any):  # fmt: skip
        check_weights(rollout_is_weights, "entrotrain_steer")
        loss_agg_mode = _agg(loss_agg_mode)
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
        key = ("steer", low, high, dual, w_min, w_max, linear, loss_agg_mode)
        loss_fn = module(key, lambda: SteerLoss(w_min, w_max, linear, low, high, dual, loss_agg_mode))
        return _finish(loss_fn(log_prob, old_log_prob, advantages, response_mask, entropy=entropy), style)

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
