r"""Measuring one benchmark case in a fresh process: its time and its working memory.

The benchmark scripts (``chain.py``, ``lm.py``, ``attention.py``) share one way of measuring.
The *driver* runs every case as ``python <script> --worker <spec as JSON>`` in a fresh
subprocess (:func:`run_case`), with the BLAS/OpenMP thread counts fixed and a wall-clock limit;
the *worker* caps its own address space (:func:`start_worker`, ``RLIMIT_AS``), so that a case
which does not fit fails with ``MemoryError`` inside the worker instead of troubling the machine,
and prints its result as one JSON line.  A timeout, an out-of-memory failure or a crash is a
recorded result (``status`` ``"timeout"``, ``"oom"``, ``"crash"``, ``"error"``), not a crash of
the benchmark.

Memory is the *working memory of one call*, :func:`peak_memory`: on the CPU the call's peak
resident set (Linux ``VmHWM``, reset to the current resident set through
``/proc/self/clear_refs`` just before the call) minus the resident set just before it; on CUDA
``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before it.  The
CPU number counts every allocation of the process (torch, numpy, C++), not only tensors.

When the measured call follows a warm-up call of the same size, glibc may keep the warm-up's
freed pages in the heap, and the measured call then reuses pages that are already resident: its
peak would hide in the baseline.  Two settings prevent that: ``fixed_mmap_threshold=True`` in
:func:`run_case` starts the worker with ``MALLOC_MMAP_THRESHOLD_`` fixed (large blocks are always
``mmap``-ed and returned to the OS when freed), and ``trim_heap_first=True`` in :func:`peak_memory`
hands the heap's free memory back (``malloc_trim``) before the baseline is read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: the repository the benchmarks measure (its ``latentnlp/``, and the commits ``--baseline`` reads)
REPO = Path(__file__).resolve().parent.parent
#: environment variables that fix the thread pools of the worker's numerical libraries
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
#: ``MALLOC_MMAP_THRESHOLD_`` of a worker started with ``fixed_mmap_threshold=True``, bytes
MMAP_THRESHOLD = 256 * 1024
#: error messages of allocation failures that are not raised as ``MemoryError``
OOM_MESSAGES = ("can't allocate memory", "out of memory", "Cannot allocate")

#: ``peak_method`` of the results: how :func:`peak_memory` measured
PEAK_RSS = "VmHWM-after-reset minus VmRSS"
PEAK_RSS_LOWER_BOUND = "VmHWM growth (no reset allowed: a lower bound)"
PEAK_CUDA = "cuda max_memory_allocated minus allocated before the step"


# ==============================================================================================
# worker side
# ==============================================================================================
def start_worker(mem_cap_gb: float, threads: int, device: str = "cpu") -> None:
    """Prepare a worker process: cap its address space at ``mem_cap_gb`` GiB (CPU runs, cap > 0)
    and set torch's intra-op threads to ``threads``."""
    if device == "cpu" and mem_cap_gb > 0:
        import resource

        cap = int(mem_cap_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    import torch

    torch.set_num_threads(threads)


def status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``...)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def trim_heap() -> None:
    """Hand the heap's free memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(call: Callable[[], Any], device=None, *, trim_heap_first: bool = False) -> tuple[Any, float, str]:
    """Run ``call()`` once and measure its working memory.

    Returns ``(call's result, peak MB, how the peak was measured)``: on a CUDA ``device`` the peak
    of ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated before it;
    otherwise the peak resident set during the call minus the resident set before it (where the
    peak mark cannot be reset, the growth of the process's peak: a lower bound).  Garbage is
    collected first; ``trim_heap_first`` also returns the heap's free memory to the OS before the
    baseline is read (see the module's docstring).
    """
    import gc

    gc.collect()
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = call()
        return result, (torch.cuda.max_memory_allocated(device) - base) / 2**20, PEAK_CUDA
    if trim_heap_first:
        trim_heap()
    exact = reset_peak_rss()
    base = status_kb("VmRSS") if exact else status_kb("VmHWM")
    result = call()
    return result, max(0, status_kb("VmHWM") - base) / 1024, PEAK_RSS if exact else PEAK_RSS_LOWER_BOUND


def repeat_count(first_s: float, budget_s: float, max_repeats: int) -> int:
    """How many timed calls of ``first_s`` seconds fill ``budget_s``: at least 1, at most ``max_repeats``."""
    return max(1, min(max_repeats, int(budget_s / max(first_s, 1e-6))))


def failure(exc: BaseException) -> dict:
    """``status`` and ``error`` of a case that raised ``exc``: ``"oom"`` for an allocation failure
    (``MemoryError``, torch's ``OutOfMemoryError``, a ``RuntimeError`` saying so), else ``"error"``."""
    msg = str(exc)
    oom = (
        isinstance(exc, MemoryError)
        or type(exc).__name__ == "OutOfMemoryError"
        or (isinstance(exc, RuntimeError) and any(s in msg for s in OOM_MESSAGES))
    )
    return {"status": "oom" if oom else "error", "error": f"{type(exc).__name__}: {msg}"[:300]}


def time_step(
    build: Callable[[], tuple[Callable[[], object], int]],
    device,
    *,
    budget_s: float,
    max_repeats: int,
    trim_heap_first: bool = False,
) -> dict:
    """Time a training step and measure its working memory; ``build()`` returns ``(step, tokens)``.

    One warm-up step, then the measured steps: the first of them under :func:`peak_memory`, then
    as many more as fill ``budget_s`` (at most ``max_repeats`` in all); on CUDA each is
    synchronised.  Returns ``peak_mb``, ``peak_method``, ``status="ok"``, ``tokens``, ``time_s``
    (the median), ``times_s``, ``warmup_s``, ``tokens_per_s = tokens / time_s``; an allocation
    failure or other ``RuntimeError`` is returned as :func:`failure`'s ``status`` and ``error``.
    """
    import torch

    cuda = device.type == "cuda"

    def timed(step) -> float:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    out: dict[str, Any] = {}
    try:
        step, tokens = build()
        warmup = timed(step)
        first, out["peak_mb"], out["peak_method"] = peak_memory(
            lambda: timed(step), device, trim_heap_first=trim_heap_first
        )
        times = [first]
        times += [timed(step) for _ in range(repeat_count(first, budget_s, max_repeats) - 1)]
        median = statistics.median(times)
        out.update(
            status="ok", tokens=tokens, time_s=median, times_s=times, warmup_s=warmup, tokens_per_s=tokens / median
        )
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        out.update(failure(e))
    return out


# ==============================================================================================
# driver side
# ==============================================================================================
def run_case(
    script: str | Path, spec: dict, *, identity: dict, threads: int, timeout: float, fixed_mmap_threshold: bool = False
) -> dict:
    """Run ``python script --worker <spec>`` in a fresh process and return its result.

    The worker prints its result as a JSON line (the last line starting with ``{`` is read).  It
    runs with the thread variables set to ``threads`` (and ``MALLOC_MMAP_THRESHOLD_`` fixed with
    ``fixed_mmap_threshold``, unless the environment sets it).  Where it gives no result, the
    result is ``identity`` (the fields naming the case) with ``status`` ``"timeout"`` (no result
    within ``timeout`` seconds), ``"oom"`` (killed, or a ``MemoryError`` traceback) or
    ``"crash"``, and ``error``: what went wrong, with the last lines of its output.
    """
    env = dict(os.environ)
    for var in THREAD_VARIABLES:
        env[var] = str(threads)
    if fixed_mmap_threshold:
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    try:
        proc = subprocess.run(
            [sys.executable, str(script), "--worker", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return dict(identity, status="timeout", error=f"no result within {timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    status = "oom" if proc.returncode in (-9, 137) or "MemoryError" in proc.stderr else "crash"
    return dict(identity, status=status, error=f"exit {proc.returncode}: " + " | ".join(tail)[:300])


def add_step_arguments(parser: argparse.ArgumentParser, *, budget: float, timeout: float, out_default: str) -> None:
    """The command line of a step benchmark (``lm.py``, ``attention.py``): ``--worker`` (hidden),
    ``--device``, ``--quick``, ``--cases``, ``--threads``, ``--budget`` (default ``budget``
    seconds), ``--max-repeats``, ``--timeout`` (default ``timeout`` seconds), ``--mem-cap-gb``,
    ``--out`` (default ``out_default``, none with ``--quick``) and ``--list``."""
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names to run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--budget", type=float, default=budget, help="seconds of timed steps per case")
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per case")
    parser.add_argument("--mem-cap-gb", type=float, default=16.0, help="CPU address-space cap, 0 = none")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default {out_default}; none with --quick)"
    )
    parser.add_argument("--list", action="store_true", help="print the case names and exit")


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second: the ``date`` of a results file."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_metadata(device: str, threads: int, quick: bool) -> dict:
    """Where and how a step benchmark ran: ``date``, ``device``, ``threads``, ``quick``, the torch
    and Python versions, the machine, its CPU count and the GPU's name (``None`` on the CPU)."""
    import torch

    return dict(
        date=utc_now(),
        device=device,
        threads=threads,
        quick=quick,
        torch=torch.__version__,
        python=platform.python_version(),
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        gpu=torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
    )


# ==============================================================================================
# another version of the library, side by side
# ==============================================================================================
def import_baseline(root: str):
    """The package ``root/latentnlp`` (another version of the library) imported as ``latentnlp_baseline``."""
    import importlib.util

    package = Path(root) / "latentnlp"
    spec = importlib.util.spec_from_file_location(
        "latentnlp_baseline", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def extract_baseline(commit: str) -> dict:
    """``git archive`` of ``latentnlp/`` (and ``setup.py``, where the commit has one) at ``commit`` into a
    temporary folder, its compiled loops built in place where it has them: ``{root, commit, head,
    compiled}`` (``head``: the commit of the working tree measured against it; ``compiled``: whether the
    baseline's ``latentnlp._chain_loops`` was built, so that both sides run their own compiled loops)."""
    import io
    import subprocess
    import tarfile
    import tempfile

    def git(*arguments) -> bytes:
        return subprocess.run(["git", "-C", str(REPO), *arguments], check=True, capture_output=True).stdout

    root = Path(tempfile.mkdtemp(prefix="latentnlp-baseline-"))
    paths = ["latentnlp"] + [p for p in ("setup.py",) if git("ls-tree", "--name-only", commit, p).strip()]
    with tarfile.open(fileobj=io.BytesIO(git("archive", commit, *paths))) as archive:
        archive.extractall(root, filter="data")
    compiled = False
    if (root / "setup.py").exists():
        build = [sys.executable, "setup.py", "-q", "build_ext", "--inplace"]
        compiled = subprocess.run(build, cwd=root, capture_output=True).returncode == 0
    resolved = git("rev-parse", commit).decode().strip()
    return dict(root=root, commit=resolved, head=git("rev-parse", "HEAD").decode().strip(), compiled=compiled)
