"""Router regularisers: each equals its functional formula times the (scheduled) weight, parts sum to the total,
every call form (logits, (logits, mask), RouterInputs, mapping, HF-style output) gives the same answer, ``+``
composition, and bad arguments raise EntrotrainError."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional.router_losses import dynmole_router_terms, load_balancing_loss, router_z_loss
from entrotrain.regularizers.composition import RegularizerSum
from entrotrain.regularizers.router_loss import LoadBalancingLoss, RouterInputs, RouterZLoss, TsallisRouterLoss


def _logits(seed=0, layers=2, rows=12, n_exp=4):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(rows, n_exp, generator=g, dtype=torch.float64).requires_grad_() for _ in range(layers))


pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

MASK = torch.tensor([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 1, 0]])  # (B, S) for 12 rows per layer


def test_load_balancing_and_z_loss_are_weighted_formulas():
    z = _logits()
    lb = LoadBalancingLoss(0.02, top_k=2)(z, MASK)
    assert float(lb.total) == pytest.approx(0.02 * float(load_balancing_loss(z, 2, mask=MASK)), rel=1e-12)
    assert set(lb.parts) == {"load_balancing"} and not lb.parts["load_balancing"].requires_grad
    zl = RouterZLoss()(z)
    assert float(zl.total) == pytest.approx(0.001 * float(router_z_loss(z)), rel=1e-12)
    norm = LoadBalancingLoss(1.0, top_k=2, normalize=True, per_layer=True)(z)
    assert float(norm.total) == pytest.approx(float(load_balancing_loss(z, 2, normalize=True, per_layer=True)))


def test_tsallis_router_loss_parts_and_gradient():
    z = _logits(1)
    reg = TsallisRouterLoss(weight=0.05, q=1.1, aux_weight=0.2, keep_top_k=1, top_p=0.0, entropy_threshold=1.0)
    out = reg(z)
    terms = dynmole_router_terms(z, q=1.1, top_p=0.0, keep_top_k=1, entropy_threshold=1.0)
    assert float(out.parts["tsallis_router/entropy"]) == pytest.approx(0.05 * float(terms.entropy), rel=1e-12)
    assert float(out.parts["tsallis_router/balance"]) == pytest.approx(0.2 * float(terms.balance), rel=1e-12)
    assert float(out.total) == pytest.approx(sum(float(v) for v in out.parts.values()), rel=1e-12)
    out.total.backward()
    assert all(torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0 for t in z)


def test_schedule_scales_the_entropy_weight_only():
    z = _logits(2)
    reg = TsallisRouterLoss(weight=0.1, aux_weight=0.3, schedule="warmup", total_steps=10)
    at0 = reg(z, step=0)
    assert float(at0.parts["tsallis_router/entropy"]) == 0.0 and float(at0.parts["tsallis_router/balance"]) > 0
    at5 = reg(z, step=5)
    terms = dynmole_router_terms(z)
    assert float(at5.parts["tsallis_router/entropy"]) == pytest.approx(0.05 * float(terms.entropy), rel=1e-12)
    lb = LoadBalancingLoss(0.4, top_k=1, schedule="cosine", total_steps=4, final_weight=0.0)
    assert float(lb(z, step=4).total) == 0.0


def test_call_forms_agree():
    z = _logits(3)
    reg = TsallisRouterLoss(aux_weight=0.1)
    ref = float(reg(z, MASK).total)
    assert float(reg(RouterInputs(z, MASK)).total) == ref
    assert float(reg({"router_logits": z, "attention_mask": MASK}).total) == ref
    assert float(reg({"router_logits": z, "mask": MASK}).total) == ref
    unmasked = float(reg(z).total)
    assert float(reg(list(z)).total) == unmasked
    assert float(reg(SimpleNamespace(router_logits=z)).total) == unmasked
    assert unmasked != ref
    single = float(reg(z[0]).total)
    assert single == float(reg((z[0],)).total)


def test_composition_sums_terms_and_keeps_every_part():
    z = _logits(4)
    total = TsallisRouterLoss(aux_weight=0.1) + LoadBalancingLoss(0.01, top_k=1) + 2 * RouterZLoss(0.001)
    assert isinstance(total, RegularizerSum)
    out = total(z, MASK, step=3)
    assert set(out.parts) == {"tsallis_router/entropy", "tsallis_router/balance", "load_balancing", "router_z"}
    assert float(out.total) == pytest.approx(sum(float(v) for v in out.parts.values()), rel=1e-12)
    expected = (
        float(TsallisRouterLoss(aux_weight=0.1)(z, MASK).total)
        + float(LoadBalancingLoss(0.01, top_k=1)(z, MASK).total)
        + 2 * float(RouterZLoss(0.001)(z, MASK).total)
    )
    assert float(out.total) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    "fn",
    [
        lambda: LoadBalancingLoss(top_k=0),
        lambda: LoadBalancingLoss(weight=-1.0),
        lambda: LoadBalancingLoss(normalize="yes"),
        lambda: TsallisRouterLoss(q=0.0),
        lambda: TsallisRouterLoss(aux_weight=float("inf")),
        lambda: TsallisRouterLoss(top_p=2.0),
        lambda: TsallisRouterLoss(keep_top_k=1.5),
        lambda: RouterZLoss(schedule="linear"),
        lambda: RouterZLoss()(),
        lambda: RouterZLoss()(_logits(), MASK, MASK),
        lambda: RouterZLoss()({"logits": _logits()}),
        lambda: RouterZLoss()(SimpleNamespace(router_logits=None)),
        lambda: LoadBalancingLoss(top_k=5)(_logits()),  # more than the 4 experts
        lambda: TsallisRouterLoss()(_logits(), torch.ones(5, dtype=torch.bool)),
    ],
)
def test_bad_arguments_raise(fn):
    with pytest.raises(EntrotrainError):
        fn()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe"])
def test_load_balancing_equals_the_hf_models_aux_loss(kind):
    """On tiny HF MoE LMs built from configs: our LoadBalancingLoss on the model output (and the batch's attention
    mask) equals the model's own ``aux_loss``; the DynMoLE loss and z-loss take the same output and give gradients."""
    pytest.importorskip("transformers")
    from tests.helpers.router_models import lm_batch, tiny_moe

    model = tiny_moe(kind)
    batch = lm_batch()
    out = model(**batch, output_router_logits=True)
    ours = LoadBalancingLoss(1.0, top_k=2)({"router_logits": out.router_logits, "attention_mask": batch["attention_mask"]})
    assert abs(float(ours.total.detach()) - float(out.aux_loss.detach())) <= 1e-6
    total = (TsallisRouterLoss(aux_weight=0.1) + RouterZLoss())(out.router_logits, batch["attention_mask"]).total
    total.backward()
    gate = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
    assert gate and all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in gate)


def test_tsallis_router_loss_refuses_the_orders_and_offsets_the_functional_refuses():
    # before: accepted at construction, then refused by routing.check_order / check_eps at the first training step
    with pytest.raises(EntrotrainError, match="q must be in"):
        TsallisRouterLoss(q=1e300)
    with pytest.raises(EntrotrainError, match="eps must be in"):
        TsallisRouterLoss(eps=2.0)
    reg = TsallisRouterLoss(q=1e30, eps=1.0)
    assert (reg.q, reg.eps) == (1e30, 1.0)


# ------------------------------------------------------------------------------------- capture and mixed sums


class _AttentionMoE(torch.nn.Module):
    """Embedding → causal SDPA attention → one top-2 MoE layer (router ``moe.router``) → ``proj`` → head; returns
    the head's logits and the router logits."""

    def __init__(self) -> None:
        from entrotrain.models.tiny_moe import MoELayer
        from tests.helpers.lightning_models import DIM, VOCAB, SDPAAttention

        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.attn = SDPAAttention(0.0)
        self.moe = MoELayer(DIM, 2 * DIM, 4, 2)
        self.proj = torch.nn.Linear(DIM, DIM)
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, idx):
        x = self.emb(idx)
        x = x + self.attn(x)
        h, router_logits = self.moe(x.reshape(-1, x.shape[-1]))
        return self.head(self.proj(h)), router_logits


def _model_and_tokens():
    from tests.helpers.lightning_models import VOCAB

    torch.manual_seed(0)
    return _AttentionMoE().double(), torch.randint(0, VOCAB, (4, 8))


def test_router_losses_compose_with_attention_and_representation_under_one_capture():
    """``AEM + RouterZLoss + Tsallis + MatrixEntropy`` captured once gives, bit for bit, the weighted sum of each
    term captured and run alone; the parts carry each term's name; the gradient reaches the router. (Router losses
    sat in the attention capture group: the sum read attention records as router logits.)"""
    from entrotrain.regularizers import AttentionEntropyMaximization
    from entrotrain.regularizers.representation import MatrixEntropyRegularizer

    model, x = _model_and_tokens()
    aem = AttentionEntropyMaximization(0.5)
    z = RouterZLoss(0.1, include=["moe.router"])
    tsallis = TsallisRouterLoss(0.2, include="moe.router")
    ment = MatrixEntropyRegularizer(1.0, order=2, include=["proj"])
    reg = aem + 2.0 * z + tsallis + ment
    with reg.capture(model) as taps:
        model(x)
    assert len(taps) == 4  # one attention tap, each other term its own
    out = reg()
    assert set(out.parts) == {"aem", "router_z", "tsallis_router/entropy", "tsallis_router/balance", "matrix_entropy"}
    alone = []
    for coeff, term in [(1.0, aem), (2.0, z), (1.0, tsallis), (1.0, ment)]:
        with term.capture(model):
            model(x)
        alone.append(coeff * term().total)
    assert torch.equal(out.total, alone[0] + alone[1] + alone[2] + alone[3])
    out.total.backward()
    assert model.moe.router.weight.grad is not None and model.moe.router.weight.grad.abs().sum() > 0


def test_mixed_sum_takes_inputs_by_capture_group():
    """Given inputs, a sum of attention and router terms takes them by group and equals its captured value."""
    from entrotrain.regularizers import AttentionEntropyMaximization
    from entrotrain.taps.attention_tap import AttentionTap

    model, x = _model_and_tokens()
    reg = AttentionEntropyMaximization(0.5) + RouterZLoss(0.1, include=["moe.router"])
    with reg.capture(model):
        model(x)
    captured = reg().total
    with AttentionTap(model, differentiable=True) as tap:
        _, router_logits = model(x)
    assert torch.equal(reg(attention=tap.records, router=router_logits).total, captured)
    assert torch.equal(RouterZLoss(0.1)(router=router_logits).total, RouterZLoss(0.1)(router_logits).total)
    with pytest.raises(EntrotrainError, match="'router' capture group"):
        reg(attention=tap.records)
    aem_only = reg.terms[0][1]
    off = aem_only + 0.0 * RouterZLoss(0.1)  # a term of coefficient 0 needs no input of its group
    assert torch.equal(off(attention=tap.records).total, aem_only(tap.records).total)
    with pytest.raises(EntrotrainError, match="one form"):
        reg(router_logits, router=router_logits)


def test_router_capture_weight_zero_and_errors():
    model, x = _model_and_tokens()
    with RouterZLoss(0.0, include=["moe.router"]).capture(model) as tap:
        model(x)
    assert tap is None  # weight 0: nothing armed
    reg = RouterZLoss(0.1, include=["moe.router"])
    with reg.capture(model):
        pass  # no forward
    with pytest.raises(EntrotrainError, match="no router call"):
        reg()
    with pytest.raises(TapError, match="no MoE router"):  # discovery finds no HF router in this model
        with RouterZLoss(0.1).capture(model):
            model(x)
