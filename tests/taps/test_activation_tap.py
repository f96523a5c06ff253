"""ActivationTap: shapes, deterministic subsampling, detached copies, hook lifecycle, errors; Reservoir."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from entrotrain.errors import EntrotrainError, TapError
from entrotrain.taps import ActivationTap, Reservoir, activation_rows
from tests.helpers.reference import one_thread  # noqa: F401,E402  (autouse fixture)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3, padding=1)  # (B, 5, H, W)
        self.tok = nn.Linear(5, 6)  # (B, T, 6)
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 4)])
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        t = self.tok(h.flatten(2).transpose(1, 2))
        for block in self.blocks:
            t = block(t)
        t = self.act(t)  # in place on blocks.1's output
        return t.mean(1)


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_rows_from_each_layout_with_subsampling():
    torch.manual_seed(0)
    x2 = torch.randn(7, 3)
    cap = activation_rows(x2, max_rows=3)
    assert torch.equal(cap.rows, x2[[0, 3, 6]]) and cap.sample.tolist() == [0, 3, 6]

    x3 = torch.randn(4, 10, 3)
    cap = activation_rows(x3, max_rows=2, max_tokens=4)
    expected = x3[[0, 3]][:, [0, 3, 6, 9]].reshape(-1, 3)
    assert torch.equal(cap.rows, expected)
    assert cap.sample.tolist() == [0] * 4 + [3] * 4

    x4 = torch.randn(2, 3, 4, 5)  # (B, C, H, W): positions become rows, channels features
    cap = activation_rows(x4)
    assert torch.equal(cap.rows, x4.permute(0, 2, 3, 1).reshape(-1, 3))
    cap = activation_rows(x4, max_tokens=2)
    assert torch.equal(cap.rows, x4.flatten(2)[:, :, [0, 19]].transpose(1, 2).reshape(-1, 3))

    cap = activation_rows((torch.ones(2, 3), "aux"))
    assert torch.equal(cap.rows, torch.ones(2, 3))
    cap = activation_rows([torch.zeros(1, 2), torch.ones(2, 3)], output_index=1)
    assert torch.equal(cap.rows, torch.ones(2, 3))
    cap = activation_rows(x3, layout="channels_first")  # (B, C, L): L positions of C channels
    assert torch.equal(cap.rows, x3.transpose(1, 2).reshape(-1, 10))


class Conv1dNet(nn.Module):
    """A 1-D CNN ((B, C, L) outputs) and a Linear over a (B, H, W, C) grid: features in dim 1, then last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 6, 3, padding=1)
        self.norm = nn.BatchNorm1d(6)
        self.pool = nn.MaxPool1d(2)
        self.proj = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.norm(self.conv(x)))  # (B, 6, L / 2)
        return self.proj(h.transpose(1, 2).reshape(x.shape[0], 2, -1, 6))  # (B, 2, L / 4, 5)


def test_auto_layout_reads_each_module_s_features_where_the_module_puts_them():
    """Under layout='auto' a Conv1d / BatchNorm1d / MaxPool1d output (B, C, L) gives rows of C features (it was read
    (B, T, C): L 'features' per channel) and a Linear's 4-D output rows of its out_features (it was read (B, C, H, W));
    an explicit layout still wins."""
    torch.manual_seed(0)
    net, x = Conv1dNet().eval(), torch.randn(3, 3, 8)
    with ActivationTap(net, include="*") as tap:
        net(x)
    conv = net.conv(x)
    assert torch.equal(tap.rows("conv"), conv.transpose(1, 2).reshape(-1, 6))
    assert tap.rows("norm").shape == (24, 6) and tap.rows("pool").shape == (12, 6)
    assert torch.equal(tap.rows("proj"), net(x).reshape(-1, 5))
    with ActivationTap(net, include="conv", layout="channels_last") as tap:
        net(x)
    assert torch.equal(tap.rows("conv"), conv.reshape(-1, 8))


def test_rows_are_detached_copies():
    w = torch.randn(3, 3, requires_grad=True)
    out = torch.randn(4, 3) @ w
    cap = activation_rows(out)
    assert not cap.rows.requires_grad
    before = cap.rows.clone()
    out.data.add_(1.0)
    assert torch.equal(cap.rows, before)  # not a view of the output


@pytest.mark.parametrize("bad, match", [("text", "not a tensor"), (torch.arange(6).view(2, 3), "floating"),
                                        (torch.randn(3), "shape"), ((torch.randn(2, 2),), None)])
def test_bad_outputs_raise(bad, match):
    if match is None:
        with pytest.raises(TapError, match="output_index"):
            activation_rows(bad, output_index=3)
        return
    with pytest.raises(TapError, match=match):
        activation_rows(bad, name="m")


def test_tap_captures_by_glob_and_survives_inplace_ops():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 2, 4, 4)
    tap = ActivationTap(net, include=["blocks.*", "conv"], max_tokens=5)
    assert tap.names == ["conv", "blocks.0", "blocks.1"]  # ModuleList itself is a container, skipped
    assert no_hooks(net)
    with tap:
        assert not no_hooks(net)
        y = net(x)
    assert no_hooks(net)
    keep = torch.linspace(0, 15, 5).round().long()
    with torch.no_grad():
        h = net.conv(x)
        t0 = net.blocks[0](net.tok(h.flatten(2).transpose(1, 2)))
        t1 = net.blocks[1](t0)
    assert torch.equal(tap.rows("conv"), h.flatten(2)[:, :, keep].transpose(1, 2).reshape(-1, 5))
    assert torch.equal(tap.rows("blocks.0"), t0[:, keep].reshape(-1, 6))
    # blocks.1's output was later modified in place by ReLU(inplace=True): the capture holds the pre-ReLU values
    assert torch.equal(tap.rows("blocks.1"), t1[:, keep].reshape(-1, 4))
    assert (tap.rows("blocks.1") < 0).any() and y.requires_grad


def test_tap_exclude_and_on_capture_and_reset():
    net = Net()
    seen: list[str] = []
    tap = ActivationTap(net, include="**", exclude=["conv", "act"], on_capture=lambda n, c: seen.append(n))
    assert tap.names == ["tok", "blocks.0", "blocks.1"]
    with tap:
        net(torch.randn(1, 2, 3, 3))
    assert seen == ["tok", "blocks.0", "blocks.1"] and tap.captures == {}
    tap2 = ActivationTap(net, include="tok")
    with tap2:
        net(torch.randn(1, 2, 3, 3))
        net(torch.randn(1, 2, 3, 3))
    assert len(tap2.captures["tok"]) == 2
    tap2.reset()
    with pytest.raises(TapError, match="nothing captured"):
        tap2.rows("tok")


def test_hooks_removed_on_exception_and_disarm_twice():
    net = Net()
    tap = ActivationTap(net, include=["tok"])
    with pytest.raises(RuntimeError):
        with tap:
            net(torch.randn(1, 3, 3, 3))  # wrong channel count: conv raises
    assert no_hooks(net) and not tap.armed
    tap.arm()
    tap.arm()  # idempotent
    assert sum(len(m._forward_hooks) for m in net.modules()) == 1
    tap.disarm()
    tap.disarm()
    assert no_hooks(net)


def test_non_tensor_output_inside_model_raises_tap_error():
    class Dicty(nn.Module):
        def forward(self, x):
            return {"h": x}

    net = nn.Sequential(nn.Linear(2, 2), Dicty())
    tap = ActivationTap(net, include=["1"])
    with pytest.raises(TapError, match="exclude"):
        with tap:
            net(torch.randn(2, 2))
    assert no_hooks(net)


def test_no_match_names_the_modules():
    with pytest.raises(EntrotrainError, match=r"tok.*Fix the glob"):
        ActivationTap(Net(), include=["encoder.*"])
    with pytest.raises(EntrotrainError, match="max_tokens"):
        ActivationTap(Net(), max_tokens=0)
    with pytest.raises(EntrotrainError, match="layout"):
        ActivationTap(Net(), layout="nhwc")  # type: ignore[arg-type]


def test_tap_touches_no_rng():
    net = Net()
    torch.manual_seed(5)
    state = torch.get_rng_state()
    with ActivationTap(net, max_rows=2, max_tokens=3):
        with torch.no_grad():
            net(torch.ones(4, 2, 4, 4))
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------------------------------------------- reservoir


def test_reservoir_keeps_everything_below_capacity_in_order():
    r = Reservoir(10, seed=0)
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    r.add(a, torch.arange(4))
    r.add(b, torch.arange(4, 9))
    assert torch.equal(r.rows, torch.cat([a, b])) and r.labels.tolist() == list(range(9))


def test_reservoir_is_uniform_seeded_and_leaves_global_rng_alone():
    stream = torch.arange(40, dtype=torch.float64).reshape(-1, 1)
    state = torch.get_rng_state()
    counts = torch.zeros(40)
    kept_first = None
    for seed in range(400):
        r = Reservoir(8, seed=seed)
        for block in stream.split(7):
            r.add(block, block[:, 0].long())
        kept = r.rows[:, 0].long()
        assert len(kept.unique()) == 8 and torch.equal(r.labels, kept)
        counts[kept] += 1
        if seed == 0:
            kept_first = kept
    assert torch.equal(torch.get_rng_state(), state)
    # each item is kept with probability 8/40 = 0.2: 80 of 400 expected, binomial sd 8
    assert counts.min() > 80 - 5 * 8 and counts.max() < 80 + 5 * 8
    r = Reservoir(8, seed=0)
    for block in stream.split(7):
        r.add(block)
    assert torch.equal(r.rows[:, 0].long(), kept_first)  # same seed, same stream: same rows
    r.reset()
    assert r.rows is None and r.seen == 0


def test_reservoir_errors():
    with pytest.raises(EntrotrainError, match="capacity"):
        Reservoir(0)
    r = Reservoir(3)
    r.add(torch.randn(2, 4))
    with pytest.raises(EntrotrainError, match="features"):
        r.add(torch.randn(2, 5))
    with pytest.raises(EntrotrainError, match="labels"):
        r.add(torch.randn(2, 4), torch.arange(2))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Reservoir(True), "capacity"),
        (lambda: Reservoir(4, seed="a"), "seed"),  # before: RuntimeError from manual_seed
        (lambda: Reservoir(4, seed=1.5), "seed"),  # before: RuntimeError from manual_seed
        (lambda: Reservoir(4).add([[1.0, 2.0]]), "rows"),  # before: AttributeError ('list' has no 'dim')
        (lambda: Reservoir(4).add(torch.randn(3)), "rows"),
        (lambda: Reservoir(4).add(torch.randn(2, 3), [0, 1]), "labels"),  # before: AttributeError
        (lambda: Reservoir(4).add(torch.randn(2, 3), torch.zeros(2, 2)), "labels"),  # before: RuntimeError on copy
    ],
)
def test_reservoir_refuses_bad_arguments_with_the_fix(make, match):
    with pytest.raises(EntrotrainError, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"on_capture": 3}, "on_capture"),  # before: accepted, then TypeError inside the forward hook
        ({"output_index": True}, "output_index"),
        ({"output_index": 1.0}, "output_index"),
        ({"layout": "nchw"}, "layout"),
        ({"max_rows": 0}, "max_rows"),
        ({"max_tokens": 2.5}, "max_tokens"),
    ],
)
def test_activation_tap_refuses_bad_constructor_arguments(kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        ActivationTap(Net(), **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_rows": 0}, "max_rows"),  # before: an empty index, zero rows captured
        ({"max_tokens": -1}, "max_tokens"),  # before: RuntimeError from torch.linspace
        ({"output_index": "0"}, "output_index"),  # before: TypeError comparing str and int
        ({"layout": "nhwc"}, "layout"),  # before: silently read as channels_last
    ],
)
def test_activation_rows_refuses_bad_arguments(kwargs, match):
    with pytest.raises(EntrotrainError, match=match):
        activation_rows((torch.randn(2, 3, 4),), **kwargs)


def test_nested_double_star_match_warns_with_a_narrower_pattern() -> None:
    """'blocks.**' hooks every block AND everything inside it (each activation captured many times): a warning names
    the pattern and the outermost matches; 'blocks.*' (the blocks) does not warn."""
    import warnings

    from torch import nn

    from entrotrain.taps import ActivationTap

    block = lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))  # noqa: E731
    model = nn.Module()
    model.blocks = nn.ModuleList([block(), block()])
    with pytest.warns(UserWarning, match=r"ActivationTap: include 'blocks\.\*\*' matches 12 modules nested"):
        ActivationTap(model, include="blocks.**")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ActivationTap(model, include="blocks.*").names == ["blocks.0", "blocks.1"]
