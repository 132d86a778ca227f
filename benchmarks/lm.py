r"""Benchmark: language-model training steps, tokens/s and peak memory, one named case per row.

Every case is a training step -- parameters' gradients set to ``None``, forward, backward -- and
counts the target tokens it scores.  Sections (the first part of a case's name):

* ``output`` -- the output layer alone: ``layer.log_prob(hidden [N, H], targets [N]).sum().backward()``
  (gradients w.r.t. the hidden states and every parameter), for ``SoftmaxOutput`` with a
  projection to ``d`` (the baseline), ``MixtureOfSoftmaxes`` with ``K`` experts and the same ``d``,
  and the same MoS with ``max_chunk_elements`` (vocabulary chunks of ``chunk`` columns for each
  of the ``N K`` expert contexts, recomputed in backward).
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
import json
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the shared measurement module, wherever the script is run from

from measurement import add_step_arguments, run_case, run_metadata, start_worker, time_step  # noqa: E402

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


def _elements(p: dict, rows: int) -> int | None:
    """``max_chunk_elements`` for vocabulary chunks of ``p["chunk"]`` columns over ``rows`` score rows."""
    return None if p.get("chunk") is None else p["chunk"] * rows


def _output_layer_step(p: dict, device):
    import torch

    from latentnlp.layers import MixtureOfSoftmaxes, SoftmaxOutput

    g = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    if p["experts"] == 0:
        layer = SoftmaxOutput(p["H"], p["V"], p["d"], max_chunk_elements=_elements(p, p["N"]))
    else:
        elements = _elements(p, p["N"] * p["experts"])
        layer = MixtureOfSoftmaxes(p["H"], p["V"], p["experts"], p["d"], max_chunk_elements=elements)
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
    model = LSTMLanguageModel(
        p["V"],
        p["d"],
        p["H"],
        p["layers"],
        output="mos" if mos else "softmax",
        softmax_input_size=p["d"],
        num_experts=p["experts"] if mos else None,
        tie_weights=True,
        max_chunk_elements=_elements(p, p["B"] * p["T"] * max(1, p["experts"])),
    ).to(device)
    tokens = torch.randint(0, p["V"], (p["B"], p["T"] + 1), generator=g).to(device)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "lengths": torch.full((p["B"],), p["T"], device=device),
        "stream": True,
    }

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
            ("mos15-chunk2048", dict(experts=15, chunk=2048), dict(experts=15, chunk=256)),
        ):
            cases.append(
                Case(f"output/{label}/{vocab_name}", _output_layer_step, {**full, **extra}, {**quick, **quick_extra})
            )
    return cases


def _lstm_lm_cases() -> list[Case]:
    base = dict(B=12, T=70, H=620, d=280, layers=2, V=10_000)
    quick = dict(B=4, T=16, H=64, d=32, layers=2, V=1000)
    return [
        Case(f"lstm-lm/{label}/V10k", _lstm_lm_step, {**base, **extra}, {**quick, **extra})
        for label, extra in (("softmax", dict(experts=0)), ("mos15", dict(experts=15)))
    ]


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
        cases.append(Case(f"hmm-lm/dense/K{states}", _hmm_lm_step, {**base, "K": states}, {**quick, "K": states // 16}))
    for states, rank in ((1024, 128), (2048, 256), (4096, 256)):
        cases.append(
            Case(
                f"hmm-lm/rank{rank}/K{states}",
                _hmm_lm_step,
                {**base, "K": states, "rank": rank},
                {**quick, "K": states // 16, "rank": rank // 16},
            )
        )
    return cases


#: every benchmark, in the order they run and are tabled; sections append theirs here
CASES: list[Case] = _output_cases() + _lstm_lm_cases() + _hmm_lm_cases()


# ==============================================================================================
# worker side: one case per process
# ==============================================================================================
def worker(spec: dict) -> dict:
    start_worker(spec["mem_cap_gb"], spec["threads"], spec["device"])
    sys.path.insert(0, str(REPO))
    import torch

    device = torch.device(spec["device"])
    case = {c.name: c for c in CASES}[spec["name"]]
    params = case.quick if spec["quick"] else case.params
    out: dict[str, Any] = {"name": case.name, "section": case.section, "params": params}
    # the measured step follows a warm-up step of the same size: the heap's free pages are
    # handed back first, so that they do not hide the measured step's peak
    out.update(
        time_step(
            lambda: case.build(params, device),
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
def measure(case: Case, args) -> dict:
    spec = dict(
        name=case.name,
        quick=args.quick,
        device=args.device,
        threads=args.threads,
        mem_cap_gb=args.mem_cap_gb,
        budget_s=args.budget,
        max_repeats=args.max_repeats,
    )
    params = case.quick if args.quick else case.params
    # a fixed mmap threshold: large tensors are mapped and unmapped, not kept in the heap
    return run_case(
        __file__,
        spec,
        identity=dict(name=case.name, section=case.section, params=params),
        threads=args.threads,
        timeout=args.timeout,
        fixed_mmap_threshold=True,
    )


def _sizes(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def table(results: list[dict]) -> str:
    """A Markdown table: one row per case."""
    rows = ["| case | sizes | tokens/s | step time | peak memory (MB) |", "| --- | --- | ---: | ---: | ---: |"]
    for r in results:
        if r.get("status") == "ok":
            t = r["time_s"]
            cells = [
                f"{r['tokens_per_s']:,.0f}",
                f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s",
                f"{r['peak_mb']:,.0f}",
            ]
        else:
            cells = [r.get("status", "?"), "-", "-"]
        rows.append(f"| {r['name']} | {_sizes(r['params'])} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser, budget=10.0, timeout=900.0, out_default="benchmarks/results/lm-<device>.json")
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
        rate = (
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['peak_mb']:,.0f} MB"
            if r["status"] == "ok"
            else f"{r['status']}: {r.get('error', '')}"
        )
        print(f"{case.name}: {rate}", file=sys.stderr, flush=True)
    print(table(results))
    out = args.out
    if out is None and not args.quick:
        out = RESULTS / f"lm-{args.device.split(':')[0]}.json"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(
            run_metadata(args.device, args.threads, args.quick), processor=platform.processor() or platform.machine()
        )
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
