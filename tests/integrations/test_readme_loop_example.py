"""The README's plain-loop example (``EntropyMonitors``) runs as written (CPU, no logger) and logs at its steps.

The block is read from README.md between ``<!-- loop-example -->`` and ``<!-- /loop-example -->``: the test fails if
the README loses it.
"""

from __future__ import annotations

import pytest

from tests.helpers.readme import readme_block


def test_readme_loop_example_runs(capsys: pytest.CaptureFixture) -> None:
    code = readme_block("loop-example")
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
