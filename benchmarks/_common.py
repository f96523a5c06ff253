"""Helpers shared by the benchmark scripts: timing, peak memory in a fresh process, tables.

Timing
    :func:`time_cases` runs every case once to warm up, then ``repeats`` rounds in which each case runs once, in
    turn (round-robin). Interleaving matters on a shared machine: a burst of load from another process slows every
    row of that round instead of one row, so the *ratios* between rows (which is what we quote) stay honest even when
    absolute times drift. Each sample is wall time around one call, with ``torch.cuda.synchronize`` before and after
    on CUDA. We report the median and the minimum of the samples.

Peak memory
    :func:`peak_memory` runs one case in a fresh ``spawn`` subprocess: the child builds its inputs, runs a warm-up,
    then measures.

    - CPU: the Linux resident-set high-water mark (``resource.getrusage(RUSAGE_SELF).ru_maxrss``). After the warm-up
      the child resets the kernel's high-water mark (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) so that input
      construction and warm-up do not hide the peak of the measured call, reads the current RSS from
      ``/proc/self/statm`` as the baseline, runs the call once, and reports ``ru_maxrss - baseline``. This counts
      pages actually touched (what costs RAM), whatever allocator is used. Resolution: one page (4 KiB) in
      principle; in practice a few MiB, from allocator retention (glibc keeps freed blocks under its mmap threshold
      resident) and thread stacks.
    - ``ru_maxrss`` can only grow, and a spawned child *inherits* its parent's high-water mark through fork+exec
      (the kernel copies it into ``signal->maxrss`` at exec; ``clear_refs`` does not reset that copy). So the
      scripts measure memory *before* the parent builds any large tensor, and the child reports ``floor_mib``, how
      far the high-water mark already stood above the baseline: a peak smaller than the floor is invisible, and the
      result is then printed as ``<= floor``.
    - RSS counts what the C allocator keeps, not only live tensors: glibc serves blocks under its (dynamic, up to
      32 MiB) mmap threshold from heaps it rarely gives back, and fragmentation can hold a heap at its high-water
      mark. So on CPU the child then runs the call a second time under ``torch.profiler`` with
      ``profile_memory=True`` and reports the peak of the running sum of tensor allocations and frees
      (``live_mib``): what the code itself holds at once, the CPU analogue of CUDA's ``max_memory_allocated``.
      RSS is what the machine pays; the live peak is what the code controls. Both are printed.
    - CUDA: ``torch.cuda.reset_peak_memory_stats`` then ``max_memory_allocated() - memory_allocated()`` around the
      call (caching-allocator bytes in use, not bytes reserved); ``live_mib`` is the same number.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = [
    "MemResult",
    "Timing",
    "add_common_args",
    "contention_note",
    "dtype_from_name",
    "environment_line",
    "fmt",
    "fmt_live",
    "fmt_mem",
    "fmt_ratio",
    "markdown_table",
    "print_table",
    "max_abs_diff",
    "peak_memory",
    "resolve_device",
    "setup_threads",
    "sync",
    "time_cases",
]

MiB = float(1 << 20)


# --------------------------------------------------------------------------------------------------------- options


def add_common_args(parser: argparse.ArgumentParser, *, repeats: int) -> None:
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--repeats", type=int, default=repeats, help="timed rounds per row (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--grad", action="store_true", help="time forward + backward of the mean entropy")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess peak-memory measurements")
    parser.add_argument("--seed", type=int, default=0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False on this machine.")
    return torch.device(name)


def dtype_from_name(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}[name]


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def environment_line(device: torch.device, threads: int) -> str:
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
        where += f" of {os.cpu_count()} cores"
    load = ""
    if hasattr(os, "getloadavg"):
        load = ", load average %.2f %.2f %.2f" % os.getloadavg()
    return f"torch {torch.__version__}, python {platform.python_version()}, {where}{load}"


def contention_note(device: torch.device) -> str | None:
    """A warning line when other processes compete for the CPU (load average above the core count)."""
    if device.type != "cpu" or not hasattr(os, "getloadavg"):
        return None
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return None
    return (
        f"WARNING: load average {load:.1f} > {cores} cores: other processes compete for the CPU. Ratios between "
        "rows of this run stay comparable (rounds are interleaved) but every parallel op pays for it (see README)."
    )


# ---------------------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    samples: list[float] = field(default_factory=list)  # seconds

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples) * 1e3

    @property
    def min_ms(self) -> float:
        return min(self.samples) * 1e3


def time_cases(
    cases: dict[str, Callable[[], Any]], *, repeats: int, warmup: int, device: torch.device
) -> dict[str, Timing]:
    """Wall time of each case, interleaved round-robin (see the module docstring)."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
            sync(device)
    out = {name: Timing() for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            out[name].samples.append(time.perf_counter() - t0)
    return out


# ---------------------------------------------------------------------------------------------------- peak memory


@dataclass
class MemResult:
    extra_mib: float | None = None  # peak above the baseline, MiB (CPU: resident set; CUDA: allocated)
    floor_mib: float = 0.0  # CPU: RSS peaks below this are invisible (see module docstring)
    live_mib: float | None = None  # peak of live tensor bytes above the baseline (CPU: profiler; CUDA: = extra)
    method: str = ""
    error: str | None = None
    info: dict = field(default_factory=dict)  # whatever the case's build function reported

    @property
    def resolved(self) -> bool:
        return self.error is None and self.extra_mib is not None


def _statm_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024  # bytes on macOS, KiB on Linux


def _reset_hiwater() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_fds():
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def _live_peak_mib(run: Callable[[], Any]) -> float:
    """Peak of the running sum of CPU tensor allocations minus frees during ``run()``, from the profiler."""
    from torch.profiler import DeviceType, ProfilerActivity, profile

    with _quiet_fds():  # kineto writes start/stop chatter and allocator notes straight to fds 1 and 2
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = run()
            del result
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / MiB


def _child(conn, build: Callable, kwargs: dict, device: str, threads: int) -> None:
    try:
        torch.set_num_threads(threads)
        dev = torch.device(device)
        built = build(**kwargs)
        run, warm = built[0], built[1]
        info = built[2] if len(built) > 2 else {}
        torch.ones(1 << 12, device=dev).sum()  # trivial op: thread pool / CUDA context up
        warm()
        sync(dev)
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            result = run()
            sync(dev)
            extra = (torch.cuda.max_memory_allocated(dev) - base) / MiB
            del result
            conn.send(MemResult(extra_mib=extra, method="cuda max_memory_allocated", live_mib=extra, info=info))
            return
        reset = _reset_hiwater()
        base = _statm_rss_bytes()
        before = _maxrss_bytes()
        result = run()
        after = _maxrss_bytes()
        del result
        floor = max(0.0, (before - base) / MiB)
        extra = (after - base) / MiB if after > before else None
        method = "ru_maxrss growth" + (" after clear_refs" if reset else "")
        gc.collect()
        try:
            live = _live_peak_mib(run)
        except Exception:  # the profiler is a cross-check; never lose the RSS number over it
            live = None
        conn.send(MemResult(extra_mib=extra, floor_mib=floor, method=method, live_mib=live, info=info))
    except BaseException as err:  # report, never hang the parent
        message = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        conn.send(MemResult(error=message, info={"tb": traceback.format_exc()}))
    finally:
        conn.close()


def peak_memory(
    build: Callable, kwargs: dict, *, device: torch.device, threads: int, timeout: float = 300.0
) -> MemResult:
    """Peak extra memory of one call, measured in a fresh ``spawn`` process.

    ``build(**kwargs)`` must be a module-level (picklable) function; in the child it builds the inputs and returns
    ``(run, warm)`` or ``(run, warm, info)``: ``run()`` is the measured call, ``warm()`` a warm-up (a tiny-shape call,
    or for ``torch.compile`` the compiling call), ``info`` a dict passed back to the parent.
    """
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, build, kwargs, str(device), threads))
    proc.start()
    child.close()
    res: MemResult | None = None
    try:
        if parent.poll(timeout):
            res = parent.recv()
    except EOFError:
        res = MemResult(error=f"child exited with code {proc.exitcode} (killed for memory?)")
    finally:
        if res is not None:
            proc.join(30)  # let it exit on its own (atexit handlers, e.g. torch.compile's worker pool)
        if proc.is_alive():
            proc.kill()
        proc.join(10)
        parent.close()
    return res or MemResult(error=f"no result within {timeout:.0f} s")


# ---------------------------------------------------------------------------------------------------------- tables


def max_abs_diff(a: torch.Tensor, b: torch.Tensor, block: int = 1 << 24) -> float:
    """``max |a - b|`` in float64, on the tensors' device, a block at a time (no float64 copy of a large tensor)."""
    a, b = a.detach().reshape(-1), b.detach().reshape(-1).to(a.device)
    worst = 0.0
    for start in range(0, a.numel(), block):
        d = (a[start : start + block].double() - b[start : start + block].double()).abs().max().item()
        if d != d:  # nan
            return float("nan")
        worst = max(worst, d)
    return worst


def fmt(x: float | None, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def fmt_ratio(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3f}" if x < 0.1 else f"{x:.2f}"


def fmt_mem(m: MemResult | None) -> str:
    """The RSS (CPU) or allocated (CUDA) peak, ``≤ floor`` when the high-water mark did not move."""
    if m is None:
        return "—"
    if m.error:
        return "error"
    if m.extra_mib is None:
        return "0.0" if m.floor_mib < 0.05 else f"≤ {m.floor_mib:.1f}"
    return f"{m.extra_mib:.1f}"


def fmt_live(m: MemResult | None) -> str:
    return "—" if m is None or m.live_mib is None else f"{m.live_mib:.1f}"


_DEVICE_NAMES = {"cuda": "GPU", "cpu": "CPU"}


def verdict_line(
    what: str, ok: bool | None, measured: str, *, target_device: str | None, device: torch.device, quick: bool = False
) -> str:
    """One target's verdict from numbers the same run printed: ``# verdict <what>: met|NOT met (<measured>)``.

    A target is judged only on the device it is stated for (``target_device`` "cuda" / "cpu"; ``None``: any), else
    the line says ``target is for GPU: not judged on CPU``. ``quick``: the run's sizes are not the target's, and the
    line says so. ``ok=None``: the run lacks what the target needs (``measured`` says what).
    """
    head = f"# verdict {what}: "
    tail = f" ({measured})" if measured else ""
    small = "; --quick: the sizes are not the target's" if quick else ""
    if target_device is not None and device.type != target_device:
        want = _DEVICE_NAMES.get(target_device, target_device)
        return f"{head}target is for {want}: not judged on {_DEVICE_NAMES.get(device.type, device.type)}{small}{tail}"
    if ok is None:
        return f"{head}not judged{small}{tail}"
    return f"{head}{'met' if ok else 'NOT met'}{small}{tail}"


def print_table(headers: list[str], rows: list[list[str]], skipped: dict[str, str]) -> None:
    """The Markdown table between blank lines, then one footnote per skipped row."""
    print()
    print(markdown_table(headers, rows))
    print()
    for row, why in skipped.items():
        print(f"# ¹ {row} skipped: {why}")


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    right = [i > 0 for i in range(len(headers))]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if r else (":" + "-" * (w + 1)) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in rows)])
