"""Where the time of an attention regulariser goes: a TinyGPT training step split into its parts, and the kernels.

Issue 18 item 1 asks for the entropy floor / AEM step at <= 1.1x the unregularised step (CPU). This script measures,
in one process with interleaved rounds (``_common.time_cases``; ratios of the *minimum* over rounds, the least
load-disturbed sample on a shared machine):

1. the recipes' TinyGPT 4x4x128 training step (forward, backward, Adam; batch 32 x 64) as:
   ``plain``; ``tap armed, no scoring`` (the name-tracking hooks on every module and the SDPA interceptor, the
   tap's ``record`` a no-op: the price of arming); the entropy floor and AEM with the entropy computed *apart*
   from the model's attention (``joint_attention=False``: SDPA's kernel, then the fused entropy path forward and
   backward), also on a quarter of the queries (``max_queries=seq // 4``); and the default, the *joint* attention
   (:func:`~entrotrain.functional.attention_joint.attention_with_entropy`: the model's attention and its entropy in
   one pass with one backward, in place of SDPA);
2. one attention layer's worth of kernels at the TinyGPT shape (B32 H4 N64 D32 causal) and at B2 H8 N1024 D64 causal:
   SDPA forward and forward + backward, the raw fused entropy (:func:`fused_attention_entropy`) forward and
   forward + backward, the whole :func:`attention_entropy_stats` (validation, mask, finiteness check,
   normalisation) forward + backward, SDPA + that entropy (what ``joint_attention=False`` pays per layer), and the
   joint attention forward + backward (output and entropy both in the loss; skipped above its size limit);
3. the size sweep behind ``JOINT_MAX_ELEMENTS``: SDPA, SDPA + the separate entropy, and the joint attention fwd+bwd
   from 0.5 to 8 Mi scores per call.

    OMP_NUM_THREADS=1 python benchmarks/attention_regularizers.py --threads 1
    OMP_NUM_THREADS=2 python benchmarks/attention_regularizers.py --threads 2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import environment_line, markdown_table, time_cases  # noqa: E402

from entrotrain.functional.attention import attention_entropy_stats  # noqa: E402
from entrotrain.functional.attention_fused_grad import fused_attention_entropy  # noqa: E402
from entrotrain.functional.attention_joint import JOINT_MAX_ELEMENTS, attention_with_entropy  # noqa: E402
from entrotrain.models import TinyGPT  # noqa: E402
from entrotrain.regularizers.attention_entropy import (  # noqa: E402
    AttentionEntropyMaximization,
    EntropyFloorRegularizer,
)
from entrotrain.taps.attention_tap import AttentionTap  # noqa: E402


def step_cases(batch: int, seq: int) -> dict:
    idx = torch.randint(0, 128, (batch, seq + 1))
    x, y = idx[:, :-1], idx[:, 1:]

    def make(kind: str, **tap_kwargs):
        torch.manual_seed(0)
        model = TinyGPT(vocab_size=128, block_size=seq, n_layer=4, n_head=4, n_embd=128)
        reg = {"floor": EntropyFloorRegularizer(weight=1.0, floor=0.2), "aem": AttentionEntropyMaximization(weight=0.1)}
        reg = reg.get(kind)
        opt = torch.optim.Adam(model.parameters())

        def run():
            opt.zero_grad(set_to_none=True)
            extra = 0.0
            if reg is not None:
                with reg.capture(model, **tap_kwargs):
                    logits = model(x)
                extra = reg().total
            elif kind == "armed":
                with AttentionTap(model, differentiable=True, joint_attention=False) as tap:
                    tap.record = lambda *a, **k: None  # hooks + interceptor only
                    logits = model(x)
            else:
                logits = model(x)
            loss = F.cross_entropy(logits.reshape(-1, 128), y.reshape(-1)) + extra
            loss.backward()
            opt.step()

        return run

    separate = {"joint_attention": False}
    return {
        "plain": make("plain"),
        "tap armed, no scoring": make("armed"),
        "+ entropy floor, separate entropy": make("floor", **separate),
        "+ AEM, separate entropy": make("aem", **separate),
        f"+ entropy floor, separate, {seq // 4} of {seq} queries": make("floor", max_queries=seq // 4, **separate),
        "+ entropy floor, joint attention": make("floor"),
        "+ AEM, joint attention": make("aem"),
    }


def kernel_cases(b: int, h: int, n: int, d: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, n, d, generator=g).requires_grad_()
    k = torch.randn(b, h, n, d, generator=g).requires_grad_()
    v = torch.randn(b, h, n, d, generator=g).requires_grad_()
    scale = d**-0.5

    def sdpa_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_fwd_bwd():
        q.grad = k.grad = v.grad = None
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    def ent_fwd():
        with torch.no_grad():
            fused_attention_entropy(q, k, scale, is_causal=True)

    def ent_fwd_bwd():
        q.grad = k.grad = None
        fused_attention_entropy(q, k, scale, is_causal=True).sum().backward()

    def stats_fwd_bwd():
        q.grad = k.grad = None
        attention_entropy_stats(q, k, is_causal=True).normalized.sum().backward()

    def separate_fwd_bwd():
        q.grad = k.grad = v.grad = None
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        (out.sum() + attention_entropy_stats(q, k, is_causal=True).normalized.sum()).backward()

    def joint_fwd_bwd():
        q.grad = k.grad = v.grad = None
        out, result = attention_with_entropy(q, k, v, is_causal=True)
        (out.sum() + result.normalized.sum()).backward()

    causal = torch.ones(n, n, dtype=torch.bool).triu_(1)

    def eager_fwd_bwd():  # what users write without entrotrain: eager attention, entropy from its weights, autograd
        q.grad = k.grad = v.grad = None
        scores = (q @ k.transpose(-1, -2) * scale).masked_fill(causal, float("-inf"))
        p, logp = torch.softmax(scores, -1), torch.log_softmax(scores, -1).masked_fill(causal, 0.0)
        entropy = -(p * logp).sum(-1)
        ((p @ v).sum() + (entropy / torch.arange(1, n + 1).log().clamp_min(1e-12)).sum()).backward()

    return {
        "SDPA fwd": sdpa_fwd,
        "SDPA fwd+bwd": sdpa_fwd_bwd,
        "entropy fwd (fused kernel)": ent_fwd,
        "entropy fwd+bwd (fused kernel)": ent_fwd_bwd,
        "attention_entropy_stats fwd+bwd": stats_fwd_bwd,
        "SDPA + entropy apart, fwd+bwd": separate_fwd_bwd,
        "eager attention + entropy, autograd (users' own)": eager_fwd_bwd,
        **({"joint attention + entropy, fwd+bwd": joint_fwd_bwd} if b * h * n * n <= JOINT_MAX_ELEMENTS else {}),
    }


SWEEP_SHAPES = ((32, 4, 64, 32), (64, 4, 64, 32), (8, 8, 128, 64), (4, 8, 256, 64), (2, 8, 512, 64), (1, 8, 1024, 64))


def sweep_cases(b: int, h: int, n: int, d: int) -> dict:
    """SDPA, SDPA + the separate entropy, and the joint attention, fwd+bwd with both outputs in the loss, on q/k/v
    split from one projection and transposed (the layout models pass); the joint one called past its size limit."""
    x = torch.randn(b, n, 3 * h * d, generator=torch.Generator().manual_seed(0)).requires_grad_()
    grad_out = torch.randn(b, h, n, d)

    def qkv():
        return [t.view(b, n, h, d).transpose(1, 2) for t in x.split(h * d, 2)]

    def sdpa():
        q, k, v = qkv()
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True), x, grad_out)

    def separate():
        q, k, v = qkv()
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        result = attention_entropy_stats(q, k, is_causal=True)
        torch.autograd.grad((out, result.normalized), x, (grad_out, torch.ones_like(result.normalized)))

    def joint():
        q, k, v = qkv()
        out, result = attention_with_entropy(q, k, v, is_causal=True)
        torch.autograd.grad((out, result.normalized), x, (grad_out, torch.ones_like(result.normalized)))

    return {"SDPA": sdpa, "separate": separate, "joint": joint}


def table(times: dict, base: str) -> str:
    ref = times[base].min_ms
    rows = [[name, f"{t.min_ms:.2f}", f"{t.median_ms:.2f}", f"{t.min_ms / ref:.3f}"] for name, t in times.items()]
    return markdown_table(["case", "min ms", "median ms", f"min / min {base}"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    print(environment_line(cpu, args.threads))
    if not args.skip_step:
        print(f"\n# TinyGPT 4x4x128 training step, batch {args.batch} x {args.seq} tokens, Adam, fp32\n")
        times = time_cases(step_cases(args.batch, args.seq), repeats=args.repeats, warmup=2, device=cpu)
        print(table(times, "plain"))
    if not args.skip_kernels:
        for shape in ((args.batch, 4, args.seq, 32), (2, 8, 1024, 64)):
            print(f"\n# one attention layer B{shape[0]} H{shape[1]} N{shape[2]} D{shape[3]} causal, fp32\n")
            times = time_cases(kernel_cases(*shape), repeats=args.repeats, warmup=2, device=cpu)
            print(table(times, "SDPA fwd+bwd"))
    if not args.skip_sweep:
        print("\n# joint attention vs SDPA + the separate entropy, fwd+bwd, causal, fp32 (where to stop joining)\n")
        rows = []
        for b, h, n, d in SWEEP_SHAPES:
            times = time_cases(sweep_cases(b, h, n, d), repeats=max(3, args.repeats // 3), warmup=1, device=cpu)
            ref = times["SDPA"].min_ms
            rows.append([f"B{b} H{h} N{n} D{d}", f"{b * h * n * n / 2**20:.2f}", f"{ref:.2f}",
                         f"{times['separate'].min_ms / ref:.2f}", f"{times['joint'].min_ms / ref:.2f}",
                         "yes" if b * h * n * n <= JOINT_MAX_ELEMENTS else "no"])
        print(markdown_table(["shape", "Mi scores", "SDPA fwd+bwd ms", "separate / SDPA", "joint / SDPA",
                              "joint used"], rows))
    print("\n" + environment_line(cpu, args.threads))


if __name__ == "__main__":
    main()
