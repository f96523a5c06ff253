"""Non-finite data in the four monitors (DESIGN.md §8): counted, skipped, warned once, never raised, never sent to a
logger as NaN, and a statistic that cannot be computed goes NaN in ``callback_metrics`` instead of standing stale."""

from __future__ import annotations

import math
import warnings

import lightning as L
import numpy as np
import pytest
import torch

from entrotrain.callbacks import (
    AttentionEntropyMonitor,
    PolicyEntropyMonitor,
    RepresentationEntropyMonitor,
    SigmaReparamMonitor,
    policy_entropy_summary,
)
from entrotrain.callbacks._nonfinite import NonFiniteCounter
from entrotrain.functional import finite_row_mask
from entrotrain.callbacks.sigma_reparam_monitor import qk_spectral_norms
from entrotrain.errors import EntrotrainError
from tests.callbacks.repr_ddp_run import ReprNet, data
from tests.helpers import spectral_reference as ref
from tests.helpers.gpt_module import GPTModule
from tests.helpers.lightning_models import TinyLM, quiet_trainer, token_loader
from tests.helpers.policy_batches import ReturnsBatches, loader as policy_loader, rl_batch
from tests.helpers.recorders import Snapshot
from tests.helpers.spy_logger import SpyLogger


class Poison(L.Callback):
    """Sets every parameter to NaN at the start of batch ``at`` (the model "turns NaN")."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


def no_nan_sent(spy: SpyLogger) -> bool:
    return all(math.isfinite(v) for _, row in spy.rows for v in row.values())


def nonfinite_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "NaN/Inf" in str(w.message) or "non-finite" in str(w.message)]


# ------------------------------------------------------------------------------------------ helper module


def test_finite_row_mask_keeps_exactly_the_rows_without_nan_or_inf():
    x = torch.arange(12.0).reshape(4, 3)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    assert finite_row_mask(x).tolist() == [True, False, True, False]
    assert finite_row_mask(torch.ones(0, 3)).shape == (0,)


def test_counter_warns_once_per_fit_and_counts_everything():
    counter = NonFiniteCounter("M", "m/nonfinite")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            counter.add(2, "rows held NaN/Inf", "step 0")
        counter.add(0, "rows held NaN/Inf", "step 1")
        assert counter.total == 6 and len(record) == 1 and "m/nonfinite" in str(record[0].message)
        counter.reset()  # next fit: warned again
        counter.add(1, "rows held NaN/Inf", "step 0")
    assert len(record) == 2 and counter.total == 1


# ------------------------------------------------------------------------------------------ attention


def test_attention_monitor_publishes_nan_not_the_last_healthy_value_when_the_model_turns_nan():
    L.seed_everything(0)
    spy, snap = SpyLogger(), Snapshot()
    monitor = AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[Poison(at=2), monitor, snap], max_steps=4, logger=spy).fit(TinyLM(), token_loader())
    healthy, poisoned = snap.rows[1], snap.rows[2]
    for key in ("entropy/attn_norm/min", "entropy/attn/mean", "entropy/attn/L0/H0", "entropy/attn_norm/L1/mean"):
        assert math.isfinite(healthy[key])
        assert math.isnan(poisoned[key]) and math.isnan(snap.rows[3][key]), key  # never the stale value
    assert healthy["entropy/attn/nonfinite"] == 0 and poisoned["entropy/attn/nonfinite"] > 0
    assert no_nan_sent(spy)
    logged = {step: row for step, row in spy.rows if "entropy/attn/nonfinite" in row}
    assert "entropy/attn_norm/min" in logged[1] and "entropy/attn_norm/min" not in logged[2]
    assert logged[2]["entropy/attn/nonfinite"] == poisoned["entropy/attn/nonfinite"]
    assert len(nonfinite_warnings(record)) == 1  # two poisoned logging steps, one warning


# ------------------------------------------------------------------------------------------ representation


def nan_row_loader(bad: int = 3) -> torch.utils.data.DataLoader:
    ds = data()
    x, y = ds.tensors[0].clone(), ds.tensors[1]
    x[bad, 0, 0] = float("nan")  # one sample of the first batch: its encoder row is all NaN
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


def test_representation_monitor_drops_nan_rows_and_keeps_training():
    L.seed_everything(0)
    model = ReprNet()
    batch = next(iter(nan_row_loader()))[0]
    with torch.no_grad():  # brute force: the finite encoder rows of the first batch at the initial weights
        rows = model.encoder(model.tokens(batch).mean(1)).double()
    clean = rows[torch.isfinite(rows).all(1)].numpy()
    assert len(clean) == 15  # n > d: the streamed (d × d) route is exact
    spy, snap = SpyLogger(), Snapshot()
    monitor = RepresentationEntropyMonitor(
        include=["encoder"], measures=["rankme", "effective_rank", "matrix_entropy"], every_n_steps=1,
        log_spectrum=False, print_summary=False,
    )
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = quiet_trainer(callbacks=[monitor, snap], max_steps=3, logger=spy)
        trainer.fit(model, nan_row_loader())  # the NaN row makes the loss NaN: the model is NaN from step 1 on
    assert trainer.global_step == 3  # training was not stopped
    first = monitor.history[0][1]
    key = "entropy/repr/encoder"
    assert first[f"{key}/nonfinite"] == 1 and first[f"{key}/n_streamed"] == 15 and first[f"{key}/n"] == 15
    assert first[f"{key}/rankme"] == pytest.approx(ref.rankme(clean), rel=1e-6)
    assert first[f"{key}/effective_rank"] == pytest.approx(ref.effective_rank(clean), rel=1e-6)
    assert first[f"{key}/matrix_entropy"] == pytest.approx(ref.matrix_entropy(clean), rel=1e-6)
    # steps 1, 2: no finite row left: NaN in callback_metrics, nothing but the counts to the loggers
    for row in snap.rows[1:]:
        assert math.isnan(row[f"{key}/rankme"]) and math.isnan(row[f"{key}/matrix_entropy"])
        assert row[f"{key}/nonfinite"] == 16
    assert no_nan_sent(spy)
    assert [row[f"{key}/nonfinite"] for _, row in spy.rows if f"{key}/nonfinite" in row] == [1, 16, 16]
    assert len(nonfinite_warnings(record)) == 1
    assert all(math.isfinite(v) for _, row in monitor.history for v in row.values())


# ------------------------------------------------------------------------------------------ σReparam


def test_qk_spectral_norms_nan_only_in_the_heads_that_hold_it():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 2 * 4, 16, generator=g, dtype=torch.float64)
    clean = qk_spectral_norms(w, 2)
    w[4, 3] = float("nan")  # a query row of head 1
    out = qk_spectral_norms(w, 2)
    q, k = w[:8].reshape(2, 4, 16), w[8:16].reshape(2, 4, 16)
    brute = torch.linalg.matrix_norm(q[0].T @ k[0], ord=2)  # float64, C × C product, full SVD
    assert out[0] == pytest.approx(float(brute), rel=1e-10) and out[0] == clean[0]
    assert math.isnan(out[1])
    with pytest.raises(EntrotrainError, match="n_head"):
        qk_spectral_norms(w, 0)
    with pytest.raises(EntrotrainError, match="qkv_weight"):
        qk_spectral_norms(w[0], 2)


def test_sigma_reparam_monitor_counts_a_nan_model_and_never_crashes():
    L.seed_everything(0)
    spy, snap = SpyLogger(), Snapshot()
    monitor = SigmaReparamMonitor(every_n_steps=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = quiet_trainer(callbacks=[Poison(at=1), monitor, snap], max_steps=3, logger=spy)
        trainer.fit(GPTModule(), token_loader_gpt())
    assert trainer.global_step == 3
    healthy, poisoned = snap.rows[0], snap.rows[2]
    assert healthy["sigma_reparam/nonfinite"] == 0 and math.isfinite(healthy["sigma_reparam/qk_norm/max"])
    assert poisoned["sigma_reparam/nonfinite"] > 0
    assert math.isnan(poisoned["sigma_reparam/qk_norm/max"])
    assert math.isnan(poisoned["sigma_reparam/model.blocks.0.attn/qk_norm/H0"])
    assert no_nan_sent(spy)
    assert len(nonfinite_warnings(record)) == 1


def token_loader_gpt() -> torch.utils.data.DataLoader:
    from tests.helpers.gpt_module import SEQ as GSEQ, VOCAB as GVOCAB

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, GVOCAB, (32, GSEQ + 1), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4)


# ------------------------------------------------------------------------------------------ policy


def test_policy_monitor_drops_nan_rewards():
    batches = [rl_batch(i) for i in range(3)]
    batches[1]["rewards"] = batches[1]["rewards"].clone()
    batches[1]["rewards"][2] = float("nan")
    batches[2]["rewards"] = torch.full_like(batches[2]["rewards"], float("nan"))
    spy, snap = SpyLogger(), Snapshot()
    monitor = PolicyEntropyMonitor(print_summary=False, log_media=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[monitor, snap], max_steps=3, logger=spy).fit(ReturnsBatches(batches), policy_loader(3))
    r = batches[1]["rewards"].double()
    expected = float(r[torch.isfinite(r)].sum() / 5)  # brute force: mean of the 5 finite rewards
    assert snap.rows[1]["entropy/policy/reward_mean"] == pytest.approx(expected, rel=1e-6)
    assert snap.rows[1]["entropy/policy/reward_nonfinite"] == 1
    assert math.isnan(snap.rows[2]["entropy/policy/reward_mean"])  # no finite reward: NaN, not batch 1's
    assert snap.rows[2]["entropy/policy/reward_nonfinite"] == 6
    assert math.isfinite(snap.rows[2]["entropy/policy/mean"])
    assert no_nan_sent(spy)
    assert all(math.isfinite(v) for v in monitor.history["reward"])
    assert len(nonfinite_warnings(record)) == 1


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    return float(x.double()[m].sum() / m.sum())


def _cov_mean(b: dict) -> float:
    """Brute force: mean over valid tokens of (log π − mean log π)(A − mean A)."""
    m = b["response_mask"]
    lp = b["logprobs"].double()[m]
    a = b["advantages"].double()[:, None].expand_as(b["logprobs"])[m]
    return float(((lp - lp.mean()) * (a - a.mean())).mean())


def test_policy_monitor_nan_post_entropy_never_poisons_later_predictions():
    batches = [rl_batch(i) for i in range(6)]
    g = torch.Generator().manual_seed(7)
    for b in batches:
        b["post_token_entropy"] = b["token_entropy"] * 0.9 + 0.05 * torch.rand(b["token_entropy"].shape, generator=g)
    batches[2]["post_token_entropy"] = torch.full_like(batches[2]["token_entropy"], float("nan"))
    spy, snap = SpyLogger(), Snapshot()
    monitor = PolicyEntropyMonitor(print_summary=False, log_media=False)
    quiet_trainer(callbacks=[monitor, snap], max_steps=6, logger=spy).fit(ReturnsBatches(batches), policy_loader(6))
    pairs = []  # brute-force (Cov, ΔH) of every batch with a finite post-update entropy
    for i, b in enumerate(batches):
        m = b["response_mask"]
        if i != 2:
            pairs.append((_cov_mean(b), _masked_mean(b["post_token_entropy"], m) - _masked_mean(b["token_entropy"], m)))
    assert math.isnan(snap.rows[2]["entropy/policy/delta"])
    for i in (3, 4, 5):  # η̂ fitted on the finite pairs before batch i (batch 2 left out)
        earlier = pairs[: i - 1]
        c = np.array([p[0] for p in earlier])
        d = np.array([p[1] for p in earlier])
        eta = -float((c * d).sum() / (c * c).sum())
        assert snap.rows[i]["entropy/policy/eta_eff"] == pytest.approx(eta, rel=1e-6)
        assert snap.rows[i]["entropy/policy/delta_predicted"] == pytest.approx(-eta * _cov_mean(batches[i]), rel=1e-6)
    assert no_nan_sent(spy)
    assert all(math.isfinite(v) for v in monitor.delta_pairs["cov"] + monitor.delta_pairs["delta"])


def test_representation_monitor_on_a_dead_layer_publishes_nan_and_never_raises():
    L.seed_everything(0)
    model = ReprNet()
    with torch.no_grad():  # the encoder outputs exact zeros: every spectrum measure is undefined there
        model.encoder[-1].weight.zero_()
        model.encoder[-1].bias.zero_()
        model.encoder[-1].weight.requires_grad_(False)
        model.encoder[-1].bias.requires_grad_(False)
    spy, snap = SpyLogger(), Snapshot()
    monitor = RepresentationEntropyMonitor(
        include=["encoder", "tokens"], measures=["rankme", "effective_rank", "matrix_entropy", "vendi"],
        every_n_steps=1, log_spectrum=True, print_summary=False,
    )
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        trainer = quiet_trainer(callbacks=[monitor, snap], max_steps=2, logger=spy)
        trainer.fit(model, torch.utils.data.DataLoader(data(), batch_size=16))
    assert trainer.global_step == 2
    for measure in ("rankme", "effective_rank", "matrix_entropy", "vendi"):
        assert f"entropy/repr/encoder/{measure}" not in monitor.last_logged
        assert math.isfinite(monitor.last_logged[f"entropy/repr/tokens/{measure}"])  # the live layer is unaffected
    assert monitor.last_logged["entropy/repr/encoder/nonfinite"] == 0  # zeros are finite data, not NaN
    assert no_nan_sent(spy)


# ------------------------------------------------------------------------------------------ non-finite parameters


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AttentionEntropyMonitor(collapse_threshold=float("nan")), "collapse_threshold"),
        (lambda: AttentionEntropyMonitor(overload_threshold=float("inf")), "overload_threshold"),
        (lambda: RepresentationEntropyMonitor(dse_sigma=float("inf")), "dse_sigma"),
        (lambda: RepresentationEntropyMonitor(vendi_q=float("nan")), "vendi_q"),
        (lambda: RepresentationEntropyMonitor(rankme_eps=float("nan")), "rankme_eps"),
        (lambda: PolicyEntropyMonitor(top_fraction=float("nan")), "top_fraction"),
        (lambda: PolicyEntropyMonitor(fit_min_points=2.5), "fit_min_points"),
        (lambda: SigmaReparamMonitor(every_n_steps=2.0), "every_n_steps"),
    ],
)
def test_non_finite_or_mistyped_parameters_are_refused(make, match):
    with pytest.raises(EntrotrainError, match=match):
        make()


def test_policy_entropy_summary_validates_its_tensors():
    b = rl_batch(0)
    args = (b["token_entropy"], b["logprobs"], b["advantages"], b["response_mask"])
    with pytest.raises(EntrotrainError, match=r"logprobs must have shape \(6, 9\)"):
        policy_entropy_summary(args[0], args[1][:, :4], *args[2:])
    with pytest.raises(EntrotrainError, match="advantages"):
        policy_entropy_summary(*args[:2], torch.zeros(5), args[3])
    with pytest.raises(EntrotrainError, match="entropy must have 2 dims"):
        policy_entropy_summary(args[0][0], *args[1:])
    # a NaN advantage of a (B,) vector drops that sequence's tokens only (was: NaN covariance for everyone)
    adv = b["advantages"].clone()
    adv[1] = float("nan")
    s = policy_entropy_summary(args[0], args[1], adv, args[3])
    assert s["nonfinite"] == int(args[3][1].sum()) and all(math.isfinite(v) for v in s.values())


def test_policy_histogram_never_gets_nan(monkeypatch):
    import entrotrain.callbacks.policy_monitor as pm

    drawn: list[torch.Tensor] = []
    monkeypatch.setattr(pm, "record_arrays", lambda trainer, arrays, step: drawn.extend(a.array for a in arrays))
    batches = [rl_batch(i) for i in range(2)]
    batches[0]["token_entropy"] = batches[0]["token_entropy"].clone()
    batches[0]["token_entropy"][0, :3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(callbacks=[PolicyEntropyMonitor(print_summary=False)], max_steps=2).fit(
            ReturnsBatches(batches), policy_loader(2)
        )
    m = batches[0]["response_mask"]
    assert len(drawn) == 2 and torch.isfinite(drawn[0]).all() and len(drawn[0]) == int(m.sum()) - 3


def test_attention_monitor_without_capture_warns_once_and_goes_stale_free():
    from tests.helpers.lightning_models import HandAttention

    L.seed_everything(0)
    snap = Snapshot()
    monitor = AttentionEntropyMonitor(every_n_steps=1, strict=False, log_media=False, print_summary=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        quiet_trainer(callbacks=[monitor, snap], max_steps=3).fit(TinyLM(HandAttention), token_loader())
    assert len([w for w in record if "captured no attention" in str(w.message)]) == 1
    assert not any(k.startswith("entropy/") for row in snap.rows for k in row)
