r"""Benchmark: the linear-chain sum (``ChainPosterior.log_partition``) against its peers.

What is timed, for every ``(B, T, K)``: one forward + backward of the log-partition of an HMM
with a shared transition matrix, ``log_partition(init, trans[K, K], emit[B, T, K]).sum().backward()``
(gradients w.r.t. ``emit`` and ``trans``), on the CPU, float32, ``torch.set_num_threads(2)``, or
on a GPU with ``--device cuda`` (every row but hmmlearn's; refused where torch finds no CUDA
device).  Beside each time the table gives the number of sequential steps of the method
(:func:`sequential_steps`): the batched operations that must follow one another, which is what
a step's fixed cost (an interpreter round, a kernel launch) multiplies.

Rows (``method`` names in the JSON):

* ``latentnlp`` -- ``ChainPosterior(..., method="auto")``; ``latentnlp-scaled``, ``-log``,
  ``-scan`` (small K only), ``-blocked`` force an algorithm; ``latentnlp-fwd`` is the forward alone under
  ``torch.no_grad()``, the fair partner of hmmlearn.
* ``naive`` -- the same scaled probability-space forward written with plain torch ops
  (``alpha = (alpha @ A) * e_t``, renormalise) and differentiated by autograd.
* ``torch-struct`` -- ``LinearChainCRF(edges).partition`` on the converted edge potentials
  ``edges[b, n, c_next, c_prev]`` ``[B, T-1, K, K]``; the conversion is inside the timed region,
  so the gradient reaches ``emit`` and ``trans`` as for every other row.
* ``pyro`` -- ``DiscreteHMM(initial_logits, transition_logits[T, K, K], obs).log_prob(x)``.  Pyro
  applies a transition before the first observation, so ``transition_logits[0]`` has every row
  equal to ``init`` and ``transition_logits[1:] = trans`` (time-varying); the observation
  distribution's ``log_prob`` returns ``emit`` itself (an exact stand-in for a Categorical over a
  vocabulary).  ``init`` and ``trans`` are log-normalised, so Pyro's renormalisation is a no-op.
* ``hmmlearn-fwd`` -- ``hmmlearn._hmmc.forward_scaling`` (the C++ forward behind
  ``CategoricalHMM.score(..., implementation="scaling")``), once per sequence, float64,
  forward only: compare it with ``latentnlp-fwd``.
* ``hmmlearn-score`` -- ``CategoricalHMM(implementation="scaling").score(X, lengths)`` itself, the
  library call, on ``B`` sequences of ``T`` symbols out of ``V = 64`` (the same ``init`` and
  ``trans``, emission probabilities ``log B [K, V]`` log-normalised Gaussian scores), float64:
  compare it with ``latentnlp-score``, ``ChainPosterior(init, trans, embedding(x, log B.T)).log_partition``
  (the lookup of the symbols' scores included) without a gradient.  These two rows score a categorical
  HMM, not the other rows' emission scores: their values are checked against each other.
* ``matmul-3T`` -- the limit: ``3 T`` products ``(B, K) x (K, K)`` (``torch.mm`` into a preallocated
  output), the BLAS work of a forward (one per step) and a backward (two per step).

Every measurement runs in a fresh subprocess with ``RLIMIT_AS`` capped (``--mem-cap-gb``), so a
peer that runs out of memory is a recorded failure, not a machine in trouble.  Time: median of
the repeats after one warm-up call (repeats fill ``--budget`` seconds, at least one, at most
``--max-repeats``).  Memory: the warm-up call's peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` just before the call) minus the resident set just before it, i.e. after
imports, input creation and a tiny warm-up of the same code path; it counts every allocation of
the process (torch, numpy, C++), not only torch tensors.

Viterbi mode (``--viterbi``): decoding, ``ChainPosterior(init, trans[K, K], emit).argmax``, against
pytorch-crf's ``CRF(K, batch_first=True).decode(emit)`` with the same scores (its start
transitions = ``init``, transitions = ``trans``, end transitions 0), at the CRF-tagger sizes
``VITERBI_SIZES``.  Both run in this one process, side by side: each repeat calls every row once,
in rotating order, so that load from other processes falls on all rows alike; the table gives
the fastest and the median of the repeats and the ratios of each.  pytorch-crf returns Python
lists, latentnlp a ``[B, T]`` tensor; each is timed producing its own output, and the row
``latentnlp-argmax-lists`` adds ``.tolist()`` for the same output as pytorch-crf's.  The paths
must be equal (checked on every size).  One thread by default (``--threads``): decoding is
a loop of small ops, and on a 2-core machine shared with other processes a 2-thread pool made
pytorch-crf's calls stall for ~50 ms at random while a core was taken (with or without
latentnlp in the process).  Writes ``benchmarks/results/viterbi.json``.

Decoding mode (``--decode``): the blocked kernels against the sequential ones, beyond the sum:
Viterbi (``ChainPosterior.argmax``), forward filtering, backward sampling (``.sample()``, one path
per chain; the backward sampling's ``T - 1`` steps are the same in both) and the entropy
(``.entropy()`` without a gradient), each with ``method="scaled"`` and ``method="blocked"``, at
``DECODE_SIZES``: long chains with few states, where ``auto`` takes the blocked kernels or is near
the rule (:func:`latentnlp.chain.prefers_blocked`).  Inputs as the grid's (a shared ``[K, K]``,
float32, every length ``T``), 2 threads by default; every row in this one process, alternating as
in ``--viterbi``; each row's sequential steps (:func:`decode_steps`) beside its times, and the ratio
blocked / scaled of the fastest and of the median repeat.  The Viterbi paths of the two must score
the same and the entropies agree to ``1e-4`` (relative).  Writes
``benchmarks/results/chain-blocked-decode.json``; ``--kernels entropy --sizes ...`` times one kernel
over other sizes (the grid behind :func:`latentnlp.chain.prefers_blocked_entropy`, written with
``--out benchmarks/results/chain-blocked-entropy.json``).

Comparison mode (``--against COMMIT``): forward + backward of ``log_partition.sum()`` (``method="auto"``,
gradients w.r.t. ``emit`` and ``trans``, ``init`` one per row) by this working tree's library and by
the library at ``COMMIT`` (``git archive`` of its ``latentnlp/``, imported beside this one), at the
grid's sizes, alternating in one process (``--repeats``, default 15); the ratio before / now of the
fastest and of the median repeat, and the largest difference of ``log Z``.  Writes
``benchmarks/results/chain-against-<commit>.json``.

Usage::

    python benchmarks/chain.py                 # full run, writes benchmarks/results/chain.json
    python benchmarks/chain.py --quick         # sanity run: short chains, one repeat, writes nothing
    python benchmarks/chain.py --sizes 16x64x64,8x1024x16 --methods latentnlp,naive,matmul-3T
    python benchmarks/chain.py --viterbi       # decoding against pytorch-crf, writes results/viterbi.json
    python benchmarks/chain.py --decode        # blocked Viterbi, sampling, entropy against the sequential ones
    python benchmarks/chain.py --against 5f27333   # log Z forward + backward against an earlier commit
    python benchmarks/chain.py --device cuda   # the grid on a GPU, writes results/chain-cuda.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the shared measurement module, wherever the script is run from

from measurement import (  # noqa: E402
    extract_baseline,
    failure,
    import_baseline,
    peak_memory,
    repeat_count,
    run_case,
    start_worker,
    utc_now,
)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "chain.json"
CUDA_OUT = REPO / "benchmarks" / "results" / "chain-cuda.json"
VITERBI_OUT = REPO / "benchmarks" / "results" / "viterbi.json"
DECODE_OUT = REPO / "benchmarks" / "results" / "chain-blocked-decode.json"
THREADS = 2  # default of --threads
SEED = 0

# the published sizes, a CRF tagger's and a long sequence with few states
SIZES = [(16, 64, 64), (16, 64, 128), (32, 128, 512), (8, 256, 2048), (8, 1024, 16), (32, 50, 20), (4, 10000, 8)]
# --quick: the same K (so every peer meets the same code paths and memory cap), short chains; the last
# one long enough for method="auto" to take the blocked algorithm
QUICK_SIZES = [(4, 16, 64), (4, 16, 128), (4, 32, 512), (2, 32, 2048), (2, 256, 16), (4, 16, 20), (2, 2048, 8)]

# method -> (description, fwd+bwd?, applicable(B, T, K)); on --device cuda the CPU-only rows are left out
CPU_ONLY = ("hmmlearn-fwd", "hmmlearn-score")
CATEGORICAL = ("latentnlp-score", "hmmlearn-score")  # rows on a categorical HMM's symbols (see above)
VOCABULARY = 64
METHODS = {
    "latentnlp": ("latentnlp ChainPosterior, method auto", True, lambda B, T, K: True),
    "latentnlp-scaled": ("latentnlp, method scaled", True, lambda B, T, K: True),
    "latentnlp-log": ("latentnlp, method log", True, lambda B, T, K: True),
    "latentnlp-scan": ("latentnlp, method scan (small K only)", True, lambda B, T, K: K <= 128),
    "latentnlp-blocked": ("latentnlp, method blocked", True, lambda B, T, K: True),
    "latentnlp-fwd": ("latentnlp auto, forward only (no_grad)", False, lambda B, T, K: True),
    "naive": ("scaled forward in plain torch ops, autograd backward", True, lambda B, T, K: True),
    "torch-struct": ("torch-struct LinearChainCRF on [B,T-1,K,K] edges", True, lambda B, T, K: True),
    "pyro": ("Pyro DiscreteHMM.log_prob", True, lambda B, T, K: True),
    "hmmlearn-fwd": ("hmmlearn _hmmc.forward_scaling x B, float64, forward only", False, lambda B, T, K: True),
    "latentnlp-score": ("latentnlp auto, forward only, a categorical HMM's symbols", False, lambda B, T, K: True),
    "hmmlearn-score": ("hmmlearn CategoricalHMM.score, same symbols, float64", False, lambda B, T, K: True),
    "matmul-3T": ("3T torch.mm (B,K)x(K,K): the BLAS limit", True, lambda B, T, K: True),
}
PEERS = ["naive", "torch-struct", "pyro"]

# --viterbi: (B, T, K) of a CRF tagger, a larger tag set, a long sequence
VITERBI_SIZES = [(32, 50, 20), (32, 200, 50), (8, 1000, 10)]
VITERBI_ROWS = {
    "latentnlp-argmax": "ChainPosterior(...).argmax, a [B, T] tensor",
    "latentnlp-argmax-lists": "the same, then .tolist() (pytorch-crf's output)",
    "pytorch-crf": "torchcrf.CRF(K, batch_first=True).decode, lists",
}


# --decode: sizes where method="auto" takes the blocked kernels, (4, 10000, 8) and (2, 4096, 4), or
# near the rule's bounds, (8, 1024, 16) (T < 2048) and (4, 10000, 16) (B K^3 = 16384 > 4096)
DECODE_SIZES = [(4, 10000, 8), (2, 4096, 4), (8, 1024, 16), (4, 10000, 16)]
DECODE_KERNELS = {
    "viterbi": "ChainPosterior(...).argmax",
    "sample": "ChainPosterior(...).sample(): forward filters, then backward sampling of one path per chain",
    "entropy": "ChainPosterior(...).entropy(), no gradient",
}


def decode_steps(kernel: str, algorithm: str, T: int) -> int:
    """Sequential batched operations of a ``--decode`` row: ``b`` the default block, ``n`` the blocks.

    Viterbi: ``2 (T - 1)`` (max-plus forward and backtracking) or ``3 b + 2 n`` (block products,
    boundaries, inner scores, inner paths, boundary backtrack); sampling: the filters' ``T - 1`` or
    ``2 b + n``, plus ``T - 1`` for the backward sampling; entropy: ``2 (T - 1)`` (the scaled forward
    and backward) or ``3 b + 2 n`` (blocked forward and backward).
    """
    from latentnlp import chain

    edges = max(T - 1, 0)
    block = chain.default_block(T)
    blocks = -(-edges // block)
    if algorithm == "scaled":
        return {"viterbi": 2 * edges, "sample": 2 * edges, "entropy": 2 * edges}[kernel]
    return {"viterbi": 3 * block + 2 * blocks, "sample": 2 * block + blocks + edges, "entropy": 3 * block + 2 * blocks}[
        kernel
    ]


def sequential_steps(method: str, B: int, T: int, K: int, device: str = "cpu") -> int:
    """The number of batched operations of the timed call that must run one after another, a lower
    bound on its time wherever a step costs a fixed overhead (an interpreter round, a GPU launch).

    Forward + backward (forward alone for the ``-fwd`` rows): ``2 (T - 1)`` for a step-by-step
    recursion (scaled, log, naive; hmmlearn ``T``), ``2 ceil(log2(T - 1))`` for a balanced tree of
    matrix products (latentnlp's scan, torch-struct's and Pyro's parallel scans, their autograd
    backward the same depth again), ``3 b + 2 n`` for the blocked algorithm (``b`` its block,
    ``n = ceil((T - 1) / b)`` blocks: ``2 b + n`` forward, ``b + n`` backward), ``3 T`` for the
    matmul limit; ``latentnlp`` (``"auto"``) counts the algorithm it chooses for the size.
    """
    from latentnlp import chain
    from latentnlp.transitions import DenseTransition

    edges = max(T - 1, 0)
    tree = 2 * math.ceil(math.log2(edges)) if edges > 1 else 2 * edges
    block = chain.default_block(T)
    blocks = -(-edges // block)
    blocked = 3 * block + 2 * blocks
    if method in ("latentnlp", "latentnlp-fwd", "latentnlp-score"):
        import torch

        # the rule reads the transition's kind, the device type and the shape only: expanded scalars
        emit = torch.empty(1, 1, 1, device=device).expand(B, T, K)
        takes_blocked = chain.prefers_blocked(DenseTransition(torch.empty(1, 1, device=device).expand(K, K)), emit)
        if method in ("latentnlp-fwd", "latentnlp-score"):
            return 2 * block + blocks if takes_blocked else edges
        return blocked if takes_blocked else 2 * edges
    return {
        "latentnlp-scaled": 2 * edges,
        "latentnlp-log": 2 * edges,
        "naive": 2 * edges,
        "latentnlp-scan": tree,
        "torch-struct": tree,
        "pyro": tree,
        "latentnlp-blocked": blocked,
        "hmmlearn-fwd": T,
        "hmmlearn-score": T,
        "matmul-3T": 3 * T,
    }[method]


# ==============================================================================================
# worker side: one (method, B, T, K) per process
# ==============================================================================================
def _inputs(B, T, K, torch):
    """One HMM: log-normalised ``init [K]`` and ``trans [K, K]``, emission scores ``emit [B, T, K]``."""
    g = torch.Generator().manual_seed(SEED)
    init = torch.randn(K, generator=g).log_softmax(-1)
    trans = torch.randn(K, K, generator=g).log_softmax(-1)
    emit = torch.randn(B, T, K, generator=g)
    return init, trans, emit


def _categorical(B, T, K, torch):
    """The categorical HMM of the ``-score`` rows: log emission probabilities ``log_b [K, V]`` and symbols
    ``x [B, T]`` (``init`` and ``trans`` are :func:`_inputs`'s)."""
    g = torch.Generator().manual_seed(SEED + 1)
    log_b = torch.randn(K, VOCABULARY, generator=g).log_softmax(-1)
    return log_b, torch.randint(VOCABULARY, (B, T), generator=g)


def _setup(method, B, T, K, device="cpu"):
    """Build the inputs on ``device`` and return ``run()`` -> a float (the summed log-partition, for
    checking; reading it back waits for the device)."""
    import torch

    init, trans, emit = (x.to(device) for x in _inputs(B, T, K, torch))

    if method == "matmul-3T":
        x, a, out = (torch.randn(B, K), torch.randn(K, K), torch.empty(B, K))
        x, a, out = x.to(device), a.to(device), out.to(device)

        def run():
            for _ in range(3 * T):
                torch.mm(x, a, out=out)
            return float(out[0, 0] * float("nan"))  # waits for the device

        return run

    if method == "hmmlearn-fwd":
        import numpy as np
        from hmmlearn import _hmmc

        start = init.double().exp().numpy()
        transmat = trans.double().exp().numpy()
        frames = [np.ascontiguousarray(emit[b].double().exp().numpy()) for b in range(B)]

        def run():
            return sum(_hmmc.forward_scaling(start, transmat, f)[0] for f in frames)

        return run

    if method == "hmmlearn-score":
        import numpy as np
        from hmmlearn.hmm import CategoricalHMM

        log_b, x = _categorical(B, T, K, torch)
        model = CategoricalHMM(n_components=K, implementation="scaling", init_params="", params="")
        model.n_features = VOCABULARY
        model.startprob_ = init.double().exp().numpy()
        model.transmat_ = trans.double().exp().numpy()
        model.emissionprob_ = log_b.double().exp().numpy()
        symbols, lengths = x.reshape(-1, 1).numpy(), np.full(B, T)

        def run():
            return float(model.score(symbols, lengths))

        return run

    if method == "latentnlp-score":
        from latentnlp import ChainPosterior

        log_b, x = (t.to(device) for t in _categorical(B, T, K, torch))
        emission = log_b.T.contiguous()  # [V, K]

        def run():
            with torch.no_grad():
                emit = torch.nn.functional.embedding(x, emission)  # [B, T, K], as an nn.Embedding would
                return ChainPosterior(init, trans, emit).log_partition.sum().item()

        return run

    if method == "latentnlp-fwd":
        from latentnlp import ChainPosterior

        def run():
            with torch.no_grad():
                return ChainPosterior(init, trans, emit).log_partition.sum().item()

        return run

    emit.requires_grad_(True)
    trans.requires_grad_(True)

    if method.startswith("latentnlp"):
        from latentnlp import ChainPosterior

        algo = method.partition("-")[2] or "auto"

        def value():
            return ChainPosterior(init, trans, emit, method=algo).log_partition

    elif method == "naive":

        def value():
            tmax = trans.detach().max()
            A = (trans - tmax).exp()
            m = emit.detach().amax(-1, keepdim=True)
            E = (emit - m).exp()
            first = init + emit[:, 0]
            log_z = first.logsumexp(-1)
            alpha = first.softmax(-1)
            for t in range(1, T):
                alpha = (alpha @ A) * E[:, t]
                s = alpha.sum(-1, keepdim=True)
                alpha = alpha / s
                log_z = log_z + s.squeeze(-1).log()
            return log_z + m[:, 1:, 0].sum(-1) + (T - 1) * tmax

    elif method == "torch-struct":
        from torch_struct import LinearChainCRF

        def value():
            # edges[b, n, c_next, c_prev] scores (z_n = c_prev, z_{n+1} = c_next)
            edges = trans.transpose(0, 1) + emit[:, 1:, :, None]
            first = edges[:, :1] + (init + emit[:, 0])[:, None, None, :]
            edges = torch.cat([first, edges[:, 1:]], dim=1)
            return LinearChainCRF(edges).partition

    elif method == "pyro":
        import pyro.distributions as pdist
        from torch.distributions import constraints

        class EmitScores(pdist.TorchDistribution):
            """Observation 'distribution' whose log_prob at the observed x is emit [B, T, K]."""

            arg_constraints = {}
            support = constraints.real

            def __init__(self, scores):
                self.scores = scores
                super().__init__(batch_shape=scores.shape, validate_args=False)

            def log_prob(self, value):
                return self.scores

        x = torch.zeros(B, T, device=device)

        def value():
            tl = torch.cat([init.expand(1, K, K), trans.expand(T - 1, K, K)], dim=0)
            return pdist.DiscreteHMM(init, tl, EmitScores(emit)).log_prob(x)

    else:
        raise ValueError(f"unknown method {method!r}")

    def run():
        emit.grad = None
        trans.grad = None
        v = value()
        v.sum().backward()
        return v.detach().double().sum().item()

    return run


def worker(spec: dict) -> dict:
    device = spec.get("device", "cpu")
    start_worker(spec["mem_cap_gb"], spec["threads"], device)
    sys.path.insert(0, str(REPO))
    method, B, T, K = spec["method"], spec["B"], spec["T"], spec["K"]
    out = {"method": method, "B": B, "T": T, "K": K}
    try:
        # a tiny call of the same code path first: lazy library/thread initialisation is not
        # charged to the measured call's memory
        _setup(method, 2, 4, min(K, 8), device)()
        run = _setup(method, B, T, K, device)

        def timed_run():
            t0 = time.perf_counter()
            value = run()
            return value, time.perf_counter() - t0

        (out["value"], first), out["peak_mb"], out["peak_method"] = peak_memory(
            timed_run, device if device != "cpu" else None
        )
        if first > spec["timeout_s"] / 3:  # no time left for a repeat: keep the warm-up
            times = [first]
            out["note"] = "single call (warm-up) timed: too slow to repeat"
        else:
            times = []
            for _ in range(repeat_count(first, spec["budget_s"], spec["max_repeats"])):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        out.update(status="ok", time_s=statistics.median(times), min_s=min(times), times_s=times, warmup_s=first)
    except Exception as e:  # a peer's failure is a result, not a crash of the benchmark
        out.update(failure(e))
    return out


# ==============================================================================================
# driver side
# ==============================================================================================
def measure(method, B, T, K, args) -> dict:
    spec = dict(
        method=method,
        B=B,
        T=T,
        K=K,
        mem_cap_gb=args.mem_cap_gb,
        budget_s=args.budget,
        max_repeats=args.max_repeats,
        timeout_s=args.timeout,
        threads=args.threads,
        device=args.device,
    )
    return run_case(
        __file__, spec, identity=dict(method=method, B=B, T=T, K=K), threads=args.threads, timeout=args.timeout
    )


def _ok(r):
    return r is not None and r.get("status") == "ok"


def ratios(res: dict) -> dict:
    """Speed-ups of latentnlp (auto) over each peer and its position against the matmul limit."""
    ours, limit = res.get("latentnlp"), res.get("matmul-3T")
    out = {}
    if _ok(ours):
        for peer in PEERS:
            if _ok(res.get(peer)):
                out[f"speedup_vs_{peer}"] = res[peer]["time_s"] / ours["time_s"]
        if _ok(limit):
            out["limit_fraction"] = limit["time_s"] / ours["time_s"]
            out["time_over_3T_matmul"] = ours["time_s"] / limit["time_s"]
    fwd, hl = res.get("latentnlp-fwd"), res.get("hmmlearn-fwd")
    if _ok(fwd) and _ok(hl):
        out["fwd_speedup_vs_hmmlearn"] = hl["time_s"] / fwd["time_s"]
    score, hl_score = res.get("latentnlp-score"), res.get("hmmlearn-score")
    if _ok(score) and _ok(hl_score):
        out["score_speedup_vs_hmmlearn"] = hl_score["time_s"] / score["time_s"]
    return out


def targets(results: list) -> list:
    """The project's goals, each at the first size with its K (the published sizes have one K
    each); a goal whose peer failed is n/a, with the reason."""
    by = {}
    for r in results:
        by.setdefault(r["K"], r)

    def goal(name, k, key, op, bound, peer=None):
        r = by.get(k)
        if r is None:
            return dict(target=name, size=None, status="n/a", why=f"no size with K={k} run")
        size = (r["B"], r["T"], r["K"])
        val = r["ratios"].get(key) if key != "peak_mb" else (r["methods"].get("latentnlp", {}).get("peak_mb"))
        if val is None:
            why = [
                f"{m}: {r['methods'][m].get('status')}"
                for m in ("latentnlp", peer)
                if m in r["methods"] and not _ok(r["methods"][m])
            ]
            return dict(target=name, size=list(size), status="n/a", why=", ".join(why) or "not run")
        ok = val >= bound if op == ">=" else (val <= bound if op == "<=" else val < bound)
        return dict(target=name, size=list(size), value=val, bound=bound, op=op, status="pass" if ok else "FAIL")

    return [
        goal(">= 1000x faster than torch-struct at K=64", 64, "speedup_vs_torch-struct", ">=", 1000, "torch-struct"),
        goal(">= 100x faster than Pyro at K=128", 128, "speedup_vs_pyro", ">=", 100, "pyro"),
        goal(">= 1.5x faster than naive autograd at K=512", 512, "speedup_vs_naive", ">=", 1.5, "naive"),
        goal("fwd+bwd <= 1.43x the 3T matmul time at K=512", 512, "time_over_3T_matmul", "<=", 1.43, "matmul-3T"),
        goal("fwd+bwd peak memory < 1 GB at K=2048 (B=8, T=256)", 2048, "peak_mb", "<", 1024),
    ]


def _cell_time(r):
    if r is None:
        return "-"
    if not _ok(r):
        return {"oom": "OOM", "timeout": "timeout"}.get(r["status"], r["status"])
    t = r["time_s"]
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def _fmt_mb(x):
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def _fmt_ratio(x):
    return "-" if x is None else (f"{x:,.0f}x" if x >= 100 else f"{x:.3g}x")


def tables(results: list, goals: list, info: dict) -> tuple[str, str]:
    """A plain console table and a Markdown table for the README."""
    methods = [m for m in METHODS if any(m in r["methods"] for r in results)]
    head = ["B,T,K"] + methods
    rows = []
    for r in results:
        rows.append([f"{r['B']},{r['T']},{r['K']}"] + [_cell_time(r["methods"].get(m)) for m in methods])
    mem_rows = []
    for r in results:
        mem_rows.append(
            [f"{r['B']},{r['T']},{r['K']}"]
            + [(_fmt_mb(r["methods"][m]["peak_mb"]) if _ok(r["methods"].get(m)) else "-") for m in methods]
        )
    rkeys = [
        "speedup_vs_naive",
        "speedup_vs_torch-struct",
        "speedup_vs_pyro",
        "fwd_speedup_vs_hmmlearn",
        "score_speedup_vs_hmmlearn",
        "limit_fraction",
        "time_over_3T_matmul",
    ]
    ratio_rows = [[f"{r['B']},{r['T']},{r['K']}"] + [_fmt_ratio(r["ratios"].get(k)) for k in rkeys] for r in results]

    def plain(head, rows):
        w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        line = lambda xs: "  ".join(str(x).rjust(n) for x, n in zip(xs, w))
        return "\n".join([line(head), line(["-" * n for n in w])] + [line(x) for x in rows])

    goal_lines = []
    for g in goals:
        if "value" in g:
            v = g["value"]
            vs = f"{_fmt_mb(v)} MB" if "memory" in g["target"] else _fmt_ratio(v)
        else:
            vs = g.get("why", "")
        at = f" (at B,T,K = {','.join(map(str, g['size']))})" if g["size"] else ""
        goal_lines.append(f"[{g['status']:>4}] {g['target']}: {vs}{at}")

    step_rows = [[f"{r['B']},{r['T']},{r['K']}"] + [str(r["steps"].get(m, "-")) for m in methods] for r in results]
    console = "\n\n".join(
        [
            "fwd+bwd time, median (the hmmlearn rows and latentnlp-fwd, -score: forward only)",
            plain(head, rows),
            "sequential steps of each method (see sequential_steps)",
            plain(head, step_rows),
            "peak memory above baseline, MB",
            plain(head, mem_rows),
            "ratios (speed-up = peer time / latentnlp time; limit_fraction = 3T-matmul time / latentnlp time)",
            plain(["B,T,K"] + rkeys, ratio_rows),
            "targets\n" + "\n".join(goal_lines),
        ]
    )

    # Markdown: one row per size, peers as "time (speed-up)"
    md_head = [
        "B, T, K",
        "latentnlp fwd+bwd",
        "sequential steps",
        "peak mem",
        "3T matmuls (limit)",
        "naive autograd",
        "torch-struct",
        "Pyro",
        "latentnlp fwd / hmmlearn fwd",
        "latentnlp / hmmlearn score",
    ]
    md = ["| " + " | ".join(md_head) + " |", "|" + "---|" * len(md_head)]
    for r in results:
        m, q = r["methods"], r["ratios"]

        def peer(name, key):
            c = _cell_time(m.get(name))
            return c + (f" ({_fmt_ratio(q[key])})" if key in q else "")

        ours = m.get("latentnlp")
        md.append(
            "| "
            + " | ".join(
                [
                    f"{r['B']}, {r['T']}, {r['K']}",
                    _cell_time(ours),
                    str(r["steps"].get("latentnlp", "-")),
                    _fmt_mb(ours["peak_mb"]) + " MB" if _ok(ours) else "-",
                    _cell_time(m.get("matmul-3T"))
                    + (f" ({q['time_over_3T_matmul']:.2f}x)" if "time_over_3T_matmul" in q else ""),
                    peer("naive", "speedup_vs_naive"),
                    peer("torch-struct", "speedup_vs_torch-struct"),
                    peer("pyro", "speedup_vs_pyro"),
                    _cell_time(m.get("latentnlp-fwd")) + " / " + peer("hmmlearn-fwd", "fwd_speedup_vs_hmmlearn"),
                    _cell_time(m.get("latentnlp-score")) + " / " + peer("hmmlearn-score", "score_speedup_vs_hmmlearn"),
                ]
            )
            + " |"
        )
    md.append("")
    md.append(
        f"Median time of forward + backward of `log_partition.sum()` w.r.t. emit and trans "
        f"(float32, {info['device_name']}, {info['threads']} thread(s), torch "
        f"{info['versions']['torch']}); (Nx) = speed-up of latentnlp over the peer; the limit "
        f"column is the time of 3T (B,K)x(K,K) matmuls with (latentnlp time / that time); "
        f"hmmlearn (float64 C++) is forward only, so is the latentnlp time beside it (fwd: its bare forward "
        f"recursion on the emission scores; score: CategoricalHMM.score on {VOCABULARY}-symbol sequences); "
        f"sequential steps = the batched operations of latentnlp's forward + backward that follow one another; "
        f"OOM = over the {info['mem_cap_gb']:g} GB per-process memory cap."
    )
    return console, "\n".join(md)


# ==============================================================================================
# --viterbi: decoding against pytorch-crf, side by side in this process
# ==============================================================================================
def alternating_times(calls: dict, repeats: int) -> dict:
    """``{name: [seconds of each call]}``: ``repeats`` rounds over ``calls`` (``{name: call()}``), each
    round starting one name further on, so that no call always follows the same one."""
    times = {name: [] for name in calls}
    order = list(calls)
    for i in range(repeats):
        for name in order[i % len(order) :] + order[: i % len(order)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _viterbi_rows(B, T, K):
    """``{row: decode()}`` over one random CRF, and the path of each (checked equal by the caller)."""
    import torch
    from torchcrf import CRF

    from latentnlp import ChainPosterior

    g = torch.Generator().manual_seed(SEED)
    init, trans, emit = torch.randn(K, generator=g), torch.randn(K, K, generator=g), torch.randn(B, T, K, generator=g)
    crf = CRF(K, batch_first=True)
    with torch.no_grad():
        crf.start_transitions.copy_(init)
        crf.transitions.copy_(trans)
        crf.end_transitions.zero_()
    return {
        "latentnlp-argmax": lambda: ChainPosterior(init, trans, emit).argmax,
        "latentnlp-argmax-lists": lambda: ChainPosterior(init, trans, emit).argmax.tolist(),
        "pytorch-crf": lambda: crf.decode(emit),
    }


def viterbi_benchmark(args, sizes) -> tuple[list, str]:
    """Time every row of :data:`VITERBI_ROWS` at ``sizes``, alternating; returns results and a table."""
    import torch

    torch.set_num_threads(args.threads)
    results, lines = [], []
    head = f"{'B,T,K':>12}  {'row':<24}{'fastest':>11}{'median':>11}  speed-up of latentnlp-argmax (fastest, median)"
    for B, T, K in sizes:
        rows = _viterbi_rows(B, T, K)
        paths = {name: torch.as_tensor(run()) for name, run in rows.items()}  # also the warm-up
        agree = all(torch.equal(p, paths["latentnlp-argmax"]) for p in paths.values())
        times = alternating_times(rows, args.repeats)
        ours = times["latentnlp-argmax"]
        entry = dict(B=B, T=T, K=K, paths_agree=agree, rows={})
        for name, ts in times.items():
            fastest, median = min(ts), statistics.median(ts)
            entry["rows"][name] = dict(fastest_s=fastest, median_s=median, times_s=ts)
            ratio = (fastest / min(ours), median / statistics.median(ours))
            entry["rows"][name]["speedup_of_latentnlp"] = dict(fastest=ratio[0], median=ratio[1])
            lines.append(
                f"{f'{B},{T},{K}':>12}  {name:<24}{fastest * 1e3:>9.2f}ms{median * 1e3:>9.2f}ms"
                f"  {ratio[0]:.2f}x, {ratio[1]:.2f}x"
            )
        if not agree:
            lines.append(f"  WARNING: the paths differ at B,T,K = {B},{T},{K}")
        results.append(entry)
    table = "\n".join([head, "-" * len(head)] + lines)
    return results, table


def _side_by_side(args, sizes, benchmark, default_out, title: str, settings: dict, described: dict) -> list:
    """Run ``benchmark(args, sizes)`` (a side-by-side comparison of alternating repeats in one process),
    print its table, and write the JSON (machine, settings common to these comparisons plus
    ``settings``, ``described``, results, table) to ``args.out`` or ``default_out`` (none with ``--quick``)."""
    info = machine_info(args)
    print(
        f"# {info['cpu_model']}, {info['cpu_count']} CPUs, torch {info['versions']['torch']}, "
        f"{args.threads} thread(s), {args.repeats} alternating repeats, "
        f"load average {info['load_average_start'][0]:.2f}",
        flush=True,
    )
    results, table = benchmark(args, sizes)
    print(table)
    info["load_average_end"] = list(os.getloadavg())
    out = args.out or (None if args.quick else default_out)
    if out:
        doc = {
            "benchmark": title,
            "date": utc_now(),
            "machine": info,
            "settings": {
                "repeats": args.repeats,
                "dtype": "float32",
                "seed": SEED,
                "trans": "shared [K, K], all lengths T",
                "statistic": "fastest and median of alternating repeats in one process, after one warm-up call",
                **settings,
            },
            **described,
            "results": results,
            "table": table,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"# wrote {out}")
    return results


def against_benchmark(args, sizes) -> tuple[list, str]:
    """Forward + backward of ``log_partition.sum()`` (``method="auto"``, the grid's inputs, ``init`` per row)
    by this working tree's library and by ``args.baseline`` (another commit's), alternating in one
    process; returns results and a table."""
    import torch

    import latentnlp

    torch.set_num_threads(args.threads)
    before = import_baseline(str(args.baseline["root"]))
    results, lines = [], []
    head = f"{'B,T,K':>14}{'now':>11}{'before':>11}  before / now (fastest, median)  |log Z now - before|"
    for B, T, K in sizes:
        init, trans, emit = _inputs(B, T, K, torch)
        init = init.expand(B, K).contiguous()
        trans.requires_grad_(True)
        emit.requires_grad_(True)

        def call(library):
            def run():
                value = library.ChainPosterior(init, trans, emit).log_partition
                torch.autograd.grad(value.sum(), (emit, trans))
                return value.detach()

            return run

        calls = {"now": call(latentnlp), "before": call(before)}
        values = {name: run() for name, run in calls.items()}  # also the warm-up
        times = alternating_times(calls, args.repeats)
        fastest = {name: min(ts) for name, ts in times.items()}
        median = {name: statistics.median(ts) for name, ts in times.items()}
        ratio = dict(fastest=fastest["before"] / fastest["now"], median=median["before"] / median["now"])
        difference = float((values["now"] - values["before"]).abs().max())
        results.append(
            dict(
                B=B,
                T=T,
                K=K,
                times_s=times,
                fastest_s=fastest,
                median_s=median,
                before_over_now=ratio,
                max_abs_difference=difference,
            )
        )
        lines.append(
            f"{f'{B},{T},{K}':>14}{median['now'] * 1e3:>9.2f}ms{median['before'] * 1e3:>9.2f}ms"
            f"  {ratio['fastest']:.2f}x, {ratio['median']:.2f}x{difference:>26.1e}"
        )
    return results, "\n".join([head, "-" * len(head)] + lines)


def against_main(args, sizes) -> int:
    baseline = args.baseline
    _side_by_side(
        args,
        sizes,
        against_benchmark,
        REPO / "benchmarks" / "results" / f"chain-against-{baseline['commit'][:7]}.json",
        f"ChainPosterior log Z forward + backward, this tree ({baseline['head'][:7]}) against {baseline['commit'][:7]}",
        {"init": "[B, K] (one per row)", "method": "auto", "gradients": "emit and trans"},
        {"baseline": {key: value for key, value in baseline.items() if key != "root"}},
    )
    shutil.rmtree(baseline["root"])
    return 0


def viterbi_main(args, sizes) -> int:
    results = _side_by_side(
        args,
        sizes,
        viterbi_benchmark,
        VITERBI_OUT,
        "Viterbi decoding, ChainPosterior.argmax against pytorch-crf CRF.decode",
        {
            "outputs": "latentnlp a [B, T] tensor, pytorch-crf Python lists (latentnlp-argmax-lists: "
            "tensor then .tolist())"
        },
        {"rows": VITERBI_ROWS},
    )
    return 0 if all(r["paths_agree"] for r in results) else 1


def _decode_rows(B, T, K, kernels):
    """``{(kernel, algorithm): call()}`` over the grid's inputs at one size, for the ``kernels`` named."""
    import torch

    from latentnlp import ChainPosterior

    init, trans, emit = _inputs(B, T, K, torch)
    calls = {
        "viterbi": lambda d: d.argmax,
        "sample": lambda d: d.sample(generator=torch.Generator().manual_seed(SEED)),
        "entropy": lambda d: d.entropy(),
    }
    return {
        (kernel, algorithm): (
            lambda call=call, algorithm=algorithm: call(ChainPosterior(init, trans, emit, method=algorithm))
        )
        for kernel, call in calls.items()
        if kernel in kernels
        for algorithm in ("scaled", "blocked")
    }


def decode_benchmark(args, sizes) -> tuple[list, str]:
    """Time every ``--decode`` row at ``sizes``, alternating; returns results and a table."""
    import torch

    from latentnlp import ChainPosterior

    torch.set_num_threads(args.threads)
    results, lines = [], []
    head = f"{'B,T,K':>12}  {'kernel':<8}{'scaled':>11}{'blocked':>11}{'steps':>13}  blocked / scaled (fastest, median)"
    for B, T, K in sizes:
        rows = _decode_rows(B, T, K, args.kernels)
        outputs = {name: run() for name, run in rows.items()}  # also the warm-up
        d = ChainPosterior(*_inputs(B, T, K, torch))
        agree = {}
        if "viterbi" in args.kernels:
            scores = [d.score(outputs[("viterbi", a)]) for a in ("scaled", "blocked")]
            agree["viterbi_scores"] = bool(torch.allclose(*scores, rtol=1e-6, atol=0.0))
        if "entropy" in args.kernels:
            entropies = [outputs[("entropy", a)] for a in ("scaled", "blocked")]
            agree["entropy"] = bool(torch.allclose(*entropies, rtol=1e-4, atol=0.0))
        times = alternating_times(rows, args.repeats)
        entry = dict(B=B, T=T, K=K, agree=agree, kernels={})
        for kernel in args.kernels:
            pair = {a: times[(kernel, a)] for a in ("scaled", "blocked")}
            fastest = {a: min(ts) for a, ts in pair.items()}
            median = {a: statistics.median(ts) for a, ts in pair.items()}
            steps = {a: decode_steps(kernel, a, T) for a in pair}
            ratio = dict(fastest=fastest["blocked"] / fastest["scaled"], median=median["blocked"] / median["scaled"])
            entry["kernels"][kernel] = dict(
                times_s=pair, fastest_s=fastest, median_s=median, steps=steps, blocked_over_scaled=ratio
            )
            lines.append(
                f"{f'{B},{T},{K}':>12}  {kernel:<8}{median['scaled'] * 1e3:>9.1f}ms{median['blocked'] * 1e3:>9.1f}ms"
                f"{steps['scaled']:>7}/{steps['blocked']:<5}  {ratio['fastest']:.2f}, {ratio['median']:.2f}"
            )
        if not all(agree.values()):
            lines.append(f"  WARNING: scaled and blocked disagree at B,T,K = {B},{T},{K}: {agree}")
        results.append(entry)
    table = "\n".join([head, "-" * len(head)] + lines)
    return results, table


def decode_main(args, sizes) -> int:
    results = _side_by_side(
        args,
        sizes,
        decode_benchmark,
        DECODE_OUT,
        "blocked Viterbi, FFBS sampling and entropy against the sequential kernels",
        {"sample": "one path per chain", "note": args.note},
        {"kernels": {kernel: DECODE_KERNELS[kernel] for kernel in args.kernels}},
    )
    return 0 if all(all(r["agree"].values()) for r in results) else 1


def _grid(args, default: list, quick_steps: int) -> list:
    """The ``(B, T, K)`` sizes of a comparison: ``--sizes`` ("BxTxK,..."), else ``default``; with
    ``--quick`` each default size's ``K`` at ``B = 2``, ``T = quick_steps``."""
    if args.quick:
        return [(2, quick_steps, K) for _, _, K in default]
    if not args.sizes:
        return default
    return [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes.split(",")]


def machine_info(args) -> dict:
    import numpy
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {"torch": torch.__version__, "numpy": numpy.__version__}
    for name in ("torch-struct", "pyro-ppl", "hmmlearn", "pytorch-crf"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        git = lambda *cmd: subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True).stdout.strip()
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--", "latentnlp"))
    except OSError:
        commit, dirty = None, None
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "device": getattr(args, "device", "cpu"),
        "device_name": torch.cuda.get_device_name() if getattr(args, "device", "cpu") == "cuda" else cpu,
        "threads": args.threads,
        # idle OpenMP threads sleep (PASSIVE) or spin (the default): a torch call that enters a parallel
        # region costs a wake-up in the former, which the many small calls of a short chain feel
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "versions": versions,
        "mem_cap_gb": args.mem_cap_gb,
        "load_average_start": list(os.getloadavg()),
        "git_commit": commit,
        "latentnlp_uncommitted_changes": dirty,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="sanity run: short chains (same K), one repeat, nothing written unless --out",
    )
    p.add_argument("--sizes", help="comma list of BxTxK (default: SIZES, the five published sizes and two more)")
    p.add_argument("--methods", help=f"comma list out of {', '.join(METHODS)}")
    p.add_argument("--budget", type=float, help="seconds of repeats per measurement (default 3; quick 0)")
    p.add_argument("--max-repeats", type=int, default=15)
    p.add_argument("--timeout", type=float, help="seconds per measurement process (default 150; quick 30)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default 2; --viterbi 1)")
    p.add_argument("--mem-cap-gb", type=float, default=8.0, help="RLIMIT_AS of each process")
    p.add_argument(
        "--out",
        type=Path,
        help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)}; --quick writes none unless given)",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the grid runs: cuda needs a GPU (hmmlearn is left out; default output results/chain-cuda.json)",
    )
    p.add_argument("--viterbi", action="store_true", help="decoding against pytorch-crf (see above)")
    p.add_argument("--decode", action="store_true", help="blocked Viterbi, sampling and entropy (see above)")
    p.add_argument(
        "--against",
        metavar="COMMIT",
        help="forward + backward of log Z (auto) against the library at COMMIT, side by side (see above)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="--viterbi, --decode, --against: alternating repeats per size (default 30, --decode 5, "
        "--against 15; quick 2)",
    )
    p.add_argument("--note", help="--decode: a remark stored with the results (e.g. the machine's load)")
    p.add_argument("--kernels", help=f"--decode: comma list out of {', '.join(DECODE_KERNELS)} (default all)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    sys.path.insert(0, str(REPO))
    if args.viterbi:
        if args.threads is None:
            args.threads = 1
        if args.repeats is None:
            args.repeats = 2 if args.quick else 30
        return viterbi_main(args, _grid(args, VITERBI_SIZES, quick_steps=8))
    if args.against:
        if args.threads is None:
            args.threads = THREADS
        if args.repeats is None:
            args.repeats = 2 if args.quick else 15
        args.baseline = extract_baseline(args.against)
        return against_main(args, _grid(args, SIZES, quick_steps=64))
    if args.decode:
        if args.threads is None:
            args.threads = THREADS
        if args.repeats is None:
            args.repeats = 2 if args.quick else 5
        sizes = _grid(args, DECODE_SIZES, quick_steps=64)
        args.kernels = list(DECODE_KERNELS) if not args.kernels else args.kernels.split(",")
        for kernel in args.kernels:
            if kernel not in DECODE_KERNELS:
                p.error(f"unknown kernel {kernel!r}; choose from {', '.join(DECODE_KERNELS)}")
        return decode_main(args, sizes)

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch finds no CUDA device here (torch.cuda.is_available() is False)")
    if args.threads is None:
        args.threads = THREADS
    if args.budget is None:
        args.budget = 0.0 if args.quick else 3.0
    if args.timeout is None:
        args.timeout = 30.0 if args.quick else 150.0
    if args.quick:
        args.max_repeats = 1
    out = args.out if args.out or args.quick else (DEFAULT_OUT if args.device == "cpu" else CUDA_OUT)
    sizes = (
        (QUICK_SIZES if args.quick else SIZES)
        if not args.sizes
        else [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    )
    methods = list(METHODS) if not args.methods else args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            p.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    if args.device != "cpu":
        methods = [m for m in methods if m not in CPU_ONLY]

    info = machine_info(args)
    print(
        f"# {info['cpu_model']}, {info['cpu_count']} CPUs, torch {info['versions']['torch']}, "
        f"{args.threads} thread(s), memory cap {args.mem_cap_gb:g} GB per process, "
        f"load average {info['load_average_start'][0]:.2f}",
        flush=True,
    )
    t_start = time.perf_counter()
    results = []
    for B, T, K in sizes:
        res = {}
        for m in methods:
            if not METHODS[m][2](B, T, K):
                continue
            r = measure(m, B, T, K, args)
            res[m] = r
            what = (
                f"{r['time_s'] * 1e3:10.3f} ms  ({len(r['times_s'])} rep)  peak {r['peak_mb']:.0f} MB"
                if _ok(r)
                else f"{r['status']}: {r.get('error', '')[:120]}"
            )
            print(f"  B={B:<3} T={T:<5} K={K:<5} {m:<17} {what}", flush=True)
        # the values must agree (hmmlearn: float64, forward only) -- a wrong peer is no peer
        ref = next((res[m] for m in ("latentnlp-log", "latentnlp", "naive") if _ok(res.get(m))), None)
        ref_categorical = next((res[m] for m in CATEGORICAL if _ok(res.get(m))), None)
        for r in res.values():
            against = ref_categorical if r["method"] in CATEGORICAL else ref
            if _ok(r) and against is not None and r["value"] == r["value"]:  # skip NaN (matmul)
                r["value_agrees"] = abs(r["value"] - against["value"]) <= 1e-4 * max(1.0, abs(against["value"]))
                if not r["value_agrees"]:
                    print(f"  WARNING {r['method']}: log Z sum {r['value']:.6g} vs {against['value']:.6g}")
        steps = {m: sequential_steps(m, B, T, K, args.device) for m in res}
        results.append(dict(B=B, T=T, K=K, methods=res, ratios=ratios(res), steps=steps))
    goals = targets(results)
    console, md = tables(results, goals, info)
    print()
    print(console)
    print("\nMarkdown (README):\n")
    print(md)
    info["load_average_end"] = list(os.getloadavg())
    info["wall_s"] = time.perf_counter() - t_start
    print(f"\n# total {info['wall_s']:.0f} s; load average at end {info['load_average_end'][0]:.2f}")
    if out:
        doc = {
            "benchmark": "linear-chain log_partition, forward + backward",
            "date": utc_now(),
            "machine": info,
            "settings": {
                "quick": args.quick,
                "budget_s": args.budget,
                "max_repeats": args.max_repeats,
                "timeout_s": args.timeout,
                "dtype": "float32",
                "seed": SEED,
                "trans": "shared [K, K]",
                "statistic": "median after one warm-up call",
                "memory": "peak RSS of the first (warm-up) call above the RSS before it "
                "(VmHWM reset via /proc/self/clear_refs), MB",
            },
            "methods": {m: METHODS[m][0] for m in methods},
            "results": results,
            "targets": goals,
            "markdown": md,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
