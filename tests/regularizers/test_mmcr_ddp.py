"""MMCRLoss on 2 gloo CPU ranks: the reference's DDP semantics (all-gathered centroids, gradients through the local
shard) against one process on the union of the ranks' samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from entrotrain.regularizers.representation import MMCRLoss
from tests.functional.test_spectral_objectives import brute_mmcr
from tests.helpers.scripts import run_script

ROOT = Path(__file__).resolve().parents[2]


def test_mmcr_two_rank_ddp_matches_the_reference_semantics(tmp_path):
    from tests.regularizers import mmcr_ddp_run as script

    run_script(Path(script.__file__), ROOT, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(script.WORLD)]
    x, w0 = script.make_batch()
    w = w0.clone().requires_grad_()
    z = x @ w
    single = MMCRLoss(1.0, script.LAM)(z).total
    zs = z.detach().reshape(-1, z.shape[-1]).numpy()
    assert float(single.detach()) == pytest.approx(brute_mmcr(zs, script.K, script.LAM), abs=1e-10)
    # the mean over ranks of the per-rank losses is the loss of one process on the union
    assert float(sum(r["loss"] for r in ranks) / script.WORLD) == pytest.approx(float(single.detach()), abs=1e-10)
    # gradients flow through the local shard: averaged, the global term is divided by the world size
    glob = MMCRLoss(1.0, 0.0)(z).total
    local = single - glob
    (ref,) = torch.autograd.grad(glob / script.WORLD + local, w)
    for r in ranks:
        torch.testing.assert_close(r["grad"], ref, rtol=1e-9, atol=1e-10)
    assert np.isfinite(ref.numpy()).all()
