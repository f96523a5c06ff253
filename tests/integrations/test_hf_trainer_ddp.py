"""EntropyTrainerCallback under 2-process CPU DDP (gloo) in HF Trainer: one all-reduce per logging step gives every rank
the statistics of the union batch, equal to one process on all rows (its own file: it starts processes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from tests.helpers.scripts import run_script  # noqa: E402
from tests.integrations.hf_ddp_run import ROWS, T, run  # noqa: E402


def test_two_rank_ddp_equals_one_process_on_the_union_batch(tmp_path: Path) -> None:
    run_script(Path(__file__).with_name("hf_ddp_run.py"), Path(__file__).resolve().parents[2], str(tmp_path), timeout=300)
    run(tmp_path, "single", ROWS, None)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = json.loads((tmp_path / "single.json").read_text())
    assert [r["world"] for r in ranks] == [2, 2] and single["world"] == 1
    assert ranks[0]["metrics"] == ranks[1]["metrics"]  # one all-reduce: every rank logs the same numbers
    from entrotrain.dashboards.run_reader import find_records, load_run

    assert not (tmp_path / "rank1_record").exists()  # one writer: the main process
    (lead,), (alone,) = find_records(tmp_path / "rank0_record"), find_records(tmp_path / "single_record")
    lead_run, alone_run = load_run(lead), load_run(alone)
    assert lead_run.status == "finished" and lead_run.thresholds == alone_run.thresholds
    for key, (steps, values) in alone_run.scalars.items():
        if key.startswith("entropy/"):
            assert list(lead_run.scalars[key][0]) == list(steps) and lead_run.scalars[key][1] == pytest.approx(values)
    reduced, reference = ranks[0]["metrics"], single["metrics"]
    assert set(reduced) == set(reference)
    assert reduced["entropy/repr/transformer.h.1/n_streamed"] == ROWS * T  # both ranks' rows, not one rank's half
    for key, value in reference.items():
        assert reduced[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
