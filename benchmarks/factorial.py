r"""Benchmark: factorial HMMs -- exact contraction, structured mean field, and Pyro on JSB chorales.

Three parts, each case in a fresh worker process (:func:`measurement.run_case`: thread counts
fixed, ``RLIMIT_AS`` capped by ``--mem-cap-gb``, a failure recorded as a result), the
implementations of a case alternating inside it (rotating order every repeat, so that load from
other processes falls on all of them alike); times are medians of the repeats and the ratios are
ratios of medians.  Memory is :func:`measurement.peak_memory` of one call (peak RSS above the RSS
before it on the CPU, ``max_memory_allocated`` above the allocation before it on CUDA).  Workers
mmap every block over 256 KB and return it to the system when freed, which the peak RSS needs;
every large tensor then faults its pages in afresh, which a training loop (glibc's default
allocator reusing freed blocks) does not pay, so ``--allocator default`` times with that instead
(the peaks are then lower bounds).

1. **Exact contraction against the flattened product state** (``contraction`` in the JSON): one
   forward + backward of ``log_partition.sum()`` w.r.t. ``emit`` and the chains' ``trans``, for
   ``L`` chains of ``K`` states, ``(L, K)`` in ``(2, 16), (3, 12), (4, 8)`` at ``B = 1, 8`` and ``T = 128``:
   ``FactorialChainPosterior(init [L, K], trans [L, K, K], emit [B, T, K, ..., K])``
   (``O(T L K^(L+1))``) against ``ChainPosterior`` over the ``K^L`` joint states with the dense
   Kronecker transition ``ProductTransition(trans).dense()`` ``[K^L, K^L]`` built inside the timed
   call (``O(T K^(2L))``), both ``method="auto"``, float32.  The values must agree.  With
   ``--baseline COMMIT`` the library at that commit (``git archive`` of its ``latentnlp/``, imported
   as a second package) is a third call alternating with the two, ``exact-before``: the code
   before a change measured against it in the same process.
2. **Structured mean field against exact as L grows** (``mean_field``), ``K = 8``, ``L = 1..8``,
   ``B = 8, T = 128``, Bernoulli emissions with additive logits over ``V = 51`` tones
   (``eta(z) = bias + sum_l W_l[z^l]``, the piano-roll model).  Exact: the joint emission
   ``emit[b, t, z] = y_bt . eta(z) - sum_v softplus(eta_v(z))`` (one ``[B T, V] x [V, K^L]``
   matmul) and ``FactorialChainPosterior.log_partition``, forward + backward w.r.t. ``W``, ``bias``
   and ``trans``.  Mean field: ``structured_mean_field(..., BernoulliEmission(y, W, bias),
   iterations=n)`` and the backward of its ``elbo``; the time per sweep is
   ``(t(n = 6) - t(n = 1)) / 5``, the two alternating.  Exact runs while it fits in the memory cap;
   the ``L`` at which it stops fitting in 8 GB is computed from the memory formula
   ``c B T K^L`` with ``c`` (bytes per joint state and step) fitted on the measured peaks.
3. **latentnlp against Pyro on JSB chorales** (``jsb``): ``$LATENTNLP_DATA/jsb_chorales/jsb_chorales.json``
   as 88-key binary vectors (pitch - 21), the keys never played in training dropped (51 kept), as
   Pyro's ``examples/hmm.py`` does.  Pyro's model 1 (an HMM, ``hidden_dim = 16``) and model 3 (a
   factorial HMM of 2 chains of 4 states, ``probs_y [4, 4, 51]``) as that example writes them:
   chains starting in state 0, ``pyro.markov`` over time, ``poutine.mask(t < lengths)``,
   Dirichlet(0.9 I + 0.1) and Beta(0.1, 0.9) priors on the tables, an ``AutoDelta`` guide over them
   (MAP), ``TraceEnum_ELBO(max_plate_nesting=2)`` and ``Adam(lr=0.05)``, batch 8.  The latentnlp
   side is the same model and objective: the same unconstrained parameters (``transform_to`` of
   each site's support, as Pyro's ``PyroParam``), started from the values Pyro's ``AutoDelta``
   initialised (``init_to_median``), the joint Bernoulli emission built by one matmul,
   ``ChainPosterior`` / ``FactorialChainPosterior`` for the exact marginal, the log prior from
   ``torch.distributions``, ``torch.optim.Adam(lr=0.05)``.  Both take the same minibatches (a seeded
   permutation per epoch, given to Pyro's ``pyro.plate`` as ``subsample``, so its likelihood is
   scaled by ``N / batch`` as in the example) for ``--epochs`` epochs, one update of each in turn.
   Reported: time per update and per epoch, their ratio, the training losses of every update
   (per time step, as the example logs them), and the final test loss per time step without the
   prior (Pyro's ``elbo.loss(..., include_prior=False)``; latentnlp ``-sum log p(y) / steps``).

Usage::

    python benchmarks/factorial.py                 # all parts, writes benchmarks/results/factorial.json
    python benchmarks/factorial.py --quick         # small sizes, one epoch on a slice: a sanity run
    python benchmarks/factorial.py --parts jsb --epochs 3
    python benchmarks/factorial.py --parts contraction --baseline HEAD~1 --out benchmarks/results/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
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
    run_case,
    run_metadata,
    start_worker,
    utc_now,
)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "factorial.json"
SEED = 0
PARTS = ("contraction", "mean_field", "jsb")

CONTRACTION_SIZES = [(2, 16), (3, 12), (4, 8)]  # (L, K)
CONTRACTION_SHAPES, QUICK_CONTRACTION_SHAPES = [(1, 128), (8, 128)], [(2, 16)]  # (B, T)
MEAN_FIELD_SHAPE, QUICK_MEAN_FIELD_SHAPE = (8, 128), (2, 16)  # (B, T)
MEAN_FIELD_K, MEAN_FIELD_TONES = 8, 51
MEAN_FIELD_CHAINS, QUICK_MEAN_FIELD_CHAINS = list(range(1, 9)), [1, 2, 3]
MEAN_FIELD_EXACT_MAX_CHAINS = 6  # exact is attempted up to here (the memory cap decides the rest)
MEAN_FIELD_SWEEPS = (1, 6)
FIT_BUDGET_GB = 8.0  # "fits in 8 GB"
JSB_MODELS = {
    "1": dict(name="HMM (model 1)", chains=1, states=16),
    "3": dict(name="FHMM (model 3)", chains=2, states=4),
}
JSB_BATCH, JSB_LR = 8, 0.05


# ==============================================================================================
# worker side
# ==============================================================================================
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alternate(calls: dict, device, repeats: int) -> dict:
    """Time every call of ``calls`` ``repeats`` times, rotating the order each round: ``{name: [s]}``."""
    names, times = list(calls), {name: [] for name in calls}
    for i in range(repeats):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def _repeats(first_s: float, spec: dict) -> int:
    """Repeats that fill ``budget_s`` after a first round of ``first_s``, within ``min_repeats..max_repeats``."""
    return max(spec["min_repeats"], min(spec["max_repeats"], int(spec["budget_s"] / max(first_s, 1e-6))))


def _summary(times: list) -> dict:
    return dict(time_s=statistics.median(times), min_s=min(times), times_s=times)


def _kron_sum(rows):
    """``x[z] = sum_l rows[l, z^l]`` over the joint states (row-major) of ``rows [L, K, *rest]``: ``[K^L, *rest]``."""
    num_chains, k, rest = rows.shape[0], rows.shape[1], rows.shape[2:]
    axes = lambda ell: (*(1,) * ell, k, *(1,) * (num_chains - 1 - ell), *rest)
    return sum(rows[ell].reshape(axes(ell)) for ell in range(num_chains)).reshape(-1, *rest)


def _measure_memory(calls: dict, device, rows: dict) -> dict:
    """Warm up every call, then measure one call's working memory into ``rows[name]``; a call that
    fails (e.g. out of memory) is recorded and left out.  Returns ``{name: value}`` of the rest."""
    values = {}
    for name, call in list(calls.items()):
        try:
            call()
            _sync(device)
            values[name], peak, method = peak_memory(call, device, trim_heap_first=True)
            rows[name] = dict(status="ok", peak_mb=peak, peak_method=method)
        except (MemoryError, RuntimeError) as e:
            rows[name] = failure(e)
            del calls[name]
    return values


def contraction_worker(spec: dict) -> dict:
    """Part 1 at one ``(L, K)``: exact factorial against the flattened product-state chain (and, with a
    baseline, against the exact factorial of the baseline library)."""
    import torch

    from latentnlp import ChainPosterior, FactorialChainPosterior
    from latentnlp.factorial import ProductTransition

    device = torch.device(spec["device"])
    num_chains, k, batch, steps = spec["L"], spec["K"], spec["B"], spec["T"]
    g = torch.Generator().manual_seed(SEED)
    init = torch.randn(num_chains, k, generator=g).log_softmax(-1).to(device)
    trans = torch.randn(num_chains, k, k, generator=g).log_softmax(-1).to(device).requires_grad_()
    emit = torch.randn(batch, steps, *(k,) * num_chains, generator=g).to(device).requires_grad_()

    def exact():
        trans.grad = emit.grad = None
        value = FactorialChainPosterior(init, trans, emit).log_partition
        value.sum().backward()
        return value.detach()

    def flattened():
        trans.grad = emit.grad = None
        joint_init = _kron_sum(init)
        dense = ProductTransition(list(trans)).dense()  # [K^L, K^L], differentiable in trans
        value = ChainPosterior(joint_init, dense, emit.reshape(batch, steps, -1)).log_partition
        value.sum().backward()
        return value.detach()

    calls = {"exact": exact, "flattened": flattened}
    if spec.get("baseline"):
        baseline = import_baseline(spec["baseline"])

        def exact_before():
            trans.grad = emit.grad = None
            value = baseline.FactorialChainPosterior(init, trans, emit).log_partition
            value.sum().backward()
            return value.detach()

        calls["exact-before"] = exact_before
    out = dict(part="contraction", L=num_chains, K=k, B=batch, T=steps, states=k**num_chains, rows={})
    values = _measure_memory(calls, device, out["rows"])
    if "exact" in values and "flattened" in values:
        scale = values["exact"].abs().max().item()
        out["max_abs_difference"] = (values["exact"] - values["flattened"]).abs().max().item()
        out["values_agree"] = out["max_abs_difference"] <= 1e-4 * max(1.0, scale)
    if "exact" in values and "exact-before" in values:
        out["max_abs_difference_before"] = (values["exact"] - values["exact-before"]).abs().max().item()
    first = _alternate(calls, device, 1)
    times = _alternate(calls, device, _repeats(max(t[0] for t in first.values()), spec))
    for name in calls:
        out["rows"][name].update(_summary(times[name]))
    if "exact" in calls and "flattened" in calls:
        out["speedup"] = out["rows"]["flattened"]["time_s"] / out["rows"]["exact"]["time_s"]
    if "exact-before" in calls:
        out["speedup_over_before"] = out["rows"]["exact-before"]["time_s"] / out["rows"]["exact"]["time_s"]
        if "flattened" in calls:
            out["speedup_before"] = out["rows"]["flattened"]["time_s"] / out["rows"]["exact-before"]["time_s"]
    out["status"] = "ok"
    return out


def mean_field_worker(spec: dict) -> dict:
    """Part 2 at one ``L`` (``K = 8``): mean-field sweeps and, where attempted, the exact pass."""
    import torch

    from latentnlp import FactorialChainPosterior
    from latentnlp.factorial import BernoulliEmission, structured_mean_field

    device = torch.device(spec["device"])
    num_chains, k, batch, steps, tones = spec["L"], MEAN_FIELD_K, spec["B"], spec["T"], MEAN_FIELD_TONES
    g = torch.Generator().manual_seed(SEED)
    init = torch.randn(num_chains, k, generator=g).log_softmax(-1).to(device)
    trans = (torch.randn(num_chains, k, k, generator=g) + 3 * torch.eye(k)).log_softmax(-1).to(device)
    weights = (torch.randn(num_chains, k, tones, generator=g) * 2 / math.sqrt(num_chains)).to(device)
    bias = torch.full((tones,), -3.0).to(device)
    y = (torch.rand(batch, steps, tones, generator=g) < 0.08).float().to(device)
    params = [trans.requires_grad_(), weights.requires_grad_(), bias.requires_grad_()]

    def clear():
        for p in params:
            p.grad = None

    def exact():
        clear()
        joint = bias + _kron_sum(weights)  # eta(z) [K^L, V]
        emit = (y.reshape(-1, tones) @ joint.T - torch.nn.functional.softplus(joint).sum(-1)).reshape(
            batch, steps, *(k,) * num_chains
        )
        value = FactorialChainPosterior(init, trans, emit).log_partition
        value.sum().backward()
        return value.detach()

    def mean_field(sweeps):
        def call():
            clear()
            result = structured_mean_field(init, trans, BernoulliEmission(y, weights, bias), iterations=sweeps)
            result.elbo.sum().backward()
            return result.elbo.detach()

        return call

    calls = {f"mean-field-{n}": mean_field(n) for n in MEAN_FIELD_SWEEPS}
    if spec["exact"]:
        calls["exact"] = exact
    out = dict(part="mean_field", L=num_chains, K=k, B=batch, T=steps, V=tones, states=k**num_chains, rows={})
    values = _measure_memory(calls, device, out["rows"])
    first = _alternate(calls, device, 1)
    times = _alternate(calls, device, _repeats(max(t[0] for t in first.values()), spec))
    for name in calls:
        out["rows"][name].update(_summary(times[name]))
    few, many = (out["rows"][f"mean-field-{n}"]["time_s"] for n in MEAN_FIELD_SWEEPS)
    out["sweep_s"] = max(0.0, many - few) / (MEAN_FIELD_SWEEPS[1] - MEAN_FIELD_SWEEPS[0])
    out["elbo_per_step"] = values[f"mean-field-{MEAN_FIELD_SWEEPS[1]}"].sum().item() / (batch * steps)
    if "exact" in values:
        out["log_z_per_step"] = values["exact"].sum().item() / (batch * steps)
        out["bound_holds"] = bool((values[f"mean-field-{MEAN_FIELD_SWEEPS[1]}"] <= values["exact"] + 1e-3).all())
        out["exact_over_sweep"] = out["rows"]["exact"]["time_s"] / out["sweep_s"] if out["sweep_s"] else None
    out["status"] = "ok"
    return out


def load_jsb(path: Path, device, limit: int | None = None) -> dict:
    """``{split: (sequences [N, T, 51] float32, lengths [N])}`` as Pyro's example prepares them."""
    import torch

    raw = json.loads(path.read_text())
    rolls = {}
    for split, chorales in raw.items():
        chorales = chorales[:limit] if limit else chorales
        lengths = torch.tensor([len(c) for c in chorales])
        x = torch.zeros(len(chorales), int(lengths.max()), 88)
        for i, chorale in enumerate(chorales):
            for t, notes in enumerate(chorale):
                x[i, t, [n - 21 for n in notes]] = 1.0
        rolls[split] = (x, lengths)
    present = (rolls["train"][0] == 1).sum((0, 1)) > 0  # keys played at least once in training
    return {split: (x[..., present].to(device), n.to(device)) for split, (x, n) in rolls.items()}


def pyro_model(chains: int, states: int):
    """Pyro's model 1 (``chains=1``) or model 3 (``chains=2``) of ``examples/hmm.py``, with the
    minibatch given as the plate's ``subsample``."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro import poutine

    names = ["probs_x"] if chains == 1 else ["probs_w", "probs_x"]

    def model(sequences, lengths, batch=None, include_prior=True):
        num_sequences, _, data_dim = sequences.shape
        with poutine.mask(mask=include_prior):
            tables = [pyro.sample(name, dist.Dirichlet(0.9 * torch.eye(states) + 0.1).to_event(1)) for name in names]
            probs_y = pyro.sample(
                "probs_y", dist.Beta(0.1, 0.9).expand([*(states,) * chains, data_dim]).to_event(chains + 1)
            )
        tones_plate = pyro.plate("tones", data_dim, dim=-1)
        with pyro.plate("sequences", num_sequences, subsample=batch, dim=-2) as batch:
            lengths = lengths[batch]
            z = [0] * chains
            for t in pyro.markov(range(int(lengths.max()))):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    z = [
                        pyro.sample(f"{name[-1]}_{t}", dist.Categorical(table[s]), infer={"enumerate": "parallel"})
                        for name, table, s in zip(names, tables, z)
                    ]
                    with tones_plate as tones:
                        pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[(*z, tones)]), obs=sequences[batch, t])

    return model


class LatentnlpModel:
    """The same model for latentnlp: unconstrained parameters, the exact marginal, the log prior."""

    def __init__(self, chains: int, states: int, constrained: dict):
        import torch
        from torch.distributions import constraints, transform_to

        self.chains, self.states = chains, states
        self.names = ["probs_x"] if chains == 1 else ["probs_w", "probs_x"]
        self.support = {name: constraints.simplex for name in self.names} | {"probs_y": constraints.unit_interval}
        self.params = {
            name: transform_to(self.support[name]).inv(constrained[name]).detach().clone().requires_grad_()
            for name in (*self.names, "probs_y")
        }
        eye = torch.eye(states, device=constrained["probs_y"].device)
        self.table_prior = torch.distributions.Dirichlet(0.9 * eye + 0.1)
        self.tone_prior = torch.distributions.Beta(
            torch.tensor(0.1, device=eye.device), torch.tensor(0.9, device=eye.device)
        )

    def constrained(self) -> dict:
        from torch.distributions import transform_to

        return {name: transform_to(self.support[name])(u) for name, u in self.params.items()}

    def log_likelihood(self, sequences, lengths):
        """``log p(y_b)`` ``[B]`` (the batch cropped to its longest chorale, as Pyro runs it)."""
        import torch

        from latentnlp import ChainPosterior, FactorialChainPosterior

        probs = self.constrained()
        sequences = sequences[:, : int(lengths.max())]
        joint = probs["probs_y"].reshape(-1, sequences.shape[-1])  # [K^L, V], row-major joint states
        emit = sequences @ joint.log().T + (1 - sequences) @ torch.log1p(-joint).T  # [B, T, K^L]
        tables = [probs[name].log() for name in self.names]
        if self.chains == 1:
            return ChainPosterior(tables[0][0], tables[0], emit, lengths).log_partition
        emit = emit.reshape(*emit.shape[:2], *(self.states,) * self.chains)
        init, trans = torch.stack([t[0] for t in tables]), torch.stack(tables)
        return FactorialChainPosterior(init, trans, emit, lengths).log_partition

    def loss(self, sequences, lengths, batch, num_sequences):
        """``-(N / |batch| sum_b log p(y_b) + log prior)``: Pyro's ``TraceEnum_ELBO`` loss of the MAP guide."""
        probs = self.constrained()
        log_prior = sum(self.table_prior.log_prob(probs[name]).sum() for name in self.names)
        log_prior = log_prior + self.tone_prior.log_prob(probs["probs_y"]).sum()
        log_lik = self.log_likelihood(sequences[batch], lengths[batch]).sum()
        return -(num_sequences / len(batch) * log_lik + log_prior)


def jsb_worker(spec: dict) -> dict:
    """Part 3 for one of Pyro's models: both trained side by side, one update of each in turn."""
    import pyro
    import torch
    from pyro import poutine
    from pyro.infer import SVI, TraceEnum_ELBO
    from pyro.infer.autoguide import AutoDelta
    from pyro.optim import Adam

    device = torch.device(spec["device"])
    if device.type == "cuda":
        torch.set_default_device(device)  # as the example's --cuda
    info = JSB_MODELS[spec["model"]]
    chains, states = info["chains"], info["states"]
    data = load_jsb(Path(spec["data"]), device, spec.get("limit"))
    train, lengths = data["train"]
    test, test_lengths = data["test"]
    num_sequences, steps = len(train), float(lengths.sum())

    pyro.set_rng_seed(SEED)
    pyro.clear_param_store()
    model = pyro_model(chains, states)
    guide = AutoDelta(poutine.block(model, expose_fn=lambda msg: msg["name"].startswith("probs_")))
    elbo = TraceEnum_ELBO(max_plate_nesting=2)
    svi = SVI(model, guide, Adam({"lr": JSB_LR}), elbo)
    order = torch.Generator().manual_seed(SEED)
    batches = [
        torch.randperm(num_sequences, generator=order)[i : i + JSB_BATCH].to(device)
        for _ in range(spec["epochs"])
        for i in range(0, num_sequences, JSB_BATCH)
    ]
    guide(train, lengths, batches[0])  # AutoDelta's initialisation (init_to_median), as SVI's first step
    start = {
        name: getattr(guide, name).detach().clone()
        for name in ("probs_w", "probs_x", "probs_y")
        if hasattr(guide, name)
    }
    ours = LatentnlpModel(chains, states, start)
    optimizer = torch.optim.Adam(list(ours.params.values()), lr=JSB_LR)

    def pyro_step(batch):
        return svi.step(train, lengths, batch)

    def latentnlp_step(batch):
        optimizer.zero_grad()
        loss = ours.loss(train, lengths, batch, num_sequences)
        loss.backward()
        optimizer.step()
        return loss.item()

    steps_of = {"pyro": pyro_step, "latentnlp": latentnlp_step}
    times = {name: [] for name in steps_of}
    losses = {name: [] for name in steps_of}
    for i, batch in enumerate(batches):
        for name in list(steps_of) if i % 2 == 0 else list(steps_of)[::-1]:
            t0 = time.perf_counter()
            loss = steps_of[name](batch)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            losses[name].append(loss / steps)
    per_epoch = len(batches) // spec["epochs"]

    with torch.no_grad():
        t0 = time.perf_counter()
        pyro_test = elbo.loss(model, guide, test, test_lengths, include_prior=False) / float(test_lengths.sum())
        pyro_eval_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours_test = -ours.log_likelihood(test, test_lengths).sum().item() / float(test_lengths.sum())
        ours_eval_s = time.perf_counter() - t0
    out = dict(
        part="jsb",
        model=spec["model"],
        name=info["name"],
        chains=chains,
        states=states,
        tones=int(train.shape[-1]),
        epochs=spec["epochs"],
        updates=len(batches),
        updates_per_epoch=per_epoch,
        rows={},
        status="ok",
    )
    for name in steps_of:
        epochs = [sum(times[name][e * per_epoch : (e + 1) * per_epoch]) for e in range(spec["epochs"])]
        out["rows"][name] = dict(
            update_s=statistics.median(times[name]),
            update_min_s=min(times[name]),
            epoch_s=statistics.median(epochs),
            epochs_s=epochs,
            train_loss_per_step=losses[name],
            test_loss_per_step=pyro_test if name == "pyro" else ours_test,
            test_eval_s=pyro_eval_s if name == "pyro" else ours_eval_s,
        )
    out["update_speedup"] = out["rows"]["pyro"]["update_s"] / out["rows"]["latentnlp"]["update_s"]
    out["epoch_speedup"] = out["rows"]["pyro"]["epoch_s"] / out["rows"]["latentnlp"]["epoch_s"]
    out["max_train_loss_difference"] = max(abs(a - b) for a, b in zip(losses["pyro"], losses["latentnlp"]))
    out["test_loss_difference"] = ours_test - pyro_test
    return out


WORKERS = {"contraction": contraction_worker, "mean_field": mean_field_worker, "jsb": jsb_worker}


def worker(spec: dict) -> dict:
    start_worker(spec["mem_cap_gb"], spec["threads"], spec["device"])
    sys.path.insert(0, str(REPO))
    try:
        return WORKERS[spec["part"]](spec)
    except Exception as e:  # a failure is a result, not a crash of the benchmark
        return dict({k: v for k, v in spec.items() if k in ("part", "L", "K", "model")}, **failure(e))


# ==============================================================================================
# driver side
# ==============================================================================================
def _ms(s) -> str:
    return "-" if s is None else (f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s")


def _mb(mb) -> str:
    return "-" if mb is None else (f"{mb:,.0f} MB" if mb >= 10 else f"{mb:.2g} MB")


def _row(r: dict, name: str, key: str):
    return r.get("rows", {}).get(name, {}).get(key)


def fit_limit(results: list) -> dict:
    """The exact pass's bytes per joint state and step, ``c = peak / (B T K^L)`` at the largest
    measured ``L``, and the smallest ``L`` with ``c B T K^L > 8 GB`` at that ``B, T``."""
    measured = [r for r in results if r.get("status") == "ok" and _row(r, "exact", "time_s") is not None]
    if not measured:
        return {}
    big = max(measured, key=lambda r: r["states"])
    per = _row(big, "exact", "peak_mb") * 2**20 / (big["B"] * big["T"] * big["states"])
    chains = next(ell for ell in range(1, 64) if per * big["B"] * big["T"] * big["K"] ** ell > FIT_BUDGET_GB * 2**30)
    return dict(
        bytes_per_state_step=per,
        fitted_at_L=big["L"],
        B=big["B"],
        T=big["T"],
        K=big["K"],
        first_L_over_8GB=chains,
        predicted_gb_at_that_L=per * big["B"] * big["T"] * big["K"] ** chains / 2**30,
    )


def targets(results: dict) -> list:
    """The issue's goals against what was measured: ``pass``, ``FAIL`` or ``n/a`` (not measured)."""
    goals = []
    for ell, k, bound in ((3, 12, 10.0), (4, 8, 20.0)):
        for r in results.get("contraction", []):
            if r.get("L") == ell and r.get("K") == k:
                value = r.get("speedup")
                goals.append(
                    dict(
                        target=f"exact >= {bound:g}x the flattened product state at L={ell}, K={k} (B={r.get('B')})",
                        value=None if value is None else f"{value:.1f}x",
                        status="n/a" if value is None else ("pass" if value >= bound else "FAIL"),
                    )
                )
    for r in results.get("jsb", []):
        if r.get("status") != "ok":
            continue
        if r["model"] == "3":
            goals.append(
                dict(
                    target="latentnlp >= 20x faster than Pyro per update at model 3's size",
                    value=f"{r['update_speedup']:.1f}x",
                    status="pass" if r["update_speedup"] >= 20 else "FAIL",
                )
            )
        goals.append(
            dict(
                target=f"final test loss per step equal to Pyro's within 0.01 nats ({r['name']})",
                value=f"{r['test_loss_difference']:+.2g}",
                status="pass" if abs(r["test_loss_difference"]) <= 0.01 else "FAIL",
            )
        )
    return goals


def tables(results: dict, limit: dict) -> str:
    md = []
    if results.get("contraction"):
        before = any("speedup_over_before" in r for r in results["contraction"])
        extra = " exact before | its speed-up | before / exact |" if before else ""
        md += [
            "| L, K (K^L) | B, T | exact factorial | peak | flattened product state | peak | speed-up |" + extra,
            "|---|---|---|---|---|---|---|" + "---|" * (3 if before else 0),
        ]
        for r in results["contraction"]:
            if r.get("status") != "ok":
                md.append(f"| {r.get('L')}, {r.get('K')} | | {r.get('status')}: {r.get('error', '')[:80]} | | | | |")
                continue
            row = (
                f"| {r['L']}, {r['K']} ({r['states']:,}) | {r['B']}, {r['T']} | {_ms(_row(r, 'exact', 'time_s'))} | "
                f"{_mb(_row(r, 'exact', 'peak_mb'))} | {_ms(_row(r, 'flattened', 'time_s'))} | "
                f"{_mb(_row(r, 'flattened', 'peak_mb'))} | {r['speedup']:.1f}x |"
            )
            if before:
                row += (
                    f" {_ms(_row(r, 'exact-before', 'time_s'))} | {r['speedup_before']:.1f}x | "
                    f"{r['speedup_over_before']:.2f}x |"
                )
            md.append(row)
        md.append("")
    if results.get("mean_field"):
        md += [
            "| L (K^L, K=8) | mean-field sweep | peak (6 sweeps + backward) | exact fwd+bwd | exact peak | "
            "exact / sweep | ELBO / step | log Z / step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results["mean_field"]:
            if r.get("status") != "ok":
                md.append(f"| {r.get('L')} | {r.get('status')}: {r.get('error', '')[:80]} | | | | | | |")
                continue
            exact = r["rows"].get("exact")
            if exact is None:
                cell, peak = "not run", "-"
            elif exact.get("status") != "ok":
                cell, peak = exact.get("status"), "-"
            else:
                cell, peak = _ms(exact["time_s"]), _mb(exact["peak_mb"])
            ratio = f"{r['exact_over_sweep']:.1f}x" if r.get("exact_over_sweep") else "-"
            lz = f"{r['log_z_per_step']:.3f}" if "log_z_per_step" in r else "-"
            md.append(
                f"| {r['L']} ({r['states']:,}) | {_ms(r['sweep_s'])} | "
                f"{_mb(_row(r, f'mean-field-{MEAN_FIELD_SWEEPS[1]}', 'peak_mb'))} | {cell} | {peak} | {ratio} | "
                f"{r['elbo_per_step']:.3f} | {lz} |"
            )
        if limit:
            md += [
                "",
                f"Exact memory formula: {limit['bytes_per_state_step']:.1f} bytes x B T K^L (fitted at L = "
                f"{limit['fitted_at_L']}); at B = {limit['B']}, T = {limit['T']}, K = {limit['K']} exact first "
                f"exceeds {FIT_BUDGET_GB:g} GB at L = {limit['first_L_over_8GB']} "
                f"({limit['predicted_gb_at_that_L']:.1f} GB predicted).",
            ]
        md.append("")
    if results.get("jsb"):
        md += [
            "| model | updates | Pyro update | latentnlp update | speed-up (update) | Pyro epoch | latentnlp epoch | "
            "speed-up (epoch) | test loss / step Pyro | latentnlp |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in results["jsb"]:
            if r.get("status") != "ok":
                md.append(f"| {r.get('model')} | {r.get('status')}: {r.get('error', '')[:80]} |" + " |" * 8)
                continue
            p, o = r["rows"]["pyro"], r["rows"]["latentnlp"]
            md.append(
                f"| {r['name']}, {r['chains']} x {r['states']} states | {r['updates']} | {_ms(p['update_s'])} | "
                f"{_ms(o['update_s'])} | {r['update_speedup']:.1f}x | {_ms(p['epoch_s'])} | {_ms(o['epoch_s'])} | "
                f"{r['epoch_speedup']:.1f}x | {p['test_loss_per_step']:.4f} | {o['test_loss_per_step']:.4f} |"
            )
        md.append("")
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    p.add_argument("--quick", action="store_true", help="small sizes, one epoch on a data slice; writes nothing")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list out of {', '.join(PARTS)}")
    p.add_argument("--epochs", type=int, default=None, help="JSB training epochs (default 5; quick 1)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per case (default 6)")
    p.add_argument("--max-repeats", type=int, default=15)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
    p.add_argument("--mem-cap-gb", type=float, default=10.0, help="CPU address-space cap per case, 0 = none")
    p.add_argument("--data", type=Path, default=None, help="JSB json (default $LATENTNLP_DATA/jsb_chorales/...)")
    p.add_argument("--out", type=Path, default=None, help=f"JSON output (default {DEFAULT_OUT}; none with --quick)")
    p.add_argument(
        "--allocator",
        choices=("returning", "default"),
        default="returning",
        help="returning (default): workers mmap every block over 256 KB and return it when freed, so peaks are "
        "exact but every large tensor faults its pages in afresh; default: glibc's own threshold, which reuses "
        "freed blocks as a training loop does (times without those faults; peaks a lower bound)",
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="a commit: part 1 also times the exact contraction of the library at it, in the same workers",
    )
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    parts = args.parts.split(",")
    for part in parts:
        if part not in PARTS:
            p.error(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    epochs = args.epochs or (1 if args.quick else 5)
    budget = args.budget if args.budget is not None else (0.0 if args.quick else 6.0)
    data = args.data or Path(os.environ.get("LATENTNLP_DATA", "")) / "jsb_chorales" / "jsb_chorales.json"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep on a shared machine
    base = dict(device=args.device, threads=args.threads, mem_cap_gb=args.mem_cap_gb, budget_s=budget)
    base["max_repeats"] = 1 if args.quick else args.max_repeats
    base["min_repeats"] = 1 if args.quick else min(3, args.max_repeats)
    baseline = extract_baseline(args.baseline) if args.baseline else None

    def case(spec, identity):
        spec = dict(base, **spec)
        r = run_case(
            __file__,
            spec,
            identity=identity,
            threads=args.threads,
            timeout=args.timeout,
            fixed_mmap_threshold=args.allocator == "returning",
        )
        print(f"  {json.dumps({k: v for k, v in r.items() if not isinstance(v, (dict, list))})[:300]}", flush=True)
        return r

    meta = run_metadata(args.device, args.threads, args.quick)
    meta["cpu_model"] = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            None,
        )
        if Path("/proc/cpuinfo").is_file()
        else None
    )
    meta["load_average_start"] = list(os.getloadavg())
    print(f"# {meta}", flush=True)
    results, t_start = {}, time.perf_counter()
    if "contraction" in parts:
        results["contraction"] = [
            case(
                dict(part="contraction", L=ell, K=k, B=batch, T=steps, baseline=baseline and str(baseline["root"])),
                dict(part="contraction", L=ell, K=k, B=batch),
            )
            for batch, steps in (QUICK_CONTRACTION_SHAPES if args.quick else CONTRACTION_SHAPES)
            for ell, k in CONTRACTION_SIZES
        ]
    batch, steps = QUICK_MEAN_FIELD_SHAPE if args.quick else MEAN_FIELD_SHAPE
    if "mean_field" in parts:
        results["mean_field"] = [
            case(
                dict(part="mean_field", L=ell, B=batch, T=steps, exact=ell <= MEAN_FIELD_EXACT_MAX_CHAINS),
                dict(part="mean_field", L=ell, K=MEAN_FIELD_K),
            )
            for ell in (QUICK_MEAN_FIELD_CHAINS if args.quick else MEAN_FIELD_CHAINS)
        ]
    if "jsb" in parts:
        if not data.is_file():
            print(f"# no JSB chorales at {data}: part jsb skipped", flush=True)
        else:
            results["jsb"] = [
                case(
                    dict(part="jsb", model=m, epochs=epochs, data=str(data), limit=24 if args.quick else None),
                    dict(part="jsb", model=m),
                )
                for m in JSB_MODELS
            ]
    if baseline:
        shutil.rmtree(baseline["root"])
    limit = fit_limit(results.get("mean_field", []))
    goals = targets(results)
    md = tables(results, limit) + "\n" + "\n".join(f"- [{g['status']}] {g['target']}: {g['value']}" for g in goals)
    print("\n" + md)
    meta["load_average_end"] = list(os.getloadavg())
    meta["wall_s"] = time.perf_counter() - t_start
    print(f"# total {meta['wall_s']:.0f} s")
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out:
        doc = dict(
            benchmark="factorial HMMs: exact contraction, structured mean field, Pyro TraceEnum_ELBO on JSB chorales",
            date=utc_now(),
            machine=meta,
            settings=dict(
                seed=SEED,
                dtype="float32",
                budget_s=budget,
                max_repeats=base["max_repeats"],
                mem_cap_gb=args.mem_cap_gb,
                allocator=args.allocator,
                epochs=epochs,
                jsb_batch=JSB_BATCH,
                lr=JSB_LR,
                data="$LATENTNLP_DATA/jsb_chorales/jsb_chorales.json",
                statistic="median of alternating repeats in one process per case; ratios of medians",
                baseline=baseline and {key: value for key, value in baseline.items() if key != "root"},
            ),
            results=results,
            exact_memory_limit=limit,
            targets=goals,
            markdown=md,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
