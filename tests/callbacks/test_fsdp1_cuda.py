"""Every monitor and the attention/representation regularisers under FSDP1 (Lightning's ``FSDPStrategy``) on ONE
CUDA device equal a plain (non-FSDP) run (issue 13, "Scale-out beyond DDP").

Lightning refuses ``strategy="fsdp"`` without a GPU ("requires a GPU accelerator": checked here on every machine).
The lent GPU machine has one GPU, so the FSDP run is world size 1 (``devices=1``): it proves that the monitors'
taps, hooks and reductions work through FSDP1's wrappers (``FullyShardedDataParallel`` around each ``Block``, the
MoE layer and the root; flat parameters; ``use_orig_params`` as Lightning sets it) and that training is unchanged,
but not the 2-rank reduction, which tests/callbacks/test_fsdp2.py proves for FSDP2 on CPU. The model, data and
monitors are tests/helpers/fsdp_models.py's (the union batch of 8 samples per step, 3 steps, logging every step).

Both runs go through this file as a script (``python test_fsdp1_cuda.py OUT fsdp|plain``): a fresh process each, so
no NCCL process group outlives the run inside pytest. Tolerance: the same float32 CUDA arithmetic (no TF32), so
losses, weights and statistics agree to ``1e-5`` relative / ``1e-6``–``1e-5`` absolute.

FSDP1 inserts ``_fsdp_wrapped_module`` into ``named_modules()`` (``blocks.1._fsdp_wrapped_module.mlp``); the taps
drop it (entrotrain/taps/module_names.py), so :func:`test_fsdp1_keys_carry_no_wrapper_names` requires keys without it.
The monitors' globs here still use ``**`` and the keys are still compared after removing the segment, so the
statistics tests judge the values alone.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

WRAPPED = "_fsdp_wrapped_module."
REL = 1e-5


def _run(out: Path, mode: str, accelerator: str = "cuda") -> None:
    import lightning as L
    from lightning.pytorch.strategies import FSDPStrategy

    from entrotrain.models.tiny_gpt import Block
    from entrotrain.models.tiny_moe import MoELayer
    from tests.helpers.fsdp_models import STEPS, FSDPLM, dataset, monitors, union_loader
    from tests.helpers.spy_logger import SpyLogger

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    L.seed_everything(3)
    model = FSDPLM()
    spy = SpyLogger()
    strategy = FSDPStrategy(auto_wrap_policy={Block, MoELayer}) if mode == "fsdp" else "auto"
    trainer = L.Trainer(
        accelerator=accelerator, devices=1, strategy=strategy, callbacks=monitors(), logger=spy, log_every_n_steps=1,
        max_steps=STEPS, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(model, union_loader(dataset()))
    wrappers = []
    if mode == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        wrappers = sorted(n or "<root>" for n, m in trainer.strategy.model.named_modules() if isinstance(m, FSDP))
        with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
            weights = {n.replace(WRAPPED, ""): p.detach().cpu().clone() for n, p in model.named_parameters()
                       if "_flat_param" not in n}  # the original parameters (use_orig_params=True), full
    else:
        weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    torch.save(weights, out / f"{mode}_weights.pt")
    (out / f"{mode}.json").write_text(json.dumps(
        {"rows": spy.rows, "losses": model.losses, "parts": model.parts, "wrappers": wrappers,
         "strategy": type(trainer.strategy).__name__}
    ))


def test_fsdp1_is_refused_on_cpu_with_a_clear_message():
    import lightning as L

    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        L.Trainer(accelerator="cpu", devices=1, strategy="fsdp", logger=False)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDPStrategy (FSDP1) needs a CUDA device")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from tests.helpers.scripts import run_script

    out = tmp_path_factory.mktemp("fsdp1")
    with pytest.MonkeyPatch.context() as mp:
        # impl="auto": on CUDA the regularisers' differentiable attention entropy runs the Triton kernel (its dq
        # backward on strided q views of a fused qkv is fixed and tested in tests/kernels)
        mp.delenv("ENTROTRAIN_IMPL", raising=False)
        for mode in ("plain", "fsdp"):
            run_script(Path(__file__), out, str(out), mode, timeout=240)
    return {mode: (json.loads((out / f"{mode}.json").read_text()), torch.load(out / f"{mode}_weights.pt"))
            for mode in ("plain", "fsdp")}


def _by_key(rows: list) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for step, metrics in rows:
        for key, value in metrics.items():
            out.setdefault(key.replace(WRAPPED, ""), {})[int(step)] = float(value)
    return out


@cuda
def test_fsdp1_wrapped_the_blocks_the_moe_and_the_root(runs):
    fsdp, _ = runs["fsdp"]
    assert fsdp["strategy"] == "FSDPStrategy"
    assert {"<root>", "blocks.0", "blocks.1", "moe"} <= {n.replace(WRAPPED, "") for n in fsdp["wrappers"]}


@cuda
def test_fsdp1_losses_and_weights_equal_the_plain_run(runs):
    (plain, wp), (fsdp, wf) = runs["plain"], runs["fsdp"]
    assert len(fsdp["losses"]) == len(plain["losses"]) > 0
    for a, b in zip(fsdp["losses"], plain["losses"]):
        assert a == pytest.approx(b, rel=REL, abs=1e-6)
    for a, b in zip(fsdp["parts"], plain["parts"]):
        for pa, pb in zip(a, b):
            assert set(pa) == set(pb) == {"aem", "entropy_floor", "matrix_entropy"}
            for k in pa:
                assert pa[k] == pytest.approx(pb[k], rel=REL, abs=1e-6), k
    assert set(wf) == set(wp)
    for name in wp:
        torch.testing.assert_close(wf[name], wp[name], rtol=REL, atol=1e-6, msg=name)


@cuda
def test_fsdp1_every_published_statistic_equals_the_plain_run(runs):
    got, want = _by_key(runs["fsdp"][0]["rows"]), _by_key(runs["plain"][0]["rows"])
    assert set(got) == set(want)
    assert {"attn", "attn_norm", "repr", "router", "policy", "pred", "pred_head"} <= {k.split("/")[1] for k in got}
    assert any(k.startswith("info/") for k in got)
    for key, steps in want.items():
        assert set(got[key]) == set(steps), key
        for step, value in steps.items():
            if math.isnan(value):
                assert math.isnan(got[key][step]), (key, step)
            else:
                assert got[key][step] == pytest.approx(value, rel=REL, abs=1e-5), (key, step)


@cuda
def test_fsdp1_keys_carry_no_wrapper_names(runs):
    """The taps name modules without FSDP1's segment (entrotrain/taps/module_names.py; shown on CPU through a real
    FullyShardedDataParallel in tests/taps/test_wrapper_names.py)."""
    keys = {k for _, metrics in runs["fsdp"][0]["rows"] for k in metrics}
    assert not [k for k in keys if "_fsdp_wrapped_module" in k]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    _run(Path(sys.argv[1]), sys.argv[2], *sys.argv[3:])  # a third argument "cpu" smoke-tests the plain run on CPU
