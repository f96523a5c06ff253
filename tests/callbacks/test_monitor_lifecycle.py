"""The four monitors' per-fit lifecycle (DESIGN.md §8): state reset at every fit, restored on resume, hooks and modes
removed on every exit path, and training bit-identical with and without them (clean, NaN and reuse paths)."""

from __future__ import annotations

import math
import signal
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from entrotrain.callbacks import (
    AttentionEntropyMonitor,
    PolicyEntropyMonitor,
    RepresentationEntropyMonitor,
    SigmaReparamMonitor,
)
from entrotrain.models import TinyGPT
from entrotrain.regularizers.sigma_reparam import sigma_reparam
from entrotrain.taps import attention_tap
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.recorders import LossRecorder
from tests.helpers.spy_logger import SpyLogger

VOCAB, SEQ, HEADS = 31, 8, 2
ORIGINAL_SDPA = F.scaled_dot_product_attention


class AllLM(L.LightningModule):
    """A σReparam TinyGPT under attribute ``name`` whose training_step also returns what PolicyEntropyMonitor reads
    (per-token entropy and log-probs of its own predictions, computed without gradient from the same logits)."""

    def __init__(self, name: str = "net", lr: float = 1e-2, fail: str | None = None, fail_at: int = 1) -> None:
        super().__init__()
        self.attr = name
        setattr(self, name, TinyGPT(vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=HEADS, n_embd=16))
        sigma_reparam(self.gpt, exclude=("lm_head",))
        self.lr, self.fail, self.fail_at = lr, fail, fail_at

    @property
    def gpt(self) -> TinyGPT:
        return getattr(self, self.attr)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.gpt(idx)

    def training_step(self, batch, batch_idx):
        (idx,) = batch
        if self.fail is not None and self.global_step >= self.fail_at:
            if self.fail == "step":
                raise RuntimeError("boom in training_step")
            if self.fail == "interrupt":
                raise KeyboardInterrupt
            if self.fail == "forward":  # a raw torch error from inside a module's forward: the taps' stacks are open
                self.gpt.blocks[0].attn(torch.zeros(2, 3, 5))
        logits = self(idx[:, :-1])
        target = idx[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1))
        with torch.no_grad():
            logp = logits.float().log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            token_logp = logp.gather(-1, target[..., None])[..., 0]
            seq_logp = token_logp.mean(1)
        return {
            "loss": loss,
            "token_entropy": entropy,
            "logprobs": token_logp,
            "advantages": seq_logp - seq_logp.mean(),
            "response_mask": torch.ones_like(target, dtype=torch.bool),
            "rewards": seq_logp.exp(),
        }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def loader(n: int = 48, batch_size: int = 4) -> torch.utils.data.DataLoader:
    x = torch.randint(0, VOCAB, (n, SEQ + 1), generator=torch.Generator().manual_seed(0))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=batch_size, shuffle=False)


def monitors() -> list[L.Callback]:
    return [
        AttentionEntropyMonitor(every_n_steps=1, log_media=False, print_summary=False),
        RepresentationEntropyMonitor(
            include=["*.blocks.*.mlp"], measures=["rankme", "matrix_entropy"], every_n_steps=1, log_spectrum=False,
            print_summary=False,
        ),
        SigmaReparamMonitor(every_n_steps=1),
        PolicyEntropyMonitor(every_n_batches=1, log_media=False, print_summary=False),
    ]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor: equal NaNs compare equal (``torch.equal`` says NaN != NaN)."""
    return t.detach().contiguous().view(torch.int32 if t.dtype == torch.float32 else torch.int64)


def same_weights(a: L.LightningModule, b: L.LightningModule) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(bits(sa[k]), bits(sb[k])) for k in sa)


def hooks_left(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]


def assert_clean(model: AllLM, modes_before: int) -> None:
    assert hooks_left(model) == []
    assert F.scaled_dot_product_attention is ORIGINAL_SDPA
    assert torch._C._len_torch_function_stack() == modes_before
    assert attention_tap._ACTIVE_TAPS == []
    fresh = AllLM(model.attr)
    fresh.load_state_dict(model.state_dict())
    model.eval()
    fresh.eval()
    x = next(iter(loader()))[0][:, :-1]
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))  # a plain forward is unaffected


def fit(model, callbacks, logger=False, **kwargs):
    trainer = quiet_trainer(callbacks=callbacks, logger=logger, **kwargs)
    trainer.fit(model, loader())
    return trainer


# ------------------------------------------------------------------------------------------ exit paths


class FailingCallback(L.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= 1:
            raise RuntimeError("boom in another callback")


@pytest.mark.parametrize("path", ["step", "forward", "interrupt", "other_callback"])
def test_hooks_and_modes_removed_on_every_exit_path(path):
    L.seed_everything(0)
    modes_before = torch._C._len_torch_function_stack()
    model = AllLM(fail=None if path == "other_callback" else path, fail_at=1)
    # the failing callback runs first, so every monitor is still armed when it raises
    callbacks = ([FailingCallback()] if path == "other_callback" else []) + monitors()
    handler = signal.getsignal(signal.SIGINT)
    try:
        expected = SystemExit if path == "interrupt" else RuntimeError  # Lightning exits after on_exception
        with pytest.raises(expected):
            fit(model, callbacks, max_steps=3)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after a KeyboardInterrupt
    assert model.global_step == 1
    assert_clean(model, modes_before)


# ------------------------------------------------------------------------------------------ reuse


def test_reused_monitors_start_every_fit_afresh_and_keep_training_bit_identical():
    L.seed_everything(1)
    plain = AllLM("gpt2")
    fit(plain, [], max_steps=2)
    L.seed_everything(0)
    callbacks = monitors()
    attn, repr_, sigma, policy = callbacks
    fit(AllLM("net"), callbacks, max_steps=3)
    spy = SpyLogger()
    L.seed_everything(1)
    second = AllLM("gpt2")  # other module names, as in a notebook that rebuilds the model
    fit(second, callbacks, logger=spy, max_steps=2)
    assert same_weights(plain, second)  # the reused monitors change nothing in training
    # attention: L0, L1 of the second model (not L2, L3 after the first model's sites), layer map logged again
    assert attn.site_names == ["gpt2.blocks.0.attn", "gpt2.blocks.1.attn"]
    assert {k.split("/")[2] for k in attn.last_logged if k.startswith("entropy/attn/L")} == {"L0", "L1"}
    assert {"entropy/attn/layers": {"L0": "gpt2.blocks.0.attn", "L1": "gpt2.blocks.1.attn"}} in spy.hparams
    assert attn.first_summary[0] == 0 and attn._history_steps == [0, 1]
    # representation: the tap follows the new model, the history is the second fit's
    assert repr_.tap.model is second
    assert [step for step, _ in repr_.history] == [0, 1]
    assert sorted({k.split("/")[2] for k in repr_.last_logged}) == ["gpt2.blocks.0.mlp", "gpt2.blocks.1.mlp"]
    # σReparam: the second model's layers only
    assert all("gpt2." in k for k in sigma.last_logged if "/sigma" in k or "/qk_norm/H" in k)
    # policy: history and first values of the second fit only
    assert len(policy.history["entropy"]) == 2 and len(policy.history["reward"]) == 2
    assert policy.first_logged["batch"] == 0 and policy.last_logged["batch"] == 1
    assert_clean(second, torch._C._len_torch_function_stack())


# ------------------------------------------------------------------------------------------ resume


def test_resume_restores_what_on_fit_start_would_otherwise_reset(tmp_path):
    L.seed_everything(0)
    model, half = AllLM(), monitors()
    trainer = fit(model, half, max_steps=2)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed = monitors()  # a new process: fresh callbacks, state from the checkpoint
    trainer = quiet_trainer(callbacks=resumed, max_steps=4)
    trainer.fit(AllLM(), loader(), ckpt_path=ckpt)
    assert trainer.global_step == 4
    (a_half, r_half, _, p_half), (a_res, r_res, _, p_res) = half, resumed
    assert a_res.site_names == a_half.site_names == ["net.blocks.0.attn", "net.blocks.1.attn"]
    assert a_res.first_summary == a_half.first_summary and a_res.first_summary[0] == 0  # from the checkpoint
    assert a_res._history_steps == [0, 1, 2, 3]
    assert [s for s, _ in r_res.history] == [0, 1, 2, 3] and r_res.history[:2] == r_half.history
    assert p_res.first_logged == p_half.first_logged and p_res.first_logged["batch"] == 0
    assert p_res.history["entropy"][:2] == p_half.history["entropy"] and len(p_res.history["entropy"]) == 4
    assert p_res.delta_pairs["cov"][:1] == p_half.delta_pairs["cov"]


# ------------------------------------------------------------------------------------------ bit-identical training


def test_training_bit_identical_with_and_without_monitors_when_the_model_turns_nan():
    runs = []
    for callbacks in ([], monitors()):
        L.seed_everything(0)
        model, losses = AllLM(lr=1e4), LossRecorder()  # lr = 1e4: finite at step 0, NaN a few steps later
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the NaN run warns (once per monitor)
            fit(model, [losses, *callbacks], max_steps=4)
        runs.append((model, losses.losses))
    (m0, l0), (m1, l1) = runs
    assert math.isfinite(float(l0[0])) and not math.isfinite(float(l0[-1]))  # it did turn NaN
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(l0, l1)) and len(l0) == len(l1) == 4
    assert same_weights(m0, m1)




def test_validation_probe_hooks_removed_when_validation_step_raises():
    from tests.callbacks.repr_ddp_run import ReprNet
    from tests.callbacks.repr_ddp_run import loader as repr_loader

    class FailsInValidation(ReprNet):
        def validation_step(self, batch, batch_idx):
            if batch_idx == 1:  # the probe set's second batch: the tap is armed
                raise RuntimeError("boom in validation_step")
            return super().validation_step(batch, batch_idx)

    L.seed_everything(0)
    model = FailsInValidation()
    monitor = RepresentationEntropyMonitor(include=["encoder"], stage="validation", probe_batches=3, log_spectrum=False)
    trainer = quiet_trainer(callbacks=[monitor], max_steps=2, num_sanity_val_steps=0, val_check_interval=1)
    with pytest.raises(RuntimeError, match="validation_step"):
        trainer.fit(model, repr_loader(), repr_loader(n=24, seed=1))
    assert hooks_left(model) == [] and not monitor.tap.armed and not monitor._probing
