"""Benchmark: RL policy token statistics against the naive code, time and peak extra memory.

Part 1, per-token entropy / log-probs of ``rows x vocab`` logits (no grad, as in a monitor or the old-logprob pass):
    naive entropy            x.float() / T -> softmax, logsumexp - sum(p z)  (materialises several row-sized copies)
    token_entropy            entrotrain.functional.token_entropy (chunked; T applied inside the chunk)
    naive logprobs           log_softmax(x.float() / T).gather(labels)
    token_logprobs           entrotrain.functional.token_logprobs (chunked)

Part 2, fused output head, forward + backward of sum(entropy) + sum(logprob) w.r.t. hidden and weight:
    materialised logits      z = h @ W.T / T, then the naive formulas; autograd keeps z, p, log p
    linear_entropy_and_logprobs  entrotrain.functional.linear_entropy_and_logprobs (one chunk x V block at a time)

Peak memory: each row in a fresh process (``_common.peak_memory``), peak of live tensor bytes (CPU profiler /
CUDA max_memory_allocated) beyond the inputs; "chunks" divides what the row holds beyond its outputs by one chunk.

    python benchmarks/policy_entropy.py  # 4096 x 32000 fp32 and bf16, T = 0.7; head 2048 x 256 x 32000
    python benchmarks/policy_entropy.py --device cuda --rows 16384 --vocab 151936 --hidden 3584
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from entrotrain.functional import linear_entropy_and_logprobs, token_entropy, token_logprobs  # noqa: E402
from entrotrain.functional.entropy import DEFAULT_CHUNK_ELEMENTS  # noqa: E402

LOGIT_ROWS = ("naive entropy", "token_entropy", "naive logprobs", "token_logprobs")
HEAD_ROWS = ("materialised logits", "linear_entropy_and_logprobs")


def _up(x):
    return x if x.dtype == torch.float64 else x.float()


def naive_entropy(x, temperature):
    z = _up(x) / temperature
    p = torch.softmax(z, -1)
    return torch.logsumexp(z, -1) - (p * z).sum(-1)


def naive_logprobs(x, labels, temperature):
    return torch.log_softmax(_up(x) / temperature, -1).gather(-1, labels[:, None]).squeeze(-1)


def logits_inputs(rows, vocab, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    x = (torch.randn(rows, vocab, generator=g, device=device) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=g, device=device)
    return x, labels


def logits_case(row, x, labels, temperature):
    fn = {
        "naive entropy": lambda: naive_entropy(x, temperature),
        "token_entropy": lambda: token_entropy(x, temperature=temperature),
        "naive logprobs": lambda: naive_logprobs(x, labels, temperature),
        "token_logprobs": lambda: token_logprobs(x, labels, temperature=temperature),
    }[row]

    def run():
        with torch.no_grad():
            return fn()

    return run


def build_logits_case(row, rows, vocab, dtype, device, seed, temperature):
    dev = torch.device(device)
    x, labels = logits_inputs(rows, vocab, C.dtype_from_name(dtype), dev, seed)
    xs, ls = logits_inputs(4, 64, C.dtype_from_name(dtype), dev, seed)
    return logits_case(row, x, labels, temperature), logits_case(row, xs, ls, temperature)


def head_inputs(n, d, v, dtype, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    h = (torch.randn(n, d, generator=g, device=device)).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, device=device) / d**0.5 * 2).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=g, device=device)
    return h, w, labels


def head_case(row, h, w, labels, temperature, chunk):
    def run():
        h.grad = w.grad = None
        if row == "materialised logits":
            z = (h @ w.t()).float() / temperature
            p = torch.softmax(z, -1)
            ent = torch.logsumexp(z, -1) - (p * z).sum(-1)
            lp = torch.log_softmax(z, -1).gather(-1, labels[:, None]).squeeze(-1)
        else:
            ent, lp = linear_entropy_and_logprobs(h, w, labels, temperature=temperature, chunk_size=chunk)
        (ent.sum() + lp.sum()).backward()
        return ent.detach(), lp.detach()

    return run


def build_head_case(row, n, d, v, dtype, device, seed, temperature, chunk):
    dev = torch.device(device)
    h, w, labels = head_inputs(n, d, v, C.dtype_from_name(dtype), dev, seed)
    hs, ws, ls = head_inputs(8, 4, 16, C.dtype_from_name(dtype), dev, seed)
    return head_case(row, h, w, labels, temperature, chunk), head_case(row, hs, ws, ls, temperature, chunk)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--tokens", type=int, default=2048, help="head part: N")
    p.add_argument("--hidden", type=int, default=256, help="head part: D")
    p.add_argument("--chunk-size", type=int, default=512, help="head part: rows per block")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    C.setup_threads(a.threads)
    device = C.resolve_device(a.device)
    cpu = device.type == "cpu"
    print(f"# policy entropy benchmark on {device.type}; T = {a.temperature}; median of {a.repeats} interleaved rounds")
    print(f"# {C.environment_line(device, a.threads)}")
    note = C.contention_note(device)
    if note:
        print(f"# {note}")

    # ------------------------------------------------------------------ part 1: logits
    chunk_mib = DEFAULT_CHUNK_ELEMENTS * 4 / C.MiB
    headers = ["logits", "dtype", "median ms", "min ms", "× naive", "peak live MiB", "beyond out, chunks", "max err"]
    table = []
    for dtype_name in a.dtypes.split(","):
        dtype = C.dtype_from_name(dtype_name)
        mem = {}
        if not a.no_memory:
            for row in LOGIT_ROWS:
                kw = dict(row=row, rows=a.rows, vocab=a.vocab, dtype=dtype_name, device=str(device), seed=a.seed,
                          temperature=a.temperature)  # fmt: skip
                mem[row] = C.peak_memory(build_logits_case, kw, device=device, threads=a.threads, timeout=600)
        x, labels = logits_inputs(a.rows, a.vocab, dtype, device, a.seed)
        ref_h = naive_entropy(x.double(), a.temperature)
        ref_l = naive_logprobs(x.double(), labels, a.temperature)
        cases = {row: logits_case(row, x, labels, a.temperature) for row in LOGIT_ROWS}
        err = {row: C.max_abs_diff(cases[row](), ref_h if "entropy" in row else ref_l) for row in LOGIT_ROWS}
        times = C.time_cases(cases, repeats=a.repeats, warmup=a.warmup, device=device)
        out_mib = a.rows * 4 / C.MiB
        for row in LOGIT_ROWS:
            base = times["naive entropy" if "entropy" in row else "naive logprobs"].median_ms
            m = mem.get(row)
            live = None if m is None else m.live_mib
            chunks = "—" if live is None or row.startswith("naive") else C.fmt((live - out_mib) / chunk_mib, 2)
            table.append([row, dtype_name, C.fmt(times[row].median_ms), C.fmt(times[row].min_ms),
                          C.fmt_ratio(times[row].median_ms / base), C.fmt_live(m) if m else "—", chunks,
                          f"{err[row]:.1e}"])  # fmt: skip
        del x, labels, ref_h, ref_l, cases
    C.print_table(headers, table, {})
    print(f"# input {a.rows} x {a.vocab} (fp32 {a.rows * a.vocab * 4 / C.MiB:.0f} MiB, bf16 half); one chunk = "
          f"{DEFAULT_CHUNK_ELEMENTS} float32 = {chunk_mib:.0f} MiB; errors vs float64 of the same input")

    # ------------------------------------------------------------------ part 2: fused head
    n, d, v = a.tokens, a.hidden, a.vocab
    block_mib = min(a.chunk_size, n) * v * 4 / C.MiB
    headers = ["head fwd+bwd", "median ms", "min ms", "× materialised", "peak live MiB", "blocks", "max Δ∇h (rel.)"]
    mem = {}
    if not a.no_memory:
        for row in HEAD_ROWS:
            kw = dict(row=row, n=n, d=d, v=v, dtype="float32", device=str(device), seed=a.seed,
                      temperature=a.temperature, chunk=a.chunk_size)  # fmt: skip
            mem[row] = C.peak_memory(build_head_case, kw, device=device, threads=a.threads, timeout=600)
    h, w, labels = head_inputs(n, d, v, torch.float32, device, a.seed)
    cases = {row: head_case(row, h, w, labels, a.temperature, a.chunk_size) for row in HEAD_ROWS}
    grads = {}
    for row in HEAD_ROWS:
        cases[row]()
        grads[row] = h.grad.clone()
    scale = grads["materialised logits"].abs().max().item()
    times = C.time_cases(cases, repeats=a.repeats, warmup=a.warmup, device=device)
    table = []
    for row in HEAD_ROWS:
        m = mem.get(row)
        live = None if m is None else m.live_mib
        table.append([row, C.fmt(times[row].median_ms), C.fmt(times[row].min_ms),
                      C.fmt_ratio(times[row].median_ms / times["materialised logits"].median_ms),
                      C.fmt_live(m) if m else "—", C.fmt(live / block_mib, 2) if live is not None else "—",
                      f"{C.max_abs_diff(grads[row], grads['materialised logits']) / scale:.1e}"])  # fmt: skip
    C.print_table(headers, table, {})
    print(f"# head N={n} D={d} V={v} fp32, chunk_size={a.chunk_size}: one block = {block_mib:.1f} MiB; full logits = "
          f"{n * v * 4 / C.MiB:.0f} MiB; peak live includes the weight gradient ({v * d * 4 / C.MiB:.1f} MiB)"
          + ("; CPU peak live from torch.profiler" if cpu else ""))


if __name__ == "__main__":
    main()
