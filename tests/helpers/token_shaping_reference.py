"""Float64 brute-force references for entrotrain.functional.token_shaping (loops, no vectorisation).

``canon_reference`` is a float64 transcription of ``compute_dr_entropy_per_token_group_outcome_advantage`` and
``compute_dr_length_on_mean_group_outcome_advantage`` (``biuboomc/CANON``, ``verl/trainer/ppo/core_algos.py``):
per-uid dicts, Python's stable ``sorted`` on the metric, ``mid = n // 2``, sizes-1 groups with zero means.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def window_reference(entropy, mask, window: int, align: str = "forward"):
    """(mean, count) lists of lists, one window at a time."""
    b, t = entropy.shape
    means = [[0.0] * t for _ in range(b)]
    counts = [[0] * t for _ in range(b)]
    for i in range(b):
        for p in range(t):
            if not bool(mask[i, p]):
                continue
            if align == "forward":
                span = range(p + 1, p + 1 + window)
            elif align == "trailing":
                span = range(p - window + 1, p + 1)
            else:
                lo = p - (window - 1) // 2
                span = range(lo, lo + window)
            vals = [float(entropy[i, s]) for s in span if 0 <= s < t and bool(mask[i, s])]
            counts[i][p] = len(vals)
            if vals:
                means[i][p] = math.fsum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else math.nan
    return _t(means, (b, t), torch.float64), _t(counts, (b, t), torch.int64)


def _t(rows, shape, dtype):
    return torch.tensor(rows, dtype=dtype).reshape(shape)


def phase_ids_reference(token_ids, mask, delimiter, n_phases: int = 2):
    """Phase of each token: the number of delimiter runs starting at or before it (capped), -1 on padding."""
    b, t = token_ids.shape
    k = len(delimiter)
    out = [[-1] * t for _ in range(b)]
    for i in range(b):
        seen = 0
        for p in range(t):
            if p + k <= t and all(
                int(token_ids[i, p + j]) == delimiter[j] and bool(mask[i, p + j]) for j in range(k)
            ):
                seen += 1
            if bool(mask[i, p]):
                out[i][p] = min(seen, n_phases - 1)
    return _t(out, (b, t), torch.int64)


def phase_reference(entropy, mask, phase_ids, n_phases: int):
    b, t = entropy.shape
    means = [[0.0] * n_phases for _ in range(b)]
    counts = [[0] * n_phases for _ in range(b)]
    for i in range(b):
        for ph in range(n_phases):
            vals = [float(entropy[i, p]) for p in range(t) if bool(mask[i, p]) and int(phase_ids[i, p]) == ph]
            counts[i][ph] = len(vals)
            if vals:
                means[i][ph] = math.fsum(vals) / len(vals) if all(math.isfinite(v) for v in vals) else math.nan
    return _t(means, (b, n_phases), torch.float64), _t(counts, (b, n_phases), torch.int64)


def canon_reference(scores, metric, index, alpha=1.0, beta=0.0, _lambda=1.0, max_length=1.0, variant="entropy"):
    """CANON's per-sample Python loop, in float64 (``scores``: (bs,) rewards; ``metric``: (bs,); ``index``: uids)."""
    scores = [float(s) for s in scores]
    metric = [float(m) for m in metric]
    id2metric, id2score, id2ids = defaultdict(list), defaultdict(list), defaultdict(list)
    high_of = {}
    score_low, score_high = {}, {}
    mean_low, mean_high = {}, {}
    bsz = len(scores)
    for i in range(bsz):
        id2metric[index[i]].append(metric[i])
        id2score[index[i]].append(scores[i])
        id2ids[index[i]].append(i)
    for idx in id2metric:
        paired = sorted(zip(id2metric[idx], id2score[idx], id2ids[idx]), key=lambda x: x[0])
        sorted_scores = [s for (_, s, _) in paired]
        sorted_ids = [j for (_, _, j) in paired]
        mid = len(paired) // 2
        for rank, j in enumerate(sorted_ids):
            high_of[j] = rank >= mid
        score_low[idx] = sorted_scores[:mid]
        score_high[idx] = sorted_scores[mid:]
    for idx in id2score:
        if len(id2score[idx]) == 1:
            mean_low[idx] = mean_high[idx] = 0.0
        else:
            mean_low[idx] = math.fsum(score_low[idx]) / len(score_low[idx])
            mean_high[idx] = math.fsum(score_high[idx]) / len(score_high[idx])
    out = []
    for i in range(bsz):
        r, lo, hi = scores[i], mean_low[index[i]], mean_high[index[i]]
        if variant == "entropy":
            if high_of[i]:
                a = _lambda * (r - alpha * lo + beta) + (1 - _lambda) * (r - hi)
            else:
                a = _lambda * (alpha * r - hi - beta) + (1 - _lambda) * (r - lo)
        else:
            if high_of[i]:
                a = _lambda * (alpha * r - lo + beta) + (1 - _lambda) * (r - hi)
            else:
                a = _lambda * (r - alpha * hi - beta) + (1 - _lambda) * (r - lo)
        out.append(a / max_length)
    return torch.tensor(out, dtype=torch.float64)
