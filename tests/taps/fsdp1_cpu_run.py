"""FSDP1 (``FullyShardedDataParallel``, auto-wrapping each ``Block``) on CPU in a 1-process gloo group: run by
tests/taps/test_wrapper_names.py as ``python fsdp1_cpu_run.py OUT`` (a fresh process: no process group outlives it).

Lightning refuses ``FSDPStrategy`` without a GPU, so the LightningModule wraps its own model (as the strategy would,
``use_orig_params=True``, NO_SHARD at world size 1) and the Trainer runs on one CPU device. Writes ``OUT/fsdp1.json``:
the raw and clean module names, the fits (plain, FSDP1, FSDP1 + activation checkpointing applied after wrapping, in
Lightning's order) and ``entropy_snapshot`` of the plain and the FSDP1 model (same weights)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402


def fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from entrotrain.models.tiny_gpt import Block

    return FSDP(model, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True)


def fsdp_checkpointed(model: nn.Module) -> nn.Module:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    from tests.helpers.wrapper_models import is_block

    wrapped = fsdp(model)
    apply_activation_checkpointing(wrapped, check_fn=is_block)
    return wrapped


def main(out: Path) -> None:
    from entrotrain.taps.module_names import named_modules
    from tests.helpers.gloo import free_port
    from tests.helpers.wrapper_models import fit, snapshot, tiny_gpt

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = fsdp_checkpointed(tiny_gpt())
        result = {
            "raw_names": [n for n, _ in wrapped.named_modules()],
            "clean_names": [n for n, _ in named_modules(wrapped)],
            "plain_names": [n for n, _ in named_modules(tiny_gpt())],
            "wrapper_types": sorted({type(m).__name__ for m in wrapped.modules()}),
            "fit_plain": fit(),
            "fit_fsdp": fit(fsdp),
            "fit_fsdp_checkpointed": fit(fsdp_checkpointed),
            "snapshot_plain": snapshot(tiny_gpt()),
            "snapshot_fsdp": snapshot(fsdp(tiny_gpt())),
        }
    finally:
        dist.destroy_process_group()
    (out / "fsdp1.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
