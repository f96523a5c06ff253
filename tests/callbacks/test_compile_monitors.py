"""AttentionEntropyMonitor + RepresentationEntropyMonitor on compiled models in a Lightning ``Trainer``.

Logging every 2 steps of 4: the monitors cost at most one extra compile (the logging-step graph), steps that do not
log run the graph compiled without monitors, losses are bit-identical with and without the monitors (same backend),
logged values equal the uncompiled run's to 1e-5, and keys carry no ``_orig_mod``. Compiles are counted with a
backend that records each graph (``tests.helpers.compile_count``).
"""

from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
from tests.helpers.compile_count import CountingBackend, fresh_dynamo, graph_breaks
from tests.helpers.gpt_module import GPTModule
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.recorders import LossRecorder
from tests.helpers.reference import one_thread  # noqa: F401  (autouse fixture)
from tests.helpers.spy_logger import SpyLogger
from tests.helpers.tiny_hf_lms import tiny_llama_lm

VOCAB, SEQ, STEPS, EVERY = 29, 12, 4, 2


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    with fresh_dynamo():
        yield


def loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (STEPS * 4, SEQ + 1), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=4, shuffle=False)


class GPT(GPTModule):
    """An unconverted 2-layer TinyGPT (width 16, seed 0) with Adam (lr 1e-2), called through ``forward``."""

    def __init__(self) -> None:
        super().__init__(convert=False, vocab_size=VOCAB, block_size=SEQ, n_embd=16, seed=0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)


class Llama(GPT):
    def __init__(self) -> None:
        L.LightningModule.__init__(self)
        pytest.importorskip("transformers")
        self.model = tiny_llama_lm(VOCAB)  # 2 layers, 4 heads, 2 KV heads (GQA), SDPA, seed 0

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        return self.model(input_ids=idx, labels=idx).loss


def monitors(kind: str) -> list[L.Callback]:
    layers = ["model.blocks.?"] if kind == "gpt" else ["model.model.layers.?"]
    return [
        AttentionEntropyMonitor(every_n_steps=EVERY, log_media=False, print_summary=False),
        RepresentationEntropyMonitor(
            include=layers, measures=["rankme", "effective_rank"], every_n_steps=EVERY, log_spectrum=False,
            print_summary=False,
        ),
    ]


def run(kind: str, style: str | None, with_monitors: bool) -> dict:
    """Fit STEPS steps; ``style``: None (eager), "inner" (``self.model = torch.compile(...)``) or "lightning"
    (``trainer.fit(torch.compile(lit))``, which compiles ``training_step``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    module = GPT() if kind == "gpt" else Llama()
    backend = CountingBackend()
    if style == "inner":
        module.model = torch.compile(module.model, backend=backend)
    fitted = torch.compile(module, backend=backend) if style == "lightning" else module
    recorder, spy = LossRecorder(), SpyLogger()
    trainer = quiet_trainer(
        callbacks=[recorder] + (monitors(kind) if with_monitors else []), max_steps=STEPS, logger=spy,
        deterministic=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(fitted, loader())
    metrics: dict[int, dict[str, float]] = {}
    for step, row in spy.rows:
        metrics.setdefault(step, {}).update({k: v for k, v in row.items() if k.startswith("entropy/")})
    words = ("_orig_mod", "AttentionTap", "AttentionEntropyMonitor", "RepresentationEntropyMonitor")
    ours = [str(w.message) for w in caught if any(word in str(w.message) for word in words)]
    return {"losses": recorder.losses, "metrics": metrics, "graphs": backend.graphs, "breaks": graph_breaks(), "warnings": ours}


def check(kind: str, style: str) -> None:
    base = run(kind, style, with_monitors=False)
    watched = run(kind, style, with_monitors=True)
    eager = run(kind, None, with_monitors=True)
    # at most one extra compile: the logging-step graph; the non-logging graphs are those compiled without monitors
    assert len(watched["graphs"]) <= len(base["graphs"]) + 1, (len(base["graphs"]), len(watched["graphs"]))
    assert all(graph in watched["graphs"] for graph in base["graphs"])
    assert not watched["breaks"], watched["breaks"]
    assert not watched["warnings"], watched["warnings"]  # e.g. no "saw no attention inside model._orig_mod..."
    # monitoring changes nothing
    assert len(base["losses"]) == len(watched["losses"]) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(base["losses"], watched["losses"]))
    # the same keys and values as the uncompiled run, on every logging step
    assert sorted(watched["metrics"]) == sorted(eager["metrics"]) == list(range(0, STEPS, EVERY))
    for step, expected in eager["metrics"].items():
        got = watched["metrics"][step]
        assert sorted(got) == sorted(expected)
        assert not any("_orig_mod" in key for key in got)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-5, nan_ok=True), (step, key)
    assert any("/attn/L1/H1" in key for key in got) and any(key.endswith("/rankme") for key in got)


@pytest.mark.parametrize("style", ["inner", "lightning"])
def test_compiled_tiny_gpt_with_monitors(style):
    check("gpt", style)


def test_compiled_hf_llama_with_monitors():
    pytest.importorskip("transformers")
    check("llama", "inner")
