"""Under DDP a rank that captured less attention than the others (no forward at a logging step, or a forward through
only some attention sites) still joins AttentionEntropyMonitor's reduce, so no rank is left waiting (a hang), and
every rank publishes the values one process gets on the union of the ranks' captures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.scripts import run_script

SCRIPT = Path(__file__).with_name("attention_rank_join_run.py")


def test_a_rank_with_less_or_no_capture_joins_the_reduce_and_publishes_the_union_values(tmp_path):
    run_script(SCRIPT, tmp_path, str(tmp_path), timeout=90)  # a rank left waiting in the reduce fails here
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    reference = ranks[0]["reference"]
    for case, expected in reference.items():
        for path in ("driver", "lightning"):
            for r in range(2):
                got = ranks[r][f"{path}/{case}"]
                assert got.keys() == expected.keys(), (path, case, r)
                assert got == pytest.approx(expected, abs=1e-12), (path, case, r)
    assert reference["rank1_one_site"]  # the cases score something (not only empty dicts)
    assert reference["nobody"] == {"entropy/attn/nonfinite": 0.0}  # sites known, no row scored: no statistic
    assert ranks[0]["site_names"] == ranks[1]["site_names"] == ["blocks.0", "blocks.1"]
