"""Every monitor and the attention/representation regularisers under FSDP2 (``ModelParallelStrategy`` +
``fully_shard``, 2 CPU ranks, gloo) give the values of one process (issue 13, "Scale-out beyond DDP").

One subprocess launch (fsdp2_run.py) trains tests/helpers/fsdp_models.py's FSDPLM for 3 steps with
AttentionEntropyMonitor, RepresentationEntropyMonitor, RouterEntropyMonitor, PolicyEntropyMonitor and two
PredictionEntropyMonitors (``source="output"`` with probe + generation, ``source="head"`` with probe), logging every
step, with AEM + entropy floor + matrix-entropy regulariser in the loss. The reference is one process (no FSDP) on
the union of the two ranks' batches with ``chunks=2``: one forward per rank's half, the loss the mean of the halves'
losses, which is what FSDP's gradient averaging computes (the regularisers score each rank's local batch: their
documented data-parallel semantics; the test shows that rank ``r``'s terms are the reference's chunk ``r`` terms).

Tolerance (float32 training, float64 statistics): the two runs do the same float32 arithmetic except the order of
the gradient average (FSDP's reduce-scatter ``(g0 + g1) / 2`` vs autograd's sum over the union), so after 3 SGD
steps weights and losses agree to ``1e-5`` relative / ``1e-6`` absolute, and every published statistic to ``1e-5``
relative / ``1e-5`` absolute. Measured: losses equal, weights within 6e-8, the ~400 published values within 3.5e-6
relative (the worst: the entropy–reward fit of PolicyEntropyMonitor on 2–3 points, which amplifies rounding).

Found and fixed on the way (each hung or leaked under FSDP2): PredictionEntropyMonitor skipped the probe forward on a
rank with no probe row and InformationPlaneMonitor ran fewer probe forwards on some ranks — FSDP's all-gathers are
collectives, so the other rank waited forever; both also left the FSDP2 root gathered after their no-grad forwards
(:func:`entrotrain.functional._dist.reshard_fsdp`; ``test_parameters_were_sharded`` fails without it). The test also
checks that the parameters really were sharded (DTensors), that one process would see different numbers on one
rank's half (so an equality cannot come from a rank logging only its own data), and that the same FSDP2 training
without monitors ends bit-identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.fsdp_models import STEPS, WORLD, FSDPLM, dataset, monitors, union_loader
from tests.helpers.scripts import run_script
from tests.helpers.spy_logger import SpyLogger
from tests.helpers.torch_release import needs_torch

SCRIPT = Path(__file__).with_name("fsdp2_run.py")
REL, ABS = 1e-5, 1e-5
INFO_KEY = "info/L1/kde/I_XT"  # the InformationPlaneMonitor on cls_head

pytestmark = [
    pytest.mark.skipif(
        not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
        reason="FSDP2 on CPU needs torch.distributed with gloo",
    ),
    needs_torch(2, 6, "torch.distributed.fsdp.fully_shard is public from torch 2.6"),
]


def _by_key(rows: list) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for step, metrics in rows:
        for key, value in metrics.items():
            out.setdefault(key, {})[int(step)] = float(value)
    return out


def _one_process(loader: torch.utils.data.DataLoader, chunks: int) -> tuple[FSDPLM, SpyLogger]:
    L.seed_everything(3)
    model = FSDPLM(chunks=chunks)
    spy = SpyLogger()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, callbacks=monitors(), logger=spy, log_every_n_steps=1, max_steps=STEPS,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return model, spy


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    with pytest.MonkeyPatch.context() as mp:
        # module scope runs before conftest's per-test fixture that drops TRITON_INTERPRET (conftest sets it on CPU
        # machines with triton): with it, the regularisers' attention-entropy backward goes to the Triton kernel
        # (interpreted), whose dq backward writes with the strides of q (a strided view of the fused qkv) into a
        # contiguous torch.empty_like(q): out of bounds, and both these processes and the reference below die in
        # glibc ("free(): invalid size")
        mp.delenv("TRITON_INTERPRET", raising=False)
        mp.setenv("WANDB_MODE", "disabled")
        run_script(SCRIPT, out, str(out), "240", timeout=300)
        fsdp = {
            "logged": json.loads((out / "logged.json").read_text()),
            "ranks": [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)],
            "weights": torch.load(out / "weights.pt"),
            "unmonitored": torch.load(out / "weights_unmonitored.pt"),
        }
        model, spy = _one_process(union_loader(dataset()), chunks=WORLD)
    return fsdp, model, spy


def test_parameters_were_sharded(runs):
    fsdp, model, _ = runs
    names = {n for n, _ in model.named_parameters()}
    assert set(fsdp["logged"]["sharded"]) == names  # fully_shard per block, MoE and root: every parameter a DTensor


def test_losses_regulariser_terms_and_weights_equal_one_process(runs):
    fsdp, model, _ = runs
    for rank, record in enumerate(fsdp["ranks"]):
        assert len(record["losses"]) == STEPS
        for step in range(STEPS):
            (loss,) = record["losses"][step]
            assert loss == pytest.approx(model.losses[step][rank], rel=REL, abs=1e-6), (rank, step)
            (parts,) = record["parts"][step]
            assert set(parts) == set(model.parts[step][rank]) == {"aem", "entropy_floor", "matrix_entropy"}
            for name, value in parts.items():
                assert value == pytest.approx(model.parts[step][rank][name], rel=REL, abs=1e-6), (rank, step, name)
    assert fsdp["ranks"][0]["losses"] != fsdp["ranks"][1]["losses"]  # the ranks really held different data
    for name, p in model.named_parameters():
        torch.testing.assert_close(fsdp["weights"][name], p.detach(), rtol=REL, atol=1e-6, msg=name)


def test_monitoring_does_not_change_fsdp2_training(runs):
    """The same FSDP2 fit without any monitor (in the same processes) ends with bit-identical parameters: the probe,
    generation and information-plane forwards and the reshards change nothing."""
    fsdp, _, _ = runs
    assert set(fsdp["weights"]) == set(fsdp["unmonitored"])
    for name, w in fsdp["weights"].items():
        assert torch.equal(w, fsdp["unmonitored"][name]), name


def test_every_published_statistic_equals_one_process_on_the_union(runs):
    fsdp, _, spy = runs
    got, want = _by_key(fsdp["logged"]["rows"]), _by_key(spy.rows)
    assert set(got) == set(want)
    families = {k.split("/")[1] for k in got}
    assert {"attn", "attn_norm", "repr", "router", "policy", "pred", "pred_head"} <= families
    assert any(k.startswith("info/") for k in got)
    for key, steps in want.items():
        assert set(got[key]) == set(steps) == set(range(STEPS)) or key.startswith("entropy/policy/"), key
        for step, value in steps.items():
            assert step in got[key], (key, step)
            if math.isnan(value):
                assert math.isnan(got[key][step]), (key, step)
            else:
                assert got[key][step] == pytest.approx(value, rel=REL, abs=ABS), (key, step)


def test_one_rank_alone_would_log_other_numbers(runs):
    """The comparison can fail: one process on rank 0's half alone publishes different statistics."""
    fsdp, _, _ = runs
    _, spy = _one_process(union_loader(dataset(), ranks=1), chunks=1)  # (the per-test conftest fixture has dropped TRITON_INTERPRET here)
    got, alone = _by_key(fsdp["logged"]["rows"]), _by_key(spy.rows)
    for key in ("entropy/attn/L0/H0", "entropy/repr/ln_f/rankme", "entropy/router/L0/entropy",
                "entropy/policy/mean", "entropy/pred/train/mean", "entropy/pred/probe/mean", INFO_KEY):
        assert got[key][0] != pytest.approx(alone[key][0], rel=1e-4, abs=1e-4), key
