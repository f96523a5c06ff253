"""The verdict lines of ``benchmarks/spectral.py`` and ``benchmarks/sigma_reparam.py`` (``_common.verdict_line``).

A target is judged (met / NOT met) only on the device it is stated for, from the numbers the same run printed; on the
other device the line says it is not judged, and under ``--quick`` it says the sizes are not the target's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common as C  # noqa: E402
import spectral  # noqa: E402

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@given(ok=st.booleans(), quick=st.booleans(), target=st.sampled_from(["cpu", "cuda", None]),
       on=st.sampled_from([CPU, CUDA]))
def test_verdict_is_judged_only_on_the_targets_device(ok: bool, quick: bool, target, on: torch.device) -> None:
    line = C.verdict_line("T ≤ 1", ok, "r = 0.9", target_device=target, device=on, quick=quick)
    assert line.startswith("# verdict T ≤ 1: ") and line.endswith("(r = 0.9)")
    judged = target is None or target == on.type
    assert ("not judged" in line) == (not judged)
    if judged:
        assert (": NOT met" in line) == (not ok) and (": met" in line) == ok
    else:
        names = {"cpu": "CPU", "cuda": "GPU"}
        assert f"target is for {names[target]}: not judged on {names[on.type]}" in line
    assert ("the sizes are not the target's" in line) == quick


def _args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"quick": False, "data": "blobs", **kw})


def test_slq_verdict_picks_the_fastest_row_that_meets_the_target() -> None:
    rows = {(10_000, 64): [("DSE SLQ 16x30", 30.0, 2e-2, 1e-2), ("DSE SLQ 64x30", 45.0, 5e-3, 4e-3),
                           ("DSE SLQ 128x30", 48.0, 1e-3, 2e-3)]}
    (line,) = spectral.slq_verdict(rows, _args(), CUDA)
    assert ": met (n = 10000, d = 64, DSE SLQ 64x30: 45.0 ms" in line
    # a dishonest error bar (|err| > 2 SE) or 51 ms is not met; the fastest row is named
    rows = {(10_000, 64): [("DSE SLQ 16x30", 30.0, 5e-3, 1e-3), ("DSE SLQ 64x30", 51.0, 1e-3, 1e-2)]}
    (line,) = spectral.slq_verdict(rows, _args(), CUDA)
    assert ": NOT met (" in line and "DSE SLQ 16x30" in line and "|err|/SE 5.00" in line
    (line,) = spectral.slq_verdict({}, _args(), CUDA)
    assert ": not judged (no eigh at n = 10 000" in line
    (line,) = spectral.slq_verdict(rows, _args(), CPU)
    assert "target is for GPU: not judged on CPU" in line


def test_precision_verdict_takes_the_worst_row() -> None:
    target = spectral.PRECISION_TARGET_SIZES
    worst = [("RankMe 4096×256", 1.05, 1e-7), ("matrix entropy 2048×2048", 1.19, 8e-7)]
    line = spectral.precision_verdict(worst, target, _args(), CPU)
    assert ": met (on cpu, data blobs: worst auto × plain 1.19 (matrix entropy 2048×2048)" in line
    assert "not the target's" not in line
    line = spectral.precision_verdict([*worst, ("Vendi cosine q=1 4096×256", 0.5, 2e-5)], target, _args(), CUDA)
    assert ": NOT met (" in line and "worst auto rel err 2.0e-05 (Vendi cosine q=1 4096×256)" in line
    line = spectral.precision_verdict([("RankMe 512×64", 1.3, 0.0)], [(512, 64)], _args(quick=True), CPU)
    assert ": NOT met; --quick: the sizes are not the target's" in line
    line = spectral.precision_verdict(worst, [(512, 64)], _args(), CPU)
    assert "the sizes are not the target's 4096×256 and 2048×2048" in line
