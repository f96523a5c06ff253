"""Every pointer offset of the Triton kernels is computed in int64 (a 32-bit ``index * stride`` wraps past 2**31).

The interpreter cannot show the wrap (it needs more than 2**31 elements behind one pointer), so this compiles the
kernels' real launches at the DESIGN §6 shapes (16384 x 151936 logits, a (V, rows) layout, a 4096-token attention
with a dense (B, 1, N, N) mask and bias) to Triton IR for sm_90, on CPU, and asserts that no 32-bit multiplication
feeds a ``tt.addptr`` (``benchmarks/kernel_compile_check.py --ttir``; a subprocess, since this process runs triton
in interpreter mode).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", minversion="3.0")  # older triton: no kernels (dispatch.MIN_TRITON)

ROOT = Path(__file__).resolve().parents[2]
CASES = "logits dim0+mask bfloat16,head bfloat16,attn d=64 bias+kpm bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU check of the compiled IR; on a GPU the kernels run")
def test_every_pointer_offset_is_int64():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernel_compile_check.py"), "--ttir", "--json", "--only", CASES],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
    )
    if done.returncode == 3:
        pytest.skip(done.stderr.strip())
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {r["kernel"] for r in rows} == {
        "_logits_entropy_fwd", "_logits_entropy_bwd", "_linear_entropy_fwd", "_linear_entropy_bwd",
        "_attn_entropy_fwd", "_attn_entropy_bwd_dq", "_attn_entropy_bwd_dk",
    }, done.stderr[-2000:]
    narrow = {f"{r['case']} {r['kernel']}": r.get("narrow_offsets", r.get("error")) for r in rows}
    assert all(v == [] for v in narrow.values()), narrow
    assert done.returncode == 0, done.stderr[-2000:]
