"""Taps on ``torch.compile``'d models: one extra compile for the armed (logging) state, the unarmed graph identical
to the one compiled without a tap, no graph break, clean names, values equal to the eager tap, outputs unchanged.

Compiles are counted with a backend that records every graph dynamo hands it (``tests.helpers.compile_count``):
each graph is one compile, recompiles included. One test runs the default inductor backend.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from entrotrain.models.tiny_gpt import TinyGPT
from entrotrain.taps.activation_tap import ActivationTap
from entrotrain.taps.attention_stats import ROWS
from entrotrain.taps.attention_tap import AttentionTap
from entrotrain.taps.exclusive import exclusive_capture
from entrotrain.taps.module_names import clean_module_name, is_compiled, named_modules
from tests.helpers.compile_count import CountingBackend, fresh_dynamo, graph_breaks
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)
from tests.helpers.tiny_hf_lms import tiny_llama_lm

VOCAB, SEQ, STEPS, EVERY = 23, 12, 4, 2
STYLES = ["torch.compile(model)", "model.compile()"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    with fresh_dynamo():
        yield


def tiny_gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=16)


def lm_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (3, SEQ + 1), generator=gen) for _ in range(STEPS)]


def compiled(model: nn.Module, style: str | None, backend: object) -> nn.Module:
    if style is None:
        return model
    if style == "torch.compile(model)":
        return torch.compile(model, backend=backend)
    model.compile(backend=backend)
    return model


def train(
    build: Callable[[], nn.Module],
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    data: list[torch.Tensor],
    style: str | None,
    make_tap: Callable[[nn.Module], object] | None,
    read: Callable[[object], dict[str, torch.Tensor]],
    backend: object = None,
) -> dict:
    """SGD steps; the tap (if any) is armed on steps 0, EVERY, 2·EVERY, ... as a monitor arms it."""
    backend = CountingBackend() if backend is None else backend
    model = build()
    runner = compiled(model, style, backend)
    tap = make_tap(runner) if make_tap is not None else None
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out: dict = {"losses": [], "stats": [], "compiles": [], "backend": backend}
    for step, batch in enumerate(data):
        log = tap is not None and step % EVERY == 0
        if log:
            tap.reset()
            tap.arm()
        loss = loss_fn(runner, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if log:
            tap.disarm()
            out["stats"].append({k: v.clone() for k, v in read(tap).items()})
        out["losses"].append(loss.detach().clone())
        out["compiles"].append(getattr(backend, "compiles", 0))
    return out


def three_runs(
    build: Callable[[], nn.Module],
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    data: list[torch.Tensor],
    style: str,
    make_tap: Callable[[nn.Module], object],
    read: Callable[[object], dict[str, torch.Tensor]],
) -> tuple[dict, dict, dict]:
    """:func:`train` compiled as ``style`` without the tap (base), then with it (tapped), then eager with it."""
    base = train(build, loss_fn, data, style, None, read)
    tapped = train(build, loss_fn, data, style, make_tap, read)
    eager = train(build, loss_fn, data, None, make_tap, read)
    return base, tapped, eager


def attention_stats(tap: AttentionTap) -> dict[str, torch.Tensor]:
    return tap.stats


def activation_stats(tap: ActivationTap) -> dict[str, torch.Tensor]:
    return {name: tap.rows(name) for name in tap.captures}


def assert_one_extra_compile(base: dict, tapped: dict) -> None:
    """At most one compile more than without the tap; the unarmed graphs are the very graphs compiled without it;
    nothing compiled after the first armed and the first unarmed step."""
    base_graphs, tapped_graphs = base["backend"].graphs, tapped["backend"].graphs
    assert len(tapped_graphs) <= len(base_graphs) + 1, (len(base_graphs), len(tapped_graphs))
    assert all(graph in tapped_graphs for graph in base_graphs)  # non-logging steps: the same compiled graph
    assert tapped["compiles"][1] == tapped["compiles"][-1]  # no recompile at later logging or non-logging steps
    assert not graph_breaks(), graph_breaks()


def assert_close_stats(got: list[dict], expected: list[dict], atol: float = 1e-5) -> None:
    assert len(got) == len(expected) == len(range(0, STEPS, EVERY))
    for g, e in zip(got, expected):
        assert list(g) == list(e)
        for name in e:
            torch.testing.assert_close(g[name].double(), e[name].double(), atol=atol, rtol=0)


# ---------------------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize(
    "name, clean",
    [
        ("", ""),
        ("_orig_mod", ""),
        ("_orig_mod.blocks.0.attn", "blocks.0.attn"),
        ("model._orig_mod.blocks.0", "model.blocks.0"),
        ("a._orig_mod.b._orig_mod.c", "a.b.c"),
        ("blocks._orig_mod_like", "blocks._orig_mod_like"),
    ],
)
def test_clean_module_name(name, clean):
    assert clean_module_name(name) == clean


def test_named_modules_are_those_of_the_uncompiled_model():
    model = tiny_gpt()
    expected = [name for name, _ in model.named_modules()]

    class Holder(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.model = inner

    wrapped = torch.compile(model, backend="eager")  # lazy: nothing compiles until called
    assert [n for n, _ in wrapped.named_modules()][1] == "_orig_mod"  # what torch.compile adds
    assert [name for name, _ in named_modules(wrapped)] == expected
    assert [name for name, _ in named_modules(Holder(wrapped))] == [""] + ["model" + ("." + n if n else "") for n in expected]
    assert is_compiled(wrapped) and is_compiled(Holder(wrapped)) and not is_compiled(tiny_gpt())
    inplace = tiny_gpt()
    inplace.blocks[0].compile(backend="eager")
    assert [name for name, _ in named_modules(inplace)] == expected and is_compiled(inplace)


# ---------------------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("style", STYLES)
def test_attention_tap_compiles_once_more_and_matches_eager(style):
    data = batches()
    make = lambda m: AttentionTap(m)  # noqa: E731
    base, tapped, eager = three_runs(tiny_gpt, lm_loss, data, style, make, attention_stats)
    assert_one_extra_compile(base, tapped)
    assert all(torch.equal(a, b) for a, b in zip(base["losses"], tapped["losses"]))  # the tap changes nothing
    assert list(tapped["stats"][0]) == ["blocks.0.attn", "blocks.1.attn"]  # no "_orig_mod.", no duplicate sites
    assert_close_stats(tapped["stats"], eager["stats"])
    assert all(s[name][0].sum() > 0 for s in tapped["stats"] for name in s)  # every logging step captured


def test_budgets_and_filters_apply_to_compiled_captures():
    data = batches()
    make = lambda m: AttentionTap(m, include="blocks.1.**", max_rows=2, max_queries=5)  # noqa: E731
    tapped = train(tiny_gpt, lm_loss, data, STYLES[0], make, attention_stats)
    eager = train(tiny_gpt, lm_loss, data, None, make, attention_stats)
    assert list(tapped["stats"][0]) == ["blocks.1.attn"]
    assert_close_stats(tapped["stats"], eager["stats"])


def test_exclusive_capture_is_decided_when_the_compiled_code_runs():
    model = tiny_gpt()
    runner = torch.compile(model, backend=CountingBackend())
    tap = AttentionTap(runner)
    idx = batches()[0][:, :-1]
    with tap:
        with exclusive_capture():  # a probe forward of another monitor: no tap may score it
            runner(idx)
        assert not tap.stats
        runner(idx)
    assert list(tap.stats) == ["blocks.0.attn", "blocks.1.attn"]
    assert not tap._deferred.pending and not tap.armed


def test_disarm_on_exception_leaves_nothing_queued_or_installed():
    model = tiny_gpt()
    runner = torch.compile(model, backend=CountingBackend())
    tap = AttentionTap(runner)
    with pytest.raises(RuntimeError, match="boom"):
        with tap:
            runner(batches()[0][:, :-1])
            raise RuntimeError("boom")
    assert not tap.armed and not tap._deferred.pending
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch._C._len_torch_function_stack() == 0


# ---------------------------------------------------------------------------------------------------------- HF Llama
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_llama(impl: str = "sdpa") -> nn.Module:
    return tiny_llama_lm(VOCAB, impl, initializer_range=0.3)  # GQA: 4 heads, 2 KV heads


def llama_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(idx)
    mask[1, -4:] = 0  # right padding: its queries are not scored (query_padding's rule), compiled or not
    return model(input_ids=idx, attention_mask=mask, labels=idx).loss


@pytest.mark.parametrize("style", STYLES[:1])
def test_compiled_hf_llama_sdpa(style):
    data = batches()
    make = lambda m: AttentionTap(m)  # noqa: E731
    # eager: through the HF adapter
    base, tapped, eager = three_runs(tiny_llama, llama_loss, data, style, make, attention_stats)
    assert_one_extra_compile(base, tapped)
    assert all(torch.equal(a, b) for a, b in zip(base["losses"], tapped["losses"]))
    assert list(tapped["stats"][0]) == [f"model.layers.{i}.self_attn" for i in range(2)]
    assert_close_stats(tapped["stats"], eager["stats"])


def test_compiled_hf_eager_attention_warns_with_the_fix():
    model = tiny_llama("eager")
    tap = AttentionTap(torch.compile(model, backend="eager"))
    with pytest.warns(UserWarning, match="attn_implementation='sdpa'"):
        tap.arm()
    tap.disarm()
    assert model.config._attn_implementation == "eager"  # the HF adapter did not switch it


# ---------------------------------------------------------------------------------------------------------- activations
class InPlaceNet(nn.Module):
    """``fc``'s output is overwritten in place by the next op: a capture must keep the values ``fc`` returned."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 8)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.fc(x)))


@pytest.mark.parametrize("style", STYLES)
def test_activation_tap_compiles_once_more_and_matches_eager(style):
    data = batches()
    make = lambda m: ActivationTap(m, include=["blocks.?", "ln_f"], max_tokens=5)  # noqa: E731
    base, tapped, eager = three_runs(tiny_gpt, lm_loss, data, style, make, activation_stats)
    assert_one_extra_compile(base, tapped)
    assert all(torch.equal(a, b) for a, b in zip(base["losses"], tapped["losses"]))
    assert list(tapped["stats"][0]) == ["blocks.0", "blocks.1", "ln_f"]
    assert_close_stats(tapped["stats"], eager["stats"])
    assert all(not v.requires_grad for s in tapped["stats"] for v in s.values())


def test_activation_capture_survives_in_place_ops_in_the_compiled_graph():
    x = torch.randn(4, 6)
    net = InPlaceNet()
    expected = net.fc(x).detach()
    assert (expected < 0).any()  # the ReLU would change what a view of fc's output shows
    tap = ActivationTap(torch.compile(net, backend=CountingBackend()), include="fc")
    with tap:
        net_out = tap.model(x)
    torch.testing.assert_close(tap.rows("fc"), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(net_out, net(x), atol=0, rtol=0)


def test_differentiable_activation_tap_keeps_the_graph_under_compile():
    x = torch.randn(4, 6)
    net = InPlaceNet()
    tap = ActivationTap(torch.compile(net, backend=CountingBackend()), include="out", differentiable=True)
    with tap:
        tap.model(x)
    rows = tap.rows("out")
    assert rows.requires_grad
    rows.sum().backward()
    assert net.out.weight.grad is not None and net.out.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------- inductor
@pytest.mark.skipif(
    os.environ.get("ENTROTRAIN_INDUCTOR_TESTS") != "1",
    reason="inductor compiles take ~1.5 min on a 2-core CPU: set ENTROTRAIN_INDUCTOR_TESTS=1 to run",
)
def test_default_inductor_backend_compiles_once_more_and_keeps_losses_bit_identical():
    """The real thing: inductor (CPU C++ codegen), forward and backward graphs."""
    from torch._dynamo.utils import counters

    data = batches()[:3]
    make = lambda m: AttentionTap(m)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = train(tiny_gpt, lm_loss, data, STYLES[0], None, attention_stats, backend="inductor")
        base_graphs = counters["stats"]["unique_graphs"]
        counters.clear()
        tapped = train(tiny_gpt, lm_loss, data, STYLES[0], make, attention_stats, backend="inductor")
        tapped_graphs = counters["stats"]["unique_graphs"]
    eager = train(tiny_gpt, lm_loss, data, None, make, attention_stats)
    assert tapped_graphs <= base_graphs + 1, (base_graphs, tapped_graphs)
    assert not graph_breaks()
    assert all(torch.equal(a, b) for a, b in zip(base["losses"], tapped["losses"]))
    for got, expected in zip(tapped["stats"], eager["stats"]):
        assert list(got) == list(expected)
        for name in expected:
            torch.testing.assert_close(got[name].double(), expected[name].double(), atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------- traceable helpers
def test_attention_mask_traces_without_graph_break():
    """A float mask's blocked / bias split has no `.item()` when traced (fullgraph=True raises on any break)."""
    from entrotrain.functional.attention_masks import AttentionMask

    def describe(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = AttentionMask((2, 1, 5, 5), attn_mask=mask, is_causal=True)
        return m.dense_additive(torch.float32), m.key_counts(2)

    mask = torch.zeros(2, 1, 5, 5)
    mask[0, 0, :, 3:] = float("-inf")
    mask[1, 0, :, 1] = torch.finfo(torch.float32).min
    mask[1, 0, 2, 0] = 0.5  # a finite bias
    got = torch.compile(describe, backend=CountingBackend(), fullgraph=True)(mask)
    expected = describe(mask)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


def test_kernel_dispatch_traces_without_graph_break():
    """No functools.lru_cache on the dispatch path (dynamo breaks the graph on it)."""
    from entrotrain.kernels import dispatch

    def pick(x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 if dispatch.resolve_impl("auto", x) == "torch" else 3.0) * dispatch.can_run_triton(x)

    x = torch.randn(3)
    dispatch.triton_available()  # the first look-up imports; later ones read a dict
    torch.testing.assert_close(torch.compile(pick, backend=CountingBackend(), fullgraph=True)(x), pick(x))


# ---------------------------------------------------------------------------------------------------------- adapters, regularisers
def test_compiled_transformer_encoder_through_the_mha_adapter():
    """nn.TransformerEncoder (nn.MultiheadAttention, training mode): the adapter's q, k come from the graph."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    x = torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[1, 5:] = True
    eager = AttentionTap(encoder)
    with eager:
        encoder(x, src_key_padding_mask=pad)
    backend = CountingBackend()
    runner = torch.compile(encoder, backend=backend)
    tap = AttentionTap(runner)
    for _ in range(2):  # the second armed call reuses the first one's graph
        tap.reset()
        with tap:
            runner(x, src_key_padding_mask=pad)
    assert backend.compiles == 1 and not graph_breaks()
    assert list(tap.stats) == list(eager.stats) == ["layers.0.self_attn", "layers.1.self_attn"]
    for name in eager.stats:
        torch.testing.assert_close(tap.stats[name], eager.stats[name], atol=1e-5, rtol=0)


def test_regulariser_gradient_through_a_compiled_model_equals_eager():
    """A differentiable tap (a fresh one per step, as Regularizer.capture makes) keeps the graph of the compiled
    forward: the penalty's gradient is the eager one, with one compile for all steps."""
    from entrotrain.regularizers.attention_entropy import AttentionEntropyMaximization

    idx = batches()[0][:, :-1]
    grads = []
    for style in (None, "torch.compile(model)"):
        model = tiny_gpt()
        backend = CountingBackend()
        runner = compiled(model, style, backend)
        reg = AttentionEntropyMaximization(weight=0.1)
        for _ in range(2):
            model.zero_grad()
            with reg.capture(runner):
                runner(idx)
            reg().total.backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()])
        if style is not None:
            assert backend.compiles == 1 and not graph_breaks()
    for got, expected in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[1])


def test_query_padding_block_applies_to_compiled_captures():
    """`with query_padding(mask):` is over when queued calls are scored: the mask travels with them."""
    from entrotrain.taps.query_padding import query_padding

    idx = batches()[0][:, :-1]
    mask = torch.ones_like(idx, dtype=torch.bool)
    mask[0, 7:] = False
    stats = []
    for style in (None, "torch.compile(model)"):
        runner = compiled(tiny_gpt(), style, CountingBackend())
        tap = AttentionTap(runner)
        with tap, query_padding(mask):
            runner(idx)
        stats.append(tap.stats)
    eager, got = stats
    assert list(got) == list(eager)
    for name in eager:
        torch.testing.assert_close(got[name], eager[name], atol=1e-5, rtol=0)
    unpadded = AttentionTap(tiny_gpt())
    with unpadded:
        unpadded.model(idx)
    assert not torch.equal(unpadded.stats["blocks.0.attn"], eager["blocks.0.attn"])  # the mask mattered


def test_query_padding_block_applies_to_compiled_mha_captures():
    """The adapter path too: nn.TransformerEncoder without a key padding mask, inside `with query_padding(mask):`,
    compiled, scores only the block's real queries, as in eager."""
    from entrotrain.taps.query_padding import query_padding

    torch.manual_seed(0)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), 2)
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    stats = []
    for runner in (encoder, torch.compile(encoder, backend=CountingBackend())):
        tap = AttentionTap(runner)
        with tap, query_padding(mask):
            runner(x)
        stats.append(tap.stats)
    eager, got = stats
    assert list(got) == list(eager) == ["layers.0.self_attn", "layers.1.self_attn"]
    for name in eager:
        assert eager[name][ROWS].tolist() == [7.0 + 4.0] * 2  # the block's real queries only
        torch.testing.assert_close(got[name], eager[name], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------- record_attention
class _HandWritten(nn.Module):
    """Attention written out (softmax(q kᵀ)), reporting q, k with record_attention; padded queries via query_mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.embed = nn.Embedding(VOCAB, 16)
        self.qk = nn.Linear(16, 32)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        from entrotrain.taps.attention_tap import record_attention

        x = self.embed(idx)
        q, k = self.qk(x).view(*idx.shape, 2, 2, 8).unbind(2)  # (B, N, heads, 8) each
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        real = torch.ones(idx.shape, dtype=torch.bool, device=idx.device)
        real[0, -3:] = False  # the first row's last three queries are padding
        record_attention(q, k, is_causal=True, query_mask=real)
        mask = torch.ones(idx.shape[1], idx.shape[1], dtype=torch.bool).tril()
        weights = (q @ k.transpose(-1, -2) / 8**0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        return self.head(x + (weights @ k).transpose(1, 2).reshape(*idx.shape, 16))


@pytest.mark.parametrize("style", STYLES)
def test_record_attention_is_deferred_under_compile(style):
    """A hand-written attention's record_attention call: queued while traced, scored after the forward: no graph
    break, one extra compile, the eager values (query mask applied), losses unchanged."""
    data = batches()
    make = lambda m: AttentionTap(m)  # noqa: E731
    base, tapped, eager = three_runs(_HandWritten, lm_loss, data, style, make, attention_stats)
    assert_one_extra_compile(base, tapped)
    assert all(torch.equal(a, b) for a, b in zip(base["losses"], tapped["losses"]))
    assert list(tapped["stats"][0]) == [""] or list(tapped["stats"][0]) == list(eager["stats"][0])
    assert_close_stats(tapped["stats"], eager["stats"])
    rows = eager["stats"][0][next(iter(eager["stats"][0]))][2]  # ROWS per head: 3 rows x SEQ queries - 3 padded
    assert rows.tolist() == [3 * SEQ - 3] * 2


# ---------------------------------------------------------------------------------------------------------- nn.Transformer
def torch_seq2seq() -> nn.Module:
    from tests.helpers.hf_models import FAMILIES

    return FAMILIES["torch_transformer"].build("native")


def seq2seq_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).pow(2).mean()


def test_compiled_nn_transformer_leaves_padded_decoder_queries_out():
    """nn.TransformerDecoderLayer's cross-attention queries are the decoder tokens: its tgt_key_padding_mask marks the
    padded ones. Compiled, the layer's hooks run in the graph: they queue the mask with the attention calls (before,
    they ran at trace time only, so every padded decoder query was scored: +40% entropy sum on this batch)."""
    from tests.helpers.hf_models import FAMILIES

    batch = FAMILIES["torch_transformer"].inputs("right")
    assert not batch["decoder_attention_mask"].all()
    data = [batch] * STEPS
    make = lambda m: AttentionTap(m)  # noqa: E731
    base, tapped, eager = three_runs(torch_seq2seq, seq2seq_loss, data, STYLES[0], make, attention_stats)
    assert_one_extra_compile(base, tapped)
    assert all(torch.equal(a, b) for a, b in zip(base["losses"], tapped["losses"]))
    cross = "transformer.decoder.layers.0.multihead_attn"
    real = int(batch["decoder_attention_mask"].sum())
    assert all(torch.all(stats[cross][ROWS] == real) for stats in tapped["stats"])
    assert_close_stats(tapped["stats"], eager["stats"])
