"""Under DDP a rank that captured less than the others (no forward at a logging step, or a forward through only
some attention sites / routers) still joins AttentionEntropyMonitor's and RouterEntropyMonitor's reduce, so no rank is
left waiting (a hang), and every rank publishes the values one process gets on the union of the ranks' captures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.scripts import run_script

SCRIPT = Path(__file__).with_name("monitor_rank_join_run.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks got: one script run for both tests (~15 s)."""
    out = tmp_path_factory.mktemp("rank_join")
    run_script(SCRIPT, out, str(out), timeout=240)  # a rank left waiting in a reduce: killed at 180 s, fails here
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_rank_with_less_or_no_capture_joins_the_reduce_and_publishes_the_union_values(ranks):
    reference = ranks[0]["reference"]
    for case, expected in reference.items():
        for path in ("driver", "lightning"):
            for r in range(2):
                got = ranks[r][f"{path}/{case}"]
                assert got.keys() == expected.keys(), (path, case, r)
                assert got == pytest.approx(expected, abs=1e-12), (path, case, r)
    assert reference["rank1_one_site"]  # the cases score something (not only empty dicts)
    assert reference["nobody"] == {"entropy/attn/nonfinite": 0.0}  # sites known, no row scored: no statistic
    assert ranks[0]["site_names"] == ranks[1]["site_names"] == ["blocks.0", "blocks.1"]


@pytest.mark.parametrize("monitor", ["router", "representation"])
def test_a_rank_with_less_or_no_router_or_representation_capture_joins_the_reduce(ranks, monitor):
    for case in ("rank1_nothing_first_step", "rank1_one_site", "rank0_nothing", "nobody"):
        expected = ranks[0][f"{monitor}/reference/{case}"]
        for path in ("driver", "lightning"):
            for r in range(2):
                got = ranks[r][f"{monitor}/{path}/{case}"]
                if expected == "TapError":
                    assert got == "TapError", (path, case, r)
                else:
                    assert got == pytest.approx(expected, abs=1e-12, nan_ok=True), (path, case, r)
    assert ranks[0][f"{monitor}/reference/nobody"] == "TapError"  # no rank captured: every rank raises
    assert isinstance(ranks[0][f"{monitor}/reference/rank1_one_site"], dict)


def test_policy_ranks_agree_on_the_tensors_they_returned_before_the_gather(ranks):
    """PolicyEntropyMonitor under DDP: an optional tensor (rewards, post-update entropy, phase ids) that one rank's
    training_step returned and the other's did not, different temperatures, no tensors on one rank, or (under gradient
    accumulation) one rank's micro-batches that disagree on rewards, is the same error on both ranks naming it (before:
    the ranks issued different gathers, a hang or gloo's size mismatch, or one rank raised alone); float32 on one rank
    and float64 on the other is gathered as one process concatenates them."""
    expected = {"rewards_on_rank0": "rank(s) [0] returned 'rewards' from training_step and the others did not",
                "post_entropy_on_rank1": "rank(s) [1] returned 'post_token_entropy' from training_step and the others",
                "phases_on_rank0": "rank(s) [0] returned 'phase_ids' from training_step and the others did not",
                "temperatures_differ": "the ranks gave the temperatures [1.0, 0.7] (in rank order)",
                "rank1_no_tensors": "reads per-token tensors from what training_step returns, but got ['loss']",
                "pooled_rewards_on_rank0": "rank(s) [0] could not read their batch (raised on every rank): rank 0: "
                "PolicyEntropyMonitor: under gradient accumulation micro-batch(es) [0] of the optimizer step returned "
                "'rewards' from training_step and micro-batch(es) [1] did not"}
    for case, phrase in expected.items():
        for r in range(2):
            error = ranks[r][f"policy/lightning/{case}"].get("error", "")
            assert phrase in error, (case, r, error)
            assert "at batch 0" in error, (case, r, error)
        # the same error on every rank (before: a rank that could not read its batch, or pool its accumulated
        # micro-batches, raised its own error and the others one naming it)
        assert ranks[0][f"policy/lightning/{case}"] == ranks[1][f"policy/lightning/{case}"], case
    for r in range(2):  # one exchange of what each rank holds, then one gather per tensor (4 + rewards)
        for case in expected:
            assert ranks[r][f"policy/collectives/{case}"] == ["all_gather_object"], (case, r)
        assert ranks[r]["policy/collectives/dtypes_differ"] == ["all_gather_object"] + ["all_gather"] * 5, r
    # rank 1 alone could not read its batch: an error naming rank 1 on both (before: rank 1 raised alone and rank 0
    # waited for it in the gather)
    assert "rank(s) [1] could not read their batch" in ranks[0]["policy/lightning/rank1_no_tensors"]["error"]
    reference = ranks[0]["policy/reference/dtypes_differ"]
    assert reference["entropy/policy/reward_mean"] > 0  # the union's statistics, rewards included
    for r in range(2):
        assert ranks[r]["policy/lightning/dtypes_differ"] == pytest.approx(reference, abs=1e-12), r
