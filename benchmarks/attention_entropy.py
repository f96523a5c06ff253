"""Benchmark: per-query attention entropy, entrotrain's three paths against the naive code and one SDPA forward.

Rows (see benchmarks/README.md):
    naive          fp32 scores q·kᵀ·scale, causal mask (a cached tril buffer, as models keep one), softmax,
                   -Σ p log p with the p > 0 guard. What people write.
    SDPA forward   F.scaled_dot_product_attention(q, k, v=k): the cost of one attention forward, the reference.
    materialized   attention_entropy_stats(..., path="materialized")
    chunked        attention_entropy_stats(..., path="chunked")
    fused          attention_entropy_stats(..., path="fused") (lse-returning flash kernel, value := key)

With --grad every row is forward + backward of the mean entropy (SDPA: of the mean output); the fused row's backward
is one flash-attention backward (issue 18 item 1; entrotrain/functional/attention_fused_grad.py). Accuracy is against
float64 computed once with the chunked path on the same (upcast) inputs.

    python benchmarks/attention_entropy.py                       # B=2 H=8 N=1024 D=64 causal fp32, DESIGN §6
    python benchmarks/attention_entropy.py --grad
    python benchmarks/attention_entropy.py --device cuda --batch 2 --heads 16 --seq 8192 --dim 128 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from entrotrain.errors import EntrotrainError  # noqa: E402
from entrotrain.functional.attention import DEFAULT_CHUNK_ELEMENTS, attention_entropy_stats  # noqa: E402

ROWS = ("naive", "SDPA forward", "materialized", "chunked", "fused")


# ------------------------------------------------------------------------------------------------------- the rows


def naive_attention_entropy(q: torch.Tensor, k: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The code people write: materialise fp32 scores, mask, softmax, -Σ p log p guarded at p = 0.

    The guard is the *double* where: ``torch.where(p > 0, p * p.log(), 0)`` alone is right forward, but its
    backward meets ``0 · log 0 = nan`` at every masked key and, through the softmax, turns the whole row's gradient
    into nan.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    pos = p > 0
    return -torch.where(pos, p * torch.log(torch.where(pos, p, 1.0)), 0.0).sum(-1)


def make_inputs(batch, heads, seq, dim, dtype, device, seed, grad):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads, seq, dim, generator=g, device=device).to(dtype)
    k = torch.randn(batch, heads, seq, dim, generator=g, device=device).to(dtype)
    if grad:
        q.requires_grad_(True)
        k.requires_grad_(True)
    return q, k


def make_case(row: str, q, k, causal: bool, grad: bool, chunk_elements: int) -> Callable[[], object]:
    """A zero-argument callable for one row (forward, or forward + backward with ``grad``)."""
    n = q.shape[2]
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril() if causal else None

    if row == "naive":
        fwd = lambda: naive_attention_entropy(q, k, keep)  # noqa: E731
    elif row == "SDPA forward":
        fwd = lambda: F.scaled_dot_product_attention(q, k, k, is_causal=causal)  # noqa: E731
    else:
        fwd = lambda: attention_entropy_stats(  # noqa: E731
            q, k, is_causal=causal, path=row, chunk_elements=chunk_elements
        ).entropy
    if not grad:

        def run():
            with torch.no_grad():
                return fwd()

        return run

    def run_grad():
        q.grad = k.grad = None
        out = fwd()
        out.float().mean().backward()
        return out.detach()

    return run_grad


def build_case(row, batch, heads, seq, dim, dtype, device, causal, grad, chunk_elements, seed):
    """Child-process entry for the memory measurement: inputs, the measured call, a tiny-shape warm-up."""
    dt, dev = C.dtype_from_name(dtype), torch.device(device)
    q, k = make_inputs(batch, heads, seq, dim, dt, dev, seed, grad)
    qs, ks = make_inputs(1, 1, 16, dim, dt, dev, seed, grad)
    return make_case(row, q, k, causal, grad, chunk_elements), make_case(row, qs, ks, causal, grad, chunk_elements)


def reference(q, k, causal: bool, grad: bool):
    """float64 entropy (and gradient of its mean) with the chunked path, on the inputs upcast exactly."""
    q64 = q.detach().double().requires_grad_(grad)
    k64 = k.detach().double().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        h = attention_entropy_stats(q64, k64, is_causal=causal, path="chunked").entropy
        if grad:
            h.mean().backward()
    return h.detach(), (q64.grad, k64.grad) if grad else None


# ------------------------------------------------------------------------------------------------------------ main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--chunk-elements", type=int, default=DEFAULT_CHUNK_ELEMENTS, help="chunked path block size")
    C.add_common_args(p, repeats=7)
    a = p.parse_args(argv)
    C.setup_threads(a.threads)
    device = C.resolve_device(a.device)
    dtype = C.dtype_from_name(a.dtype)
    causal = not a.no_causal
    shape = (a.batch, a.heads, a.seq, a.dim)
    mode = "forward + backward of mean entropy" if a.grad else "forward, no grad"
    print(
        f"# attention entropy  B={a.batch} H={a.heads} N={a.seq} D={a.dim} {'causal' if causal else 'full'} "
        f"{a.dtype} on {device.type}; {mode}; median of {a.repeats} interleaved rounds"
    )
    print(f"# {C.environment_line(device, a.threads)}")
    note = C.contention_note(device)
    if note:
        print(f"# {note}")

    # Which rows run: fused needs the CPU lse kernel (forward and backward).
    rows, skipped = [], {}
    for row in ROWS:
        if row == "fused":
            try:
                qs, ks = make_inputs(1, 1, 8, a.dim, dtype, device, 0, False)
                attention_entropy_stats(qs, ks, is_causal=causal, path="fused")
            except EntrotrainError as err:
                skipped[row] = str(err).split(";")[0]
                continue
        rows.append(row)

    # 1) Peak memory first, each row in a fresh process, before this process holds any large tensor (a spawned
    #    child inherits its parent's ru_maxrss high-water mark; see _common).
    mem: dict[str, C.MemResult] = {}
    if not a.no_memory:
        for row in rows:
            kwargs = dict(
                row=row, batch=a.batch, heads=a.heads, seq=a.seq, dim=a.dim, dtype=a.dtype, device=str(device),
                causal=causal, grad=a.grad, chunk_elements=a.chunk_elements, seed=a.seed,
            )
            mem[row] = C.peak_memory(build_case, kwargs, device=device, threads=a.threads)
            if mem[row].error:
                print(f"# memory {row}: {mem[row].error}")

    # 2) Accuracy against float64, then timing, in this process.
    q, k = make_inputs(*shape, dtype, device, a.seed, a.grad)
    h_ref, g_ref = reference(q, k, causal, a.grad)
    cases = {row: make_case(row, q, k, causal, a.grad, a.chunk_elements) for row in rows}
    err_h, err_g = {}, {}
    for row in rows:
        if row == "SDPA forward":
            continue
        out = cases[row]()
        err_h[row] = C.max_abs_diff(out, h_ref)
        if a.grad:
            scale = max(g_ref[0].abs().max().item(), g_ref[1].abs().max().item())
            err_g[row] = max(C.max_abs_diff(q.grad, g_ref[0]), C.max_abs_diff(k.grad, g_ref[1])) / scale
    times = C.time_cases(cases, repeats=a.repeats, warmup=a.warmup, device=device)

    # 3) Table.
    t_naive = times["naive"].median_ms
    t_sdpa = times["SDPA forward"].median_ms
    m_naive = mem.get("naive")
    cpu = device.type == "cpu"
    sdpa_label = "× SDPA fwd+bwd" if a.grad else "× SDPA fwd"
    headers = ["row", "median ms", "min ms", "× naive", sdpa_label]
    mem_cols = (["peak RSS MiB", "peak live MiB"] if cpu else ["peak alloc MiB"]) + ["mem × naive"]
    headers += (mem_cols if mem else []) + ["max ΔH"] + (["max Δ∇ (rel.)"] if a.grad else [])
    table = []
    for row in ROWS:
        label = row if not a.grad else (f"{row} fwd+bwd" if row != "SDPA forward" else "SDPA fwd+bwd")
        if row in skipped:
            table.append([label + " ¹", "skipped"] + [""] * (len(headers) - 2))
            continue
        t, m = times[row], mem.get(row)
        live, live_naive = (m.live_mib if m else None), (m_naive.live_mib if m_naive else None)
        mem_ratio = live / live_naive if live is not None and live_naive else None
        cells = [label, C.fmt(t.median_ms), C.fmt(t.min_ms), C.fmt_ratio(t.median_ms / t_naive),
                 C.fmt_ratio(t.median_ms / t_sdpa)]
        if mem:
            cells += ([C.fmt_mem(m), C.fmt_live(m)] if cpu else [C.fmt_live(m)]) + [C.fmt_ratio(mem_ratio)]
        cells.append("—" if row not in err_h else f"{err_h[row]:.1e}")
        if a.grad:
            cells.append("—" if row not in err_g else f"{err_g[row]:.1e}")
        table.append(cells)
    C.print_table(headers, table, skipped)
    if mem and cpu:
        m0 = next(iter(mem.values()))
        print(f"# peak RSS: {m0.method}, each row in a fresh process (floor "
              f"{max(m.floor_mib for m in mem.values()):.1f} MiB); peak live: torch.profiler allocations - frees, "
              "same process, second call; mem × naive compares live peaks")
    if not a.grad and "fused" in times:
        r = times["fused"].median_ms / t_sdpa
        target = 1.3 if cpu else 1.5
        verdict = "meets" if r <= target else "MISSES"
        print(f"# fused / SDPA forward = {r:.2f} (min/min {times['fused'].min_ms / times['SDPA forward'].min_ms:.2f});"
              f" DESIGN §6 target ≤ {target} on {device.type}: {verdict}")
    if a.grad and "chunked" in times:
        r = times["chunked"].median_ms / t_sdpa
        verdict = "meets" if r <= 2.5 else "MISSES"
        r_min = times["chunked"].min_ms / times["SDPA forward"].min_ms
        print(f"# chunked fwd+bwd / SDPA fwd+bwd = {r:.2f} (min/min {r_min:.2f}); DESIGN §6 target ≤ 2.5: {verdict}")
    if a.grad and "fused" in times:
        r = times["fused"].median_ms / t_sdpa
        r_min = times["fused"].min_ms / times["SDPA forward"].min_ms
        verdict = "meets" if r_min <= 1.5 else "MISSES"
        extra = ""
        if "chunked" in times:
            extra = f"; fused / chunked fwd+bwd = {times['fused'].min_ms / times['chunked'].min_ms:.2f} (min/min)"
        print(f"# fused fwd+bwd / SDPA fwd+bwd = {r:.2f} (min/min {r_min:.2f}); issue 18 target ≤ 1.5 (min/min): "
              f"{verdict}{extra}")
    if mem:
        bhn = a.batch * a.heads * a.seq * 4 / C.MiB
        print(f"# for scale: one fp32 (B,H,N) vector = {bhn:.2f} MiB; fp32 (B,H,N,N) scores = "
              f"{bhn * a.seq:.0f} MiB; chunked block ≈ {a.chunk_elements * 4 / C.MiB:.0f} MiB of scores")

if __name__ == "__main__":
    main()
