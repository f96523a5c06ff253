"""``EntropyTrainerCallback`` under ``TrainingArguments(torch_compile=True)``: what happens, pinned.

``Trainer`` runs ``model_wrapped`` (accelerate's ``torch.compile(model)``, an ``OptimizedModule``) while callbacks get
``model`` (the uncompiled module inside it), so the taps are built on a model they take for eager. Measured on this
CPU torch (a 2-layer GPT-2 from a config, AttentionEntropyMonitor, ``logging_steps`` 1 and 2; the monitors'
``every_n_steps`` is not used under ``Trainer``), with the ``eager`` and the ``inductor`` backends alike:

- the taps capture: every logged ``entropy/attn/*`` equals the uncompiled run's (to 1e-9), sites named as uncompiled;
- training is unchanged: the losses are bit-identical with and without the callback;
- but the eager-only capture (the HF attention adapter: frame inspection, ``.item()``) is traced: ~22 graph breaks
  (2 layers), and one recompile at every logging step (new graphs at each arming: 26, 29, 30, 31, ... with ``logging_steps=1``)
  until dynamo's ``recompile_limit`` (8) is hit and those frames run uncompiled for the rest of training. The tap
  notices (its name hooks run traced while its eager-only HF adapter is installed) and warns once, with the fix.

Tapping the module ``Trainer`` runs (``trainer.model_wrapped``) instead takes the taps' compiled path (attention
queued at ``F.scaled_dot_product_attention`` inside the graph, scored after it): one extra compile for the armed
state, no graph break of ours, same values. ``test_callback_on_the_compiled_wrapper_compiles_once`` pins that with a
subclass that binds the wrapper; the callback itself does so since (``_running_model``).

The tests train one block, backend ``eager``: dynamo traces, guards, breaks and recompiles exactly as for ``inductor`` (what is pinned here), without
C++ code generation (seconds on a CPU instead of minutes).
"""

from __future__ import annotations

import functools
import os
import tempfile
import warnings
from dataclasses import dataclass

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")
if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
    pytest.skip("torch.compile (dynamo) unavailable on this machine", allow_module_level=True)

from torch._dynamo.utils import counters  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor  # noqa: E402
from entrotrain.integrations.transformers import EntropyTrainerCallback  # noqa: E402
from tests.helpers.compile_count import fresh_dynamo  # noqa: E402
from tests.helpers.reference import one_thread  # noqa: E402,F401  (autouse fixture)
from tests.helpers.tiny_hf_lms import lm_rows  # noqa: E402

VOCAB, T, ROWS, STEPS, LOGGING_STEPS = 40, 10, 8, 4, 2
SITES = ["transformer.h.0.attn"]


def tiny_gpt2() -> torch.nn.Module:
    """One GPT-2 block (width 16, 2 heads, no dropout) from a config: each dynamo trace costs seconds on a CPU."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


@dataclass
class Run:
    losses: list[float]
    entropy: list[dict[str, float]]  # the entrotrain keys of each training log
    graphs: list[int]  # graphs compiled so far, after each step
    breaks: dict[str, int]  # graph-break reasons
    sites: list[str]
    warnings: list[str]  # entrotrain's warnings (AttentionTap: ...)


class _Recorder(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []
        self.graphs: list[int] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if logs and "loss" in logs:
            self.logs.append(dict(logs))

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.graphs.append(counters["stats"]["unique_graphs"])


class _OnTheWrapper(EntropyTrainerCallback):
    """The proposed change, simulated: bind the module ``Trainer`` runs (``model_wrapped``, compiled) when it wraps
    the ``model`` callbacks get."""

    trainer: Trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        super().on_train_begin(args, state, control, model=self.trainer.model_wrapped, **kwargs)


@functools.lru_cache(maxsize=None)
def run(callback: str | None, compile_: bool = True) -> Run:
    """Train the tiny GPT-2 for STEPS steps (lr 1e-2, logging every LOGGING_STEPS) with no callback, the callback
    (``"plain"``) or the callback on the compiled wrapper (``"wrapper"``). Cached: each run is deterministic."""
    with fresh_dynamo(), tempfile.TemporaryDirectory() as out, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kwargs = dict(
            output_dir=out, max_steps=STEPS, per_device_train_batch_size=4, logging_steps=LOGGING_STEPS,
            learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
        )
        if compile_:
            kwargs.update(torch_compile=True, torch_compile_backend="eager")
        recorder = _Recorder()
        trainer = Trainer(
            model=tiny_gpt2(), args=TrainingArguments(**kwargs), train_dataset=lm_rows(ROWS, VOCAB, T),
            callbacks=[recorder],
        )
        monitor = AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)
        if callback == "plain":
            EntropyTrainerCallback([monitor]).attach(trainer)
        elif callback == "wrapper":
            cb = _OnTheWrapper([monitor])
            cb.trainer = trainer
            cb.attach(trainer)
        trainer.train()
        if compile_:
            assert type(trainer.model_wrapped).__name__ == "OptimizedModule"  # Trainer did compile
        return Run(
            losses=[row["loss"] for row in recorder.logs],
            entropy=[{k: v for k, v in row.items() if k.startswith("entropy/")} for row in recorder.logs],
            graphs=list(recorder.graphs),
            breaks=dict(counters["graph_break"]),
            sites=list(monitor.site_names),
            warnings=[str(w.message) for w in caught if str(w.message).startswith("AttentionTap")],
        )


def assert_same_capture(run_: Run, eager: Run) -> None:
    assert run_.sites == eager.sites == SITES
    assert len(run_.entropy) == STEPS // LOGGING_STEPS
    for got, expected in zip(run_.entropy, eager.entropy):
        assert set(got) == set(expected) and "entropy/attn/L0/H1" in got
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=0, abs=1e-9), key


def test_the_uncompiled_model_captures_and_training_is_unchanged():
    """The taps capture the compiled forwards with the uncompiled run's values, and the losses are bit-identical with
    and without the callback. The callback binds the compiled wrapper, so the tap's warning about a module inside a
    compiled wrapper is not raised."""
    baseline, tapped = run(None), run("plain")
    assert tapped.warnings == []
    assert baseline.entropy == [{}] * (STEPS // LOGGING_STEPS)
    assert tapped.losses == baseline.losses  # bit for bit
    assert_same_capture(tapped, run("plain", compile_=False))


def test_compiled_trainer_compiles_the_armed_state_once():
    baseline, tapped = run(None), run("plain")
    assert set(tapped.breaks) == set(baseline.breaks), set(tapped.breaks) - set(baseline.breaks)
    armed = tapped.graphs[LOGGING_STEPS - 1]  # after the first logging step
    assert tapped.graphs[-1] == armed, tapped.graphs  # no recompile at later armings


def test_callback_on_the_compiled_wrapper_compiles_once():
    """The fix's premise: on the module Trainer runs, the taps compile the armed state once (no recompile at later
    armings, no graph break beyond the model's own), capture the same values, and leave the losses bit-identical."""
    baseline, wrapped = run(None), run("wrapper")
    assert set(wrapped.breaks) == set(baseline.breaks), set(wrapped.breaks) - set(baseline.breaks)
    first = baseline.graphs[-1]
    assert wrapped.graphs[-1] == wrapped.graphs[LOGGING_STEPS - 1] <= 2 * first, wrapped.graphs
    assert wrapped.losses == baseline.losses
    assert wrapped.warnings == [] and run("plain", compile_=False).warnings == []
    assert_same_capture(wrapped, run("plain", compile_=False))
