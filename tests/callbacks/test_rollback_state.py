"""RollbackState alone: take -> train on -> restore gives back, bit for bit, the model's and the optimizers' state of
the moment of take, in place (same parameter objects and storages), with host buffers re-used from one take to the
next; the trajectory after a restore is the one a deep copy taken at that moment follows."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from entrotrain.callbacks.rollback_state import RollbackState, unwrap_optimizer
from entrotrain.errors import EntrotrainError
from entrotrain.regularizers.sigma_reparam import sigma_reparam


def _fused_ok() -> bool:
    try:
        p = nn.Parameter(torch.ones(2))
        torch.optim.Adam([p], fused=True)
        return True
    except (RuntimeError, TypeError):
        return False


FUSED = _fused_ok()

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam_foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "adam_fused": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2, momentum=0.5, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
}
KINDS = [k for k in OPTIMIZERS if FUSED or "fused" not in k]


def mlp(seed: int, d_in: int = 4, hidden: int = 8, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out))


def batches(n: int, seed: int, d_in: int = 4, d_out: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, d_in, generator=g), torch.randn(5, d_out, generator=g)) for _ in range(n)]


def train(model: nn.Module, optimizers: list, data, loss_fn=None) -> None:
    for x, y in data:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y) if loss_fn else (out - y).pow(2).mean()
        loss.backward()
        for opt in optimizers:
            opt.step()


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def opt_state(opt) -> dict:
    """Per parameter (by position), every state entry cloned (tensors) or copied."""
    opt = unwrap_optimizer(opt)
    out = {}
    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            state = opt.state.get(p)
            out[index] = None if not state else {
                k: (v.detach().clone(), v.device) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                for k, v in state.items()
            }
            index += 1
    return out


def assert_same(a, b, where: str = "") -> None:
    """Bit for bit (values, dtype, shape, device) through nested dicts / tuples / lists."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        assert torch.equal(a, b), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys() if isinstance(a, dict) else a} vs {b}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a} != {b}"


def identities(model: nn.Module) -> list[tuple[int, int]]:
    return [(id(t), t.data_ptr()) for t in (*model.parameters(), *model.buffers())]


# ---------------------------------------------------------------------------- every optimizer
@pytest.mark.parametrize("kind", KINDS)
def test_restore_gives_back_the_state_of_the_take_in_place(kind: str) -> None:
    model = mlp(0)
    opt = OPTIMIZERS[kind](model.parameters())
    train(model, [opt], batches(3, 1))
    want_model, want_opt = model_state(model), opt_state(opt)
    ids = identities(model)
    opt_tensors = {(i, k): id(v) for i, p in enumerate(model.parameters()) for k, v in opt.state.get(p, {}).items()
                   if isinstance(v, torch.Tensor)}
    state = RollbackState()
    state.take(model, [opt], step=3)
    train(model, [opt], batches(4, 2))
    assert not torch.equal(model[0].weight, want_model["0.weight"])  # training moved it
    assert state.restore(model, [opt]) == 3
    assert_same(model_state(model), want_model, "model")
    assert_same(opt_state(opt), want_opt, "optimizer")
    assert identities(model) == ids  # the same parameter objects and storages (DDP buckets, compiled graphs)
    # the optimizer's own tensors are refilled, not replaced
    assert {(i, k): id(v) for i, p in enumerate(model.parameters()) for k, v in opt.state.get(p, {}).items()
            if isinstance(v, torch.Tensor)} == opt_tensors
    assert all(p.grad is None for p in model.parameters())
    assert opt.param_groups[0]["lr"] == OPTIMIZERS[kind]([nn.Parameter(torch.ones(1))]).param_groups[0]["lr"]


@pytest.mark.parametrize("kind", ["adam", "adam_fused", "adagrad"] if FUSED else ["adam", "adagrad"])
def test_step_counters_stay_on_the_device_the_optimizer_keeps_them(kind: str) -> None:
    model = mlp(0)
    opt = OPTIMIZERS[kind](model.parameters())
    train(model, [opt], batches(2, 1))
    devices = {i: {k: v.device for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
               for i, p in enumerate(model.parameters())}
    state = RollbackState()
    state.take(model, [opt], step=2)
    for p in model.parameters():  # the state gone altogether (e.g. the user reset it): rebuilt where it was
        opt.state.pop(p)
    state.restore(model, [opt])
    assert {i: {k: v.device for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
            for i, p in enumerate(model.parameters())} == devices


def test_host_buffers_are_reused_from_one_take_to_the_next() -> None:
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, [opt], batches(2, 1))
    state = RollbackState()
    state.take(model, [opt], step=2)
    model_buffers = {k: v for k, v in state._model.items()}
    opt_buffers = [{pid: {k: v[0] for k, v in entry.items()} for pid, entry in held.items() if entry}
                   for held in state._optimizers]
    nbytes = state.nbytes
    train(model, [opt], batches(2, 3))
    state.take(model, [opt], step=4)
    assert all(state._model[k] is v for k, v in model_buffers.items())
    for held, before in zip(state._optimizers, opt_buffers):
        for pid, entry in before.items():
            assert all(held[pid][k][0] is v for k, v in entry.items())
    assert state.nbytes == nbytes
    # and the held values are the new ones, not host buffers pointing at live memory
    assert all(v.data_ptr() != p.data_ptr() for v, p in zip(state._model.values(), model.state_dict().values()))
    assert_same({k: v for k, v in state._model.items()}, model_state(model))
    assert state.step == 4


def test_a_parameter_without_optimizer_state_at_take_has_none_after_restore() -> None:
    torch.manual_seed(0)
    first, late = nn.Linear(4, 3), nn.Linear(4, 3)  # `late` gets gradients only after the take
    model = nn.ModuleDict({"first": first, "late": late})
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = batches(5, 1)
    train(first, [opt], data[:2])
    assert all(p not in opt.state or not opt.state[p] for p in late.parameters())
    state = RollbackState()
    state.take(model, [opt], step=2)
    train(lambda x: first(x) + late(x), [opt], data[2:])
    assert all(opt.state[p] for p in late.parameters())
    state.restore(model, [opt])
    assert all(not opt.state.get(p) for p in late.parameters())
    # and it starts afresh at its next step, as it did then: same as a deep copy taken at the take
    ref_model, ref_opt = copy.deepcopy((model, opt))  # (load_state_dict would share Adam's step tensors)
    train(lambda x: first(x) + late(x), [opt], data[2:])
    train(lambda x: ref_model["first"](x) + ref_model["late"](x), [ref_opt], data[2:])
    assert_same(model_state(model), model_state(ref_model))


def test_two_optimizers_and_a_tied_weight() -> None:
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.mid = nn.Linear(4, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, x):
            return self.out(torch.tanh(self.mid(self.emb(x))))

    model = Tied()
    opt_a = torch.optim.AdamW([model.emb.weight], lr=1e-2)
    opt_b = torch.optim.SGD(model.mid.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 7, (6,), generator=g), torch.randint(0, 7, (6,), generator=g)) for _ in range(6)]
    ce = nn.functional.cross_entropy
    train(model, [opt_a, opt_b], data[:2], ce)
    want_model, want_a, want_b = model_state(model), opt_state(opt_a), opt_state(opt_b)
    state = RollbackState()
    state.take(model, [opt_a, opt_b], step=2)
    train(model, [opt_a, opt_b], data[2:], ce)
    state.restore(model, [opt_a, opt_b])
    assert model.out.weight is model.emb.weight  # still tied
    assert_same(model_state(model), want_model)
    assert_same(opt_state(opt_a), want_a)
    assert_same(opt_state(opt_b), want_b)
    with pytest.raises(EntrotrainError, match="2 optimizer"):
        state.restore(model, [opt_a])


def test_batchnorm_statistics_roll_back() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    train(model, [opt], batches(2, 1))
    want = model_state(model)
    state = RollbackState()
    state.take(model, [opt], step=2)
    train(model, [opt], batches(3, 2))
    assert int(model[1].num_batches_tracked) == 5 and not torch.equal(model[1].running_mean, want["1.running_mean"])
    state.restore(model, [opt])
    assert_same(model_state(model), want)


def test_sigma_reparam_u_and_gamma_roll_back() -> None:
    model = sigma_reparam(mlp(0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, [opt], batches(2, 1))
    want = model_state(model)
    assert any(k.endswith(".u") for k in want) and any(k.endswith(".gamma") for k in want)
    state = RollbackState()
    state.take(model, [opt], step=2)
    train(model, [opt], batches(3, 2))
    assert not torch.equal(model[0].u, want["0.u"])
    state.restore(model, [opt])
    assert_same(model_state(model), want)
    # the next forward's power iteration starts from the held u: same as a copy taken then
    ref, ref_opt = copy.deepcopy((model, opt))
    train(model, [opt], batches(2, 5))
    train(ref, [ref_opt], batches(2, 5))
    assert_same(model_state(model), model_state(ref))


def test_restore_refuses_nothing_held_and_a_changed_model() -> None:
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = RollbackState()
    with pytest.raises(EntrotrainError, match="no state is held"):
        state.restore(model, [opt])
    state.take(model, [opt], step=0)
    model.add_module("extra", nn.Linear(2, 2))
    with pytest.raises(EntrotrainError, match="state keys changed"):
        state.restore(model, [opt])
    state.clear()
    assert state.step is None and state.nbytes == 0


def test_non_finite_state_is_never_held_the_previous_good_one_stays() -> None:
    """The guard judges a step good on a value measured in that step's forward, before its update: the update can
    still turn the weights (or Adam's moments) non-finite. Such a state is not held; the one before stays."""
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, [opt], batches(2, 1))
    want_model, want_opt = model_state(model), opt_state(opt)
    state = RollbackState()
    assert state.take(model, [opt], step=2) is True
    with torch.no_grad():
        model[2].weight[0, 0] = math.nan
    assert state.take(model, [opt], step=3) is False
    assert state.step == 2
    model_nan_opt = mlp(0)
    opt2 = torch.optim.Adam(model_nan_opt.parameters(), lr=1e-2)
    train(model_nan_opt, [opt2], batches(1, 1))
    opt2.state[next(model_nan_opt.parameters())]["exp_avg_sq"][0] = math.inf
    assert RollbackState().take(model_nan_opt, [opt2], step=1) is False
    state.restore(model, [opt])
    assert_same(model_state(model), want_model)
    assert_same(opt_state(opt), want_opt)


# ---------------------------------------------------------------------------- the trajectory property
@settings(max_examples=25)
@given(
    kind=st.sampled_from(KINDS),
    hidden=st.integers(0, 6),  # 0: empty weights
    k1=st.integers(0, 3),
    k2=st.integers(0, 3),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    retake=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_continuing_after_restore_is_bit_identical_to_a_copy_taken_at_the_take(
    kind, hidden, k1, k2, n, seed, retake, dtype
):
    data = [(x.to(dtype), y.to(dtype)) for x, y in batches(k1 + k2 + n, seed, d_in=3, d_out=2)]
    model = mlp(seed, 3, hidden, 2).to(dtype)
    opt = OPTIMIZERS[kind](model.parameters())
    state = RollbackState()
    if retake:  # an earlier take whose buffers the next one re-uses
        state.take(model, [opt], step=0)
    train(model, [opt], data[:k1])
    state.take(model, [opt], step=k1)
    ref_model, ref_opt = copy.deepcopy((model, opt))
    train(model, [opt], data[k1:k1 + k2])
    state.restore(model, [opt])
    tail = data[k1 + k2:]
    train(model, [opt], tail)
    train(ref_model, [ref_opt], tail)
    assert_same(model_state(model), model_state(ref_model), "model")
    assert_same(opt_state(opt), opt_state(ref_opt), "optimizer")


# ---------------------------------------------------------------------------- refused: sharded state
def test_fsdp1_is_refused_at_the_first_take(tmp_path) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from tests.helpers.gloo import in_one_process_group

    def body() -> None:
        model = FSDP(mlp(0), device_id=torch.device("cpu"))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with pytest.raises(EntrotrainError, match="FSDP.*action='reduce_lr'"):
            RollbackState().take(model, [opt], step=0)
        from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard

        guard = EntropyCollapseGuard("k", threshold=0.5, action="rollback")
        with pytest.raises(EntrotrainError, match="FSDP"):  # refused when training starts, not at a first good step
            guard.track(model, [opt])
        EntropyCollapseGuard("k", threshold=0.5, action="reduce_lr").track(model, [opt])  # other actions: fine

    in_one_process_group(body)


# ---------------------------------------------------------------------------- CUDA: pinned host buffers, async copies
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["adam", "adam_fused", "adam_capturable", "sgd_momentum"])
def test_cuda_restore_and_trajectory_match_a_copy_taken_at_the_take(kind: str) -> None:
    """Held in pinned host memory with copies queued on the stream: a restore right after training, and the
    trajectory after it, match a deep copy on the GPU bit for bit; the step counters stay where the optimizer keeps
    them (CPU for plain Adam, the GPU for fused / capturable)."""
    makers = {**OPTIMIZERS, "adam_capturable": lambda ps: torch.optim.Adam(ps, lr=1e-2, capturable=True)}
    model = mlp(0).cuda()
    opt = makers[kind](model.parameters())
    data = [(x.cuda(), y.cuda()) for x, y in batches(9, 1)]
    train(model, [opt], data[:3])
    state = RollbackState()
    state.take(model, [opt], step=3)
    assert all(t.is_pinned() for t in state._model.values())
    ref_model, ref_opt = copy.deepcopy((model, opt))
    devices = opt_state(opt)
    train(model, [opt], data[3:6])
    state.restore(model, [opt])
    train(model, [opt], data[6:])
    train(ref_model, [ref_opt], data[6:])
    torch.cuda.synchronize()
    assert_same(model_state(model), model_state(ref_model))
    assert_same(opt_state(opt), opt_state(ref_opt))
    assert {i: {k: v[1] for k, v in (s or {}).items() if isinstance(v, tuple)} for i, s in opt_state(opt).items()} == {
        i: {k: v[1] for k, v in (s or {}).items() if isinstance(v, tuple)} for i, s in devices.items()}


def _accelerated(optimizer: torch.optim.Optimizer):
    """A real ``accelerate`` ``AcceleratedOptimizer`` around ``optimizer``, without ``__init__`` (which needs an
    initialised global ``AcceleratorState``): a ``torch.optim.Optimizer`` subclass whose ``state`` and
    ``param_groups`` are properties reading ``self.optimizer``'s."""
    accelerate = pytest.importorskip("accelerate.optimizer")
    wrapper = object.__new__(accelerate.AcceleratedOptimizer)
    wrapper.optimizer, wrapper.scaler = optimizer, None
    return wrapper


def test_unwrap_optimizer_reaches_inside_accelerates_optimizer_and_agrees_with_the_rate_check() -> None:
    """AcceleratedOptimizer subclasses torch.optim.Optimizer, so unwrapping stopped at the wrapper: a
    ZeroRedundancyOptimizer inside it was never seen (its own state is empty, .optim holds the shard: rollback held
    nothing of it). The guard's rate check and rollback now unwrap through one function; a wrapper with a state of
    its own (Lookahead-style) is kept."""
    from entrotrain.callbacks._rate_ignored import rate_ignored
    from entrotrain.callbacks.rollback_state import stepped_optimizer
    from tests.helpers.gloo import in_one_process_group

    p = nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([p])
    assert unwrap_optimizer(_accelerated(adam)) is adam and stepped_optimizer(_accelerated(adam)) is adam

    class Lookahead(torch.optim.Optimizer):  # keeps slow weights in a state of its own
        def __init__(self, optimizer):
            self.optimizer, self.state, self.defaults = optimizer, {}, {}
            self.param_groups = optimizer.param_groups

    own = Lookahead(adam)
    assert unwrap_optimizer(own) is own and unwrap_optimizer(_accelerated(own)) is own

    def body() -> None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        zero = ZeroRedundancyOptimizer([nn.Parameter(torch.ones(3))], optimizer_class=torch.optim.Adam, lr=0.1)
        assert unwrap_optimizer(_accelerated(zero)) is zero.optim

    in_one_process_group(body)
    transformers = pytest.importorskip("transformers")
    ada = transformers.Adafactor([nn.Parameter(torch.ones(3))], lr=None, relative_step=True)
    assert rate_ignored([_accelerated(ada)]) is not None


def test_one_process_takes_and_restores_without_a_collective(monkeypatch) -> None:
    """The ranks' agreement on what is held and restored (rollback_state.agreement_groups) costs nothing in one
    process: no collective, with hold='trainable' too (its refusals are agreed on only with 2+ processes)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a collective in one process")

    for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast"):
        monkeypatch.setattr(torch.distributed, name, refuse)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    model[0].bias.requires_grad_(False)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    state = RollbackState(trainable_only=True)
    assert state.take(model, [opt], step=1)
    held = copy.deepcopy(model.state_dict())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    assert state.restore(model, [opt]) == 1
    assert all(torch.equal(held[k], v) for k, v in model.state_dict().items())
