"""DeepSeek-V3's sequence-wise balance loss (SequenceBalanceLoss, functional sequence_balance_loss) against a float64
brute force written from the paper's eqs. 17-20, on the model's own choice (the ids its router returned) and scores,
per sequence with padding left out; gradient through P only; composition; refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from entrotrain.errors import EntrotrainError
from entrotrain.functional.router_losses import sequence_balance_loss
from entrotrain.regularizers.router_loss import ChosenRouterInputs, RouterZLoss, SequenceBalanceLoss

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")


def brute_force(logits, ids, mask, scoring="sigmoid"):
    """Eqs. 17-20 token by token in float64: per layer, the mean over sequences of sum_i f_i P_i; summed over layers.
    ``logits`` / ``ids``: per layer ``(B*S, E)`` / ``(B*S, K)``; ``mask`` ``(B, S)``."""
    batch, seq = mask.shape
    total = 0.0
    for z, chosen in zip(logits, ids):
        n_exp, k = z.shape[1], chosen.shape[1]
        z = z.detach().double().reshape(batch, seq, n_exp)
        chosen = chosen.reshape(batch, seq, k)
        losses = []
        for b in range(batch):
            real = [t for t in range(seq) if mask[b, t]]
            if not real:
                continue
            f = [0.0] * n_exp
            big_p = [0.0] * n_exp
            for t in real:
                s = torch.sigmoid(z[b, t]) if scoring == "sigmoid" else torch.exp(z[b, t])
                s = s / s.sum()
                for i in range(n_exp):
                    f[i] += n_exp / (k * len(real)) * float(i in chosen[b, t].tolist())
                    big_p[i] += float(s[i]) / len(real)
            losses.append(sum(fi * pi for fi, pi in zip(f, big_p)))
        total += sum(losses) / max(len(losses), 1)
    return total


def _deepseek():
    pytest.importorskip("transformers")
    from tests.helpers.router_models import lm_batch, tiny_moe

    return tiny_moe("deepseek_v3", n_experts=8, top_k=2), lm_batch(batch=3, seq=7, pad_last=(0, 2, 4))


def _router_outputs(model):
    """Forward hooks keeping what each DeepSeek-V3 router returned: (logits, ids)."""
    seen = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, o: seen.append((o[0].detach(), o[2])))
             for layer in model.model.layers]
    return seen, hooks


def test_captured_loss_equals_the_papers_equations_on_the_routers_own_choice_without_padding():
    model, batch = _deepseek()
    seen, hooks = _router_outputs(model)
    reg = SequenceBalanceLoss(0.5)
    with reg.capture(model):
        model(**batch)
    out = reg()
    for h in hooks:
        h.remove()
    logits, ids = [z for z, _ in seen], [i for _, i in seen]
    mask = batch["attention_mask"].bool()
    expected = brute_force(logits, ids, mask)
    assert float(out.total) == pytest.approx(0.5 * expected, rel=1e-6)
    assert set(out.parts) == {"sequence_balance"}
    # the bias-moved, group-limited choice is not the top k of the scores, and padding changes the value: the
    # comparison above tells the model's own choice and the masking apart
    recomputed = [torch.topk(z.sigmoid(), 2, dim=-1).indices for z in logits]
    assert any(set(a.tolist()) != set(b.tolist()) for i, r in zip(ids, recomputed) for a, b in zip(i, r))
    assert abs(brute_force(logits, recomputed, mask) - expected) > 1e-4
    assert abs(brute_force(logits, ids, torch.ones_like(mask)) - expected) > 1e-4
    # the given-inputs form (a mapping) gives the same value
    given_out = SequenceBalanceLoss(0.5)({"router_logits": logits, "chosen": ids, "attention_mask": mask})
    assert float(given_out.total) == pytest.approx(float(out.total), rel=1e-6)
    out.total.backward()
    grads = [layer.mlp.gate.weight.grad for layer in model.model.layers]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_gradient_flows_through_p_only():
    """d L / d z equals the gradient of sum_i f_i P_i with f a constant (the counts)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(12, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 5, (12, 2), generator=g)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    sequence_balance_loss(z, ids, mask=mask).backward()
    ref = torch.zeros((), dtype=torch.float64)
    zr = z.detach().clone().requires_grad_()
    for b in range(3):
        rows = [b * 4 + t for t in range(4) if mask[b, t]]
        s = torch.sigmoid(zr[rows])
        p = (s / s.sum(-1, keepdim=True)).mean(0)
        f = torch.zeros(5, dtype=torch.float64)
        for r in rows:
            for i in set(ids[r].tolist()):
                f[i] += 5 / (2 * len(rows))
        ref = ref + (f * p).sum() / 3
    ref.backward()
    assert torch.allclose(z.grad, zr.grad, rtol=1e-12, atol=1e-15)
    assert torch.equal(z.grad[~mask.reshape(-1)], torch.zeros_like(z.grad[~mask.reshape(-1)]))


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    n_exp=st.integers(2, 6),
    scoring=st.sampled_from(["sigmoid", "softmax"]),
    layers=st.integers(1, 2),
)
def test_functional_equals_brute_force(seed, batch, seq, n_exp, scoring, layers):
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, n_exp + 1, (1,), generator=g))
    logits = [torch.randn(batch * seq, n_exp, generator=g) * 3 for _ in range(layers)]
    ids = [torch.randint(0, n_exp, (batch * seq, k), generator=g) for _ in range(layers)]
    mask = torch.rand(batch, seq, generator=g) < 0.7
    got = float(sequence_balance_loss(logits, ids, mask=mask, scoring=scoring))
    assert got == pytest.approx(brute_force(logits, ids, mask, scoring), rel=1e-5, abs=1e-6)
    flat = float(sequence_balance_loss(logits, ids, mask=mask.reshape(-1), seq_len=seq, scoring=scoring))
    assert flat == got


def test_balanced_routing_gives_one_per_layer_and_no_token_gives_zero():
    ids = torch.arange(8).reshape(4, 2)  # 4 tokens x 2 of 8 experts: each expert once
    z = torch.zeros(4, 8, requires_grad=True)
    assert float(sequence_balance_loss([z, z], [ids, ids], seq_len=4)) == pytest.approx(2.0)
    none = sequence_balance_loss(z, ids, mask=torch.zeros(1, 4, dtype=torch.bool))
    none.backward()
    assert float(none) == 0.0 and torch.equal(z.grad, torch.zeros_like(z))


def test_composes_with_the_z_loss_under_one_capture():
    model, batch = _deepseek()
    reg = SequenceBalanceLoss(0.1) + RouterZLoss(0.01)
    with reg.capture(model) as taps:
        model(**batch)
    assert len(taps) == 2
    out = reg()
    assert set(out.parts) == {"sequence_balance", "router_z"}
    alone = []
    for term in (SequenceBalanceLoss(0.1), RouterZLoss(0.01)):
        with term.capture(model):
            model(**batch)
        alone.append(term().total)
    assert float(out.total) == pytest.approx(float(alone[0] + alone[1]), rel=1e-6)
    assert float(out.parts["router_z"]) != 0.0


def test_refuses_routers_without_ids_and_rows_without_sequences():
    model, batch = _deepseek()
    reg = SequenceBalanceLoss(1.0)
    with reg.capture(model):
        model(input_ids=batch["input_ids"])  # no attention_mask: the rows' sequences are unknown
    with pytest.raises(EntrotrainError, match="cannot be split into sequences"):
        reg()
    seen, hooks = _router_outputs(model)
    with_len = SequenceBalanceLoss(1.0, seq_len=7)
    with with_len.capture(model):
        model(input_ids=batch["input_ids"])
    value = float(with_len().total)
    for h in hooks:
        h.remove()
    ones = torch.ones(3, 7, dtype=torch.bool)
    assert value == pytest.approx(brute_force([z for z, _ in seen], [i for _, i in seen], ones), rel=1e-6)

    from tests.regularizers.test_router_loss import _model_and_tokens

    toy, x = _model_and_tokens()  # its router is an nn.Linear: logits only, no ids
    reg = SequenceBalanceLoss(1.0, include=["moe.router"], seq_len=8)
    with reg.capture(toy):
        toy(x)
    with pytest.raises(EntrotrainError, match="returned no expert ids"):
        reg()
    with pytest.raises(EntrotrainError, match="picked"):
        SequenceBalanceLoss(1.0)(torch.randn(4, 3))
    with pytest.raises(EntrotrainError, match="seq_len"):
        sequence_balance_loss(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(EntrotrainError, match="scoring"):
        SequenceBalanceLoss(scoring="relu")
    with pytest.raises(EntrotrainError, match="contradicts"):
        SequenceBalanceLoss(1.0, seq_len=2)({"router_logits": torch.randn(4, 3), "chosen": torch.zeros(4, 1).long(),
                                             "attention_mask": torch.ones(1, 4, dtype=torch.bool)})
    with pytest.raises(EntrotrainError, match="do not split into sequences"):
        sequence_balance_loss(torch.randn(6, 3), torch.zeros(6, 1, dtype=torch.long), seq_len=4)
    z, ids = torch.randn(4, 3), torch.tensor([[0], [1], [2], [0]])
    given_inputs = ChosenRouterInputs([z], [ids], [None], [2], ["softmax"], ["r"])
    assert float(SequenceBalanceLoss(1.0)(given_inputs).total) == pytest.approx(
        float(sequence_balance_loss(z, ids, seq_len=2, scoring="softmax")))


def test_weight_zero_is_an_exact_zero_without_a_tap():
    model, batch = _deepseek()
    reg = SequenceBalanceLoss(0.0)
    with reg.capture(model) as tap:
        model(**batch)
    assert tap is None and float(reg().total) == 0.0
    assert float(SequenceBalanceLoss(0.0)(torch.randn(4, 3)).total) == 0.0


def test_a_mask_that_does_not_fit_a_router_call_names_the_router_and_the_mask():
    """The per-call check says which router call and which mask did not fit (it named neither)."""
    z, ids = torch.randn(6, 3), torch.zeros(6, 1, dtype=torch.long)
    with pytest.raises(EntrotrainError, match=r"mask of router '0' has 8 elements \(shape \(2, 4\)\) but that call "
                       r"has 6 rows"):
        SequenceBalanceLoss(1.0)({"router_logits": z, "chosen": ids, "attention_mask": torch.ones(2, 4).bool()})
