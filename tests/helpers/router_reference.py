"""Independent float64 brute force of the router statistics: one row at a time, sorted probabilities, plain loops."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def router_reference(
    logits: Tensor,
    top_k: int,
    mask: Tensor | None = None,
    q: float = 1.1,
    dead_threshold: float = 0.0,
    scoring: str = "softmax",
) -> dict[str, object]:
    """Expected per-layer values of ``logits`` ``(rows, E)``: kept (mask) finite rows only. ``scoring='sigmoid'``:
    of the normalised sigmoid scores ``sigmoid(z) / sum(sigmoid(z))`` (DeepSeek-V3); ``'sqrtsoftplus'``: of
    ``sqrt(softplus(z))`` normalised (DeepSeek-V4)."""
    z = logits.detach().double().reshape(-1, logits.shape[-1])
    n, e = z.shape
    keep = [True] * n if mask is None else [bool(v) for v in mask.reshape(-1).tolist()]
    ent = ts = m1 = mk = 0.0
    counts = [0.0] * e
    mass = [0.0] * e
    rows = bad = 0
    for r in range(n):
        if not keep[r]:
            continue
        if not bool(torch.isfinite(z[r]).all()):
            bad += 1
            continue
        rows += 1
        if scoring in ("sigmoid", "sqrtsoftplus"):
            if scoring == "sigmoid":
                s = [1.0 / (1.0 + math.exp(-x)) for x in z[r].tolist()]
            else:
                s = [math.sqrt(math.log1p(math.exp(x))) for x in z[r].tolist()]
            p = [x / sum(s) for x in s]
        else:
            p = torch.softmax(z[r], 0).tolist()
        shannon = -sum(x * math.log(x) for x in p if x > 0)
        ent += shannon
        ts += shannon if q == 1 else (1 - sum(x**q for x in p)) / (q - 1)
        order = sorted(range(e), key=lambda j: -p[j])
        for j in order[:top_k]:
            counts[j] += 1
        for j in range(e):
            mass[j] += p[j]
        srt = [p[j] for j in order] + [0.0]
        m1 += srt[0] - srt[1]
        mk += srt[top_k - 1] - srt[top_k]
    out: dict[str, object] = {"rows": rows, "nonfinite": bad}
    if rows == 0:
        return out
    total = sum(counts)
    load = [c / total for c in counts]
    h_load = -sum(f * math.log(f) for f in load if f > 0)
    log_e = math.log(e) if e > 1 else 0.0
    out.update(
        entropy=ent / rows,
        entropy_norm=ent / rows / log_e if log_e else 0.0,
        tsallis=ts / rows,
        load=load,
        importance=[m / rows for m in mass],
        load_entropy=h_load,
        load_entropy_norm=h_load / log_e if log_e else 0.0,
        dead_frac=sum(1 for c, f in zip(counts, load) if c == 0 or f < dead_threshold) / e,
        top1_margin=m1 / rows,
        topk_margin=mk / rows,
    )
    return out
