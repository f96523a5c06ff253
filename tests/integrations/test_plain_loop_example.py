"""``examples/plain_loop.py`` (the main job's recipe as a hand-written loop with EntropyMonitors) runs as a user runs
it: a short run with the entropy floor, a run record that ``entrotrain report`` turns into a page, and a checkpoint
whose monitor state a new ``EntropyMonitors`` restores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from entrotrain.callbacks import AttentionEntropyMonitor, EntropyCollapseGuard, RepresentationEntropyMonitor
from entrotrain.dashboards.report import build_report
from entrotrain.integrations.loop import EntropyMonitors
from entrotrain.models import TinyGPT

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plain_loop.py"


def test_plain_loop_example_runs_records_and_checkpoints(tmp_path: Path) -> None:
    checkpoint = tmp_path / "ck.pt"
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), "--steps", "26", "--cure", "floor", "--record", str(tmp_path / "runs"),
         "--checkpoint", str(checkpoint)],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "attention entropy (normalised, over heads)" in out and "final train / val loss" in out
    run_dir = Path(out.split("run record: ")[1].split()[0])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = sorted({row["step"] for row in rows if "entropy/attn_norm/min" in row["values"]})
    assert logged == [0, 25], logged  # every 25 steps from step 0
    media = [json.loads(line)["key"] for line in (run_dir / "media" / "index.jsonl").read_text().splitlines()]
    assert media.count("entropy/attn_norm/heatmap") == 2 and "entropy/repr/blocks.3/spectrum" in media
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "finished"
    assert {row["step"] for row in rows if "train/loss" in row["values"]} == {0, 10, 20}
    assert build_report([run_dir]).exists()
    state = torch.load(checkpoint, weights_only=False)["entrotrain"]
    json.dumps(state)
    monitors = EntropyMonitors(
        [AttentionEntropyMonitor(every_n_steps=25, max_rows=4, max_queries=256),
         RepresentationEntropyMonitor(include=["blocks.3"], every_n_steps=100, stage="train")],
        guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.05, action="warn")],
    )  # fmt: skip
    monitors.load_state_dict(state)  # before watch: applied at watch
    monitors.watch(TinyGPT(vocab_size=128, n_layer=4))  # the example's layer names
    assert monitors.guards[0].last_seen_step == 25
    assert monitors.monitors[0].first_summary is not None
