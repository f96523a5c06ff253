"""σReparam and SigmaReparamMonitor under FSDP1 (Lightning's ``FSDPStrategy``, flat parameters), on CUDA.

Lightning refuses ``FSDPStrategy`` without a GPU ("requires a GPU accelerator"), so this test skips on a CPU-only
machine. With one GPU it runs FSDP1 with world size 1 (wrapping, flat parameters and ``summon_full_params`` in the
monitor are exercised; nothing is actually split); with two or more it runs 2 ranks (NCCL), each on half of the
union batch. Either way the losses and every published σ / γ / qk-norm must equal a plain single-GPU run on the union
batch (``rtol=1e-5``, TF32 off), and the final weights too (``atol=1e-5``).

The file is also the script the test runs (``python test_sigma_fsdp1_cuda.py OUT MODE`` with MODE ``fsdp1`` or
``single``), reusing the model and recorder of ``sigma_fsdp2_run.py``. ``--cpu`` runs ``single`` on the CPU (a dry
run of the plumbing).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.helpers.scripts import run_script  # noqa: E402

NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 1, reason="FSDPStrategy needs a CUDA device in Lightning"
)


@NEEDS_CUDA
def test_fsdp1_equals_one_process_on_the_union_batch(tmp_path):
    run_script(Path(__file__), tmp_path, str(tmp_path), "fsdp1", timeout=600)
    run_script(Path(__file__), tmp_path, str(tmp_path), "single", timeout=600)
    ranks = sorted(tmp_path.glob("fsdp1_rank*.pt"))
    assert ranks, "the FSDP1 run wrote nothing"
    runs = [torch.load(p, weights_only=False) for p in ranks]
    single = torch.load(tmp_path / "single_rank0.pt", weights_only=False)
    assert runs[0]["fsdp"], "the model was not wrapped in FullyShardedDataParallel"
    union = [sum(r["losses"][s] for r in runs) / len(runs) for s in range(len(single["losses"]))]
    assert union == pytest.approx(single["losses"], rel=1e-5)
    for step, expected in enumerate(single["metrics"]):
        assert sum(k.endswith("/sigma") for k in expected) == 8
        for run in runs:
            got = run["metrics"][step]
            assert set(got) == set(expected)
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
    for key, value in single["full"].items():
        for run in runs:
            torch.testing.assert_close(run["full"][key], value, rtol=1e-5, atol=1e-5, msg=key)


def _main(out: Path, mode: str, cpu: bool) -> None:
    import lightning as L
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor
    from tests.helpers.lightning_models import quiet_trainer
    from tests.regularizers.sigma_fsdp2_run import ROWS, SEQ, STEPS, VOCAB, Record, ShardedGPT

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    L.seed_everything(3)
    module = ShardedGPT(shard=False)
    monitor = SigmaReparamMonitor(every_n_steps=1)
    record = Record(monitor)
    data = TensorDataset(torch.randint(0, VOCAB, (STEPS * ROWS, SEQ + 1), generator=torch.Generator().manual_seed(0)))
    accelerator = "cpu" if cpu else "cuda"
    if mode == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy

        from entrotrain.models.tiny_gpt import Block

        devices = min(2, torch.cuda.device_count())
        strategy = FSDPStrategy(auto_wrap_policy={Block})
        trainer = quiet_trainer(max_steps=STEPS, accelerator=accelerator, devices=devices, strategy=strategy,
                                deterministic=False, use_distributed_sampler=False, callbacks=[monitor, record])
        rank = trainer.strategy.cluster_environment.global_rank()
        sampler = DistributedSampler(data, devices, rank, shuffle=False)
        loader = DataLoader(data, batch_size=ROWS // devices, sampler=sampler)
    else:
        trainer = quiet_trainer(max_steps=STEPS, accelerator=accelerator, deterministic=False, callbacks=[monitor, record])
        rank = 0
        loader = DataLoader(data, batch_size=ROWS)
    trainer.fit(module, loader)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrapped = isinstance(trainer.strategy.model, FSDP)
    if wrapped:
        with FSDP.summon_full_params(trainer.strategy.model, writeback=False):
            full = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    else:
        full = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    torch.save({"losses": record.losses, "metrics": record.metrics, "full": full, "fsdp": wrapped},
               out / f"{mode}_rank{rank}.pt")


if __name__ == "__main__":
    _main(Path(sys.argv[1]), sys.argv[2], "--cpu" in sys.argv[3:])
