"""`benchmarks/peers.py --quick` runs in a subprocess and prints its three tables (no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_peers_quick_prints_three_tables() -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for title in ("## Logits entropy", "## Attention entropy", "## Spectra"):
        assert title in out, out
    for row in (
        "| naive ",
        "| TRL chunked (128 rows)",
        "| verl formula",
        "| entrotrain entropy_from_logits",
        "| SDPA forward (floor)",
        "| materialised (output_attentions)",
        "| entrotrain chunked",
        "| matrix entropy: entrotrain matrix_entropy",
        "| RankMe: entrotrain rankme",
        "| Vendi q=1: entrotrain vendi_score",
    ):
        assert row in out, f"missing row {row!r}:\n{out}"
    # every entrotrain row reports a finite error against float64, below 1e-3 at these sizes
    for line in out.splitlines():
        if line.startswith("| ") and "entrotrain" in line:
            err = float(line.rstrip(" |").rsplit("|", 1)[1])
            assert err < 1e-3, line
    assert "torch.compile naive skipped: --quick" in out
