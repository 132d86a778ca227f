r"""Benchmark: one Baum-Welch iteration, latentnlp against hmmlearn's ``CategoricalHMM``.

What is timed, for every case: one EM iteration (E-step over all sequences, then the M-step) of a
categorical-emission HMM with ``K`` states over ``V`` words, on ``N`` sequences, from the same
starting parameters every time, on the CPU with 2 threads (``--threads``; torch's intra-op pool
and the BLAS/OpenMP pools numpy uses, fixed before anything is imported).

Rows (``methods`` in the JSON):

* ``latentnlp-f32``, ``latentnlp-f64`` -- ``baum_welch.m_step(baum_welch.e_step(params, words,
  lengths))`` on the padded batch ``words [N, T]`` in float32 / float64, with value checks off
  (``validate_args=False``, as inside ``baum_welch.fit``).
* ``hmmlearn-scaling``, ``hmmlearn-log`` -- ``CategoricalHMM(..., n_iter=1, init_params="",
  params="ste", implementation=...)``; ``fit(X, lengths)`` on the concatenated sequences
  (float64), its parameters reset to the start before each call (outside the timed region).

The methods alternate within every repeat (one warm-up call each, then ``--repeats`` rounds), so
a change in the machine's load reaches them alike; the time is the median, and the minimum is
recorded too (``min_s``; for a computation this deterministic, the figure least disturbed by other
load).  The machine may be shared: compare the ratios, not the absolute times.  OpenMP's idle
threads sleep (``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise): spinning, they
make every parallel region wait on a machine whose cores other work holds.  The JSON keeps one
entry per thread count (``runs``; ``--threads 1`` for a run without any parallel region).  Every
case also checks that latentnlp's float64 log-likelihood and updated parameters equal hmmlearn's
(``agreement`` in the JSON).

Cases: synthetic data (random words, lengths uniform in 30..50) at ``K = 16, 64, 128`` with
``V = 1,000, 5,000, 10,000``, and a PTB slice (the first ``N`` training sentences of at most 49
words, with ``<eos>``, over PTB's 10,000-word vocabulary) read from ``$LATENTNLP_DATA/ptb`` when
it is there.

Usage::

    python benchmarks/baum_welch.py            # writes benchmarks/results/baum_welch.json
    python benchmarks/baum_welch.py --quick    # small sizes, two repeats, writes nothing
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "baum_welch.json"
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
METHODS = ("latentnlp-f32", "latentnlp-f64", "hmmlearn-scaling", "hmmlearn-log")
SEED = 0

# (name, K, V, N, shortest, longest); "ptb" takes V from the vocabulary and lengths from the text
CASES = [
    ("synthetic", 16, 1000, 100, 30, 50),
    ("synthetic", 64, 5000, 100, 30, 50),
    ("synthetic", 128, 10000, 100, 30, 50),
    ("ptb", 64, None, 100, 1, 50),
]
QUICK_CASES = [("synthetic", 8, 50, 10, 5, 10), ("synthetic", 16, 200, 10, 5, 10), ("ptb", 8, None, 10, 1, 50)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, two repeats, no JSON")
    parser.add_argument("--threads", type=int, default=2, help="torch and BLAS threads (default 2)")
    parser.add_argument("--repeats", type=int, default=11, help="timed rounds per case (median reported)")
    parser.add_argument(
        "--data", default=os.environ.get("LATENTNLP_DATA"), help="corpus root (default $LATENTNLP_DATA)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}; none with --quick)"
    )
    return parser.parse_args(argv)


def synthetic_batch(v: int, n: int, shortest: int, longest: int, generator):
    import torch

    lengths = torch.randint(shortest, longest + 1, (n,), generator=generator)
    words = torch.randint(0, v, (n, longest), generator=generator)
    return words, lengths, v


def ptb_batch(data: str | None, n: int, longest: int):
    """The first ``n`` PTB training sentences of at most ``longest - 1`` words, with ``<eos>``; None
    when PTB is not found."""
    import torch

    from latentnlp.data.corpora import read_ptb
    from latentnlp.data.sources import CorpusNotFoundError

    try:
        corpus = read_ptb(data, use_hub=False)
    except CorpusNotFoundError:
        return None
    vocab = corpus.vocabulary()
    lines = [vocab.encode(s, add_eos=True) for s in corpus.train if len(s) < longest][:n]
    steps = max(map(len, lines))
    words = torch.zeros(len(lines), steps, dtype=torch.long)
    for i, ids in enumerate(lines):
        words[i, : len(ids)] = torch.tensor(ids)
    return words, torch.tensor([len(ids) for ids in lines]), len(vocab)


def run_case(k: int, words, lengths, v: int, repeats: int) -> dict:
    import logging
    import statistics
    import time

    import numpy as np
    import torch
    from hmmlearn.hmm import CategoricalHMM

    from latentnlp import baum_welch

    logging.getLogger("hmmlearn").setLevel(logging.ERROR)  # its note on free parameters per data point
    start = baum_welch.random_parameters(k, v, generator=torch.Generator().manual_seed(SEED + k), dtype=torch.float64)
    x = np.concatenate([words[i, :length].numpy() for i, length in enumerate(lengths.tolist())])[:, None]
    np_lengths = lengths.numpy()

    def latentnlp_step(dtype):
        params = baum_welch.HMMParameters(*(p.to(dtype) for p in start))
        return lambda: baum_welch.m_step(
            baum_welch.e_step(params, words, lengths, validate_args=False), validate_args=False
        )

    def hmmlearn_step(implementation):
        model = CategoricalHMM(
            n_components=k,
            n_features=v,
            init_params="",
            params="ste",
            n_iter=1,
            tol=-np.inf,
            implementation=implementation,
        )

        def reset():
            model.startprob_, model.transmat_, model.emissionprob_ = (p.numpy().copy() for p in start)

        def step():
            model.fit(x, np_lengths)
            return model

        return reset, step

    steps = {
        "latentnlp-f32": (lambda: None, latentnlp_step(torch.float32)),
        "latentnlp-f64": (lambda: None, latentnlp_step(torch.float64)),
        "hmmlearn-scaling": hmmlearn_step("scaling"),
        "hmmlearn-log": hmmlearn_step("log"),
    }
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    results = {}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        for method in METHODS:
            reset, step = steps[method]
            reset()
            t0 = time.perf_counter()
            results[method] = step()
            elapsed = time.perf_counter() - t0
            if round_:
                times[method].append(elapsed)

    # the same iteration: latentnlp's float64 update and log-likelihood against hmmlearn's
    counts = baum_welch.e_step(start, words, lengths)
    ours, model = results["latentnlp-f64"], results["hmmlearn-scaling"]
    agreement = {
        "log_likelihood_rel_diff": abs(float(counts.log_likelihood) - model.monitor_.history[0])
        / abs(model.monitor_.history[0]),
        "params_max_abs_diff": max(
            float(np.abs(a.numpy() - b).max())
            for a, b in zip(ours, (model.startprob_, model.transmat_, model.emissionprob_))
        ),
    }
    methods = {m: {"time_s": statistics.median(t), "min_s": min(t), "times_s": t} for m, t in times.items()}
    return {"methods": methods, "agreement": agreement}


def table(cases: list[dict]) -> str:
    """Median milliseconds per iteration, and hmmlearn's time over latentnlp float64's (by the
    medians; by the minima in parentheses, the figure least disturbed by other load)."""

    def ms(case, m):
        return f"{1e3 * case['methods'][m]['time_s']:.1f}"

    def ratio(case, m):
        ours, theirs = case["methods"]["latentnlp-f64"], case["methods"][m]
        return f"{theirs['time_s'] / ours['time_s']:.2f}x ({theirs['min_s'] / ours['min_s']:.2f}x)"

    lines = [
        "| data | K | V | N | tokens | latentnlp f32 (ms) | latentnlp f64 (ms) | hmmlearn scaling (ms) "
        "| hmmlearn log (ms) | hmmlearn scaling / latentnlp f64 | hmmlearn log / latentnlp f64 | max param diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cases:
        lines.append(
            f"| {c['data']} | {c['K']} | {c['V']} | {c['N']} | {c['tokens']} | {ms(c, 'latentnlp-f32')} | "
            f"{ms(c, 'latentnlp-f64')} | {ms(c, 'hmmlearn-scaling')} | {ms(c, 'hmmlearn-log')} | "
            f"{ratio(c, 'hmmlearn-scaling')} | {ratio(c, 'hmmlearn-log')} | "
            f"{c['agreement']['params_max_abs_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    for var in THREAD_VARIABLES:  # before numpy and torch start their pools
        os.environ[var] = str(args.threads)
    # OpenMP's idle threads spin by default; where other work holds the cores, every parallel
    # region then waits for a spinning thread to be descheduled (measured on a shared two-core
    # machine: about 1 s per iteration at K = 64 instead of 25 ms)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.path.insert(0, str(REPO))  # this checkout's latentnlp, wherever the script is run from

    import datetime
    import importlib.metadata
    import json
    import platform

    import torch

    torch.set_num_threads(args.threads)
    repeats = 2 if args.quick else args.repeats
    generator = torch.Generator().manual_seed(SEED)
    cases = []
    for data, k, v, n, shortest, longest in QUICK_CASES if args.quick else CASES:
        if data == "ptb":
            batch = ptb_batch(args.data, n, longest)
            if batch is None:
                print("PTB not found (set LATENTNLP_DATA or --data): its case is skipped", file=sys.stderr)
                continue
        else:
            batch = synthetic_batch(v, n, shortest, longest, generator)
        words, lengths, v = batch
        print(f"{data} K={k} V={v} N={len(lengths)} tokens={int(lengths.sum())} ...", file=sys.stderr, flush=True)
        result = run_case(k, words, lengths, v, repeats)
        cases.append(dict(data=data, K=k, V=v, N=len(lengths), T=words.shape[1], tokens=int(lengths.sum()), **result))
    print(table(cases))
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        meta = dict(
            date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            what="seconds per Baum-Welch iteration (E-step + M-step), alternating repeats",
            repeats=repeats,
            omp_wait_policy=os.environ["OMP_WAIT_POLICY"],
            torch=torch.__version__,
            hmmlearn=importlib.metadata.version("hmmlearn"),
            numpy=importlib.metadata.version("numpy"),
            python=platform.python_version(),
            machine=platform.machine(),
            cpu_count=os.cpu_count(),
        )
        # one entry per thread count: a run with other threads keeps the entries it does not redo
        runs = json.loads(out.read_text()).get("runs", {}) if out.exists() else {}
        runs[str(args.threads)] = dict(meta, cases=cases, table=table(cases).splitlines())
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"runs": dict(sorted(runs.items()))}, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
