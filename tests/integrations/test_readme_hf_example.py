"""The README's HF Trainer example runs as written (CPU, offline) and logs the attention-entropy keys.

The block is read from README.md between ``<!-- hf-example -->`` and ``<!-- /hf-example -->`` (a fenced
``python`` block): the test fails if the README loses it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.readme import readme_block

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_readme_hf_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    code = readme_block("hf-example")
    assert len([line for line in code.splitlines() if line.strip()]) <= 13  # a short example stays short
    monkeypatch.chdir(tmp_path)  # its output_dir is relative
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md:hf-example", "exec"), namespace)
    trainer = namespace["trainer"]
    logged = [row for row in trainer.state.log_history if "entropy/attn_norm/min" in row]
    assert [row["step"] for row in logged] == [5, 10, 15, 20]
    assert all(0.0 <= row["entropy/attn_norm/min"] <= 1.0 for row in logged)
    assert "entropy/attn/L1/H3" in logged[-1]
    out = capsys.readouterr().out
    assert "attention entropy (normalised, over heads)" in out  # the closing summary
    from entrotrain.dashboards.run_reader import find_records, load_run

    (folder,) = find_records(tmp_path / "runs")  # record="runs": the run record for entrotrain report / status
    run = load_run(folder)
    assert run.status == "finished" and f"entrotrain report {Path('runs') / 'records' / folder.name}" in out
    assert list(run.scalars["entropy/attn_norm/min"][0]) == [5, 10, 15, 20] and "loss" in run.scalars
