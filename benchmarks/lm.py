r"""Benchmark: language-model training steps, tokens/s and peak memory, one named case per row.

Every case is a training step -- parameters' gradients set to ``None``, forward, backward -- and
counts the target tokens it scores.  Sections (the first part of a case's name):

* ``output`` -- the output layer alone: ``layer.log_prob(hidden [N, H], targets [N]).sum().backward()``
  (gradients w.r.t. the hidden states and every parameter), for ``SoftmaxOutput`` with a
  projection to ``d`` (the baseline), ``MixtureOfSoftmaxes`` with ``K`` experts and the same ``d``,
  and the same MoS with ``chunk_size`` (vocabulary chunks recomputed in backward).
* ``lstm-lm`` -- a whole ``LSTMLanguageModel`` step, ``model.loss(batch).value.backward()`` on a
  ``[B, T]`` stream batch, softmax vs MoS output.
* ``hmm-lm`` -- a whole ``HMMLanguageModel`` step (parameters from the MLPs, emissions, the exact
  chain DP and its backward) on a ``[32, 64]`` batch, ``K`` = 128 .. 4096 dense, and low-rank
  transitions (``O(T K r)``) at ``K`` = 1024 .. 4096.

Sizes follow Yang et al. (2018): ``d = 280``, ``H = 620``, ``K = 15``, 840 tokens a step (batch
12 x BPTT 70); vocabularies of PTB (10,000) and WikiText-2 (33,278).  ``--quick`` shrinks every
case to seconds.  To add a section, append :class:`Case` objects to :data:`CASES` (a builder
``build(params, device) -> (step, tokens_per_step)`` and the full and quick ``params``).

Every case runs in a fresh subprocess (``--worker``), after one warm-up step.  Time: median of
the timed steps (as many as fit ``--budget`` seconds, at least one, at most ``--max-repeats``);
tokens/s = tokens per step / median time.  Memory: on CUDA, ``torch.cuda.max_memory_allocated``
during one step minus the memory allocated before it (parameters and inputs); on the CPU, the
step's peak resident set (``VmHWM`` reset through ``/proc/self/clear_refs``) minus the resident
set before it.  Both are the *working memory of a step*; the CPU process is capped at
``--mem-cap-gb`` of address space so an out-of-memory case is a recorded result.

Usage::

    python benchmarks/lm.py                      # all cases, writes benchmarks/results/lm-<device>.json
    python benchmarks/lm.py --quick              # small sizes, writes nothing unless --out is given
    python benchmarks/lm.py --device cuda --cases output/
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SEED = 0


# ==============================================================================================
# cases
# ==============================================================================================
@dataclass(frozen=True)
class Case:
    """One benchmark row: ``build(params, device)`` returns ``(step, tokens_per_step)``.

    ``step()`` runs one training step (it need not synchronise the device); ``params`` are the
    full sizes, ``quick`` the ``--quick`` ones.  Both are recorded in the results.
    """

    name: str
    build: Callable[[dict, Any], tuple[Callable[[], object], int]]
    params: dict
    quick: dict = field(default_factory=dict)

    @property
    def section(self) -> str:
        return self.name.split("/", 1)[0]


def _output_layer_step(p: dict, device):
    import torch

    from latentnlp.layers import MixtureOfSoftmaxes, SoftmaxOutput

    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    if p["experts"] == 0:
        layer = SoftmaxOutput(p["H"], p["V"], p["d"], chunk_size=p.get("chunk"))
    else:
        layer = MixtureOfSoftmaxes(p["H"], p["V"], p["experts"], p["d"], chunk_size=p.get("chunk"))
    layer.to(device)
    hidden = torch.randn(p["N"], p["H"], generator=g).to(device).requires_grad_(True)
    targets = torch.randint(0, p["V"], (p["N"],), generator=g).to(device)

    def step():
        layer.zero_grad(set_to_none=True)
        hidden.grad = None
        layer.log_prob(hidden, targets).sum().backward()

    return step, p["N"]


def _lstm_lm_step(p: dict, device):
    import torch

    from latentnlp.models.lstm_lm import LSTMLanguageModel

    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    mos = p["experts"] > 0
    model = LSTMLanguageModel(p["V"], p["d"], p["H"], p["layers"], output="mos" if mos else "softmax",
                              softmax_input_size=p["d"], num_experts=p["experts"] if mos else None,
                              tie_weights=True, chunk_size=p.get("chunk")).to(device)
    tokens = torch.randint(0, p["V"], (p["B"], p["T"] + 1), generator=g).to(device)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "lengths": torch.full((p["B"],), p["T"], device=device), "stream": True}

    def step():
        model.zero_grad(set_to_none=True)
        model.loss(batch).value.backward()

    return step, p["B"] * p["T"]


def _output_cases() -> list[Case]:
    cases = []
    for vocab_name, V in (("V10k", 10_000), ("V33k", 33_278)):
        full = dict(N=840, H=620, d=280, V=V)
        quick = dict(N=128, H=64, d=32, V=V // 10)
        for label, extra, quick_extra in (
                ("softmax", dict(experts=0), dict(experts=0)),
                ("mos15", dict(experts=15), dict(experts=15)),
                ("mos15-chunk2048", dict(experts=15, chunk=2048), dict(experts=15, chunk=256))):
            cases.append(Case(f"output/{label}/{vocab_name}", _output_layer_step,
                              {**full, **extra}, {**quick, **quick_extra}))
    return cases


def _lstm_lm_cases() -> list[Case]:
    base = dict(B=12, T=70, H=620, d=280, layers=2, V=10_000)
    quick = dict(B=4, T=16, H=64, d=32, layers=2, V=1000)
    return [Case(f"lstm-lm/{label}/V10k", _lstm_lm_step, {**base, **extra}, {**quick, **extra})
            for label, extra in (("softmax", dict(experts=0)), ("mos15", dict(experts=15)))]


def _hmm_lm_step(p: dict, device):
    import torch

    from latentnlp.models.hmm_lm import HMMLanguageModel

    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    model = HMMLanguageModel(p["V"], p["K"], p["d"], transition_rank=p.get("rank")).to(device)
    tokens = torch.randint(0, p["V"], (p["B"], p["T"]), generator=g).to(device)
    batch = {"inputs": tokens, "targets": tokens, "lengths": torch.full((p["B"],), p["T"], device=device)}

    def step():
        model.zero_grad(set_to_none=True)
        model.loss(batch).value.backward()

    return step, p["B"] * p["T"]


def _hmm_lm_cases() -> list[Case]:
    """HMM LM training steps (exact marginal by the chain DP) at each K, dense vs low rank."""
    base = dict(B=32, T=64, d=256, V=10_000)
    quick = dict(B=4, T=16, d=32, V=1000)
    cases = []
    for states in (128, 256, 512, 1024, 2048, 4096):
        cases.append(Case(f"hmm-lm/dense/K{states}", _hmm_lm_step, {**base, "K": states},
                          {**quick, "K": states // 16}))
    for states, rank in ((1024, 128), (2048, 256), (4096, 256)):
        cases.append(Case(f"hmm-lm/rank{rank}/K{states}", _hmm_lm_step, {**base, "K": states, "rank": rank},
                          {**quick, "K": states // 16, "rank": rank // 16}))
    return cases


#: every benchmark, in the order they run and are tabled; sections append theirs here
CASES: list[Case] = _output_cases() + _lstm_lm_cases() + _hmm_lm_cases()


# ==============================================================================================
# worker side: one case per process
# ==============================================================================================
def _status_kb(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise KeyError(name)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where not allowed."""
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
        cap = int(spec["mem_cap_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    case = {c.name: c for c in CASES}[spec["name"]]
    params = case.quick if spec["quick"] else case.params
    out: dict[str, Any] = {"name": case.name, "section": case.section, "params": params}

    def timed(step) -> float:
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    try:
        step, tokens = case.build(params, device)
        warmup = timed(step)
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            first = timed(step)
            out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
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
def measure(case: Case, args) -> dict:
    spec = dict(name=case.name, quick=args.quick, device=args.device, threads=args.threads,
                mem_cap_gb=args.mem_cap_gb, budget_s=args.budget, max_repeats=args.max_repeats)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    params = case.quick if args.quick else case.params
    failed = dict(name=case.name, section=case.section, params=params)
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


def _sizes(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def table(results: list[dict]) -> str:
    """A Markdown table: one row per case."""
    rows = ["| case | sizes | tokens/s | step time | peak memory (MB) |",
            "| --- | --- | ---: | ---: | ---: |"]
    for r in results:
        if r.get("status") == "ok":
            t = r["time_s"]
            cells = [f"{r['tokens_per_s']:,.0f}", f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s",
                     f"{r['peak_mb']:,.0f}"]
        else:
            cells = [r.get("status", "?"), "-", "-"]
        rows.append(f"| {r['name']} | {_sizes(r['params'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names to run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timed steps per case")
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--mem-cap-gb", type=float, default=16.0, help="CPU address-space cap, 0 = none")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default benchmarks/results/lm-<device>.json; none with --quick)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    wanted = [s for s in args.cases.split(",") if s]
    cases = [c for c in CASES if not wanted or any(s in c.name for s in wanted)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0
    if not cases:
        parser.error(f"no case matches --cases {args.cases!r}; --list shows them")
    results = []
    for case in cases:
        r = measure(case, args)
        results.append(r)
        rate = f"{r['tokens_per_s']:,.0f} tokens/s, {r['peak_mb']:,.0f} MB" if r["status"] == "ok" \
            else f"{r['status']}: {r.get('error', '')}"
        print(f"{case.name}: {rate}", file=sys.stderr, flush=True)
    print(table(results))
    out = args.out
    if out is None and not args.quick:
        out = RESULTS / f"lm-{args.device.split(':')[0]}.json"
    if out is not None:
        import torch

        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    device=args.device, threads=args.threads, quick=args.quick,
                    torch=torch.__version__, python=platform.python_version(),
                    machine=platform.machine(), processor=platform.processor() or platform.machine(),
                    cpu_count=os.cpu_count(),
                    gpu=torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
