"""Step-time cost of the representation regularisers against the plain SimSiam step they are added to.

One training step (two augmented views of a batch of digits-sized inputs, forward, backward, SGD) of the recipes'
SimSiam (``stop_gradient=False``, as recipes/ssl_rank_collapse_entropy_reg.yaml), plain and with each regulariser on
the projections ``z`` ``(2B, feature_dim)``: matrix entropy of order 1 (``eigvalsh`` of the smaller Gram) and 2
(Frobenius, no eigensolver), Vendi of order 1 and 2, MMCR with λ = 0 (one SVD of the ``B × d`` centroids) and λ = 0.5
(plus ``B`` SVDs of ``d × 2``). Interleaved rounds in one process (``_common.time_cases``); the table quotes the
minimum and the median over rounds and the ratio of the minima to the plain step.

    OMP_NUM_THREADS=1 python benchmarks/representation_regularizers.py                  # CPU, 1 thread
    python benchmarks/representation_regularizers.py --batch 512 --feature-dim 512 --device cuda
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment_line, markdown_table, resolve_device, time_cases  # noqa: E402

from entrotrain.models.simsiam import SimSiam  # noqa: E402
from entrotrain.regularizers.representation import (  # noqa: E402
    MatrixEntropyRegularizer,
    MMCRLoss,
    VendiRegularizer,
)


def regularizers() -> dict:
    return {
        "plain SimSiam step": None,
        "+ matrix entropy, order 1": MatrixEntropyRegularizer(1.0, 1),
        "+ matrix entropy, order 2": MatrixEntropyRegularizer(1.0, 2),
        "+ Vendi, q = 1": VendiRegularizer(1.0, 1.0),
        "+ Vendi, q = 2": VendiRegularizer(1.0, 2.0),
        "+ MMCR, λ = 0": MMCRLoss(1.0, 0.0, n_views=2, layout="view_major"),
        "+ MMCR, λ = 0.5": MMCRLoss(1.0, 0.5, n_views=2, layout="view_major"),
    }


def cases(batch: int, hidden: int, feature: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(batch, 64, generator=g).to(device)
    x2 = torch.rand(batch, 64, generator=g).to(device)
    out = {}
    for name, reg in regularizers().items():
        torch.manual_seed(0)
        model = SimSiam(64, hidden, feature, max(feature // 4, 1), stop_gradient=False).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def run(model=model, opt=opt, reg=reg):
            opt.zero_grad(set_to_none=True)
            if reg is None:
                loss = model.loss(x1, x2)
            else:
                loss, z = model.loss(x1, x2, return_projections=True)
                loss = loss + reg(z).total
            loss.backward()
            opt.step()

        out[name] = run
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--hidden-dim", type=int, default=128)
    parser.add_argument("--feature-dim", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(environment_line(device, args.threads))
    print(
        f"\n# SimSiam training step, batch {args.batch} x 2 views, hidden {args.hidden_dim}, z dim {args.feature_dim}, "
        f"fp32, {args.repeats} interleaved rounds\n"
    )
    times = time_cases(
        cases(args.batch, args.hidden_dim, args.feature_dim, device), repeats=args.repeats, warmup=3, device=device
    )
    base = times["plain SimSiam step"]
    rows = [
        [name, f"{t.min_ms:.3f}", f"{t.median_ms:.3f}", f"{t.min_ms / base.min_ms:.2f}"] for name, t in times.items()
    ]
    print(markdown_table(["case", "min ms", "median ms", "× plain (min)"], rows))


if __name__ == "__main__":
    main()
