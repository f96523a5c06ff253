"""Names free of wrapper segments: ``torch.compile``'s ``_orig_mod``, FSDP1's ``_fsdp_wrapped_module``, the
activation-checkpointing / offload wrappers' ``_checkpoint_wrapped_module`` and DDP's ``module`` never reach a
module name, a glob or a logged key (entrotrain/taps/module_names.py); a checkpointed module is captured once per
forward, not again when backward recomputes it (entrotrain/taps/exclusive.py).

The Lightning fits and ``entropy_snapshot`` compare a wrapped TinyGPT with the same model unwrapped (same weights):
same keys, values equal within 1e-5. FSDP1 runs on CPU in a 1-process gloo group, in a subprocess
(tests/taps/fsdp1_cpu_run.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
    offload_wrapper,
)

from entrotrain.taps.activation_tap import ActivationTap
from entrotrain.taps.attention_tap import AttentionTap
from entrotrain.taps.exclusive import capture_allowed, in_backward
from entrotrain.taps.module_names import (
    WRAPPER_SEGMENTS,
    clean_module_name,
    named_modules,
    unwrap_module,
    wrapped_module,
)
from entrotrain.taps.name_filter import NameFilter
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)
from tests.helpers.wrapper_models import data, fit, is_block, same_values, snapshot, tiny_gpt

FSDP = "_fsdp_wrapped_module"
CKPT = "_checkpoint_wrapped_module"
COMPILE = "_orig_mod"


def checkpointed(reentrant: bool = False):
    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT

    def wrap(model: nn.Module) -> nn.Module:
        apply_activation_checkpointing(model, lambda m: checkpoint_wrapper(m, checkpoint_impl=impl), check_fn=is_block)
        return model

    return wrap


# ---------------------------------------------------------------------------------------------- clean_module_name
@pytest.mark.parametrize("segment", WRAPPER_SEGMENTS)
def test_each_wrapper_segment_is_stripped_wherever_it_stands(segment):
    assert clean_module_name(f"model.{segment}.blocks.0") == "model.blocks.0"
    assert clean_module_name(f"{segment}.blocks.0") == "blocks.0"
    assert clean_module_name(f"blocks.0.{segment}") == "blocks.0"
    assert clean_module_name(segment) == ""
    assert clean_module_name(f"{segment}.{segment}.attn") == "attn"


def test_nested_compile_checkpoint_and_fsdp_segments():
    raw = f"{FSDP}.model.blocks.0.{FSDP}.{CKPT}.{COMPILE}.attn.qkv"
    assert clean_module_name(raw) == "model.blocks.0.attn.qkv"
    assert set(WRAPPER_SEGMENTS) == {FSDP, CKPT, COMPILE}


@pytest.mark.parametrize(
    "name",
    ["my_fsdp_wrapped_module_x", "blocks.my_fsdp_wrapped_module_x.attn", f"x{CKPT}", f"{COMPILE}s.attn",
     "module.blocks.0", "orig_mod", "", "blocks.0.attn"],
)
def test_only_exact_segments_are_stripped(name):
    assert clean_module_name(name) == name


# ---------------------------------------------------------------------------------------------- named_modules
def names_and_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return list(named_modules(model))


def test_checkpoint_and_offload_wrappers_give_the_plain_names_and_the_inner_modules():
    plain = tiny_gpt()
    want = [(n, type(m)) for n, m in plain.named_modules()]
    blocks = list(plain.blocks)
    plain.blocks[0] = checkpoint_wrapper(plain.blocks[0])
    plain.blocks[1] = offload_wrapper(plain.blocks[1])
    raw = [n for n, _ in plain.named_modules()]
    assert f"blocks.0.{CKPT}.attn" in raw and f"blocks.1.{CKPT}.attn" in raw
    got = names_and_modules(plain)
    assert [(n, type(m)) for n, m in got] == want
    assert dict(got)["blocks.0"] is blocks[0] and dict(got)["blocks.1"] is blocks[1]  # the module whose forward runs
    assert wrapped_module(plain.blocks[0]) is blocks[0] and wrapped_module(blocks[0]) is None


def test_compile_fsdp_shaped_and_data_parallel_wrappers_nested():
    """Hand-built: an FSDP1-shaped wrapper (a module whose only child is ``_fsdp_wrapped_module``), DataParallel
    (by class: its ``module`` segment is dropped by the walk, never from a string), a compiled and a checkpointed
    block; the real FullyShardedDataParallel runs in test_fsdp1_on_cpu_*."""

    class Shaped(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._fsdp_wrapped_module = inner

    plain = tiny_gpt()
    want = [n for n, _ in plain.named_modules()]
    inner_block = plain.blocks[0]
    plain.blocks[0] = Shaped(checkpoint_wrapper(torch.compile(inner_block)))
    model = nn.DataParallel(Shaped(plain))  # no GPU: DataParallel only holds the module
    raw = [n for n, _ in model.named_modules()]
    assert f"module.{FSDP}.blocks.0.{FSDP}.{CKPT}.{COMPILE}.attn" in raw
    got = names_and_modules(model)
    assert [n for n, _ in got] == want
    assert dict(got)["blocks.0"] is inner_block and dict(got)[""] is plain
    assert unwrap_module(model) is plain


def test_a_module_with_a_wrapper_named_child_among_others_is_no_wrapper():
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._checkpoint_wrapped_module = nn.Linear(2, 2)
            self.other = nn.Linear(2, 2)

    model = Two()
    assert wrapped_module(model) is None
    assert [n for n, _ in named_modules(model)] == ["", "_checkpoint_wrapped_module", "other"]


def test_shared_modules_are_listed_once_as_torch_does():
    shared = nn.Linear(2, 2)
    model = nn.Sequential(shared, checkpoint_wrapper(nn.Sequential(shared, nn.ReLU())), shared)
    want = [n for n, _ in nn.Sequential(shared, nn.Sequential(shared, nn.ReLU()), shared).named_modules()]
    assert [n for n, _ in named_modules(model)] == want == ["", "0", "1", "1.1"]


def test_name_filters_see_clean_names_under_both_wrappers():
    model = checkpointed()(tiny_gpt())
    tap = ActivationTap(model, include="blocks.*")
    assert tap.names == ["blocks.0", "blocks.1"]
    assert NameFilter("blocks.*.attn")(clean_module_name(f"blocks.0.{FSDP}.{CKPT}.attn"))
    attention = AttentionTap(model, include="blocks.*.attn")
    with attention:
        model(data(1)[:, :-1])
    assert sorted(attention.stats) == ["blocks.0.attn", "blocks.1.attn"]


# ---------------------------------------------------------------------------------------------- recomputation
def test_in_backward_is_true_only_inside_a_backward_pass():
    seen = []
    x = torch.ones(3, requires_grad=True)
    y = (x * 2).sum()
    x.register_hook(lambda g: seen.append((in_backward(), capture_allowed(object()))))
    assert not in_backward() and capture_allowed(object())
    y.backward()
    assert seen == [(True, False)]
    assert not in_backward()


@pytest.mark.parametrize("style", ["wrapper", "wrapper_reentrant", "utils_checkpoint", "utils_checkpoint_reentrant"])
def test_a_checkpointed_module_is_captured_once_with_the_values_of_the_plain_model(style):
    x = data(1)[:, :-1]
    plain = tiny_gpt()
    with ActivationTap(plain, include=["blocks.*.attn", "blocks.*.mlp"]) as want_tap, AttentionTap(plain) as want_attn:
        plain(x).sum().backward()

    model = tiny_gpt()
    if style.startswith("wrapper"):
        checkpointed(reentrant=style.endswith("reentrant"))(model)
    else:
        for block in model.blocks:  # HF-style: the parent calls torch.utils.checkpoint around the block
            block.forward = (lambda f, r: lambda h: torch_checkpoint.checkpoint(f, h, use_reentrant=r))(
                block.forward, style.endswith("reentrant")
            )
    with ActivationTap(model, include=["blocks.*.attn", "blocks.*.mlp"]) as tap, AttentionTap(model) as attn:
        model(x).sum().backward()  # recomputes each block's forward inside backward

    assert {k: len(v) for k, v in tap.captures.items()} == {f"blocks.{i}.{m}": 1 for i in (0, 1) for m in ("attn", "mlp")}
    for name in tap.captures:
        torch.testing.assert_close(tap.rows(name), want_tap.rows(name), rtol=1e-6, atol=1e-6)
    assert attn.calls == want_attn.calls == 2 and sorted(attn.stats) == sorted(want_attn.stats)
    for name, stats in want_attn.stats.items():
        torch.testing.assert_close(attn.stats[name], stats, rtol=1e-6, atol=1e-6)
    for p, q in zip(model.parameters(), plain.parameters()):  # the backward itself is unchanged
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------- monitors
@pytest.fixture(scope="module")
def plain_fit():
    return fit()


@pytest.mark.parametrize("reentrant", [False, True])
def test_lightning_monitors_on_checkpointed_blocks_publish_the_plain_keys_and_values(plain_fit, reentrant):
    got = fit(checkpointed(reentrant))
    assert got["sites"] == plain_fit["sites"] == ["model.blocks.0.attn", "model.blocks.1.attn"]
    assert got["losses"] == pytest.approx(plain_fit["losses"], rel=1e-6)
    assert sorted(got["metrics"]) == sorted(plain_fit["metrics"]) == ["0", "1", "2"]
    for step, want in plain_fit["metrics"].items():
        keys = sorted(got["metrics"][step])
        assert keys == sorted(want)
        assert not [k for k in keys if any(s in k for s in WRAPPER_SEGMENTS)]
        assert "entropy/attn/L1/H1" in keys and "entropy/repr/model.blocks.1/rankme" in keys
        for layer in ("model.blocks.0", "model.blocks.1.attn"):  # rows once, not again in the recomputation
            assert got["metrics"][step][f"entropy/repr/{layer}/n_streamed"] == 4 * 12
        assert not same_values(got["metrics"][step], want), step


def test_entropy_snapshot_of_a_checkpointed_model_equals_the_plain_one():
    want = snapshot(tiny_gpt())
    got = snapshot(checkpointed()(tiny_gpt()))
    assert sorted(got) == sorted(want)
    assert "entropy/attn/L0/H0" in got and "entropy/repr/blocks.1/rankme" in got
    assert not same_values(got, want)


# ---------------------------------------------------------------------------------------------- FSDP1 on CPU
@pytest.fixture(scope="module")
def fsdp1(tmp_path_factory):
    from tests.helpers.scripts import run_script

    out = tmp_path_factory.mktemp("fsdp1_cpu")
    run_script(Path(__file__).with_name("fsdp1_cpu_run.py"), out, str(out), timeout=240)
    return json.loads((out / "fsdp1.json").read_text())


def test_fsdp1_on_cpu_module_names_are_the_plain_ones(fsdp1):
    assert {"FullyShardedDataParallel", "CheckpointWrapper"} <= set(fsdp1["wrapper_types"])
    assert f"{FSDP}.blocks.0.{FSDP}.{CKPT}.attn" in fsdp1["raw_names"]  # what torch names them
    assert fsdp1["clean_names"] == fsdp1["plain_names"]


@pytest.mark.parametrize("run", ["fit_fsdp", "fit_fsdp_checkpointed"])
def test_fsdp1_on_cpu_lightning_monitors_publish_the_plain_keys_and_values(fsdp1, run):
    plain, got = fsdp1["fit_plain"], fsdp1[run]
    assert got["sites"] == plain["sites"] == ["model.blocks.0.attn", "model.blocks.1.attn"]
    assert got["losses"] == pytest.approx(plain["losses"], rel=1e-6)
    assert sorted(got["metrics"]) == sorted(plain["metrics"]) == ["0", "1", "2"]
    for step, want in plain["metrics"].items():
        assert sorted(got["metrics"][step]) == sorted(want)
        assert "entropy/repr/model.blocks.0/rankme" in want
        assert not same_values(got["metrics"][step], want), step


def test_fsdp1_on_cpu_entropy_snapshot_equals_the_plain_one(fsdp1):
    got, want = fsdp1["snapshot_fsdp"], fsdp1["snapshot_plain"]
    assert sorted(got) == sorted(want) and "entropy/repr/blocks.0/rankme" in got
    assert not same_values(got, want)



def test_sigma_reparam_globs_see_clean_names_under_a_checkpoint_wrapper():
    from entrotrain.regularizers.sigma_reparam import sigma_reparam, sigma_reparam_names

    kwargs = dict(include=["blocks.*.attn.qkv", "blocks.*.mlp.fc"], qk_joint="blocks.1.attn.qkv")
    plain = sigma_reparam(tiny_gpt(), **kwargs)
    model = sigma_reparam(checkpointed()(tiny_gpt()), **kwargs)  # and no false "weight tying"
    assert sigma_reparam_names(model) == sigma_reparam_names(plain)
    assert "blocks.0.attn.qkv" in sigma_reparam_names(model) and "blocks.1.mlp.fc" in sigma_reparam_names(model)
    assert type(model.blocks[1]._checkpoint_wrapped_module.attn.qkv).__name__ == "SigmaReparamQKJoint"


def loop_logs(wrap) -> dict[int, dict[str, float]]:
    """Two steps of a plain loop through EntropyMonitors (attention, representation, σReparam, prediction head) on
    a σReparam TinyGPT, ``wrap(model)`` being what the loop trains and ``watch``-es."""
    from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
    from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor
    from entrotrain.integrations.loop import EntropyMonitors
    from entrotrain.regularizers.sigma_reparam import sigma_reparam
    from tests.helpers.wrapper_models import VOCAB, monitors

    model = sigma_reparam(tiny_gpt(), include="blocks.**")
    net = wrap(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    chosen = monitors(prefix="") + [
        SigmaReparamMonitor(every_n_steps=1),
        PredictionEntropyMonitor(every_n_steps=1, source="head", head="lm_head", log_media=False, print_summary=False),
    ]
    x = data(1)
    logs = {}
    with EntropyMonitors(chosen, print_summary=False).watch(net, opt) as mons:
        for step in range(2):
            with mons.step(step):
                nn.functional.cross_entropy(net(x[:, :-1]).reshape(-1, VOCAB), x[:, 1:].reshape(-1)).backward()
                opt.step()
                opt.zero_grad()
            logs[step] = dict(mons.logs)
    return logs


def test_plain_loop_on_data_parallel_checkpointed_blocks_logs_the_plain_keys_and_values():
    want = loop_logs(lambda m: m)
    got = loop_logs(lambda m: nn.DataParallel(checkpointed()(m)))  # DataParallel without a GPU: only holds it
    for step in (0, 1):
        assert sorted(got[step]) == sorted(want[step])
        for key in ("entropy/attn/L1/H1", "entropy/repr/blocks.1.attn/n_streamed", "entropy/pred/train/mean",
                    "sigma_reparam/blocks.0.attn.qkv/sigma"):
            assert key in want[step], key
        # σ too: the recomputation in backward repeats the forward's power iteration without writing u
        assert not same_values(got[step], want[step]), step


@pytest.mark.parametrize("style", ["wrapper", "reentrant", "non_reentrant"])
def test_sigma_reparam_under_activation_checkpointing_iterates_once_per_forward(style):
    """Two training steps: u, σ, the gradients and the weights are bit-identical with and without checkpointing
    (the recomputation in backward repeats the forward's power iteration from the same u and writes nothing)."""
    from entrotrain.regularizers.sigma_reparam import sigma_reparam

    def run(checkpointed: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        layer = sigma_reparam(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)), init_iterations=1)
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        if checkpointed and style == "wrapper":
            model = checkpoint_wrapper(layer)
        elif checkpointed:
            model = lambda x: torch_checkpoint.checkpoint(layer, x, use_reentrant=style == "reentrant")  # noqa: E731
        else:
            model = layer
        grads = []
        for _ in range(2):
            model(torch.randn(3, 6, requires_grad=True)).square().sum().backward()
            grads += [p.grad.clone() for p in layer.parameters()]
            opt.step()
            opt.zero_grad()
        return grads + [b.clone() for b in layer.buffers()] + [p.detach().clone() for p in layer.parameters()]

    for got, want in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
