"""Run by test_policy_loss_ddp.py as a script: 2 gloo CPU ranks compute the global-mode policy losses.

The batch (from :func:`make_batch`) is split unevenly (3 + 5 sequences). Each rank computes every case's loss on
its rows, backpropagates into a shared head weight, all-reduces (averages) the gradient as DDP does, and writes
``OUT/rank{r}.pt``: per case the loss, the averaged gradient and the local metrics.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.functional import AGG_MODES, high_entropy_mask  # noqa: E402
from entrotrain.regularizers import ClipCovLoss, EntropyBonus, KLCovLoss, PPOClipLoss  # noqa: E402
from tests.helpers.gloo import rank_rows, spawn_gloo  # noqa: E402

SPLIT = (3, 5)
B, T, D, V = sum(SPLIT), 12, 6, 11


def make_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(D, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    old = None  # filled by logprobs()
    adv = torch.randn(B, generator=g, dtype=torch.float64) * 2
    adv[1] = 0.0
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    noise = torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
    return x, weight, labels, adv, mask, noise, old


def logprobs(x, weight, labels):
    return torch.log_softmax(x @ weight, -1).gather(-1, labels[..., None]).squeeze(-1)


def cases():
    out = {}
    for agg in AGG_MODES:
        out[f"clip_cov/{agg}"] = lambda agg=agg: ClipCovLoss(0.2, 0.05, 5.0, agg=agg, mode="global", seed=5)
        out[f"kl_cov/{agg}"] = lambda agg=agg: KLCovLoss(0.1, agg=agg, mode="global")
    out["kl_cov/nonzero"] = lambda: KLCovLoss(0.1, mode="global", nonzero_adv_only=True)
    out["ppo+bonus"] = lambda: PPOClipLoss(global_agg=True) + EntropyBonus(0.1, global_agg=True)
    return out


def run_cases(x, weight0, labels, adv, mask, noise):
    """Losses, gradients and metrics of every case on this rank's rows (or the whole batch without a group)."""
    results = {}
    for name, make in cases().items():
        weight = weight0.clone().requires_grad_()
        logp = logprobs(x, weight, labels)
        old = logp.detach() + noise
        ent = -logp  # a differentiable stand-in for the entropy
        out = make()(logp, old, adv, mask, entropy=ent, step=3)
        out.loss.backward()
        grad = weight.grad.clone()
        if dist.is_initialized():
            dist.all_reduce(grad)
            grad /= dist.get_world_size()
        results[name] = {"loss": out.loss.detach(), "grad": grad, "metrics": out.metrics}
    return results


def worker(rank: int, out: Path) -> None:
    x, weight, labels, adv, mask, noise, _ = make_batch()
    rows = rank_rows(SPLIT, rank)
    results = run_cases(x[rows], weight, labels[rows], adv[rows], mask[rows], noise[rows])
    ent = torch.rand(B, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results["high_entropy_mask"] = high_entropy_mask(ent[rows], mask[rows], 0.3)
    torch.save(results, out / f"rank{rank}.pt")


if __name__ == "__main__":
    spawn_gloo(worker, Path(sys.argv[1]))
