"""Across 2 DDP ranks the monitor equals one process scoring the union of the ranks' batches."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers.brute import causal_head_means
from tests.helpers.lightning_models import HEADS, TinyLM, token_loader
from tests.helpers.scripts import run_script

SCRIPT = Path(__file__).with_name("ddp_attention_run.py")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_rank_ddp_equals_single_process_on_union(tmp_path, accumulate):
    out = tmp_path / "logged.json"
    run_script(SCRIPT, tmp_path, str(out), str(accumulate))
    logged = json.loads(out.read_text())

    L.seed_everything(3)
    model = TinyLM().double().eval()
    # DistributedSampler (no shuffle): rank r takes samples r, r + 2, ...; each optimizer step covers
    # `accumulate` batches of 4 per rank, i.e. the first 8 * accumulate samples overall.
    samples = torch.cat([b[0] for b in token_loader(n=32, batch_size=4)])[: 8 * accumulate]
    with torch.no_grad():
        model(samples[:, :-1])
    for layer, block in enumerate(model.blocks):
        ent, norm = causal_head_means(*block.last_qk)
        for head in range(HEADS):
            assert logged[f"entropy/attn/L{layer}/H{head}"] == pytest.approx(float(ent[head]), abs=2e-6)
            assert logged[f"entropy/attn_norm/L{layer}/H{head}"] == pytest.approx(float(norm[head]), abs=2e-6)
