"""EntrotrainRLOOTrainer: GRPO's keys, values recomputed in float64 from the tensors TRL computed (sequence advantages
broadcast over tokens), monitoring changes nothing, resume, run record, policy_loss refused.

TRL is an optional extra: the whole module is skipped without it. Every run is a tiny Qwen2 on CPU (seconds); the
2-rank run (trl_rloo_ddp_run.py, forked gloo ranks) takes about 20 s.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import numpy as np
import pytest
import torch

pytest.importorskip("trl")

from trl import RLOOTrainer  # noqa: E402

from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations._trl_stats import LOGPS_KEY, STATS_FILE  # noqa: E402
from entrotrain.integrations.trl_rloo import EntrotrainRLOOTrainer  # noqa: E402
from entrotrain.regularizers.policy_loss import ClipCovLoss  # noqa: E402
from tests.integrations.test_trl import EntrotrainGRPOTrainer, _inputs, _model, _train, _trainer  # noqa: E402

PREFIX = "entropy/policy/"


def _rows(trainer) -> list[dict]:
    return [r for r in trainer.state.log_history if "loss" in r]


def _spy(trainer) -> dict:
    """Record, per optimizer step (global_step while it runs), every micro-batch's TRL inputs and TRL's entropies of
    the loss's forward, and TRL's rewards_per_func, by wrapping the instance's methods (the adapter's still run)."""
    seen: dict = {"batches": defaultdict(list), "rewards": defaultdict(list), "last": None}
    get, loss, rewards = (trainer._get_per_token_logps_and_entropies, trainer._compute_loss,
                          trainer._calculate_rewards)  # fmt: skip

    def spy_get(*args, **kwargs):
        out = get(*args, **kwargs)
        if kwargs.get("compute_entropy"):
            seen["last"] = (out[0].detach().clone(), out[1].detach().clone())
        return out

    def spy_loss(model, inputs):
        out = loss(model, inputs)
        logps, entropy = seen["last"]
        batch = {k: v.clone() for k, v in inputs.items() if torch.is_tensor(v)}
        seen["batches"][trainer.state.global_step].append({**batch, "entropy": entropy, "logps": logps})
        return out

    def spy_rewards(*args, **kwargs):
        out = rewards(*args, **kwargs)
        seen["rewards"][trainer.state.global_step].append(out.clone())
        return out

    trainer._get_per_token_logps_and_entropies, trainer._compute_loss = spy_get, spy_loss
    trainer._calculate_rewards = spy_rewards
    return seen


def _reference64(batches: list[dict], rewards: torch.Tensor) -> dict[str, float]:
    """PolicyEntropyMonitor's statistics, brute force in float64 (numpy) on the union of the micro-batches: token
    entropies, rollout log-probs, each sequence's advantage repeated over its valid tokens."""
    h, lp, adv, seq_means = [], [], [], []
    for b in batches:
        mask = b["completion_mask"].bool()
        for i in range(mask.shape[0]):
            valid = mask[i].numpy()
            hi = b["entropy"][i].double().numpy()[valid]
            h.extend(hi.tolist())
            lp.extend(b[LOGPS_KEY][i].double().numpy()[valid].tolist())
            adv.extend([float(b["advantages"][i])] * int(valid.sum()))
            if valid.any():
                seq_means.append(hi.sum() / (hi.size + 1e-8))  # verl's seq-mean-token-mean (its 1e-8)
    h, lp, adv = np.array(h), np.array(lp), np.array(adv)
    cov = (lp - lp.mean()) * (adv - adv.mean())
    pos = np.clip(cov, 0, None)
    k_top = max(1, math.ceil(0.2 * h.size))
    k_cov = max(1, math.ceil(0.02 * cov.size))
    return {
        "mean": h.mean(), "tokens": float(h.size), "nonfinite": 0.0,
        "p10": np.quantile(h, 0.1), "p50": np.quantile(h, 0.5), "p90": np.quantile(h, 0.9),
        "top20_mean": np.sort(h)[::-1][:k_top].mean(), "seq_mean": float(np.mean(seq_means)),
        "cov_mean": cov.mean(), "cov_pos_frac": float((cov > 0).mean()),
        "cov_top2_share": np.sort(pos)[::-1][:k_cov].sum() / pos.sum() if pos.sum() > 0 else 0.0,
        "reward_mean": float(np.nanmean(rewards.double().numpy())),
    }  # fmt: skip


# --------------------------------------------------------------------------------------------- refusals


def test_policy_loss_is_refused_naming_why_and_the_grpo_trainer(tmp_path):
    with pytest.raises(EntrotrainError, match="sequence-level") as err:
        _trainer(EntrotrainRLOOTrainer, tmp_path, policy_loss=ClipCovLoss())
    assert "EntrotrainGRPOTrainer" in str(err.value) and "ClipCovLoss" in str(err.value)


def test_unsupported_trl_and_bad_statistic_arguments_are_refused(tmp_path, monkeypatch):
    with pytest.raises(EntrotrainError, match="stats_agg"):
        _trainer(EntrotrainRLOOTrainer, tmp_path, stats_agg="mean")
    with pytest.raises(EntrotrainError, match="fit_min_points"):
        _trainer(EntrotrainRLOOTrainer, tmp_path, fit_min_points=1)
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(EntrotrainError, match=r"1\.17\.0.*trl>=1\.16,<1\.17"):
        _trainer(EntrotrainRLOOTrainer, tmp_path)


# --------------------------------------------------------------------------------------------- keys and values


def test_keys_are_the_grpo_trainers(tmp_path):
    grpo = _trainer(EntrotrainGRPOTrainer, tmp_path / "g", max_steps=2)
    rloo = _trainer(EntrotrainRLOOTrainer, tmp_path / "r", max_steps=2)
    _train(grpo)
    _train(rloo)
    for a, b in zip(_rows(grpo), _rows(rloo), strict=True):
        keys_a = {k for k in a if k.startswith(PREFIX)}
        keys_b = {k for k in b if k.startswith(PREFIX)}
        assert keys_b == keys_a and f"{PREFIX}cov_mean" in keys_b
    assert f"{PREFIX}delta" in _rows(rloo)[-1]


def test_values_are_the_monitors_statistics_on_trls_tensors_in_float64(tmp_path):
    """Two micro-batches a step (their union), logged on steps 1 and 2 of 3, num_iterations=2 (step 2 trains again
    on step 1's rollout, so rollout and current log-probs differ): each logged row equals the float64 reference on
    what TRL computed during that step."""
    t = _trainer(EntrotrainRLOOTrainer, tmp_path, max_steps=3, logging_steps=2, logging_first_step=True,
              gradient_accumulation_steps=2, num_iterations=2)
    seen = _spy(t)
    _train(t)
    rows = {r["step"]: r for r in _rows(t)}
    assert sorted(rows) == [1, 2] and sorted(seen["batches"]) == [0, 1, 2]
    for step in (1, 2):
        batches = seen["batches"][step - 1]
        assert len(batches) == 2
        for b in batches:  # the rollout log-probs are TRL's: their masked sum is TRL's own old_logps, bit for bit
            assert torch.equal((b[LOGPS_KEY] * b["completion_mask"]).sum(1), b["old_logps"])
        (per_func,) = seen["rewards"][max(g for g in seen["rewards"] if g < step)]  # the rollout trained on
        want = _reference64(batches, per_func @ t.reward_weights)
        got = {k[len(PREFIX):]: v for k, v in rows[step].items() if k.startswith(PREFIX)}
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (step, key)
        assert got["temperature"] == t.temperature
        # the captured entropies are TRL's: its `entropy` metric averages the micro-batches' token-means
        trl_means = [float((b["entropy"] * b["completion_mask"]).sum() / b["completion_mask"].sum()) for b in batches]
        assert rows[step]["entropy"] == pytest.approx(sum(trl_means) / 2, rel=1e-5)
        if "reward" in rows[step]:  # TRL logs its reward on the steps that generate
            assert got["reward_mean"] == pytest.approx(rows[step]["reward"], rel=1e-6)
    assert sorted(seen["rewards"]) == [0, 2] and "reward" not in rows[2]
    # step 2 reuses step 1's rollout: its log-probs (the statistics') are not the loss's current ones
    assert any(not torch.allclose(b[LOGPS_KEY], b["logps"], atol=1e-4) for b in seen["batches"][1])
    assert f"{PREFIX}delta" in rows[2] and f"{PREFIX}delta" not in rows[1]
    assert len(t.policy_stats.state_dict()["history"]["entropy"]) == 2  # step 3 (not logged) was not recorded


def test_the_covariance_uses_each_sequences_advantage_over_its_tokens(tmp_path):
    """The broadcast is what makes cov_mean: repeating a per-sequence advantage per token differs from a token-mean
    of per-sequence products, and only the former matches the logged value."""
    t = _trainer(EntrotrainRLOOTrainer, tmp_path, max_steps=1)
    seen = _spy(t)
    _train(t)
    (b,) = seen["batches"][0]
    got = _rows(t)[0][f"{PREFIX}cov_mean"]
    mask = b["completion_mask"].bool()
    lp = b[LOGPS_KEY].double()
    adv = b["advantages"].double()[:, None].expand_as(lp)
    cov = ((lp - lp[mask].mean()) * (adv - adv[mask].mean()))[mask].mean()
    per_seq = (lp * mask).sum(1) / mask.sum(1).clamp(min=1)  # a sequence-level covariance instead
    seq_cov = ((per_seq - per_seq.mean()) * (b["advantages"].double() - b["advantages"].double().mean())).mean()
    assert got == pytest.approx(float(cov), rel=1e-9, abs=1e-12)
    assert not got == pytest.approx(float(seq_cov), rel=1e-3)


# --------------------------------------------------------------------------------------------- monitoring is inert


def test_loss_gradients_and_weights_are_bit_identical_with_and_without_statistics(tmp_path):
    model = _model()
    plain = _trainer(RLOOTrainer, tmp_path / "a", model=copy.deepcopy(model), max_steps=3, logging_steps=2)
    watched = _trainer(EntrotrainRLOOTrainer, tmp_path / "b", model=copy.deepcopy(model), max_steps=3, logging_steps=2)
    # one hand-made micro-batch through _compute_loss with the capture armed: loss and gradients
    inputs = {k: v for k, v in _inputs(3).items() if k not in ("old_noise", "num_items_in_batch")}
    inputs["old_logps"] = torch.randn(inputs["advantages"].shape[0])
    grads = []
    watched._stats_armed = lambda: True  # arm the capture for this call (before train() no step is a logging step)
    for t in (plain, watched):
        t.model.train()
        t.model.zero_grad(set_to_none=True)
        loss = t._compute_loss(t.model, dict(inputs))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in t.model.named_parameters()}))
    del watched._stats_armed
    assert watched.policy_stats.pending  # the capture ran
    assert torch.equal(grads[0][0], grads[1][0])
    for name, g in grads[0][1].items():
        assert torch.equal(g, grads[1][1][name]), name
    watched.policy_stats.clear()
    _train(plain)
    _train(watched)
    for (name, pa), (_, pb) in zip(plain.model.named_parameters(), watched.model.named_parameters()):
        assert torch.equal(pa, pb), name
    assert [r["loss"] for r in _rows(plain)] == [r["loss"] for r in _rows(watched)]
    assert [r["step"] for r in _rows(watched) if f"{PREFIX}mean" in r] == [2]
    assert any(not torch.equal(p, q) for p, q in zip(plain.model.parameters(), model.parameters()))  # it trained


# --------------------------------------------------------------------------------------------- resume and record


def test_resume_continues_the_statistics(tmp_path):
    t = _trainer(EntrotrainRLOOTrainer, tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2,
              fit_min_points=2)
    _train(t)
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / STATS_FILE).exists()
    fresh = _trainer(EntrotrainRLOOTrainer, tmp_path / "b", max_steps=3, fit_min_points=2)
    fresh.train(resume_from_checkpoint=str(ckpt))
    before = t.policy_stats.state_dict()["history"]["entropy"]
    after = fresh.policy_stats.state_dict()["history"]["entropy"]
    assert len(before) == 2 and after[:2] == before and len(after) == 3  # restored, then extended
    (row,) = [r for r in _rows(fresh) if r["step"] == 3]
    assert f"{PREFIX}delta" in row and f"{PREFIX}fit_ceiling" in row  # ΔH and the fit use the restored history
    assert row[f"{PREFIX}delta"] == pytest.approx(row[f"{PREFIX}mean"] - before[-1], rel=1e-9, abs=1e-12)


def test_run_record_is_written_and_read_by_entrotrain_status(tmp_path, capsys):
    from entrotrain.cli import main
    from entrotrain.dashboards.run_reader import load_run
    from entrotrain.integrations.transformers import EntropyTrainerCallback

    t = _trainer(EntrotrainRLOOTrainer, tmp_path / "out", max_steps=2, run_name="rloo-rec")
    EntropyTrainerCallback(record=tmp_path / "runs").attach(t)
    _train(t)
    (run_dir,) = sorted((tmp_path / "runs" / "records").iterdir())
    run = load_run(run_dir)
    steps, values = run.scalars[f"{PREFIX}mean"]
    assert steps.tolist() == [1, 2] and values.tolist() == [r[f"{PREFIX}mean"] for r in _rows(t)]
    assert [m.step for m in run.media.get(f"{PREFIX}hist", [])] == [1, 2]
    assert run.status == "finished" and run.meta["name"] == "rloo-rec"
    capsys.readouterr()
    main(["status", str(run_dir)])
    out = capsys.readouterr().out
    assert "rloo-rec" in out and "finished" in out


# --------------------------------------------------------------------------------------------- DDP


def test_two_ranks_log_the_statistics_of_the_union_batch(tmp_path):
    """2 forked CPU ranks (gloo): every rank logs the float64 reference on the union of both ranks' micro-batches
    (TRL's tensors), with TRL's reward gathered over ranks, i.e. one process's statistics on the union batch."""
    from pathlib import Path

    from tests.helpers.scripts import run_script

    here = Path(__file__)
    run_script(here.with_name("trl_rloo_ddp_run.py"), here.resolve().parents[2], str(tmp_path), timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for step in (1, 2):
        batches = ranks[0]["batches"][step - 1] + ranks[1]["batches"][step - 1]
        assert [b["completion_mask"].shape[0] for b in batches] == [4, 4]
        (per_func,) = ranks[0]["rewards"][step - 1]  # gathered: all 8 completions
        assert per_func.shape[0] == 8
        want = _reference64(batches, per_func.sum(1))
        for rank in ranks:
            got = {k[len(PREFIX):]: v for k, v in rank["rows"][step - 1].items() if k.startswith(PREFIX)}
            for key, value in want.items():
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (step, key)
