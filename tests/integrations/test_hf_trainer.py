"""EntropyTrainerCallback under transformers.Trainer: same keys and values as the Lightning monitors, training
unchanged, taps armed only on logging steps (all micro-batches), released on every exit, guard actions, resume."""

from __future__ import annotations

import json

import copy
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lightning.pytorch as pl  # noqa: E402
from transformers import GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from entrotrain.callbacks.attention_monitor import AttentionEntropyMonitor  # noqa: E402
from entrotrain.callbacks.collapse_guard import EntropyCollapseGuard  # noqa: E402
from entrotrain.callbacks.policy_monitor import PolicyEntropyMonitor  # noqa: E402
from entrotrain.callbacks.representation_monitor import RepresentationEntropyMonitor  # noqa: E402
from entrotrain.callbacks.sigma_reparam_monitor import SigmaReparamMonitor  # noqa: E402
from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations.transformers import STATE_KEY, EntropyTrainerCallback  # noqa: E402
from tests.helpers.fake_wandb_run import FakeRun  # noqa: E402
from tests.helpers.tiny_hf_lms import lm_rows, tiny_gpt2_lm  # noqa: E402

# One intra-op thread: the tiny GPT-2s train several times faster than on the suite's two threads on a loaded
# machine; each comparison in this module is between runs in this process, on the same thread count.
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, T, ROWS = 48, 12, 16


def _model(seed: int = 0) -> GPT2LMHeadModel:
    """A tiny GPT-2 from a config (random weights, no download), without dropout so runs are comparable."""
    return tiny_gpt2_lm(VOCAB, T, seed)


def _data(rows: int = ROWS, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    return lm_rows(rows, VOCAB, T, seed)


def _trainer(tmp_path: Path, model: GPT2LMHeadModel, data=None, callbacks=None, **overrides) -> Trainer:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        logging_steps=1,
        learning_rate=1e-2,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return Trainer(
        model=model, args=TrainingArguments(**kwargs), train_dataset=data if data is not None else _data(), callbacks=callbacks
    )


def _entro_rows(trainer: Trainer, key: str) -> dict[int, float]:
    return {row["step"]: row[key] for row in trainer.state.log_history if key in row}


def _leftovers(model: torch.nn.Module) -> list[str]:
    """What an armed tap leaves on a model: forward hooks, a switched attention implementation, a torch function mode."""
    out = [name for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if model.config._attn_implementation.startswith("entrotrain_"):
        out.append(f"attn_implementation={model.config._attn_implementation}")
    if torch._C._len_torch_function_stack():
        out.append("torch function mode")
    return out


# ------------------------------------------------------------------ same statistic, same key as Lightning
class _LitWrapper(pl.LightningModule):
    def __init__(self, model: GPT2LMHeadModel) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _lightning_metrics(model: torch.nn.Module, data, monitors) -> dict[str, float]:
    """What the Lightning monitors log for one step on ``data`` (one batch), module names without ``model.``."""
    batch = {k: torch.stack([r[k] for r in data]) for k in ("input_ids", "labels")}
    pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=monitors, accelerator="cpu",
    ).fit(_LitWrapper(model), train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    out: dict[str, float] = {}
    for m in monitors:  # Lightning's module names carry the wrapper's "model." prefix; the HF model is the root
        out.update({k.replace("/model.", "/"): v for k, v in m.last_logged.items()})
    return out


def _hf_metrics(tmp_path: Path, model: torch.nn.Module, data, monitors) -> dict[str, float]:
    trainer = _trainer(tmp_path, model, data, max_steps=1, per_device_train_batch_size=len(data), learning_rate=0.0)
    EntropyTrainerCallback(monitors).attach(trainer)
    trainer.train()
    return {k: v for k, v in trainer.state.log_history[0].items() if k.startswith(("entropy/", "sigma_reparam/"))}


def _assert_same(hf: dict[str, float], lit: dict[str, float]) -> None:
    assert set(hf) == set(lit)
    for key, value in lit.items():
        assert hf[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_same_keys_and_values_as_lightning(tmp_path: Path) -> None:
    """One step on the same weights and the same 8 rows (lr = 0: the weights after the step are the same too)."""
    data = _data(rows=8)

    def monitors(layers: str):
        return [
            AttentionEntropyMonitor(every_n_steps=1, max_rows=None, max_queries=None, log_media=False, print_summary=False),
            RepresentationEntropyMonitor(
                include=[layers], measures=("rankme", "effective_rank", "matrix_entropy"),
                every_n_steps=1, max_tokens=None, log_spectrum=False, print_summary=False,
            ),
            SigmaReparamMonitor(every_n_steps=1),
        ]

    lit = _lightning_metrics(copy.deepcopy(_model()), data, monitors("model.transformer.h.?"))
    hf = _hf_metrics(tmp_path, _model(), data, monitors("transformer.h.?"))
    assert "entropy/attn_norm/L1/H1" in hf and "entropy/repr/transformer.h.1/rankme" in hf
    assert "sigma_reparam/qk_norm/max" in hf  # GPT-2's c_attn (Conv1D): its q and k blocks are measured
    _assert_same(hf, lit)


def test_same_sigma_reparam_and_gqa_attention_keys_as_lightning(tmp_path: Path) -> None:
    """A tiny Llama (grouped-query attention) converted with sigma_reparam: σ, γ and attention keys agree."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from entrotrain.regularizers.sigma_reparam import sigma_reparam

    def model() -> LlamaForCausalLM:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=T, bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        return sigma_reparam(LlamaForCausalLM(config), include="**.*_proj")

    def monitors():
        return [
            AttentionEntropyMonitor(every_n_steps=1, max_rows=None, max_queries=None, log_media=False, print_summary=False),
            SigmaReparamMonitor(every_n_steps=1),
        ]

    data = _data(rows=4)
    lit = _lightning_metrics(model(), data, monitors())
    hf = _hf_metrics(tmp_path, model(), data, monitors())
    assert "sigma_reparam/model.layers.0.self_attn.q_proj/gamma" in hf and "entropy/attn_norm/L0/H3" in hf
    _assert_same(hf, lit)


# ------------------------------------------------------------------ monitoring never changes training
def test_training_bit_identical_with_and_without_callback(tmp_path: Path) -> None:
    def run(with_callback: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = _model()
        trainer = _trainer(tmp_path / str(with_callback), model, gradient_accumulation_steps=2, per_device_train_batch_size=2)
        if with_callback:
            EntropyTrainerCallback(
                [AttentionEntropyMonitor(log_media=False), RepresentationEntropyMonitor(include=["transformer.h.?"])],
                guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.01)],
            ).attach(trainer)
        trainer.train()
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        if with_callback:
            assert len(_entro_rows(trainer, "entropy/attn_norm/min")) == 4  # it did capture, at every step
        return losses, {k: v.clone() for k, v in model.state_dict().items()}

    loss_a, weights_a = run(False)
    loss_b, weights_b = run(True)
    assert loss_a == loss_b
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


# ------------------------------------------------------------------ when it captures
def test_arms_on_logging_steps_only_and_sums_micro_batches(tmp_path: Path) -> None:
    monitor = RepresentationEntropyMonitor(include=["transformer.h.0"], measures=("rankme",), max_tokens=None)
    armed_at: list[int] = []
    trainer = _trainer(
        tmp_path, _model(), max_steps=7, logging_steps=3, logging_first_step=True, gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    cb = EntropyTrainerCallback([monitor]).attach(trainer)
    original = cb.drivers[0].arm
    cb.drivers[0].arm = lambda: (armed_at.append(trainer.state.global_step + 1), original())[1]
    trainer.train()
    assert armed_at == [1, 3, 6]
    counts = _entro_rows(trainer, "entropy/repr/transformer.h.0/n_streamed")
    assert set(counts) == {1, 3, 6}
    assert all(n == 2 * 2 * T for n in counts.values())  # both micro-batches: accumulation × batch × tokens
    assert not _leftovers(trainer.model)


def test_nothing_captured_with_logging_strategy_no(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, _model(), logging_strategy="no")
    cb = EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False)]).attach(trainer)
    trainer.train()
    assert cb.monitors[0].first_summary is None and not cb.last_metrics


# ------------------------------------------------------------------ lifecycle
def test_taps_released_at_train_end_and_on_exception(tmp_path: Path) -> None:
    model = _model()
    trainer = _trainer(tmp_path, model, max_steps=3)
    cb = EntropyTrainerCallback(
        [AttentionEntropyMonitor(log_media=False), RepresentationEntropyMonitor(include=["transformer.h.?"])]
    ).attach(trainer)
    calls = {"n": 0}

    def boom(module, args):
        calls["n"] += 1
        if calls["n"] == 2 and cb.drivers[0].monitor.tap.armed:
            assert _leftovers(model)  # armed inside a logging step
            raise RuntimeError("boom in forward")

    handle = model.transformer.h[1].mlp.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    handle.remove()
    assert not _leftovers(model)
    trainer.train()  # and a normal run ends clean
    assert not _leftovers(model)


# ------------------------------------------------------------------ guard actions
def test_guard_stops_training(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, _model(), max_steps=10, logging_steps=2)
    # always "collapsed", judged from the first observation
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, action="stop", arm_on_good=False)
    EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False)], guards=[guard]).attach(trainer)
    with pytest.warns(UserWarning, match="Stopping training"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert guard.times_fired == 1
    assert _entro_rows(trainer, "entropy/attn_norm/min/alert") == {2: 1.0}


def test_guard_reduces_lr_once_per_episode_and_watches_any_logged_key(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, _model(), max_steps=4, lr_scheduler_type="constant")
    guard = EntropyCollapseGuard(
        "loss", threshold=1e6, mode="max", action="reduce_lr", lr_factor=0.5, arm_on_good=False
    )
    guard.threshold = -1.0  # every loss is "above": bad at every log
    EntropyTrainerCallback(guards=[guard]).attach(trainer)
    with pytest.warns(UserWarning, match="multiplied by 0.5"):
        trainer.train()
    assert guard.lr_reductions == 1
    assert trainer.lr_scheduler.base_lrs == [pytest.approx(0.5e-2)] * len(trainer.lr_scheduler.base_lrs)
    lrs = [row["learning_rate"] for row in trainer.state.log_history if "learning_rate" in row]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(0.5e-2)


# ------------------------------------------------------------------ resume through Trainer's checkpoints
@pytest.mark.parametrize(
    ("save", "checkpoint", "steps"),
    [({"save_strategy": "steps", "save_steps": 2}, 2, 4), ({"save_strategy": "epoch"}, 4, 8)],  # 4 steps per epoch
)
def test_resume_restores_monitor_and_guard_state(tmp_path: Path, save: dict, checkpoint: int, steps: int) -> None:
    def callback() -> EntropyTrainerCallback:
        return EntropyTrainerCallback(
            [AttentionEntropyMonitor(log_media=False)],
            # bad from the first observation (arm_on_good=False judges it), never fires
            guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, patience=100, arm_on_good=False)],
        )

    full = _trainer(tmp_path, _model(), max_steps=steps, **save)
    cb_full = callback().attach(full)
    full.train()
    assert STATE_KEY in full.state.stateful_callbacks

    resumed = _trainer(tmp_path, _model(seed=5), max_steps=steps, **save)
    cb_resumed = callback().attach(resumed)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / f"checkpoint-{checkpoint}"))

    assert cb_full.guards[0].bad_streak == steps
    assert cb_resumed.guards[0].bad_streak == steps  # the checkpoint's streak + the steps after the resume
    assert cb_resumed.monitors[0].first_summary[0] == cb_full.monitors[0].first_summary[0] == 1
    assert list(cb_resumed.monitors[0]._history_steps) == list(range(1, steps + 1))


def test_a_learning_rate_changed_for_the_resume_is_said_to_be_ignored(tmp_path: Path) -> None:
    """Trainer restores the checkpoint's scheduler on resume_from_checkpoint: its base rate overrides the configured
    learning_rate. The callback says so (and changes nothing: the resumed rates are Trainer's own)."""
    full = _trainer(tmp_path, _model(), max_steps=4, save_strategy="steps", save_steps=2)
    full.train()
    checkpoint = str(tmp_path / "out" / "checkpoint-2")
    resumed = _trainer(tmp_path, _model(), max_steps=4, learning_rate=1e-3)
    EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False)]).attach(resumed)
    with pytest.warns(UserWarning, match=r"learning_rate=0\.001\), but Trainer restored the checkpoint's scheduler, "
                      r"whose peak learning rate is 0\.01"):
        resumed.train(resume_from_checkpoint=checkpoint)
    assert resumed.lr_scheduler.base_lrs[0] == pytest.approx(1e-2)  # what the warning says: Trainer's behaviour
    same = _trainer(tmp_path, _model(), max_steps=4)
    EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False)]).attach(same)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message=r"(?!EntropyTrainerCallback: resumed)")
        same.train(resume_from_checkpoint=checkpoint)  # the same rate: nothing to say


# ------------------------------------------------------------------ errors and imports
def test_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(EntrotrainError, match=r"monitors\[0\]\) must be one of"):
        EntropyTrainerCallback([PolicyEntropyMonitor()])
    with pytest.raises(EntrotrainError, match="stage='train'"):
        EntropyTrainerCallback([RepresentationEntropyMonitor(stage="validation")])
    with pytest.raises(EntrotrainError, match="drop 'dsmi'"):
        EntropyTrainerCallback([RepresentationEntropyMonitor(measures=("dsmi",))])
    with pytest.raises(EntrotrainError, match="EntropyCollapseGuard"):
        EntropyTrainerCallback(guards=[AttentionEntropyMonitor()])
    with pytest.raises(EntrotrainError, match="share a configuration"):
        EntropyTrainerCallback([AttentionEntropyMonitor(), AttentionEntropyMonitor()])
    trainer = _trainer(tmp_path, _model(), logging_strategy="epoch")
    EntropyTrainerCallback([AttentionEntropyMonitor()]).attach(trainer)
    with pytest.raises(EntrotrainError, match="logging_strategy='steps'"):
        trainer.train()


def test_attach_puts_keys_before_the_report_to_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trainer runs its report_to integrations before callbacks=[...]: attach() puts entrotrain ahead of them."""
    from transformers.integrations import WandbCallback

    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    seen: list[set[str]] = []
    monkeypatch.setattr(WandbCallback, "on_log", lambda self, args, state, control, logs=None, **kw: seen.append(set(logs)))

    cb = EntropyTrainerCallback([AttentionEntropyMonitor()])
    trainer = _trainer(tmp_path / "a", _model(), max_steps=1, report_to=["wandb"], callbacks=[cb])
    with pytest.warns(UserWarning, match=r"attach\(trainer\)"):
        trainer.train()
    assert "loss" in seen[0] and "entropy/attn_norm/min" not in seen[0]
    assert "entropy/attn_norm/min" in trainer.state.log_history[0]  # the history row still gets them

    seen.clear()
    trainer = _trainer(tmp_path / "b", _model(), max_steps=1, report_to=["wandb"])
    cb = EntropyTrainerCallback([AttentionEntropyMonitor()]).attach(trainer)
    cb.attach(trainer)  # idempotent
    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("EntropyTrainerCallback") == names.index("DefaultFlowCallback") + 1 < names.index("WandbCallback")
    assert names.count("EntropyTrainerCallback") == 1
    trainer.train()
    assert "entropy/attn_norm/min" in seen[0] and "entropy/attn/L1/H1" in seen[0]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_import_entrotrain_does_not_import_transformers() -> None:
    proc = _python(
        """
        import sys, entrotrain, entrotrain.integrations
        bad = sorted(m for m in ("transformers", "trl", "accelerate") if m in sys.modules)
        assert not bad, bad
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_missing_or_old_transformers_is_a_clear_error() -> None:
    proc = _python(
        """
        import lightning_utilities.core.imports as imports
        real = imports.RequirementCache
        class TooNew(real):
            def __init__(self, requirement=None, *args, **kwargs):
                super().__init__(requirement.replace("transformers>=4.48", "transformers>=999"), *args, **kwargs)
        imports.RequirementCache = TooNew
        from entrotrain.errors import EntrotrainError
        try:
            import entrotrain.integrations.transformers
        except EntrotrainError as e:
            print(e)
        else:
            raise SystemExit("no error")
        """
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "transformers>=4.48" in proc.stdout and "pip install 'entrotrain[hf]'" in proc.stdout


# ------------------------------------------------------------------ media, vanishing statistics, stale keys
def test_media_and_alerts_go_to_the_active_wandb_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wandb = pytest.importorskip("wandb")
    run = FakeRun()
    monkeypatch.setattr(wandb, "run", run)
    trainer = _trainer(tmp_path, _model(), max_steps=4, logging_steps=2)
    EntropyTrainerCallback(
        [AttentionEntropyMonitor(), RepresentationEntropyMonitor(include=["transformer.h.0"], measures=("rankme",))],
        guards=[EntropyCollapseGuard("entropy/attn_norm/min", threshold=1.5, action="alert", arm_on_good=False)],
    ).attach(trainer)
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 2"):
        trainer.train()
    assert [row["train/global_step"] for row in run.logged] == [2, 4]
    assert {"train/entropy/attn_norm/hist", "train/entropy/repr/transformer.h.0/spectrum"} <= set(run.logged[0])
    assert len(run.alerts) == 1 and "entropy/attn_norm/min" in run.alerts[0]["title"]
    defined = dict(run.defined)  # keyed and stepped as WandbCallback logs: train/..., train/global_step
    assert defined["train/entropy/*"] == {"summary": "min,last", "step_metric": "train/global_step", "step_sync": True}
    assert defined["train/entropy/attn/collapse_frac"]["summary"] == "max,last"

    run.logged.clear()
    trainer = _trainer(tmp_path / "off", _model(), max_steps=2, logging_steps=2)
    EntropyTrainerCallback([AttentionEntropyMonitor()], log_media=False).attach(trainer)
    trainer.train()
    assert run.logged == []


def test_a_statistic_that_disappears_is_nan_to_the_guard_and_absent_from_logs(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, _model(), max_steps=6)
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.0, action="stop")  # finite values are fine
    cb = EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False)], guards=[guard]).attach(trainer)
    compute = cb.drivers[0].compute
    cb.drivers[0].compute = lambda step, *a: compute(step, *a) if step == 1 else {}  # the statistic vanishes
    with pytest.warns(UserWarning, match="is nan"):
        trainer.train()
    assert trainer.state.global_step == 2
    assert list(_entro_rows(trainer, "entropy/attn_norm/min")) == [1]  # NaN never reaches the logs
    assert _entro_rows(trainer, "entropy/attn_norm/min/alert") == {2: 1.0}


def test_a_key_that_stops_being_published_goes_stale(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, _model(), max_steps=10)
    guard = EntropyCollapseGuard("entropy/attn_norm/min", threshold=0.0, action="stop", stale_after=2)
    cb = EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False)], guards=[guard]).attach(trainer)
    cb._logging_step = lambda args, state, step: step == 1  # the monitor publishes once, then falls silent
    with pytest.warns(UserWarning, match="not published for 3 steps"):
        trainer.train()
    assert trainer.state.global_step == 4  # stale after 2 silent steps: judged at the end of step 4
    assert guard.times_fired == 1


@pytest.mark.parametrize("limit", [None, 1])
def test_a_firing_names_the_trainer_checkpoint_to_roll_back_to(tmp_path: Path, limit: int | None) -> None:
    """The learning rate decays linearly (1e-2 over 6 steps; Trainer logs at step s the rate step s used): a guard on
    it is good up to step 4 (0.005) and fires at step 5; with a checkpoint every 2 steps its message names
    ``checkpoint-4``, the newest from the last good step or before (``checkpoint-6`` does not exist yet), as kept by
    the guard (``keep_last_good``): with ``save_total_limit=1`` Trainer deletes ``checkpoint-4`` when it saves
    ``checkpoint-6``, and the kept one is still there, whole, to resume from."""
    trainer = _trainer(tmp_path, _model(), max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=limit)
    guard = EntropyCollapseGuard("learning_rate", threshold=0.004, action="warn")
    EntropyTrainerCallback(guards=[guard]).attach(trainer)
    with pytest.warns(UserWarning, match="EntropyCollapseGuard at step 5") as record:
        trainer.train()
    (message,) = [str(w.message) for w in record if "EntropyCollapseGuard at" in str(w.message)]
    assert "(last good: 0.005 at step 4)" in message
    out, kept = tmp_path / "out", tmp_path / "out" / "entrotrain-last-good" / "checkpoint-4"
    assert message.endswith(f"Newest checkpoint at or before step 4: {kept} (kept by the guard where checkpoint "
                            "rotation cannot delete it).")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == (["checkpoint-6"] if limit else
                                                                ["checkpoint-2", "checkpoint-4", "checkpoint-6"])
    assert sorted(p.name for p in kept.parent.iterdir()) == ["checkpoint-4"]  # the others were released
    assert json.loads((kept / "trainer_state.json").read_text())["global_step"] == 4
    assert {p.name for p in kept.iterdir()} == {p.name for p in (out / "checkpoint-6").iterdir()}
    resumed = _trainer(tmp_path, _model(), max_steps=6)
    resumed.train(resume_from_checkpoint=str(kept))  # Trainer resumes from the kept folder like from its own
    assert resumed.state.global_step == 6


def test_logging_first_step_is_a_logging_step_whatever_the_strategy(tmp_path: Path) -> None:
    """Trainer logs step 1 with ``logging_first_step`` also under ``logging_strategy="no"``
    (``DefaultFlowCallback.on_step_end``): the monitors capture it, so that row carries their keys."""
    trainer = _trainer(tmp_path, _model(), max_steps=2, logging_strategy="no", logging_first_step=True)
    EntropyTrainerCallback([AttentionEntropyMonitor(log_media=False)]).attach(trainer)
    trainer.train()
    assert list(_entro_rows(trainer, "entropy/attn_norm/min")) == [1]
