"""``EntropyMonitors(record=...)``: the run record a hand-written loop writes is the one a Lightning fit of the same
model and batches writes (scalars, the monitors' arrays, thresholds, guard events), it says how the run ended, and a
resumed loop continues it; ``entrotrain report`` reads it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard
from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor
from entrotrain.callbacks.prediction_monitor import PredictionEntropyMonitor
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor
from entrotrain.callbacks.router_monitor import RouterEntropyMonitor
from entrotrain.dashboards.run_reader import RunData, find_records, load_run
from entrotrain.dashboards.run_record import RunRecordLogger
from entrotrain.errors import EntrotrainError
from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.gpt_module import GPTModule
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.loop_runs import LogitsGPT, MaskedToyMoE, run_loop, same_weights, token_batches
from tests.helpers.router_models import toy_batches


pytestmark = pytest.mark.usefixtures("one_thread")


def _only_record(root: Path) -> RunData:
    records = find_records(root)
    assert len(records) == 1, records
    return load_run(records[0])


def _fit_lightning_record(module, batches, monitors: list, steps: int, root: Path) -> RunData:
    record = RunRecordLogger(root)
    quiet_trainer(max_steps=steps, logger=[record], log_every_n_steps=1, callbacks=monitors).fit(
        module, torch.utils.data.DataLoader(list(batches), batch_size=None)
    )
    return load_run(record.run_dir)


def _media(run: RunData) -> dict[tuple[str, int], tuple[str, dict, np.ndarray]]:
    return {(item.key, item.step): (item.kind, item.meta, item.load()) for items in run.media.values() for item in items}


def _assert_same_record(loop: RunData, lit: RunData) -> None:
    """Every scalar the loop recorded is Lightning's at the same step (Lightning also has ``train/loss``, ``epoch``);
    the same arrays (key, step, kind, meta, values), thresholds and guard events."""
    assert loop.scalars, "the loop recorded no scalar"
    for key, (steps, values) in loop.scalars.items():
        assert key in lit.scalars, key
        lit_steps, lit_values = lit.scalars[key]
        assert list(steps) == list(lit_steps), key
        np.testing.assert_allclose(values, lit_values, rtol=1e-6, atol=1e-9, err_msg=key)
    loop_media, lit_media = _media(loop), _media(lit)
    assert loop_media.keys() == lit_media.keys()
    for where, (kind, meta, array) in loop_media.items():
        lit_kind, lit_meta, lit_array = lit_media[where]
        assert (kind, meta, array.shape) == (lit_kind, lit_meta, lit_array.shape), where
        np.testing.assert_allclose(array, lit_array, rtol=1e-6, atol=1e-9, err_msg=str(where))
    assert sorted(map(json.dumps, loop.thresholds)) == sorted(map(json.dumps, lit.thresholds))
    keep = ("step", "key", "level", "message")
    assert [{k: e[k] for k in keep} for e in loop.events] == [{k: e[k] for k in keep} for e in lit.events]


# ------------------------------------------------------------------ 1. the record Lightning writes
def test_attention_and_representation_record_equals_lightnings(tmp_path: Path) -> None:
    """Attention (heatmap per logging step), representation (a spectrum per layer) and a guard that fires once (an
    event, ``…/alert`` = 1): the loop's record holds what Lightning's holds, and training ends on the same weights."""
    steps = 5

    def callbacks() -> list:
        return [
            AttentionEntropyMonitor(every_n_steps=2, log_media=False, print_summary=False),
            RepresentationEntropyMonitor(include=["model.blocks.*"], every_n_steps=2, max_tokens=None,
                                         print_summary=False, log_spectrum=True),
        ]

    def guard() -> EntropyCollapseGuard:  # normalised entropy is always <= 1.5: fires at its second observation
        return EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, patience=2, arm_on_good=False)

    batches = token_batches(steps)
    lit_module = GPTModule(seed=0)
    loop_module = copy.deepcopy(lit_module)
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 2"):
        lit = _fit_lightning_record(lit_module, batches, [*callbacks(), guard()], steps, tmp_path / "lit")
    monitors = EntropyMonitors(callbacks(), guards=[guard()], print_summary=False, record=tmp_path / "loop")
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 2"):
        run_loop(loop_module, batches, monitors, steps)
    loop = _only_record(tmp_path / "loop")
    assert {"entropy/attn_norm/heatmap", "entropy/repr/model.blocks.1/spectrum"} <= loop.media.keys()
    assert [item.step for item in loop.media["entropy/attn_norm/heatmap"]] == [0, 2, 4]
    assert list(loop.scalars["entropy/attn_norm/min/alert"][0]) == [2]
    assert {t["label"] for t in loop.thresholds} == {"collapse", "overload", "guard (warn)"}
    assert [(e["step"], e["level"]) for e in loop.events] == [(2, "warn")]
    _assert_same_record(loop, lit)
    assert same_weights(loop_module, lit_module)
    assert loop.status == "finished"


def test_router_and_prediction_arrays_equal_lightnings(tmp_path: Path) -> None:
    """The router's layer × expert load heatmap and the prediction probe's per-position profile."""
    batches = toy_batches(3)

    def router() -> list:
        return [RouterEntropyMonitor(every_n_steps=1, top_k=2, log_media=False, print_summary=False)]

    lit_module = MaskedToyMoE()
    loop_module = copy.deepcopy(lit_module)
    lit = _fit_lightning_record(lit_module, batches, router(), 3, tmp_path / "lit_router")
    run_loop(loop_module, batches, EntropyMonitors(router(), print_summary=False, record=tmp_path / "loop_router"), 3)
    loop = _only_record(tmp_path / "loop_router")
    assert [item.step for item in loop.media["entropy/router/load_heatmap"]] == [0, 1, 2]
    _assert_same_record(loop, lit)

    tokens = [(idx[:, :-1], idx[:, 1:]) for (idx,) in token_batches(4)]
    probe = token_batches(1, rows=3, seed=9)[0][0]

    def prediction() -> list:
        return [PredictionEntropyMonitor(every_n_steps=2, source="output", probe=(probe[:, :-1], probe[:, 1:]),
                                         positions=3, log_media=False, print_summary=False)]

    lit_module = LogitsGPT(seed=0, convert=False)
    loop_module = copy.deepcopy(lit_module)
    lit = _fit_lightning_record(lit_module, tokens, prediction(), 4, tmp_path / "lit_pred")
    run_loop(loop_module, tokens, EntropyMonitors(prediction(), print_summary=False, record=tmp_path / "loop_pred"), 4)
    loop = _only_record(tmp_path / "loop_pred")
    assert [item.step for item in loop.media["entropy/pred/probe/pos_profile"]] == [0, 2]
    _assert_same_record(loop, lit)


def test_policy_histogram_is_the_valid_finite_token_entropies(tmp_path: Path) -> None:
    """``record_policy``: the record's ``entropy/policy/hist`` holds exactly the masked-in, finite token entropies of
    the step's micro-batches (as the Lightning monitor stores them), beside the statistics."""
    g = torch.Generator().manual_seed(0)
    monitors = EntropyMonitors([PolicyEntropyMonitor(every_n_batches=2, log_media=False, print_summary=False)],
                               print_summary=False, record=tmp_path)
    handed: dict[int, list[torch.Tensor]] = {}
    with monitors.watch(torch.nn.Linear(2, 2)):
        for step in range(4):
            with monitors.step(step):
                for _ in range(2):  # two micro-batches
                    entropy = torch.rand(3, 5, generator=g)
                    entropy[0, 1] = float("nan")  # counted as non-finite, never drawn
                    mask = torch.rand(3, 5, generator=g) > 0.3
                    monitors.record_policy(entropy, -torch.rand(3, 5, generator=g), torch.randn(3, generator=g), mask,
                                           rewards=torch.rand(3, generator=g))
                    handed.setdefault(step, []).append(entropy[mask & torch.isfinite(entropy)])
    run = _only_record(tmp_path)
    items = run.media["entropy/policy/hist"]
    assert [item.step for item in items] == [0, 2]
    for item in items:
        expected = torch.cat(handed[item.step]).double().numpy()
        np.testing.assert_array_equal(np.sort(item.load()), np.sort(expected))
    assert list(run.scalars["entropy/policy/mean"][0]) == [0, 2]


# ------------------------------------------------------------------ 2. how the run ended
def _short_run(root: Path | RunRecordLogger, fail: BaseException | None = None, steps: int = 3) -> EntropyMonitors:
    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)],
                               print_summary=False, record=root)
    with monitors.watch(module, opt):
        for step, batch in enumerate(token_batches(steps)):
            with monitors.step(step):
                loss = module.training_step(batch, step)
                loss.backward()
                opt.step()
                opt.zero_grad()
            monitors.record.log_metrics({"train/loss": loss.item()}, step=step)  # the user's own scalars
            if fail is not None and step == 1:
                raise fail
    return monitors


def test_status_finished_failed_interrupted_and_the_folder_is_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monitors = _short_run(tmp_path / "ok")
    run = _only_record(tmp_path / "ok")
    assert run.status == "finished" and monitors.record is None  # closed with the run
    assert list(run.scalars["train/loss"][0]) == [0, 1, 2] and list(run.scalars["entropy/attn_norm/min"][0]) == [0, 1, 2]
    assert f"entrotrain report {run.path}" in capsys.readouterr().out

    with pytest.raises(RuntimeError, match="loss exploded"):
        _short_run(tmp_path / "bad", RuntimeError("loss exploded"))
    run = _only_record(tmp_path / "bad")
    assert run.status == "failed" and "RuntimeError: loss exploded" in run.meta["reason"]
    assert list(run.scalars["train/loss"][0]) == [0, 1]

    with pytest.raises(KeyboardInterrupt):
        _short_run(tmp_path / "ctrl_c", KeyboardInterrupt())
    assert _only_record(tmp_path / "ctrl_c").status == "interrupted"


def test_a_configured_record_logger_and_bad_record_arguments(tmp_path: Path) -> None:
    record = RunRecordLogger(tmp_path, name="mine", version="baseline", run_name="baseline lr=1e-2")
    record.log_hyperparams({"lr": 1e-2})
    _short_run(record)
    run = load_run(tmp_path / "mine" / "baseline")
    assert run.label == "baseline lr=1e-2" and run.hparams == {"lr": 1e-2} and run.status == "finished"
    for bad in (42, ["runs"]):
        with pytest.raises(EntrotrainError, match="must be a folder .* or a RunRecordLogger"):
            EntropyMonitors([AttentionEntropyMonitor()], record=bad)


def test_without_record_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monitors = EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, log_media=False)], print_summary=False)
    run_loop(GPTModule(seed=0), token_batches(2), monitors, 2)
    assert monitors.record is None and not any(tmp_path.iterdir())


# ------------------------------------------------------------------ 3. resume
@pytest.mark.parametrize("load", ["before_watch", "after_watch"])
def test_a_resumed_loop_continues_the_same_record(tmp_path: Path, load: str) -> None:
    """Checkpoint after step 1, the first attempt goes on to step 3 and dies; the resumed loop (other data from step
    2 on) continues the same folder: each step once, steps 2-3 from the resumed attempt, status finished."""
    steps, saved_after = 5, 1
    first, second = token_batches(steps, seed=0), token_batches(steps, seed=1)

    def monitors() -> EntropyMonitors:
        return EntropyMonitors([AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False)],
                               print_summary=False, record=tmp_path)

    module = GPTModule(seed=0)
    opt = module.configure_optimizers()
    attempt = monitors()
    with pytest.raises(RuntimeError, match="node lost"):
        with attempt.watch(module, opt):
            for step in range(4):
                with attempt.step(step):
                    module.training_step(first[step], step).backward()
                    opt.step()
                    opt.zero_grad()
                if step == saved_after:
                    checkpoint = json.loads(json.dumps(attempt.state_dict()))  # JSON-able, like a checkpoint
                    snapshot = copy.deepcopy((module, opt))
            raise RuntimeError("node lost")
    folder = _only_record(tmp_path).path
    assert checkpoint["entrotrain_run_record"] == {"run_dir": str(folder.resolve()), "step": saved_after}

    module, opt = snapshot
    resumed = monitors()
    if load == "before_watch":
        resumed.load_state_dict(checkpoint)
    logs = {}
    with resumed.watch(module, opt):
        if load == "after_watch":
            resumed.load_state_dict(checkpoint)
        for step in range(saved_after + 1, steps):
            with resumed.step(step):
                module.training_step(second[step], step).backward()
                opt.step()
                opt.zero_grad()
            logs[step] = resumed.logs["entropy/attn_norm/min"]
    run = _only_record(tmp_path)  # the same folder, no second one
    assert run.path == folder and run.status == "finished" and len(run.meta["resumes"]) == 1
    steps_seen, values = run.scalars["entropy/attn_norm/min"]
    assert list(steps_seen) == list(range(steps))
    assert list(values[saved_after + 1:]) == pytest.approx([logs[s] for s in range(saved_after + 1, steps)], rel=1e-12)
    assert [item.step for item in run.media["entropy/attn_norm/heatmap"]] == list(range(steps))


# ------------------------------------------------------------------ 4. the report
def test_entrotrain_report_reads_the_loop_record(tmp_path: Path) -> None:
    from entrotrain.dashboards.report import build_report

    _short_run(tmp_path)
    out = build_report([_only_record(tmp_path).path], tmp_path / "report")
    html = out.read_text()
    assert "Attention entropy" in html or "attention entropy" in html.lower()
    assert any(p.suffix == ".png" for p in out.parent.iterdir())


def test_the_end_of_a_loop_run_prints_what_to_try(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's end prints ``what_to_try`` of its own record (the diagnosis itself is tested on records in
    tests/dashboards/test_remedies.py); a healthy run prints no such lines."""
    import entrotrain.integrations._monitor_session as session  # where the run's end reads what to try

    asked: list[Path] = []

    def fake(run_dir) -> list[str]:
        asked.append(Path(run_dir))
        return ["entrotrain: what to try", "  Attention-entropy collapse: (evidence)"]

    monkeypatch.setattr(session, "what_to_try", fake)
    _short_run(tmp_path / "a")
    out = capsys.readouterr().out
    assert asked == [_only_record(tmp_path / "a").path] and "entrotrain: what to try" in out
    monkeypatch.undo()
    _short_run(tmp_path / "b")  # the real diagnosis of a short healthy run: nothing to try
    assert "what to try" not in capsys.readouterr().out


def test_a_guard_names_the_loops_checkpoint_to_roll_back_to(tmp_path: Path) -> None:
    """``checkpoint_dir=``: the loop saves ``step_N.pt`` every 2 steps; a guard on an observed value that is good up
    to step 3 fires at step 4 and names ``step_2.pt`` (``step_4.pt`` is written after the block)."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    sent: list[str] = []
    guard = EntropyCollapseGuard("watched", threshold=0.5, notify=sent.append)
    monitors = EntropyMonitors(guards=[guard], print_summary=False, checkpoint_dir=folder)
    with monitors.watch(torch.nn.Linear(2, 2)):
        for step in range(6):
            with monitors.step(step):
                monitors.observe(watched=0.9 if step < 4 else 0.1)
            if step % 2 == 0:
                (folder / f"step_{step}.pt").write_bytes(b"")
    (message,) = sent
    assert "(last good: 0.9 at step 3)" in message
    kept = folder / "entrotrain-last-good" / "step_2.pt"  # keep_last_good: a hard link no rotation deletes
    assert message.endswith(f"Newest checkpoint at or before step 3: {kept} (kept by the guard where checkpoint "
                            "rotation cannot delete it).")
    assert kept.read_bytes() == (folder / "step_2.pt").read_bytes()
    assert sorted(p.name for p in kept.parent.iterdir()) == ["step_2.pt"]  # frozen by the firing; others released
    with pytest.raises(EntrotrainError, match="checkpoint_dir"):
        EntropyMonitors(guards=[guard], checkpoint_dir=3)


def test_a_resumed_loop_names_the_checkpoint_it_resumed_from(tmp_path: Path) -> None:
    """``watch(..., resumed_from=CKPT)``: a guard restored with its streak (last good at step 5) that fires before the
    resumed run's first save names the checkpoint the run resumed from, kept from cleanup; without it, nothing."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    resumed = tmp_path / "kept" / "step_4.pt"  # e.g. the pin an earlier firing named, outside checkpoint_dir
    resumed.parent.mkdir()
    resumed.write_bytes(b"weights of step 4")
    saved = {}

    def run(resumed_from: Path | None) -> str:
        sent: list[str] = []
        guard = EntropyCollapseGuard("watched", threshold=0.5, notify=sent.append)
        monitors = EntropyMonitors(guards=[guard], print_summary=False, checkpoint_dir=folder)
        if saved:
            monitors.load_state_dict(saved)
        with monitors.watch(torch.nn.Linear(2, 2), resumed_from=resumed_from):
            for step in range(4 if not saved else 5, 8):
                with monitors.step(step):
                    monitors.observe(watched=0.9 if step < 6 or not saved else 0.1)
                if not saved and step == 5:
                    saved.update(monitors.state_dict())
        return sent[0] if sent else ""

    run(None)  # the first run: good at steps 4-7; its state at step 5 is the checkpoint's
    message = run(resumed)
    assert "(last good: 0.9 at step 5)" in message
    assert message.endswith(f"Newest checkpoint at or before step 5: {resumed}.")
    assert resumed.read_bytes() == b"weights of step 4"
    no_path = run(None)
    assert "(last good: 0.9 at step 5)" in no_path and "Newest checkpoint" not in no_path
    with pytest.raises(EntrotrainError, match="resumed_from"):
        EntropyMonitors(guards=[EntropyCollapseGuard("watched", threshold=0.5)]).watch(torch.nn.Linear(2, 2),
                                                                                          resumed_from=3)
    with pytest.raises(EntrotrainError, match="no such file"):
        EntropyMonitors(guards=[EntropyCollapseGuard("watched", threshold=0.5)]).watch(
            torch.nn.Linear(2, 2), resumed_from=tmp_path / "no" / "step_4.pt")
