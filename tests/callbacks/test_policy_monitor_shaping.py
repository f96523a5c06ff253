"""PolicyEntropyMonitor's token-shaping statistics (window entropy / HWE, per-phase entropy and length, the
entropy–length correlation) against a float64 brute force, the default keys unchanged, NaN tokens skipped, training
untouched, and 2-rank gloo DDP equal to one process on the union batch."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor
from entrotrain.errors import EntrotrainError
from tests.callbacks.policy_shaping_ddp_run import MONITOR, phased_batch
from tests.helpers.policy_batches import fit_batches as _fit
from tests.helpers.policy_batches import rl_batch, union_of_ranks
from tests.helpers.scripts import run_script
from tests.helpers.token_shaping_reference import window_reference

NEW = ("window_", "hwe_frac", "phase", "entropy_length_corr")


def brute(batch: dict, window: int, threshold: float, align: str = "forward") -> dict[str, float]:
    """Token by token in float64 from the definitions."""
    h = batch["token_entropy"].double()
    mask = batch["response_mask"].bool()
    valid = mask & torch.isfinite(h)
    wm, wc = window_reference(torch.where(valid, h, 0.0), valid, window, align)
    vals = np.array([float(wm[b, t]) for b in range(h.shape[0]) for t in range(h.shape[1]) if wc[b, t] > 0])
    out = {
        "window_mean": vals.mean(),
        "window_p50": np.quantile(vals, 0.5),
        "window_p90": np.quantile(vals, 0.9),
        "hwe_frac": float((vals >= threshold).mean()),
    }
    phases = batch["phase_ids"]
    rows = h.shape[0]
    for k in range(2):
        toks = [float(h[b, t]) for b in range(rows) for t in range(h.shape[1]) if valid[b, t] and phases[b, t] == k]
        if toks:
            out[f"phase{k}/mean"] = sum(toks) / len(toks)
        out[f"phase{k}/length"] = sum(int(mask[b, t] and phases[b, t] == k) for b in range(rows)
                                      for t in range(h.shape[1])) / rows  # fmt: skip
    seqs = [b for b in range(rows) if valid[b].any()]
    ent = [float(h[b][valid[b]].mean()) for b in seqs]
    length = [float(mask[b].sum()) for b in seqs]
    out["entropy_length_corr"] = float(np.corrcoef(ent, length)[0, 1])
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("align", ["forward", "centred"])
def test_shaping_stats_match_brute_force(seed, align):
    batch = phased_batch(seed)
    monitor = PolicyEntropyMonitor(window=3, window_align=align, hwe_threshold=1.0, entropy_length_corr=True,
                                   print_summary=False)  # fmt: skip
    _fit([batch], monitor)
    got = monitor.last_logged
    for key, value in brute(batch, 3, 1.0, align).items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_default_keys_unchanged_and_phase_keys_follow_the_data():
    batch = rl_batch(0)
    monitor = PolicyEntropyMonitor(print_summary=False)
    _fit([batch], monitor)
    assert not [k for k in monitor.last_logged if k.startswith(NEW)]
    monitor = PolicyEntropyMonitor(print_summary=False)
    _fit([phased_batch(0)], monitor)  # phase ids in the batch: per-phase keys, nothing else new
    new = sorted(k for k in monitor.last_logged if k.startswith(NEW))
    assert new == ["phase0/length", "phase0/mean", "phase1/length", "phase1/mean"]


def test_empty_phase_has_length_zero_and_no_mean():
    batch = phased_batch(3)
    batch["phase_ids"] = torch.where(batch["response_mask"], 0, -1)
    monitor = PolicyEntropyMonitor(n_phases=3, print_summary=False)
    _fit([batch], monitor)
    got = monitor.last_logged
    assert got["phase1/length"] == 0.0 and got["phase2/length"] == 0.0
    assert "phase1/mean" not in got and "phase2/mean" not in got
    assert got["phase0/length"] == pytest.approx(float(batch["response_mask"].sum()) / 6)


def test_nan_tokens_are_skipped_like_masked_tokens_but_counted_in_lengths():
    batch = phased_batch(4)
    poisoned = {k: (v.clone() if hasattr(v, "clone") else v) for k, v in batch.items()}
    poisoned["token_entropy"][0, 2] = float("nan")
    monitor = PolicyEntropyMonitor(**{**MONITOR})
    _fit([poisoned], monitor)
    got = monitor.last_logged
    want = brute(poisoned, 3, 1.0)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert all(math.isfinite(v) for v in got.values())
    assert got["nonfinite"] == 1.0


def test_monitor_never_changes_training_and_prints_the_contrast(capsys):
    batches = [phased_batch(s) for s in range(3)]
    torch.manual_seed(0)
    _, bare = _fit(batches, PolicyEntropyMonitor(print_summary=False, every_n_batches=10**6))
    torch.manual_seed(0)
    _, watched = _fit(batches, PolicyEntropyMonitor(window=4, entropy_length_corr=True))
    for p, q in zip(bare.parameters(), watched.parameters()):
        assert torch.equal(p, q)
    text = capsys.readouterr().out
    assert "hwe_frac" in text and "phase1/length" in text and "entropy_length_corr" in text


def test_bad_arguments_and_mis_shaped_phase_ids():
    for kwargs, word in [
        ({"window": 0}, "window"),
        ({"window_align": "left"}, "window_align"),
        ({"hwe_threshold": float("nan")}, "hwe_threshold"),
        ({"entropy_length_corr": 1}, "entropy_length_corr"),
        ({"n_phases": 0}, "n_phases"),
    ]:
        with pytest.raises(EntrotrainError, match=word):
            PolicyEntropyMonitor(**kwargs)
    batch = phased_batch(0)
    batch["phase_ids"] = batch["phase_ids"][:, :4]
    with pytest.raises(EntrotrainError, match="phase_ids"):
        _fit([batch], PolicyEntropyMonitor(print_summary=False))
    batch = phased_batch(0)
    with pytest.raises(EntrotrainError, match="n_phases"):
        _fit([batch], PolicyEntropyMonitor(n_phases=1, print_summary=False))


def test_two_rank_ddp_equals_one_process_on_the_union(tmp_path):
    out = tmp_path / "logged.json"
    run_script(Path(__file__).with_name("policy_shaping_ddp_run.py"), tmp_path, str(out))
    logged = json.loads(out.read_text())
    monitor = PolicyEntropyMonitor(**MONITOR)
    _fit(union_of_ranks(3, make=phased_batch), monitor)
    want = monitor.last_logged
    assert set(logged) == set(want) and "hwe_frac" in want and "phase1/mean" in want
    for key, value in want.items():
        assert logged[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
