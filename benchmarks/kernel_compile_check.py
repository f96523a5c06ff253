"""Compile every Triton kernel launch of :mod:`entrotrain.kernels` for an H100 (sm_90) without a GPU, and check it.

The host code of each kernel runs on ``meta`` tensors of the real shapes (nothing is allocated, nothing launched): a
stand-in Triton driver answers "CUDA, sm_90" and a ``jit_cache_hook`` records each launch's signature (argument types
as Triton specialises them: an int argument below ``2**31`` is ``i32``) and constexprs instead of compiling it. Each
recorded launch is then compiled here, for the device:

- ``--ttir`` (fast, what tests/kernels/test_kernel_offsets.py runs): Triton IR only; reports every 32-bit integer
  multiplication that feeds a pointer offset (``tt.addptr``). It wraps past ``2**31`` elements (``row * stride`` over
  16384 x 151936 logits is 2.5e9), and Triton's CPU interpreter cannot show it (it needs > 2**31 elements behind a
  pointer).
- default: the whole pipeline down to the cubin (ptxas, bundled with triton): shared memory per block (the H100 allows
  227 KiB; over it the launch fails), registers per thread, and the stack / local memory per thread (register spills
  land on the stack: slower, not wrong), by ``cuobjdump --dump-resource-usage``.

    python benchmarks/kernel_compile_check.py            # every launch, full compile, a table (a few minutes)
    python benchmarks/kernel_compile_check.py --ttir     # 32-bit pointer offsets only; exit 1 when there is one
                                                          # (exit 3: this triton lacks the launch hook used here)

Runs on CPU; must not run with ``TRITON_INTERPRET=1`` (the kernels must be real ``JITFunction``s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402
try:
    from triton import knobs  # noqa: E402  (triton >= 3.3)
except ImportError:  # pragma: no cover - older triton: main() says so and exits 3
    knobs = argparse.Namespace(runtime=argparse.Namespace())
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MAX_SHARED = 227 * 1024  # bytes of shared memory one block may take on sm_90


class _Sm90Driver:
    """Just enough of a Triton driver for the launcher to specialise and hand the launch to ``jit_cache_hook``."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return TARGET

    def get_active_torch_device(self):
        return torch.device("meta")


LAUNCHES: list[dict] = []


def _record(*, key, fn, compile, is_manual_warmup, already_compiled, **_):
    LAUNCHES.append(dict(fn=fn.jit_function, src=compile))
    return True  # skip the compile (and so the launch)


def _hook(*args, **kwargs):
    # Triton 3.9 calls jit_cache_hook(key=..., repr=..., fn=JitFunctionInfo, compile=dict, ...)
    return _record(**kwargs)


def collect(cases: list[tuple[str, callable]]) -> list[dict]:
    """Run each case's host code on meta tensors and return the launches it makes (kernel, signature, constexprs)."""
    from triton.runtime import driver

    import entrotrain.kernels.attention_entropy as attn
    import entrotrain.kernels.linear_entropy as head
    import entrotrain.kernels.logits_entropy as logits

    for mod in (attn, head, logits):
        mod.check_kernel_inputs = lambda *a: None  # meta tensors are not CUDA tensors
    driver.set_active(_Sm90Driver())
    knobs.runtime.jit_cache_hook = _hook
    out = []
    try:
        for name, case in cases:
            LAUNCHES.clear()
            case()
            for launch in LAUNCHES:
                src = launch["src"]
                constants = dict(src["constants"])
                if "DOT_UPCAST" in constants:
                    constants["DOT_UPCAST"] = False  # meta tensors are not on CUDA: the host chose the CPU variant
                options = {k: src[k] for k in ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion")}
                out.append(dict(case=name, fn=launch["fn"], signature=src["signature"], constants=constants,
                                attrs=src["configs"][0], options=options))
    finally:
        knobs.runtime.jit_cache_hook = None  # the stand-in driver stays: this process never launches a kernel
    return out


def _meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, dtype=dtype, device="meta", requires_grad=grad)


def default_cases() -> list[tuple[str, callable]]:
    """The DESIGN §6 target shapes (16384 x 151936 logits), head dims 64 / 128 / 256, masks, fp32 and bf16."""
    import entrotrain.kernels.attention_entropy as attn
    from entrotrain.kernels.attention_entropy import attention_entropy_stats
    from entrotrain.kernels.linear_entropy import linear_entropy_and_logprobs
    from entrotrain.kernels.logits_entropy import entropy_from_logits

    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        tag = str(dtype).replace("torch.", "")

        def logits_case(dtype=dtype):
            x = _meta(16384, 151936, dtype=dtype, grad=True)
            entropy_from_logits(x).sum().backward()

        def logits_masked(dtype=dtype):
            x = _meta(151936, 16384, dtype=dtype, grad=True)  # vocabulary on dim 0: column stride 16384
            mask = torch.empty(151936, 1, dtype=torch.bool, device="meta")
            entropy_from_logits(x, dim=0, mask=mask).sum().backward()

        def head_case(dtype=dtype):
            h, w = _meta(16384, 4096, dtype=dtype, grad=True), _meta(151936, 4096, dtype=dtype, grad=True)
            y = torch.empty(16384, dtype=torch.long, device="meta")
            out = linear_entropy_and_logprobs(h, w, y, bias=_meta(151936, dtype=dtype, grad=True))
            (out.entropy.sum() + out.logprobs.sum()).backward()

        cases += [(f"logits {tag}", logits_case), (f"logits dim0+mask {tag}", logits_masked),
                  (f"head {tag}", head_case)]
        for d in (64, 128, 256):
            def attn_case(dtype=dtype, d=d):
                q, k = _meta(2, 32, 4096, d, dtype=dtype, grad=True), _meta(2, 8, 4096, d, dtype=dtype, grad=True)
                attention_entropy_stats(q, k, is_causal=True, window=1024).entropy.sum().backward()

            def attn_masked(dtype=dtype, d=d):
                q, k = _meta(2, 32, 4096, d, dtype=dtype, grad=True), _meta(2, 32, 4096, d, dtype=dtype, grad=True)
                shape = (2, 32, 4096, 4096)  # a (B, 1, N, N) boolean mask and additive bias, a key padding mask
                valid = torch.empty(2, 1, 4096, 4096, dtype=torch.bool, device="meta").expand(shape)
                bias = torch.empty(2, 1, 4096, 4096, dtype=dtype, device="meta").expand(shape)
                kpm = torch.empty(2, 4096, dtype=torch.bool, device="meta")
                masks = attn._Masks(valid.view(torch.uint8), bias, kpm.view(torch.uint8), False, None)
                attn._TritonAttentionEntropy.apply(q, k, masks, 0.125)[0].sum().backward()

            cases += [(f"attn d={d} causal+window GQA {tag}", attn_case), (f"attn d={d} bias+kpm {tag}", attn_masked)]

        def attn_causal(dtype=dtype):  # the key / query loop bounds of causal alone, and of a window alone
            q, k = _meta(2, 8, 1000, 64, dtype=dtype, grad=True), _meta(2, 8, 1000, 64, dtype=dtype, grad=True)
            attention_entropy_stats(q, k, is_causal=True).entropy.sum().backward()
            attention_entropy_stats(q, k, window=100).entropy.sum().backward()

        cases.append((f"attn d=64 causal / window {tag}", attn_causal))
    return cases


def _source(launch: dict) -> ASTSource:
    return ASTSource(fn=launch["fn"], signature=launch["signature"], constexprs=launch["constants"],
                     attrs=launch["attrs"])


def ttir(launch: dict) -> str:
    """Triton IR of one launch (after Triton's own TTIR passes) for sm_90."""
    from triton._C.libtriton import ir
    from triton.compiler import make_backend

    backend = make_backend(TARGET)
    options = backend.parse_options(dict(launch["options"]))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = _source(launch).make_ir(TARGET, options, backend.get_codegen_implementation(options),
                                     backend.get_module_map(), context)
    stages: dict = {}
    backend.add_stages(stages, options, _source(launch).language)
    return str(stages["ttir"](module, {}))


_OP = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)? = ([\w.]+) (.*?)(?:\s+loc\((#loc\d*)\))?$", re.M)
_LOC_DEF = re.compile(r"^(#loc\d*) = loc\((.*)\)$", re.M)
_STOP = ("tt.load", "scf.for", "scf.if", "scf.while", "tt.reduce", "tt.call")


def _where(loc: str, defs: dict[str, str], depth: int = 0) -> str:
    """``file.py:line`` (and the variable name when Triton kept one) of an MLIR location reference."""
    text = defs.get(loc, loc)
    line = re.search(r'"([^"]+\.py)":(\d+):\d+', text)
    if line:
        return f"{Path(line[1]).name}:{line[2]}"
    named = re.match(r'"([^"]+)"\((#loc\d*)\)', text)
    if named and depth < 20:
        return f"{named[1]} at {_where(named[2], defs, depth + 1)}"
    call = re.match(r"callsite\((#loc\d*) at (#loc\d*)\)", text)
    if call and depth < 20:
        return _where(call[1], defs, depth + 1)
    return text


def narrow_offsets(ir_text: str) -> list[str]:
    """Every 32-bit integer multiplication that feeds a pointer offset (``tt.addptr``), as ``name at file:line``.

    ``index * stride`` (or ``program_id * BLOCK``) in ``i32`` wraps past ``2**31``; the offsets must be built from
    ``int64`` operands. Walks each ``tt.addptr``'s offset back through its defining ops (stopping at loads, loops and
    reductions).
    """
    locs = dict(_LOC_DEF.findall(ir_text))
    ops = {m[1]: (m[2], m[3], m[4]) for m in _OP.finditer(ir_text)}
    found: set[str] = set()
    for op, rest, _loc in ops.values():
        if op != "tt.addptr":
            continue
        operands = re.findall(r"%[\w.$-]+", rest.split(" : ")[0])
        stack, seen = operands[1:], set()
        while stack:
            name = stack.pop()
            if name in seen or name not in ops:
                continue
            seen.add(name)
            kind, body, loc = ops[name]
            if kind in _STOP:
                continue
            if kind == "arith.muli" and re.search(r"\bi32\b|xi32>", body.split(" : ")[-1]):
                found.add(_where(loc, locs) if loc else name)
            stack.extend(re.findall(r"%[\w.$-]+", body.split(" : ")[0]))
    return sorted(found)


def resources(launch: dict) -> dict:
    """Compile to a cubin for sm_90: shared memory (bytes), registers, local memory (spills) per thread."""
    kernel = triton.compile(_source(launch), target=TARGET, options=dict(launch["options"]))
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    found = {key: re.search(rf"{key}:(\d+)", usage) for key in ("REG", "STACK", "LOCAL")}
    regs, stack, local = (int(m[1]) if m else -1 for m in found.values())
    return dict(shared=kernel.metadata.shared, regs=regs, stack=stack, local=local)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ttir", action="store_true", help="32-bit pointer offsets only (no ptxas)")
    parser.add_argument("--only", default="", help="comma-separated substrings of the case names to run")
    parser.add_argument("--json", action="store_true", help="one JSON object per launch instead of a table")
    args = parser.parse_args(argv)
    if not hasattr(knobs.runtime, "jit_cache_hook"):
        print(f"kernel_compile_check: triton {triton.__version__} has no knobs.runtime.jit_cache_hook (written for "
              "3.9); nothing checked", file=sys.stderr)
        return 3
    cases = [c for c in default_cases() if not args.only or any(s in c[0] for s in args.only.split(","))]
    bad = 0
    seen = set()
    for launch in collect(cases):
        key = (launch["fn"].__name__, repr(sorted(launch["signature"].items())),
               repr(sorted(launch["constants"].items(), key=repr)))
        if key in seen:
            continue
        seen.add(key)
        name = launch["fn"].__name__
        names = launch["fn"].arg_names
        consts = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in launch["constants"].items()}
        consts = {k: v for k, v in consts.items() if isinstance(k, str) and k.isupper()}
        row = dict(case=launch["case"], kernel=name, warps=launch["options"].get("num_warps"),
                   stages=launch["options"].get("num_stages"), constexprs=consts)
        try:
            if args.ttir:
                row["narrow_offsets"] = narrow_offsets(ttir(launch))
                bad += bool(row["narrow_offsets"])
            else:
                row.update(resources(launch))
                bad += row["shared"] > MAX_SHARED  # a spill (stack > 0) is slow, not wrong: reported only
        except Exception as error:  # noqa: BLE001 - a compile failure is what this reports
            row["error"] = f"{type(error).__name__}: {error}"[:500]
            bad += 1
        if args.json:
            print(json.dumps(row, default=str), flush=True)
        else:
            detail = row.get("error") or (f"32-bit offsets: {row['narrow_offsets']}" if args.ttir else
                                          f"shared {row['shared']:>6} B  regs {row['regs']:>3}  "
                                          f"stack {row['stack']} B  local {row['local']} B")
            print(f"{row['case']:<32} {name:<24} w{row['warps']} s{row['stages']}  {detail}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
