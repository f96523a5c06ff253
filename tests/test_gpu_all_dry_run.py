"""``benchmarks/gpu_all.sh``: the one-script GPU collection (issue 18, item 5), exercised on CPU.

GPUs are lent to few sessions, so the script must be ready the day one is: its dry run (``DRY_RUN=1`` or
``--dry-run``) runs every step on CPU with the smallest sizes / ``--quick`` and must produce every table and a summary.
The dry run here also hides ``wandb`` (a ``sitecustomize`` that refuses the import), as the device image lacks it.
The other tests drive the summary's failure paths with a stand-in interpreter (no torch needed, about a second each).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_all.sh"
# most valuable first: a step that the budget cuts off is the least missed
STEPS = ["kernel_tests", "triton_kernels", "triton_kernels_grad", "monitor_overhead", "spectral", "rollback",
         "fsdp1_tests"]
BASH = shutil.which("bash")
TIMEOUT = shutil.which("timeout")

pytestmark = pytest.mark.skipif(
    BASH is None or TIMEOUT is None, reason="benchmarks/gpu_all.sh needs bash and coreutils `timeout`; not found here"
)

NO_WANDB = """\
import importlib.abc, sys


class _NoWandb(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "wandb" or name.startswith("wandb."):
            raise ModuleNotFoundError("No module named 'wandb' (hidden: the GPU image has none)")
        return None


sys.meta_path.insert(0, _NoWandb())
"""


def _run(tmp_path: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env}
    full.pop("ENTROTRAIN_IMPL", None)
    return subprocess.run(
        [BASH, str(SCRIPT), *args], cwd=tmp_path, env=full, capture_output=True, text=True, timeout=timeout
    )


def _summary(out: Path) -> dict[str, str]:
    """step name -> status, from summary.txt's step lines."""
    status = {}
    for line in (out / "summary.txt").read_text().splitlines():
        m = re.match(r"^(\w+)\s+(\S+)\s+\d+ s\s+\(limit", line)
        if m:
            status[m.group(1)] = m.group(2)
    return status


# what proves each step produced its table (titles and header rows printed by the scripts themselves)
TABLES = {
    "kernel_tests": [r"\d+ passed"],
    # on CPU the FSDP1 CUDA tests skip (saying why) but for the CPU refusal check
    "fsdp1_tests": [r"\d+ passed", r"SKIPPED .*test_fsdp1_cuda.py.*needs a CUDA device"],
    "triton_kernels": [r"## logits entropy 64 x 512 float32 \(no grad\)", r"## fused head entropy",
                       r"## attention entropy B=1 H=2 N=64 d=32 causal float32 fwd\n",
                       r"## attention entropy .* fwd\+bwd", r"\| row +\| median ms", r"\| SDPA fwd\+bwd",
                       r"\| naive +\|"],
    "triton_kernels_grad": [r"## logits entropy 64 x 512 float32 \(fwd\+bwd\)", r"## fused head .*\(fwd\+bwd\)",
                            r"\| torch path +\|"],
    "monitor_overhead": [r"\| all monitors, logging step", r"\| no monitor", r"bit-identical",
                         r"\| amortised at every 50 \(medians\)"],
    "rollback": [r"\| model +\| +what", r"hold \(RollbackState.take\)", r"roll back \(restore\)"],
    "spectral": [r"\| +DSE eigh \|", r"\| +DSE SLQ 4x8 \|", r"\| +Vendi cov d×d \|", r"\| n +\| d \|",
                 r"# verdict DESIGN §6 SLQ .*: target is for GPU: not judged on CPU; --quick: the sizes are not"],
}


def test_dry_run_runs_every_step_and_writes_every_table(tmp_path: Path) -> None:
    hide = tmp_path / "nowandb"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(NO_WANDB)
    pythonpath = os.pathsep.join([str(hide), *filter(None, [os.environ.get("PYTHONPATH")])])
    # each of the 7 steps has its own 60 s limit in the dry run: a busy shared CPU must not turn a slow dry run into a
    # TimeoutExpired without a summary (the whole took ~60-130 s on a 2-core machine shared by 8 sessions)
    proc = _run(tmp_path, DRY_RUN="1", PYTHONPATH=pythonpath, OMP_NUM_THREADS="1", timeout=len(STEPS) * 60 + 60)
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout + proc.stderr
    status = _summary(out)
    assert list(status) == STEPS, (out / "summary.txt").read_text()
    assert set(status.values()) == {"ok"}, (out / "summary.txt").read_text()
    summary = (out / "summary.txt").read_text()
    assert "dry run" in summary and "all steps ok" in summary and "# card: " in summary
    assert (out / "nvidia-smi.txt").read_text().strip()
    for step, patterns in TABLES.items():
        text = (out / f"{step}.txt").read_text()
        assert "Traceback" not in text, text
        for pattern in patterns:
            assert re.search(pattern, text), f"{step}.txt lacks /{pattern}/:\n{text}"
    assert "--device cpu" in summary and "--quick" in summary and "--grad" in summary
    assert sorted(p.name for p in out.iterdir()) == sorted(  # 9 flat files: all come back from a device
        ["summary.txt", "nvidia-smi.txt", *[f"{s}.txt" for s in STEPS]])


def _stand_in(tmp_path: Path, body: str) -> str:
    fake = tmp_path / "fake_python"
    fake.write_text(f"#!{BASH}\n{body}\n")
    fake.chmod(0o755)
    return str(fake)


def test_failures_and_timeouts_are_recorded_and_the_script_goes_on(tmp_path: Path) -> None:
    # pytest (kernel and FSDP1 tests) "fails" (rc 3); every other step hangs past its 1 s limit
    fake = _stand_in(tmp_path, 'case "$*" in *pytest*) echo boom; exit 3 ;; *) exec sleep 30 ;; esac')
    limits = {f"T_{s.upper()}": "1" for s in STEPS}
    proc = _run(tmp_path, "--dry-run", PYTHON=fake, **limits)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = _summary(tmp_path / "out")
    pytest_steps = {"kernel_tests", "fsdp1_tests"}
    assert status == {s: "FAILED(3)" if s in pytest_steps else "TIMEOUT" for s in STEPS}, status
    assert "boom" in (tmp_path / "out" / "kernel_tests.txt").read_text()
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "NOT all ok" in summary
    assert "    | boom" in summary  # a failed step's output tail is in the summary that comes back


def test_a_step_that_ignores_sigterm_does_not_run_past_the_budget(tmp_path: Path) -> None:
    """`timeout -k 10` kills 10 s after the limit when the step ignores SIGTERM: that grace is inside the budget."""
    import time

    fake = _stand_in(tmp_path, "trap '' TERM; sleep 30")
    started = time.monotonic()
    proc = _run(tmp_path, "--dry-run", PYTHON=fake, GPU_ALL_BUDGET_S="12")
    assert time.monotonic() - started < 12, proc.stdout
    assert proc.returncode == 1 and set(_summary(tmp_path / "out").values()) == {"SKIPPED"}


def test_a_spent_budget_skips_the_remaining_steps(tmp_path: Path) -> None:
    fake = _stand_in(tmp_path, "exit 0")
    proc = _run(tmp_path, "--dry-run", PYTHON=fake, GPU_ALL_BUDGET_S="0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _summary(tmp_path / "out") == {s: "SKIPPED" for s in STEPS}


def test_default_output_folder_and_arguments(tmp_path: Path) -> None:
    fake = _stand_in(tmp_path, "exit 0")
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run([BASH, str(SCRIPT), "--dry-run"], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "PYTHON": fake}, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _summary(tmp_path / "gpu_out") == {s: "ok" for s in STEPS}  # ./gpu_out when OUT is unset
    bad = subprocess.run([BASH, str(SCRIPT), "--bogus"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--bogus" in bad.stderr
    usage = subprocess.run([BASH, str(SCRIPT), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert usage.returncode == 0 and "DRY_RUN=1" in usage.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_mode_without_cuda_stops_with_a_clear_message(tmp_path: Path) -> None:
    proc = _run(tmp_path, DRY_RUN="0")
    assert proc.returncode == 1
    assert "NO CUDA" in proc.stderr and "DRY_RUN=1" in proc.stderr
    assert "NO CUDA" in (tmp_path / "out" / "summary.txt").read_text()


def _gpu_steps() -> list[tuple[str, int]]:
    """(step, limit in seconds) of the GPU collection, in the order the script runs them."""
    text = SCRIPT.read_text()
    gpu = text[text.index("\nelse\n", text.index('if [ "$DRY_RUN" = 1 ]; then\n    # the kernel step')):]
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^    step (\w+) (\d+) ", gpu, re.M)]


def test_gpu_steps_run_most_valuable_first_and_fit_the_budget() -> None:
    """The device session has 15 minutes in all, a few of them its start, so the script has 8 (480 s): the GPU
    limits must add up to at most 450 s (30 s for the checks before the first step), in the order of STEPS, so that
    the last step is not cut off when the others run to their limits. They added up to 575 s."""
    steps = _gpu_steps()
    assert [name for name, _ in steps] == STEPS, steps
    assert sum(limit for _, limit in steps) <= 450, steps
    assert re.search(r"^BUDGET=\$\{GPU_ALL_BUDGET_S:-480\}$", SCRIPT.read_text(), re.M)
