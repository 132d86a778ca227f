r"""Benchmark: the CRF tagging layer (``latentnlp.layers.ChainCRF``) against pytorch-crf.

What is timed, for every ``(B, T, K)``, on the CPU, float32, ``torch.set_num_threads(2)``:

* ``loss`` -- forward + backward of the summed negative log-likelihood of random tags,
  ``crf.loss(emissions, tags, mask, reduction="sum").backward()`` against
  ``(-peer(emissions, tags, mask, reduction="sum")).backward()`` (gradients w.r.t. the emissions
  and the transition, start and end scores);
* ``decode`` -- Viterbi decoding, ``crf.decode(emissions, mask)`` (a ``[B, T]`` tensor, turned into
  lists of each row's real tags by one ``tolist`` and slicing, the conversion
  :meth:`ChainCRF.decode` documents) against ``peer.decode(emissions, mask)`` (which returns
  those lists).

Both layers hold the same parameters (``transitions``, ``start_transitions``,
``end_transitions`` copied over), batch first; row lengths are drawn uniformly from
``T/2..T`` (the first row has length ``T``) and given to both as the same bool mask.  latentnlp
runs with input validation on, its default.  The two are measured *side by side*: one fresh
process per ``(operation, size)`` (through :mod:`measurement`, with the thread count fixed and the
address space capped), one warm-up call of each, then the timed calls alternate ``ours, peer,
ours, peer, ...`` so that a change of the machine's load reaches both; the reported time of each
is the median of its repeats (``--repeats`` pairs at least, more while ``--budget`` seconds
last, at most ``--max-repeats``), and ``ratio = peer time / latentnlp time``.  The ratio of the
fastest repeats is reported beside it: on a machine shared with other work, waits for a busy core
can dominate the medians of both and pull their ratio towards 1.  The results must
agree -- the losses to ``1e-4`` relative, the decoded paths exactly -- or the case says so.

The library aims at ``ratio >= 3`` at every size, for the loss and for decoding.

Usage::

    python benchmarks/crf.py            # full run, writes benchmarks/results/crf.json
    python benchmarks/crf.py --runs 3   # three sweeps one after the other, every run's ratio reported
    python benchmarks/crf.py --quick    # sanity run: small sizes, three pairs, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the shared measurement module, wherever the script is run from

from measurement import failure, run_case, run_metadata, start_worker, utc_now  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "crf.json"
SIZES = [(32, 50, 20), (32, 200, 50), (8, 1000, 10)]
QUICK_SIZES = [(4, 10, 5), (4, 20, 10), (2, 50, 4)]
OPERATIONS = ("loss", "decode")
TARGET = 3.0  # the library's goal: ratio >= TARGET everywhere
SEED = 0


# ==============================================================================================
# worker side: one (operation, B, T, K) per process, both libraries in it
# ==============================================================================================
def _setup(operation: str, B: int, T: int, K: int):
    """``(ours, peer)``: two calls of the operation, each returning what is compared."""
    import torch
    import torchcrf

    from latentnlp.layers import ChainCRF

    g = torch.Generator().manual_seed(SEED)
    ours, peer = ChainCRF(K), torchcrf.CRF(K, batch_first=True)
    with torch.no_grad():
        for name in ("transitions", "start_transitions", "end_transitions"):
            getattr(peer, name).copy_(getattr(ours, name))
    emissions = torch.randn(B, T, K, generator=g)
    lengths = torch.randint(T // 2, T + 1, (B,), generator=g).clamp_(min=1)
    lengths[0] = T
    mask = torch.arange(T) < lengths.unsqueeze(-1)
    tags = torch.randint(K, (B, T), generator=g)

    if operation == "decode":
        row_lengths = lengths.tolist()
        return (
            lambda: [row[:n] for row, n in zip(ours.decode(emissions, mask).tolist(), row_lengths)],
            lambda: peer.decode(emissions, mask),
        )

    emissions.requires_grad_(True)
    params = list(ours.parameters()) + list(peer.parameters())

    def step(loss):
        def run():
            for p in params + [emissions]:
                p.grad = None
            value = loss()
            value.backward()
            return value.item()

        return run

    return (
        step(lambda: ours.loss(emissions, tags, mask, reduction="sum")),
        step(lambda: -peer(emissions, tags, mask, reduction="sum")),
    )


def _agree(operation: str, a, b) -> bool:
    return a == b if operation == "decode" else abs(a - b) <= 1e-4 * max(1.0, abs(b))


def worker(spec: dict) -> dict:
    start_worker(spec["mem_cap_gb"], spec["threads"])
    sys.path.insert(0, str(REPO))
    operation, B, T, K = spec["operation"], spec["B"], spec["T"], spec["K"]
    out = {"operation": operation, "B": B, "T": T, "K": K}
    try:
        ours, peer = _setup(operation, B, T, K)
        out["values_agree"] = _agree(operation, ours(), peer())  # also the warm-up of each
        times = {"latentnlp": [], "pytorch-crf": []}
        deadline = time.perf_counter() + spec["budget_s"]
        while len(times["latentnlp"]) < spec["max_repeats"] and (
            len(times["latentnlp"]) < spec["repeats"] or time.perf_counter() < deadline
        ):
            for name, call in (("latentnlp", ours), ("pytorch-crf", peer)):
                t0 = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t0)
        for name, ts in times.items():
            out[name] = {"time_s": statistics.median(ts), "min_s": min(ts), "times_s": ts}
        out.update(
            status="ok",
            ratio=out["pytorch-crf"]["time_s"] / out["latentnlp"]["time_s"],
            ratio_of_minima=out["pytorch-crf"]["min_s"] / out["latentnlp"]["min_s"],
        )
    except Exception as e:  # a failure is a result, not a crash of the benchmark
        out.update(failure(e))
    return out


# ==============================================================================================
# driver side
# ==============================================================================================
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


def markdown(results: list, meta: dict) -> str:
    """One row per case: the times (medians over the runs of each run's median), the ratio of every
    run (``/``-separated, in run order) and of its fastest repeats, and how many runs reach the target."""
    head = [
        "operation",
        "B, T, K",
        "latentnlp",
        "pytorch-crf",
        "ratio (peer / ours), each run",
        "ratio of minima, each run",
        f"target >= {TARGET:g}x",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cases: dict[tuple, list] = {}
    for r in results:
        cases.setdefault((r["operation"], r["B"], r["T"], r["K"]), []).append(r)
    for (operation, B, T, K), runs in cases.items():
        size = f"{B}, {T}, {K}"
        ok = [r for r in runs if r.get("status") == "ok"]
        if not ok:
            lines.append(f"| {operation} | {size} | {runs[0].get('status')}: {runs[0].get('error', '')[:60]} | | | | |")
            continue
        passed = sum(r["ratio"] >= TARGET for r in ok)
        verdict = "pass" if passed == len(runs) else "FAIL"
        if len(runs) > 1:
            verdict += f" ({passed} of {len(runs)} runs)"
        if not all(r["values_agree"] for r in ok):
            verdict += " (results disagree!)"
        ours = statistics.median(r["latentnlp"]["time_s"] for r in ok)
        peer = statistics.median(r["pytorch-crf"]["time_s"] for r in ok)
        ratios = " / ".join(f"{r['ratio']:.2f}x" for r in ok)
        minima = " / ".join(f"{r['ratio_of_minima']:.2f}x" for r in ok)
        lines.append(f"| {operation} | {size} | {_ms(ours)} | {_ms(peer)} | {ratios} | {minima} | {verdict} |")
    ok = [r for r in results if r.get("status") == "ok"]
    loads = ", ".join(f"{a:.1f}-{b:.1f}" for a, b in meta.get("load_average_1min", []))
    lines += [
        "",
        f"{len(meta.get('load_average_1min', [])) or 1} run(s), each a fresh process per case; median of "
        f"{min(len(r['latentnlp']['times_s']) for r in ok) if ok else 0}+ alternating repeats each, float32, "
        f"{meta['threads']} torch thread(s), torch {meta['torch']}; loss = forward + backward of the summed "
        f"NLL, decode = Viterbi paths as lists."
        + (f" One-minute load average at the start and end of each run: {loads}." if loads else ""),
    ]
    return "\n".join(lines)


def _sweep(args, sizes, run: int) -> list:
    """Every ``(operation, size)`` once, each in a fresh process: the results, tagged with ``run``."""
    results = []
    for operation in OPERATIONS:
        for B, T, K in sizes:
            spec = dict(
                operation=operation,
                B=B,
                T=T,
                K=K,
                threads=args.threads,
                repeats=args.repeats,
                max_repeats=args.max_repeats,
                budget_s=args.budget,
                mem_cap_gb=args.mem_cap_gb,
            )
            r = run_case(
                __file__,
                spec,
                identity=dict(operation=operation, B=B, T=T, K=K),
                threads=args.threads,
                timeout=args.timeout,
            )
            r["run"] = run
            results.append(r)
            what = (
                f"ours {_ms(r['latentnlp']['time_s'])}, peer {_ms(r['pytorch-crf']['time_s'])}, "
                f"ratio {r['ratio']:.2f}x, agree {r['values_agree']}"
                if r.get("status") == "ok"
                else f"{r.get('status')}: {r.get('error', '')[:120]}"
            )
            print(f"  run {run + 1}: {operation:<6} B={B:<3} T={T:<5} K={K:<3} {what}", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small sizes, three pairs: a sanity run (writes nothing)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=15, help="timed pairs at least (default 15; quick 3)")
    p.add_argument("--max-repeats", type=int, default=60)
    p.add_argument("--budget", type=float, default=6.0, help="seconds of timed pairs per case (default 6)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    p.add_argument("--mem-cap-gb", type=float, default=8.0, help="address-space cap of each process, 0 = none")
    p.add_argument("--runs", type=int, default=1, help="sweeps over every case, one after the other (default 1)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)})")
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    if args.quick:
        args.repeats, args.max_repeats, args.budget = 3, 3, 0.0
    sizes = QUICK_SIZES if args.quick else SIZES
    out = args.out if args.out or args.quick else DEFAULT_OUT

    meta = run_metadata("cpu", args.threads, args.quick)
    meta["load_average_1min"] = []
    results = []
    for run in range(args.runs):
        load_start = os.getloadavg()[0]
        results += _sweep(args, sizes, run)
        meta["load_average_1min"].append([load_start, os.getloadavg()[0]])
    table = markdown(results, meta)
    print()
    print(table)
    if out:
        doc = {
            "benchmark": "ChainCRF vs pytorch-crf: loss forward + backward, Viterbi decoding",
            "date": utc_now(),
            "machine": meta,
            "settings": {
                "quick": args.quick,
                "repeats": args.repeats,
                "max_repeats": args.max_repeats,
                "budget_s": args.budget,
                "dtype": "float32",
                "seed": SEED,
                "runs": args.runs,
                "target_ratio": TARGET,
                "statistic": "median of alternating repeats after one warm-up call of each",
            },
            "results": results,
            "markdown": table,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"\n# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
