"""The verl adapter's CANON advantage estimator: verl's tensors and uids (any order) against CANON's code transcribed
in float64, the config keys, and the errors (no entropy, unequal groups, missing uids)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.integrations.verl import VERL_ADV_NAMES, make_verl_adv_fns
from tests.helpers.token_shaping_reference import canon_reference


def _verl_batch(n_uid=3, g=4, t=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    b = n_uid * g
    lengths = torch.randint(1, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None] < lengths[:, None]).float()  # verl's float response_mask
    scores = (torch.rand(b, generator=gen) < 0.5).float()
    token_rewards = torch.zeros(b, t)
    token_rewards[torch.arange(b), lengths - 1] = scores  # the outcome reward on the last valid token
    entropy = torch.rand(b, t, generator=gen)
    uids = [f"u{i % n_uid}" for i in torch.randperm(b, generator=gen).tolist()]  # interleaved uids
    return token_rewards, mask, entropy, uids, scores


@pytest.mark.parametrize("metric", ["entropy", "length"])
def test_canon_matches_the_reference_code_with_shuffled_uids(metric):
    token_rewards, mask, entropy, uids, scores = _verl_batch()
    cfg = SimpleNamespace(canon={"lam": 0.6, "alpha": 1.5, "beta": 0.2, "metric": metric, "length_norm": 8.0})
    fn = make_verl_adv_fns()["entrotrain_canon"]
    adv, ret = fn(token_rewards, mask, uids, cfg, entropy=entropy)
    b = mask.shape[0]
    if metric == "entropy":
        value = [float((entropy[i] * mask[i]).sum() / (mask[i].sum() + 1e-8)) for i in range(b)]
    else:
        value = [float(mask[i].sum()) for i in range(b)]
    ref = canon_reference(scores.double(), value, uids, 1.5, 0.2, 0.6, 8.0, metric)
    assert torch.allclose(adv.double(), ref[:, None] * mask.double(), atol=1e-7)
    assert adv is ret and adv.shape == mask.shape and (adv[mask == 0] == 0).all()
    assert VERL_ADV_NAMES == ("entrotrain_canon",)


def test_canon_defaults_and_errors():
    token_rewards, mask, entropy, uids, scores = _verl_batch(seed=1)
    fn = make_verl_adv_fns()["entrotrain_canon"]
    adv, _ = fn(token_rewards, mask, uids, None, entropy=entropy)  # lam = alpha = 1, beta = 0, L = 1
    value = [float((entropy[i] * mask[i]).sum() / (mask[i].sum() + 1e-8)) for i in range(mask.shape[0])]
    assert torch.allclose(adv.double(), canon_reference(scores.double(), value, uids)[:, None] * mask.double())
    with pytest.raises(EntrotrainError, match="entropy="):
        fn(token_rewards, mask, uids, None)
    with pytest.raises(EntrotrainError, match="same number of responses per uid"):
        fn(token_rewards, mask, uids[:-1] + ["other"], None, entropy=entropy)
    with pytest.raises(EntrotrainError, match="index="):
        fn(token_rewards, mask, None, None, entropy=entropy)
    with pytest.raises(EntrotrainError, match="config.canon.lam"):
        fn(token_rewards, mask, uids, {"canon": {"lam": "x"}}, entropy=entropy)
    with pytest.raises(EntrotrainError, match="config.canon.metric"):
        fn(token_rewards, mask, uids, {"canon": {"metric": "sum"}}, entropy=entropy)


def test_canon_keyword_defaults_apply_when_the_config_has_no_canon_section():
    """Stock verl's AlgoConfig refuses a `canon` field and its compute_advantage passes no entropy: the settings
    given at registration are used instead, and a config's own `canon` section still wins."""
    token_rewards, mask, entropy, uids, scores = _verl_batch(seed=2)
    fn = make_verl_adv_fns(metric="length", lam=0.6, alpha=1.5, beta=0.2, length_norm=8.0)["entrotrain_canon"]
    adv, _ = fn(token_rewards, mask, uids, None)  # no entropy needed for the length metric
    value = [float(mask[i].sum()) for i in range(mask.shape[0])]
    ref = canon_reference(scores.double(), value, uids, 1.5, 0.2, 0.6, 8.0, "length")
    assert torch.allclose(adv.double(), ref[:, None] * mask.double(), atol=1e-7)
    cfg = {"canon": {"metric": "entropy"}}  # the config's section overrides the registration default
    adv_e, _ = fn(token_rewards, mask, uids, cfg, entropy=entropy)
    value_e = [float((entropy[i] * mask[i]).sum() / (mask[i].sum() + 1e-8)) for i in range(mask.shape[0])]
    ref_e = canon_reference(scores.double(), value_e, uids, 1.5, 0.2, 0.6, 8.0, "entropy")
    assert torch.allclose(adv_e.double(), ref_e[:, None] * mask.double(), atol=1e-7)
    with pytest.raises(EntrotrainError, match="metric"):
        make_verl_adv_fns(metric="sum")


@pytest.mark.parametrize("metric", ["entropy", "length"])
def test_canon_reads_the_response_mask_by_the_policy_rule(metric):
    """int and float 0/1 response masks (verl hands either) give the bool mask's advantages; any other value is
    refused naming it. Before, the length metric counted ``mask > 0`` and scaled the advantages by the raw mask: a
    0.5 entry halved a token's advantage and counted as a full token, without a word."""
    token_rewards, mask, entropy, uids, _ = _verl_batch(seed=3)
    fn = make_verl_adv_fns(metric=metric)["entrotrain_canon"]
    want, _ = fn(token_rewards, mask.bool(), uids, None, entropy=entropy)
    for dtype in (torch.int64, torch.float32):
        assert torch.equal(fn(token_rewards, mask.to(dtype), uids, None, entropy=entropy)[0], want)
    bad = mask.float()
    bad[0, 0] = 0.5
    with pytest.raises(EntrotrainError, match=r"response_mask .* \(found \[0.5\]\)"):
        fn(token_rewards, bad, uids, None, entropy=entropy)
