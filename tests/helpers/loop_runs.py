"""The same model and batches trained by Lightning and by a hand-written loop under
:class:`~entrotrain.integrations.loop.EntropyMonitors`, for the tests that compare what they log.

Both runs call the module's own ``training_step`` (the loop outside any Trainer), so the forward, the loss and the
module names are identical; the modules below call their root ``forward`` with keyword arguments, which is where
the loop's router and prediction monitors read ``attention_mask`` / ``labels``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from entrotrain.integrations.loop import EntropyMonitors
from tests.helpers.gpt_module import SEQ, VOCAB, GPTModule
from tests.helpers.lightning_models import quiet_trainer
from tests.helpers.router_models import ToyMoE
from tests.helpers.spy_logger import SpyLogger


class LogitsGPT(GPTModule):
    """:class:`GPTModule` whose root ``forward(input_ids, labels=None)`` returns the logits (``labels`` is only there
    for the monitors to read) and whose ``training_step`` returns ``{"loss", "logits", "labels"}`` (aligned labels:
    the target of position ``t`` is ``labels[t]``), what ``PredictionEntropyMonitor(source="output")`` reads. A batch
    is ``(idx,)`` (inputs ``idx[:, :-1]``, labels ``idx[:, 1:]``) or ``(inputs, labels)``: Lightning's ``source="head"``
    reads the labels from such a pair."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids)

    def training_step(self, batch, batch_idx):
        x, y = batch if len(batch) == 2 else (batch[0][:, :-1], batch[0][:, 1:])
        logits = self(input_ids=x, labels=y)
        loss = F.cross_entropy(logits.reshape(-1, self.model.vocab_size), y.reshape(-1))
        return {"loss": loss, "logits": logits, "labels": y}


class MaskedToyMoE(ToyMoE):
    """:class:`ToyMoE` whose ``training_step`` calls the root ``forward(x, attention_mask=...)``."""

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.blocks(x)

    def training_step(self, batch, batch_idx):
        out = self(x=batch["x"], attention_mask=batch["attention_mask"])
        return F.mse_loss(out, batch["y"])


class HFLit(L.LightningModule):
    """A LightningModule around an HF causal LM: ``training_step(batch)`` calls the root ``forward(**batch)`` (the
    HF model with ``input_ids``, ``attention_mask``, ``labels``) and returns its loss; SGD with ``lr``."""

    def __init__(self, model: nn.Module, lr: float = 0.05) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def forward(self, **kwargs: Any) -> Any:
        return self.model(**kwargs)

    def training_step(self, batch, batch_idx):
        return self(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def token_batches(n: int, rows: int = 4, seed: int = 0, vocab: int = VOCAB, seq: int = SEQ) -> list[tuple[torch.Tensor]]:
    """``n`` batches ``(idx,)`` of ``rows`` random token sequences of ``seq + 1`` tokens (inputs and shifted targets)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, vocab, (rows, seq + 1), generator=g),) for _ in range(n)]


def train_steps(monitors: EntropyMonitors, module: Any, steps: int, start: int = 0, saved: dict | None = None,
                log: Any = None) -> None:
    """``module.training_step`` on :func:`token_batches` at loop steps ``start .. steps - 1``, each inside
    ``monitors.step``; ``log({"train/loss": ...}, step=step)`` after each step when given (a user's own logging),
    and ``saved[step]`` = the monitors' state after it (a checkpoint)."""
    opt = module.configure_optimizers()
    batches = token_batches(steps)
    with monitors.watch(module, opt):
        for step in range(start, steps):
            with monitors.step(step):
                loss = module.training_step(batches[step], step)
                loss.backward()
                opt.step()
                opt.zero_grad()
            if log is not None:
                log({"train/loss": loss.item()}, step=step)
            if saved is not None:
                saved[step] = monitors.state_dict()


def _loss(output: Any) -> torch.Tensor:
    return output["loss"] if isinstance(output, dict) else output


def fit_lightning(
    module: L.LightningModule, batches: Sequence[Any], monitors: list, steps: int, accumulate: int = 1
) -> dict[int, dict[str, float]]:
    """``Trainer.fit`` of ``module`` for ``steps`` optimizer steps on ``batches`` (in order, ``accumulate``
    micro-batches per step) with ``monitors``; what the loggers received, merged by step."""
    spy = SpyLogger()
    quiet_trainer(
        max_steps=steps, logger=spy, log_every_n_steps=1, callbacks=monitors, accumulate_grad_batches=accumulate
    ).fit(module, torch.utils.data.DataLoader(list(batches), batch_size=None))
    out: dict[int, dict[str, float]] = {}
    for step, row in spy.rows:
        out.setdefault(step, {}).update(row)
    return out


def run_loop(
    module: L.LightningModule, batches: Sequence[Any], monitors: EntropyMonitors | None, steps: int,
    accumulate: int = 1, optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict[int, dict[str, float]], list[torch.Tensor]]:
    """The loop of ``loop.py``'s docstring: ``steps`` optimizer steps of ``module.training_step`` on ``batches``
    (``accumulate`` micro-batches each, the loss divided by ``accumulate`` as Lightning does) inside
    ``monitors.step(step)`` (no monitors: the bare loop). Returns the non-empty ``monitors.logs`` by step and the
    micro-batch losses (detached)."""
    opt = optimizer if optimizer is not None else module.configure_optimizers()
    logs: dict[int, dict[str, float]] = {}
    losses: list[torch.Tensor] = []

    def one_step(step: int) -> None:
        for j in range(accumulate):
            i = step * accumulate + j
            loss = _loss(module.training_step(batches[i], i))
            losses.append(loss.detach().clone())
            (loss / accumulate if accumulate > 1 else loss).backward()
        opt.step()
        opt.zero_grad()

    if monitors is None:
        for step in range(steps):
            one_step(step)
        return logs, losses
    with monitors.watch(module, opt):
        for step in range(steps):
            with monitors.step(step):
                one_step(step)
            if monitors.logs:
                logs[step] = dict(monitors.logs)
    return logs, losses


def leftovers(model: nn.Module) -> list[str]:
    """What an armed tap leaves on a model: module hooks (forward, pre-forward) and a torch function mode."""
    out = [name or "<root>" for name, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    if torch._C._len_torch_function_stack():
        out.append("torch function mode")
    return out


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Bit for bit the same parameters and buffers."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
