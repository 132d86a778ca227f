r"""Hidden Markov language model with a neural parameterisation (Chiu & Rush 2020).

The model is a plain HMM over ``K`` states and a vocabulary of ``V`` words,

.. math:: p(x) = \sum_z p(z_0) \prod_{t \ge 1} p(z_t | z_{t-1}) \prod_t p(x_t | z_t),

whose parameters are *computed* from embeddings, so their number is
``O(d^2 + dK + dV)`` rather than ``O(K^2 + KV)``:

* ``p(z_t = j | z_{t-1} = i) = softmax_j(f(u_i) . v_j)`` (dense), or
  ``sum_c softmax_c(f(u_i) . r_c) softmax_j(f(r'_c) . v_j)`` (rank ``r``: ``r`` "pseudo-states"
  ``c`` between consecutive states, scored by the same MLP as the states; the chain then costs
  ``O(T K r)`` instead of ``O(T K^2)``),
* ``p(x_t = w | z_t = k) = softmax_w(g(u_k) . e_w)``,
* ``p(z_0 = k) = softmax_k(f(s) . v_k)``,

with ``f``, ``g`` residual MLPs.  ``log p(x)`` is exact: the model builds a
:class:`~latentnlp.transitions.DenseTransition` or
:class:`~latentnlp.transitions.LowRankTransition` and asks
:class:`~latentnlp.structures.ChainPosterior` (scaled forward algorithm, log space for the
rows where it underflows); the low-rank chain never builds a ``K x K`` matrix.
*State dropout* (training only) keeps a random subset of the states for each batch, which
both regularises and shrinks the dynamic program.

On a BPTT stream (``batch["stream"]``) the model carries the last filtering
distribution ``p(z_{L-1} | x_{<=L-1})`` into the next chunk, whose initial
distribution becomes ``p(z_L | x_{<=L-1}) = sum_i p(z_{L-1} = i | ...) p(z_L | z_{L-1} = i)``,
so the chunked log-likelihoods add up to the exact ``log p`` of the whole stream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..layers.checks import IGNORE_INDEX
from ..masks import lengths_to_mask
from ..structures import ChainPosterior
from ..transitions import DenseTransition, LowRankTransition, Transition
from ..validation import is_validating
from .base import Batch, LatentModel, check_language_model_values, language_model_targets
from .stream_state import CarriesStreamState


class ResidualMLP(nn.Module):
    """``y = x + W_2 relu(W_1 x)`` followed by layer norm: ``[..., d] -> [..., d]``."""

    def __init__(self, size: int, dropout: float = 0.0):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(size, size), nn.ReLU(), nn.Dropout(dropout), nn.Linear(size, size))
        self.norm = nn.LayerNorm(size)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.inner(x))


class HMMLanguageModel(CarriesStreamState, LatentModel):
    """Neural HMM language model with exact marginal likelihood.

    Args:
        vocab_size: ``V``.
        num_states: ``K``.
        embedding_size: ``d`` of the state, word and rank embeddings.
        transition_rank: ``None`` for a dense ``K x K`` transition, else the rank ``r``.
        state_dropout: fraction of states dropped for each training batch.
        dropout: dropout inside the MLPs.
        ignore_index: a target equal to it (within ``lengths``) is unobserved: its emission is
            summed out (``log p(x_t | z_t) = 0`` for every state) and it does not count as a token.

    Batches: ``targets [B, T]`` (the observed words), ``lengths [B]``; ``inputs`` is ignored.  An
    empty batch (``B = 0``) gives empty results.
    """

    objectives = ("marginal",)
    carried_names = ("filter", "states")

    def __init__(
        self,
        vocab_size: int,
        num_states: int,
        embedding_size: int = 256,
        transition_rank: int | None = None,
        state_dropout: float = 0.0,
        dropout: float = 0.0,
        ignore_index: int = IGNORE_INDEX,
    ):
        super().__init__()
        if num_states < 1 or vocab_size < 1:
            raise ValueError(f"num_states and vocab_size must be >= 1, got {num_states}, {vocab_size}")
        if not 0.0 <= state_dropout < 1.0:
            raise ValueError(f"state_dropout must lie in [0, 1), got {state_dropout}")
        if transition_rank is not None and transition_rank < 1:
            raise ValueError(f"transition_rank must be None or >= 1, got {transition_rank}")
        self.vocab_size, self.num_states = vocab_size, num_states
        self.ignore_index = ignore_index
        self.transition_rank, self.state_dropout = transition_rank, state_dropout
        scale = embedding_size**-0.5
        self.state_embedding = nn.Parameter(torch.randn(num_states, embedding_size) * scale)
        self.next_state_embedding = nn.Parameter(torch.randn(num_states, embedding_size) * scale)
        self.start_embedding = nn.Parameter(torch.randn(embedding_size) * scale)
        self.word_embedding = nn.Parameter(torch.randn(vocab_size, embedding_size) * scale)
        self.transition_mlp = ResidualMLP(embedding_size, dropout)
        self.emission_mlp = ResidualMLP(embedding_size, dropout)
        if transition_rank is not None:
            self.rank_in = nn.Parameter(torch.randn(transition_rank, embedding_size) * scale)
            self.rank_out = nn.Parameter(torch.randn(transition_rank, embedding_size) * scale)
        self.reset_state()

    # ---- parameters -------------------------------------------------------------------------
    def _kept_states(self) -> Tensor | None:
        if not self.training or self.state_dropout == 0.0:
            return None
        keep = max(1, round(self.num_states * (1.0 - self.state_dropout)))
        return torch.randperm(self.num_states, device=self.state_embedding.device)[:keep].sort().values

    def log_parameters(self, states: Tensor | None = None) -> dict[str, Tensor]:
        """Log initial ``[K']``, transition (``trans [K', K']`` or ``left [K', r]``, ``right [r, K']``)
        and emission ``[K', V]`` probabilities over the states ``states`` (default: all ``K``)."""
        state = self.state_embedding if states is None else self.state_embedding[states]
        following = self.next_state_embedding if states is None else self.next_state_embedding[states]
        params = {
            "init": torch.log_softmax(self.transition_mlp(self.start_embedding) @ following.T, -1),
            "emission": torch.log_softmax(self.emission_mlp(state) @ self.word_embedding.T, -1),
        }
        params.update(self._transition(states, states))
        return params

    def _transition(self, from_states: Tensor | None, to_states: Tensor | None) -> dict[str, Tensor]:
        """Log transition probabilities from ``from_states`` to ``to_states`` (renormalised over
        ``to_states``; ``None`` = all): ``{"trans": [K_from, K_to]}`` or, low rank,
        ``{"left": [K_from, r], "right": [r, K_to]}``."""
        state = self.state_embedding if from_states is None else self.state_embedding[from_states]
        following = self.next_state_embedding if to_states is None else self.next_state_embedding[to_states]
        source = self.transition_mlp(state)
        if self.transition_rank is None:
            return {"trans": torch.log_softmax(source @ following.T, -1)}
        return {
            "left": torch.log_softmax(source @ self.rank_in.T, -1),
            "right": torch.log_softmax(self.transition_mlp(self.rank_out) @ following.T, -1),
        }

    @staticmethod
    def transition(params: dict[str, Tensor]) -> Transition:
        """The transition object of :meth:`log_parameters` (or :meth:`_transition`) output:
        dense from ``"trans"``, low rank from ``"left"`` and ``"right"``."""
        if "trans" in params:
            return DenseTransition(params["trans"])
        return LowRankTransition(params["left"], params["right"])

    # ---- the LatentModel contract -----------------------------------------------------------
    def _emissions(self, params: dict[str, Tensor], targets: Tensor, ignored: Tensor) -> Tensor:
        """``emit[b, t, k] = log p(x_t = targets[b, t] | z_t = k)``: ``[B, T, K]``, 0 where ``ignored [B, T]``."""
        return params["emission"].T[targets].masked_fill(ignored[..., None], 0.0)

    def _validate(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(targets [B, T], lengths [B], ignored [B, T])`` on the targets' device, padding and
        ignored ids set to 0, ``ignored`` True where a real position holds ``ignore_index``.

        Shapes are always checked; when validating (:func:`latentnlp.validation.is_validating`)
        also, in one synchronisation, lengths in ``1..T`` and ids in ``0..V-1`` (or ``ignore_index``).
        """
        targets, lengths = language_model_targets(batch)
        steps = targets.shape[1]
        lengths = lengths.to(targets.device, torch.long)
        real = lengths_to_mask(lengths, steps)
        ignored = real & (targets == self.ignore_index)
        targets = targets.masked_fill(~real | ignored, 0)
        if is_validating():
            check_language_model_values(targets, lengths, self.vocab_size, f" or be ignore_index = {self.ignore_index}")
        return targets, lengths, ignored

    def num_tokens(self, batch: Batch) -> Tensor:
        """Target tokens of each row ``[B]``: positions within ``lengths`` not holding ``ignore_index``."""
        targets, lengths = batch["targets"], batch["lengths"]
        assert isinstance(targets, Tensor) and isinstance(lengths, Tensor)
        real = lengths_to_mask(lengths.to(targets.device, torch.long), targets.shape[1])
        return (real & (targets != self.ignore_index)).sum(-1)

    def _predict(self, log_filter: Tensor, transition: dict[str, Tensor]) -> Tensor:
        """``log sum_i p(z = i) p(z' = j | z = i)`` for a belief ``log_filter [B, K_from]`` and a
        transition of :meth:`_transition`: ``[B, K_to]``, the transition's log-space propagation
        (through the rank if low rank, ``O(B K r)``)."""
        return self.transition(transition).log_propagator()(log_filter, 1)

    def _initial(self, params: dict[str, Tensor], states: Tensor | None, batch_size: int, stream: bool) -> Tensor:
        """``log p(z_0)`` for each row ``[B, K']``: the learned start, or on a stream the carried
        belief pushed through one transition, ``log sum_i p(z_{L-1} = i | ...) p(z_0 = j | z_{L-1} = i)``
        (from the states kept before to those kept now, if state dropout changed them)."""
        carried, carried_states = self.carried["filter"], self.carried["states"]
        if not stream or carried is None:
            return params["init"].expand(batch_size, -1)
        if carried.shape[0] != batch_size:
            raise ValueError(
                f"HMMLanguageModel: the carried stream state has {carried.shape[0]} rows, the stream batch has "
                f"{batch_size}; call reset_state() between streams of different batch sizes"
            )
        log_filter = torch.log(carried.clamp_min(torch.finfo(carried.dtype).tiny))
        same_states = carried_states is None and states is None
        transition = params if same_states else self._transition(carried_states, states)
        return self._predict(log_filter, transition)

    def log_marginal(self, batch: Batch) -> Tensor:
        """Exact ``log p(x)`` of each row's targets (given the carried state on streams): ``[B]``."""
        targets, lengths, ignored = self._validate(batch)
        stream = bool(batch.get("stream", False))
        states = self._kept_states()
        params = self.log_parameters(states)
        init = self._initial(params, states, targets.shape[0], stream)
        if targets.shape[0] == 0:  # an empty batch: nothing to sum, still part of the graph
            return init[:, 0]
        # the batch was validated above; the chain's scores are this model's own log-softmaxes, so the
        # chain skips its own pass over them (a NaN parameter still gives a NaN log p(x), never a number)
        emissions = self._emissions(params, targets, ignored)
        posterior = ChainPosterior(init, self.transition(params), emissions, lengths, validate_args=False)
        if stream:
            self.carried = {"filter": posterior.final_filter, "states": states}
        return posterior.log_partition

    def posterior(self, batch: Batch) -> ChainPosterior:
        """The exact posterior over state sequences ``p(z | x)`` (all ``K`` states, no dropout)."""
        targets, lengths, ignored = self._validate(batch)
        params = self.log_parameters()
        emissions = self._emissions(params, targets, ignored)
        return ChainPosterior(params["init"], self.transition(params), emissions, lengths)

    @torch.no_grad()
    def generate(
        self,
        batch: Batch | None = None,
        *,
        num_samples: int = 1,
        length: int = 20,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Ancestral samples ``x ~ p(x)``: ``[num_samples, length]`` word ids.

        The next state is drawn through the transition (low rank: a pseudo-state ``c ~ U[z]``,
        then ``z' ~ V[c]``; no ``K x K`` matrix)."""
        params = self.log_parameters()
        transition = self.transition(params)
        emission = params["emission"].exp()
        state = torch.multinomial(params["init"].exp().expand(num_samples, -1), 1, generator=generator).squeeze(-1)
        words = []
        for _ in range(length):
            words.append(torch.multinomial(emission[state], 1, generator=generator).squeeze(-1))
            state = transition.sample_next(state, generator)
        return torch.stack(words, -1)

    @torch.no_grad()
    def top_words(self, num_words: int = 10) -> Tensor:
        """The ``num_words`` most probable words of each state: ``[K, num_words]`` ids."""
        return self.log_parameters()["emission"].topk(num_words, -1).indices
