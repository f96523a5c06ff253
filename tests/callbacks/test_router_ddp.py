"""RouterEntropyMonitor across 2 DDP ranks (gloo, CPU) equals one process on the union of the ranks' batches, with
gradient accumulation and padding, in one all-reduce."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.callbacks.router_ddp_run import samples
from tests.callbacks.test_router_monitor import _assert_logged, _expected
from tests.helpers.router_models import ToyMoE, gate_logits
from tests.helpers.scripts import run_script


def test_two_rank_ddp_with_accumulation_equals_single_process_on_union(tmp_path):
    out = tmp_path / "logged.json"
    run_script(Path(__file__).with_name("router_ddp_run.py"), tmp_path, str(out), "2")
    result = json.loads(out.read_text())
    # per logging step: the layers each rank saw (a rank with none joins too), then one all-reduce of all layers
    assert result["collectives"] == ["all_gather_object", "all_reduce"]
    # rank r takes samples r, r + 2, ...; one optimizer step = 2 ranks x 2 micro-batches x 2 samples: the first 8
    union = samples()[:8]
    x = torch.stack([s["x"] for s in union])
    mask = torch.stack([s["attention_mask"] for s in union])
    assert int(mask.sum()) < mask.numel()
    layers = gate_logits(ToyMoE(seed=0).blocks, x)
    _assert_logged(result["logged"], _expected(layers, 2, mask))
