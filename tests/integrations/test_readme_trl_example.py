"""The README's TRL block runs as written (CPU, offline) and prints the policy-entropy statistics.

The block is read from README.md between ``<!-- trl-example -->`` and ``<!-- /trl-example -->``: the test fails if the
README loses it.
"""

from __future__ import annotations

import pytest

from tests.helpers.readme import readme_block

pytest.importorskip("trl")


def test_readme_trl_block_runs_and_prints_the_entropy_statistics(tmp_path, monkeypatch, capsys):
    code = readme_block("trl-example")
    assert len(code.strip().splitlines()) <= 20
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__readme__"}
    exec(compile(code, "README.md:trl-example", "exec"), scope)
    out = capsys.readouterr().out
    assert "policy entropy (nats, seq-mean-token-mean)" in out
    rows = [r for r in scope["trainer"].state.log_history if "entropy/policy/mean" in r]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10]
    assert all("entropy/policy/cov_mean" in r and "policy/cov_selected" in r for r in rows)
    assert "entropy/policy/fit_ceiling" in rows[-1]  # the R = -a exp(H) + b fit after fit_min_points logged steps
