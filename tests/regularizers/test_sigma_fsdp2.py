"""σReparam and SigmaReparamMonitor under FSDP2 (``fully_shard``, DTensor parameters sharded on dim 0): a 2-rank gloo
CPU run through Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` gives the values
of one process training on the union batch.

Tolerances (float32, 3 SGD steps; measured max relative differences ≈ 5e-7): losses (mean of the two ranks' batch
means) and every published σ / γ / qk-norm to ``rtol=1e-5``; final weights to ``atol=1e-5``; the power-iteration
buffers ``u`` / ``sigma`` are bit-identical on the two ranks (updated from the same all-gathered weight).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from tests.helpers.scripts import run_script

SCRIPT = Path(__file__).with_name("sigma_fsdp2_run.py")


def _fsdp2_available() -> bool:
    if not torch.distributed.is_available():
        return False
    try:
        fsdp = importlib.import_module("torch.distributed.fsdp")
        strategies = importlib.import_module("lightning.pytorch.strategies")
    except ImportError:
        return False
    return hasattr(fsdp, "fully_shard") and hasattr(strategies, "ModelParallelStrategy")


@pytest.mark.skipif(not _fsdp2_available(), reason="needs torch.distributed with fully_shard and ModelParallelStrategy")
def test_fsdp2_two_ranks_equal_one_process_on_the_union_batch(tmp_path):
    run_script(SCRIPT, tmp_path, str(tmp_path), "fsdp2")
    run_script(SCRIPT, tmp_path, str(tmp_path), "single")
    r0, r1, single = (torch.load(tmp_path / f"{n}.pt", weights_only=False) for n in ("fsdp2_rank0", "fsdp2_rank1", "single_rank0"))

    # the parameters really were sharded DTensors, γ included (hence its (1,) shape)
    assert "model.blocks.0.attn.qkv.weight" in r0["dtensor"] and "model.blocks.0.attn.qkv.gamma" in r0["dtensor"]
    assert not single["dtensor"]

    steps = len(single["losses"])
    assert steps == len(r0["losses"]) == len(r1["losses"]) == 3
    union = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]  # equal shard sizes: mean of means
    assert union == pytest.approx(single["losses"], rel=1e-5)
    assert r0["losses"] != r1["losses"]  # the ranks saw different rows

    for step in range(steps):
        expected = single["metrics"][step]
        names = {k.rsplit("/", 1)[0] for k in expected if k.endswith("/sigma")}
        assert len(names) == 8 and all(f"{n}/gamma" in expected for n in names)
        assert any("/qk_norm/H" in k for k in expected)
        for rank in (r0, r1):  # every rank publishes the one-process values
            got = rank["metrics"][step]
            assert set(got) == set(expected)
            for key, value in expected.items():
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)

    for key, value in single["full"].items():
        torch.testing.assert_close(r0["full"][key], value, rtol=1e-5, atol=1e-5, msg=key)
        torch.testing.assert_close(r1["full"][key], r0["full"][key], rtol=0, atol=0, msg=key)
    for key, value in r0["buffers"].items():
        assert torch.equal(value, r1["buffers"][key]), key  # u / sigma identical across ranks
    init, last = single["metrics"][0], single["metrics"][-1]
    assert any(init[k] != last[k] for k in init if k.endswith("/sigma"))  # training moved σ


@pytest.mark.skipif(not _fsdp2_available(), reason="needs torch.distributed with fully_shard and ModelParallelStrategy")
def test_fsdp2_meta_device_init_materialises_the_spectral_state_and_loads_plain_weights(tmp_path):
    """Built under ``trainer.init_module(empty_init=True)``: converted on meta, sharded, materialised by Lightning
    (``to_empty`` + ``reset_parameters`` on DTensor weights). Then γ = σ = ‖W‖₂ of the gathered weight (float64
    SVD reference, rtol 1e-6) with ``u`` identical on both ranks; and an unconverted model's weights loaded with
    ``set_model_state_dict`` + ``reset_sigma_reparam_state`` give that model's logits (atol 1e-5)."""
    run_script(SCRIPT, tmp_path, str(tmp_path), "meta")
    r0, r1 = (torch.load(tmp_path / f"meta_rank{r}.pt", weights_only=False)["meta"] for r in (0, 1))
    layers = r0["materialised"]
    assert len(layers) == 8
    for name, v in layers.items():
        assert v["dtensor"], name  # the weights were sharded DTensors when the state was set
        assert v["gamma"] == pytest.approx(v["exact"], rel=1e-6) and v["sigma"] == pytest.approx(v["exact"], rel=1e-6)
        assert torch.equal(v["u"], r1["materialised"][name]["u"]) and v["gamma"] == r1["materialised"][name]["gamma"]
    for run in (r0, r1):
        got, expected = run["logits"]
        assert expected.abs().max() > 0.1
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
