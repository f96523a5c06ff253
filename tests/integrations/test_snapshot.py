"""``entropy_snapshot``: the monitors of training on given batches, without training.

The attention statistics are checked against an independent float64 brute force (q, k read off each layer's qkv
projection, softmax over the causal keys, ``-Σ p ln p``), over the union of the batches; the model must come out as it
went in (mode, weights, gradients, hooks); bad input gets an ``EntrotrainError``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from entrotrain.callbacks import AttentionEntropyMonitor, RepresentationEntropyMonitor
from entrotrain.errors import EntrotrainError, TapError
from entrotrain.functional.representation import rankme
from entrotrain.integrations.snapshot import LOSS_KEY, call_model, entropy_snapshot
from entrotrain.models import TinyGPT
from tests.helpers.brute import causal_head_means
from tests.helpers.loop_runs import leftovers, same_weights

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, SEQ = 32, 12


def _model(dropout: float = 0.2) -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=32, dropout=dropout)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (3, SEQ), generator=g), torch.randint(0, VOCAB, (2, SEQ), generator=g)]


def _brute(model: TinyGPT, tokens: torch.Tensor) -> dict[str, float]:
    """Per-head float64 means of the eval-mode model's causal attention on ``tokens`` (rows concatenated)."""
    qk: list[torch.Tensor] = []
    handles = [b.attn.qkv.register_forward_hook(lambda m, a, out: qk.append(out.detach())) for b in model.blocks]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    out: dict[str, float] = {}
    for layer, proj in enumerate(qk):
        b, t, c3 = proj.shape
        heads = model.blocks[layer].attn.n_head
        q, k, _ = (x.reshape(b, t, heads, c3 // 3 // heads).transpose(1, 2) for x in proj.split(c3 // 3, dim=2))
        ent, norm = causal_head_means(q, k)
        for h in range(heads):
            out[f"entropy/attn/L{layer}/H{h}"] = float(ent[h])
            out[f"entropy/attn_norm/L{layer}/H{h}"] = float(norm[h])
    return out


def test_attention_equals_a_float64_brute_force_over_the_union_of_the_batches():
    model = _model()
    model.train()  # dropout 0.2: the snapshot must run in eval mode to match
    shot = entropy_snapshot(model, _batches())
    reference = _brute(model, torch.cat(_batches()))
    for key, value in reference.items():
        assert shot.metrics[key] == pytest.approx(value, abs=2e-6), key
    norms = [v for k, v in reference.items() if k.startswith("entropy/attn_norm/L")]
    assert shot.metrics["entropy/attn_norm/min"] == pytest.approx(min(norms), abs=2e-6)
    assert shot.metrics["entropy/attn/nonfinite"] == 0
    assert shot.sites == {"L0": "blocks.0.attn", "L1": "blocks.1.attn"}
    assert shot.batches == 2
    assert [a.key for a in shot.arrays] == ["entropy/attn_norm/heatmap"]
    heatmap = shot.arrays[0].array
    assert heatmap.shape == (2, 4)
    assert float(heatmap[1, 2]) == pytest.approx(reference["entropy/attn_norm/L1/H2"], abs=2e-6)
    assert {t.label for t in shot.thresholds} == {"collapse", "overload"}


@pytest.mark.parametrize("training", [True, False])
def test_the_model_comes_out_as_it_went_in(training):
    model = _model()
    model.train(training)
    before = _model()
    requires = [p.requires_grad for p in model.parameters()]
    entropy_snapshot(model, _batches(), [AttentionEntropyMonitor(), RepresentationEntropyMonitor(include=["blocks.*"])])
    assert model.training is training
    assert same_weights(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == requires
    assert leftovers(model) == []
    model.eval()
    before.eval()
    x = _batches()[0]
    assert torch.equal(model(x), before(x))


def test_an_exception_in_forward_propagates_and_leaves_no_hook():
    model = _model()

    def forward(m, batch):
        m(batch)
        raise RuntimeError("user code failed")

    with pytest.raises(RuntimeError, match="user code failed"):
        entropy_snapshot(model, _batches(), forward=forward)
    assert leftovers(model) == [] and model.training


def test_loss_is_the_mean_of_the_scalars_forward_returns():
    model = _model(0.0)
    batches = _batches()

    def loss(m, x):
        return F.cross_entropy(m(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())

    shot = entropy_snapshot(model, batches, forward=loss)
    with torch.no_grad():
        expected = [float(loss(model.eval(), x)) for x in batches]
    assert shot.metrics[LOSS_KEY] == pytest.approx(sum(expected) / 2, rel=1e-6)
    # an HF-style output's .loss is read; logits (not a scalar) give no loss key
    hf = entropy_snapshot(model, batches, forward=lambda m, x: SimpleNamespace(loss=loss(m, x)))
    assert hf.metrics[LOSS_KEY] == pytest.approx(shot.metrics[LOSS_KEY], rel=1e-7)
    assert LOSS_KEY not in entropy_snapshot(model, batches).metrics


def test_default_forward_unpacks_mappings_and_sequences():
    seen = []

    class Recorder(nn.Module):
        def forward(self, *args, **kwargs):
            seen.append((len(args), sorted(kwargs)))

    model = Recorder()
    call_model(model, {"input_ids": 1, "attention_mask": 2})
    call_model(model, (1, 2))
    call_model(model, torch.zeros(2))
    assert seen == [(0, ["attention_mask", "input_ids"]), (2, []), (1, [])]


def test_a_single_tensor_is_one_batch_and_monitors_can_be_reused():
    model = _model()
    monitor = AttentionEntropyMonitor()
    x = torch.cat(_batches())
    first = entropy_snapshot(model, x, [monitor])
    again = entropy_snapshot(model, [x], [monitor])  # fresh state on each call: not a running mean
    assert first.batches == 1 and first.metrics == again.metrics


def test_rows_with_nonfinite_data_are_counted_and_left_out():
    model = _model(0.0)
    with torch.no_grad():
        model.tok_emb.weight[0] = math.nan
    clean = torch.randint(1, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(2))
    dirty = clean[:1].clone()
    dirty[0, 0] = 0  # the first key of every query of this row is NaN: the whole row is non-finite in every layer
    shot = entropy_snapshot(model, [clean, dirty])
    assert shot.metrics["entropy/attn/nonfinite"] == 2 * 4 * SEQ  # every query row of every head, in both layers
    for key, value in _brute(model, clean).items():
        assert shot.metrics[key] == pytest.approx(value, abs=2e-6), key
    everything_bad = entropy_snapshot(model, [dirty])
    assert "entropy/attn_norm/min" not in everything_bad.metrics  # nothing to compute it from: absent, never made up
    assert everything_bad.metrics["entropy/attn/nonfinite"] == 2 * 4 * SEQ


def test_representation_measures_are_those_of_the_captured_activations():
    model = _model()
    outputs: list[torch.Tensor] = []
    handle = model.blocks[1].register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    monitor = RepresentationEntropyMonitor(include=["blocks.1"], max_tokens=None)
    shot = entropy_snapshot(model, _batches(), [AttentionEntropyMonitor(), monitor])
    handle.remove()
    activations = torch.cat([o.flatten(0, 1) for o in outputs]).double()
    assert shot.metrics["entropy/repr/blocks.1/n"] == activations.shape[0]
    assert shot.metrics["entropy/repr/blocks.1/rankme"] == pytest.approx(float(rankme(activations)), rel=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: entropy_snapshot(m, []), "gave no batch"),
        (lambda m: entropy_snapshot(m, {"input_ids": torch.zeros(1, 2)}), r"\[batch\]"),
        (lambda m: entropy_snapshot(m, 3), "iterable of batches"),
        (lambda m: entropy_snapshot(nn.Linear(2, 2).state_dict(), [torch.zeros(1, 2)]), "nn.Module"),
        (lambda m: entropy_snapshot(m, [torch.zeros(1, 2)], forward="model"), "callable"),
    ],
)
def test_bad_input_gets_an_error_naming_the_fix(call, match):
    model = _model()
    with pytest.raises(EntrotrainError, match=match):
        call(model)
    assert leftovers(model) == []


def test_a_model_without_attention_gets_the_taps_error():
    model = nn.Linear(2, 2)
    with pytest.raises(TapError, match="record_attention"):
        entropy_snapshot(model, [torch.zeros(1, 2)])
    assert leftovers(model) == [] and model.training
