r"""σReparam statistics and the per-head attention-logit spectral norm, live in a Lightning ``Trainer``.

Zhai et al. (2023), "Stabilizing Transformer Training by Preventing Attention Entropy Collapse": the attention
entropy of a head has a lower bound that decreases exponentially with the spectral norm of its attention-logit
map :math:`W_Q^{h\top} W_K^h`, so that norm is a leading indicator of entropy collapse; σReparam bounds it through
the learned γ of each layer.

Logged keys (``{p}`` = ``prefix``, default ``sigma_reparam/``; ``{name}`` = qualified module name in the
LightningModule):

=================================  ================================================================================
``{p}{name}/sigma``                σ(W) estimate of a :class:`SigmaReparamLinear` / :class:`SigmaReparamConv1D`
                                   (power iteration, raw weight; e.g. ``model.transformer.h.0.attn.c_attn``)
``{p}{name}/gamma``                its γ = σ(Ŵ), the effective spectral norm
``{p}{name}/qk_norm/H{h}``         :math:`\|W_Q^{h\top} W_K^h\|_2` of attention module ``name`` (effective weights Ŵ)
``{p}qk_norm/max``                 maximum of the above over all heads and modules (finite heads only)
``{p}nonfinite``                   statistics above that were NaN/Inf (a weight, σ or γ gone non-finite); 0 when clean
=================================  ================================================================================

Non-finite weights (a diverged model) never crash the monitor: the heads / layers whose weights hold NaN/Inf get NaN,
which goes to ``trainer.callback_metrics`` only (never to a logger), are counted in ``{p}nonfinite`` and warned about
once per fit. Per-fit state is reset in ``setup`` of every ``fit``.

An attention module is any submodule with an int ``n_head`` and a fused ``qkv`` projection (``nn.Linear`` or
σReparam) whose rows are ``[q; k; v]``, each ``n_head`` blocks of ``head_dim`` rows (TinyGPT's
``CausalSelfAttention``), or a GPT-2 style self-attention with an int ``num_heads`` and a fused ``c_attn``
(transformers ``Conv1D`` or σReparam, columns ``[q, k, v]``; cross-attention is skipped). :math:`W_Q^h, W_K^h` are
the ``(head_dim, C)`` row blocks of head ``h``; the softmax scale ``1/sqrt(head_dim)`` and the q/k biases are not
included.

Sharded models (FSDP2 ``fully_shard``, DTensor parameters). The monitor reads weights outside ``forward``, when FSDP2
holds them sharded. Rule: **σ is the layer's ``sigma`` buffer** (written in the last training forward from the full,
all-gathered weight; buffers are never sharded, so it is the same on every rank), and **γ and the weights are
gathered** with ``DTensor.full_tensor()`` one layer at a time (a collective: every rank runs the monitor at the same
steps, in the same module order). So the values equal those of one process training on the union batch. FSDP1
(``FSDPStrategy``, flat parameters) is read with ``FullyShardedDataParallel.summon_full_params`` around the
collection.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from entrotrain._validation import check_int, check_tensor
from entrotrain.callbacks._nonfinite import NonFiniteCounter
from entrotrain.callbacks._lifecycle import PerFitCallback
from entrotrain.callbacks._publish import publish_scalars
from entrotrain.errors import EntrotrainError
from entrotrain.regularizers.sigma_reparam import SigmaReparamLinear, SigmaReparamQKJoint, full_tensor, is_hf_conv1d
from entrotrain.taps.module_names import named_modules

__all__ = ["SigmaReparamMonitor", "qk_spectral_norms"]


def qk_spectral_norms(qkv_weight: Tensor, n_head: int) -> Tensor:
    r"""Per-head spectral norm :math:`\|W_Q^{h\top} W_K^h\|_2` of a fused ``qkv`` weight, shape ``(n_head,)``.

    ``qkv_weight`` is ``(3·n_head·D, C)`` with rows ``[q; k; v]``; :math:`W_Q^h, W_K^h` are its ``(D, C)`` row blocks
    for head ``h``. Computed in float32 (float64 for float64 input) without forming the ``C×C`` product: with
    :math:`W_Q^{h\top} = Q_q R_q` and :math:`W_K^{h\top} = Q_k R_k` (reduced QR), the nonzero singular values of
    :math:`W_Q^{h\top} W_K^h = Q_q R_q R_k^\top Q_k^\top` are those of the ``D×D`` matrix :math:`R_q R_k^\top`.

    Non-finite data: a head whose ``W_Q^h`` or ``W_K^h`` holds NaN/Inf (or whose product overflows) gets NaN; the
    other heads are unaffected. No host sync, no ``LinAlgError``.

    Raises:
        EntrotrainError: ``qkv_weight`` is not a 2-D floating tensor, ``n_head`` not a positive int, or the rows are
            not ``3 · n_head`` blocks.
    """
    check_tensor(qkv_weight, "qkv_weight", floating=True, ndim=2, layout="(3 * n_head * head_dim, in_features)")
    check_int(n_head, "n_head", low=1)
    rows, _ = qkv_weight.shape
    if rows % (3 * n_head):
        raise EntrotrainError(
            f"qkv weight has {rows} rows, not a multiple of 3 · n_head = {3 * n_head}; expected rows [q; k; v]."
        )
    d = rows // (3 * n_head)
    w = qkv_weight.detach().to(torch.promote_types(qkv_weight.dtype, torch.float32))
    q = w[: n_head * d].reshape(n_head, d, -1)  # (H, D, C)
    k = w[n_head * d : 2 * n_head * d].reshape(n_head, d, -1)
    ok = torch.isfinite(q).flatten(1).all(1) & torch.isfinite(k).flatten(1).all(1)  # (H,) heads with finite weights
    q, k = torch.where(torch.isfinite(q), q, 0.0), torch.where(torch.isfinite(k), k, 0.0)
    if d >= w.shape[1]:  # QR would not shrink anything
        product = q.transpose(1, 2) @ k
    else:
        r_q = torch.linalg.qr(q.transpose(1, 2), mode="r")[1]  # (H, D, D)
        r_k = torch.linalg.qr(k.transpose(1, 2), mode="r")[1]
        product = r_q @ r_k.transpose(1, 2)
    ok &= torch.isfinite(product).flatten(1).all(1)  # huge finite weights can overflow the product
    norms = torch.linalg.matrix_norm(torch.where(torch.isfinite(product), product, 0.0), ord=2)
    return torch.where(ok, norms, torch.full_like(norms, float("nan")))


def _effective_matrix(linear: nn.Module) -> Tensor:
    """The full ``(C_out, C_in)`` matrix a fused qkv projection multiplies by (``Ŵ`` for σReparam layers)."""
    if isinstance(linear, SigmaReparamQKJoint):
        return torch.cat([p._as_matrix(p.effective_weight()) for p in (linear.qk, linear.v)], dim=0)
    if isinstance(linear, SigmaReparamLinear):
        return linear._as_matrix(linear.effective_weight())
    weight = full_tensor(linear.weight)  # type: ignore[arg-type]
    return weight.T if is_hf_conv1d(linear) else weight


def _fused_qkv(module: nn.Module) -> tuple[nn.Module, int] | None:
    """``(fused qkv projection, heads)`` of a TinyGPT-style (``qkv``, ``n_head``) or GPT-2 style (``c_attn``,
    ``num_heads``) self-attention module, else ``None``."""
    qkv, heads = getattr(module, "qkv", None), getattr(module, "n_head", None)
    if qkv is None and not getattr(module, "is_cross_attention", False):
        qkv, heads = getattr(module, "c_attn", None), getattr(module, "num_heads", None)
    kinds = (nn.Linear, SigmaReparamLinear, SigmaReparamQKJoint)
    if (isinstance(qkv, kinds) or is_hf_conv1d(qkv)) and isinstance(heads, int) and not isinstance(heads, bool) and heads > 0:
        return qkv, heads  # type: ignore[return-value]
    return None


def _full_params(trainer: Trainer, pl_module: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """FSDP1 (``FullyShardedDataParallel`` as the strategy's root wrapper or inside ``pl_module``): its
    ``summon_full_params`` context (no write-back), so the weights read are the full ones (a collective on every
    rank). Otherwise (plain, DDP, FSDP2) a no-op context."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    except ImportError:  # pragma: no cover
        return contextlib.nullcontext()
    root = getattr(getattr(trainer, "strategy", None), "model", None)
    if isinstance(root, FSDP):
        return FSDP.summon_full_params(root, writeback=False)
    if any(isinstance(m, FSDP) for m in pl_module.modules()):
        return FSDP.summon_full_params(pl_module, writeback=False)
    return contextlib.nullcontext()


class SigmaReparamMonitor(PerFitCallback):
    r"""Logs σ and γ of every :class:`SigmaReparamLinear` and per-head attention-logit norms every ``n`` steps.

    Runs in ``on_train_batch_end`` of the micro-batch whose optimizer step completes step ``s`` with
    ``s % every_n_steps == 0`` (steps ``0, n, 2n, ...``; never during the sanity check; with several optimizers
    stepped in one batch, the batch whose first step is ``s``, as the other monitors), reading the weights *after*
    that optimizer step and σ as estimated in its forward. Reads only: no buffer is written, no RNG consumed, so
    training is bit-identical with and without the monitor. Under FSDP2 it gathers sharded γ and weights (see the
    module docstring); under FSDP1 it reads inside ``summon_full_params``. All values are computed in float32 without gradient,
    stacked on the device and moved to the host once per logging step. Weights are identical on every DDP rank, so
    no reduction is needed. Works on plain models too (then only the ``qk_norm`` keys are logged). Keys: see the
    module docstring.

    Args:
        every_n_steps: log at optimizer steps ``0, n, 2n, ...``. With ``k`` optimizers stepped per batch (manual
            optimisation, GAN style), the batches whose first optimizer step is a multiple of ``n``: every lcm(n, k)
            optimizer steps (:class:`~entrotrain.callbacks._logging_window.LoggingWindow`).
        log_qk_norm: log the per-head ``qk_norm`` keys and their maximum.
        prefix: key prefix.

    Raises:
        EntrotrainError: on invalid arguments.

    Example::

        trainer = Trainer(callbacks=[SigmaReparamMonitor(every_n_steps=50)])
    """

    def __init__(self, every_n_steps: int = 50, log_qk_norm: bool = True, prefix: str = "sigma_reparam/") -> None:
        check_int(every_n_steps, "every_n_steps", low=1)
        if not isinstance(log_qk_norm, bool):
            raise EntrotrainError(f"log_qk_norm must be a bool, got {log_qk_norm!r}.")
        if not isinstance(prefix, str):
            raise EntrotrainError(f"prefix must be a string, got {prefix!r}.")
        self.every_n_steps = every_n_steps
        self.log_qk_norm = log_qk_norm
        self.prefix = prefix
        self.last_logged: dict[str, float] = {}
        self._seen_step: int | None = None
        self._warned = False
        self._nonfinite = NonFiniteCounter("SigmaReparamMonitor", f"{prefix}nonfinite")

    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    def _reset_fit_state(self) -> None:
        """A monitor reused for another fit starts afresh (run by ``setup(stage="fit")``, PerFitCallback)."""
        self.last_logged = {}
        self._seen_step = None
        self._warned = False
        self._nonfinite.reset()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.sanity_checking:
            return
        step = trainer.global_step
        if self._seen_step is None:
            self._seen_step = step
        if step <= self._seen_step:  # still accumulating: no optimizer step yet
            return
        # the batch's first optimizer step decides, as in the other monitors' logging window: with several optimizers
        # stepped per batch (manual optimisation) global_step moves by more than one, and ``step - 1`` skips the
        # multiples of ``every_n_steps`` that a batch's first step lands on (two optimizers, n = 2: never logged)
        first, self._seen_step = self._seen_step, step
        if first % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def collect(self, module: nn.Module) -> dict[str, float]:
        """The metrics (keys as in the module docstring) for ``module``'s current weights."""
        keys: list[str] = []
        values: list[Tensor] = []
        with torch.no_grad():
            for name, m in named_modules(module):
                if isinstance(m, SigmaReparamLinear):
                    keys += [f"{self.prefix}{name}/sigma", f"{self.prefix}{name}/gamma"]
                    # the σ buffer keeps its last finite estimate when W goes NaN/Inf (so the layer can recover):
                    # that is not the current σ, so it is published as NaN then, never as a stale number
                    current = torch.isfinite(full_tensor(m.weight.detach())).all()
                    sigma = torch.where(current, m.sigma.detach().float(), float("nan"))
                    values += [sigma.reshape(1), full_tensor(m.gamma.detach()).float().reshape(1)]
            qk: list[Tensor] = []
            if self.log_qk_norm:
                for name, m in named_modules(module):
                    found = _fused_qkv(m)
                    if found is not None:
                        qkv, n_head = found
                        norms = qk_spectral_norms(_effective_matrix(qkv), n_head).float()
                        keys += [f"{self.prefix}{name}/qk_norm/H{h}" for h in range(n_head)]
                        values.append(norms)
                        qk.append(norms)
            if qk:
                keys.append(f"{self.prefix}qk_norm/max")
                norms = torch.cat(qk)
                values.append(torch.where(torch.isfinite(norms), norms, float("-inf")).max().reshape(1))
            if not values:
                return {}
            device = values[0].device
            host = torch.cat([v.to(device) for v in values]).cpu()  # one device → host transfer
        metrics = dict(zip(keys, host.tolist()))
        if qk and metrics[f"{self.prefix}qk_norm/max"] == float("-inf"):  # no head had finite weights
            metrics[f"{self.prefix}qk_norm/max"] = float("nan")
        return metrics

    def compute_metrics(self, module: nn.Module, step: int) -> dict[str, float]:
        """The trainer-free core of a logging step: :meth:`collect` plus ``{p}nonfinite`` (empty, warned once, when
        ``module`` has nothing to measure). Used by the Lightning path and by
        :mod:`entrotrain.integrations.transformers` (same keys, same values)."""
        metrics = self.collect(module)
        if not metrics:
            if not self._warned:
                self._warned = True
                rank_zero_warn(
                    f"SigmaReparamMonitor found no SigmaReparamLinear and no attention module with `qkv` and `n_head` "
                    f"(or GPT-2's `c_attn` and `num_heads`) in {type(module).__name__}; convert its nn.Linear / "
                    "transformers Conv1D layers with entrotrain.regularizers.sigma_reparam.sigma_reparam(...) or "
                    "remove the callback."
                )
            return {}
        bad = sum(1 for v in metrics.values() if not math.isfinite(v))
        if f"{self.prefix}qk_norm/max" in metrics and not math.isfinite(metrics[f"{self.prefix}qk_norm/max"]):
            bad -= 1  # the maximum is NaN only because every head is: not a statistic of its own
        self._nonfinite.add(bad, "σReparam statistics were non-finite (NaN/Inf weights, σ or γ)", f"step {step}")
        metrics[f"{self.prefix}nonfinite"] = float(bad)
        self.last_logged = metrics
        return metrics

    def _log(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with _full_params(trainer, pl_module):
            metrics = self.compute_metrics(pl_module, trainer.global_step)
        if metrics:
            publish_scalars(trainer, pl_module, metrics, source=self.state_key)
