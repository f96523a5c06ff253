"""Run by test_token_shaping.py as a script: 2 gloo CPU ranks build the HWE mask (quantile mode) on their own rows
(3 + 5 sequences) and write ``OUT/rank{r}.pt`` (usage: ``python hwe_ddp_run.py OUT``); the test compares with one
process on the whole batch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from entrotrain.functional.token_shaping import high_window_entropy_mask, window_entropy  # noqa: E402
from tests.helpers.gloo import rank_rows, spawn_gloo  # noqa: E402

SPLIT = (3, 5)
B, T = sum(SPLIT), 10


def make_batch():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(B, T, generator=g, dtype=torch.float64) * 2
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return h, mask


def hwe(h, mask):
    w = window_entropy(h, mask, 3, return_counts=True)
    return high_window_entropy_mask(w.mean, w.count > 0, quantile=0.8)


def worker(rank: int, out: Path) -> None:
    h, mask = make_batch()
    rows = rank_rows(SPLIT, rank)
    torch.save(hwe(h[rows], mask[rows]), out / f"rank{rank}.pt")


if __name__ == "__main__":
    spawn_gloo(worker, Path(sys.argv[1]))
