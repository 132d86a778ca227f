r"""Benchmark: attention output layers, target tokens/s (forward + backward) and peak memory.

Every case is one training step of an output layer alone, on random inputs: the parameters'
gradients set to ``None``, ``-log p(targets).sum()`` computed by the layer, backward (gradients
w.r.t. the decoder states, the source states and every parameter).  The layers:

* ``soft`` -- :class:`~latentnlp.layers.LatentAttention` with ``mode="soft"``:
  ``log p(y_t | h_t, sum_m alpha_tm s_m)``, one ``[B, T, V]`` read-out;
* ``exact`` -- ``mode="exact"``: ``log sum_m alpha_tm p(y_t | h_t, s_m)``, a ``[B, T, S, V]``
  read-out, either **unchunked** (``max_chunk_elements`` larger than the whole block) or
  **chunked** over source positions (``chunk`` positions a block, each block recomputed in
  backward);
* ``copy`` -- soft attention feeding :class:`~latentnlp.layers.CopyGenerator` (the
  pointer-generator output with the copy switch marginalised, extended vocabulary of the
  source words), as ``LatentAlignmentSeq2Seq(mode="copy")`` uses it.

Sizes: ``B`` sentences x ``T`` target tokens (the tokens of a step), source length ``S``,
vocabulary ``V``, decoder and source states of ``H``; a grid over ``V`` and ``S``.  Time: median
of the timed steps after one warm-up (as many as fit ``--budget`` seconds, at most
``--max-repeats``); tokens/s = ``B * T`` / median.  Memory: each case runs in a fresh subprocess;
on the CPU the step's peak resident set (``VmHWM`` reset through ``/proc/self/clear_refs``) minus
the resident set before it (freed memory is first returned to the OS with ``malloc_trim``, and
large blocks are always ``mmap``-ed, ``MALLOC_MMAP_THRESHOLD_``, so the warm-up step's pages do not
hide the measured step's), on CUDA ``max_memory_allocated`` during the step minus what was
allocated before it: the *working memory of a step*.  The CPU process is capped at
``--mem-cap-gb`` of address space, so a case that does not fit is a recorded ``oom``.

The chunked/unchunked table compares the two exact variants wherever both ran: the time ratio
(chunked / unchunked, so below 1 is faster) and the memory ratio, with the expectation that
chunking is not slower (ratio at most 1.05, the timing noise allowed).

Usage::

    python benchmarks/attention.py                  # full grid, writes benchmarks/results/attention.json
    python benchmarks/attention.py --quick          # small sizes, writes nothing unless --out is given
    python benchmarks/attention.py --device cuda --cases exact
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SEED = 0
SLOWER_TOLERANCE = 1.05  # chunked may be this much slower than unchunked and still "not slower"

#: the grid: full sizes and --quick sizes
GRID = {
    "full": {"B": 32, "T": 20, "H": 256, "vocab": [8000, 16000, 32000], "source": [10, 30, 60], "chunk": 4},
    "quick": {"B": 8, "T": 8, "H": 64, "vocab": [1000, 4000], "source": [8, 24], "chunk": 4},
}
LAYERS = ("soft", "exact-unchunked", "exact-chunked", "copy")


def cases(quick: bool) -> list[dict]:
    """Every case of the grid: ``name`` and ``params`` (layer, B, T, H, V, S, chunk)."""
    grid = GRID["quick" if quick else "full"]
    out = []
    for vocab in grid["vocab"]:
        for source in grid["source"]:
            for layer in LAYERS:
                params = {"layer": layer, "B": grid["B"], "T": grid["T"], "H": grid["H"], "V": vocab,
                          "S": source}
                if layer == "exact-chunked":
                    params["chunk"] = grid["chunk"]
                out.append({"name": f"{layer}/V={vocab}/S={source}", "params": params})
    return out


# ==============================================================================================
# worker side: one case per process
# ==============================================================================================
def build_step(p: dict, device):
    """``(step, tokens)`` for the case ``p``: ``step()`` runs forward and backward once."""
    import torch

    from latentnlp.layers import CopyGenerator, LatentAttention

    torch.manual_seed(SEED)
    B, T, H, V, S = p["B"], p["T"], p["H"], p["V"], p["S"]
    layer_name = p["layer"]
    if layer_name == "exact-chunked":
        chunk_elements = B * T * V * p["chunk"]  # `chunk` source positions per block
    else:
        chunk_elements = 2 ** 62                  # one block (or nothing chunked: soft, copy)
    mode = "exact" if layer_name.startswith("exact") else "soft"
    layer = LatentAttention(H, H, V, mode=mode, max_chunk_elements=chunk_elements).to(device)
    modules = [layer]
    copy = None
    if layer_name == "copy":
        copy = CopyGenerator(H, V, readout=layer.readout).to(device)
        modules.append(copy)
    g = torch.Generator(device="cpu").manual_seed(SEED)
    query = torch.randn(B, T, H, generator=g).to(device).requires_grad_()
    memory = torch.randn(B, S, H, generator=g).to(device).requires_grad_()
    lengths = torch.randint(max(1, S // 2), S + 1, (B,), generator=g)
    lengths[0] = S
    mask = (torch.arange(S)[None, :] < lengths[:, None]).to(device)
    targets = torch.randint(0, V, (B, T), generator=g).to(device)
    # copy: source words as target ids, a few of them source-only (ids V..V+3)
    src_ext = torch.randint(0, V + 4, (B, S), generator=g).to(device)
    params = [q for m in modules for q in m.parameters()] + [query, memory]

    def step():
        for q in params:
            q.grad = None
        if copy is None:
            log_prob = layer(query, memory, mask, targets).log_prob
        else:
            alpha = layer.alignment(query, memory, mask).logits
            hidden = layer.attentional_hidden(query, torch.bmm(alpha.exp(), memory))
            log_prob = copy(hidden, alpha, src_ext, targets, extended_size=V + 4).log_prob
        (-log_prob.sum()).backward()

    return step, B * T


def _status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def _release_free_memory() -> None:
    """Hand memory freed by the warm-up step back to the OS (glibc ``malloc_trim``), so that the
    measured step's peak is not hidden by pages the allocator kept from the warm-up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(spec: dict) -> dict:
    import gc
    import resource

    if spec["device"] == "cpu" and spec["mem_cap_gb"] > 0:
        cap = int(spec["mem_cap_gb"] * 2 ** 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    out: dict[str, Any] = {"name": spec["name"], "params": spec["params"]}

    def timed(step) -> float:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    try:
        step, tokens = build_step(spec["params"], device)
        warmup = timed(step)
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            first = timed(step)
            out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
            out["peak_method"] = "cuda max_memory_allocated minus allocated before the step"
        else:
            exact = _reset_peak_rss()
            base = _status_kb("VmRSS") if exact else _status_kb("VmHWM")
            first = timed(step)
            out["peak_mb"] = max(0, _status_kb("VmHWM") - base) / 1024
            out["peak_method"] = ("VmHWM after reset minus VmRSS" if exact
                                  else "VmHWM growth (no reset allowed: a lower bound)")
        times = [first]
        repeats = max(1, min(spec["max_repeats"], int(spec["budget_s"] / max(first, 1e-6))))
        times += [timed(step) for _ in range(repeats - 1)]
        median = statistics.median(times)
        out.update(status="ok", tokens=tokens, time_s=median, times_s=times, warmup_s=warmup,
                   tokens_per_s=tokens / median)
    except (MemoryError, torch.OutOfMemoryError) as e:
        out.update(status="oom", error=f"{type(e).__name__}: {e}"[:300])
    except RuntimeError as e:
        msg = str(e)
        oom = any(s in msg for s in ("can't allocate memory", "out of memory", "Cannot allocate"))
        out.update(status="oom" if oom else "error", error=f"RuntimeError: {msg}"[:300])
    return out


# ==============================================================================================
# driver side
# ==============================================================================================
def measure(case: dict, args) -> dict:
    spec = dict(name=case["name"], params=case["params"], device=args.device, threads=args.threads,
                mem_cap_gb=args.mem_cap_gb, budget_s=args.budget, max_repeats=args.max_repeats)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    # a fixed mmap threshold: large tensors are mapped and unmapped, not kept in the heap
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(256 * 1024))
    failed = dict(name=case["name"], params=case["params"])
    try:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                              capture_output=True, text=True, timeout=args.timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(failed, status="timeout", error=f"no result within {args.timeout:.0f} s")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    status = "oom" if proc.returncode in (-9, 137) or "MemoryError" in proc.stderr else "crash"
    return dict(failed, status=status, error=f"exit {proc.returncode}: " + " | ".join(tail)[:300])


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "ok"


def chunking(results: list[dict]) -> list[dict]:
    """Chunked vs unchunked exact marginal wherever both ran."""
    by_name = {r["name"]: r for r in results}
    rows = []
    for r in results:
        if r["params"]["layer"] != "exact-chunked":
            continue
        p = r["params"]
        other = by_name.get(f"exact-unchunked/V={p['V']}/S={p['S']}")
        row = {"V": p["V"], "S": p["S"], "chunk": p["chunk"], "chunks": -(-p["S"] // p["chunk"]),
               "chunked": r.get("status"), "unchunked": other.get("status") if other else None}
        if _ok(r) and _ok(other):
            ratio = r["time_s"] / other["time_s"]
            row.update(time_ratio=ratio, memory_ratio=r["peak_mb"] / max(other["peak_mb"], 1e-9),
                       not_slower=ratio <= SLOWER_TOLERANCE)
        rows.append(row)
    return rows


def _sizes(p: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items() if k != "layer")


def table(results: list[dict]) -> str:
    rows = ["| layer | sizes | tokens/s | step time | peak memory (MB) |", "| --- | --- | ---: | ---: | ---: |"]
    for r in results:
        if _ok(r):
            t = r["time_s"]
            cells = [f"{r['tokens_per_s']:,.0f}", f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s",
                     f"{r['peak_mb']:,.1f}"]
        else:
            cells = [r.get("status", "?"), "-", "-"]
        rows.append(f"| {r['params']['layer']} | {_sizes(r['params'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def chunk_table(rows: list[dict]) -> str:
    lines = ["| V | S | chunk (positions) | blocks | time chunked / unchunked | memory chunked / unchunked "
             f"| chunked not slower (<= {SLOWER_TOLERANCE}) |", "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if "time_ratio" in r:
            cells = [f"{r['time_ratio']:.2f}", f"{r['memory_ratio']:.2f}", "pass" if r["not_slower"] else "FAIL"]
        else:
            cells = ["-", "-", f"not compared (chunked {r['chunked']}, unchunked {r['unchunked']})"]
        lines.append(f"| {r['V']} | {r['S']} | {r['chunk']} | {r['chunks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names to run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--budget", type=float, default=5.0, help="seconds of timed steps per case")
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    parser.add_argument("--mem-cap-gb", type=float, default=16.0, help="CPU address-space cap, 0 = none")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/attention.json; none with --quick)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    wanted = [s for s in args.cases.split(",") if s]
    selected = [c for c in cases(args.quick) if not wanted or any(s in c["name"] for s in wanted)]
    if args.list:
        print("\n".join(c["name"] for c in selected))
        return 0
    if not selected:
        parser.error(f"no case matches --cases {args.cases!r}; --list shows them")
    results = []
    for case in selected:
        r = measure(case, args)
        results.append(r)
        rate = f"{r['tokens_per_s']:,.0f} tokens/s, {r['peak_mb']:,.1f} MB" if _ok(r) \
            else f"{r['status']}: {r.get('error', '')}"
        print(f"{case['name']}: {rate}", file=sys.stderr, flush=True)
    compared = chunking(results)
    print(table(results))
    if compared:
        print("\nExact marginal, chunked vs unchunked:\n")
        print(chunk_table(compared))
    out = args.out
    if out is None and not args.quick:
        out = RESULTS / "attention.json"
    if out is not None:
        import torch

        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=args.device, threads=args.threads, quick=args.quick, grid=GRID["quick" if args.quick
                                                                                         else "full"],
                    torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                    cpu_count=os.cpu_count(), load_average=os.getloadavg(),
                    gpu=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None)
        out.write_text(json.dumps({"meta": meta, "results": results, "chunking": compared}, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0 if all(_ok(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
