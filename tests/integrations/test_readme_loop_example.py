"""The README's plain-loop example (``EntropyMonitors``) runs as written (CPU, no logger) in an empty folder, logs at
its steps and leaves a run record that ``entrotrain report`` reads.

The block is read from README.md between ``<!-- loop-example -->`` and ``<!-- /loop-example -->``: the test fails if
the README loses it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.readme import readme_block


def test_readme_loop_example_runs(
    capsys: pytest.CaptureFixture, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from entrotrain.dashboards.report import build_report
    from entrotrain.dashboards.run_reader import find_records, load_run

    code = readme_block("loop-example")
    monkeypatch.chdir(tmp_path)  # an empty folder, as a user would run it
    assert len([line for line in code.splitlines() if line.strip()]) <= 18  # a short example stays short
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md:loop-example", "exec"), namespace)
    out = capsys.readouterr().out
    printed = [line.split() for line in out.splitlines() if line[:1].isdigit() and len(line.split()) == 2]
    assert [int(step) for step, _ in printed] == [0, 10, 20, 30]  # the monitor's every_n_steps, from step 0
    assert all(0.0 <= float(value) <= 1.0 for _, value in printed)
    assert "attention entropy (normalised, over heads)" in out  # the summary printed when the watch ends
    model = namespace["model"]
    assert not [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert not namespace["monitors"].monitors[0].tap.armed
    (folder,) = find_records(tmp_path / "runs")
    assert f"entrotrain report {Path('runs') / 'records' / folder.name}" in out
    run = load_run(folder)
    assert run.status == "finished" and list(run.scalars["entropy/attn_norm/min"][0]) == [0, 10, 20, 30]
    assert build_report([folder]).exists()
