"""Roll back and cure under transformers.Trainer: EntropyTrainerCallback(resume_changes=True) makes a
resume_from_checkpoint whose run changed fork as the Lightning fork does (configured values win, moments kept when
they fit, the configured schedule at the saved step, a new record naming its parent); unchanged or off: Trainer's."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler  # noqa: E402

from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.integrations.hf_resume import ARGS_KEY  # noqa: E402
from entrotrain.integrations.transformers import STATE_KEY, EntropyTrainerCallback  # noqa: E402
from entrotrain.regularizers.sigma_reparam import SigmaReparamLinear, sigma_reparam  # noqa: E402
from tests.helpers.tiny_hf_lms import lm_rows, tiny_gpt2_lm  # noqa: E402

VOCAB, T = 48, 12
PARENT = dict(learning_rate=1e-2, warmup_steps=2, max_steps=4)


def _trainer(root: Path, model: torch.nn.Module, **overrides) -> Trainer:
    kwargs = dict(
        output_dir=str(root / "out"), per_device_train_batch_size=4, logging_steps=1, use_cpu=True,
        report_to="none", save_strategy="steps", save_steps=2, disable_tqdm=True, seed=0, **PARENT,
    )
    kwargs.update(overrides)
    return Trainer(model=model, args=TrainingArguments(**kwargs), train_dataset=lm_rows(24, VOCAB, T, 1))


class _AtBegin(TrainerCallback):
    """What the optimizer holds when training (re)starts: after Trainer restored the checkpoint's states."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs) -> None:
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        self.exp_avg = [s["exp_avg"].clone() for s in optimizer.state.values() if "exp_avg" in s]
        self.base_lrs = list(lr_scheduler.base_lrs)


def _parent(root: Path, callback: bool = True) -> Path:
    """The run to roll back: 4 steps at lr 1e-2 (warmup 2), a checkpoint every 2 steps, recorded under root/runs."""
    trainer = _trainer(root, tiny_gpt2_lm(VOCAB, T, 0))
    if callback:
        EntropyTrainerCallback(record=str(root / "runs")).attach(trainer)
    trainer.train()
    return root / "out" / "checkpoint-2"


def _records(root: Path) -> list[Path]:
    return sorted(p.parent for p in (root / "runs").glob("**/meta.json"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _resume(root: Path, checkpoint: Path, model=None, on: bool = True, **args) -> tuple[Trainer, EntropyTrainerCallback, _AtBegin]:
    args.setdefault("save_strategy", "no")
    trainer = _trainer(root, model if model is not None else tiny_gpt2_lm(VOCAB, T, 5), **args)
    cb = EntropyTrainerCallback(record=str(root / "runs"), resume_changes=on).attach(trainer)
    spy = _AtBegin()
    trainer.add_callback(spy)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer, cb, spy


def _configured_lr(step: int, **args) -> float:
    """The rate ``get_scheduler`` gives a fresh run with the configured arguments for optimizer step ``step`` + 1
    (its scheduler stepped ``step`` times)."""
    a = {**PARENT, **args}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=a["learning_rate"])
    sched = get_scheduler("linear", optimizer=opt, num_warmup_steps=a["warmup_steps"], num_training_steps=a["max_steps"])
    for _ in range(step):
        opt.step()
        sched.step()
    return sched.get_last_lr()[0]


def _logged_lr(trainer: Trainer, step: int) -> float:
    return next(r["learning_rate"] for r in trainer.state.log_history if r.get("step") == step and "learning_rate" in r)


# ------------------------------------------------------------------ (a) changed hyperparameters win
def test_a_lower_rate_a_longer_warmup_and_new_betas_win_and_moments_are_kept(tmp_path: Path, capsys) -> None:
    checkpoint = _parent(tmp_path)
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    new = dict(learning_rate=1e-3, warmup_steps=4, adam_beta2=0.99, weight_decay=0.1)
    trainer, cb, spy = _resume(tmp_path, checkpoint, **new)
    assert spy.base_lrs == [1e-3, 1e-3]
    assert [g["betas"] for g in spy.groups] == [(0.9, 0.99)] * 2
    assert [g["weight_decay"] for g in spy.groups] == [0.1, 0.0]  # Trainer's decay / no-decay groups
    expected = _configured_lr(2, **new)  # warmup 4, step 3: 2/4 of 1e-3 (plain Trainer: the saved 1e-2)
    assert expected == pytest.approx(5e-4)
    assert [g["lr"] for g in spy.groups] == pytest.approx([expected] * 2)
    assert _logged_lr(trainer, 3) == pytest.approx(expected)
    assert _logged_lr(trainer, 4) == pytest.approx(_configured_lr(3, **new))
    kept = [s["exp_avg"] for s in saved["state"].values()]
    assert len(spy.exp_avg) == len(kept) and all(torch.equal(a, b) for a, b in zip(spy.exp_avg, kept))
    out = capsys.readouterr().out
    assert "resuming from" in out and "(after 2 optimizer steps)" in out
    for line in ("args.learning_rate: 0.01 → 0.001", "args.warmup_steps: 2 → 4", "args.adam_beta2: 0.999 → 0.99",
                 "args.weight_decay: 0.0 → 0.1"):
        assert line in out
    assert "its moments are the checkpoint's" in out and out.count("resuming from") == 1
    assert cb._fork.plan is not None and trainer.state.global_step == 4


def test_without_the_option_the_checkpoints_rate_wins_and_the_warning_names_the_option(tmp_path: Path) -> None:
    checkpoint = _parent(tmp_path)
    with pytest.warns(UserWarning, match=r"resume_changes=True"):
        trainer, _, spy = _resume(tmp_path, checkpoint, on=False, learning_rate=1e-3)
    assert spy.base_lrs == [1e-2, 1e-2]  # Trainer's own resume: what (a) is about
    assert _logged_lr(trainer, 3) == pytest.approx(1e-2)


def test_without_a_stash_or_record_the_optimizer_state_shows_the_change(tmp_path: Path, capsys) -> None:
    """A parent trained without the callback: nothing saved its arguments; the saved optimizer state still says its
    rate and betas."""
    checkpoint = _parent(tmp_path, callback=False)
    trainer, _, spy = _resume(tmp_path, checkpoint, learning_rate=1e-3, adam_beta1=0.8)
    assert spy.base_lrs == [1e-3, 1e-3] and [g["betas"] for g in spy.groups] == [(0.8, 0.999)] * 2
    assert [g["lr"] for g in spy.groups] == pytest.approx([_configured_lr(2, learning_rate=1e-3)] * 2)
    out = capsys.readouterr().out
    assert "optimizer.lr: 0.01 → 0.001" in out and "optimizer.betas: [0.9, 0.999] → [0.8, 0.999]" in out


# ------------------------------------------------------------------ (b) σReparam applied at the resume
def test_sigma_reparam_at_the_resume_fails_in_plain_trainer(tmp_path: Path) -> None:
    checkpoint = _parent(tmp_path)
    trainer = _trainer(tmp_path, sigma_reparam(tiny_gpt2_lm(VOCAB, T, 5), exclude="lm_head"))
    with pytest.raises(ValueError, match="parameter group"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


def test_sigma_reparam_at_the_resume_forks_and_trains_on(tmp_path: Path, capsys) -> None:
    checkpoint = _parent(tmp_path)
    model = sigma_reparam(tiny_gpt2_lm(VOCAB, T, 5), exclude="lm_head")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SigmaReparamLinear)}
    gammas = {}

    class Gammas(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs) -> None:
            gammas.update({n: m.gamma.detach().clone() for n, m in layers.items()})

    model_gammas = Gammas()
    trainer = _trainer(tmp_path, model, learning_rate=1e-3, save_strategy="no")
    EntropyTrainerCallback(record=str(tmp_path / "runs"), resume_changes=True).attach(trainer)
    spy = _AtBegin()
    trainer.add_callback(spy)
    trainer.add_callback(model_gammas)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert all(not torch.equal(gammas[n], m.gamma.detach()) for n, m in layers.items())  # γ trains on
    assert trainer.state.global_step == 4
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r and r["step"] > 2]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not spy.exp_avg  # a fresh optimizer: the groups grew by a gamma per layer
    assert [g["lr"] for g in spy.groups] == pytest.approx([_configured_lr(2, learning_rate=1e-3)] * 2)
    assert sum(len(g) for g in [trainer.optimizer.param_groups[0]["params"], trainer.optimizer.param_groups[1]["params"]]) \
        == sum(1 for p in model.parameters())
    out = capsys.readouterr().out
    assert f"model.sigma_reparam_layers: 0 → {len(layers)}" in out and "starts afresh" in out


def test_sigma_reparam_weights_load_function_preservingly(tmp_path: Path) -> None:
    """At the first resumed step the σReparam model computes what the checkpoint's plain model computes."""
    checkpoint = _parent(tmp_path)
    from transformers import GPT2LMHeadModel

    plain = GPT2LMHeadModel.from_pretrained(str(checkpoint)).eval()
    model = sigma_reparam(tiny_gpt2_lm(VOCAB, T, 5), exclude="lm_head")
    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
            x = lm_rows(2, VOCAB, T, 9)[0]["input_ids"][None]
            model.eval()
            with torch.no_grad():
                seen["out"] = model(input_ids=x).logits
                seen["ref"] = plain(input_ids=x).logits
            model.train()

    trainer = _trainer(tmp_path, model, max_steps=3, save_strategy="no")
    EntropyTrainerCallback(resume_changes=True, record=str(tmp_path / "runs")).attach(trainer)
    trainer.add_callback(Probe())
    trainer.train(resume_from_checkpoint=str(checkpoint))
    torch.testing.assert_close(seen["out"], seen["ref"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ (c) the run record forks
def test_a_fork_writes_a_new_record_naming_its_parent_which_is_left_byte_for_byte(tmp_path: Path) -> None:
    checkpoint = _parent(tmp_path)
    (parent,) = _records(tmp_path)
    before = _snapshot(parent)
    _resume(tmp_path, checkpoint, learning_rate=1e-3)
    assert _snapshot(parent) == before
    (fork,) = [r for r in _records(tmp_path) if r != parent]
    meta = json.loads((fork / "meta.json").read_text())
    forked = meta["forked_from"]
    assert Path(forked["run_dir"]) == parent.resolve() and forked["step"] == 2
    assert forked["ckpt_path"] == str(checkpoint)
    assert ["args.learning_rate", 0.01, 0.001] in forked["changes"]
    steps = [json.loads(line)["step"] for line in (fork / "metrics.jsonl").read_text().splitlines()]
    assert steps and min(steps) == 3 and meta["status"] == "finished"


def test_without_the_option_the_parents_record_is_continued(tmp_path: Path) -> None:
    """Today's behaviour, kept by default: the resume continues the parent's record (superseding after step 2)."""
    checkpoint = _parent(tmp_path)
    (parent,) = _records(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _resume(tmp_path, checkpoint, on=False, learning_rate=1e-3)
    assert _records(tmp_path) == [parent]
    assert "forked_from" not in json.loads((parent / "meta.json").read_text())


# ------------------------------------------------------------------ unchanged: Trainer's own resume
def _final(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def test_an_unchanged_resume_is_bit_identical_to_trainers_and_continues_the_record(tmp_path: Path, capsys) -> None:
    checkpoint = _parent(tmp_path)
    (parent,) = _records(tmp_path)
    stash = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"][STATE_KEY]
    assert stash[ARGS_KEY]["learning_rate"] == 0.01 and stash[ARGS_KEY]["warmup_steps"] == 2
    plain = _trainer(tmp_path, tiny_gpt2_lm(VOCAB, T, 5), save_strategy="no")
    plain.train(resume_from_checkpoint=str(checkpoint))
    capsys.readouterr()
    trainer, cb, _ = _resume(tmp_path, checkpoint)
    assert cb._fork.plan is None and "resuming from" not in capsys.readouterr().out
    a, b = _final(plain), _final(trainer)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in t.state.log_history if "loss" in r] for t in (plain, trainer)]
    assert losses[0] == losses[1]
    assert _records(tmp_path) == [parent]  # the record continued


def test_a_longer_run_is_an_ordinary_resume(tmp_path: Path, capsys) -> None:
    """max_steps raised (the run extended) moves the linear decay, but is not a change of what is trained."""
    checkpoint = _parent(tmp_path)
    capsys.readouterr()
    trainer, cb, _ = _resume(tmp_path, checkpoint, max_steps=6)
    assert cb._fork.plan is None and trainer.state.global_step == 6
    assert "resuming from" not in capsys.readouterr().out


# ------------------------------------------------------------------ errors
def test_option_errors(tmp_path: Path) -> None:
    with pytest.raises(EntrotrainError, match="resume_changes"):
        EntropyTrainerCallback(record=str(tmp_path), resume_changes=1)
    checkpoint = _parent(tmp_path)
    trainer = _trainer(tmp_path, tiny_gpt2_lm(VOCAB, T, 5), learning_rate=1e-3)
    trainer.add_callback(EntropyTrainerCallback(record=str(tmp_path / "runs"), resume_changes=True))
    with pytest.raises(EntrotrainError, match=r"\.attach\(trainer\)"):
        trainer.train(resume_from_checkpoint=str(checkpoint))


class _RngAtFirstStep(TrainerCallback):
    """torch's CPU random state when the first resumed step begins (after Trainer's rng_state.pth restore)."""

    state: torch.Tensor | None = None

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if self.state is None:
            self.state = torch.get_rng_state()


@pytest.mark.parametrize("seed", [0, 3])
def test_a_new_seed_is_used_and_the_same_seed_restores_the_checkpoints_random_state(tmp_path: Path, seed: int) -> None:
    checkpoint = _parent(tmp_path)
    plain = _trainer(tmp_path, tiny_gpt2_lm(VOCAB, T, 5), seed=seed, save_strategy="no")  # Trainer's own: the checkpoint's rng_state
    reference = _RngAtFirstStep()
    plain.add_callback(reference)
    plain.train(resume_from_checkpoint=str(checkpoint))
    saved = reference.state
    trainer = _trainer(tmp_path, tiny_gpt2_lm(VOCAB, T, 5), seed=seed, save_strategy="no")
    cb = EntropyTrainerCallback(record=str(tmp_path / "runs"), resume_changes=True).attach(trainer)
    spy = _RngAtFirstStep()
    trainer.add_callback(spy)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    assert torch.equal(spy.state, saved) == (seed == 0)
    assert (cb._fork.plan is not None) == (seed != 0)
    if seed:
        assert ("args.seed", 0, 3) in cb._fork.plan.changes
    assert "_load_rng_state" not in vars(trainer) and "_load_optimizer_and_scheduler" not in vars(trainer)


def test_another_optimizer_starts_afresh_at_the_configured_schedule(tmp_path: Path, capsys) -> None:
    checkpoint = _parent(tmp_path)
    trainer, _, spy = _resume(tmp_path, checkpoint, optim="sgd")
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD) and not spy.exp_avg
    assert [g["lr"] for g in spy.groups] == pytest.approx([_configured_lr(2)] * 2)
    out = capsys.readouterr().out
    assert "args.optim: adamw_torch_fused → sgd" in out or "args.optim: adamw_torch → sgd" in out
    assert "the optimizer changed (now SGD): its state (moments) starts afresh" in out


def test_removing_sigma_reparam_at_the_resume_is_refused(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, sigma_reparam(tiny_gpt2_lm(VOCAB, T, 0), exclude="lm_head"), max_steps=2)
    trainer.train()
    resumed = _trainer(tmp_path, tiny_gpt2_lm(VOCAB, T, 5))
    EntropyTrainerCallback(record=str(tmp_path / "runs"), resume_changes=True).attach(resumed)
    with pytest.raises(EntrotrainError, match="σReparam cannot be removed"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_a_checkpoint_without_the_saved_arguments_is_compared_with_its_record(tmp_path: Path, capsys) -> None:
    """A checkpoint written before the arguments went into trainer_state.json: its run record's hparams say them."""
    checkpoint = _parent(tmp_path)
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["stateful_callbacks"][STATE_KEY][ARGS_KEY]
    path.write_text(json.dumps(state))
    capsys.readouterr()
    _, cb, spy = _resume(tmp_path, checkpoint, warmup_steps=4)  # invisible in the optimizer's and scheduler's states
    assert ("args.warmup_steps", 2, 4) in cb._fork.plan.changes
    assert [g["lr"] for g in spy.groups] == pytest.approx([_configured_lr(2, warmup_steps=4)] * 2)
