"""FactorialChainPosterior against Pyro's enumerated factorial HMM (``examples/hmm.py``, model 3).

Pyro's model 3 writes a factorial HMM over binary vectors as ``L`` Markov chains that start in
state 0 (``z^l_0 ~ probs^l[0]``), each step ``z^l_t ~ Categorical(probs^l[z^l_{t-1}])``, and
``y_{t,v} ~ Bernoulli(probs_y[z^0_t, ..., z^{L-1}_t, v])`` in a plate over the tones; variable
lengths go through ``poutine.mask(t < lengths)``.  With every latent site enumerated and a
guide with no sample sites, ``TraceEnum_ELBO``'s loss is exactly ``-sum_b log p(y_b)``.  The
same model for latentnlp is ``init^l = log probs^l[0]``, ``trans^l = log probs^l`` and the joint
emission ``emit[b, t, z] = sum_v y log probs_y[z, v] + (1 - y) log(1 - probs_y[z, v])``.
"""

from __future__ import annotations

import pytest
import torch

from latentnlp import FactorialChainPosterior

pyro = pytest.importorskip("pyro")
dist = pytest.importorskip("pyro.distributions")
from pyro import poutine  # noqa: E402
from pyro.infer import TraceEnum_ELBO  # noqa: E402

F64 = torch.float64
LENGTHS = [5, 2, 4, 1]
TONES = 4


def random_model(num_chains: int, k: int, seed: int):
    """Row-stochastic ``probs [L, K, K]``, ``probs_y [K, ..., K, V]`` in (0, 1), a batch ``y [B, T, V]``."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(num_chains, k, k, generator=g, dtype=F64) + 0.1
    probs = probs / probs.sum(-1, keepdim=True)
    probs_y = torch.rand(*(k,) * num_chains, TONES, generator=g, dtype=F64) * 0.9 + 0.05
    lengths = torch.tensor(LENGTHS)
    y = (torch.rand(len(LENGTHS), max(LENGTHS), TONES, generator=g, dtype=F64) < 0.4).to(F64)
    return probs, probs_y, y, lengths


def pyro_log_likelihood(probs, probs_y, y, lengths) -> torch.Tensor:
    """``sum_b log p(y_b)`` as ``-TraceEnum_ELBO.loss`` of model 3's formulation with ``L`` chains."""
    num_chains = probs.shape[0]

    def model(sequences, lengths):
        tones = pyro.plate("tones", TONES, dim=-1)
        with pyro.plate("sequences", sequences.shape[0], dim=-2) as batch:
            states = [0] * num_chains
            for t in pyro.markov(range(int(lengths.max()))):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    states = [
                        pyro.sample(f"z{ell}_{t}", dist.Categorical(probs[ell][z]), infer={"enumerate": "parallel"})
                        for ell, z in enumerate(states)
                    ]
                    with tones as v:
                        pyro.sample(f"y_{t}", dist.Bernoulli(probs_y[(*states, v)]), obs=sequences[batch, t])

    def guide(sequences, lengths):
        pass

    elbo = TraceEnum_ELBO(max_plate_nesting=2)
    if probs.requires_grad or probs_y.requires_grad:
        return -elbo.differentiable_loss(model, guide, y, lengths)
    return torch.tensor(-elbo.loss(model, guide, y, lengths), dtype=F64)


def latentnlp_log_likelihood(probs, probs_y, y, lengths) -> torch.Tensor:
    """``log p(y_b)`` ``[B]`` of the same model by :class:`FactorialChainPosterior`."""
    num_chains = probs.shape[0]
    joint = probs_y.reshape(-1, TONES)  # [K^L, V], row-major joint states
    emit = y @ joint.log().T + (1 - y) @ torch.log1p(-joint).T
    emit = emit.reshape(*y.shape[:2], *probs_y.shape[:num_chains])
    return FactorialChainPosterior(probs[:, 0].log(), probs.log(), emit, lengths).log_partition


@pytest.mark.parametrize("num_chains, k", [(2, 3), (3, 2)])
def test_log_likelihood_agrees_with_pyro_enumeration(num_chains, k):
    probs, probs_y, y, lengths = random_model(num_chains, k, seed=num_chains)
    expected = pyro_log_likelihood(probs, probs_y, y, lengths)
    actual = latentnlp_log_likelihood(probs, probs_y, y, lengths)
    assert actual.dtype == F64
    torch.testing.assert_close(actual.sum(), expected, rtol=1e-10, atol=1e-10)
    # per sequence (one row each: its own mask and maximum length)
    for b in range(len(LENGTHS)):
        row = pyro_log_likelihood(probs, probs_y, y[b : b + 1], lengths[b : b + 1])
        torch.testing.assert_close(actual[b], row, rtol=1e-10, atol=1e-10)


def test_gradient_agrees_with_pyro_enumeration():
    """Gradients w.r.t. unconstrained parameters (``probs = softmax``, ``probs_y = sigmoid``): Pyro's
    Categorical renormalises its ``probs``, so off the simplex the two differ by design."""
    probs, probs_y, y, lengths = random_model(2, 3, seed=5)
    grads = []
    for log_likelihood in (pyro_log_likelihood, latentnlp_log_likelihood):
        logits, logits_y = probs.log().requires_grad_(), torch.logit(probs_y).requires_grad_()
        value = log_likelihood(logits.softmax(-1), logits_y.sigmoid(), y, lengths).sum()
        grads.append(torch.autograd.grad(value, (logits, logits_y)))
    for expected, actual in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)
