"""Penn Treebank language models: neural HMMs (Chiu & Rush 2020), factorial HMMs and mixture of softmaxes.

    python recipes/ptb.py --preset smoke                 # seconds, on text sampled from a random HMM
    python recipes/ptb.py --preset cpu                   # real PTB, about an hour on 2 cores
    python recipes/ptb.py --preset full --model mos      # the published settings, for a GPU

Every model is trained by the library's :class:`~latentnlp.training.Trainer`.  The HMMs and
LSTMs read a BPTT stream and carry their state from one chunk to the next; the factorial HMMs
(:class:`~latentnlp.models.FactorialHMM`: ``L`` chains of ``K`` states, categorical emissions
with additive logits ``b + sum_l W_l[z^l]``) carry no stream state, so they read sentence
batches instead: each sentence and its ``<eos>``, from the chains' initial distributions.  Every
model is evaluated by its exact log marginal (the factorial HMMs while ``K^L`` fits; beyond, by
the structured mean-field bound they are trained on): perplexity is
``exp(total NLL / target tokens)``, ``<eos>`` counted.  Each run gets its own folder
(``config.json``, ``metrics.jsonl``, ``last.pt``/``best.pt``, ``finished.json``); a finished
run is reused, not retrained, unless ``--overwrite``.  The output folder gathers
``results.md`` (the measured table beside the published one and the recipe's checks),
``metrics.jsonl`` (one line per run), ``config.json`` and PNG plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from latentnlp import plots  # noqa: E402
from latentnlp.data import Batches, BPTTStream, SentenceBatches, read_ptb  # noqa: E402
from latentnlp.models import FactorialHMM  # noqa: E402
from latentnlp.models.hmm_lm import HMMLanguageModel  # noqa: E402
from latentnlp.models.lstm_lm import LSTMLanguageModel  # noqa: E402
from latentnlp.training import TrainConfig, Trainer, evaluate, training_speed  # noqa: E402

# Published PTB perplexities (Mikolov's 10k-vocabulary version), with their sources.
PUBLISHED = [
    ("KN 5-gram (Mikolov & Zweig 2012)", None, 141.2, "as listed in Inan et al. 2017, Table 2"),
    ("AWD-LSTM (Merity et al. 2018)", 60.0, 57.3, "Yang et al. 2018, Table 1 (finetuned)"),
    ("AWD-LSTM-MoS, 15 experts (Yang et al. 2018)", 56.54, 54.44, "Yang et al. 2018, Table 1 (finetuned)"),
    ("AWD-LSTM-MoS without finetuning (Yang et al. 2018)", 58.08, 55.97, "Yang et al. 2018, Table 1"),
    (
        "Neural HMM, 2^15 states (Chiu & Rush 2020)",
        125.0,
        None,
        "Chiu & Rush 2020, arXiv 2011.04640 (about 125 validation perplexity)",
    ),
]
#: No published PTB perplexity of a factorial HMM is cited: Nepal & Yates (2013, arXiv 1312.6168)
#: evaluate the word features of their factorial HMMs on part-of-speech tagging and chunking (as
#: their abstract states), and no other source is known to us; the published table says so.
PUBLISHED_FACTORIAL = (
    "none known: Nepal & Yates 2013 (arXiv 1312.6168) evaluate factorial-HMM features on tagging and chunking"
)


#: the largest ``K^L`` whose exact marginal a mean-field row is also evaluated by
EXACT_STATES = 2**12
#: where a mean-field run keeps that evaluation (removed when the run is trained again)
EXACT_FILE = "exact.json"


@dataclass
class Run:
    """One model of a preset: how to build it and how long to train it."""

    name: str
    kind: str  # "hmm", "fhmm" (factorial HMM) or "lstm"
    model: dict
    group: str  # "hmm" (state-count series) or "softmax" (bottleneck comparison)
    train: dict = field(default_factory=dict)

    @property
    def batching(self) -> str:
        """``"stream"`` (BPTT chunks, state carried) or ``"sentences"`` (the factorial HMM carries none)."""
        return "sentences" if self.kind == "fhmm" else "stream"

    @property
    def states(self) -> int | None:
        """The HMM's states, the factorial HMM's joint states ``K^L``; None for an LSTM."""
        if self.kind == "hmm":
            return self.model["num_states"]
        if self.kind == "fhmm":
            return self.model["num_states"] ** self.model["num_chains"]
        return None

    @property
    def mean_field(self) -> bool:
        """Trained on the structured mean-field bound (``objective="elbo"``), not the exact marginal."""
        return self.train.get("objective") == "elbo"


@dataclass
class Preset:
    batch_size: int
    bptt: int
    train: dict
    runs: list[Run]


def hmm_run(states: int, size: int, rank: int | None = None, **train) -> Run:
    name = f"hmm-{states}" + (f"-rank{rank}" if rank else "")
    return Run(
        name,
        "hmm",
        {
            "num_states": states,
            "embedding_size": size,
            "transition_rank": rank,
            "state_dropout": 0.5 if states >= 128 else 0.0,
            "dropout": 0.1,
        },
        "hmm",
        train,
    )


def fhmm_run(chains: int, states: int, size: int, mean_field: bool = False, iterations: int = 10, **train) -> Run:
    """A neural factorial HMM of ``chains`` chains of ``states`` states, categorical emissions with
    additive logits: exact marginal (while ``states^chains`` fits) or, ``mean_field``, the structured
    mean-field bound with ``iterations`` sweeps (training and validation; the exact marginal of the
    trained model is added where it fits)."""
    name = f"fhmm-{chains}x{states}" + ("-mf" if mean_field else "")
    if mean_field:
        train = {"objective": "elbo", "eval_objective": "elbo", **train}
    return Run(
        name,
        "fhmm",
        {
            "num_chains": chains,
            "num_states": states,
            "emission": "categorical",
            "parameterization": "neural",
            "embedding_size": size,
            "max_joint_states": EXACT_STATES if mean_field else states**chains,
            "mean_field_iterations": iterations,
        },
        "hmm",
        train,
    )


def lstm_run(
    name: str,
    output: str,
    d: int,
    experts: int | None,
    embed: int,
    hidden: int,
    layers: int = 1,
    dropout: float = 0.3,
    activation: str = "tanh",
    **train,
) -> Run:
    return Run(
        name,
        "lstm",
        {
            "embedding_size": embed,
            "hidden_size": hidden,
            "num_layers": layers,
            "output": output,
            "softmax_input_size": d,
            "num_experts": experts,
            "dropout": dropout,
            "output_activation": activation,
        },
        "softmax",
        train,
    )


PRESETS = {
    # seconds: every model family at toy size on generated text
    "smoke": Preset(
        batch_size=8,
        bptt=16,
        train={"max_epochs": 2, "lr": 1e-2, "log_every": 10},
        runs=[
            hmm_run(4, 16),
            hmm_run(16, 16),
            fhmm_run(2, 4, 16),
            fhmm_run(4, 2, 16),
            hmm_run(16, 16, rank=4),
            fhmm_run(3, 2, 16, mean_field=True, iterations=2, max_epochs=1),  # L = 2..4 between them
            lstm_run("lstm-softmax-d4", "softmax", 4, None, 16, 32),
            lstm_run("lstm-mos3-d4", "mos", 4, 3, 16, 32),
            lstm_run("lstm-softmax-d12", "softmax", 12, None, 16, 32),
        ],
    ),
    # about an hour on 2 CPU cores: two epochs of PTB for every model (equal token budgets)
    "cpu": Preset(
        batch_size=32,
        bptt=64,
        train={"max_epochs": 2, "lr": 3e-3, "grad_clip": 5.0, "log_every": 20},
        runs=[
            hmm_run(128, 256),
            hmm_run(256, 256),
            fhmm_run(2, 16, 256),
            fhmm_run(4, 4, 256),
            hmm_run(512, 256),
            fhmm_run(3, 8, 256),
            hmm_run(1024, 256),
            fhmm_run(2, 32, 256),
            # no mean-field row: its categorical bound costs O(B T L K V) a sweep, and at V = 10,000 one
            # update of 2 x 32 with 2 sweeps took 40 s on these cores (100x an hmm-256 update)
            hmm_run(1024, 256, rank=128),
            # identity output projections: under Adam at 3e-3 a tanh projection saturates within
            # 25 steps (95% of units beyond |2.5|) and the d=128 control stalled at the unigram
            # distribution (805 valid PPL); a linear map has the same rank bound d + 1
            lstm_run("lstm-softmax-d32", "softmax", 32, None, 128, 256, activation="identity"),
            lstm_run("lstm-mos4-d32", "mos", 32, 4, 128, 256, activation="identity"),
            lstm_run("lstm-softmax-d128", "softmax", 128, None, 128, 256, activation="identity"),
        ],
    ),
    # the published settings (GPU): MoS of Yang et al. (3 layers, 960 hidden, 280-d experts x 15),
    # its one-softmax AWD-LSTM-sized control, and a 2^15-state HMM with state dropout
    "full": Preset(
        batch_size=12,
        bptt=70,
        train={"max_epochs": 100, "lr": 1e-3, "grad_clip": 0.25, "schedule": "plateau", "patience": 10},
        runs=[
            lstm_run("mos", "mos", 280, 15, 280, 960, layers=3, dropout=0.4),
            lstm_run("softmax", "softmax", 400, None, 400, 1150, layers=3, dropout=0.4),
            Run(
                "hmm-32768",
                "hmm",
                {
                    "num_states": 2**15,
                    "embedding_size": 256,
                    "transition_rank": None,
                    "state_dropout": 0.5,
                    "dropout": 0.1,
                },
                "hmm",
                {"max_epochs": 30, "lr": 1e-2, "grad_clip": 5.0},
            ),
            # as many joint states as the HMM (32^3 = 2^15), exact; and mean field beyond (32^4)
            fhmm_run(3, 32, 256, max_epochs=30, lr=1e-2, grad_clip=5.0),
            fhmm_run(4, 32, 256, mean_field=True, max_epochs=30, lr=1e-2, grad_clip=5.0),
        ],
    ),
}


# ---- data ---------------------------------------------------------------------------------------
def generate_corpus(folder: Path, seed: int = 0, vocab: int = 40, states: int = 6) -> Path:
    """Write ``ptb.{train,valid,test}.txt`` sampled from a random sparse HMM (the smoke data)."""
    generator = torch.Generator().manual_seed(seed)
    trans = torch.softmax(3 * torch.randn(states, states, generator=generator), -1)
    emission = torch.softmax(4 * torch.randn(states, vocab, generator=generator), -1)
    words = [f"w{i}" for i in range(vocab - 1)] + ["<unk>"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 1500), ("valid", 200), ("test", 200)):
        lines = []
        for _ in range(count):
            length = int(torch.randint(4, 14, (), generator=generator))
            state = int(torch.randint(states, (), generator=generator))
            sentence = []
            for _ in range(length):
                sentence.append(words[int(torch.multinomial(emission[state], 1, generator=generator))])
                state = int(torch.multinomial(trans[state], 1, generator=generator))
            lines.append(" " + " ".join(sentence) + " \n")
        (folder / f"ptb.{split}.txt").write_text("".join(lines))
    return folder


def build_model(run: Run, vocab_size: int):
    if run.kind == "hmm":
        return HMMLanguageModel(vocab_size, **run.model)
    if run.kind == "fhmm":
        return FactorialHMM(output_size=vocab_size, **run.model)
    return LSTMLanguageModel(vocab_size, **run.model)


def sentence_batches(sentences, vocab, max_tokens: int, shuffle: bool, seed: int) -> SentenceBatches:
    """Length-bucketed batches of whole sentences, at most ``max_tokens`` padded targets each
    (the tokens of one stream batch): targets ``w_1..w_n <eos>``; the inputs (``<eos> w_1..w_n``,
    the context a stream gives a first word) are not read by the factorial HMM."""
    eos = vocab.eos_id
    examples = [vocab.encode(s) for s in sentences]
    return SentenceBatches(examples, bos_id=eos, eos_id=eos, max_tokens=max_tokens, shuffle=shuffle, seed=seed)


def train_tokens(data: Batches, steps: int) -> int:
    """Targets read by ``steps`` updates: ``batch_size x bptt`` an update on a stream (the count of
    the committed results), the real (unpadded) targets of the batches read on sentence batches."""
    if isinstance(data, BPTTStream):
        return steps * data.batch_size * data.bptt
    epochs, rest = divmod(steps, len(data))
    sizes = [len(data.examples[i]) + 1 for i in range(len(data.examples))]
    partial = sum(sizes[i] for batch in data.plan(epochs)[:rest] for i in batch)
    return epochs * sum(sizes) + partial


# ---- results ------------------------------------------------------------------------------------
def exact_evaluation(run: Run, run_dir: Path, vocab_size: int, sentences: dict[str, Batches]) -> dict[str, float]:
    """The exact validation and test perplexities of a mean-field row's best model where its
    ``K^L`` joint states fit ``max_joint_states`` (else NaN), cached in :data:`EXACT_FILE`."""
    cached = run_dir / EXACT_FILE
    if cached.exists():
        return json.loads(cached.read_text())
    result = {"valid_ppl": math.nan, "test_ppl": math.nan}
    model = build_model(run, vocab_size)
    if model.joint_states <= model.max_joint_states:
        model.load_state_dict(torch.load(run_dir / "best.pt", map_location="cpu")["model"])
        for split in ("valid", "test"):
            result[f"{split}_ppl"] = evaluate(model, sentences[split], objective="marginal")["ppl"]
    cached.write_text(json.dumps(result))
    return result


def checks(rows: list[dict]) -> list[tuple[str, bool, str]]:
    """The orderings the recipe expects, evaluated on the measured validation perplexities."""
    found = []
    dense = sorted(
        (r for r in rows if r["kind"] == "hmm" and not r["model"]["transition_rank"]),
        key=lambda r: r["model"]["num_states"],
    )
    if len(dense) >= 2:
        ppls = [r["valid_ppl"] for r in dense]
        found.append(
            (
                "HMM perplexity falls as K grows",
                all(a > b for a, b in zip(ppls, ppls[1:])),
                ", ".join(f"K={r['model']['num_states']}: {r['valid_ppl']:.1f}" for r in dense),
            )
        )
    for low in (r for r in rows if r["kind"] == "hmm" and r["model"]["transition_rank"]):
        twin = [r for r in dense if r["model"]["num_states"] == low["model"]["num_states"]]
        if twin:
            gap = low["valid_ppl"] / twin[0]["valid_ppl"] - 1
            faster = low["tokens_per_s"] / twin[0]["tokens_per_s"]
            found.append(
                (
                    f"low rank ({low['name']}) within 5% of dense and faster",
                    gap <= 0.05 and faster > 1,
                    f"perplexity {100 * gap:+.1f}%, speed x{faster:.2f}",
                )
            )
    for mf in (r for r in rows if r["objective"] == "elbo" and math.isfinite(r["test_ppl"])):
        found.append(
            (
                f"mean-field bound of {mf['name']} above its exact perplexity",
                mf["test_ppl_bound"] >= mf["test_ppl"],
                f"test: bound {mf['test_ppl_bound']:.2f}, exact {mf['test_ppl']:.2f}",
            )
        )
    softmax = {
        r["model"]["softmax_input_size"]: r for r in rows if r["kind"] == "lstm" and r["model"]["output"] == "softmax"
    }
    for mos in (r for r in rows if r["kind"] == "lstm" and r["model"]["output"] == "mos"):
        d = mos["model"]["softmax_input_size"]
        if d in softmax:
            found.append(
                (
                    f"MoS beats one softmax at d={d}",
                    mos["valid_ppl"] < softmax[d]["valid_ppl"],
                    f"{mos['valid_ppl']:.1f} vs {softmax[d]['valid_ppl']:.1f}",
                )
            )
    return found


@torch.no_grad()
def plot_hmm_states(
    model: HMMLanguageModel, vocab, stream: BPTTStream, out: Path, name: str, num_states: int = 16, num_words: int = 8
) -> None:
    """The most used states (posterior mass on a validation stretch), their top words and transitions."""
    model.eval()
    model.reset_state()
    batch = next(iter(stream.iterate(0)))
    usage = model.posterior(batch).marginals.sum((0, 1))
    states = usage.topk(min(num_states, model.num_states)).indices
    params = model.log_parameters()
    top = params["emission"][states].topk(num_words, -1)
    words = [
        [(vocab.itos[w], math.exp(p)) for w, p in zip(ids, logp)]
        for ids, logp in zip(top.indices.tolist(), top.values.tolist())
    ]
    trans = model.transition(params).dense()[states][:, states].exp()
    plots.hmm_states(
        states.tolist(),
        words,
        trans,
        out / "hmm_states.png",
        title=f"{name}: top words of the {len(states)} most used states",
    )


BATCHING = {"stream": "stream (carried)", "sentences": "sentences"}
OBJECTIVES = {"marginal": "exact marginal", "elbo": "mean-field bound"}


def _states(row: dict) -> str:
    if row["kind"] == "fhmm":
        return f"{row['model']['num_states']}^{row['model']['num_chains']} = {row['states']:,}"
    return f"{row['states']:,}" if row["states"] else "-"


def _perplexity(row: dict, split: str) -> str:
    """A table cell: the exact perplexity; for a mean-field row also (or only) its bound."""
    exact = row[f"{split}_ppl"]
    if row["objective"] != "elbo":
        return f"{exact:.2f}"
    bound = row[f"{split}_ppl_bound"]
    return f"{exact:.2f} (bound {bound:.2f})" if math.isfinite(exact) else f"<= {bound:.2f}"


def write_results(rows: list[dict], preset: str, data_note: str, out: Path) -> None:
    lines = [
        f"# PTB language models: preset `{preset}`",
        "",
        f"Data: {data_note}. Perplexity = exp(total NLL / target tokens), `<eos>` counted; "
        "models evaluated by their exact marginal likelihood on the full split (a mean-field row by its "
        "bound, and exactly where its joint states fit).",
        "",
        "## Measured",
        "",
        "| model | states (K^L) | batches | trained on | valid PPL | test PPL | parameters | train tokens | "
        "train tokens/s | wall time (s) |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        valid, test = (_perplexity(r, split) for split in ("valid", "test"))
        lines.append(
            f"| {r['name']} | {_states(r)} | {BATCHING[r['batching']]} | {OBJECTIVES[r['objective']]} | {valid} | "
            f"{test} | {r['parameters']:,} | {r['train_tokens']:,} | {r['tokens_per_s']:.0f} | {r['wall_time']:.0f} |"
        )
    lines += [
        "",
        "## Published (full training, for comparison)",
        "",
        "| model | valid PPL | test PPL | source |",
        "|---|---:|---:|---|",
    ]
    for name, valid, test, source in PUBLISHED:
        lines.append(
            f"| {name} | {valid if valid is not None else '-'} | {test if test is not None else '-'} | {source} |"
        )
    if any(r["kind"] == "fhmm" for r in rows):
        lines.append(f"| Factorial HMM | - | - | {PUBLISHED_FACTORIAL} |")
    lines += ["", "## Checks", "", "| expectation | result | measured |", "|---|---|---|"]
    for name, passed, detail in checks(rows):
        lines.append(f"| {name} | {'pass' if passed else 'FAIL'} | {detail} |")
    if any(r["kind"] == "fhmm" for r in rows):
        lines += [
            "",
            "Factorial HMMs (`fhmm-LxK`: L chains of K states, categorical emissions with additive logits "
            "`b + sum_l W_l[z^l]`) are listed beside the HMM of as many states as their K^L joint states. "
            "`FactorialHMM` carries no state along a BPTT stream, so they are trained and evaluated on "
            "sentence batches (each sentence and its `<eos>`, at most as many padded tokens as a stream "
            "batch, from the chains' initial distributions), while the HMM and LSTM rows read the stream "
            "and carry their state across sentences: the perplexities cover the same tokens but are not "
            "the same task for the first word of a sentence. A mean-field row (`-mf`) is trained on the "
            "structured mean-field bound: `<= x` is its bound (an upper bound on its perplexity); where "
            "its joint states fit, the exact perplexity of the same model is given, its bound in brackets.",
        ]
    if preset != "full":
        lines += [
            "",
            "The measured models are far smaller and trained on a fraction of the published "
            "budget (see train tokens), so their perplexities are not comparable with the "
            "published ones; the checks compare models of this run with each other at equal "
            "token budgets.",
        ]
    lines += [
        "",
        "Plots: `curves.png` (training loss, validation perplexity); `hmm_states.png` "
        "(top words and transitions of the most used states of the largest dense HMM).",
        "",
    ]
    (out / "results.md").write_text("\n".join(lines))


# ---- main ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--model", action="append", help="run only these models (repeatable); default all")
    parser.add_argument("--data", help="folder with ptb.{train,valid,test}.txt (else $LATENTNLP_DATA, hub)")
    parser.add_argument("--out", help="output folder (default runs/ptb-<preset>)")
    TrainConfig.add_arguments(parser)
    args = parser.parse_args(argv)

    preset = PRESETS[args.preset]
    out = Path(args.out or f"runs/ptb-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    seed = args.seed if args.seed is not None else 0
    torch.manual_seed(seed)
    if args.preset == "smoke":
        data_dir = generate_corpus(out / "data", seed)
        data_note = f"{data_dir} (text sampled from a random 6-state HMM)"
    else:
        data_dir = args.data
    corpus = read_ptb(data_dir)
    if args.preset != "smoke":
        data_note = f"Penn Treebank (Mikolov), from {corpus.source.describe()}"
    vocab = corpus.vocabulary()
    splits = ("train", "valid", "test")
    data = {
        "stream": {
            split: BPTTStream.from_sentences(getattr(corpus, split), vocab, preset.batch_size, preset.bptt)
            for split in splits
        }
    }
    if any(r.batching == "sentences" for r in preset.runs):
        data["sentences"] = {
            split: sentence_batches(
                getattr(corpus, split), vocab, preset.batch_size * preset.bptt, split == "train", seed
            )
            for split in splits
        }
    runs = [r for r in preset.runs if not args.model or r.name in args.model]
    if not runs:
        parser.error(f"--model must name runs of preset {args.preset}: {[r.name for r in preset.runs]}")
    (out / "config.json").write_text(
        json.dumps(
            {
                "preset": args.preset,
                "seed": seed,
                "vocab_size": len(vocab),
                "batch_size": preset.batch_size,
                "bptt": preset.bptt,
                "runs": [r.__dict__ for r in runs],
            },
            indent=2,
        )
    )
    for run in runs:
        run_dir = out / run.name
        config = replace(TrainConfig(**{**preset.train, **run.train}), seed=seed, output_dir=str(run_dir))
        config = config.with_arguments(args)
        start = time.time()
        if (run_dir / "finished.json").exists() and not config.overwrite:
            print(f"[{run.name}] finished run found in {run_dir}: reusing it (--overwrite to retrain)")
            continue
        (run_dir / EXACT_FILE).unlink(missing_ok=True)  # the exact evaluation of a model trained before
        model = build_model(run, len(vocab))
        print(f"[{run.name}] training {sum(p.numel() for p in model.parameters()):,} parameters on {run.batching}")
        splits_of_run = data[run.batching]
        summary = Trainer(
            model,
            config,
            splits_of_run["train"],
            splits_of_run["valid"],
            splits_of_run["test"],
            run_info={"recipe": "ptb", "preset": args.preset, "run": run.__dict__},
        ).fit()
        quantity = "ppl_bound" if run.mean_field else "ppl"
        print(
            f"[{run.name}] valid {quantity} {summary['valid'][quantity]:.2f}, "
            f"test {quantity} {summary['test'][quantity]:.2f} ({time.time() - start:.0f}s)"
        )
    # the report covers every finished run of the preset in this folder, so a preset can be run in parts
    rows = []
    for run in preset.runs:
        finished = out / run.name / "finished.json"
        if not finished.exists():
            continue
        summary = json.loads(finished.read_text())
        row = {
            "name": run.name,
            "kind": run.kind,
            "model": run.model,
            "states": run.states,
            "batching": run.batching,
            "objective": "elbo" if run.mean_field else "marginal",
            "dir": str(out / run.name),
            "valid_ppl": summary["best_valid_ppl"],
            "test_ppl": summary["test"]["ppl"] if not run.mean_field else math.nan,
            "parameters": sum(p.numel() for p in build_model(run, len(vocab)).parameters()),
            "train_tokens": train_tokens(data[run.batching]["train"], summary["steps"]),
            "tokens_per_s": training_speed(out / run.name),
            "wall_time": summary["wall_time"],
            "steps": summary["steps"],
            "skipped": summary["skipped"],
        }
        if run.mean_field:
            row["valid_ppl_bound"], row["test_ppl_bound"] = summary["valid"]["ppl_bound"], summary["test"]["ppl_bound"]
            row.update(exact_evaluation(run, out / run.name, len(vocab), data["sentences"]))
        rows.append(row)
    with open(out / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    plots.training_curves({row["name"]: row["dir"] for row in rows}, out / "curves.png")
    reported = {row["name"] for row in rows}
    dense_hmms = [r for r in preset.runs if r.kind == "hmm" and not r.model["transition_rank"] and r.name in reported]
    largest = max(dense_hmms, key=lambda r: r.model["num_states"]) if dense_hmms else None
    if largest is not None and not (out / largest.name / "best.pt").exists():
        # a folder of committed results keeps no checkpoints: its states plot stays as it was drawn
        print(f"[{largest.name}] no best.pt in {out / largest.name}: the states plot is not redrawn")
    elif largest is not None:
        model = build_model(largest, len(vocab))
        model.load_state_dict(torch.load(out / largest.name / "best.pt", map_location="cpu")["model"])
        plot_hmm_states(model, vocab, data["stream"]["valid"], out, largest.name)
    write_results(rows, args.preset, data_note, out)
    print((out / "results.md").read_text())
    return rows


if __name__ == "__main__":
    main()
