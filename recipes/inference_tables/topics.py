"""Topic models: the neural topic model (AVI) against scikit-learn's online LDA, side by side, on Yahoo bags of words.

The tutorial's topic-model table (Kim, Wiseman & Rush 2018, citing Srivastava & Sutton 2017)
compares LDA fitted by online variational Bayes (Hoffman et al. 2010) with LDA fitted by
autoencoding variational inference (AVI-LDA: an amortised logistic-normal posterior, trained by
the reparameterised ELBO) on 20 Newsgroups.  Here the ordering is measured on Yahoo Answers
(``$LATENTNLP_DATA/yahoo``): train on ``yahoo.valid.txt`` minus a held-out part (model
selection), test on ``yahoo.test.txt``, with the same topic counts for both models.

Documents are bags over the ``V`` most frequent words (by document frequency in the training
documents) that are words (a letter, then letters, digits or hyphens) and not English stop words
(scikit-learn's list) or ``_UNK``; other tokens are dropped, as is a document left empty.
``smoke`` samples documents from a random LDA.

Numbers, per model and ``K``:

- held-out perplexity ``exp(-bound / words)`` on test, each model by its own per-document
  variational bound: :class:`~latentnlp.models.NeuralTopicModel` by its ELBO (20 samples; topics
  are point estimates, the posterior over ``theta`` amortised), with its IWAE bound (100 samples)
  beside it; online LDA by scikit-learn's ELBO with each test document's topic proportions fitted
  by its E-step and its topics' KL ``sum_k KL(Dir(lambda_k) || Dir(eta))`` taken out (a
  whole-model term, not a per-document one; with ``E_q[log beta]`` in place of a point estimate the
  bound stays conservative for LDA), and ``LatentDirichletAllocation.perplexity`` itself (the KL
  included) beside it;
- NPMI coherence of each topic's 10 most probable words, from document co-occurrence in the
  training documents (a pair never seen together scores -1), averaged over topics;
- training time (seconds, wall clock, one thread);

and, for reference, the exact test perplexity of the add-one smoothed unigram of the training words.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from inference_tables import TableResult
from latentnlp.data import read_yahoo
from latentnlp.data.batching import epoch_generator
from latentnlp.data.corpora import MissingSplitWarning
from latentnlp.models import NeuralTopicModel
from latentnlp.training import TrainConfig, Trainer, evaluate, load_model, read_metrics
from latentnlp.training.run_log import series

TITLE = "Topic models: neural topic model (AVI-LDA) vs online LDA (scikit-learn) on Yahoo bags of words"

PUBLISHED = [
    ("OnlineLDA (online variational Bayes)", 1015),
    ("AVI-LDA (autoencoding variational inference)", 830),
]
PUBLISHED_SOURCE = "20 Newsgroups; Srivastava & Sutton (2017) as cited by Kim, Wiseman & Rush (2018)"

PRESETS = {
    "smoke": {"topics": (5,), "vocab": 60, "heldout": 100, "epochs": 10, "lda_iter": 5},
    "cpu": {"topics": (20, 50), "vocab": 2000, "heldout": 1000, "epochs": 60, "lda_iter": 20},
    "full": {
        "topics": (20, 50, 100),
        "vocab": 5000,
        "heldout": 1000,
        "epochs": 300,
        "lda_iter": 100,
        "test_docs": None,
    },
}
BATCH_SIZE = 200
#: a vocabulary word: a letter, then letters, digits or hyphens (no punctuation, no clitics such as 's, n't)
WORD = re.compile(r"[a-z][a-z0-9-]*")
TOP_WORDS = 10


class DocumentBatches:
    """``{"targets": [B, T], "lengths": [B]}`` batches of documents in a seeded order per epoch."""

    def __init__(self, docs: Sequence[Sequence[int]], batch_size: int, *, shuffle: bool, seed: int) -> None:
        self.docs, self.batch_size, self.shuffle, self.seed = [list(d) for d in docs], batch_size, shuffle, seed

    def __len__(self) -> int:
        return math.ceil(len(self.docs) / self.batch_size)

    def iterate(self, epoch: int = 0, start: int = 0) -> Iterator[dict]:
        n = len(self.docs)
        order = torch.randperm(n, generator=epoch_generator(self.seed, epoch)) if self.shuffle else torch.arange(n)
        for i in range(start, len(self)):
            rows = [self.docs[j] for j in order[i * self.batch_size : (i + 1) * self.batch_size].tolist()]
            width = max(len(r) for r in rows)
            yield {
                "targets": torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long),
                "lengths": torch.tensor([len(r) for r in rows], dtype=torch.long),
            }

    def __iter__(self) -> Iterator[dict]:
        return self.iterate(0)


def topic_vocabulary(docs: Sequence[Sequence[str]], size: int, unk: str = "_UNK") -> list[str]:
    """The ``size`` words of highest document frequency that are words (:data:`WORD`, two letters or
    more) and neither stop words nor ``unk``."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    frequency = Counter(w for doc in docs for w in set(doc))
    keep = [
        w
        for w, _ in sorted(frequency.items(), key=lambda item: (-item[1], item[0]))
        if w != unk and w not in ENGLISH_STOP_WORDS and WORD.fullmatch(w) and len(w) > 1
    ]
    return keep[:size]


def to_ids(docs: Sequence[Sequence[str]], words: Sequence[str]) -> list[list[int]]:
    index = {w: i for i, w in enumerate(words)}
    out = [[index[w] for w in doc if w in index] for doc in docs]
    return [d for d in out if d]


def generated_corpus(seed: int, vocab: int = 60, topics: int = 5, docs: int = 700) -> tuple[list[list[int]], ...]:
    """Documents of 20-60 words from a random LDA (``Dir(0.1)`` topics, ``Dir(0.3)`` proportions):
    train, held-out and test id lists."""
    g = torch.Generator().manual_seed(seed)
    beta = torch.distributions.Dirichlet(torch.full((vocab,), 0.1)).sample((topics,))
    torch.manual_seed(seed)
    theta = torch.distributions.Dirichlet(torch.full((topics,), 0.3)).sample((docs,))
    out = []
    for d in range(docs):
        n = int(torch.randint(20, 61, (), generator=g))
        y = torch.multinomial(theta[d], n, replacement=True, generator=g)
        out.append(torch.multinomial(beta[y], 1, generator=g).squeeze(-1).tolist())
    return out[:500], out[500:600], out[600:]


def count_matrix(docs: Sequence[Sequence[int]], vocab: int):
    from scipy.sparse import csr_matrix

    rows = np.repeat(np.arange(len(docs)), [len(d) for d in docs])
    cols = np.concatenate([np.asarray(d) for d in docs])
    return csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(docs), vocab))


def npmi(top: Sequence[Sequence[int]], counts) -> float:
    """Mean over topics of the mean NPMI of pairs of top words (document co-occurrence in ``counts``)."""
    present = (counts > 0).astype(np.float64).tocsc()
    n = present.shape[0]
    scores = []
    for words in top:
        cols = present[:, list(words)]
        joint = (cols.T @ cols).toarray() / n  # [W, W]
        single = np.diag(joint)
        for i in range(len(words)):
            for j in range(i + 1, len(words)):
                if joint[i, j] == 0:
                    scores.append(-1.0)
                elif joint[i, j] == 1:
                    scores.append(1.0)
                else:
                    pmi = math.log(joint[i, j] / (single[i] * single[j]))
                    scores.append(pmi / -math.log(joint[i, j]))
    return float(np.mean(scores))


def topics_kl(lda) -> float:
    """``sum_k KL(Dir(lambda_k) || Dir(eta))`` of a fitted ``LatentDirichletAllocation``: the term of its
    bound (``score``, ``perplexity``) that belongs to the topics, not to the documents."""
    lam = torch.as_tensor(lda.components_, dtype=torch.float64)
    prior = torch.distributions.Dirichlet(torch.full_like(lam, lda.topic_word_prior_))
    return float(torch.distributions.kl_divergence(torch.distributions.Dirichlet(lam), prior).sum())


def unigram_perplexity(train, test) -> float:
    """Exact test perplexity of the add-one smoothed unigram of the training counts (a reference)."""
    p = (np.asarray(train.sum(0)).ravel() + 1) / (train.sum() + train.shape[1])
    test_counts = np.asarray(test.sum(0)).ravel()
    return math.exp(-float(test_counts @ np.log(p)) / float(test_counts.sum()))


def plot_ntm_curves(runs: dict[str, pathlib.Path], path: pathlib.Path) -> None:
    """Training -ELBO per word and held-out perplexity bound against the update, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        events = read_metrics(run_dir)
        axes[0].plot(*zip(*series(events, "train", "log", "loss")), label=label)
        axes[1].plot(*zip(*series(events, "valid", "eval", "ppl_bound")), marker="o", markersize=3, label=label)
    axes[0].set(xlabel="update", ylabel="-ELBO per word", title="training")
    axes[1].set(xlabel="update", ylabel="perplexity bound", title="held-out exp(-ELBO / words)", yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _train_ntm(k, vocab, data, out, preset, seed, settings):
    run_dir = out / "topics" / f"ntm-{k}"
    config = TrainConfig(
        objective="elbo",
        lr=1e-2,
        max_epochs=settings["epochs"],
        log_every=10 if preset == "smoke" else 50,
        seed=seed,
        progress=False,
        output_dir=str(run_dir),
    )
    if (run_dir / "finished.json").exists():
        return load_model(run_dir), json.loads((run_dir / "finished.json").read_text())
    torch.manual_seed(seed)
    model = NeuralTopicModel(vocab, k)
    summary = Trainer(model, config, data["train"], data["heldout"], run_info={"table": "topics"}).fit()
    return model, summary


def run(preset: str, out: pathlib.Path, data_dir: pathlib.Path | None, seed: int) -> TableResult:
    from sklearn.decomposition import LatentDirichletAllocation

    settings = PRESETS[preset]
    if preset == "smoke":
        train, heldout, test = generated_corpus(seed, vocab=settings["vocab"])
        vocab_words = [f"w{i}" for i in range(settings["vocab"])]
        data_note = f"documents sampled from a random LDA over {settings['vocab']} words"
    else:
        with warnings.catch_warnings():  # the shared copy has no yahoo.train.txt: valid is the training text here
            warnings.simplefilter("ignore", MissingSplitWarning)
            corpus = read_yahoo(data_dir)
        docs = list(corpus.valid)
        order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
        held = set(order[: settings["heldout"]])
        train_words = [docs[i] for i in range(len(docs)) if i not in held]
        vocab_words = topic_vocabulary(train_words, settings["vocab"])
        train = to_ids(train_words, vocab_words)
        heldout = to_ids([docs[i] for i in sorted(held)], vocab_words)
        test = to_ids(list(corpus.test), vocab_words)
        data_note = (
            "$LATENTNLP_DATA/yahoo: train = yahoo.valid.txt minus "
            f"{settings['heldout']} held-out documents (model selection), test = yahoo.test.txt; "
            f"the {len(vocab_words)} most frequent non-stop-words"
        )
    v = len(vocab_words)
    data = {
        "train": DocumentBatches(train, BATCH_SIZE, shuffle=True, seed=seed),
        "heldout": DocumentBatches(heldout, BATCH_SIZE, shuffle=False, seed=seed),
        "test": DocumentBatches(test, BATCH_SIZE, shuffle=False, seed=seed),
    }
    x_train, x_test = count_matrix(train, v), count_matrix(test, v)
    test_words = int(x_test.sum())
    rows = []
    torch.set_num_threads(1)
    for k in settings["topics"]:
        model, summary = _train_ntm(k, v, data, out, preset, seed, settings)
        elbo = evaluate(model, data["test"], objective="elbo", num_samples=20, seed=seed)
        iwae = evaluate(model, data["test"], objective="iwae", num_samples=100, chunk_size=10, seed=seed)
        rows.append(
            {
                "table": "topics",
                "model": "neural topic model (AVI-LDA)",
                "topics": k,
                "test_ppl_bound": elbo["ppl_bound"],
                "test_ppl_iwae100": iwae["ppl"],
                "test_ppl_sklearn": None,
                "bound": "ELBO (20 samples); IWAE-100 beside it",
                "npmi": npmi(model.top_words(TOP_WORDS), x_train),
                "train_seconds": summary["wall_time"],
                "updates": summary["steps"],
                "top_words": [[vocab_words[i] for i in t] for t in model.top_words(TOP_WORDS)],
            }
        )
        lda = LatentDirichletAllocation(
            n_components=k,
            learning_method="online",
            batch_size=BATCH_SIZE,
            max_iter=settings["lda_iter"],
            random_state=seed,
            n_jobs=1,
        )
        start = time.time()
        lda.fit(x_train)
        lda_time = time.time() - start
        lda_top = np.argsort(-lda.components_, axis=1)[:, :TOP_WORDS].tolist()
        sklearn_ppl = float(lda.perplexity(x_test))
        documents_bound = -math.log(sklearn_ppl) * test_words + topics_kl(lda)
        rows.append(
            {
                "table": "topics",
                "model": "online LDA (scikit-learn)",
                "topics": k,
                "test_ppl_bound": math.exp(-documents_bound / test_words),
                "test_ppl_iwae100": None,
                "test_ppl_sklearn": sklearn_ppl,
                "bound": "scikit-learn's ELBO (E-step on each test document), the topics' KL taken out",
                "npmi": npmi(lda_top, x_train),
                "train_seconds": lda_time,
                "updates": lda.n_iter_ * math.ceil(len(train) / BATCH_SIZE),
                "top_words": [[vocab_words[i] for i in t] for t in lda_top],
            }
        )
    figure = "topics_curves.png"
    plot_ntm_curves({f"ntm-{k}": out / "topics" / f"ntm-{k}" for k in settings["topics"]}, out / figure)
    unigram = unigram_perplexity(x_train, x_test)
    random_top = torch.randint(0, v, (20, TOP_WORDS), generator=torch.Generator().manual_seed(seed)).tolist()
    random_npmi = npmi(random_top, x_train)
    pairs = [(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]
    checks = [
        (
            f"K={ntm['topics']}: the neural topic model's held-out perplexity bound is below online LDA's "
            "(the published ordering)",
            ntm["test_ppl_bound"] < lda["test_ppl_bound"],
            f"{ntm['test_ppl_bound']:.0f} vs {lda['test_ppl_bound']:.0f}",
        )
        for ntm, lda in pairs
    ]
    checks.append(
        (
            "every model's topics are more coherent than random word sets",
            all(r["npmi"] > random_npmi for r in rows),
            f"random {random_npmi:.3f}; lowest model {min(r['npmi'] for r in rows):.3f}",
        )
    )
    checks.append(
        (
            "every model's perplexity bound is below the add-one unigram's exact perplexity",
            all(r["test_ppl_bound"] < unigram for r in rows),
            ", ".join(f"{r['model'].split()[0]}-{r['topics']} {r['test_ppl_bound']:.0f}" for r in rows)
            + f" vs unigram {unigram:.0f}",
        )
    )
    checks.append(
        (
            "every perplexity bound is below the uniform distribution's",
            all(r["test_ppl_bound"] < v for r in rows),
            f"V = {v}; highest {max(r['test_ppl_bound'] for r in rows):.0f}",
        )
    )
    lines = [
        f"Data: {data_note}; {len(train)} train / {len(heldout)} held-out / {len(test)} test documents, "
        f"{test_words} test words. Both models see the same bags of words and the same K.",
        "",
        "| model | K | test perplexity (per-document bound) | NTM IWAE-100 | scikit-learn perplexity "
        "(topics' KL included) | NPMI (top 10, train docs) | train time (s) | updates |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        iw = "" if r["test_ppl_iwae100"] is None else f"{r['test_ppl_iwae100']:.0f}"
        sk = "" if r["test_ppl_sklearn"] is None else f"{r['test_ppl_sklearn']:.0f}"
        lines.append(
            f"| {r['model']} | {r['topics']} | {r['test_ppl_bound']:.0f} | {iw} | {sk} | {r['npmi']:.3f} "
            f"| {r['train_seconds']:.0f} | {r['updates']} |"
        )
    lines += [
        f"| unigram, add-one smoothed (reference, exact) | | {unigram:.0f} | | | | | |",
        "",
        f"Published (perplexity; {PUBLISHED_SOURCE}; a different corpus, so only the ordering compares):",
        "",
        "| model | published perplexity |",
        "|---|---:|",
        *[f"| {name} | {value} |" for name, value in PUBLISHED],
        "",
        "Bounds: the neural topic model's perplexity is exp(-ELBO/words) with its amortised q (20 samples), "
        "its topics point estimates; online LDA's is scikit-learn's ELBO with each test document's "
        "proportions fitted by its E-step, less the KL of its Dirichlet posterior over the topics (a "
        "whole-model term, which scikit-learn's `perplexity` includes: the next column). "
        "Train time: the neural topic model's includes its validation passes; one thread each. "
        f"NPMI of random 10-word sets: {random_npmi:.3f}. A bound above the unigram's exact perplexity "
        "says that model's bound (or its fit, in the passes it was given) is loose on these short "
        "documents; the ordering of the two bounds is then not the ordering of the two models' likelihoods.",
        "",
        "Top words of the first three topics of each model at the largest K:",
        "",
    ]
    largest = max(settings["topics"])
    for r in rows:
        if r["topics"] == largest:
            for t in r["top_words"][:3]:
                lines.append(f"- {r['model']}: {' '.join(t)}")
    return TableResult(
        markdown="\n".join(lines),
        checks=checks,
        figures=[figure],
        metrics=[{k: v for k, v in r.items() if k != "top_words"} for r in rows]
        + [{"table": "topics", "model": "unigram (add-one smoothed)", "test_ppl": unigram}],
        config={"preset": preset, "seed": seed, "batch_size": BATCH_SIZE, "vocab_size": v, **settings},
    )
