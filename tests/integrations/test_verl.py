"""verl adapter: the loss closures (without verl) reproduce verl's own functions; registration needs verl."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.integrations.verl import make_verl_loss_fns, register_verl_losses
from tests.helpers import verl_reference as verl


def _batch(seed=0, b=6, t=24):
    g = torch.Generator().manual_seed(seed)
    adv = (torch.randn(b, 1, generator=g) * 2).expand(b, t).contiguous()
    logp = -torch.rand(b, t, generator=g) * 4
    old = logp + torch.randn(b, t, generator=g) * 0.3
    lengths = torch.randint(t // 3, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    return logp, old, adv, mask


def _config(**policy_loss):
    return SimpleNamespace(clip_ratio=0.2, clip_ratio_low=None, clip_ratio_high=0.28, clip_ratio_c=3.0,
                           policy_loss=SimpleNamespace(**policy_loss))  # fmt: skip


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean"])
def test_clip_cov_closure_equals_verl(agg):
    logp, old, adv, mask = _batch()
    fns = make_verl_loss_fns()
    cfg = _config(clip_cov_ratio=0.05, clip_cov_lb=None, clip_cov_ub=None)
    torch.manual_seed(0)
    loss, clipfrac, ppo_kl, lower = fns["entrotrain_clip_cov"](old, logp, adv, mask, agg, cfg)
    torch.manual_seed(0)
    ref = verl.compute_policy_loss_clip_cov(old, logp, adv, mask, agg, clip_cov_ratio=0.05, cliprange_low=0.2,
                                            cliprange_high=0.28)  # fmt: skip
    assert torch.equal(loss, ref[0]) and torch.equal(ppo_kl, ref[2])
    assert 0 <= float(clipfrac) <= 1  # the real PPO clip fraction, not the cov-selected one


def test_kl_cov_closure_equals_verl_and_dict_style():
    logp, old, adv, mask = _batch(1)
    cfg = _config(kl_cov_ratio=0.1, ppo_kl_coef=None)  # None: the paper's beta = 1
    loss, _, _, _ = make_verl_loss_fns()["entrotrain_kl_cov"](old, logp, adv, mask, "token-mean", cfg)
    ref = verl.compute_policy_loss_kl_cov(old, logp, adv, mask, "token-mean", kl_cov_ratio=0.1, ppo_kl_coef=1.0)
    assert torch.equal(loss, ref[0])
    loss2, metrics = make_verl_loss_fns(style="dict")["entrotrain_kl_cov"](
        old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask, loss_agg_mode="token-mean", config=cfg
    )
    assert torch.equal(loss2, ref[0])
    assert metrics["actor/entrotrain/cov_selected"] == int(0.1 * mask.sum())
    # verl's own kl_cov key (mean |log r|, as verl logs it) plus entrotrain's explicit ones
    assert metrics["actor/ppo_kl"] == float(metrics["actor/entrotrain/ppo_kl_abs"])
    assert all(k.startswith("actor/entrotrain/") for k in metrics if k != "actor/ppo_kl")


def test_steer_closure_and_errors():
    logp, old, adv, mask = _batch(2)
    fns = make_verl_loss_fns()
    with pytest.raises(EntrotrainError, match="entropy="):
        fns["entrotrain_steer"](old, logp, adv, mask, "token-mean", _config())
    loss, *_ = fns["entrotrain_steer"](old, logp, adv, mask, "token-mean", _config(), entropy=torch.rand_like(logp))
    assert torch.isfinite(loss)
    with pytest.raises(EntrotrainError, match="importance"):
        fns["entrotrain_kl_cov"](old, logp, adv, mask, "token-mean", _config(), torch.ones_like(logp))
    with pytest.raises(EntrotrainError, match="style"):
        make_verl_loss_fns(style="list")


def test_modules_are_reused_across_calls():
    logp, old, adv, mask = _batch(3)
    fn = make_verl_loss_fns(seed=1)["entrotrain_clip_cov"]
    cfg = _config(clip_cov_ratio=0.05)
    a, b = fn(old, logp, adv, mask, "token-mean", cfg)[0], fn(old, logp, adv, mask, "token-mean", cfg)[0]
    assert torch.isfinite(a) and torch.isfinite(b)  # the seeded generator advances: picks may differ


def test_register_without_verl_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)
    with pytest.raises(EntrotrainError, match="needs verl"):
        register_verl_losses()


def test_register_with_verl():
    pytest.importorskip("verl")
    from verl.trainer.ppo.core_algos import get_policy_loss_fn

    names = register_verl_losses()
    for name in names:
        assert callable(get_policy_loss_fn(name))


# ------------------------------------------------------------------------------------- trust under failure


@pytest.mark.parametrize("name", ["entrotrain_clip_cov", "entrotrain_kl_cov", "entrotrain_steer"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_all_masked_micro_batch_gives_zero_loss_zero_gradient(name, agg):
    logp, old, adv, mask = _batch()
    logp = logp.clone().requires_grad_()
    fn = make_verl_loss_fns()[name]
    extra = {"entropy": torch.rand_like(logp)} if name == "entrotrain_steer" else {}
    loss, *metrics = fn(old, logp, adv, torch.zeros_like(mask), agg, _config(), **extra)
    loss.backward()
    assert float(loss) == 0.0 and torch.equal(logp.grad, torch.zeros_like(logp))  # verl's token-mean: 0/0 = nan
    assert all(torch.isfinite(torch.as_tensor(m)).all() for m in metrics)


@pytest.mark.parametrize(
    "config, match",
    [
        (_config(clip_cov_ratio=float("nan")), "clip_cov_ratio"),
        (_config(clip_cov_ratio="two"), "clip_cov_ratio"),
        (_config(clip_cov_ratio=2.0), "clip_ratio"),
        (_config(clip_cov_lb=5.0, clip_cov_ub=1.0), "cov_lb"),
        (SimpleNamespace(clip_ratio=float("inf"), policy_loss=None), "config.clip_ratio"),
    ],
)
def test_bad_verl_config_values_raise(config, match):
    logp, old, adv, mask = _batch()
    with pytest.raises(EntrotrainError, match=match):
        make_verl_loss_fns()["entrotrain_clip_cov"](old, logp, adv, mask, "token-mean", config)


def test_bad_adapter_arguments_raise():
    logp, old, adv, mask = _batch()
    with pytest.raises(EntrotrainError, match="mode"):
        make_verl_loss_fns(mode="local")
    with pytest.raises(EntrotrainError, match="seed"):
        make_verl_loss_fns(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(EntrotrainError, match="loss_agg_mode"):
        make_verl_loss_fns()["entrotrain_kl_cov"](old, logp, adv, mask, ["token-mean"], _config())
    with pytest.raises(EntrotrainError, match="kl_coef"):
        make_verl_loss_fns()["entrotrain_kl_cov"](old, logp, adv, mask, "token-mean", _config(ppo_kl_coef=-1.0))
    with pytest.raises(EntrotrainError, match="token_weight_linear"):
        make_verl_loss_fns()["entrotrain_steer"](
            old, logp, adv, mask, "token-mean", _config(token_weight_linear="no"), entropy=torch.rand_like(logp)
        )
    # YAML 1.1 reads 2e-4 as a string: parsed, same result as the number
    fns = make_verl_loss_fns(seed=0)
    a = fns["entrotrain_kl_cov"](old, logp, adv, mask, "token-mean", _config(kl_cov_ratio="0.1"))[0]
    b = fns["entrotrain_kl_cov"](old, logp, adv, mask, "token-mean", _config(kl_cov_ratio=0.1))[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("info", [{}, {"loss_scale_factor": 10.0}])
def test_global_mode_without_batch_counts_keeps_verl_09s_seq_mean_token_sum_norm(info):
    # verl >= 0.9's legacy actor passes global_batch_info={} (no counts): agg_loss's seq-mean-token-sum-norm is then
    # seq-mean-token-sum / (loss_scale_factor or T). Global mode fell back to the module's own token sum / T: N_seq
    # (here 6) times larger than micro_batch mode and than verl. With kl_cov_ratio=1 both modes select every token.
    logp, old, adv, mask = _batch(2)
    cfg = _config(kl_cov_ratio=1.0, ppo_kl_coef=1.0)
    cfg.global_batch_info = dict(info)
    kl = (logp - old).abs()
    per_token = -adv * torch.exp(logp - old) + kl
    ref = verl.agg_loss(per_token, mask, "seq-mean-token-sum") / info.get("loss_scale_factor", mask.shape[-1])
    for mode in ("micro_batch", "global"):
        loss = make_verl_loss_fns(mode=mode)["entrotrain_kl_cov"](old, logp, adv, mask, "seq-mean-token-sum-norm", cfg)
        torch.testing.assert_close(loss[0], ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("mode", ["micro_batch", "global"])
def test_an_older_verl_without_batch_info_keeps_its_seq_mean_token_sum_norm(mode):
    # verl <= 0.8 (no config.global_batch_info) divided the token sum by T alone, N_seq times verl 0.9's value:
    # the adapter reproduces the verl that calls, while aggregate_loss itself is verl 0.9 / Dr. GRPO
    logp, old, adv, mask = _batch(3)
    cfg = _config(kl_cov_ratio=1.0, ppo_kl_coef=1.0)
    per_token = -adv * torch.exp(logp - old) + (logp - old).abs()
    ref = verl.agg_loss(per_token, mask, "seq-mean-token-sum-norm", verl_08_norm=True)
    loss = make_verl_loss_fns(mode=mode)["entrotrain_kl_cov"](old, logp, adv, mask, "seq-mean-token-sum-norm", cfg)
    torch.testing.assert_close(loss[0], ref, rtol=1e-6, atol=0)
    n_seq = int((mask.sum(-1) > 0).sum())
    torch.testing.assert_close(loss[0] / n_seq, verl.agg_loss(per_token, mask, "seq-mean-token-sum-norm"),
                               rtol=1e-6, atol=0)  # fmt: skip
