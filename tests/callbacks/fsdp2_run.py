"""Every monitor and the attention/representation regularisers under FSDP2 on CPU: 2 processes (gloo), Lightning's
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, ``fully_shard`` per block and at the root
(tests/helpers/fsdp_models.py), 3 steps logging at every step.

Each rank writes ``rank{r}.json`` (its per-step losses); rank 0 also writes what the loggers received (a spy logger)
and ``weights.pt``, the full (un-sharded) parameters after the last step, and ``weights_unmonitored.pt``, those of
the same FSDP2 training without any monitor (a second fit in the same processes). Run by test_fsdp2.py.
"""

from __future__ import annotations

import faulthandler
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import lightning as L
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    from tests.helpers.ddp_trainer import rank_loader
    from tests.helpers.fsdp_models import BATCH, STEPS, WORLD, FSDPLM, dataset, monitors
    from tests.helpers.spy_logger import SpyLogger

    out = Path(sys.argv[1])
    # a collective that one rank never joins hangs both: dump every thread's stack and exit instead
    faulthandler.dump_traceback_later(float(sys.argv[2]) if len(sys.argv) > 2 else 240.0, exit=True)
    torch.set_num_threads(1)
    L.seed_everything(3)
    model = FSDPLM()
    spy = SpyLogger()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        callbacks=monitors(), logger=spy, log_every_n_steps=1, max_steps=STEPS, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    data = dataset()
    rank = trainer.strategy.cluster_environment.global_rank()
    t0 = time.perf_counter()
    trainer.fit(model, rank_loader(trainer, data, BATCH, WORLD))
    seconds = time.perf_counter() - t0
    sharded = sorted(n for n, p in model.named_parameters() if isinstance(p, DTensor))
    full = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}
    (out / f"rank{rank}.json").write_text(json.dumps({"losses": model.losses, "parts": model.parts, "fit_seconds": seconds}))

    # the same training without any monitor, in the same processes: monitoring must not change a bit of it
    L.seed_everything(3)
    bare = FSDPLM()
    trainer = L.Trainer(
        accelerator="cpu", devices=WORLD, strategy=ModelParallelStrategy(data_parallel_size=WORLD, tensor_parallel_size=1),
        logger=False, max_steps=STEPS, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False,
    )
    trainer.fit(bare, rank_loader(trainer, data, BATCH, WORLD))
    unmonitored = {n: p.full_tensor().detach().clone() for n, p in bare.named_parameters()}
    if trainer.is_global_zero:
        torch.save(full, out / "weights.pt")
        torch.save(unmonitored, out / "weights_unmonitored.pt")
        (out / "logged.json").write_text(json.dumps({"rows": spy.rows, "sharded": sharded}))
