"""The 12-bit information-plane data set (stand-in rule), the 12-10-7-5-4-3-2 network and its task."""

from __future__ import annotations

import itertools
import math

import lightning as L
import pytest
import torch

from entrotrain.errors import EntrotrainError
from entrotrain.models.ib_mlp import IB_WIDTHS, IBMLP
from entrotrain.tasks.information_plane import (
    THETA,
    InformationPlaneDataModule,
    InformationPlaneTask,
    icosahedron_dataset,
    icosahedron_vertices,
)


def _brute_labels() -> list[int]:
    """Label of every pattern by a Python loop over selected vertex pairs (float64 dot products)."""
    v = icosahedron_vertices().tolist()
    c = 1 / math.sqrt(5)
    out = []
    for i in range(4096):
        bits = [(i >> (11 - k)) & 1 for k in range(12)]
        sel = [k for k in range(12) if bits[k]]
        f = 41.2 * len(sel)
        for a, b in itertools.combinations(sel, 2):
            dot = sum(p * q for p, q in zip(v[a], v[b]))
            if abs(dot - c) < 1e-9:
                f += 0.8
            elif abs(dot + c) < 1e-9:
                f -= 8.8
            elif abs(dot + 1) < 1e-9:
                f -= 13.6
            else:
                raise AssertionError(f"unexpected dot product {dot}")
        out.append(int(f > THETA))
    return out


def test_vertices_form_a_regular_icosahedron():
    v = icosahedron_vertices()
    assert v.shape == (12, 3)
    assert torch.allclose(v.norm(dim=1), torch.ones(12, dtype=torch.float64))
    gram = v @ v.T - torch.eye(12, dtype=torch.float64)
    c = 1 / math.sqrt(5)
    for value, per_vertex in ((c, 5), (-c, 5), (-1.0, 1)):  # 5 nearest, 5 second-nearest, 1 antipode each
        assert ((gram - value).abs() < 1e-9).sum(1).tolist() == [per_vertex] * 12


def test_dataset_matches_brute_force_and_the_reference_counts():
    x, y, f = icosahedron_dataset()
    assert x.shape == (4096, 12) and x.dtype == torch.float32 and y.dtype == torch.long
    assert torch.equal(x[5], torch.tensor([0.0] * 9 + [1.0, 0.0, 1.0]))  # row i = binary of i, MSB first
    assert y.tolist() == _brute_labels()
    # The var_u.mat statistics (reference note §1): 2118 positives; per popcount
    n = x.sum(1).long()
    assert int(y.sum()) == 2118
    positives = {k: int(y[n == k].sum()) for k in range(13)}
    assert all(positives[k] == 0 for k in range(5)) and all(positives[k] == math.comb(12, k) for k in range(8, 13))
    assert (positives[5], positives[6], positives[7]) == (60, 532, 732)
    assert float((f - THETA).abs().min()) >= 1.0 - 1e-9  # no pattern on the boundary


def test_labels_are_invariant_under_a_rotation_of_the_icosahedron():
    """A rotation mapping the vertex set onto itself (cyclic shift of coordinates) permutes bits, keeps labels."""
    v = icosahedron_vertices()
    rotated = v[:, [1, 2, 0]]
    perm = [int(((v - r).norm(dim=1) < 1e-9).nonzero()) for r in rotated]  # vertex k -> vertex perm[k]
    assert sorted(perm) == list(range(12)) and perm != list(range(12))
    x, y, _ = icosahedron_dataset()
    moved = torch.zeros_like(x)
    moved[:, perm] = x
    index = (moved.long() * (2 ** torch.arange(11, -1, -1))).sum(1)
    assert torch.equal(y[index], y)


@pytest.mark.parametrize("shuffle_split", [False, True])
def test_split_sizes_and_order(shuffle_split):
    dm = InformationPlaneDataModule(shuffle_split=shuffle_split, seed=3)
    assert len(dm.train_set) == 3277 and len(dm.val_set) == 819
    assert sorted(torch.cat([dm.train_index, dm.val_index]).tolist()) == list(range(4096))
    if not shuffle_split:
        assert dm.train_index.tolist() == list(range(3277))  # IDNNs: the first 80 % in counting order
    else:
        assert dm.train_index.tolist() != list(range(3277))
        assert torch.equal(dm.train_index, InformationPlaneDataModule(shuffle_split=True, seed=3).train_index)
    x, y = dm.information_probe()
    assert x.shape == (4096, 12) and y.shape == (4096,)
    full = InformationPlaneDataModule(batch_size=None)
    assert len(full.train_dataloader()) == 1 and len(dm.train_dataloader()) == math.ceil(3277 / 256)


def test_train_loader_does_not_touch_the_global_rng():
    dm = InformationPlaneDataModule()
    state = torch.get_rng_state()
    first = [b[1] for b in dm.train_dataloader()]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b[1]) for a, b in zip(first, InformationPlaneDataModule().train_dataloader()))


@pytest.mark.parametrize("kw", [{"train_fraction": 1.0}, {"train_fraction": 0.0}, {"batch_size": 0},
                                {"shuffle_split": 1}])
def test_datamodule_refuses_bad_arguments(kw):
    with pytest.raises(EntrotrainError):
        InformationPlaneDataModule(**kw)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_network_shapes_init_and_softmax_output(activation):
    torch.manual_seed(0)
    net = IBMLP(activation=activation)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == list(zip(IB_WIDTHS[:-1], IB_WIDTHS[1:]))
    for m in linears:
        std = 1 / math.sqrt(m.in_features)
        assert float(m.weight.detach().abs().max()) <= 2 * std + 1e-7 and float(m.bias.detach().abs().max()) == 0.0
    big = IBMLP(widths=(12, 400, 2), activation=activation)
    assert float(big.layers[0][0].weight.std()) == pytest.approx(0.88 / math.sqrt(12), rel=0.05)  # truncated at 2σ
    fan_out = IBMLP(widths=(12, 400, 2), init="fan_out", gain=2.0)
    assert float(fan_out.layers[0][0].weight.abs().max()) <= 2 * 2 / math.sqrt(400) + 1e-7
    p = net(torch.rand(5, 12))
    assert p.shape == (5, 2) and torch.allclose(p.sum(1), torch.ones(5))
    acts = {"tanh": torch.nn.Tanh, "relu": torch.nn.ReLU}[activation]
    assert all(isinstance(block[1], acts) for block in net.layers) and len(net.layers) == 5


@pytest.mark.parametrize("kw", [{"activation": "gelu"}, {"init": "xavier"}, {"gain": 0.0}, {"widths": (12, 2)}])
def test_network_refuses_bad_arguments(kw):
    with pytest.raises(EntrotrainError):
        IBMLP(**kw)


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is several times faster than two on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_task_loss_is_the_clipped_softmax_cross_entropy_and_training_learns(one_thread):
    L.seed_everything(0)
    task = InformationPlaneTask(lr=1e-2)
    x, y, _ = icosahedron_dataset()
    with torch.no_grad():
        loss, _ = task._step((x[:64], y[:64]))
        p = task(x[:64]).double()
        expected = -p[torch.arange(64), y[:64]].log().mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    trainer = L.Trainer(accelerator="cpu", max_epochs=15, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=15)
    trainer.fit(task, InformationPlaneDataModule())  # 15 epochs x 13 batches of 256
    assert float(trainer.callback_metrics["val/acc"]) > 0.75  # chance is ~0.5
    with pytest.raises(EntrotrainError):
        InformationPlaneTask(lr=0.0)
