"""Benchmark: entrotrain against what users would otherwise use, in one run (issue 18, item 4).

Three tables, each timed interleaved in this process (``_common.time_cases``), ratio = min time / min time of the
table's baseline row (the minimum of the rounds: the least disturbed sample on a shared machine):

1. logits entropy (``--rows`` × ``--vocab`` fp32, baseline: naive)
       naive                  -(softmax(x) · log_softmax(x)).sum(-1)
       TRL chunked (128 rows) trl.trainer.utils.entropy_from_logits(x, chunk_size=128) if importable, else its
                              formula transcribed (log_softmax per 128-row chunk, -Σ exp(lp)·lp)
       verl / verl chunked    verl's formula, transcribed (verl is not installed): verl/utils/torch_functional.py
                              ``entropy_from_logits``: ``logsumexp(z) − Σ softmax(z)·z``; chunked = the same per
                              ``--chunk-rows`` rows (verl's ``entropy_from_logits_with_chunking``, 2048 rows)
       torch.compile naive    the naive form through torch.compile (skipped with a note in --quick, with
                              --no-compile, or when the first, compiling call fails or takes > --compile-timeout s)
       entrotrain             entrotrain.functional.entropy.entropy_from_logits
2. attention entropy (B H N D causal fp32, baseline: SDPA forward, the floor)
       SDPA forward           F.scaled_dot_product_attention(q, k, v=k, is_causal=True): one attention, no entropy
       materialised           what ``output_attentions=True`` gives: softmax(q kᵀ·scale + causal mask), then
                              -Σ p log p (p > 0)
       entrotrain fused / chunked   entrotrain.functional.attention.attention_entropy(..., path=...)
3. spectra (n × d fp32 rows, baseline per measure: torch fp32 eigvalsh, or svdvals for RankMe)
       matrix entropy         Wei et al.: centred unit rows Z, spectrum of ZᵀZ/n normalised by its trace, -Σλ ln λ
       RankMe                 Garrido et al.: p = σ(X)/‖σ‖₁ + 1e-7, exp(-Σ p ln p)
       Vendi (cosine, q=1)    Friedman & Dieng: unit rows X̂, spectrum of X̂ᵀX̂/n, exp(-Σλ ln λ) over λ > 0
       entrotrain rows: precision="auto" (the default: float32 where its error bound allows) and "float64"
       peers: numpy fp32 eigvalsh, torch fp32 eigvalsh, torch fp32 svdvals of the same matrix (λ = σ²/n), and
       the ``vendi_score`` package's ``score_dual`` when importable.

Columns: **min ms**, **× baseline** (ratio of minima), **peak extra MiB** = the largest sum of live tensor bytes
the call holds at once beyond its inputs, from torch's profiler memory events (``profile_memory=True``, CPU
allocator; ``_common._live_peak_mib``) — not tracemalloc, so numpy's own buffers in the numpy rows are not
counted (marked ``n/a``); CUDA: ``max_memory_allocated`` − allocated before the call. **max err** = largest
absolute error against float64 (logits: the naive formula on logits upcast to float64, ``entropy64``; attention:
the materialised form in float64; spectra: the same measure with float64 ``torch.linalg.eigvalsh``), in nats
(spectra: in the measure's unit).

    OMP_NUM_THREADS=1 python benchmarks/peers.py                # 4096×32000, B2 H8 N1024 D64, n=2048 d=256
    python benchmarks/peers.py --quick                          # tiny sizes, no compile: a few seconds
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402
from attention_entropy import naive_attention_entropy  # noqa: E402
from logits_entropy import naive_entropy  # noqa: E402

from entrotrain.functional.attention import attention_entropy  # noqa: E402
from entrotrain.functional.entropy import entropy_from_logits  # noqa: E402
from entrotrain.functional.representation import matrix_entropy, rankme, vendi_score  # noqa: E402

# ---------------------------------------------------------------------------------------------------------- peers


def trl_entropy_formula(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TRL's ``entropy_from_logits`` (trl.trainer.utils, torch path), transcribed for when trl is absent."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = []
    for chunk in flat.split(chunk_size, dim=0):
        lp = F.log_softmax(chunk, dim=-1)
        out.append(-(torch.exp(lp) * lp).sum(-1))
    return torch.cat(out).reshape(logits.shape[:-1])


def entropy64(logits: torch.Tensor) -> torch.Tensor:
    """The float64 reference: ``-Σ softmax(z)·log_softmax(z)`` with ``z`` upcast to float64 (no float32 step)."""
    z = logits.double()
    return -(F.softmax(z, dim=-1) * F.log_softmax(z, dim=-1)).sum(-1)


def _trl_entropy() -> tuple[Callable[[torch.Tensor], torch.Tensor], str]:
    try:
        from trl.trainer.utils import entropy_from_logits as trl_entropy

        import trl

        return (lambda x: trl_entropy(x, chunk_size=128)), f"trl {trl.__version__}"
    except Exception as e:  # noqa: BLE001 - any import failure means "use the transcription"
        return trl_entropy_formula, f"trl not importable ({type(e).__name__}): its formula, transcribed"


def verl_entropy(logits: torch.Tensor) -> torch.Tensor:
    """verl's ``entropy_from_logits`` (verl/utils/torch_functional.py): ``logsumexp(z) − Σ softmax(z)·z``."""
    pd = torch.nn.functional.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.sum(pd * logits, dim=-1)


def verl_entropy_chunked(logits: torch.Tensor, chunk_rows: int = 2048) -> torch.Tensor:
    """verl's ``entropy_from_logits_with_chunking``: the same formula per block of ``chunk_rows`` rows."""
    out = torch.empty(logits.shape[:-1], dtype=logits.dtype, device=logits.device)
    for i in range(0, logits.shape[0], chunk_rows):
        out[i : i + chunk_rows] = verl_entropy(logits[i : i + chunk_rows].float()).to(logits.dtype)
    return out


# ------------------------------------------------------------------------------------------------ measurement


def peak_extra_mib(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak live tensor bytes of one call beyond what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / C.MiB
    return C._live_peak_mib(fn)


def run_table(
    title: str,
    cases: dict[str, Callable[[], Any]],
    errors: dict[str, float],
    baseline: dict[str, str],
    a: argparse.Namespace,
    device: torch.device,
    skipped: dict[str, str],
    no_memory: set[str] = frozenset(),  # type: ignore[assignment]
) -> None:
    """Time ``cases`` interleaved, measure each one's peak, print the table (baseline of each row: ``baseline``)."""
    t = C.time_cases(cases, repeats=a.repeats, warmup=1, device=device)
    rows = []
    for name in cases:
        base = baseline.get(name, next(iter(cases)))
        ratio = t[name].min_ms / t[base].min_ms
        mem = "n/a" if name in no_memory or a.no_memory else C.fmt(peak_extra_mib(cases[name], device))
        err = errors.get(name)
        rows.append([name, C.fmt(t[name].min_ms, 2), C.fmt_ratio(ratio) + (" (base)" if base == name else ""), mem,
                     "—" if err is None else f"{err:.1e}"])
    print(f"\n## {title}")
    C.print_table(["row", "min ms", "× baseline", "peak extra MiB", "max err vs fp64"], rows, skipped)


def _compile_with_timeout(fn, x, timeout: float) -> tuple[Callable | None, str | None]:
    """``torch.compile(fn)`` and its first (compiling) call on ``x`` in a thread; None + reason if it fails or is
    not done within ``timeout`` s (the thread is then left to finish in the background, its result unused)."""
    box: dict[str, Any] = {}

    def work():
        try:
            cf = torch.compile(fn, dynamic=False)
            with torch.no_grad():
                cf(x)
            box["fn"] = cf
        except Exception as e:  # noqa: BLE001
            box["err"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"

    t0 = time.perf_counter()
    th = threading.Thread(target=work, daemon=True)
    th.start()
    th.join(timeout)
    if th.is_alive():
        return None, f"the first (compiling) call took > {timeout:.0f} s"
    if "err" in box:
        return None, f"compile failed: {box['err']}"
    print(f"# torch.compile naive: first (compiling) call {time.perf_counter() - t0:.1f} s (not timed below)")
    return box["fn"], None


# ----------------------------------------------------------------------------------------------------- tables


def logits_table(a: argparse.Namespace, device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(a.seed)
    x = torch.randn(a.rows, a.vocab, generator=g, device=device) * 3.0
    with torch.no_grad():  # float64 all the way (naive_entropy itself upcasts to float32 only: not a reference)
        ref = torch.cat([entropy64(blk) for blk in x.split(256)])
    trl_fn, trl_note = _trl_entropy()
    fns: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "naive": naive_entropy,
        "TRL chunked (128 rows)": trl_fn,
        "verl formula": verl_entropy,
        f"verl chunked ({a.chunk_rows} rows)": lambda z: verl_entropy_chunked(z, a.chunk_rows),
    }
    skipped: dict[str, str] = {}
    if a.quick or a.no_compile:
        skipped["torch.compile naive"] = "--quick" if a.quick else "--no-compile"
    else:
        cf, why = _compile_with_timeout(naive_entropy, x, a.compile_timeout)
        if cf is None:
            skipped["torch.compile naive"] = why  # type: ignore[assignment]
        else:
            fns["torch.compile naive"] = cf
    fns["entrotrain entropy_from_logits"] = entropy_from_logits

    def case(f):
        def run():
            with torch.no_grad():
                return f(x)

        return run

    cases = {name: case(f) for name, f in fns.items()}
    errors = {name: C.max_abs_diff(c(), ref) for name, c in cases.items()}
    print(f"# TRL row: {trl_note}; verl: formula transcribed (verl not installed)")
    run_table(f"Logits entropy, {a.rows} × {a.vocab} fp32 (N(0, 3²) logits)", cases, errors, {}, a, device, skipped)


def attention_table(a: argparse.Namespace, device: torch.device) -> None:
    g = torch.Generator(device=device).manual_seed(a.seed)
    shape = (a.batch, a.heads, a.seq, a.dim)
    q = torch.randn(*shape, generator=g, device=device)
    k = torch.randn(*shape, generator=g, device=device)
    keep = torch.ones(a.seq, a.seq, dtype=torch.bool, device=device).tril()
    with torch.no_grad():
        ref = naive_attention_entropy(q.double(), k.double(), keep).double() if a.seq <= 2048 else None
        if ref is not None:  # naive_attention_entropy upcasts to float32: redo its steps in float64
            s = (q.double() @ k.double().transpose(-1, -2)) / math.sqrt(a.dim)
            p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
            ref = -torch.where(p > 0, p * torch.log(torch.where(p > 0, p, 1.0)), 0.0).sum(-1)
            del s, p
    cases: dict[str, Callable[[], Any]] = {
        "SDPA forward (floor)": lambda: F.scaled_dot_product_attention(q, k, k, is_causal=True),
        "materialised (output_attentions)": lambda: naive_attention_entropy(q, k, keep),
        "entrotrain fused": lambda: attention_entropy(q, k, is_causal=True, path="fused"),
        "entrotrain chunked": lambda: attention_entropy(q, k, is_causal=True, path="chunked"),
    }
    skipped: dict[str, str] = {}
    try:
        with torch.no_grad():
            cases["entrotrain fused"]()
    except Exception as e:  # noqa: BLE001
        skipped["entrotrain fused"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        del cases["entrotrain fused"]

    def nograd(f):
        def run():
            with torch.no_grad():
                return f()

        return run

    cases = {n: nograd(f) for n, f in cases.items()}
    errors = {n: C.max_abs_diff(c(), ref) for n, c in cases.items() if ref is not None and not n.startswith("SDPA")}
    title = f"Attention entropy, B{a.batch} H{a.heads} N{a.seq} D{a.dim} causal fp32, forward"
    run_table(title, cases, errors, {}, a, device, skipped)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def _ent(lam: torch.Tensor) -> torch.Tensor:
    lam = lam.double()
    lam = lam[lam > 0]
    return -(lam * lam.log()).sum()


def me_gram(x: torch.Tensor) -> torch.Tensor:
    """The d × d matrix of matrix entropy: ZᵀZ/n, Z = centred unit rows."""
    z = _unit_rows(x - x.mean(0))
    return z.T @ z / x.shape[0]


def me_from_eigs(lam: torch.Tensor) -> torch.Tensor:
    lam = lam.double().clamp_min(0)
    return _ent(lam / lam.sum())


def rankme_from_sv(s: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    p = s.double() / s.double().sum() + eps
    return torch.exp(-(p * p.log()).sum())


def vendi_gram(x: torch.Tensor) -> torch.Tensor:
    z = _unit_rows(x)
    return z.T @ z / x.shape[0]


def spectra_table(a: argparse.Namespace, device: torch.device) -> None:
    from spectral import make_rows

    x = make_rows(a.n, a.d, a.seed, device).float()
    x64 = x.double()
    ref = {  # float64 torch of the same maths: the error of every row, entrotrain's precision="auto" included
        "matrix entropy": me_from_eigs(torch.linalg.eigvalsh(me_gram(x64))).item(),
        "RankMe": rankme_from_sv(torch.linalg.svdvals(x64)).item(),
        "Vendi q=1": torch.exp(_ent(torch.linalg.eigvalsh(vendi_gram(x64)))).item(),
    }
    n = a.n
    cases: dict[str, Callable[[], Any]] = {}
    base: dict[str, str] = {}
    nomem: set[str] = set()

    def add(measure: str, impl: str, fn: Callable[[], Any], baseline_impl: str) -> None:
        cases[f"{measure}: {impl}"] = fn
        base[f"{measure}: {impl}"] = f"{measure}: {baseline_impl}"
        if impl.startswith("numpy") or impl.startswith("vendi_score"):
            nomem.add(f"{measure}: {impl}")

    def np_eigvalsh(m: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.linalg.eigvalsh(m.cpu().numpy()))

    me, rk, vs = "matrix entropy", "RankMe", "Vendi q=1"
    add(me, "torch fp32 eigvalsh", lambda: me_from_eigs(torch.linalg.eigvalsh(me_gram(x))), "torch fp32 eigvalsh")
    add(me, "numpy fp32 eigvalsh", lambda: me_from_eigs(np_eigvalsh(me_gram(x))), "torch fp32 eigvalsh")
    add(me, "torch fp32 svdvals", lambda: me_from_eigs(torch.linalg.svdvals(_unit_rows(x - x.mean(0))) ** 2 / n),
        "torch fp32 eigvalsh")
    add(me, "entrotrain matrix_entropy", lambda: matrix_entropy(x), "torch fp32 eigvalsh")
    add(me, "entrotrain matrix_entropy float64", lambda: matrix_entropy(x, precision="float64"), "torch fp32 eigvalsh")
    add(rk, "torch fp32 svdvals", lambda: rankme_from_sv(torch.linalg.svdvals(x)), "torch fp32 svdvals")
    add(rk, "torch fp32 eigvalsh (XᵀX)", lambda: rankme_from_sv(torch.linalg.eigvalsh(x.T @ x).clamp_min(0).sqrt()),
        "torch fp32 svdvals")
    add(rk, "numpy fp32 svd", lambda: rankme_from_sv(torch.from_numpy(np.linalg.svd(x.cpu().numpy(),
                                                                                      compute_uv=False))),
        "torch fp32 svdvals")
    add(rk, "entrotrain rankme", lambda: rankme(x), "torch fp32 svdvals")
    add(rk, "entrotrain rankme float64", lambda: rankme(x, precision="float64"), "torch fp32 svdvals")
    add(vs, "torch fp32 eigvalsh", lambda: torch.exp(_ent(torch.linalg.eigvalsh(vendi_gram(x)))), "torch fp32 eigvalsh")
    add(vs, "numpy fp32 eigvalsh", lambda: torch.exp(_ent(np_eigvalsh(vendi_gram(x)))), "torch fp32 eigvalsh")
    add(vs, "torch fp32 svdvals", lambda: torch.exp(_ent(torch.linalg.svdvals(_unit_rows(x)) ** 2 / n)),
        "torch fp32 eigvalsh")
    skipped: dict[str, str] = {}
    try:
        from vendi_score import vendi

        xn = x.cpu().numpy()
        add(vs, "vendi_score package (score_dual)", lambda: vendi.score_dual(xn, q=1), "torch fp32 eigvalsh")
    except Exception as e:  # noqa: BLE001
        skipped[f"{vs}: vendi_score package"] = f"not importable ({type(e).__name__})"
    add(vs, "entrotrain vendi_score", lambda: vendi_score(x), "torch fp32 eigvalsh")
    add(vs, "entrotrain vendi_score float64", lambda: vendi_score(x, precision="float64"), "torch fp32 eigvalsh")

    def nograd(f):
        def run():
            with torch.no_grad():
                return f()

        return run

    cases = {k: nograd(f) for k, f in cases.items()}
    errors = {k: abs(float(c()) - ref[k.split(":")[0]]) for k, c in cases.items()}
    print("# float64 values: " + ", ".join(f"{k} {v:.6g}" for k, v in ref.items()))
    run_table(f"Spectra, n = {a.n}, d = {a.d} fp32 rows (10 Gaussian blobs)", cases, errors, base, a, device,
              skipped, nomem)


# ---------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, no torch.compile: proves the script runs")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed interleaved rounds (min reported)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--chunk-rows", type=int, default=2048, help="rows per block of the verl chunked row")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-timeout", type=float, default=60.0)
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory column")
    p.add_argument("--only", default="logits,attention,spectra", help="comma-separated tables to run")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.quick:
        a.rows, a.vocab, a.chunk_rows = 64, 512, 16
        a.batch, a.heads, a.seq, a.dim = 1, 2, 64, 16
        a.n, a.d, a.repeats = 128, 16, 2
    device = C.resolve_device(a.device)
    C.setup_threads(a.threads)
    print(f"# {C.environment_line(device, a.threads)}")
    print("# ratios: min over rounds / the baseline's min, same run; peak extra MiB: torch profiler live tensor bytes")
    only = set(a.only.split(","))
    if "logits" in only:
        logits_table(a, device)
    if "attention" in only:
        attention_table(a, device)
    if "spectra" in only:
        spectra_table(a, device)


if __name__ == "__main__":
    main()
