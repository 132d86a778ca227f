r"""Benchmark: sentence VAEs against the LSTM language model, and the cost of IWAE evaluation.

Two sections, each case in a fresh process (``--worker``):

* ``train/<size>`` -- one full training step, as :class:`~latentnlp.training.Trainer` makes it:
  ``zero_grad``, ``model.loss(batch).value.backward()`` (the ELBO for the VAEs, the exact NLL for
  the LM), ``clip_grad_norm_`` to 5 and an Adam update, for four models built at the same sizes
  in one process: the ``LSTMLanguageModel`` (embedding ``E``, LSTM ``H_d``), the
  :class:`~latentnlp.models.SentenceVAE` with an LSTM decoder and with the dilated-CNN decoder at
  two receptive fields (kernel 3, dilations 1, 2, 4: ``R = 15``, the Yahoo recipe's ``cpu`` preset;
  dilations 1, 2, 4, 8: ``R = 31``, its ``full`` preset), all with encoder LSTM ``H``, latent
  ``D``, decoder ``H_d`` (LSTM hidden size or CNN channels).  After one warm-up step of each and
  one step of each under :func:`~measurement.peak_memory`, the timed steps alternate
  ``lm, lstm-vae, cnn-vae-R15, cnn-vae-R31, matmul`` so that a change of the shared machine's load
  reaches every model; reported: the median of each model's timed steps, tokens/s, peak memory,
  both as ratios to the LM, and the step time over the machine's own matmul time for the step's
  flops.

  The flops (multiply-adds x 2) of the forward pass, with ``N = B T`` positions (every sentence
  ``T`` tokens long, so no padding)::

      LM:        N (8 H_d (E + H_d) + 2 H_d V)
      encoder:   N 8 H (E + H)                                  (VAEs; q's linear layer is negligible)
      LSTM dec.: N (8 H_d (E + D + H_d) + 2 H_d V)
      CNN dec.:  N (2 (E + D) H_d + 2 k H_d^2 L + 2 H_d V)       (L layers of kernel k)

  and the backward pass twice that (the gradients of each product's two operands), so a step is
  ``3 F``; the optimiser and the element-wise work (the log-softmax over ``V``, the gates) are
  not counted, which is why the ratio is above 1.  The matmul rate is that of ``torch.mm`` at the
  output layer's shape ``[N, H_d] x [H_d, V]``, timed in the same rounds as the models.

* ``iwae/cpu`` -- evaluation of :meth:`SentenceVAE.iwae` (``torch.no_grad``, eval mode,
  :func:`latentnlp.objectives.iwae` chunked by 10 samples, the ``cpu`` preset's ``iw_chunk``) by
  the number of samples ``S`` in 1, 10, 100, 500, on a batch of ``B`` = 4 sentences at the ``cpu``
  sizes, the LSTM decoder and the CNN decoder (``R = 15``) in one process: at each ``S``, one
  warm-up call of each with one chunk's samples, one call of each under
  :func:`~measurement.peak_memory`, then alternating calls while the budget lasts.  Reported:
  tokens/s (the batch's tokens, counted once whatever ``S``), time a sample, and peak memory,
  which the chunking keeps that of one chunk.

Time: medians of the timed calls (as many as fit ``--budget`` seconds per model, at least
``--repeats``, at most ``--max-repeats``).  Memory, :func:`measurement.peak_memory`: the working
memory of one call (CPU: peak resident set minus the resident set before it; CUDA: peak allocated
minus allocated before it).  Sizes: ``cpu`` is the Yahoo recipe's ``cpu`` preset (``E`` = 64,
``H`` = 128, ``H_d`` = 64, ``D`` = 16), ``large`` four times its decoder (``E`` = 256, ``H`` =
512, ``H_d`` = 256, ``D`` = 32); ``V`` = 20,000 (the Yahoo vocabulary), ``B`` = 32 sentences of
``T`` = 80 tokens (the mean length of ``yahoo.valid.txt`` with ``<eos>``), random token ids.
``--quick`` shrinks everything to seconds.  The machine's one-minute load average is recorded
before and after each case.

Usage::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/vae.py     # writes benchmarks/results/vae-<device>.json
    python benchmarks/vae.py --quick                      # small sizes, writes nothing unless --out is given
    python benchmarks/vae.py --device cuda --cases train/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # the shared measurement module, wherever the script is run from

from measurement import failure, peak_memory, run_case, run_metadata, start_worker, utc_now  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SEED = 0
GRAD_CLIP = 5.0
LR = 1e-3
#: the CNN decoders: label -> dilations (kernel 3)
CNN_DILATIONS = {"cnn-vae-R15": (1, 2, 4), "cnn-vae-R31": (1, 2, 4, 8)}
KERNEL = 3
MODELS = ("lm", "lstm-vae", *CNN_DILATIONS)
#: the batch and the vocabulary of every case, full and --quick
BATCH = {"full": dict(B=32, T=80, V=20_000), "quick": dict(B=4, T=12, V=500)}
#: the network sizes of the training section
SIZES = {
    "cpu": dict(E=64, H=128, Hd=64, D=16),
    "large": dict(E=256, H=512, Hd=256, D=32),
}
QUICK_SIZES = {"cpu": dict(E=16, H=32, Hd=16, D=4), "large": dict(E=32, H=64, Hd=32, D=8)}
#: the IWAE section: samples, chunk, sentences
IWAE = {"full": dict(S=(1, 10, 100, 500), chunk=10, B=4), "quick": dict(S=(1, 10, 50), chunk=10, B=2)}
IWAE_DECODERS = ("lstm-vae", "cnn-vae-R15")


# ==============================================================================================
# models and flop counts
# ==============================================================================================
def build_model(name: str, p: dict, V: int):
    from latentnlp.models import LSTMLanguageModel, SentenceVAE

    if name == "lm":
        return LSTMLanguageModel(V, p["E"], p["Hd"])
    options: dict[str, Any] = {"decoder": "lstm"}
    if name in CNN_DILATIONS:
        options = {"decoder": "cnn", "kernel_size": KERNEL, "dilations": CNN_DILATIONS[name]}
    return SentenceVAE(V, p["E"], p["H"], p["D"], decoder_size=p["Hd"], **options)


def forward_flops(name: str, p: dict, B: int, T: int, V: int) -> int:
    """The forward pass's matmul flops (module docstring); a training step is three times this."""
    N, E, H, Hd, D = B * T, p["E"], p["H"], p["Hd"], p["D"]
    output = 2 * Hd * V
    if name == "lm":
        return N * (8 * Hd * (E + Hd) + output)
    encoder = 8 * H * (E + H)
    if name == "lstm-vae":
        return N * (encoder + 8 * Hd * (E + D + Hd) + output)
    layers = len(CNN_DILATIONS[name])
    return N * (encoder + 2 * (E + D) * Hd + 2 * KERNEL * Hd * Hd * layers + output)


def make_batch(B: int, T: int, V: int, device) -> dict:
    import torch

    g = torch.Generator().manual_seed(SEED)
    tokens = torch.randint(0, V, (B, T), generator=g).to(device)
    return {"inputs": tokens, "targets": tokens, "lengths": torch.full((B,), T, device=device)}


def training_step(model, batch: dict, objective: str) -> Callable[[], None]:
    """The trainer's update: zero_grad, loss, backward, gradient clipping, Adam."""
    import torch

    optimizer = torch.optim.Adam(model.parameters(), lr=LR)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch, objective).value.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()

    return step


# ==============================================================================================
# worker side
# ==============================================================================================
def _timer(device):
    import torch

    def timed(call) -> float:
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    return timed


def train_worker(spec: dict, device) -> dict:
    """Every model of one size, alternating (module docstring)."""
    import torch

    p, (B, T, V) = spec["params"], (spec["batch"][k] for k in ("B", "T", "V"))
    timed = _timer(device)
    torch.manual_seed(SEED)
    batch = make_batch(B, T, V, device)
    steps: dict[str, Callable[[], object]] = {}
    for name in MODELS:
        model = build_model(name, p, V).to(device).train()
        steps[name] = training_step(model, batch, "marginal" if name == "lm" else "elbo")
    a = torch.randn(B * T, p["Hd"], device=device)
    b = torch.randn(p["Hd"], V, device=device)
    product = torch.empty(B * T, V, device=device)
    steps["matmul"] = lambda: torch.mm(a, b, out=product)
    out: dict[str, Any] = {name: {} for name in steps}
    for name, step in steps.items():
        out[name]["warmup_s"] = timed(step)
    for name, step in steps.items():
        first, out[name]["peak_mb"], out[name]["peak_method"] = peak_memory(
            lambda: timed(step), device, trim_heap_first=True
        )
        out[name]["times_s"] = [first]
    deadline = time.perf_counter() + spec["budget_s"] * len(steps)
    rounds = 1
    while rounds < spec["max_repeats"] and (rounds < spec["repeats"] or time.perf_counter() < deadline):
        for name, step in steps.items():
            out[name]["times_s"].append(timed(step))
        rounds += 1
    tokens = B * T
    mm_time = statistics.median(out["matmul"]["times_s"])
    rate = 2 * B * T * p["Hd"] * V / mm_time
    out["matmul"].update(time_s=mm_time, flops_per_s=rate)
    for name in MODELS:
        r = out[name]
        r["time_s"] = statistics.median(r["times_s"])
        r["min_s"] = min(r["times_s"])
        r["tokens_per_s"] = tokens / r["time_s"]
        r["step_flops"] = 3 * forward_flops(name, p, B, T, V)
        r["time_over_matmul"] = r["time_s"] / (r["step_flops"] / rate)
    for name in MODELS:
        out[name]["time_ratio_to_lm"] = out[name]["time_s"] / out["lm"]["time_s"]
        out[name]["memory_ratio_to_lm"] = out[name]["peak_mb"] / max(out["lm"]["peak_mb"], 1e-9)
    out.update(status="ok", tokens=tokens, rounds=rounds)
    return out


def iwae_worker(spec: dict, device) -> dict:
    """:meth:`SentenceVAE.iwae` of both decoders by ``S`` on one batch, alternating (module docstring)."""
    import torch

    p, (T, V) = spec["params"], (spec["batch"][k] for k in ("T", "V"))
    settings = spec["iwae"]
    B, chunk = settings["B"], settings["chunk"]
    timed = _timer(device)
    torch.manual_seed(SEED)
    batch = make_batch(B, T, V, device)
    models = {name: build_model(name, p, V).to(device).eval() for name in IWAE_DECODERS}
    g = torch.Generator(device=device).manual_seed(SEED)

    def call(name: str, samples: int):
        return lambda: models[name].iwae(batch, samples, chunk_size=chunk, generator=g)

    rows: list[dict] = []
    with torch.no_grad():
        for S in settings["S"]:
            here = {name: {"decoder": name, "S": S} for name in IWAE_DECODERS}
            try:
                for name, r in here.items():
                    r["warmup_s"] = timed(call(name, min(S, chunk)))
                for name, r in here.items():
                    first, r["peak_mb"], r["peak_method"] = peak_memory(
                        lambda: timed(call(name, S)), device, trim_heap_first=True
                    )
                    r["times_s"] = [first]
                deadline = time.perf_counter() + spec["budget_s"] * len(here)
                rounds = 1
                while rounds < min(spec["repeats"], spec["max_repeats"]) and time.perf_counter() < deadline:
                    for name, r in here.items():
                        r["times_s"].append(timed(call(name, S)))
                    rounds += 1
                for r in here.values():
                    median = statistics.median(r["times_s"])
                    r.update(status="ok", time_s=median, time_per_sample_s=median / S, tokens_per_s=B * T / median)
            except (MemoryError, RuntimeError) as e:
                for r in here.values():
                    r.update(failure(e))
            rows += here.values()
    return {"status": "ok", "by_samples": rows, "tokens": B * T, "chunk": chunk, "sentences": B}


def worker(spec: dict) -> dict:
    start_worker(spec["mem_cap_gb"], spec["threads"], spec["device"])
    sys.path.insert(0, str(REPO))
    import torch

    device = torch.device(spec["device"])
    out: dict[str, Any] = {"name": spec["name"], "params": spec["params"], "batch": spec["batch"]}
    load = os.getloadavg()[0]
    try:
        out.update(train_worker(spec, device) if spec["name"].startswith("train/") else iwae_worker(spec, device))
    except (MemoryError, RuntimeError) as e:
        out.update(failure(e))
    out["load_average_1min"] = [load, os.getloadavg()[0]]
    return out


# ==============================================================================================
# driver side
# ==============================================================================================
def cases(quick: bool) -> list[dict]:
    """The specs of every case (without the run settings)."""
    kind = "quick" if quick else "full"
    sizes = QUICK_SIZES if quick else SIZES
    out = [dict(name=f"train/{size}", params=p, batch=BATCH[kind]) for size, p in sizes.items()]
    out.append(dict(name="iwae/cpu", params=sizes["cpu"], batch=BATCH[kind], iwae=IWAE[kind]))
    return out


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _sizes(p: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in p.items())


def train_table(results: list[dict]) -> str:
    head = [
        "size",
        "model",
        "tokens/s",
        "step (median)",
        "time / LM",
        "peak memory",
        "memory / LM",
        "GFLOP a step",
        "time / matmul time of its flops",
    ]
    rows = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for r in results:
        if not r["name"].startswith("train/"):
            continue
        label = f"{r['name'].split('/')[1]} ({_sizes(r['params'])})"
        if r.get("status") != "ok":
            rows.append(f"| {label} | {r.get('status')}: {r.get('error', '')[:80]} |" + " |" * (len(head) - 2))
            continue
        for name in MODELS:
            m = r[name]
            rows.append(
                f"| {label} | {name} | {m['tokens_per_s']:,.0f} | {_time(m['time_s'])} | "
                f"{m['time_ratio_to_lm']:.2f}x | {m['peak_mb']:,.0f} MB | {m['memory_ratio_to_lm']:.2f}x | "
                f"{m['step_flops'] / 1e9:.1f} | {m['time_over_matmul']:.2f}x |"
            )
        rows.append(
            f"| {label} | (matmul [N, H_d] x [H_d, V]) | | {_time(r['matmul']['time_s'])} | | | | | "
            f"{r['matmul']['flops_per_s'] / 1e9:.1f} GFLOP/s |"
        )
    return "\n".join(rows)


def iwae_table(results: list[dict]) -> str:
    rows = [
        "| decoder | S | tokens/s | time a batch | time a sample | peak memory |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r["name"].startswith("iwae/"):
            continue
        if r.get("status") != "ok":
            rows.append(f"| {r.get('status')}: {r.get('error', '')[:80]} | | | | | |")
            continue
        for s in sorted(r["by_samples"], key=lambda s: (IWAE_DECODERS.index(s["decoder"]), s["S"])):
            if s.get("status") != "ok":
                rows.append(f"| {s['decoder']} | {s['S']} | {s.get('status')} | | | |")
                continue
            rows.append(
                f"| {s['decoder']} | {s['S']} | {s['tokens_per_s']:,.1f} | {_time(s['time_s'])} | "
                f"{_time(s['time_per_sample_s'])} | {s['peak_mb']:,.0f} MB |"
            )
    return "\n".join(rows)


def markdown(results: list[dict], meta: dict) -> str:
    loads = ", ".join(
        f"{a:.1f}-{b:.1f}" for a, b in (r["load_average_1min"] for r in results if "load_average_1min" in r)
    )
    train = [r for r in results if r["name"].startswith("train/") and r.get("status") == "ok"]
    iwae = next((r for r in results if r["name"].startswith("iwae/") and r.get("status") == "ok"), None)
    batch = results[0]["batch"]
    notes = []
    if train:
        notes.append(
            f"Training: one step (forward, backward, clipping, Adam) on B={batch['B']} sentences of T={batch['T']} "
            f"tokens, V={batch['V']:,}; median of {min(r['rounds'] for r in train)}+ alternating "
            f"rounds after one warm-up step of each; flops of a step = 3x the forward matmuls."
        )
    if iwae:
        notes.append(
            f"IWAE: SentenceVAE.iwae under no_grad on {iwae['sentences']} sentences ({iwae['tokens']} tokens), "
            f"chunks of {iwae['chunk']} samples, sizes {_sizes(iwae['params'])}."
        )
    notes.append(
        f"{meta['threads']} thread(s), {meta['device']}, torch {meta['torch']}, float32. "
        f"One-minute load average before-after each case: {loads} (a shared machine)."
    )
    return "\n".join([train_table(results), "", iwae_table(results), "", *notes])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a sanity run (writes nothing)")
    parser.add_argument("--cases", default="", help="comma-separated substrings of case names to run")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per model at least (default 3)")
    parser.add_argument("--max-repeats", type=int, default=20)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed calls per model (default 4)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per case")
    parser.add_argument("--mem-cap-gb", type=float, default=16.0, help="CPU address-space cap, 0 = none")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON output (default benchmarks/results/vae-<device>.json)"
    )
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    wanted = [s for s in args.cases.split(",") if s]
    specs = [c for c in cases(args.quick) if not wanted or any(s in c["name"] for s in wanted)]
    if args.list:
        print("\n".join(c["name"] for c in specs))
        return 0
    if not specs:
        parser.error(f"no case matches --cases {args.cases!r}; --list shows them")
    if args.quick:
        args.repeats, args.budget = 2, 0.0
    results = []
    for spec in specs:
        spec = dict(
            spec,
            quick=args.quick,
            device=args.device,
            threads=args.threads,
            mem_cap_gb=args.mem_cap_gb,
            budget_s=args.budget,
            repeats=args.repeats,
            max_repeats=args.max_repeats,
        )
        identity = {k: spec[k] for k in ("name", "params", "batch")}
        t0 = time.perf_counter()
        r = run_case(
            __file__, spec, identity=identity, threads=args.threads, timeout=args.timeout, fixed_mmap_threshold=True
        )
        results.append(r)
        print(
            f"{spec['name']}: {r['status']} in {time.perf_counter() - t0:.0f} s {r.get('error', '')}",
            file=sys.stderr,
            flush=True,
        )
    meta = dict(
        run_metadata(args.device, args.threads, args.quick), processor=platform.processor() or platform.machine()
    )
    text = markdown(results, meta)
    print(text)
    out = args.out
    if out is None and not args.quick:
        out = RESULTS / f"vae-{args.device.split(':')[0]}.json"
    if out is not None:
        doc = {
            "benchmark": "sentence VAEs vs the LSTM LM: training steps; IWAE evaluation by samples",
            "date": utc_now(),
            "machine": meta,
            "settings": {
                "repeats": args.repeats,
                "max_repeats": args.max_repeats,
                "budget_s": args.budget,
                "dtype": "float32",
                "seed": SEED,
                "optimizer": f"Adam lr {LR}, gradient norm clipped to {GRAD_CLIP}",
                "statistic": "median of alternating rounds after one warm-up step of each (training); "
                "median of repeats after one warm-up call of one chunk (IWAE)",
            },
            "results": results,
            "markdown": text,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)
    return 0 if all(r.get("status") == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
