"""HMMs on a PTB slice: Baum-Welch (EM) against hmmlearn's EM and against the gradient of the exact marginal.

For each number of states ``K``, on the first sentences of PTB's training text (each with its
``<eos>``):

- **Baum-Welch**, :func:`latentnlp.baum_welch.fit`, from random starting parameters, with
  Dirichlet pseudo-counts on every row (MAP; a held-out word unseen in the slice needs them);
- **hmmlearn**, ``CategoricalHMM`` from the same start with the same priors (``1 + c``) and the same
  number of iterations: its log-likelihood trajectory must equal Baum-Welch's;
- **gradient**, :class:`latentnlp.models.HMMLanguageModel` (the neural parameterisation of
  Chiu & Rush 2020, dense transitions) trained by Adam on the exact marginal through the library's
  trainer;
- **feature-rich HMM** (Berg-Kirkpatrick et al. 2010), :class:`latentnlp.models.FeatureHMM` with
  every feature kind (identity, suffixes of 1-3 characters, shape, digit, hyphen), of the same
  ``K``: by EM with an L-BFGS emission M-step (:meth:`~latentnlp.models.FeatureHMM.em_step`, the
  same number of iterations as Baum-Welch, an L2 penalty on the weights, the transitions smoothed
  as Baum-Welch's), and by Adam on the exact marginal through the trainer.  The markdown lists
  the top words of the most occupied states of the largest ``K``, beside Baum-Welch's.

Held-out perplexity ``exp(-sum log p(x) / tokens)`` (``<eos>`` counted) on the first PTB
validation sentences, by the exact marginal of each, and the seconds each took.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from inference_tables import TableResult
from latentnlp import baum_welch
from latentnlp.data import SentenceBatches, read_ptb
from latentnlp.models import FeatureHMM, HMMLanguageModel, LatentModel
from latentnlp.training import TrainConfig, Trainer, evaluate, load_model

TITLE = "HMMs on a PTB slice: Baum-Welch, hmmlearn, the gradient of the exact marginal, and the feature-rich HMM"
NAME = "hmm"


@dataclass(frozen=True)
class Setting:
    states: tuple[int, ...]
    train_sentences: int
    valid_sentences: int
    max_words: int  # sentences of fewer words only
    em_iterations: int
    smoothing: float
    grad_steps: int
    grad_batch: int
    grad_embedding: int
    grad_lr: float
    feature_lbfgs: int  # L-BFGS iterations of each feature-HMM M-step
    feature_l2: float  # the M-step's penalty l2 / 2 ||w||^2
    feature_lr: float  # Adam's rate for the feature HMM on the exact marginal


PRESETS = {
    "smoke": Setting((4, 8), 200, 50, 12, 5, 0.1, 30, 20, 16, 0.02, 10, 1.0, 0.1),
    "cpu": Setting((32, 64, 128), 2000, 500, 30, 20, 0.1, 400, 32, 64, 0.01, 10, 1.0, 0.05),
    "full": Setting((32, 64, 128), 20000, 3370, 50, 50, 0.1, 4000, 64, 128, 0.003, 30, 1.0, 0.02),
}


def _pad(lines: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    words = torch.zeros(len(lines), max(map(len, lines)), dtype=torch.long)
    for i, ids in enumerate(lines):
        words[i, : len(ids)] = torch.tensor(ids)
    return words, torch.tensor([len(ids) for ids in lines])


def generated_text(setting: Setting, seed: int):
    """Sentences from a random 6-state HMM over 30 words (the smoke data): ``(train, valid, words, note)``.

    Word ``29`` (``"<eos>"``) is the end of sentence, the others are written ``w0`` .. ``w28``;
    sentences are cut at ``max_words``."""
    g = torch.Generator().manual_seed(seed)
    true = baum_welch.random_parameters(6, 30, generator=g)
    emission = true.emission_probs.clone()
    emission[:, 29] = 0.0
    emission[0, 29] = 1.0  # state 0 ends the sentence
    emission = emission / emission.sum(-1, keepdim=True)

    def sentence() -> list[int]:
        z = int(torch.multinomial(true.init_probs, 1, generator=g))
        out = []
        while len(out) < setting.max_words - 1:
            out.append(int(torch.multinomial(emission[z], 1, generator=g)))
            if out[-1] == 29:
                return out
            z = int(torch.multinomial(true.trans_probs[z], 1, generator=g))
        return [*out, 29]

    train = [sentence() for _ in range(setting.train_sentences)]
    valid = [sentence() for _ in range(setting.valid_sentences)]
    words = [f"w{i}" for i in range(29)] + ["<eos>"]
    return train, valid, words, "generated: sentences from a random 6-state HMM over 30 words (word 29 ends them)"


def ptb_text(setting: Setting, data_dir: Path):
    """The first PTB train / valid sentences of fewer than ``max_words`` words, as ids with ``<eos>``:
    ``(train, valid, words, note)``, ``words`` the vocabulary's strings."""
    corpus = read_ptb(data_dir, use_hub=False)
    vocab = corpus.vocabulary()
    train = [vocab.encode(s, add_eos=True) for s in corpus.train if len(s) < setting.max_words]
    valid = [vocab.encode(s, add_eos=True) for s in corpus.valid if len(s) < setting.max_words]
    train, valid = train[: setting.train_sentences], valid[: setting.valid_sentences]
    note = (
        f"`{corpus.source.describe()}`: the first {len(train)} training and {len(valid)} validation sentences of "
        f"fewer than {setting.max_words} words, with <eos> ({sum(map(len, train))} and {sum(map(len, valid))} "
        f"tokens), PTB's {len(vocab)}-word vocabulary"
    )
    return train, valid, list(vocab.itos), note


def held_out_log_likelihood(params: baum_welch.HMMParameters, words, lengths) -> float:
    return float(baum_welch.e_step(params, words, lengths, validate_args=False).log_likelihood)


def run_baum_welch(start, words, lengths, setting: Setting):
    tic = time.perf_counter()
    result = baum_welch.fit(
        start, words, lengths, setting.em_iterations, tol=-math.inf, smoothing=setting.smoothing, validate_args=False
    )
    return result, time.perf_counter() - tic


def run_hmmlearn(start, words, lengths, setting: Setting):
    from hmmlearn.hmm import CategoricalHMM

    logging.getLogger("hmmlearn").setLevel(logging.ERROR)
    k, v = start.emission_probs.shape
    c = 1.0 + setting.smoothing
    model = CategoricalHMM(
        n_components=k,
        n_features=v,
        init_params="",
        params="ste",
        n_iter=setting.em_iterations,
        tol=-np.inf,
        startprob_prior=c,
        transmat_prior=c,
        emissionprob_prior=c,
        implementation="scaling",
    )
    model.startprob_, model.transmat_, model.emissionprob_ = (p.numpy().copy() for p in start)
    x = np.concatenate([words[i, :n].numpy() for i, n in enumerate(lengths.tolist())])[:, None]
    tic = time.perf_counter()
    model.fit(x, lengths.numpy())
    seconds = time.perf_counter() - tic
    params = baum_welch.HMMParameters(
        *(
            torch.from_numpy(np.asarray(p, dtype=np.float64))
            for p in (model.startprob_, model.transmat_, model.emissionprob_)
        )
    )
    return params, np.asarray(model.monitor_.history, dtype=np.float64), seconds


def run_gradient(
    make_model: Callable[[], LatentModel], lr: float, train, valid, setting: Setting, out: Path, seed: int
):
    """``make_model()`` (under ``seed``) trained by Adam at ``lr`` on the exact marginal:
    ``(model, valid_data, seconds)`` (a finished run reused)."""
    data = SentenceBatches(
        [s[:-1] for s in train], bos_id=0, eos_id=train[0][-1], batch_size=setting.grad_batch, shuffle=True, seed=seed
    )
    valid_data = SentenceBatches([s[:-1] for s in valid], bos_id=0, eos_id=train[0][-1], batch_size=256)
    if (out / "finished.json").exists():
        print(f"[{out.name}] finished run found: reusing it")
        return load_model(out / "last.pt"), valid_data, json.loads((out / "finished.json").read_text())["wall_time"]
    torch.manual_seed(seed)
    model = make_model()
    config = TrainConfig(
        lr=lr,
        max_epochs=10**6,
        max_steps=setting.grad_steps,
        eval_every=max(1, setting.grad_steps // 4),
        log_every=max(1, setting.grad_steps // 4),
        seed=seed,
        output_dir=str(out),
        progress=False,
        device="cpu",
        restore_best=False,  # the validation text is the held-out text of the table: no selection on it
    )
    summary = Trainer(model, config, data, valid_data).fit()
    return model, valid_data, summary["wall_time"]


def run_feature_em(words: list[str], k: int, train_batch: dict, setting: Setting, seed: int):
    """:class:`FeatureHMM` (float64) trained by ``em_iterations`` EM steps with an L-BFGS emission
    M-step: ``(model, log posterior at each E-step [I], seconds)``, the log posterior that of the
    M-step's priors: ``log p(x) + smoothing (sum log pi + sum log A) - l2 / 2 ||w||^2``."""
    torch.manual_seed(seed + k)
    model = FeatureHMM(words, k).double()
    trajectory = []
    tic = time.perf_counter()
    for _ in range(setting.em_iterations):
        prior = baum_welch.log_prior(
            model.hmm_parameters(), baum_welch.DirichletSmoothing(setting.smoothing, setting.smoothing, 0.0)
        )
        prior = float(prior) - 0.5 * setting.feature_l2 * float(model.emission_weights.detach().pow(2).sum())
        step = model.em_step(
            train_batch, smoothing=setting.smoothing, l2=setting.feature_l2, max_iterations=setting.feature_lbfgs
        )
        trajectory.append(step.log_likelihood + prior)
    return model, np.asarray(trajectory), time.perf_counter() - tic


def state_words(occupancy: torch.Tensor, top: list[list[str]], states: int) -> list[str]:
    """Markdown lines: the ``states`` most occupied states (by expected count) and their top words."""
    order = occupancy.argsort(descending=True)[:states].tolist()
    return [f"- state {z} ({float(occupancy[z]):.0f} tokens): {' '.join(top[z])}" for z in order]


def run(preset: str, out: Path, data_dir: Path | None, seed: int) -> TableResult:
    setting = PRESETS[preset]
    if preset == "smoke":
        train, valid, vocabulary, note = generated_text(setting, seed)
    else:
        if data_dir is None:
            raise ValueError(f"the {preset} preset reads $LATENTNLP_DATA/ptb: set LATENTNLP_DATA")
        train, valid, vocabulary, note = ptb_text(setting, data_dir)
    vocab_size = len(vocabulary)
    words, lengths = _pad(train)
    train_batch = {"targets": words, "lengths": lengths}
    valid_words, valid_lengths = _pad(valid)
    valid_tokens = int(valid_lengths.sum())
    metrics, checks = [], []
    lines = [
        "| K | method | held-out perplexity | training log-likelihood / token (last E-step or evaluation) "
        "| iterations or updates | seconds |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for k in setting.states:
        start = baum_welch.random_parameters(
            k, vocab_size, generator=torch.Generator().manual_seed(seed + k), dtype=torch.float64
        )
        ours, ours_s = run_baum_welch(start, words, lengths, setting)
        theirs, history, theirs_s = run_hmmlearn(start, words, lengths, setting)
        model, valid_data, grad_s = run_gradient(
            lambda: HMMLanguageModel(vocab_size, k, embedding_size=setting.grad_embedding),
            setting.grad_lr,
            train,
            valid,
            setting,
            out / NAME / f"gradient-{k}",
            seed,
        )
        train_data = SentenceBatches([s[:-1] for s in train], bos_id=0, eos_id=train[0][-1], batch_size=256)
        grad_eval = evaluate(model, valid_data, objective="marginal")
        grad_train = evaluate(model, train_data, objective="marginal")
        feature_em, feature_trajectory, feature_em_s = run_feature_em(vocabulary, k, train_batch, setting, seed)
        feature_grad, _, feature_grad_s = run_gradient(
            lambda: FeatureHMM(vocabulary, k),
            setting.feature_lr,
            train,
            valid,
            setting,
            out / NAME / f"feature-gradient-{k}",
            seed,
        )
        feature_grad_eval = evaluate(feature_grad, valid_data, objective="marginal")
        feature_grad_train = evaluate(feature_grad, train_data, objective="marginal")
        with torch.no_grad():
            feature_em_held = float(feature_em.log_marginal({"targets": valid_words, "lengths": valid_lengths}).sum())
            feature_em_train = float(feature_em.log_marginal(train_batch).sum())
        tokens = int(lengths.sum())
        rows = [
            (
                "Baum-Welch (latentnlp)",
                held_out_log_likelihood(ours.params, valid_words, valid_lengths),
                float(ours.log_likelihood[-1]) / tokens,
                setting.em_iterations,
                ours_s,
            ),
            (
                "EM (hmmlearn CategoricalHMM)",
                held_out_log_likelihood(theirs, valid_words, valid_lengths),
                float(history[-1]) / tokens,
                setting.em_iterations,
                theirs_s,
            ),
            (
                "gradient of the exact marginal (HMMLanguageModel, Adam)",
                -grad_eval["nll"] * valid_tokens,
                -grad_train["nll"],
                setting.grad_steps,
                grad_s,
            ),
            (
                "feature-rich HMM, EM with an L-BFGS M-step (FeatureHMM)",
                feature_em_held,
                feature_em_train / tokens,
                setting.em_iterations,
                feature_em_s,
            ),
            (
                "feature-rich HMM, gradient of the exact marginal (FeatureHMM, Adam)",
                -feature_grad_eval["nll"] * valid_tokens,
                -feature_grad_train["nll"],
                setting.grad_steps,
                feature_grad_s,
            ),
        ]
        for method, held, train_ll, steps, seconds in rows:
            ppl = math.exp(-held / valid_tokens)
            lines.append(f"| {k} | {method} | {ppl:.1f} | {train_ll:.4f} | {steps} | {seconds:.1f} |")
            metrics.append(
                {
                    "table": NAME,
                    "K": k,
                    "method": method,
                    "held_out_ppl": ppl,
                    "train_log_likelihood_per_token": train_ll,
                    "steps": steps,
                    "seconds": seconds,
                }
            )
        gap = float(np.max(np.abs(ours.log_likelihood.numpy() - history) / np.abs(history)))
        checks.append(
            (
                f"K = {k}: Baum-Welch's log-likelihood trajectory equals hmmlearn's",
                gap < 1e-6,
                f"largest relative difference {gap:.1e} over {len(history)} iterations",
            )
        )
        monotone = bool(
            (ours.log_posterior[1:] >= ours.log_posterior[:-1] - 1e-8 * ours.log_posterior[:-1].abs()).all()
        )
        checks.append(
            (
                f"K = {k}: EM never lowers the log posterior",
                monotone,
                f"{float(ours.log_posterior[0]):.1f} -> {float(ours.log_posterior[-1]):.1f}",
            )
        )
        if k == max(setting.states):  # the words of the states: the largest K, feature-rich beside plain
            plain_top = ours.params.emission_probs.topk(8, -1).indices.tolist()
            plain_occupancy = baum_welch.e_step(ours.params, words, lengths, validate_args=False).emission.sum(-1)
            with torch.no_grad():
                feature_occupancy = feature_em.expected_counts(train_batch).emission.sum(-1)
            state_lines = [
                f"The words of the states (K = {k}): the eight most probable words of the six states with the "
                "largest expected training counts.",
                "Feature-rich HMM (EM):\n\n" + "\n".join(state_words(feature_occupancy, feature_em.top_words(8), 6)),
                "Baum-Welch:\n\n"
                + "\n".join(state_words(plain_occupancy, [[vocabulary[i] for i in r] for r in plain_top], 6)),
            ]
        feature_monotone = bool(
            (feature_trajectory[1:] >= feature_trajectory[:-1] - 1e-8 * np.abs(feature_trajectory[:-1])).all()
        )
        checks.append(
            (
                f"K = {k}: feature-rich HMM EM never lowers the log posterior",
                feature_monotone,
                f"{feature_trajectory[0]:.1f} -> {feature_trajectory[-1]:.1f}",
            )
        )
        checks.append(
            (
                f"K = {k}: Baum-Welch faster than hmmlearn",
                ours_s < theirs_s,
                f"{ours_s:.2f} s vs {theirs_s:.2f} s ({theirs_s / ours_s:.1f}x)",
            )
        )
    markdown = "\n\n".join(
        [
            f"Data: {note}.  EM: {setting.em_iterations} iterations from random starting parameters (every row a "
            f"flat-Dirichlet draw, the same for both EM implementations), Dirichlet pseudo-count {setting.smoothing} "
            f"on every row; gradient: {setting.grad_steps} Adam updates (lr {setting.grad_lr}) on batches of "
            f"{setting.grad_batch} sentences, embeddings of size {setting.grad_embedding}, the last "
            "parameters kept (no selection on the held-out text).  Feature-rich HMM (identity, suffixes of 1-3 "
            "characters, shape, digit and hyphen features; its own random start): EM with "
            f"{setting.feature_lbfgs} L-BFGS iterations a M-step, penalty {setting.feature_l2} / 2 ||w||^2, the "
            f"transitions' pseudo-count {setting.smoothing}; gradient: {setting.grad_steps} Adam updates "
            f"(lr {setting.feature_lr}), no penalty.  Perplexity by the exact marginal, float64 for EM, <eos> "
            "counted.",
            "\n".join(lines),
            "No published number exists for these slices.  Seconds: the whole fit (EM: all iterations; gradient: "
            "the trainer's wall time, its validations included), on a machine shared with other work: compare "
            "within a row of K.  The EM rows maximise the training log posterior; the gradient row's neural "
            "parameterisation shares statistics across states and words, so its training likelihood and held-out "
            "perplexity are those of a different model family of the same K.  The feature-rich rows' training "
            "column is the log-likelihood of the final parameters (the penalty not subtracted).",
            *state_lines,
        ]
    )
    return TableResult(
        markdown=markdown, checks=checks, figures=[], metrics=metrics, config={"setting": asdict(setting), "data": note}
    )
