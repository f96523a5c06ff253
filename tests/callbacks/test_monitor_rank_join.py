"""Under DDP a rank that captured less than the others (no forward at a logging step, or a forward through only
some attention sites / routers) still joins AttentionEntropyMonitor's and RouterEntropyMonitor's reduce, so no rank is
left waiting (a hang), and every rank publishes the values one process gets on the union of the ranks' captures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers.scripts import run_script

SCRIPT = Path(__file__).with_name("monitor_rank_join_run.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the 2 ranks got: one script run for both tests (~15 s)."""
    out = tmp_path_factory.mktemp("rank_join")
    run_script(SCRIPT, out, str(out), timeout=90)  # a rank left waiting in a reduce: killed at 60 s, fails here
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_rank_with_less_or_no_capture_joins_the_reduce_and_publishes_the_union_values(ranks):
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


@pytest.mark.parametrize("monitor", ["router", "representation"])
def test_a_rank_with_less_or_no_router_or_representation_capture_joins_the_reduce(ranks, monitor):
    for case in ("rank1_nothing_first_step", "rank1_one_site", "rank0_nothing", "nobody"):
        expected = ranks[0][f"{monitor}/reference/{case}"]
        for path in ("driver", "lightning"):
            for r in range(2):
                got = ranks[r][f"{monitor}/{path}/{case}"]
                if expected == "TapError":
                    assert got == "TapError", (path, case, r)
                else:
                    assert got == pytest.approx(expected, abs=1e-12, nan_ok=True), (path, case, r)
    assert ranks[0][f"{monitor}/reference/nobody"] == "TapError"  # no rank captured: every rank raises
    assert isinstance(ranks[0][f"{monitor}/reference/rank1_one_site"], dict)
