"""Matplotlib figures: training curves, alignment heat maps and HMM state summaries.

Every function draws one figure, writes it to ``path`` (a PNG, or any format matplotlib infers
from the suffix) and closes it.  Figures are drawn with the non-interactive ``Agg`` backend,
selected on the first call, so they can be written on a machine without a display; matplotlib
is imported only then.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from latentnlp.training.run_log import read_metrics, series

__all__ = ["training_curves", "alignment_heatmaps", "hmm_states"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def training_curves(
    runs: Mapping[str, str | Path],
    path: str | Path,
    *,
    loss_label: str = "training NLL per token",
    loss_title: str = "training loss",
    ppl_title: str = "validation perplexity",
    dpi: int = 120,
) -> Path:
    """Training loss and validation perplexity against the update, one line per run.

    ``runs`` maps a legend label to a run directory; the curves are read from its run log
    (:mod:`latentnlp.training.run_log`): the ``loss`` of the training ``log`` events (left panel,
    labelled ``loss_label``, titled ``loss_title``) and the ``ppl`` of the validation ``eval``
    events (right panel, log scale, titled ``ppl_title``), both against ``step``.  A run without
    a log draws nothing; validation events without a ``ppl`` (an ELBO evaluation gives
    ``ppl_bound`` instead) draw no point.  Returns ``path``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, run_dir in runs.items():
        events = read_metrics(run_dir)
        train, valid = series(events, "train", "log", "loss"), series(events, "valid", "eval", "ppl")
        if train:
            axes[0].plot(*zip(*train), label=label)
        if valid:
            axes[1].plot(*zip(*valid), marker="o", label=label)
    axes[0].set(xlabel="update", ylabel=loss_label, title=loss_title)
    axes[1].set(xlabel="update", ylabel="perplexity", title=ppl_title, yscale="log")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def alignment_heatmaps(
    panels: Sequence[tuple[str, Tensor]],
    sources: Sequence[Sequence[str]],
    targets: Sequence[Sequence[str]],
    path: str | Path,
    *,
    title: str = "",
    dpi: int = 110,
) -> Path:
    """Alignment distributions as heat maps: a row of panels per sentence, a panel per distribution.

    ``panels`` are ``(title, probs)`` with ``probs[n, t, s]`` the probability that target
    position ``t`` of sentence ``n`` aligns to source position ``s`` (``[N, T, S]``, padding
    allowed); sentence ``n`` is drawn over its ``len(targets[n])`` x ``len(sources[n])`` block,
    rows labelled by the target tokens and columns by the source tokens, on a 0..1 colour scale.
    ``title`` heads the figure.  Returns ``path``.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(sources), len(panels), figsize=(4.2 * len(panels), 3.6 * len(sources)), squeeze=False)
    for row, (src, tgt) in enumerate(zip(sources, targets)):
        s, t = len(src), len(tgt)
        for col, (name, probs) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(probs[row, :t, :s].float().cpu(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
            ax.set_xticks(range(s), src, rotation=90, fontsize=7)
            ax.set_yticks(range(t), tgt, fontsize=7)
            if row == 0:
                ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def hmm_states(
    states: Sequence[int],
    top_words: Sequence[Sequence[tuple[str, float]]],
    transitions: Tensor,
    path: str | Path,
    *,
    title: str = "",
    dpi: int = 120,
) -> Path:
    """A few states of an HMM: each one's most probable words, and the transitions among them.

    ``states`` are the states' ids, ``top_words[i]`` the ``(word, probability)`` pairs of state
    ``states[i]`` (left panel, one line per state) and ``transitions[i, j]`` the probability of
    moving from ``states[i]`` to ``states[j]`` (right panel, a heat map, rows = from).  ``title``
    heads the left panel.  Returns ``path``.
    """
    plt = _pyplot()
    n = len(states)
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * n + 1.5), gridspec_kw={"width_ratios": [1.6, 1]})
    axes[0].axis("off")
    for row, (state, words) in enumerate(zip(states, top_words)):
        text = "  ".join(f"{word} ({p:.2f})" for word, p in words)
        axes[0].text(0, 1 - (row + 0.5) / n, f"state {state:>4}: {text}", fontsize=8, family="monospace", va="center")
    axes[0].set_title(title)
    image = axes[1].imshow(torch.as_tensor(transitions).float().cpu(), cmap="viridis")
    axes[1].set_xticks(range(n), list(states), rotation=90, fontsize=6)
    axes[1].set_yticks(range(n), list(states), fontsize=6)
    axes[1].set(title="p(next state | state) among them", xlabel="to", ylabel="from")
    fig.colorbar(image, ax=axes[1], fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)
