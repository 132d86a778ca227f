"""The mixture of categoricals on Yahoo bags of words: every estimator of its ELBO, and EM.

Each estimator of :meth:`latentnlp.models.MixtureOfCategoricals.elbo` trains a fresh model from
the same initialisation through the library's trainer (Adam, the same number of updates), selected
on a held-out part of ``yahoo.valid.txt`` by the exact ELBO; EM runs its closed-form iterations
from that initialisation too.  Then, on ``yahoo.test.txt``:

- the exact ELBO (``q`` enumerated) and the exact ``log p(x)``, in nats per document, and the
  per-token perplexity ``exp(-sum log p / tokens)``;
- the variance of each estimator's gradient of the encoder's parameters at one fixed point (the
  exact-gradient model's parameters, the baselines fitted there first): ``draws`` estimates on one
  batch, the trace of their covariance over the exact gradient's squared norm, and the squared
  norm of their mean's error relative to the same (the bias, plus ``1/draws`` of the variance);
- milliseconds per update (forward and backward of one batch, median over the draws).

This module also holds what the Bernoulli-factor table shares: the Yahoo bags
(:func:`yahoo_bags`), the data source (:class:`Bags`) and the comparison (:func:`compare`).
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from inference_tables import TableResult
from latentnlp.data import read_yahoo
from latentnlp.data.corpora import MissingSplitWarning
from latentnlp.models import LatentModel, MixtureOfCategoricals
from latentnlp.training import TrainConfig, Trainer, evaluate, load_model, read_metrics

TITLE = "Mixture of categoricals on Yahoo documents: exact, score function, Gumbel-softmax, EM"
NAME = "mixture"


# ---- data ---------------------------------------------------------------------------------------
class Bags:
    """Documents as sparse word counts, batched into dense ``{"counts": [B, V]}`` (the trainer's protocol).

    ``iterate(epoch, start)`` yields the batches in an order that depends on ``(seed, epoch)`` only
    (``shuffle=False``: the stored order), skipping the first ``start``.
    """

    def __init__(
        self, docs: list[tuple[list[int], list[float]]], vocab_size: int, batch_size: int, *, seed=0, shuffle=True
    ):
        self.docs, self.vocab_size, self.batch_size = docs, vocab_size, batch_size
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.docs) / self.batch_size)

    @property
    def num_tokens(self) -> int:
        return int(sum(sum(c) for _, c in self.docs))

    def collate(self, indices: list[int]) -> dict[str, torch.Tensor]:
        counts = torch.zeros(len(indices), self.vocab_size)
        for row, i in enumerate(indices):
            ids, values = self.docs[i]
            counts[row, ids] = torch.tensor(values)
        return {"counts": counts}

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        order = list(range(len(self.docs)))
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        for b in range(start, len(self)):
            yield self.collate(order[b * self.batch_size : (b + 1) * self.batch_size])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iterate(0)


def _bag(ids: list[int]) -> tuple[list[int], list[float]]:
    counts: dict[int, float] = {}
    for i in ids:
        counts[i] = counts.get(i, 0.0) + 1.0
    return list(counts), list(counts.values())


def yahoo_bags(data_dir: Path, held_out: int, train_docs: int | None, test_docs: int | None):
    """``(train, valid, test, vocab_size, note)`` bags from ``$LATENTNLP_DATA/yahoo``.

    The vocabulary is ``vocab.txt`` (Yang et al.'s 20k words, ``_UNK`` among them; other words
    map to ``_UNK``); train is ``yahoo.valid.txt`` without its last ``held_out`` documents (at most
    ``train_docs`` of it), valid those ``held_out``, test the first ``test_docs`` of ``yahoo.test.txt``
    (None: all).
    """
    with warnings.catch_warnings():  # the shared copy has no yahoo.train.txt: valid is the training text here
        warnings.simplefilter("ignore", MissingSplitWarning)
        corpus = read_yahoo(data_dir)
    vocab_file = corpus.source.path / "vocab.txt"
    words = vocab_file.read_text(encoding="utf-8").split("\n")
    index = {w: i for i, w in enumerate(w for w in words if w)}
    unk = index["_UNK"]

    def bags(lines):
        return [_bag([index.get(w, unk) for w in line]) for line in lines if line]

    valid = bags(corpus.valid)
    train, held = valid[: len(valid) - held_out], valid[len(valid) - held_out :]
    test = bags(corpus.test)
    note = (
        f"`{corpus.source.describe()}`: train = the first {min(len(train), train_docs or len(train))} documents "
        f"of yahoo.valid.txt, validation = its last {held_out}, test = "
        f"{'the first ' + str(test_docs) if test_docs else 'all ' + str(len(test))} of yahoo.test.txt; "
        f"vocabulary vocab.txt ({len(index)} words, others as _UNK)"
    )
    return train[:train_docs] if train_docs else train, held, test[:test_docs] if test_docs else test, len(index), note


def generated_bags(vocab_size: int, components: int, counts: tuple[int, int, int], seed: int):
    """Documents of 20..60 words from a random sparse mixture of categoricals (the smoke data)."""
    g = torch.Generator().manual_seed(seed)
    beta = torch.softmax(3.0 * torch.randn(components, vocab_size, generator=g), -1)
    out = []
    for n in counts:
        z = torch.randint(0, components, (n,), generator=g)
        lengths = torch.randint(20, 61, (n,), generator=g)
        out.append([_bag(torch.multinomial(beta[k], int(t), True, generator=g).tolist()) for k, t in zip(z, lengths)])
    return (*out, vocab_size, f"generated: {counts} documents from a random {components}-component mixture")


def log_unigram(docs: list[tuple[list[int], list[float]]], vocab_size: int, pseudo_count: float = 0.5) -> torch.Tensor:
    """``log`` of the documents' word frequencies with ``pseudo_count`` added, ``[V]``: where the models'
    word distributions start (from uniform logits, Adam would spend thousands of updates getting there)."""
    counts = torch.full((vocab_size,), pseudo_count)
    for ids, values in docs:
        counts[ids] += torch.tensor(values)
    return (counts / counts.sum()).log()


# ---- the comparison -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """What one preset trains and measures (``latent``: ``K`` components or ``k`` factors)."""

    latent: int
    hidden: int
    batch_size: int
    max_steps: int
    eval_every: int
    lr: float
    held_out: int
    train_docs: int | None
    test_docs: int | None
    draws: int
    baseline_fit_steps: int
    em_iterations: int = 0
    em_smoothing: float = 0.1
    tau: float = 0.5


@dataclass(frozen=True)
class Row:
    """One estimator: its label, the ``elbo`` keyword arguments, whether it needs the learned baseline."""

    label: str
    kwargs: dict
    learned_baseline: bool = False

    @property
    def slug(self) -> str:
        return "-".join(str(v).replace("_", "-") for v in self.kwargs.values()) or "default"


def _trainer_config(row: Row, setting: Setting, out: Path, seed: int) -> TrainConfig:
    return TrainConfig(
        lr=setting.lr,
        max_epochs=10**6,
        max_steps=setting.max_steps,
        objective="elbo",
        objective_kwargs=dict(row.kwargs),
        eval_objective="elbo",
        eval_kwargs={"estimator": "exact"},
        eval_every=setting.eval_every,
        log_every=setting.eval_every,
        checkpoint_every=setting.eval_every,
        seed=seed,
        output_dir=str(out),
        progress=False,
        device="cpu",
    )


def train(build: Callable[..., LatentModel], row: Row, setting: Setting, data, run_dir: Path, seed: int):
    """The model of ``row`` trained (or the finished run in ``run_dir`` reused), and its wall time."""
    if (run_dir / "finished.json").exists():
        print(f"[{run_dir.name}] finished run found: reusing it")
        return load_model(run_dir), json.loads((run_dir / "finished.json").read_text())["wall_time"]
    torch.manual_seed(seed)  # the same initialisation for every estimator
    model = build(learned_baseline=row.learned_baseline)
    trainer = Trainer(model, _trainer_config(row, setting, run_dir, seed), data[0], data[1])
    summary = trainer.fit()
    return trainer.model, summary["wall_time"]


def held_out(model: LatentModel, test) -> dict[str, float]:
    """Exact ELBO and ``log p(x)`` per document, and the perplexity, on ``test``."""
    bound = evaluate(model, test, objective="elbo", estimator="exact")
    marginal = evaluate(model, test, objective="marginal")
    return {
        "elbo_per_doc": -bound["neg_elbo_per_example"],
        "log_px_per_doc": -marginal["nll_per_example"],
        "ppl": marginal["ppl"],
        "ppl_bound": bound["ppl_bound"],
    }


def _encoder_gradient(model: LatentModel, batch, kwargs) -> torch.Tensor:
    params = list(model.encoder.parameters())
    loss = model.loss(batch, "elbo", **kwargs)
    grads = torch.autograd.grad(loss.value, params, allow_unused=True)
    return torch.cat([torch.zeros_like(p).flatten() if g is None else g.flatten() for p, g in zip(params, grads)])


def fit_baselines(model: LatentModel, row: Row, train_data, steps: int) -> None:
    """At fixed model parameters: the learned baseline by Adam on its regression loss, the running
    mean by its own updates (training mode), over ``steps`` training batches."""
    if row.kwargs.get("baseline") not in ("learned", "running-mean"):
        return
    opt = torch.optim.Adam(model.baseline.parameters(), lr=1e-2) if row.learned_baseline else None

    def batches():
        for epoch in itertools.count():
            yield from train_data.iterate(epoch)

    model.train()
    for batch in itertools.islice(batches(), steps):
        loss = model.loss(batch, "elbo", **row.kwargs)
        if opt is not None:
            opt.zero_grad()
            loss.value.backward()  # only the baseline steps: its gradient is the regression's
            opt.step()


def gradient_variance(model: LatentModel, row: Row, batch, draws: int, exact: torch.Tensor, seed: int) -> dict:
    """``draws`` encoder gradients of the per-token loss at fixed parameters, against ``exact``."""
    torch.manual_seed(seed)
    model.eval()  # the running mean stays where it was fitted
    rows, times = [], []
    for _ in range(draws):
        tic = time.perf_counter()
        rows.append(_encoder_gradient(model, batch, row.kwargs))
        times.append(time.perf_counter() - tic)
    g = torch.stack(rows)
    norm = float(exact.pow(2).sum())
    return {
        "relative_variance": float(g.var(0).sum()) / norm,
        "relative_bias": float((g.mean(0) - exact).pow(2).sum()) / norm,
        "ms_per_update": 1e3 * statistics.median(times),
    }


def compare(
    name: str,
    build: Callable[..., LatentModel],
    rows: list[Row],
    setting: Setting,
    data,
    out: Path,
    seed: int,
) -> list[dict]:
    """Train every row, evaluate it held out, measure its gradient variance; one metrics row each."""
    train_data, valid_data, test_data = data
    models, results = {}, []
    for row in rows:
        model, wall = train(build, row, setting, (train_data, valid_data), out / name / row.slug, seed)
        models[row.label] = model
        results.append({"table": name, "estimator": row.label, "kwargs": row.kwargs, "train_seconds": wall})
        results[-1].update(held_out(model, test_data))
    # the fixed point: the exact-gradient model's parameters
    point = models[rows[0].label].state_dict()
    batch = next(iter(Bags(valid_data.docs, valid_data.vocab_size, setting.batch_size, shuffle=False)))
    reference = build(learned_baseline=False)
    reference.load_state_dict(point)
    exact = _encoder_gradient(reference, batch, {"estimator": "exact"})
    for row, result in zip(rows, results):
        probe = build(learned_baseline=row.learned_baseline)
        probe.load_state_dict(point, strict=False)  # the baseline network (if any) starts fresh
        fit_baselines(probe, row, train_data, setting.baseline_fit_steps)
        result.update(
            gradient_variance(
                probe, row, batch, setting.draws if row.kwargs["estimator"] != "exact" else 3, exact, seed
            )
        )
    return results


def elbo_curves(runs: dict[str, Path], path: Path, title: str) -> None:
    """Held-out exact ELBO per document against the update, one line per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, run_dir in runs.items():
        points = [
            (e["step"], -e["neg_elbo_per_example"])
            for e in read_metrics(run_dir)
            if e.get("split") == "valid" and e.get("event") == "eval"
        ]
        if points:
            ax.plot(*zip(*points), marker=".", label=label)
    ax.set(xlabel="update", ylabel="held-out ELBO (nats per document)", title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict]) -> str:
    """The measured table, one line per estimator ("—": not measured for that row)."""
    lines = [
        "| estimator | held-out ELBO (nats/doc) | held-out log p(x) (nats/doc) | perplexity | encoder gradient "
        "variance / ‖exact‖² | bias² / ‖exact‖² | ms per update | training (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(r, key, fmt):
        return format(r[key], fmt) if key in r else "—"

    for r in results:
        lines.append(
            f"| {r['estimator']} | {r['elbo_per_doc']:.2f} | {r['log_px_per_doc']:.2f} | {r['ppl']:.1f} | "
            f"{cell(r, 'relative_variance', '.3g')} | {cell(r, 'relative_bias', '.2g')} | "
            f"{cell(r, 'ms_per_update', '.1f')} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines)


def estimator_checks(results: list[dict]) -> list[tuple[str, bool, str]]:
    """The orderings the tutorials lead one to expect, as measured."""
    by = {r["estimator"]: r for r in results}
    exact = by["exact"]
    plain = by["score function"]
    learned = by["score function + learned baseline"]
    checks = [
        (
            "every ELBO <= its model's log p(x)",
            all(r["elbo_per_doc"] <= r["log_px_per_doc"] + 1e-6 for r in results),
            ", ".join(f"{r['estimator']}: {r['log_px_per_doc'] - r['elbo_per_doc']:.2f}" for r in results),
        ),
        (
            "exact gradient >= every sampled estimator (held-out ELBO)",
            all(exact["elbo_per_doc"] >= r["elbo_per_doc"] - 0.5 for r in results),
            f"exact {exact['elbo_per_doc']:.2f}; best other "
            f"{max(r['elbo_per_doc'] for r in results if r is not exact):.2f} (0.5 nats allowed)",
        ),
        (
            "learned baseline > plain score function (held-out ELBO)",
            learned["elbo_per_doc"] > plain["elbo_per_doc"],
            f"{learned['elbo_per_doc']:.2f} vs {plain['elbo_per_doc']:.2f}",
        ),
        (
            "the learned baseline lowers the encoder gradient's variance at least tenfold",
            learned["relative_variance"] * 10 <= plain["relative_variance"],
            f"{plain['relative_variance']:.3g} -> {learned['relative_variance']:.3g} "
            f"({plain['relative_variance'] / max(learned['relative_variance'], 1e-300):.0f}x)",
        ),
    ]
    return checks


# ---- this table ---------------------------------------------------------------------------------
PRESETS = {
    "smoke": Setting(4, 16, 32, 30, 15, 1e-2, 40, None, None, 10, 30, em_iterations=5),
    "cpu": Setting(20, 64, 64, 400, 100, 1e-2, 1000, None, 2000, 50, 100, em_iterations=20),
    "full": Setting(50, 128, 64, 10000, 500, 3e-3, 1000, None, None, 500, 1000, em_iterations=100),
}


def rows_for(setting: Setting) -> list[Row]:
    sf = {"estimator": "score_function"}
    return [
        Row("exact", {"estimator": "exact"}),
        Row("score function", sf),
        Row("score function + running mean", {**sf, "baseline": "running-mean"}),
        Row("score function + learned baseline", {**sf, "baseline": "learned"}, True),
        Row(
            "score function + learned baseline + control variate",
            {**sf, "baseline": "learned", "control_variate": True},
            True,
        ),
        Row(f"Gumbel-softmax, relaxed (tau = {setting.tau})", {"estimator": "gumbel_softmax", "tau": setting.tau}),
        Row(
            f"Gumbel-softmax, straight-through (tau = {setting.tau})",
            {"estimator": "gumbel_softmax", "tau": setting.tau, "hard": True},
        ),
    ]


def em(build: Callable[..., MixtureOfCategoricals], setting: Setting, data, seed: int) -> tuple[dict, list[float]]:
    """EM from the gradient runs' initialisation: corpus-wide E-step over the batches, one M-step."""
    torch.manual_seed(seed)
    model = build(learned_baseline=False)
    model.eval()
    history, times = [], []
    for _ in range(setting.em_iterations):
        tic = time.perf_counter()
        counts = None
        for batch in data[0].iterate(0):
            part = model.expected_counts(batch)
            counts = part if counts is None else counts + part
        model.m_step(counts, setting.em_smoothing)
        times.append(time.perf_counter() - tic)
        history.append(float(counts.log_likelihood) / len(data[0].docs))
    result = {"table": NAME, "estimator": f"EM (closed form, Dirichlet pseudo-count {setting.em_smoothing})"}
    result.update(held_out(model, data[2]))
    result.update(elbo_per_doc=result["log_px_per_doc"], ppl_bound=result["ppl"])  # q = the exact posterior
    result.update(train_seconds=sum(times), ms_per_update=1e3 * statistics.median(times))
    return result, history


def bag_tables_data(preset: str, setting: Setting, data_dir: Path | None, seed: int):
    """The bag-of-words tables' data: ``((train, valid, test) Bags, vocab_size, log unigram [V], note)``:
    generated bags under ``smoke``, else Yahoo (:func:`yahoo_bags`); the log unigram of the training
    documents is where the word distributions start."""
    if preset == "smoke":
        train_docs, valid_docs, test_docs, vocab_size, note = generated_bags(50, 4, (300, 40, 60), seed)
    else:
        if data_dir is None:
            raise ValueError(f"the {preset} preset reads $LATENTNLP_DATA/yahoo: set LATENTNLP_DATA")
        train_docs, valid_docs, test_docs, vocab_size, note = yahoo_bags(
            data_dir, setting.held_out, setting.train_docs, setting.test_docs
        )
    data = (
        Bags(train_docs, vocab_size, setting.batch_size, seed=seed),
        Bags(valid_docs, vocab_size, 256, shuffle=False),
        Bags(test_docs, vocab_size, 256, shuffle=False),
    )
    return data, vocab_size, log_unigram(train_docs, vocab_size), note


def run(preset: str, out: Path, data_dir: Path | None, seed: int) -> TableResult:
    setting = PRESETS[preset]
    data, vocab_size, start, note = bag_tables_data(preset, setting, data_dir, seed)

    def build(learned_baseline: bool) -> MixtureOfCategoricals:
        model = MixtureOfCategoricals(vocab_size, setting.latent, setting.hidden, learned_baseline=learned_baseline)
        with torch.no_grad():  # every component starts at the unigram distribution, plus the random logits
            model.emission_logits.add_(start)
        return model

    rows = rows_for(setting)
    results = compare(NAME, build, rows, setting, data, out, seed)
    em_result, em_history = em(build, setting, data, seed)
    results.append(em_result)
    figure = f"{NAME}_elbo.png"
    elbo_curves(
        {r.label: out / NAME / r.slug for r in rows}, out / figure, f"mixture of categoricals, K = {setting.latent}"
    )
    checks = estimator_checks(results[:-1])
    checks.append(
        (
            "EM's training log-likelihood never decreases",
            all(b >= a - 1e-6 * abs(a) for a, b in zip(em_history, em_history[1:])),
            f"{em_history[0]:.2f} -> {em_history[-1]:.2f} nats/doc over {len(em_history)} iterations",
        )
    )
    markdown = "\n\n".join(
        [
            f"Data: {note}.  K = {setting.latent} components, inference network and learned baseline of width "
            f"{setting.hidden}; every component's word logits start at the training unigram's log plus "
            f"N(0, 0.1²) noise; Adam (lr {setting.lr}), batches of {setting.batch_size} documents, "
            f"{setting.max_steps} updates, one sample per document, the model selected by the held-out exact ELBO.",
            table(results),
            "No published table measures these estimators on this model; the ordering the tutorials lead one to "
            "expect (Kim, Wiseman & Rush 2018) is exact >= Gumbel-softmax ≈ score function with a "
            "learned baseline > plain score function, with the baseline cutting the variance by an order of "
            "magnitude (Mnih & Gregor 2014); the checks below say what was measured.  "
            "The ELBO and log p(x) columns are exact (q enumerated over K); the EM row has no q (its E-step is the "
            f"exact posterior, so its ELBO is log p(x)).  Variance and bias: {setting.draws} gradients of the "
            "per-token loss w.r.t. the inference network at the exact-gradient model's parameters, on one "
            f"validation batch, after {setting.baseline_fit_steps} baseline-fitting batches; bias² includes "
            "variance / draws.  ms per update: forward and backward of that batch (EM: one pass over the "
            "training documents).",
        ]
    )
    config = {"setting": asdict(setting), "rows": [asdict(r) for r in rows], "data": note}
    return TableResult(markdown=markdown, checks=checks, figures=[figure], metrics=results, config=config)
