"""Run by test_sigma_fsdp2.py as a script: a σReparam TinyGPT trained a few steps with SigmaReparamMonitor, either

* ``fsdp2``: 2 CPU processes (gloo), Lightning's ``ModelParallelStrategy(data_parallel_size=2,
  tensor_parallel_size=1)`` with ``fully_shard`` on every block and on the model in ``configure_model`` (parameters
  become DTensors sharded on dim 0), 4 rows per rank and step; or
* ``single``: one process, no sharding, the union batch (8 rows per step); or
* ``meta``: as ``fsdp2`` but the module is built on the meta device (``trainer.init_module(empty_init=True)``), so
  σReparam is converted before any weight exists and Lightning materialises the sharded layers with ``to_empty`` +
  ``reset_parameters``. At train start the script records, per σReparam layer, the gathered γ, the ``sigma`` buffer,
  ``u`` and the float64 spectral norm of the gathered weight; then it loads an unconverted TinyGPT's weights with
  ``set_model_state_dict`` (full state dict, strict=False), calls ``reset_sigma_reparam_state`` and records the
  sharded model's logits next to the unconverted model's.

Each process writes ``OUT/{mode}_rank{r}.pt``: the per-step losses, the monitor's metrics of every step, the final
full (gathered) state dict and its own ``u`` / ``sigma`` buffers.

Usage: ``python sigma_fsdp2_run.py OUT MODE``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor  # noqa: E402
from entrotrain.models import TinyGPT  # noqa: E402
from entrotrain.regularizers.sigma_reparam import (  # noqa: E402
    SigmaReparamLinear,
    full_tensor,
    reset_sigma_reparam_state,
    sigma_reparam,
)
from tests.helpers.ddp_trainer import rank_loader  # noqa: E402
from tests.helpers.lightning_models import quiet_trainer  # noqa: E402

VOCAB, SEQ, STEPS, ROWS = 50, 16, 3, 8  # ROWS = union batch per step


class ShardedGPT(L.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        self.shard = shard
        self.model = TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=32)
        with torch.no_grad():  # away from the tiny init, so that σ(W) and γ are far from trivial values
            for name, p in self.model.named_parameters():
                if "blocks" in name and p.ndim == 2:
                    p.normal_(0, 0.3)
        sigma_reparam(self.model, exclude=("lm_head",))  # before fully_shard

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        logits = self(idx[:, :-1])  # through forward(): FSDP2's hooks run only there
        return F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


class Record(L.Callback):
    """Per step: the loss and the monitor's metrics (runs after the monitor in the callback list)."""

    def __init__(self, monitor: SigmaReparamMonitor) -> None:
        self.monitor = monitor
        self.losses: list[float] = []
        self.metrics: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.metrics.append(dict(self.monitor.last_logged))


def plain_gpt() -> TinyGPT:
    """The unconverted model whose weights the ``meta`` run loads."""
    torch.manual_seed(11)
    return TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=32)


class MetaChecks(L.Callback):
    """``meta`` mode: the spectral state after materialisation, then function preservation after loading weights."""

    def __init__(self) -> None:
        self.result: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        layers = {}
        for name, m in pl_module.named_modules():
            if isinstance(m, SigmaReparamLinear):
                w = full_tensor(m.weight.detach()).double()
                layers[name] = {"gamma": float(full_tensor(m.gamma.detach())), "sigma": float(m.sigma),
                                "exact": float(torch.linalg.matrix_norm(w, 2)), "u": m.u.clone(),
                                "dtensor": type(m.weight).__name__ == "DTensor"}
        self.result["materialised"] = layers
        plain = plain_gpt()
        idx = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            expected = plain(idx)
        set_model_state_dict(pl_module.model, plain.state_dict(),
                             options=StateDictOptions(full_state_dict=True, strict=False))
        reset_sigma_reparam_state(pl_module.model)
        with torch.no_grad():
            got = pl_module(idx)
        self.result["logits"] = (got.detach().clone(), expected)


if __name__ == "__main__":
    out, mode = Path(sys.argv[1]), sys.argv[2]
    torch.set_num_threads(1)
    L.seed_everything(3)
    shard = mode in ("fsdp2", "meta")
    monitor = SigmaReparamMonitor(every_n_steps=1)
    record = Record(monitor)
    checks = MetaChecks()
    data = TensorDataset(torch.randint(0, VOCAB, (STEPS * ROWS, SEQ + 1), generator=torch.Generator().manual_seed(0)))
    if shard:
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        callbacks = [monitor, record] + ([checks] if mode == "meta" else [])
        trainer = quiet_trainer(max_steps=1 if mode == "meta" else STEPS, devices=2, strategy=strategy,
                                deterministic=False, use_distributed_sampler=False, callbacks=callbacks)
        rank = trainer.strategy.cluster_environment.global_rank()
        with trainer.init_module(empty_init=mode == "meta"):
            module = ShardedGPT(shard)
        # rank r gets rows r, r + 2, ...: step s of the two ranks together is rows 8s .. 8s + 7, the single run's batch
        loader = rank_loader(trainer, data, ROWS // 2)
    else:
        trainer = quiet_trainer(max_steps=STEPS, deterministic=False, callbacks=[monitor, record])
        module = ShardedGPT(shard)
        rank = 0
        loader = DataLoader(data, batch_size=ROWS)
    trainer.fit(module, loader)
    state = module.state_dict()
    full = {k: full_tensor(v.detach()).clone() for k, v in state.items()}  # collective, same order on every rank
    local = {k: v.detach().clone() for k, v in state.items() if k.endswith((".u", ".sigma"))}
    dtensor = [k for k, v in state.items() if type(v).__name__ == "DTensor"]
    torch.save(
        {"losses": record.losses, "metrics": record.metrics, "full": full, "buffers": local, "dtensor": dtensor,
         "meta": checks.result},
        out / f"{mode}_rank{rank}.pt",
    )
    if torch.distributed.is_initialized():  # leave together: a rank exiting while gloo threads still run aborts
        torch.distributed.barrier()  # ("terminate called without an active exception", seen once under load)
        torch.distributed.destroy_process_group()
