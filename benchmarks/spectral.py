"""Benchmark: spectral entropy of representations, exact eigh vs the cheap exact routes vs stochastic Lanczos (SLQ).

Data: n rows from 10 Gaussian blobs in d dims (centres N(0, 4²), unit noise), float64, the DSE defaults σ = 10, t = 1.
Rows, for each (n, d):

    DSE build K        diffusion_matrix(x, σ): the n×n kernel D^-½ G D^-½ (paid by every DSE route)
    DSE eigh           diffusion_spectral_entropy's spectrum: float64 eigvalsh of K, then H₁ (exact)
    DSE SLQ P×S        slq_spectral_entropy on the same K (exact trace Σ 1/deg) with P Rademacher probes and S
                       Lanczos steps: H₁ ± SE
    DSE H₂ Frobenius   order 2 from ‖K‖_F / tr K, no eigendecomposition (exact; error vs the eigh spectrum's H₂)
    Vendi eigh n×n     cosine-kernel Vendi (= matrix-entropy family), eigvalsh of the n×n kernel K/n (n <= 4000)
    Vendi cov d×d      vendi_score(x): the same spectrum from the d×d matrix X̂ᵀX̂/n (exact, the cheap route)

Errors are in nats (DSE's bits × ln 2), against the eigh value of the same n, d. "SE" is the estimator's own
standard error (probe variance); |err| ≤ 2·SE is what an honest error bar gives in ~95 % of seeds. eigh of an n×n
float64 matrix is O(n³): rows above ``--exact-max-n`` are skipped (at n = 10 000 it costs minutes on 2 CPU cores;
pass ``--exact-max-n 10000`` to include it). Times are the median of ``--repeats`` interleaved rounds
(``_common.time_cases``), kernel build excluded from the SLQ and eigh rows.

    python benchmarks/spectral.py                                   # n = 1000, 4000, 10000; d = 64; ~3-5 min, 2 cores
    python benchmarks/spectral.py --exact-max-n 10000               # + the n = 10 000 exact eigh (~2+ min more on CPU)
    python benchmarks/spectral.py --dims 64 256 --ns 1000 4000
    python benchmarks/spectral.py --quick                           # n = 64, d = 8: proves the script runs
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C  # noqa: E402

from entrotrain.functional.representation import diffusion_matrix, vendi_score  # noqa: E402
from entrotrain.functional.spectrum import kernel_spectrum, renyi2, spectral_entropy  # noqa: E402
from entrotrain.functional.stochastic_spectrum import slq_spectral_entropy  # noqa: E402


def make_rows(n: int, d: int, seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, d, generator=g, dtype=torch.float64) * 4.0
    x = centres[torch.randint(0, 10, (n,), generator=g)] + torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ns", type=int, nargs="+", default=[1000, 4000, 10000])
    p.add_argument("--dims", type=int, nargs="+", default=[64])
    p.add_argument("--sigma", type=float, default=10.0)
    p.add_argument("--exact-max-n", type=int, default=4000, help="largest n for the O(n³) eigh rows")
    p.add_argument("--probes", type=int, nargs="+", default=[16, 64], help="SLQ probe counts (one row each)")
    p.add_argument("--steps", type=int, nargs="+", default=[30, 30], help="SLQ Lanczos steps, paired with --probes")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="n = 64, d = 8, one SLQ row of 4 probes x 8 steps: proves the script runs (seconds)")
    a = p.parse_args(argv)
    if a.quick:
        a.ns, a.dims, a.probes, a.steps, a.repeats = [64], [8], [4], [8], 1
    if len(a.probes) != len(a.steps):
        raise SystemExit("--probes and --steps must have the same length (one SLQ row per pair).")
    device = C.resolve_device(a.device)
    C.setup_threads(a.threads)
    print(f"# spectral entropy: exact eigh vs cheap exact routes vs SLQ; σ = {a.sigma}, t = 1, float64")
    print(f"# {C.environment_line(device, a.threads)}")
    note = C.contention_note(device)
    if note:
        print(f"# {note}")

    headers = ["n", "d", "row", "time ms", "value (nats)", "|err| nats", "SE nats", "|err|/SE"]
    rows: list[list[str]] = []
    skipped: dict[str, str] = {}
    ln2 = math.log(2.0)
    for n in a.ns:
        for d in a.dims:
            x = make_rows(n, d, a.seed, device)
            k_holder: dict[str, torch.Tensor] = {}

            def build(x=x):
                k_holder["K"] = diffusion_matrix(x, a.sigma)

            t_build = C.time_cases({"build": build}, repeats=a.repeats, warmup=0, device=device)["build"]
            k = k_holder["K"]
            rows.append([str(n), str(d), "DSE build K", C.fmt(t_build.median_ms), "", "", "", ""])
            exact = exact2 = None
            cases = {}
            res: dict[str, object] = {}
            if n <= a.exact_max_n:

                def eigh_case(k=k):
                    lam = kernel_spectrum(k, negative="abs")
                    res["eigh"] = (spectral_entropy(lam, 1.0), spectral_entropy(lam, 2.0))

                cases["DSE eigh"] = eigh_case
            else:
                skipped[f"DSE eigh n={n} d={d}"] = f"n > --exact-max-n {a.exact_max_n} (O(n³) eigh)"
            for probes, steps in zip(a.probes, a.steps):
                name = f"DSE SLQ {probes}x{steps}"

                def slq_case(k=k, probes=probes, steps=steps, name=name):
                    res[name] = slq_spectral_entropy(
                        k, n, trace=float(torch.diagonal(k).sum()), n_probes=probes, n_steps=steps, seed=a.seed
                    )

                cases[name] = slq_case

            def frob_case(k=k):
                res["frob"] = renyi2(k)

            cases["DSE H2 Frobenius"] = frob_case
            if n <= min(a.exact_max_n, 4000):

                def vendi_eigh(x=x):
                    xn = x / x.norm(dim=1, keepdim=True)
                    res["veigh"] = spectral_entropy(kernel_spectrum(xn @ xn.T / n), 1.0, normalize=False)

                cases["Vendi eigh n×n"] = vendi_eigh

            def vendi_cov(x=x):
                res["vcov"] = torch.log(vendi_score(x))

            cases["Vendi cov d×d"] = vendi_cov
            times = C.time_cases(cases, repeats=a.repeats, warmup=0, device=device)
            if "eigh" in res:
                exact, exact2 = (float(v) for v in res["eigh"])
            for name, t in times.items():
                val = err = se = ratio = ""
                if name == "DSE eigh":
                    val = f"{exact:.6f}"
                elif name.startswith("DSE SLQ"):
                    est = res[name]
                    v, s = float(est.value), float(est.stderr)
                    val, se = f"{v:.6f}", f"{s:.1e}"
                    if exact is not None:
                        err = f"{abs(v - exact):.1e}"
                        ratio = f"{abs(v - exact) / s:.2f}"
                elif name == "DSE H2 Frobenius":
                    v = float(res["frob"])
                    val = f"{v:.6f} (H₂)"
                    if exact2 is not None:
                        err = f"{abs(v - exact2):.1e}"
                elif name == "Vendi eigh n×n":
                    val = f"{float(res['veigh']):.6f}"
                elif name == "Vendi cov d×d":
                    v = float(res["vcov"])
                    val = f"{v:.6f}"
                    if "veigh" in res:
                        err = f"{abs(v - float(res['veigh'])):.1e}"
                rows.append([str(n), str(d), name, C.fmt(t.median_ms), val, err, se, ratio])
            del k
            k_holder.clear()
            print(f"# done n={n} d={d} (DSE exact {'yes' if exact is not None else 'skipped'}: "
                  f"{'' if exact is None else f'{exact / ln2:.4f} bits'})", flush=True)
    C.print_table(headers, rows, skipped)


if __name__ == "__main__":
    main()
