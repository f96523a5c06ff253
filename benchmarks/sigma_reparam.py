"""Step-time cost of the cures: σReparam against ``nn.Linear``, and attention regularisers on a training step.

Two tables, each measured in one process with interleaved rounds (``_common.time_cases``), quoted as ratios:

1. one linear layer, forward + backward of a batch of tokens, ``nn.Linear`` vs ``SigmaReparamLinear`` (one power
   iteration per training forward), eager and ``torch.compile`` (compile skipped with ``--no-compile``);
2. a full training step (forward, backward, Adam) of the recipes' TinyGPT: plain, σReparam on every block linear,
   + entropy floor, + AEM (both through a differentiable attention tap on every layer, all queries).

A verdict line follows for the DESIGN §6 target (σReparam on GPT-small ≤ 10 % step time, i.e. ≤ 1.10× plain): it is
a GPU target, and this script runs on CPU a TinyGPT, so the line gives the measured ratio and says it is not judged.

    python benchmarks/sigma_reparam.py               # CPU, 2 threads
    python benchmarks/sigma_reparam.py --quick       # 64² linear, batch 4 x 16, 3 rounds, no compile: proves it runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment_line, markdown_table, time_cases, verdict_line  # noqa: E402

from entrotrain.models import TinyGPT  # noqa: E402
from entrotrain.regularizers import (  # noqa: E402
    AttentionEntropyMaximization,
    EntropyFloorRegularizer,
    SigmaReparamLinear,
    sigma_reparam,
)


def linear_cases(tokens: int, dim: int, compile_: bool) -> dict:
    x = torch.randn(tokens, dim)
    plain = torch.nn.Linear(dim, dim)
    sigma = SigmaReparamLinear.from_linear(plain)
    cases = {}

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            layer(x).square().mean().backward()

        return run

    cases["nn.Linear"] = step(plain)
    cases["SigmaReparamLinear"] = step(sigma)
    if compile_:
        cases["nn.Linear (compiled)"] = step(torch.compile(plain))
        cases["SigmaReparamLinear (compiled)"] = step(torch.compile(sigma))
    return cases


def training_cases(batch: int, seq: int) -> dict:
    idx = torch.randint(0, 128, (batch, seq + 1))
    x, y = idx[:, :-1], idx[:, 1:]

    def make(convert: bool, regularizer=None):
        torch.manual_seed(0)
        model = TinyGPT(vocab_size=128, block_size=seq, n_layer=4, n_head=4, n_embd=128)
        if convert:
            sigma_reparam(model, include=["blocks.**"])
        opt = torch.optim.Adam(list(model.parameters()) + (list(regularizer.parameters()) if regularizer else []))

        def run():
            opt.zero_grad(set_to_none=True)
            if regularizer is None:
                logits = model(x)
                extra = 0.0
            else:
                with regularizer.capture(model):
                    logits = model(x)
                extra = regularizer().total
            loss = F.cross_entropy(logits.reshape(-1, 128), y.reshape(-1)) + extra
            loss.backward()
            opt.step()

        return run

    return {
        "plain": make(False),
        "σReparam (all block linears)": make(True),
        "+ entropy floor (all queries)": make(False, EntropyFloorRegularizer(weight=1.0, floor=0.2)),
        "+ AEM (all queries)": make(False, AttentionEntropyMaximization(weight=0.1)),
    }


def table(times: dict, base: str) -> str:
    ref = times[base].median_ms
    rows = [[name, f"{t.median_ms:.2f}", f"{t.median_ms / ref:.3f}"] for name, t in times.items()]
    return markdown_table(["case", "median ms", f"× {base}"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="64x64 linear, 256 tokens, batch 4 x 16, 3 rounds, no compile: proves the script runs")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.dim, args.batch, args.seq, args.repeats, args.no_compile = 256, 64, 4, 16, 3, True
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(environment_line(cpu, args.threads))
    print(f"\n# one linear layer {args.dim}x{args.dim}, {args.tokens} tokens, forward + backward, fp32\n")
    cases = linear_cases(args.tokens, args.dim, not args.no_compile)
    times = time_cases(cases, repeats=args.repeats, warmup=2, device=cpu)
    print(table(times, "nn.Linear"))
    if not args.no_compile:
        ratio = times["SigmaReparamLinear (compiled)"].median_ms / times["nn.Linear (compiled)"].median_ms
        print(f"\n# compiled σReparam / compiled nn.Linear = {ratio:.3f}")
    print(f"\n# TinyGPT 4x4x128 training step, batch {args.batch} x {args.seq} tokens, Adam, fp32\n")
    times = time_cases(training_cases(args.batch, args.seq), repeats=args.repeats, warmup=2, device=cpu)
    print(table(times, "plain"))
    ratio = times["σReparam (all block linears)"].median_ms / times["plain"].median_ms
    print("\n" + verdict_line(
        "DESIGN §6 σReparam on GPT-small ≤ 10 % step time", ratio <= 1.10,
        f"TinyGPT 4x4x128 step, median σReparam / plain = {ratio:.3f}×; target ≤ 1.10× on GPT-small",
        target_device="cuda", device=cpu, quick=args.quick))


if __name__ == "__main__":
    main()
