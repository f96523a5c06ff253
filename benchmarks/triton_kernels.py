"""Benchmark: the Triton kernels (``entrotrain.kernels``) against the naive torch code, torch.compile of it, the
library's torch path, and (attention) one SDPA call, measured in the same run.

Sections (``--only``):
    logits  entropy of a (rows, V) logits matrix                     GPU: 16384 x 151936 bf16   CPU: 1024 x 32000 fp32
    head    fused output head: hidden @ Wᵀ → entropy, log p(label)   GPU: 8192 x 4096 x 151936  CPU: 512 x 256 x 8192
    attn    per-query attention entropy, causal, fwd and fwd+bwd     GPU: B=2 H=16 N=8192 d=128  CPU: B=1 H=4 N=512 d=64

Rows: ``naive`` (what people write, float32 softmax), ``torch.compile naive``, ``torch path`` (entrotrain.functional),
``triton`` (entrotrain.kernels), and for attention ``SDPA fwd`` / ``SDPA fwd+bwd`` (value := key), the references of
the targets. Columns: median and min wall time (rounds interleaved, see benchmarks/_common.py), ratio to the naive
row (and to SDPA for attention), peak extra memory (CUDA: ``max_memory_allocated`` above the inputs) and its ratio,
and the largest |difference| from the torch path (fp32 entropies; for fwd+bwd, the gradients).

Targets (DESIGN §6, H100): logits entropy ≤ 2.5 ms and ≤ 64 MiB extra at 16384 x 151936 bf16; attention forward
≤ 1.5x one SDPA forward with O(B·H·N) memory; attention fwd+bwd ≤ 2.5x SDPA fwd+bwd. A row that runs out of memory
is reported as skipped.

Without CUDA, Triton runs through its CPU interpreter (this script sets ``TRITON_INTERPRET=1`` before importing
triton): its timings mean nothing, so the triton rows then run on tiny shapes and report only their error against the
torch path; the torch rows are timed on the CPU-sized set.

    python benchmarks/triton_kernels.py                      # GPU set on CUDA, CPU set otherwise
    python benchmarks/triton_kernels.py --only attn --repeats 20
    python benchmarks/triton_kernels.py --quick --device cpu   # tiny shapes: proves the script runs (seconds)

Registers, spills and shared memory on sm_90 (no GPU needed) come from ``benchmarks/kernel_compile_check.py``, which
compiles the kernels' real launches.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import warnings

import torch

if not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any triton import: kernels are defined interpreted

import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from entrotrain.functional.attention import attention_entropy as _attention_entropy  # noqa: E402
from entrotrain.functional.entropy import entropy_from_logits as _entropy  # noqa: E402
from entrotrain.kernels.dispatch import can_run_triton, triton_available  # noqa: E402

try:
    from entrotrain.functional.policy_head import linear_entropy_and_logprobs as _head

    def torch_head(*args, **kwargs):
        return _head(*args, impl="torch", **kwargs)
except ImportError:  # pragma: no cover - written by another change
    torch_head = None

MiB = float(1 << 20)


# ------------------------------------------------------------------------------------------------ naive baselines


def naive_entropy(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return -(F.softmax(x, dim=-1) * F.log_softmax(x, dim=-1)).sum(-1)


def naive_head(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = F.log_softmax((h @ w.T).float(), dim=-1)
    return -(lp.exp() * lp).sum(-1), lp.gather(1, y[:, None]).squeeze(1)


def torch_entropy(*args, **kwargs):
    """The torch path, pinned (``impl="auto"`` would pick the kernel here: CUDA, or the interpreter on CPU)."""
    return _entropy(*args, impl="torch", **kwargs)


def torch_attention_entropy(*args, **kwargs):
    """The torch path, pinned."""
    return _attention_entropy(*args, impl="torch", **kwargs)


def naive_attention_entropy(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Materialised causal attention entropy in float32 (GQA-free: same heads)."""
    s = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    n = s.shape[-1]
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lp = F.log_softmax(s, dim=-1)
    return -(lp.exp() * torch.where(lp == float("-inf"), 0.0, lp)).sum(-1)


# ---------------------------------------------------------------------------------------------------- machinery


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _grad_case(fn, inputs):
    """fn(*inputs) -> entropy (or (entropy, logprobs)); returns the gradients of the summed outputs."""

    def run():
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().sum() for o in outs)
        return torch.autograd.grad(loss, [x for x in inputs if x.requires_grad])

    return run


def _fwd_case(fn, inputs):
    def run():
        with torch.no_grad():
            return fn(*inputs)

    return run


def _err(out, ref) -> float | None:
    if out is None or ref is None:
        return None
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    return max(C.max_abs_diff(a.float(), b.float()) for a, b in zip(outs, refs) if a is not None and b is not None)


def _cuda_peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / MiB
    del out
    return peak


def run_section(
    title: str, cases: dict, *, device, a, ref_name: str | None, ratio_to: list[str], targets: list
) -> None:
    """Warm up each case (drop those that fail or OOM), time the rest round-robin, print one table."""
    print(f"\n## {title}")
    skipped: dict[str, str] = {}
    outputs: dict = {}
    for name in list(cases):
        try:
            outputs[name] = cases[name]()
            C.sync(device)
        except torch.cuda.OutOfMemoryError:
            skipped[name] = "out of memory"
        except Exception as err:  # a baseline that cannot run here is a footnote, not a crash
            skipped[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        if name in skipped:
            del cases[name]
            outputs.pop(name, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    ref = outputs.get(ref_name) if ref_name else None
    errors = {name: (_err(out, ref) if name != ref_name and not name.startswith("SDPA") else None)
              for name, out in outputs.items()}
    outputs.clear()
    times = C.time_cases(cases, repeats=a.repeats, warmup=a.warmup, device=device)
    mems = {name: _cuda_peak_mib(fn) for name, fn in cases.items()} if device.type == "cuda" else {}
    headers = ["row", "median ms", "min ms", *[f"× {r}" for r in ratio_to]]
    headers += ["peak MiB", "× naive mem", "max |Δ| vs torch"]
    rows = []
    for name, t in times.items():
        cells = [name, C.fmt(t.median_ms, 2), C.fmt(t.min_ms, 2)]
        for r in ratio_to:
            cells.append(C.fmt_ratio(t.median_ms / times[r].median_ms) if r in times else "—")
        mem = mems.get(name)
        base = mems.get(ratio_to[0]) if ratio_to else None
        cells += [C.fmt(mem), C.fmt_ratio(mem / base) if mem is not None and base else "—"]
        e = errors.get(name)
        cells.append("—" if e is None else f"{e:.2e}")
        rows.append(cells)
    C.print_table(headers, rows, skipped)
    for label, row, check in targets:
        if row in times:
            ok = check(times, mems)
            print(f"# target {label}: {'met' if ok else 'NOT met'}" if ok is not None else f"# target {label}: n/a")


def interpreter_errors(a) -> None:
    """Under the CPU interpreter: triton vs torch path on tiny shapes, errors only."""
    from entrotrain.kernels.attention_entropy import attention_entropy as tri_attn
    from entrotrain.kernels.linear_entropy import linear_entropy_and_logprobs as tri_head
    from entrotrain.kernels.logits_entropy import entropy_from_logits as tri_entropy

    print("\n## Triton through the CPU interpreter: timings are meaningless here; max |Δ| vs the torch path only")
    # numpy (the interpreter) warns on -inf - -inf in masked lanes that tl.where then discards
    warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)
    g = torch.Generator().manual_seed(a.seed)
    rows = []
    if "logits" in a.only:
        x = (torch.randn(64, 1000, generator=g) * 3).requires_grad_(True)
        h1, h2 = tri_entropy(x), torch_entropy(x)
        g1, g2 = torch.autograd.grad(h1.sum(), x)[0], torch.autograd.grad(h2.sum(), x)[0]
        rows.append(["logits entropy 64 x 1000 fp32", f"{_err(h1, h2):.2e}", f"{_err(g1, g2):.2e}"])
    if "head" in a.only and torch_head is not None:
        h = torch.randn(48, 64, generator=g).requires_grad_(True)
        w = (torch.randn(500, 64, generator=g) * 0.3).requires_grad_(True)
        y = torch.randint(0, 500, (48,), generator=g)
        o1, o2 = tri_head(h, w, y), torch_head(h, w, y)
        g1 = torch.autograd.grad(o1.entropy.sum() + o1.logprobs.sum(), (h, w))
        g2 = torch.autograd.grad(o2.entropy.sum() + o2.logprobs.sum(), (h, w))
        rows.append(["fused head 48 x 64 x 500 fp32", f"{_err(tuple(o1), tuple(o2)):.2e}", f"{_err(g1, g2):.2e}"])
    if "attn" in a.only:
        q = torch.randn(1, 4, 64, 32, generator=g).requires_grad_(True)
        k = torch.randn(1, 2, 64, 32, generator=g).requires_grad_(True)
        e1 = tri_attn(q, k, is_causal=True, window=24)
        e2 = torch_attention_entropy(q, k, is_causal=True, window=24, path="chunked")
        g1, g2 = torch.autograd.grad(e1.sum(), (q, k)), torch.autograd.grad(e2.sum(), (q, k))
        rows.append(["attention 1x4(2)x64x32 causal+window", f"{_err(e1, e2):.2e}", f"{_err(g1, g2):.2e}"])
    C.print_table(["case", "forward max |Δ|", "gradient max |Δ|"], rows, {})


# ---------------------------------------------------------------------------------------------------- sections


def _maybe_compile(fn, a):
    return None if a.no_compile else torch.compile(fn, dynamic=False)


def bench_logits(a, device, dtype, triton_ok):
    n, v = (16384, 151936) if device.type == "cuda" else (1024, 32000)
    n, v = a.rows or n, a.vocab or v
    g = torch.Generator(device=device).manual_seed(a.seed)
    x = (torch.randn(n, v, generator=g, device=device, dtype=torch.float32) * 3).to(dtype)
    title = f"logits entropy {n} x {v} {str(dtype)[6:]}" + (" (fwd+bwd)" if a.grad else " (no grad)")
    fns = {"naive": naive_entropy, "torch.compile naive": _maybe_compile(naive_entropy, a), "torch path": torch_entropy}
    if triton_ok:
        from entrotrain.kernels.logits_entropy import entropy_from_logits as tri

        fns["triton"] = tri
    x.requires_grad_(a.grad)
    make = _grad_case if a.grad else _fwd_case
    cases = {name: make(fn, (x,)) for name, fn in fns.items() if fn is not None}
    targets = []
    if device.type == "cuda" and (n, v) == (16384, 151936) and dtype == torch.bfloat16 and not a.grad:
        targets.append(("≤ 2.5 ms and ≤ 64 MiB", "triton",
                        lambda t, m: t["triton"].median_ms <= 2.5 and m.get("triton", 1e9) <= 64))
    run_section(title, cases, device=device, a=a, ref_name="torch path", ratio_to=["naive"], targets=targets)


def bench_head(a, device, dtype, triton_ok):
    if torch_head is None:
        print("\n## fused head: skipped (entrotrain.functional.policy_head is not there)")
        return
    n, d, v = (8192, 4096, 151936) if device.type == "cuda" else (512, 256, 8192)
    if a.quick:
        n, d, v = 64, 32, 512
    g = torch.Generator(device=device).manual_seed(a.seed)
    h = (torch.randn(n, d, generator=g, device=device) / math.sqrt(d) * 4).to(dtype).requires_grad_(a.grad)
    w = torch.randn(v, d, generator=g, device=device).to(dtype).requires_grad_(a.grad)
    y = torch.randint(0, v, (n,), generator=g, device=device)
    fns = {"naive": naive_head, "torch.compile naive": _maybe_compile(naive_head, a),
           "torch path": lambda h, w, y: tuple(torch_head(h, w, y))}
    if triton_ok:
        from entrotrain.kernels.linear_entropy import linear_entropy_and_logprobs as tri

        fns["triton"] = lambda h, w, y: tuple(tri(h, w, y))
    make = _grad_case if a.grad else _fwd_case
    cases = {name: make(fn, (h, w, y)) for name, fn in fns.items() if fn is not None}
    title = f"fused head entropy + log p, N={n} D={d} V={v} {str(dtype)[6:]}" + (" (fwd+bwd)" if a.grad else "")
    run_section(title, cases, device=device, a=a, ref_name="torch path", ratio_to=["naive"], targets=[])


def bench_attention(a, device, dtype, triton_ok, grad: bool):
    b, hh, n, d = (2, 16, 8192, 128) if device.type == "cuda" else (1, 4, 512, 64)
    if a.quick:
        b, hh, d = 1, 2, 32
    n = a.seq or n
    g = torch.Generator(device=device).manual_seed(a.seed)
    q = torch.randn(b, hh, n, d, generator=g, device=device).to(dtype).requires_grad_(grad)
    k = torch.randn(b, hh, n, d, generator=g, device=device).to(dtype).requires_grad_(grad)
    fns = {
        "naive": naive_attention_entropy,
        "torch.compile naive": _maybe_compile(naive_attention_entropy, a),
        "torch path": lambda q, k: torch_attention_entropy(q, k, is_causal=True),
    }
    if triton_ok:
        from entrotrain.kernels.attention_entropy import attention_entropy as tri

        fns["triton"] = lambda q, k: tri(q, k, is_causal=True)
    make = _grad_case if grad else _fwd_case
    cases = {name: make(fn, (q, k)) for name, fn in fns.items() if fn is not None}
    sdpa = "SDPA fwd+bwd" if grad else "SDPA fwd"
    cases[sdpa] = make(lambda q, k: F.scaled_dot_product_attention(q, k, k, is_causal=True), (q, k))
    limit = 2.5 if grad else 1.5
    targets = []
    if device.type == "cuda":
        targets.append((f"triton ≤ {limit}x {sdpa}", "triton",
                        lambda t, m: t["triton"].median_ms <= limit * t[sdpa].median_ms if sdpa in t else None))
    title = f"attention entropy B={b} H={hh} N={n} d={d} causal {str(dtype)[6:]}" + (" fwd+bwd" if grad else " fwd")
    run_section(title, cases, device=device, a=a, ref_name="torch path", ratio_to=["naive", sdpa], targets=targets)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="logits,head,attn", help="comma-separated sections: logits, head, attn")
    p.add_argument("--rows", type=int, default=0, help="logits rows (0: the set's default)")
    p.add_argument("--vocab", type=int, default=0, help="logits vocabulary (0: the set's default)")
    p.add_argument("--seq", type=int, default=0, help="attention sequence length (0: the set's default)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    p.add_argument("--compile", action="store_true", help="keep the torch.compile rows on CPU (skipped by default)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes, one round, no torch.compile: proves the script runs (benchmarks/gpu_all.sh dry run)")
    C.add_common_args(p, repeats=10)
    p.set_defaults(dtype=None)
    a = p.parse_args(argv)
    a.only = {s.strip() for s in a.only.split(",")}
    device = C.resolve_device(a.device)
    if a.quick:
        a.rows, a.vocab, a.seq = a.rows or 64, a.vocab or 512, a.seq or 64
        a.repeats, a.warmup, a.no_compile = 1, 0, True
    if device.type == "cpu":
        a.no_compile = a.no_compile or not a.compile  # compiling costs more than the whole CPU run
        a.repeats = min(a.repeats, 3)
    C.setup_threads(a.threads)
    dtype = C.dtype_from_name(a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    print(C.environment_line(device, a.threads))
    note = C.contention_note(device)
    if note:
        print(note)
    triton_ok = device.type == "cuda" and can_run_triton(torch.empty(1, device=device, dtype=dtype))
    if device.type == "cuda" and not triton_ok:
        print("# triton rows skipped: triton is not installed (pip install entrotrain[triton])")
    if "logits" in a.only:
        bench_logits(a, device, dtype, triton_ok)
    if "head" in a.only:
        bench_head(a, device, dtype, triton_ok)
    if "attn" in a.only:
        bench_attention(a, device, dtype, triton_ok, grad=False)
        bench_attention(a, device, dtype, triton_ok, grad=True)
    if device.type == "cpu":
        if triton_available():
            interpreter_errors(a)
        else:
            print("\n# triton rows skipped: triton is not installed (pip install entrotrain[triton])")


if __name__ == "__main__":
    main()
