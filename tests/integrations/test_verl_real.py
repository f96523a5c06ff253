"""entrotrain's verl losses against the REAL verl 0.9.x (not a transcription): run by ``.ci/verl.sh`` in ``.venv-verl``.

verl pins ``transformers<5.11``, so it lives in its own venv; in the main venv this file skips with a message (and
fails instead when ``VERL_REAL_REQUIRED=1``, which ``.ci/verl.sh`` sets, so a broken install can never pass as a
skip). Every comparison goes through verl's own call path: ``ppo_loss`` (verl/workers/utils/losses.py, what verl's
FSDP/Megatron engines call per micro-batch) with a real ``ActorConfig`` / ``PolicyLossConfig``, the micro-batch as
a ``TensorDict`` with verl's non-tensor ``dp_size`` / ``batch_num_tokens`` / ``global_batch_size``, and the
policy's log-probs as the engine's flat no-padding output. ``loss_mode="clip_cov"`` (verl's code) and
``"entrotrain_clip_cov"`` (entrotrain's ``ClipCovLoss(mode="micro_batch")`` through ``register_verl_losses``) must
give the same loss and the same gradient w.r.t. the log-probs, ``torch.equal``, in float32 (verl's dtype).

Nothing here imports ``tests.helpers``: verl 0.9.1's wheel installs a top-level ``tests`` package into
site-packages, which shadows this repository's (namespace) ``tests`` package in that venv.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

_REQUIRED = os.environ.get("VERL_REAL_REQUIRED") == "1"


def _verl_version() -> str | None:
    try:
        from verl.trainer.ppo import core_algos as probe  # noqa: PLC0415
    except ImportError:
        return None
    return importlib.metadata.version("verl") if hasattr(probe, "get_policy_loss_fn") else None


_VERSION = _verl_version()
if _VERSION is None or not _VERSION.startswith("0.9."):
    _why = (
        "verl is not importable" if _VERSION is None else f"verl {_VERSION} is installed, these tests pin 0.9.x"
    ) + ": run `bash .ci/verl.sh` (it builds .venv-verl with verl 0.9.1 and runs this file)"
    if _REQUIRED:
        pytest.fail(f"VERL_REAL_REQUIRED=1 but {_why}", pytrace=False)
    pytest.skip(_why, allow_module_level=True)

from tensordict import TensorDict  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.utils.metric import Metric  # noqa: E402
from verl.workers.config import ActorConfig, PolicyLossConfig  # noqa: E402
from verl.workers.utils.losses import ppo_loss  # noqa: E402

from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations.verl import VERL_LOSS_NAMES, register_verl_losses  # noqa: E402

MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
PROMPT = 3  # prompt length of every sequence in the synthetic micro-batches


@pytest.fixture(scope="module", autouse=True)
def _registered():
    names = register_verl_losses()
    assert tuple(names) == VERL_LOSS_NAMES
    return names


def _config(
    loss_mode: str, agg: str = "token-mean", loss_scale_factor: int | None = None, **policy_loss
) -> ActorConfig:
    """A real verl ActorConfig (as issue 14 measured it), the selective losses' ratios raised so that every batch
    selects several tokens; clip range DAPO-style (0.2 / 0.28)."""
    policy_loss = {"clip_cov_ratio": 0.1, "kl_cov_ratio": 0.1, "ppo_kl_coef": 1.0, **policy_loss}
    return ActorConfig(
        loss_scale_factor=loss_scale_factor,
        strategy="fsdp",
        rollout_n=4,
        ppo_micro_batch_size_per_gpu=4,
        clip_ratio=0.2,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,
        loss_agg_mode=agg,
        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss),
    )


# ---------------------------------------------------------------------------------------------- batches


def _random(seed: int, b: int = 6, t: int = 20) -> dict:
    g = torch.Generator().manual_seed(seed)
    adv = (torch.randn(b, 1, generator=g) * 2).expand(b, t).contiguous()
    logp = -torch.rand(b, t, generator=g) * 4
    old = logp + torch.randn(b, t, generator=g) * 0.3
    lengths = torch.randint(t // 3, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return {"logp": logp, "old": old, "adv": adv, "mask": mask}


def _masked_rows(seed: int) -> dict:
    batch = _random(seed)
    batch["mask"][[1, 4]] = False  # whole responses masked: they leave every mean and the seq-mean count
    return batch


def _all_masked(seed: int) -> dict:
    batch = _random(seed)
    batch["mask"][:] = False  # a micro-batch of padding only (the mini-batch's other micro-batches hold the tokens)
    return batch


def _cov_ties(seed: int) -> dict:
    """Many equal covariances: two advantage levels, log-probs on a coarse grid (kl_cov's top-k breaks the ties,
    clip_cov's random pick draws among equal candidates)."""
    b, t = 8, 12
    g = torch.Generator().manual_seed(seed)
    adv = torch.tensor([2.0, -2.0] * (b // 2))[:, None].expand(b, t).contiguous()
    logp = -torch.randint(0, 3, (b, t), generator=g).float()
    old = logp + 0.05 * torch.randint(-1, 2, (b, t), generator=g).float()
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, 9:] = False
    return {"logp": logp, "old": old, "adv": adv, "mask": mask}


def _already_clipped(seed: int) -> dict:
    """Most ratios far outside [1 - 0.2, 1 + 0.28] on the side where PPO clips: those tokens are excluded from
    Clip-Cov's candidates (and KL-Cov ignores PPO's clip)."""
    batch = _random(seed)
    shift = torch.where(batch["adv"] > 0, 0.7, -0.7)
    batch["old"] = batch["logp"] - shift  # log r = +-0.7: r = 2.0 for A > 0, 0.5 for A < 0
    batch["old"][:, ::3] = batch["logp"][:, ::3]  # and some on-policy tokens
    return batch


BATCHES = {
    "random": _random,
    "masked_rows": _masked_rows,
    "all_masked": _all_masked,
    "cov_ties": _cov_ties,
    "already_clipped": _already_clipped,
}


def _micro_batch(batch: dict, logp: torch.Tensor, dp_size: int, num_tokens: int | None, num_seqs: int | None):
    """verl's micro-batch TensorDict and the engine's model output for it: log-probs flat over prompt + response
    (no padding), the response's at positions ``[offset + P - 1, offset + P + T - 1)`` (the next-token shift)."""
    b, t = logp.shape
    data = TensorDict(
        {
            "prompts": torch.ones(b, PROMPT, dtype=torch.long),
            "responses": torch.ones(b, t, dtype=torch.long),
            "attention_mask": torch.ones(b, PROMPT + t, dtype=torch.long),
            "response_mask": batch["mask"].long(),
            "old_log_probs": batch["old"],
            "advantages": batch["adv"],
        },
        batch_size=[b],
    )
    tu.assign_non_tensor(data, dp_size=dp_size, batch_num_tokens=num_tokens, global_batch_size=num_seqs)
    pad = torch.zeros(b, PROMPT - 1, dtype=logp.dtype)
    flat = torch.cat([pad, logp, torch.zeros(b, 1, dtype=logp.dtype)], dim=1).reshape(-1)
    return {"log_probs": flat}, data


def _run(loss_mode: str, agg: str, batch: dict, info: str, seed: int, **config):
    """verl's ``ppo_loss`` for one micro-batch: (loss, grad w.r.t. the log-probs, {key: value})."""
    logp = batch["logp"].clone().requires_grad_()
    n_tok, n_seq, dp = None, None, 1
    if info != "local":  # as the engine: counts of the whole mini-batch (this micro-batch + 3 others), over dp ranks
        dp = 2 if info == "dp2" else 1
        n_tok = int(batch["mask"].sum()) + 41 * dp + 37
        n_seq = batch["mask"].shape[0] * 4 * dp
    output, data = _micro_batch(batch, logp, dp, n_tok, n_seq)
    torch.manual_seed(seed)  # Clip-Cov's pick: torch.randperm on the global RNG, in verl and in entrotrain
    loss, metrics = ppo_loss(_config(loss_mode, agg, **config), output, data)
    loss.backward()
    # verl's Metric: an aggregation type and the values it collected (floats); plain values pass through
    return loss.detach(), logp.grad, {k: (m.aggregation, m.values) if isinstance(m, Metric) else (None, [m])
                                      for k, m in metrics.items()}  # fmt: skip


def _same(a: tuple, b: tuple) -> bool:
    """Same aggregation type and the same values, bit for bit (NaN equal to NaN)."""
    if a[0] != b[0] or len(a[1]) != len(b[1]):
        return False
    for x, y in zip(a[1], b[1]):
        x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
        if not (torch.equal(x, y) or (x.isnan() & y.isnan()).item()):
            return False
    return True


# ---------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("kind", list(BATCHES))
@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize("loss", ["clip_cov", "kl_cov"])
def test_bit_for_bit_with_verl_through_ppo_loss(loss, agg, kind):
    """entrotrain_clip_cov / entrotrain_kl_cov == verl's clip_cov / kl_cov through verl's ppo_loss (micro_batch
    mode): the loss, the gradient w.r.t. the log-probs, and every metric verl logs, bit for bit. Three kinds of
    batch info: the engine's (mini-batch counts, dp 1 and 2) and none (this micro-batch's own counts)."""
    for info in ("engine", "dp2", "local"):
        if kind == "all_masked" and info == "local":
            continue  # verl divides 0 by 0 there: see test_all_masked_without_batch_info_is_zero_not_nan
        batch = BATCHES[kind](seed=zlib.crc32(f"{loss}{agg}{kind}".encode()) % 1000)
        v_loss, v_grad, v_metrics = _run(loss, agg, batch, info, seed=7)
        e_loss, e_grad, e_metrics = _run(f"entrotrain_{loss}", agg, batch, info, seed=7)
        where = f"{loss} {agg} {kind} info={info}"
        assert torch.isfinite(v_loss), where
        assert torch.equal(e_loss, v_loss), f"{where}: loss {e_loss.item()!r} != verl {v_loss.item()!r}"
        assert torch.equal(e_grad, v_grad), f"{where}: gradient differs (max {(e_grad - v_grad).abs().max()})"
        assert set(v_metrics) <= set(e_metrics), f"{where}: verl's keys {sorted(set(v_metrics) - set(e_metrics))}"
        for key, value in v_metrics.items():
            assert _same(e_metrics[key], value), f"{where}: metric {key} {e_metrics[key]!r} != verl {value!r}"


@settings(max_examples=25)
@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 9)),
    data=st.data(),
    loss=st.sampled_from(["clip_cov", "kl_cov"]),
    agg=st.sampled_from(MODES),
    info=st.sampled_from(["engine", "dp2", "local"]),
    scale=st.sampled_from([None, 16]),
    ratio=st.sampled_from([1e-4, 0.3, 1.0]),
)
def test_bit_for_bit_property(shape, data, loss, agg, info, scale, ratio):
    """Any small micro-batch (one token, one row, any mask with a valid token), any ratio (the budget floor of 1,
    or every token), config.loss_scale_factor set or not: entrotrain == verl, loss and gradient, bit for bit."""
    b, t = shape
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, t, generator=g) < data.draw(st.sampled_from([0.3, 0.7, 1.0]), label="density")
    mask.view(-1)[data.draw(st.integers(0, b * t - 1), label="valid")] = True  # verl divides 0 by 0 otherwise
    adv = torch.randn(b, 1, generator=g).expand(b, t) * data.draw(st.sampled_from([0.5, 3.0]), label="adv scale")
    logp = -torch.rand(b, t, generator=g) * 5
    batch = {"logp": logp, "old": logp + torch.randn(b, t, generator=g) * 0.4, "adv": adv.contiguous(), "mask": mask}
    ratios = {"clip_cov_ratio": ratio, "kl_cov_ratio": ratio}
    v_loss, v_grad, v_metrics = _run(loss, agg, batch, info, 3, loss_scale_factor=scale, **ratios)
    e_loss, e_grad, e_metrics = _run(f"entrotrain_{loss}", agg, batch, info, 3, loss_scale_factor=scale, **ratios)
    assert torch.equal(e_loss, v_loss) and torch.equal(e_grad, v_grad)
    assert all(_same(e_metrics[k], v) for k, v in v_metrics.items())


def test_the_parity_test_can_fail():
    """A different selection budget must change the loss or the gradient: the comparison above is not vacuous."""
    batch = _random(3)
    v_loss, v_grad, _ = _run("clip_cov", "token-mean", batch, "engine", seed=7)
    logp = batch["logp"].clone().requires_grad_()
    output, data = _micro_batch(batch, logp, 1, int(batch["mask"].sum()) + 78, 24)
    torch.manual_seed(7)
    loss, _ = ppo_loss(_config("entrotrain_clip_cov", clip_cov_ratio=0.3), output, data)
    loss.backward()
    assert not (torch.equal(loss.detach(), v_loss) and torch.equal(logp.grad, v_grad))


def test_micro_batches_sum_to_the_mini_batch_gradient():
    """verl's engine sums the micro-batch losses (no division): with the engine's batch info the two halves of a
    mini-batch give the gradient of the whole, as verl's own loss (the pre-0.9 adapter, which normalised per
    micro-batch, gave twice it)."""
    batch = _random(5, b=8)
    n_tok, n_seq = int(batch["mask"].sum()), 8
    cfg = _config("entrotrain_kl_cov", "token-mean", kl_cov_ratio=1.0)  # every token selected: no split effect
    logp = batch["logp"].clone().requires_grad_()
    out, data = _micro_batch(batch, logp, 1, n_tok, n_seq)
    whole, _ = ppo_loss(cfg, out, data)
    (g_whole,) = torch.autograd.grad(whole, logp)
    total = 0.0
    for rows in (slice(0, 4), slice(4, 8)):
        half = {k: v[rows] for k, v in batch.items()}
        out, data = _micro_batch(half, logp[rows], 1, n_tok, n_seq)
        total = total + ppo_loss(_config("entrotrain_kl_cov", "token-mean", kl_cov_ratio=1.0), out, data)[0]
    (g_sum,) = torch.autograd.grad(total, logp)
    torch.testing.assert_close(g_sum, g_whole, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------- contracts


@pytest.mark.parametrize("agg", MODES)
@pytest.mark.parametrize("name", VERL_LOSS_NAMES)
def test_all_masked_without_batch_info_is_zero_not_nan(name, agg):
    """verl's masked mean divides 0 by 0 on a micro-batch of padding called without batch info; entrotrain's
    contract: 0 with zero gradient (and finite metrics)."""
    batch = _all_masked(0)
    logp = batch["logp"].clone().requires_grad_()
    fn = core_algos.get_policy_loss_fn(name)
    extra = {"entropy": torch.rand_like(logp)} if name == "entrotrain_steer" else {}
    loss, metrics = fn(
        old_log_prob=batch["old"], log_prob=logp, advantages=batch["adv"], response_mask=batch["mask"],
        loss_agg_mode=agg, config=_config(name, agg), rollout_is_weights=None, **extra,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))
    assert all(math.isfinite(v) for v in metrics.values())


def test_registry_entries_and_metric_keys():
    """Registered under verl's registry; style 'auto' picked verl 0.9's (loss, metrics dict); the dict holds verl's
    own keys for the loss (as floats, what verl's Metric.from_dict aggregates) plus entrotrain's explicit ones."""
    batch = _random(1)
    expected = {
        "entrotrain_clip_cov": {"actor/pg_clipfrac", "actor/ppo_kl"},
        "entrotrain_kl_cov": {"actor/ppo_kl"},
        "entrotrain_steer": {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"},
    }
    for name in VERL_LOSS_NAMES:
        fn = core_algos.get_policy_loss_fn(name)
        assert fn is core_algos.POLICY_LOSS_REGISTRY[name]
        extra = {"entropy": torch.rand_like(batch["logp"])} if name == "entrotrain_steer" else {}
        out = fn(batch["old"], batch["logp"], batch["adv"], batch["mask"], "token-mean", _config(name), None, **extra)
        assert len(out) == 2
        loss, metrics = out
        assert loss.dim() == 0 and isinstance(metrics, dict)
        assert expected[name] <= set(metrics), name
        assert all(k in expected[name] or k.startswith("actor/entrotrain/") for k in metrics), sorted(metrics)
        assert all(type(v) is float for v in metrics.values())
    # the same keys verl's vanilla loss logs, for STEER
    _, vanilla = core_algos.get_policy_loss_fn("vanilla")(
        batch["old"], batch["logp"], batch["adv"], batch["mask"], "token-mean", _config("vanilla"), None
    )
    assert set(vanilla) == expected["entrotrain_steer"]


def test_steer_through_ppo_loss_asks_for_the_entropy():
    """verl's ppo_loss does not pass the old-pass entropy, so STEER says how to give it (never a TypeError)."""
    batch = _random(2)
    logp = batch["logp"].clone().requires_grad_()
    output, data = _micro_batch(batch, logp, 1, None, None)
    with pytest.raises(EntrotrainError, match="entropy="):
        ppo_loss(_config("entrotrain_steer"), output, data)


def test_bad_batch_info_is_named():
    batch = _random(4)
    cfg = _config("entrotrain_clip_cov")
    cfg.global_batch_info.update(dp_size=2, batch_num_tokens=None)
    fn = core_algos.get_policy_loss_fn("entrotrain_clip_cov")
    with pytest.raises(EntrotrainError, match="batch_num_tokens"):
        fn(batch["old"], batch["logp"], batch["adv"], batch["mask"], "token-mean", cfg, None)
    cfg.global_batch_info.update(dp_size=0)
    with pytest.raises(EntrotrainError, match="dp_size"):
        fn(batch["old"], batch["logp"], batch["adv"], batch["mask"], "token-mean", cfg, None)


def test_global_mode_through_ppo_loss_uses_the_engine_counts():
    """register_verl_losses(mode="global") (one process: no collectives) also aggregates by verl's batch info: with
    every token selected (kl_cov_ratio=1) it equals verl's kl_cov on the same micro-batch."""
    try:
        register_verl_losses(mode="global", seed=0)
        for info in ("engine", "dp2"):
            batch = _masked_rows(11)
            v_loss, v_grad, _ = _run("kl_cov", "seq-mean-token-mean", batch, info, 0, kl_cov_ratio=1.0)
            e_loss, e_grad, _ = _run("entrotrain_kl_cov", "seq-mean-token-mean", batch, info, 0, kl_cov_ratio=1.0)
            torch.testing.assert_close(e_loss, v_loss, rtol=0, atol=0)
            torch.testing.assert_close(e_grad, v_grad, rtol=0, atol=0)
    finally:
        register_verl_losses()  # back to micro_batch for the other tests


def test_canon_through_verls_advantage_registry():
    """`algorithm.adv_estimator=entrotrain_canon`: called as stock verl's compute_advantage calls a registered
    estimator (its kwargs: token_level_rewards, response_mask, config = an AlgoConfig without a canon section, index =
    the uids; no entropy), registered with the length metric it runs and equals canon_advantage. (Importing
    verl.trainer.ppo.ray_trainer itself needs verl's rollout extras, absent on CPU.)"""
    import numpy as np
    from verl.trainer.config import AlgoConfig

    from entrotrain.functional.token_shaping import canon_advantage
    from entrotrain.integrations.verl import register_verl_adv_estimators

    assert register_verl_adv_estimators(metric="length") == ["entrotrain_canon"]
    gen = torch.Generator().manual_seed(0)
    b, t, g = 8, 6, 4
    mask = (torch.rand(b, t, generator=gen) > 0.3).float()
    mask[:, 0] = 1.0
    rewards = torch.zeros(b, t)
    rewards[:, 0] = torch.randint(0, 2, (b,), generator=gen).float()
    uids = np.array([f"u{i // g}" for i in range(b)], dtype=object)
    fn = core_algos.get_adv_estimator_fn("entrotrain_canon")
    adv, ret = fn(token_level_rewards=rewards, response_mask=mask, config=AlgoConfig(adv_estimator="entrotrain_canon"),
                  index=uids)
    expected = canon_advantage(rewards.sum(-1), mask.sum(-1), g, variant="length")
    assert torch.allclose(adv, expected[:, None] * mask, atol=1e-6) and torch.equal(adv, ret)
