r"""Factorial hidden Markov model (Ghahramani & Jordan 1997): ``L`` chains of ``K`` states, one observation.

Chain ``l`` has its own initial distribution and transition (row = from, column = to), and
observation ``t`` depends on every chain's state through *additive* parameters
``eta(z_t) = b + sum_l W_l[z^l_t]`` (``W [L, K, D]``, ``b [D]``):

.. math:: p(x, z) = \prod_l \Big(p_l(z^l_0) \prod_{t \ge 1} p_l(z^l_t | z^l_{t-1})\Big) \prod_t p(x_t | \eta(z_t))

with three emissions:

* ``"bernoulli"``: ``x_t [D]`` in ``{0, 1}`` (multi-label, e.g. piano rolls),
  ``log p(x_t | z) = sum_d x_{t,d} log sigmoid(eta_d) + (1 - x_{t,d}) log sigmoid(-eta_d)``;
* ``"categorical"``: ``x_t`` one of ``D`` words, ``log p(x_t | z) = eta_{x_t} - log sum_v exp eta_v``;
* ``"gaussian"``: ``x_t [D]`` real, ``x_t ~ N(sum_l W_l[z^l_t], diag(sigma^2))`` (no bias: the means add).

``L = 1`` is a plain HMM.  Parameters are free tensors (``parameterization="direct"``) or
computed from state embeddings (``"neural"``: ``trans_l = softmax(f(u^l_i) . v^l_j)``,
``W_l[k] = g(u^l_k) . o`` with residual MLPs ``f``, ``g`` shared by the chains and an output
embedding ``o [D, d]``, as in :class:`~latentnlp.models.hmm_lm.HMMLanguageModel`).

Objectives: ``"marginal"``, the exact ``log p(x)`` by
:class:`~latentnlp.factorial.FactorialChainPosterior` (``O(T L K^(L+1))`` a sequence, the
``K^L`` joint emission scores built once a step: allowed while ``K^L <= max_joint_states``, else
:class:`~latentnlp.models.base.IntractableError`); and ``"elbo"``, the structured mean-field
bound of :func:`~latentnlp.factorial.structured_mean_field` (never builds anything of size
``K^L``), ``ELBO = E_q[log p(x | z)] - KL(q || p(z)) <= log p(x)``, where for the Bernoulli and
categorical emissions the reconstruction is itself a lower bound on ``E_q[log p(x | z)]``
(Jaakkola & Jordan's, resp. Jensen's).  Losses are per time step (the contract's per-token loss).

For the Gaussian emission :meth:`FactorialHMM.em_step` is one exact EM iteration (Ghahramani &
Jordan's closed-form M-step) for the direct parameterisation.

Batches: ``observations [B, T, D]`` (float; Bernoulli and Gaussian) or ``targets [B, T]``
(integer word ids; categorical), and ``lengths [B]``; positions at or past a length are
padding and never change a result.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..factorial import (
    BernoulliEmission,
    CategoricalEmission,
    FactorialChainPosterior,
    GaussianEmission,
    MeanField,
    structured_mean_field,
)
from ..masks import lengths_to_mask
from ..validation import describe, is_validating
from .base import ELBO, Batch, IntractableError, LatentModel
from .hmm_lm import ResidualMLP

EMISSIONS = ("bernoulli", "categorical", "gaussian")
PARAMETERIZATIONS = ("direct", "neural")


class FactorialHMM(LatentModel):
    """``L`` independent Markov chains of ``K`` states with additive emission parameters.

    Args:
        num_chains: ``L`` (``1``: a plain HMM).
        num_states: ``K``, the states of each chain.
        output_size: ``D``: keys of a piano roll, words of a vocabulary, dimensions of a vector.
        emission: ``"bernoulli"``, ``"categorical"`` or ``"gaussian"`` (see the module docstring).
        parameterization: ``"direct"`` (free logits, weights and biases) or ``"neural"`` (from
            state embeddings of size ``embedding_size``).
        embedding_size: ``d`` of the neural parameterisation.
        max_joint_states: the largest ``K^L`` for which :meth:`log_marginal` is computed exactly.
        mean_field_iterations, mean_field_tol: the sweeps of :func:`~latentnlp.factorial.structured_mean_field`.

    Shapes: :meth:`log_parameters` gives ``init [L, K]``, ``trans [L, K, K]`` (log
    probabilities), ``weights [L, K, D]`` and ``bias [D]`` (Bernoulli, categorical) or
    ``variance [D]`` (Gaussian).
    """

    objectives = ("marginal", "elbo")

    def __init__(
        self,
        num_chains: int,
        num_states: int,
        output_size: int,
        emission: str = "bernoulli",
        parameterization: str = "direct",
        embedding_size: int = 32,
        max_joint_states: int = 2**16,
        mean_field_iterations: int = 10,
        mean_field_tol: float | None = None,
    ):
        super().__init__()
        for name, value in (("num_chains", num_chains), ("num_states", num_states), ("output_size", output_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if emission not in EMISSIONS:
            raise ValueError(f"emission must be one of {EMISSIONS}, got {emission!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if not isinstance(max_joint_states, int) or max_joint_states < 1:
            raise ValueError(f"max_joint_states must be an integer >= 1, got {max_joint_states!r}")
        if not isinstance(mean_field_iterations, int) or mean_field_iterations < 1:
            raise ValueError(f"mean_field_iterations must be an integer >= 1, got {mean_field_iterations!r}")
        self.num_chains, self.num_states, self.output_size = num_chains, num_states, output_size
        self.emission, self.parameterization = emission, parameterization
        self.max_joint_states = max_joint_states
        self.mean_field_iterations, self.mean_field_tol = mean_field_iterations, mean_field_tol
        shape = (num_chains, num_states)
        if parameterization == "direct":
            self.init_logits = nn.Parameter(0.1 * torch.randn(shape))
            self.trans_logits = nn.Parameter(0.1 * torch.randn(*shape, num_states))
            self.weights = nn.Parameter(torch.randn(*shape, output_size) * (1.0 if emission == "gaussian" else 0.5))
        else:
            scale = embedding_size**-0.5
            self.state_embedding = nn.Parameter(torch.randn(*shape, embedding_size) * scale)
            self.next_state_embedding = nn.Parameter(torch.randn(*shape, embedding_size) * scale)
            self.start_embedding = nn.Parameter(torch.randn(num_chains, embedding_size) * scale)
            self.output_embedding = nn.Parameter(torch.randn(output_size, embedding_size) * scale)
            self.transition_mlp = ResidualMLP(embedding_size)
            self.emission_mlp = ResidualMLP(embedding_size)
        if emission == "gaussian":
            self.log_variance = nn.Parameter(torch.zeros(output_size))
        else:
            self.bias = nn.Parameter(torch.zeros(output_size))

    @property
    def joint_states(self) -> int:
        """``K^L``, the states of the equivalent plain HMM."""
        return self.num_states**self.num_chains

    # ---- parameters -------------------------------------------------------------------------
    def log_parameters(self) -> dict[str, Tensor]:
        """``init [L, K]`` and ``trans [L, K, K]`` (log probabilities, rows normalised), ``weights
        [L, K, D]``, and ``bias [D]`` or, Gaussian, ``variance [D]``."""
        if self.parameterization == "direct":
            init, trans, weights = self.init_logits, self.trans_logits, self.weights
        else:
            following = self.next_state_embedding  # [L, K, d]
            init = (self.transition_mlp(self.start_embedding).unsqueeze(1) * following).sum(-1)
            trans = self.transition_mlp(self.state_embedding) @ following.transpose(-1, -2)
            weights = self.emission_mlp(self.state_embedding) @ self.output_embedding.T
        params = {"init": init.log_softmax(-1), "trans": trans.log_softmax(-1), "weights": weights}
        if self.emission == "gaussian":
            params["variance"] = self.log_variance.exp()
        else:
            params["bias"] = self.bias
        return params

    def joint_means(self, params: dict[str, Tensor]) -> Tensor:
        r"""``eta(z) = bias + sum_l W_l[z^l]`` for every joint state, row-major: ``[K, ..., K, D]``
        (``L`` state axes; no bias for the Gaussian).  ``O(K^L D)`` memory."""
        weights = params["weights"]
        total = params.get("bias", weights.new_zeros(self.output_size))
        for ell in range(self.num_chains):
            shape = [1] * self.num_chains
            shape[ell] = self.num_states
            total = total + weights[ell].reshape(*shape, self.output_size)
        return total

    # ---- batches ----------------------------------------------------------------------------
    def _observed(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """``(x, lengths [B], mask [B, T])`` with padding of ``x`` set to 0.  ``x`` is
        ``observations [B, T, D]`` (Bernoulli, Gaussian) or ``targets [B, T]`` (categorical).

        Shapes are always checked; when validating also, in one synchronisation, lengths in
        ``1..T`` and the values at real positions (0/1, finite, or ids in ``0..D-1``).
        """
        name = "targets" if self.emission == "categorical" else "observations"
        if name not in batch or "lengths" not in batch:
            raise ValueError(f"a {self.emission} FactorialHMM batch needs {name!r} and 'lengths', got {sorted(batch)}")
        if batch.get("stream", False):
            raise ValueError(
                "FactorialHMM carries no state from one batch of a BPTT stream to the next, so a stream batch "
                "(batch['stream'] true) would restart every chunk from the initial distributions; give it "
                "whole sequences (e.g. latentnlp.data.SentenceBatches)"
            )
        x, lengths = batch[name], batch["lengths"]
        if self.emission == "categorical":
            if not isinstance(x, Tensor) or x.dim() != 2 or x.is_floating_point():
                raise ValueError(f"batch['targets'] must be an integer tensor of shape [B, T], got {describe(x)}")
        elif not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.output_size or not x.is_floating_point():
            raise ValueError(
                f"batch['observations'] must be a floating-point tensor of shape [B, T, D] with "
                f"D = output_size = {self.output_size}, got "
                + (f"{x.dtype} {describe(x)}" if isinstance(x, Tensor) else describe(x))
            )
        if not isinstance(lengths, Tensor) or lengths.shape != x.shape[:1] or lengths.is_floating_point():
            raise ValueError(
                f"batch['lengths'] must be an integer tensor of shape [B] = [{x.shape[0]}], got "
                + (f"{lengths.dtype} {describe(lengths)}" if isinstance(lengths, Tensor) else describe(lengths))
            )
        if x.shape[1] < 1:
            raise ValueError(f"batch[{name!r}] must have T >= 1 steps, got {describe(x)}")
        steps = x.shape[1]
        lengths = lengths.to(x.device, torch.long)
        mask = lengths_to_mask(lengths, steps)
        pad = ~mask if x.dim() == 2 else ~mask.unsqueeze(-1)
        x = x.masked_fill(pad, 0)
        if is_validating() and x.shape[0]:
            real = x[mask]
            if self.emission == "bernoulli":
                bad = ((real != 0) & (real != 1)).sum()
            elif self.emission == "gaussian":
                bad = (~torch.isfinite(real)).sum()
            else:
                bad = ((real < 0) | (real >= self.output_size)).sum()
            low, high, bad = torch.stack([lengths.min(), lengths.max(), bad]).tolist()
            if low < 1 or high > steps:
                raise ValueError(f"batch['lengths'] must lie in 1..T = 1..{steps}, got {low}..{high}")
            if bad:
                expected = {"bernoulli": "0 or 1", "gaussian": "finite", "categorical": f"in 0..{self.output_size - 1}"}
                raise ValueError(
                    f"batch[{name!r}] must be {expected[self.emission]} within the lengths; {bad} values are not"
                )
        return x, lengths, mask

    # ---- exact inference --------------------------------------------------------------------
    def _joint_emission(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """``emit[b, t, z^0, .., z^{L-1}] = log p(x_t | z)``: ``[B, T, K, ..., K]`` (``O(B T K^L D)`` work)."""
        eta = self.joint_means(params).reshape(self.joint_states, self.output_size)  # [S, D]
        if self.emission == "bernoulli":
            scores = x @ nn.functional.logsigmoid(eta).T + (1 - x) @ nn.functional.logsigmoid(-eta).T
        elif self.emission == "categorical":
            scores = eta.log_softmax(-1).T[x]
        else:
            precision = params["variance"].reciprocal()
            squares = (x.square() @ precision).unsqueeze(-1) - 2 * x @ (eta * precision).T + eta.square() @ precision
            scores = -0.5 * (torch.log(2 * math.pi * params["variance"]).sum() + squares)
        return scores.reshape(*x.shape[:2], *(self.num_states,) * self.num_chains)

    def _exact(self, batch: Batch) -> FactorialChainPosterior:
        if self.joint_states > self.max_joint_states:
            raise IntractableError(
                f"FactorialHMM: K^L = {self.num_states}^{self.num_chains} = {self.joint_states} joint states exceed "
                f"max_joint_states = {self.max_joint_states}; use objective='elbo' or raise max_joint_states"
            )
        x, lengths, _ = self._observed(batch)
        params = self.log_parameters()
        emit = self._joint_emission(params, x)
        # the batch was validated above and the scores are this model's own log-probabilities
        return FactorialChainPosterior(params["init"], params["trans"], emit, lengths, validate_args=False)

    def log_marginal(self, batch: Batch) -> Tensor:
        """Exact ``log p(x)`` of each sequence: ``[B]`` (:class:`IntractableError` if ``K^L > max_joint_states``)."""
        return self._exact(batch).log_partition

    def posterior(self, batch: Batch) -> FactorialChainPosterior:
        """The exact posterior ``p(z | x)`` over ``[B, T, L]`` state tuples (while ``K^L`` fits;
        beyond, :meth:`mean_field` gives the structured approximation)."""
        return self._exact(batch)

    # ---- structured mean field --------------------------------------------------------------
    def mean_field(self, batch: Batch) -> MeanField:
        """Structured mean field ``q(z) = prod_l q_l(z^l)`` for the batch (see
        :func:`~latentnlp.factorial.structured_mean_field`): bound ``[B]``, marginals ``[B, T, L, K]``."""
        x, lengths, _ = self._observed(batch)
        params = self.log_parameters()
        if self.emission == "bernoulli":
            emission = BernoulliEmission(x, params["weights"], params["bias"])
        elif self.emission == "categorical":
            emission = CategoricalEmission(x, params["weights"], params["bias"])
        else:
            emission = GaussianEmission(x, params["weights"], params["variance"])
        return structured_mean_field(
            params["init"],
            params["trans"],
            emission,
            lengths,
            iterations=self.mean_field_iterations,
            tol=self.mean_field_tol,
            validate_args=False,
        )

    def elbo(self, batch: Batch, *, estimator: str | None = None, num_samples: int = 1, kl_weight: float = 1.0) -> ELBO:
        r"""The structured mean-field bound, exact in ``q`` (no sampling; ``estimator`` must be None
        or ``"exact"``).  ``KL(q || p(z)) = sum_l (E_{q_l}[sum_t h^l_t] - log Z_l)`` for the chains
        ``q_l`` with potentials ``h^l``; ``reconstruction = elbo + kl``; the surrogate weighs the KL
        by ``kl_weight``."""
        if estimator not in (None, "exact"):
            raise ValueError(
                f"FactorialHMM's ELBO is computed exactly in q: estimator must be None or 'exact', got {estimator!r}"
            )
        fit = self.mean_field(batch)
        kl = sum(
            (fit.marginals[:, :, ell] * chain.emit).sum((1, 2)) - chain.log_partition
            for ell, chain in enumerate(fit.chains)
        )
        reconstruction = fit.elbo + kl
        return ELBO(fit.elbo, reconstruction, kl, surrogate=reconstruction - kl_weight * kl)

    # ---- EM (Gaussian) ----------------------------------------------------------------------
    @torch.no_grad()
    def em_step(self, batch: Batch) -> Tensor:
        r"""One exact EM iteration on ``batch`` for the direct Gaussian model; returns the
        ``log p(x)`` ``[B]`` of the parameters before the update.

        E-step: the exact posterior's per-chain marginals ``gamma^l_t``, expected transition
        counts ``xi^l`` (the gradient of ``log Z`` w.r.t. ``trans^l``) and the pairwise
        marginals ``p(z^l_t, z^m_t)`` of two chains (from the joint marginals).  M-step
        (Ghahramani & Jordan 1997): ``init^l \propto sum_b gamma^l_0``, ``trans^l = xi^l`` with rows
        normalised, ``W = (sum_t E[s_t s_t^T])^+ sum_t E[s_t] x_t^T`` for the ``LK`` one-hot vector
        ``s_t`` of the chains' states, and ``sigma^2_d = sum_t (x_{t,d}^2 - E[s_t]^T W_{:,d} x_{t,d}) / N``.
        """
        if self.emission != "gaussian" or self.parameterization != "direct":
            raise ValueError(
                f"em_step needs emission='gaussian' and parameterization='direct', got "
                f"{self.emission!r} and {self.parameterization!r}"
            )
        x, lengths, mask = self._observed(batch)
        num_chains, k, batch_size = self.num_chains, self.num_states, x.shape[0]
        with torch.enable_grad():
            init = self.init_logits.log_softmax(-1).detach().requires_grad_()
            trans = self.trans_logits.log_softmax(-1).detach().requires_grad_()
            params = {"init": init, "trans": trans, "weights": self.weights, "variance": self.log_variance.exp()}
            emit = self._joint_emission(params, x).detach().requires_grad_()
            log_px = FactorialChainPosterior(init, trans, emit, lengths, validate_args=False).log_partition
            first, counts, joint = torch.autograd.grad(log_px.sum(), (init, trans, emit))
        joint = joint.reshape(batch_size, x.shape[1], -1)  # [B, T, S]: p(z_t) over joint states, 0 at padding
        # one-hot LK-vectors of every joint state: [S, L*K]
        digits = torch.arange(self.joint_states, device=x.device)
        onehot = torch.cat(
            [nn.functional.one_hot((digits // k ** (num_chains - 1 - ell)) % k, k) for ell in range(num_chains)], -1
        ).to(x.dtype)
        occupancy = joint.sum((0, 1))  # [S]
        second = onehot.T @ (occupancy[:, None] * onehot)  # sum_t E[s s^T]: [LK, LK]
        expected = torch.einsum("bts,sj->btj", joint, onehot)  # E[s_t]: [B, T, LK]
        cross = torch.einsum("btj,btd->jd", expected, x)  # sum_t E[s_t] x_t^T: [LK, D]
        weights = torch.linalg.pinv(second) @ cross
        steps = mask.sum()
        variance = ((x.square().sum((0, 1)) - (cross * weights).sum(0)) / steps).clamp_min(1e-6)
        self.init_logits.copy_(first.clamp_min(1e-30).log())
        self.trans_logits.copy_(counts.clamp_min(1e-30).log())
        self.weights.copy_(weights.reshape(num_chains, k, self.output_size))
        self.log_variance.copy_(variance.log())
        return log_px.detach()

    # ---- sampling ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        batch: Batch | None = None,
        *,
        num_samples: int = 1,
        length: int = 20,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Ancestral samples ``(x, z)``: ``z [N, length, L]`` states and ``x [N, length, D]`` (Bernoulli
        0/1, Gaussian) or ``[N, length]`` word ids (categorical)."""
        params = self.log_parameters()
        probs = params["trans"].exp()  # [L, K, K]
        chains = torch.arange(self.num_chains, device=probs.device)
        state = torch.stack(
            [torch.multinomial(p, num_samples, replacement=True, generator=generator) for p in params["init"].exp()],
            -1,
        )  # [N, L]
        states = []
        for _ in range(length):
            states.append(state)
            rows = probs[chains, state].reshape(-1, self.num_states)  # [N * L, K]
            state = torch.multinomial(rows, 1, generator=generator).reshape(num_samples, self.num_chains)
        z = torch.stack(states, 1)  # [N, length, L]
        eta = params["weights"][chains, z].sum(-2) + params.get("bias", 0.0)  # [N, length, D]
        if self.emission == "bernoulli":
            x = torch.bernoulli(torch.sigmoid(eta), generator=generator)
        elif self.emission == "categorical":
            x = torch.multinomial(eta.softmax(-1).reshape(-1, self.output_size), 1, generator=generator)
            x = x.reshape(num_samples, length)
        else:
            noise = torch.randn(eta.shape, generator=generator, device=eta.device, dtype=eta.dtype)
            x = eta + params["variance"].sqrt() * noise
        return x, z
