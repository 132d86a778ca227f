r"""The feature-rich HMM of Berg-Kirkpatrick et al. (2010): log-linear emissions over word features.

An HMM over ``K`` states and the ``V`` words of a vocabulary whose emissions are log-linear in
sparse word features :math:`f(x) \in \{0, 1\}^F` (:func:`word_features`):

.. math::
    p(x, z) = \pi_{z_0} \prod_{1 \le t < L} A_{z_{t-1} z_t} \prod_{t < L} p(x_t | z_t), \qquad
    p(x | z = k) = \frac{\exp(w_k \cdot f(x))}{\sum_{x'} \exp(w_k \cdot f(x'))}

with ``pi = softmax(init_logits)`` ``[K]``, ``A = softmax(trans_logits)`` row-wise ``[K, K]``
(row = from, column = to) and one weight vector per state, ``emission_weights [K, F]``.  With the
identity feature alone the model is the plain categorical HMM; suffix, shape, digit and hyphen
features let words that look alike share probability mass within a state.

``log p(x)`` is exact: :class:`~latentnlp.structures.ChainPosterior` sums the paths.  Two ways to
train it:

* **the gradient of the exact marginal** (``loss(batch, "marginal")`` through any optimiser or the
  library's trainer);
* **EM with a gradient M-step** (:meth:`FeatureHMM.em_step`): the E-step's expected counts are
  those of Baum-Welch (:func:`latentnlp.baum_welch.e_step`: ``ChainPosterior`` marginals and the
  gradient w.r.t. the shared log transition); the M-step is closed form for ``pi`` and ``A``
  (normalised counts, optional Dirichlet pseudo-counts) and, for the emissions, maximises the
  expected emission log-likelihood

  .. math:: Q(w) = \sum_k \sum_x c(k, x) \log p(x | z = k; w) - \frac{\lambda}{2} \lVert w \rVert^2

  (concave in ``w``; ``l2`` :math:`= \lambda \ge 0`, a Gaussian prior on the weights, as in the
  paper) by L-BFGS with a strong-Wolfe line search from the current weights.  The line search
  never lowers ``Q``, and the step keeps the old weights should the result be lower, so each step
  is a generalised EM step: the log posterior of the M-step's priors,
  ``log p(x) + smoothing (sum log pi + sum log A) - l2 / 2 ||w||^2`` (``log p(x)`` when both are
  zero), never decreases, however few L-BFGS iterations are taken.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import baum_welch
from ..masks import lengths_to_mask
from ..structures import ChainPosterior
from ..validation import is_validating
from .base import Batch, LatentModel, check_language_model_values, language_model_targets

FEATURE_KINDS = ("identity", "suffix", "shape", "digit", "hyphen")


def word_shape(word: str) -> str:
    """The capitalisation pattern of ``word``: each uppercase letter ``X``, lowercase letter ``x``,
    digit ``d``, any other character itself, runs of one symbol collapsed to one
    (``"McDonald's" -> "XxXx'x"``, ``"1990s" -> "dx"``, ``"U.S." -> "X.X."``)."""
    out: list[str] = []
    for ch in word:
        symbol = "X" if ch.isupper() else "x" if ch.islower() else "d" if ch.isdigit() else ch
        if not out or out[-1] != symbol:
            out.append(symbol)
    return "".join(out)


def features_of(
    word: str, kinds: Sequence[str] = FEATURE_KINDS, suffix_lengths: Sequence[int] = (1, 2, 3)
) -> list[str]:
    """The names of the features that fire on ``word`` (each of value one), in this order:

    * ``"identity"``: ``"word=<word>"``;
    * ``"suffix"``: ``"suffix=<s>"`` for the last ``n`` characters, each ``n`` of
      ``suffix_lengths`` shorter than the word (a word is not its own suffix);
    * ``"shape"``: ``"shape=<word_shape(word)>"``;
    * ``"digit"``: ``"has-digit"`` if a character is a digit;
    * ``"hyphen"``: ``"has-hyphen"`` if a character is ``-``.

    A vocabulary's special token, written ``<...>`` (``<unk>``, ``<eos>``), gets its identity
    feature only.
    """
    unknown = set(kinds) - set(FEATURE_KINDS)
    if unknown:
        raise ValueError(f"kinds must be drawn from {FEATURE_KINDS}, got {sorted(unknown)}")
    out = [f"word={word}"] if "identity" in kinds else []
    if len(word) > 2 and word.startswith("<") and word.endswith(">"):
        return out
    if "suffix" in kinds:
        out += [f"suffix={word[-n:]}" for n in suffix_lengths if n < len(word)]
    if "shape" in kinds:
        out.append(f"shape={word_shape(word)}")
    if "digit" in kinds and any(ch.isdigit() for ch in word):
        out.append("has-digit")
    if "hyphen" in kinds and "-" in word:
        out.append("has-hyphen")
    return out


class WordFeatures(NamedTuple):
    """The feature matrix of a vocabulary (:func:`word_features`).

    Attributes:
        names: ``F`` feature names, in order of first appearance over the vocabulary.
        matrix: sparse COO ``[V, F]`` float32, ``matrix[v, f] = 1`` iff feature ``f`` fires on word ``v``.
    """

    names: list[str]
    matrix: Tensor


def word_features(
    words: Sequence[str], kinds: Sequence[str] = FEATURE_KINDS, suffix_lengths: Sequence[int] = (1, 2, 3)
) -> WordFeatures:
    """The sparse binary features ``f(x)`` of every word of a vocabulary: row ``v`` holds
    :func:`features_of(words[v], kinds, suffix_lengths) <features_of>`.  Every feature that
    fires on some word is kept; every word must have at least one (``ValueError`` otherwise)."""
    if not words:
        raise ValueError("words must hold at least one word, got an empty vocabulary")
    index: dict[str, int] = {}
    rows, cols = [], []
    for v, word in enumerate(words):
        fired = features_of(word, kinds, suffix_lengths)
        if not fired:
            raise ValueError(f"word {v} ({word!r}) has no feature of kinds {tuple(kinds)}")
        for name in fired:
            rows.append(v)
            cols.append(index.setdefault(name, len(index)))
    matrix = torch.sparse_coo_tensor(
        torch.tensor([rows, cols]), torch.ones(len(rows)), (len(words), len(index)), check_invariants=True
    ).coalesce()
    return WordFeatures(list(index), matrix)


class EMStep(NamedTuple):
    """What :meth:`FeatureHMM.em_step` returns (float64 scalars).

    Attributes:
        log_likelihood: ``sum log p(x)`` of the data under the parameters *before* the step (the E-step's).
        emission_objective: ``(Q before, Q after)`` of the M-step (the penalty included), per expected token.
        lbfgs_evaluations: evaluations of ``Q`` the L-BFGS M-step took.
    """

    log_likelihood: float
    emission_objective: tuple[float, float]
    lbfgs_evaluations: int


class FeatureHMM(LatentModel):
    """HMM with log-linear emissions over word features; exact marginal, gradient or EM training.

    Args:
        words: the vocabulary, ``V`` strings; word ``v`` is id ``v``.
        num_states: ``K``.
        kinds: the feature kinds of :func:`features_of` (default all).
        suffix_lengths: the suffix lengths of the ``"suffix"`` kind.
        init_scale: standard deviation of the normal draws that initialise every logit and weight.

    Batches: ``targets [B, T]`` word ids, ``lengths [B]`` in ``1..T`` (``inputs`` is ignored).
    The feature matrix is rebuilt from ``words`` (it is not in the state dict).
    """

    objectives = ("marginal",)

    def __init__(
        self,
        words: Sequence[str],
        num_states: int,
        kinds: Sequence[str] = FEATURE_KINDS,
        suffix_lengths: Sequence[int] = (1, 2, 3),
        init_scale: float = 0.5,
    ):
        super().__init__()
        if num_states < 1:
            raise ValueError(f"num_states must be >= 1, got {num_states}")
        features = word_features(words, kinds, suffix_lengths)
        self.words, self.feature_names = list(words), features.names
        self.vocab_size, self.num_states = len(self.words), num_states
        rows, cols = features.matrix.indices()
        # emission scores by embedding_bag: word v sums the weights of its features cols[offsets[v]:offsets[v+1]]
        self.register_buffer("feature_index", cols.clone(), persistent=False)
        counts = torch.bincount(rows, minlength=self.vocab_size)
        self.register_buffer("feature_offsets", torch.cumsum(counts, 0) - counts, persistent=False)
        self.init_logits = nn.Parameter(init_scale * torch.randn(num_states))
        self.trans_logits = nn.Parameter(init_scale * torch.randn(num_states, num_states))
        self.emission_weights = nn.Parameter(init_scale * torch.randn(num_states, len(features.names)))

    # ---- parameters -------------------------------------------------------------------------
    def _emission_log_probs(self, weights: Tensor) -> Tensor:
        """``log p(x = v | z = k) = log_softmax_v(w_k . f(v))`` for weights ``[K, F]``: ``[K, V]``."""
        scores = F.embedding_bag(self.feature_index, weights.t(), self.feature_offsets, mode="sum")  # [V, K]
        return torch.log_softmax(scores.t(), -1)

    def log_parameters(self) -> dict[str, Tensor]:
        """Log initial ``init [K]``, transition ``trans [K, K]`` and emission ``emission [K, V]`` probabilities."""
        return {
            "init": torch.log_softmax(self.init_logits, -1),
            "trans": torch.log_softmax(self.trans_logits, -1),
            "emission": self._emission_log_probs(self.emission_weights),
        }

    def hmm_parameters(self) -> baum_welch.HMMParameters:
        """The model's probabilities as :class:`~latentnlp.baum_welch.HMMParameters` (detached)."""
        params = self.log_parameters()
        return baum_welch.HMMParameters(*(params[name].detach().exp() for name in ("init", "trans", "emission")))

    # ---- the LatentModel contract -----------------------------------------------------------
    def _validate(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """``(targets [B, T], lengths [B])`` with padding set to id 0; shapes always checked, and
        when validating lengths in ``1..T`` and ids in ``0..V-1``."""
        targets, lengths = language_model_targets(batch)
        lengths = lengths.to(targets.device, torch.long)
        steps = targets.shape[1]
        targets = targets.masked_fill(~lengths_to_mask(lengths, steps), 0)
        if is_validating():
            check_language_model_values(targets, lengths, self.vocab_size)
        return targets, lengths

    def posterior(self, batch: Batch) -> ChainPosterior:
        """The exact posterior over state sequences ``p(z | x)``."""
        targets, lengths = self._validate(batch)
        params = self.log_parameters()
        emit = params["emission"].t()[targets]  # [B, T, K]
        return ChainPosterior(params["init"], params["trans"], emit, lengths, validate_args=False)

    def log_marginal(self, batch: Batch) -> Tensor:
        """Exact ``log p(x)`` of each row's targets: ``[B]``."""
        return self.posterior(batch).log_partition

    @torch.no_grad()
    def generate(self, batch: Batch | None = None, *, num_samples: int = 1, length: int = 20, generator=None) -> Tensor:
        """Ancestral samples ``x ~ p(x)``: ``[num_samples, length]`` word ids."""
        params = {name: p.exp() for name, p in self.log_parameters().items()}
        state = torch.multinomial(params["init"].expand(num_samples, -1), 1, generator=generator).squeeze(-1)
        words = []
        for _ in range(length):
            words.append(torch.multinomial(params["emission"][state], 1, generator=generator).squeeze(-1))
            state = torch.multinomial(params["trans"][state], 1, generator=generator).squeeze(-1)
        return torch.stack(words, -1)

    @torch.no_grad()
    def top_words(self, num_words: int = 10) -> list[list[str]]:
        """The ``num_words`` most probable words of each state: ``K`` lists of strings."""
        ids = self.log_parameters()["emission"].topk(min(num_words, self.vocab_size), -1).indices
        return [[self.words[i] for i in row] for row in ids.tolist()]

    # ---- EM with a gradient M-step ----------------------------------------------------------
    def expected_counts(self, batch: Batch) -> baum_welch.ExpectedCounts:
        """The E-step: expected initial ``[K]``, transition ``[K, K]`` and emission ``[K, V]``
        counts and ``log p(x)`` summed over the batch, under the current parameters (float64),
        by :func:`latentnlp.baum_welch.e_step`."""
        targets, lengths = self._validate(batch)
        params = baum_welch.HMMParameters(*(p.double() for p in self.hmm_parameters()))
        return baum_welch.e_step(params, targets, lengths, validate_args=False)

    @torch.no_grad()
    def m_step(
        self,
        counts: baum_welch.ExpectedCounts,
        *,
        smoothing: float = 0.0,
        l2: float = 0.0,
        max_iterations: int = 20,
        tolerance: float = 1e-9,
    ) -> tuple[tuple[float, float], int]:
        """The M-step from ``counts``: closed form for ``pi`` and ``A`` (normalised ``counts +
        smoothing``; the logits become their logs), then L-BFGS (strong-Wolfe line search, at most
        ``max_iterations`` iterations, stopping once the gradient's largest entry or a step falls
        below ``tolerance``) on ``-Q(w) / sum c``: the expected emission log-likelihood less the
        penalty ``l2 / 2 ||w||^2``, per token.

        Returns ``((Q before, Q after) per token, evaluations)``; the old weights are kept if L-BFGS
        ends lower (it does not with exact arithmetic)."""
        if smoothing < 0 or l2 < 0:
            raise ValueError(f"smoothing and l2 must be >= 0, got {smoothing} and {l2}")
        k, v = self.num_states, self.vocab_size
        if counts.init.shape != (k,) or counts.trans.shape != (k, k) or counts.emission.shape != (k, v):
            raise ValueError(
                f"counts must have init [K], trans [K, K], emission [K, V] with K = {k}, V = {v}, got "
                f"{list(counts.init.shape)}, {list(counts.trans.shape)}, {list(counts.emission.shape)}"
            )
        for logits, table in ((self.init_logits, counts.init), (self.trans_logits, counts.trans)):
            table = table + smoothing
            total = table.sum(-1, keepdim=True)
            # a row with nothing to normalise (a state never visited) becomes uniform, as in Baum-Welch
            probs = torch.where(total > 0, table / total.clamp_min(torch.finfo(table.dtype).tiny), 1.0 / k)
            logits.copy_(probs.clamp_min(torch.finfo(probs.dtype).tiny).log())

        weights = self.emission_weights
        emission_counts = counts.emission.to(weights.dtype)
        total = emission_counts.sum().clamp_min(torch.finfo(weights.dtype).tiny)
        w = weights.detach().clone().requires_grad_()
        evaluations = 0

        def negative_q() -> Tensor:
            nonlocal evaluations
            evaluations += 1
            return (0.5 * l2 * w.pow(2).sum() - (emission_counts * self._emission_log_probs(w)).sum()) / total

        before = float(negative_q())
        optimiser = torch.optim.LBFGS(
            [w],
            lr=1.0,
            max_iter=max_iterations,
            tolerance_grad=tolerance,
            tolerance_change=tolerance,
            history_size=5,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            optimiser.zero_grad()
            with torch.enable_grad():
                value = negative_q()
                value.backward()
            return value

        optimiser.step(closure)
        after = float(negative_q())
        if after <= before:
            weights.copy_(w.detach())
        else:
            after = before
        return (-before, -after), evaluations

    def em_step(
        self,
        batches: Batch | Iterable[Batch],
        *,
        smoothing: float = 0.0,
        l2: float = 0.0,
        max_iterations: int = 20,
        tolerance: float = 1e-9,
    ) -> EMStep:
        """One EM update on a batch or an iterable of batches: :meth:`expected_counts` summed over
        them, then :meth:`m_step` (its arguments).  Returns :class:`EMStep`."""
        if isinstance(batches, Mapping):
            batches = [batches]
        total = None
        for batch in batches:
            counts = self.expected_counts(batch)
            total = counts if total is None else total + counts
        if total is None:
            raise ValueError("batches must hold at least one batch, got none")
        objective, evaluations = self.m_step(
            total, smoothing=smoothing, l2=l2, max_iterations=max_iterations, tolerance=tolerance
        )
        return EMStep(float(total.log_likelihood), objective, evaluations)
