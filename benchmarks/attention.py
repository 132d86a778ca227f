r"""Benchmark: attention output layers, target tokens/s (forward + backward) and peak memory.

Every case is one training step of an output layer alone, on random inputs: the parameters'
gradients set to ``None``, ``-log p(targets).sum()`` computed by the layer, backward (gradients
w.r.t. the decoder states, the source states and every parameter).  The layers:

* ``soft`` -- :class:`~latentnlp.layers.LatentAttention` with ``mode="soft"``:
  ``log p(y_t | h_t, sum_m alpha_tm s_m)``, one ``[B, T, V]`` read-out;
* ``exact`` -- ``mode="exact"``: ``log sum_m alpha_tm p(y_t | h_t, s_m)``, a ``[B, T, S, V]``
  read-out, either **unchunked** (``max_chunk_elements`` larger than the whole block: autograd
  through the whole ``[B T S, V]`` score tensor) or **chunked** (the layer's default
  ``max_chunk_elements``: blocks of ``chunk`` rows of ``(t, m)`` pairs, each block recomputed
  in backward and its gradient formed in place);
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
import json
import os
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the shared measurement module, wherever the script is run from

from measurement import add_step_arguments, run_case, run_metadata, start_worker, time_step  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SEED = 0
SLOWER_TOLERANCE = 1.05  # chunked may be this much slower than unchunked and still "not slower"

#: the grid: full sizes and --quick sizes
GRID = {
    "full": {"B": 32, "T": 20, "H": 256, "vocab": [8000, 16000, 32000], "source": [10, 30, 60]},
    "quick": {"B": 8, "T": 8, "H": 64, "vocab": [1000, 4000], "source": [8, 24]},
}
LAYERS = ("soft", "exact-unchunked", "exact-chunked", "copy")


def cases(quick: bool) -> list[dict]:
    """Every case of the grid: ``name`` and ``params`` (layer, B, T, H, V, S)."""
    grid = GRID["quick" if quick else "full"]
    out = []
    for vocab in grid["vocab"]:
        for source in grid["source"]:
            for layer in LAYERS:
                params = {"layer": layer, "B": grid["B"], "T": grid["T"], "H": grid["H"], "V": vocab, "S": source}
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
    # chunked: the layer's default block; otherwise one block (or nothing chunked: soft, copy)
    chunking = {} if layer_name == "exact-chunked" else {"max_chunk_elements": 2**62}
    mode = "exact" if layer_name.startswith("exact") else "soft"
    layer = LatentAttention(H, H, V, mode=mode, **chunking).to(device)
    modules = [layer]
    copy = None
    if layer_name == "copy":
        copy = CopyGenerator.for_attention(layer).to(device)
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
            log_prob = copy.attend(layer, query, memory, mask, targets, src_ext=src_ext, extended_size=V + 4).log_prob
        (-log_prob.sum()).backward()

    return step, B * T


def worker(spec: dict) -> dict:
    start_worker(spec["mem_cap_gb"], spec["threads"], spec["device"])
    sys.path.insert(0, str(REPO))
    import torch

    device = torch.device(spec["device"])
    out: dict[str, Any] = {"name": spec["name"], "params": spec["params"]}
    # the measured step follows a warm-up step of the same size: the heap's free pages are
    # handed back first, so that they do not hide the measured step's peak
    out.update(
        time_step(
            lambda: build_step(spec["params"], device),
            device,
            budget_s=spec["budget_s"],
            max_repeats=spec["max_repeats"],
            trim_heap_first=True,
        )
    )
    return out


# ==============================================================================================
# driver side
# ==============================================================================================
def measure(case: dict, args) -> dict:
    spec = dict(
        name=case["name"],
        params=case["params"],
        device=args.device,
        threads=args.threads,
        mem_cap_gb=args.mem_cap_gb,
        budget_s=args.budget,
        max_repeats=args.max_repeats,
    )
    # a fixed mmap threshold: large tensors are mapped and unmapped, not kept in the heap
    return run_case(
        __file__,
        spec,
        identity=dict(name=case["name"], params=case["params"]),
        threads=args.threads,
        timeout=args.timeout,
        fixed_mmap_threshold=True,
    )


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "ok"


def chunking(results: list[dict]) -> list[dict]:
    """Chunked vs unchunked exact marginal wherever both ran."""
    sys.path.insert(0, str(REPO))
    from latentnlp.layers import LatentAttention

    by_name = {r["name"]: r for r in results}
    rows = []
    for r in results:
        if r["params"]["layer"] != "exact-chunked":
            continue
        p = r["params"]
        other = by_name.get(f"exact-unchunked/V={p['V']}/S={p['S']}")
        chunk_rows = LatentAttention.block_rows(p["V"])
        row = {
            "V": p["V"],
            "S": p["S"],
            "chunk": chunk_rows,
            "chunks": -(-p["B"] * p["T"] * p["S"] // chunk_rows),
            "chunked": r.get("status"),
            "unchunked": other.get("status") if other else None,
        }
        if _ok(r) and _ok(other):
            ratio = r["time_s"] / other["time_s"]
            row.update(
                time_ratio=ratio,
                memory_ratio=r["peak_mb"] / max(other["peak_mb"], 1e-9),
                not_slower=ratio <= SLOWER_TOLERANCE,
            )
        rows.append(row)
    return rows


def _sizes(p: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items() if k != "layer")


def table(results: list[dict]) -> str:
    rows = ["| layer | sizes | tokens/s | step time | peak memory (MB) |", "| --- | --- | ---: | ---: | ---: |"]
    for r in results:
        if _ok(r):
            t = r["time_s"]
            cells = [
                f"{r['tokens_per_s']:,.0f}",
                f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s",
                f"{r['peak_mb']:,.1f}",
            ]
        else:
            cells = [r.get("status", "?"), "-", "-"]
        rows.append(f"| {r['params']['layer']} | {_sizes(r['params'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def chunk_table(rows: list[dict]) -> str:
    lines = [
        "| V | S | chunk (rows) | blocks | time chunked / unchunked | memory chunked / unchunked "
        f"| chunked not slower (<= {SLOWER_TOLERANCE}) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "time_ratio" in r:
            cells = [f"{r['time_ratio']:.2f}", f"{r['memory_ratio']:.2f}", "pass" if r["not_slower"] else "FAIL"]
        else:
            cells = ["-", "-", f"not compared (chunked {r['chunked']}, unchunked {r['unchunked']})"]
        lines.append(f"| {r['V']} | {r['S']} | {r['chunk']} | {r['chunks']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser, budget=5.0, timeout=600.0, out_default="benchmarks/results/attention.json")
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
        rate = (
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['peak_mb']:,.1f} MB"
            if _ok(r)
            else f"{r['status']}: {r.get('error', '')}"
        )
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
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            run_metadata(args.device, args.threads, args.quick),
            grid=GRID["quick" if args.quick else "full"],
            load_average=os.getloadavg(),
        )
        out.write_text(json.dumps({"meta": meta, "results": results, "chunking": compared}, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0 if all(_ok(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
