"""σReparam on transformers' Conv1D (GPT-2 family, weight stored (in, out)): conversion keeps the logits, σ is the
exact spectral norm, gradients follow the written formula, training runs and the monitor publishes σ / γ / qk norms."""

from __future__ import annotations

import copy
import subprocess
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor
from entrotrain.errors import EntrotrainError
from entrotrain.regularizers.sigma_reparam import (
    SigmaReparamConv1D,
    SigmaReparamLinear,
    SigmaReparamQKJoint,
    is_hf_conv1d,
    sigma_reparam,
    sigma_reparam_names,
)
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.spy_logger import SpyLogger

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB, SEQ, HEADS, EMBD = 64, 16, 2, 32
BLOCK_LAYERS = [f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]


def gpt2(attn: str = "eager", seed: int = 0) -> nn.Module:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=EMBD, n_layer=2, n_head=HEADS, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)
    with torch.no_grad():  # away from the 0.02 init: σ(W), γ and the logits far from anything trivial
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, 0.2)
    return model


def conv1d(nx: int, nf: int, seed: int, dtype: torch.dtype = torch.float64) -> Conv1D:
    torch.manual_seed(seed)
    layer = Conv1D(nf, nx).to(dtype)
    with torch.no_grad():
        layer.weight.normal_()
        layer.bias.normal_()
    return layer


def test_is_hf_conv1d():
    assert is_hf_conv1d(Conv1D(4, 3)) and not is_hf_conv1d(nn.Linear(3, 4)) and not is_hf_conv1d(None)


def test_sigma_reparam_module_does_not_import_transformers():
    code = "import sys, entrotrain.regularizers.sigma_reparam; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("training", [True, False])
def test_gpt2_conversion_keeps_the_logits(attn, training):
    model = gpt2(attn).train(training)
    idx = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(idx).logits
    sigma_reparam(model, exclude="lm_head")
    assert sigma_reparam_names(model) == BLOCK_LAYERS
    assert all(isinstance(model.get_submodule(n), SigmaReparamConv1D) for n in BLOCK_LAYERS)
    assert model.lm_head.weight is model.transformer.wte.weight  # tying untouched
    state = model.state_dict()
    assert all(state[k].shape == s for k, s in shapes.items())  # Conv1D's (in, out) layout kept
    with torch.no_grad():
        after = model(idx).logits
    assert before.abs().max() > 1.0  # not a trivially small output
    assert (after - before).abs().max() <= 1e-5


@pytest.mark.parametrize("init_iterations", [None, 300])
def test_conv1d_sigma_is_the_spectral_norm(init_iterations):
    conv = conv1d(24, 40, seed=2)
    layer = SigmaReparamConv1D.from_conv1d(conv, init_iterations=init_iterations)
    exact = torch.linalg.matrix_norm(conv.weight.detach(), 2)
    assert layer.weight.shape == (24, 40) and (layer.nx, layer.nf) == (24, 40)
    assert float(layer.gamma.detach()) == pytest.approx(float(exact), rel=1e-9)
    x = torch.randn(5, 24, dtype=torch.float64)
    for mode in (True, False):
        torch.testing.assert_close(layer.train(mode)(x), conv(x), rtol=1e-12, atol=1e-12)


def test_conv1d_power_iteration_converges_to_the_float64_spectral_norm():
    torch.manual_seed(3)
    left = torch.linalg.qr(torch.randn(24, 24))[0]
    right = torch.linalg.qr(torch.randn(40, 24))[0]
    conv = Conv1D(40, 24)
    with torch.no_grad():  # W (in=24, out=40) with singular values 3 · 0.8^i
        conv.weight.copy_(left @ torch.diag(3 * 0.8 ** torch.arange(24.0)) @ right.T)
    layer = SigmaReparamConv1D.from_conv1d(conv)
    with torch.no_grad():
        layer.u.copy_(F.normalize(torch.randn(24), dim=0))  # forget the SVD init
    for _ in range(60):
        layer(torch.randn(2, 24))
    exact = torch.linalg.matrix_norm(layer.weight.detach().double(), 2)
    assert float(layer.sigma) == pytest.approx(float(exact), rel=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_conv1d_equals_a_linear_on_the_transpose_and_the_written_formula(training):
    conv = conv1d(12, 20, seed=4)
    layer = SigmaReparamConv1D.from_conv1d(conv).train(training)
    with torch.no_grad():
        layer.gamma.fill_(1.7)
        layer.u.copy_(F.normalize(torch.randn(12, dtype=torch.float64), dim=0))
    twin = SigmaReparamLinear(12, 20, dtype=torch.float64).train(training)
    twin.load_state_dict({**layer.state_dict(), "weight": layer.weight.detach().T.clone()})
    u0 = layer.u.clone()
    x, g = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 20, dtype=torch.float64)
    (layer(x) * g).sum().backward()
    (twin(x) * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.u, twin.u, rtol=1e-13, atol=1e-15)
    # by hand: y = x (γ W / σ) + b with σ = vᵀ Wᵀ u, u and v constants
    w = layer.weight.detach().clone().requires_grad_(True)
    gamma = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        v = F.normalize(w.T @ u0, dim=0)
        u = F.normalize(w @ v, dim=0) if training else u0
    y = x @ (gamma * w / (v @ w.T @ u)) + layer.bias.detach()
    (y * g).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.gamma.grad.reshape(()), gamma.grad, rtol=1e-10, atol=1e-12)


def test_qk_joint_on_c_attn():
    model = gpt2().double()
    idx = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    c_attn = model.transformer.h[0].attn.c_attn.weight.detach().clone()
    before = model(idx).logits
    sigma_reparam(model, include="transformer.h.**", qk_joint="**.attn.c_attn")
    joint = model.transformer.h[0].attn.c_attn
    assert isinstance(joint, SigmaReparamQKJoint) and isinstance(joint.qk, SigmaReparamConv1D)
    torch.testing.assert_close(model(idx).logits, before, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(joint.effective_weight(), c_attn, rtol=1e-10, atol=1e-10)  # (C, 3C) layout kept
    assert float(joint.qk.gamma.detach()) == pytest.approx(float(torch.linalg.matrix_norm(c_attn[:, : 2 * EMBD], 2)), rel=1e-10)


def test_errors_name_conv1d():
    with pytest.raises(EntrotrainError, match=r"Conv1D.*transformer.h.0.attn.c_attn"):
        sigma_reparam(gpt2(), include="nothing*")
    with pytest.raises(EntrotrainError, match="weight tying"):
        sigma_reparam(gpt2())  # lm_head is tied to wte
    with pytest.raises(EntrotrainError, match="Conv1D"):
        SigmaReparamLinear.from_linear(Conv1D(4, 3))  # type: ignore[arg-type]
    with pytest.raises(EntrotrainError, match="Conv1D"):
        SigmaReparamConv1D.from_conv1d(nn.Linear(3, 4))
    with pytest.raises(EntrotrainError, match="nn.Linear"):
        SigmaReparamConv1D.from_linear(nn.Linear(3, 4))
    with pytest.raises(EntrotrainError, match="3·C"):
        SigmaReparamQKJoint.from_linear(Conv1D(10, 4))


def test_original_gpt2_state_dict_loads_into_the_converted_model():
    model = gpt2()
    original = copy.deepcopy(model.state_dict())
    sigma_reparam(model, exclude="lm_head")
    result = model.load_state_dict(original, strict=True)  # plain weights load as the converter converts them
    assert not result.unexpected_keys and not result.missing_keys


# ------------------------------------------------------------------------------------------ training + monitor
class GPT2Module(L.LightningModule):
    def __init__(self, convert: bool = True) -> None:
        super().__init__()
        self.model = gpt2("eager")
        if convert:
            sigma_reparam(self.model, exclude="lm_head")

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        return self.model(idx, labels=idx).loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _fit(module, callbacks, steps=3):
    data = torch.randint(0, VOCAB, (4 * steps, SEQ), generator=torch.Generator().manual_seed(0))
    losses: list[torch.Tensor] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].detach().clone())

    spy = SpyLogger()
    quiet_trainer(max_steps=steps, logger=spy, callbacks=[Record(), *callbacks]).fit(
        module, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4)
    )
    return losses, spy


def test_gpt2_trains_and_the_monitor_publishes_sigma_gamma_and_qk_norms():
    runs = []
    for with_monitor in (False, True):
        L.seed_everything(0)
        module = GPT2Module()
        monitor = SigmaReparamMonitor(every_n_steps=1)
        losses, spy = _fit(module, [monitor] if with_monitor else [])
        runs.append((module, losses))
    (m0, l0), (m1, l1) = runs
    assert len(l1) == 3 and all(torch.isfinite(x) for x in l1)
    assert all(torch.equal(a, b) for a, b in zip(l0, l1))  # the monitor never changes training
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0)
    logged = monitor.last_logged
    assert [step for step, m in spy.rows if "sigma_reparam/qk_norm/max" in m] == [0, 1, 2]
    for name in BLOCK_LAYERS:
        layer = m1.get_submodule(f"model.{name}")
        assert logged[f"sigma_reparam/model.{name}/sigma"] == pytest.approx(float(layer.sigma), rel=1e-6)
        assert logged[f"sigma_reparam/model.{name}/gamma"] == pytest.approx(float(layer.gamma.detach()), rel=1e-6)
        init = s0[f"model.{name}.weight"]
        assert not torch.equal(init, gpt2("eager").state_dict()[f"{name}.weight"])  # the weights moved
    for i in range(2):  # per-head ‖W_Q^hᵀ W_K^h‖₂ from the effective c_attn (columns [q, k, v]), float64 brute force
        w = m1.model.transformer.h[i].attn.c_attn.effective_weight().detach().double()  # (C, 3C)
        d = EMBD // HEADS
        for h in range(HEADS):
            q, k = w[:, h * d : (h + 1) * d], w[:, EMBD + h * d : EMBD + (h + 1) * d]
            ref = torch.linalg.matrix_norm(q @ k.T, 2)
            assert logged[f"sigma_reparam/model.transformer.h.{i}.attn/qk_norm/H{h}"] == pytest.approx(float(ref), rel=1e-4)


def test_monitor_reads_plain_gpt2_conv1d_qk_norms():
    L.seed_everything(0)
    module = GPT2Module(convert=False)
    monitor = SigmaReparamMonitor(every_n_steps=1)
    _fit(module, [monitor], steps=1)
    w = module.model.transformer.h[1].attn.c_attn.weight.detach().double()
    d = EMBD // HEADS
    ref = torch.linalg.matrix_norm(w[:, d : 2 * d] @ w[:, EMBD + d : EMBD + 2 * d].T, 2)
    assert monitor.last_logged["sigma_reparam/model.transformer.h.1.attn/qk_norm/H1"] == pytest.approx(float(ref), rel=1e-4)
    assert not any(k.endswith("/sigma") for k in monitor.last_logged)


@pytest.mark.parametrize("qk_joint", [(), "**.attn.c_attn"])
def test_monitor_qk_norms_survive_conversion(qk_joint):
    """At conversion Ŵ = W, so the per-head norms of the converted GPT-2 (per layer or joint q-k) equal the plain one's."""
    plain = gpt2()
    converted = sigma_reparam(copy.deepcopy(plain), include="transformer.h.**", qk_joint=qk_joint)
    monitor = SigmaReparamMonitor()
    before, after = monitor.collect(plain), monitor.collect(converted)
    keys = [k for k in before if "/qk_norm/" in k]
    assert len(keys) == 2 * HEADS + 1 and set(keys) <= set(after)
    for key in keys:
        assert after[key] == pytest.approx(before[key], rel=1e-5), key
    sigmas = [k for k in after if k.endswith("/sigma")]
    assert len(sigmas) == (10 if qk_joint else 8)  # c_attn split into .qk and .v
