"""EntropyCollapseGuard(action="rollback") under FSDP2 (``fully_shard`` per block + root, 2 gloo CPU ranks) in a plain
loop: each rank holds and restores its local shards and Adam moments (tests/integrations/rollback_fsdp2_run.py).

Checked: the parameters really were DTensor shards (one rank's head shard empty: uneven sharding); the guard rolls
back at step 2 on both ranks; right after, each rank's local shards and Adam state (moments' shards, ``step``) equal
those at the end of step 1 bit for bit, and so do the gathered full parameters; the final state equals, bit for bit,
the same FSDP2 training without monitors that skips batch 2 and halves the rate by hand; the full parameters at every
step and the losses equal a one-process run (no FSDP) doing the same rollback on the union batches (float32, only the
order of the gradient average differs: 1e-6); a NaN in one rank's shard skips the take on every rank (the verdict is
all-reduced: without it rank 0 would hold step 1 and rank 1 step 0); a state-dict hook handing out a copy of a shard
is refused before anything is copied; Adam moments dropped after the take come back as DTensors (the next step
equal to one that never lost them); a 2-D mesh and DTensors without ``fully_shard`` are refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests.helpers.scripts import run_script
from tests.helpers.torch_release import needs_torch

SCRIPT = Path(__file__).with_name("rollback_fsdp2_run.py")

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="FSDP2 on CPU needs torch.distributed with gloo",
    ),
    needs_torch(2, 6, "torch.distributed.fsdp.fully_shard is public from torch 2.6"),
]


def _script():
    spec = importlib.util.spec_from_file_location("rollback_fsdp2_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("rollback_fsdp2")
    run_script(SCRIPT, Path(__file__).resolve().parents[2], str(out), "120", timeout=240)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ranks, torch.load(out / "full.pt"), _script().reference()


def test_parameters_were_sharded_unevenly(runs):
    ranks, _, _ = runs
    for r in ranks:
        assert r["sharded"] == sorted(["0.0.weight", "0.0.bias", "1.0.weight", "1.0.bias", "2.weight", "2.bias"])
    assert ranks[0]["shapes"]["2.weight"] == [1, 6] and ranks[1]["shapes"]["2.weight"] == [0, 6]


def test_each_rank_restores_its_shards_and_adam_state_bit_for_bit(runs):
    ranks, full, _ = runs
    for r in ranks:
        assert r["rolled"] == [2], r["rolled"]
        assert r["changed_before"]  # step 2 did move the weights: the equality below is the rollback's
        assert r["local_restored"] and r["adam_restored"] and r["full_restored"]
        assert set(r["adam_step_after"].values()) == {2.0}
        assert r["lrs"] == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.025])
    for name, w in full["after"].items():
        assert torch.equal(w, full["inside"][1][name]), name
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the ranks held different data


def test_training_after_the_rollback_equals_skipping_the_bad_batch_by_hand(runs):
    ranks, _, _ = runs
    for r in ranks:
        assert r["by_hand_local"] and r["by_hand_adam"]


def test_full_parameters_equal_one_process_doing_the_same_rollback(runs):
    ranks, full, ref = runs
    assert ref["rolled"] == [2]
    for step, (mine, theirs) in enumerate(zip(full["inside"], ref["inside"])):
        for name, w in mine.items():
            torch.testing.assert_close(w, theirs["full"][name], rtol=1e-5, atol=1e-6, msg=f"{name} at step {step}")
    for name, w in full["after"].items():
        torch.testing.assert_close(w, ref["after"]["full"][name], rtol=1e-5, atol=1e-6, msg=name)
    for step, loss in enumerate(ref["losses"]):  # the union loss is the mean of the ranks' losses
        assert (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2 == pytest.approx(loss, rel=1e-5, abs=1e-6)


def test_a_nan_on_one_rank_skips_the_take_on_every_rank(runs):
    ranks, _, _ = runs
    for r in ranks:
        assert r["nan"] == {"first": True, "second": False, "held_step": 0, "restored": True}, r["nan"]


def test_a_shard_copy_from_a_state_dict_hook_is_refused_before_copying(runs):
    ranks, _, _ = runs
    for r in ranks:
        assert "'1.0.bias'" in r["copy_refused"]["message"] and "reduce_lr" in r["copy_refused"]["message"]
        assert r["copy_refused"]["untouched"]


def test_dropped_sharded_moments_come_back_as_dtensors(runs):
    ranks, _, _ = runs
    for r in ranks:
        assert r["moments"] == {"specs_equal": True, "next_step_same": True}, r["moments"]


def test_untested_sharding_is_refused(runs):
    ranks, _, _ = runs
    for r in ranks:
        assert "2-D device mesh" in r["hsdp_refused"] and "reduce_lr" in r["hsdp_refused"]
        assert "outside FSDP2's fully_shard" in r["tp_refused"]
