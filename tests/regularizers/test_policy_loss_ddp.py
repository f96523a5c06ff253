"""Global mode on 2 gloo CPU ranks (uneven split) equals one process on the concatenated batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from entrotrain.functional import high_entropy_mask
from tests.helpers.scripts import run_script
from tests.regularizers import policy_ddp_run as script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_ddp")
    run_script(Path(script.__file__), ROOT, str(out))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_two_ranks_equal_one_process(ranks):
    x, weight, labels, adv, mask, noise, _ = script.make_batch()
    single = script.run_cases(x, weight, labels, adv, mask, noise)
    for name, ref in single.items():
        r0, r1 = ranks[0][name], ranks[1][name]
        # each rank's loss is its share × world size (DDP averages): the mean over ranks is the whole-batch loss
        torch.testing.assert_close((r0["loss"] + r1["loss"]) / 2, ref["loss"], rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(r0["grad"], ref["grad"], rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(r1["grad"], ref["grad"], rtol=1e-10, atol=1e-12, msg=name)
        if "policy/cov_selected" in ref["metrics"]:
            selected = r0["metrics"]["policy/cov_selected"] + r1["metrics"]["policy/cov_selected"]
            assert selected == ref["metrics"]["policy/cov_selected"], name
            assert selected > 0, name


def test_clip_cov_selection_is_a_real_subset(ranks):
    x, weight, labels, adv, mask, noise, _ = script.make_batch()
    ref = script.run_cases(x, weight, labels, adv, mask, noise)["clip_cov/token-mean"]["metrics"]
    assert 0 < ref["policy/cov_selected"] < ref["policy/cov_candidates"]


def test_high_entropy_mask_global(ranks):
    _, _, _, _, mask, _, _ = script.make_batch()
    ent = torch.rand(script.B, script.T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = high_entropy_mask(ent, mask, 0.3)
    got = torch.cat([ranks[0]["high_entropy_mask"], ranks[1]["high_entropy_mask"]])
    assert torch.equal(got, ref)
