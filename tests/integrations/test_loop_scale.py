"""EntropyMonitors (entrotrain.integrations.loop) under the two scale-out setups a plain-loop user has: FSDP2's
``fully_shard`` (2 CPU ranks, gloo) and ``torch.compile``.

**FSDP2.** One subprocess launch (loop_fsdp2_run.py) forks 2 ranks that ``fully_shard`` tests/helpers/loop_fsdp.py's
``LoopLM`` (two σReparam attention blocks, a top-2 MoE layer; per block, MoE layer and root on
``init_device_mesh("cpu", (2,))``) and train it 3 SGD steps in a hand-written loop, each rank on its half of every
union batch, under ``EntropyMonitors([AttentionEntropyMonitor, RepresentationEntropyMonitor(stage="train"),
SigmaReparamMonitor, RouterEntropyMonitor, PredictionEntropyMonitor(source="output", probe=..., generation),
PredictionEntropyMonitor(source="head")], every_n_steps=1)``; then the same loop without monitors. The reference is
this process, no FSDP, on the union batch with ``chunks=2`` (one forward of the union, the loss the mean of the two
halves' mean losses: the ranks' average gradient). Tolerance, as in tests/callbacks/test_fsdp2.py: the runs do the
same float32 arithmetic except the order of the gradient average (FSDP's ``(g0 + g1) / 2`` vs autograd's sum over the
union), so losses and weights agree to ``1e-5`` relative / ``1e-6`` absolute and every published statistic to ``1e-5``
relative / ``1e-5`` absolute. Measured: the 368 published values within 1.8e-7 relative (the worst a σReparam
qk-norm), the union losses within 6e-8 relative, parameters and σReparam buffers within 1.2e-7.

**torch.compile.** ``torch.compile(TinyGPT)`` watched by ``EntropyMonitors([AttentionEntropyMonitor,
RepresentationEntropyMonitor])`` logging every 2 steps of 4, with a graph-counting backend (the traced graph run
eagerly: no inductor, cheap on CPU) and with ``aot_eager`` (AOTAutograd, compiled backward): the logged keys are the
eager loop's (no ``_orig_mod``) and the values equal at every logging step to ``1e-6`` relative / ``1e-6`` absolute.
Neither backend fuses or reorders arithmetic (they run the eager kernels on the traced ops, measured difference 0.0);
the tolerance leaves room for reassociation in a decomposed op. The monitors cost at most one extra compile (steps 0
and 1 compile the logging-step and the plain graphs); steps 2 (logging) and 3 (not logging) compile nothing, dynamo
counts no graph break, and the losses equal the unmonitored compiled loop's bit for bit.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
from entrotrain.integrations.loop import EntropyMonitors
from entrotrain.models import TinyGPT
from tests.helpers.compile_count import CountingBackend, fresh_dynamo, graph_breaks
from tests.helpers.fsdp_models import WORLD, dataset, union_loader
from tests.helpers.loop_fsdp import LOOP_STEPS, LoopLM, make_monitors, rank_batch, train
from tests.helpers.loop_runs import leftovers
from tests.helpers.scripts import run_script

SCRIPT = Path(__file__).with_name("loop_fsdp2_run.py")
REL, ABS = 1e-5, 1e-5


def _fsdp2_available() -> bool:
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return False
    import torch.distributed.fsdp as fsdp

    return hasattr(fsdp, "fully_shard")


@pytest.fixture(autouse=True, scope="module")
def _module_env():
    """One intra-op thread, no wandb, and TRITON_INTERPRET unset for the module-scoped runs below: conftest drops it
    per test only, after module fixtures ran; with it, ``impl="auto"`` sends the monitors' entropy maths to
    Triton's interpreter, which a plain loop on CPU never uses (and the subprocess inherits the environment)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        mp.setenv("WANDB_MODE", "disabled")
        yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ 1. FSDP2
@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    if not _fsdp2_available():
        pytest.skip("FSDP2 on CPU needs torch.distributed with gloo and fully_shard")
    out = tmp_path_factory.mktemp("loop_fsdp2")
    run_script(SCRIPT, out, str(out), "120", timeout=180)  # faulthandler exits a hung rank after 120 s
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for record in ranks:
        record["logs"] = {int(step): row for step, row in record["logs"].items()}
    weights, unmonitored = torch.load(out / "weights.pt"), torch.load(out / "weights_unmonitored.pt")
    return ranks, weights, unmonitored


@pytest.fixture(scope="module")
def reference():
    """One process, no FSDP: the same loop on the union batches (chunks=2)."""
    batches = list(union_loader(dataset()))[:LOOP_STEPS]
    model = LoopLM()
    losses, logs = train(model, batches, make_monitors(), chunks=WORLD)
    return model, losses, logs


def test_fsdp2_parameters_were_sharded(fsdp):
    ranks, weights, _ = fsdp
    names = {n for n, _ in LoopLM().named_parameters()}
    for record in ranks:
        assert record["world"] == WORLD
        assert set(record["sharded"]) == names  # every parameter a DTensor (γ of each σReparam layer included)
    assert any(n.endswith(".gamma") for n in names)


def test_fsdp2_losses_and_weights_equal_one_process(fsdp, reference):
    ranks, weights, _ = fsdp
    model, losses, _ = reference
    assert len(losses) == LOOP_STEPS
    for step in range(LOOP_STEPS):  # equal halves: the mean of the ranks' mean losses is the union's chunked loss
        union = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert union == pytest.approx(losses[step], rel=REL, abs=1e-6), step
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the ranks really held different rows
    state = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert set(weights) == set(state)
    for name, value in state.items():  # σReparam's u / sigma buffers too
        torch.testing.assert_close(weights[name], value.detach(), rtol=REL, atol=1e-6, msg=name)


def test_fsdp2_every_published_key_equals_one_process_on_the_union(fsdp, reference):
    ranks, _, _ = fsdp
    _, _, want = reference
    assert set(want) == set(range(LOOP_STEPS))
    families = {key.split("/")[1] if key.startswith("entropy/") else key.split("/")[0] for key in want[0]}
    assert {"attn", "attn_norm", "repr", "router", "pred", "pred_head", "sigma_reparam"} <= families
    assert any("/gen/" in key for key in want[0]) and any("/probe/" in key for key in want[0])
    for rank, record in enumerate(ranks):  # every rank computes the reduced statistics
        got = record["logs"]
        assert set(got) == set(want), rank
        for step, row in want.items():
            assert set(got[step]) == set(row), (rank, step, set(got[step]) ^ set(row))
            for key, value in row.items():
                assert math.isfinite(value), (step, key)  # EntropyMonitors.logs holds finite scalars only
                assert got[step][key] == pytest.approx(value, rel=REL, abs=ABS), (rank, step, key)


def test_fsdp2_log_is_called_on_rank_zero_only(fsdp):
    ranks, _, _ = fsdp
    assert [step for step, _ in ranks[0]["calls"]] == list(range(LOOP_STEPS))
    assert ranks[1]["calls"] == []
    for step, metrics in ranks[0]["calls"]:
        assert metrics == ranks[0]["logs"][step]


def test_fsdp2_hooks_released_and_training_unchanged(fsdp):
    """Leaving ``watch`` leaves exactly FSDP2's own hooks (same counts per module as before ``watch``) and no torch
    function mode; the same FSDP2 loop without monitors ends on bit-identical parameters and buffers (the probe and
    generation forwards, their reshards and the all-reduces change nothing)."""
    ranks, weights, unmonitored = fsdp
    for record in ranks:
        assert record["hooks_after"] == record["hooks_before"]
        assert any(any(counts) for counts in record["hooks_before"].values())  # FSDP2's hooks were counted
        assert record["function_modes"] == 0
        assert record["losses"] == record["bare_losses"]
    assert set(weights) == set(unmonitored)
    for name, value in weights.items():
        assert torch.equal(value, unmonitored[name]), name


def test_fsdp2_one_rank_alone_would_log_other_numbers(fsdp):
    """The comparison can fail: one process on rank 0's half alone publishes other values."""
    ranks, _, _ = fsdp
    batches = [rank_batch(b, 0) for b in list(union_loader(dataset()))[:1]]
    _, alone = train(LoopLM(), batches, make_monitors())
    got = ranks[0]["logs"][0]
    for key in ("entropy/attn/L0/H0", "entropy/repr/ln_f/rankme", "entropy/router/L0/entropy",
                "entropy/pred/train/mean", "entropy/pred/probe/mean", "entropy/pred/train/tokens",
                "entropy/pred_head/train/nll"):
        assert got[key] != pytest.approx(alone[0][key], rel=1e-4, abs=1e-4), key


# ------------------------------------------------------------------------------------------------ 2. torch.compile
VOCAB, SEQ, STEPS, EVERY = 29, 12, 4, 2


class CountingAotEager(CountingBackend):
    """:class:`CountingBackend` that compiles each graph with ``aot_eager`` (AOTAutograd: a traced backward too)."""

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs.append(gm.code)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _compile_run(backend: CountingBackend | None, watched: bool) -> dict:
    """STEPS Adam steps of a 2-layer TinyGPT (width 16, seed 0), compiled with ``backend`` (None: eager), in the
    loop of loop.py's docstring, with or without the monitors (logging every EVERY steps)."""
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=16)
    net = model if backend is None else torch.compile(model, backend=backend)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.randint(0, VOCAB, (STEPS, 4, SEQ + 1), generator=torch.Generator().manual_seed(0))
    monitors = EntropyMonitors(
        [
            AttentionEntropyMonitor(every_n_steps=EVERY, log_media=False, print_summary=False),
            RepresentationEntropyMonitor(
                include=["blocks.?"], measures=["rankme", "effective_rank"], every_n_steps=EVERY, log_spectrum=False,
                print_summary=False,
            ),
        ],
        print_summary=False,
    )
    losses: list[torch.Tensor] = []
    logs: dict[int, dict[str, float]] = {}
    compiles: list[int] = []  # compiles so far, after each step

    def one(idx: torch.Tensor) -> None:
        loss = F.cross_entropy(net(idx[:, :-1]).reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        losses.append(loss.detach().clone())
        loss.backward()
        opt.step()
        opt.zero_grad()

    with fresh_dynamo(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if watched:
            with monitors.watch(net, opt):
                for step in range(STEPS):
                    with monitors.step(step):
                        one(data[step])
                    if monitors.logs:
                        logs[step] = dict(monitors.logs)
                    compiles.append(backend.compiles if backend is not None else 0)
        else:
            for step in range(STEPS):
                one(data[step])
                compiles.append(backend.compiles if backend is not None else 0)
        breaks = graph_breaks()
    words = ("_orig_mod", "Tap", "Monitor")
    ours = [str(w.message) for w in caught if any(word in str(w.message) for word in words)]
    return {"losses": losses, "logs": logs, "compiles": compiles, "graphs": list(backend.graphs) if backend else [],
            "breaks": breaks, "warnings": ours, "left": leftovers(net)}


@pytest.fixture(scope="module")
def eager():
    return _compile_run(None, watched=True)


@pytest.mark.parametrize("make_backend", [CountingBackend, CountingAotEager], ids=["traced", "aot_eager"])
def test_compiled_loop_logs_the_eager_values_without_extra_graphs(make_backend, eager):
    base = _compile_run(make_backend(), watched=False)
    run = _compile_run(make_backend(), watched=True)
    # the same keys and values as the uncompiled loop, at every logging step
    assert sorted(run["logs"]) == sorted(eager["logs"]) == list(range(0, STEPS, EVERY))
    for step, expected in eager["logs"].items():
        got = run["logs"][step]
        assert set(got) == set(expected), step
        assert not any("_orig_mod" in key for key in got)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), (step, key)
    assert any(k.endswith("/attn/L1/H1") for k in got) and "entropy/repr/blocks.1/rankme" in got
    # one extra compile at most (the logging-step graph); later steps, logging or not, compile nothing new
    assert len(run["graphs"]) <= len(base["graphs"]) + 1, (base["compiles"], run["compiles"])
    assert all(graph in run["graphs"] for graph in base["graphs"])
    assert run["compiles"][-1] == run["compiles"][1], run["compiles"]  # steps 2 (logs) and 3 (does not): cached
    assert not run["breaks"], run["breaks"]
    assert not run["warnings"], run["warnings"]  # e.g. no "saw no attention inside _orig_mod..."
    assert run["left"] == [] and eager["left"] == []  # hooks and the attention mode released
    # monitoring changes nothing
    assert len(run["losses"]) == len(base["losses"]) == STEPS
    assert all(torch.equal(a, b) for a, b in zip(base["losses"], run["losses"]))


def test_compiled_loop_keys_match_the_bare_model_names(eager):
    """The compiled loop's attention sites and representation layers are named as in the bare model."""
    backend = CountingBackend()
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=2, n_embd=16)
    compiled = torch.compile(model, backend=backend)
    assert any("_orig_mod" in name for name, _ in compiled.named_modules())  # what a naive tap would key by
    monitor = RepresentationEntropyMonitor(
        include=["blocks.?"], every_n_steps=1, log_spectrum=False, print_summary=False
    )
    with EntropyMonitors([monitor], print_summary=False).watch(compiled):
        pass
    assert monitor.tap is not None and list(monitor.tap.names) == ["blocks.0", "blocks.1"]
    assert all(k.startswith(("entropy/attn", "entropy/repr/blocks.")) for k in eager["logs"][0])
