"""PolicyEntropyMonitor and its statistics against float64 brute force written from the formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from entrotrain.callbacks import EntropyCollapseGuard, PolicyEntropyMonitor, policy_entropy_summary
from entrotrain.errors import EntrotrainError
from entrotrain.functional import fit_entropy_reward
from entrotrain.functional.policy import quantile
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.policy_batches import ReturnsBatches, loader, rl_batch, union_of_ranks
from tests.helpers.policy_batches import fit_batches as _fit
from tests.helpers.spy_logger import SpyLogger


def brute_summary(batch: dict, agg: str, top_fraction: float, cov_top_fraction: float) -> dict[str, float]:
    """Token by token in numpy float64."""
    h = batch["token_entropy"].double().numpy()
    lp = batch["logprobs"].double().numpy()
    adv = batch["advantages"].double().numpy()
    if adv.ndim == 1:
        adv = np.repeat(adv[:, None], h.shape[1], axis=1)
    m = batch["response_mask"].numpy() & np.isfinite(h)
    tokens = h[m]
    seq_sums = [h[b][m[b]].sum() for b in range(h.shape[0])]
    seq_counts = [m[b].sum() for b in range(h.shape[0])]
    seqs = [b for b in range(h.shape[0]) if seq_counts[b] > 0]
    mean = {
        "token-mean": tokens.sum() / m.sum(),
        "seq-mean-token-sum": sum(seq_sums[b] for b in seqs) / len(seqs),
        "seq-mean-token-mean": sum(seq_sums[b] / seq_counts[b] for b in seqs) / len(seqs),
        "seq-mean-token-sum-norm": sum(seq_sums[b] for b in seqs) / len(seqs) / h.shape[1],
    }[agg]
    l_, a_ = lp[m], adv[m]
    cov = (l_ - l_.mean()) * (a_ - a_.mean())
    k = math.ceil(top_fraction * tokens.size)
    kc = math.ceil(cov_top_fraction * cov.size)
    pos = np.clip(cov, 0, None)
    return {
        "mean": mean,
        "p10": np.quantile(tokens, 0.1),
        "p50": np.quantile(tokens, 0.5),
        "p90": np.quantile(tokens, 0.9),
        "top": np.sort(tokens)[-k:].mean(),
        "seq_mean": np.mean([seq_sums[b] / seq_counts[b] for b in seqs]),
        "cov_mean": cov.mean(),
        "cov_pos_frac": (cov > 0).mean(),
        "cov_share": np.sort(pos)[-kc:].sum() / pos.sum(),
        "tokens": float(m.sum()),
    }


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summary_matches_brute_force(agg, seed):
    batch = rl_batch(seed, token_advantages=seed == 2)
    got = policy_entropy_summary(
        batch["token_entropy"], batch["logprobs"], batch["advantages"], batch["response_mask"], agg=agg,
        top_fraction=0.25, cov_top_fraction=0.1,
    )
    want = brute_summary(batch, agg, 0.25, 0.1)
    for key in ("mean", "p10", "p50", "p90", "seq_mean", "cov_mean", "cov_pos_frac", "tokens"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-7), key
    assert got["top25_mean"] == pytest.approx(want["top"], rel=1e-6)
    assert got["cov_top10_share"] == pytest.approx(want["cov_share"], rel=1e-6)
    assert got["nonfinite"] == 0


def test_summary_hand_case():
    # two sequences, one masked token; A per sequence +1 / -1
    h = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]])
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    adv = torch.tensor([1.0, -1.0])
    s = policy_entropy_summary(h, lp, adv, mask, top_fraction=0.34, cov_top_fraction=0.34)
    assert s["mean"] == pytest.approx(2.0)  # (1 + 2 + 3) / 3
    assert s["seq_mean"] == pytest.approx(2.25)  # (1.5 + 3) / 2
    assert s["p50"] == pytest.approx(2.0)
    assert s["top34_mean"] == pytest.approx(2.5)  # ceil(0.34 * 3) = 2 tokens: 3 and 2
    # mean logp -2, mean A 1/3: cov = (1)(2/3), (0)(2/3), (-1)(-4/3) -> mean 2/3
    assert s["cov_mean"] == pytest.approx(2 / 3)
    assert s["cov_pos_frac"] == pytest.approx(2 / 3)
    assert s["cov_top34_share"] == pytest.approx(1.0)  # top 2 tokens hold all the positive covariance


def test_nonfinite_tokens_counted_and_excluded():
    batch = rl_batch(4)
    h = batch["token_entropy"].clone()
    h[0, 0] = float("nan")
    h[1, -1] = float("inf")  # may be masked: only valid ones count
    clean = batch["response_mask"].clone()
    clean[0, 0] = False
    clean[1, -1] = False
    s = policy_entropy_summary(h, batch["logprobs"], batch["advantages"], batch["response_mask"])
    expected = int(batch["response_mask"][0, 0]) + int(batch["response_mask"][1, -1])
    assert s["nonfinite"] == expected
    ref = policy_entropy_summary(batch["token_entropy"], batch["logprobs"], batch["advantages"], clean)
    for key in ("mean", "p10", "p90", "cov_mean"):
        assert s[key] == pytest.approx(ref[key]) and math.isfinite(s[key])


def test_quantile_matches_numpy():
    x = torch.randn(1001, generator=torch.Generator().manual_seed(0)).double().sort().values
    for q in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
        assert float(quantile(x, q)) == pytest.approx(float(np.quantile(x.numpy(), q)), abs=1e-12)
    with pytest.raises(EntrotrainError, match="empty"):  # the validated quantile refuses no value (was NaN)
        quantile(torch.empty(0), 0.5)


# ------------------------------------------------------------------------------------------ the law R = -a e^H + b


def test_fit_recovers_the_law_and_matches_polyfit():
    h = torch.linspace(1.5, 0.1, 12, dtype=torch.float64)
    r = -0.3 * torch.exp(h) + 1.2
    fit = fit_entropy_reward(h, r)
    assert fit.a == pytest.approx(0.3) and fit.b == pytest.approx(1.2) and fit.ceiling == pytest.approx(0.9)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 12
    noisy = r + 0.01 * torch.randn(12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    slope, intercept = np.polyfit(np.exp(h.numpy()), noisy.numpy(), 1)
    fit = fit_entropy_reward(h.tolist(), noisy.tolist())
    assert fit.a == pytest.approx(-slope, rel=1e-9) and fit.b == pytest.approx(intercept, rel=1e-9)
    assert fit.predict(0.0) == pytest.approx(fit.ceiling)


@pytest.mark.parametrize(
    "h, r, match",
    [([1.0], [0.5], "at least 2"), ([1.0, 1.0], [0.1, 0.2], "all entropies are equal"),
     ([1.0, float("nan")], [0.1, 0.2], "NaN"), ([1.0, 2.0], [0.1], "one value per step")],
)
def test_fit_rejects_bad_input(h, r, match):
    with pytest.raises(EntrotrainError, match=match):
        fit_entropy_reward(h, r)


# ------------------------------------------------------------------------------------------ the callback


def test_logs_every_n_batches_the_summary_of_the_returned_tensors():
    batches = [rl_batch(s) for s in range(7)]
    spy = SpyLogger()
    monitor = PolicyEntropyMonitor(every_n_batches=3, print_summary=False)
    _fit(batches, monitor, logger=spy)
    rows = [(step, row) for step, row in spy.rows if "entropy/policy/mean" in row]
    assert [step for step, _ in rows] == [0, 3, 6]
    for (step, row) in rows:
        b = batches[step]
        want = brute_summary(b, "token-mean", 0.2, 0.02)
        assert row["entropy/policy/mean"] == pytest.approx(want["mean"], rel=1e-6)
        assert row["entropy/policy/cov_mean"] == pytest.approx(want["cov_mean"], rel=1e-6)
        assert row["entropy/policy/reward_mean"] == pytest.approx(float(b["rewards"].double().mean()))
        assert row["entropy/policy/temperature"] == 1.0
    # realised change since the previous logged batch
    assert rows[1][1]["entropy/policy/delta"] == pytest.approx(
        rows[1][1]["entropy/policy/mean"] - rows[0][1]["entropy/policy/mean"]
    )


def test_predicted_delta_and_reward_fit_recover_planted_laws():
    """Batches whose entropy falls by exactly -eta * Cov and whose reward follows -a e^H + b."""
    eta, a, b = 0.5, 0.2, 1.0
    batches, h = [], 1.6
    for s in range(8):
        batch = rl_batch(10 + s)
        m = batch["response_mask"]
        batch["token_entropy"] = torch.where(m, torch.full_like(batch["token_entropy"], h), 0.0)
        batch["rewards"] = torch.full((m.shape[0],), -a * math.exp(h) + b)
        cov = policy_entropy_summary(batch["token_entropy"], batch["logprobs"], batch["advantages"], m)["cov_mean"]
        batches.append(batch)
        h = h - eta * cov
    spy = SpyLogger()
    monitor = PolicyEntropyMonitor(fit_min_points=3, print_summary=False)
    _fit(batches, monitor, logger=spy)
    last = [row for _, row in spy.rows if "entropy/policy/mean" in row][-1]
    assert last["entropy/policy/eta_eff"] == pytest.approx(eta, rel=1e-6)
    assert last["entropy/policy/delta_predicted"] == pytest.approx(last["entropy/policy/delta"], rel=1e-5, abs=1e-9)
    assert last["entropy/policy/delta_corr"] == pytest.approx(1.0, abs=1e-9)
    assert last["entropy/policy/fit_a"] == pytest.approx(a, rel=1e-6)
    assert last["entropy/policy/fit_b"] == pytest.approx(b, rel=1e-6)
    assert last["entropy/policy/fit_ceiling"] == pytest.approx(b - a, rel=1e-6)
    table = monitor.summary_table()
    assert "ceiling b - a = 0.8000" in table


def test_post_update_entropy_gives_the_within_step_change():
    batches = [rl_batch(s) for s in range(3)]
    for batch in batches:
        batch["post_token_entropy"] = batch["token_entropy"] * 0.5
    spy = SpyLogger()
    _fit(batches, PolicyEntropyMonitor(print_summary=False), logger=spy)
    for step, row in spy.rows:
        if "entropy/policy/mean" in row:
            assert row["entropy/policy/delta"] == pytest.approx(-0.5 * row["entropy/policy/mean"], rel=1e-6)


def test_guard_sees_policy_entropy():
    batches = [rl_batch(s) for s in range(4)]
    for i, batch in enumerate(batches):
        batch["token_entropy"] = batch["token_entropy"] * (0.01 if i >= 2 else 1.0)
    guard = EntropyCollapseGuard(monitor="entropy/policy/mean", threshold=0.05, action="stop")
    with pytest.warns(UserWarning, match="entropy/policy/mean"):
        trainer, _ = _fit(batches, PolicyEntropyMonitor(print_summary=False), guard)
    assert trainer.should_stop and trainer.global_step == 3


def test_missing_outputs_raise_a_clear_error():
    class NoDict(ReturnsBatches):
        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).pow(2).mean()

    trainer = quiet_trainer(max_steps=1, callbacks=[PolicyEntropyMonitor()])
    with pytest.raises(EntrotrainError, match="token_entropy.*logprobs"):
        trainer.fit(NoDict([]), loader(1))


def test_wrong_shapes_raise():
    batch = rl_batch(0)
    batch["logprobs"] = batch["logprobs"][:, :-1]
    with pytest.raises(EntrotrainError, match="'logprobs' has shape"):
        _fit([batch], PolicyEntropyMonitor())
    batch = rl_batch(0)
    batch["rewards"] = batch["rewards"][:-1]
    with pytest.raises(EntrotrainError, match="one reward per sequence"):
        _fit([batch], PolicyEntropyMonitor())


def test_renamed_keys_and_argument_validation():
    batch = rl_batch(0)
    batch["completion_mask"] = batch.pop("response_mask")
    trainer, _ = _fit([batch], PolicyEntropyMonitor(keys={"mask": "completion_mask"}, print_summary=False))
    assert "entropy/policy/mean" in trainer.callback_metrics
    with pytest.raises(EntrotrainError, match="unknown keys"):
        PolicyEntropyMonitor(keys={"masks": "x"})
    with pytest.raises(EntrotrainError, match="agg"):
        PolicyEntropyMonitor(agg="mean")
    with pytest.raises(EntrotrainError, match="every_n_batches"):
        PolicyEntropyMonitor(every_n_batches=0)


def test_monitor_changes_nothing_and_state_round_trips():
    batches = [rl_batch(s) for s in range(4)]
    torch.manual_seed(0)
    _, plain = _fit(batches, EntropyCollapseGuard(monitor="unused", threshold=0.0))
    torch.manual_seed(0)
    monitor = PolicyEntropyMonitor(fit_min_points=2, print_summary=False)
    _, watched = _fit(batches, monitor)
    for p, q in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(p, q)
    clone = PolicyEntropyMonitor(fit_min_points=2)
    clone.load_state_dict(monitor.state_dict())
    assert clone.history == monitor.history and clone.delta_pairs == monitor.delta_pairs


def test_two_rank_ddp_equals_one_process_on_the_union(tmp_path):
    from pathlib import Path

    from tests.helpers.scripts import run_script

    out = tmp_path / "logged.json"
    run_script(Path(__file__).with_name("policy_ddp_run.py"), tmp_path, str(out))
    import json

    logged = json.loads(out.read_text())
    monitor = PolicyEntropyMonitor(fit_min_points=2, print_summary=False)
    _fit(union_of_ranks(3), monitor)
    want = monitor.last_logged
    assert set(logged) == set(want)
    for key, value in want.items():
        assert logged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


@pytest.mark.parametrize("key", ["rewards", "post_token_entropy", "phase_ids"])
def test_accumulated_step_whose_micro_batches_disagree_on_an_optional_key_is_refused(key):
    """Under gradient accumulation the micro-batches of a step are pooled; one that lacks ``rewards`` (or another
    optional key) the others returned used to drop the key for the whole step without a word (no reward mean, no
    fit). It is refused, naming the key and the micro-batches."""
    batches = [rl_batch(s) for s in range(2)]
    for b in batches:
        b["post_token_entropy"] = b["token_entropy"] * 0.9
        b["phase_ids"] = torch.zeros(b["token_entropy"].shape, dtype=torch.long)
    del batches[1][key]
    monitor = PolicyEntropyMonitor(print_summary=False)
    trainer = quiet_trainer(max_steps=1, callbacks=[monitor], accumulate_grad_batches=2)
    with pytest.raises(EntrotrainError, match=rf"micro-batch\(es\) \[0\].*{key!r}.*micro-batch\(es\) \[1\] did not"):
        trainer.fit(ReturnsBatches(batches), loader(2))


def test_accumulated_step_with_every_optional_key_or_different_temperatures():
    """Pooled when every micro-batch returns the key (the reward mean of the whole step); different temperatures
    within one step are refused as across ranks."""
    batches = [rl_batch(s) for s in range(2)]
    monitor = PolicyEntropyMonitor(print_summary=False)
    quiet_trainer(max_steps=1, callbacks=[monitor], accumulate_grad_batches=2).fit(ReturnsBatches(batches), loader(2))
    assert monitor.last_logged["reward_mean"] == pytest.approx(float(torch.cat([b["rewards"] for b in batches]).mean()))
    batches[1]["temperature"] = 0.7
    trainer = quiet_trainer(max_steps=1, callbacks=[PolicyEntropyMonitor(print_summary=False)],
                            accumulate_grad_batches=2)
    with pytest.raises(EntrotrainError, match=r"temperatures \[1.0, 0.7\]"):
        trainer.fit(ReturnsBatches(batches), loader(2))


def test_summarise_leaves_the_callers_mask_as_it_was():
    """The realised ΔH narrowed the mask in place (``mask.bool()`` of a bool mask is the mask itself): the caller's
    ``response_mask`` lost the tokens with a non-finite post-update entropy, and so did the phase lengths computed
    after it. Monitoring changes nothing it is handed."""
    batch = rl_batch(0)
    mask = batch["response_mask"]
    post = batch["token_entropy"].clone()
    post[0, 0] = float("nan")  # a valid token (row 0 is full length)
    before = mask.clone()
    tensors = {"entropy": batch["token_entropy"], "logprobs": batch["logprobs"],
               "advantages": batch["advantages"][:, None].expand_as(mask), "mask": mask, "post_entropy": post,
               "phase_ids": torch.zeros(mask.shape, dtype=torch.long)}
    summary = PolicyEntropyMonitor(print_summary=False).summarise(tensors, 0)
    assert torch.equal(mask, before)
    assert summary["phase0/length"] == pytest.approx(float(before.sum()) / mask.shape[0])


def test_the_mask_rule_reads_a_float_mask_once_per_logging_step(monkeypatch):
    """The summary and the run record's histogram share one check of the (float 0/1, verl-style) host mask: the rule
    (``token_mask``) reads its values once a logging step, not once for each. ``policy_entropy_summary`` still checks
    what it is handed, which is then the bool mask (nothing to read)."""
    import entrotrain.callbacks.policy_monitor as policy_monitor

    real, read = policy_monitor.token_mask, []

    def counted(mask, *args, **kwargs):
        read.append(mask.dtype)
        return real(mask, *args, **kwargs)

    monkeypatch.setattr(policy_monitor, "token_mask", counted)
    batches = [{**b, "response_mask": b["response_mask"].float()} for b in (rl_batch(s) for s in range(4))]
    spy = SpyLogger()
    _fit(batches, PolicyEntropyMonitor(every_n_batches=2, print_summary=False), logger=spy)
    logged = [step for step, row in spy.rows if "entropy/policy/mean" in row]
    assert logged == [0, 2]
    assert read == [torch.float32, torch.bool] * len(logged)


def test_agg_max_length_is_the_constant_length_of_seq_mean_token_sum_norm():
    """Dr. GRPO's mean: sum of the valid entropies / (sequences * L), L the constant, not the padded width."""
    h = torch.ones(2, 4, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    args = (h, -h, torch.zeros(2, dtype=torch.float64), mask)
    assert policy_entropy_summary(*args, agg="seq-mean-token-sum-norm")["mean"] == 4 / (2 * 4)  # L = T = 4
    assert policy_entropy_summary(*args, agg="seq-mean-token-sum-norm", max_length=16)["mean"] == 4 / (2 * 16)
    monitor = PolicyEntropyMonitor(agg="seq-mean-token-sum-norm", agg_max_length=16)
    assert monitor._summarise({"entropy": h, "logprobs": -h, "advantages": args[2], "mask": mask}, 0)["mean"] == 0.125
    with pytest.raises(EntrotrainError, match="agg_max_length.*seq-mean-token-sum-norm"):
        PolicyEntropyMonitor(agg="token-mean", agg_max_length=16)
    with pytest.raises(EntrotrainError, match="agg_max_length"):
        PolicyEntropyMonitor(agg="seq-mean-token-sum-norm", agg_max_length=0)
