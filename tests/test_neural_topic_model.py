"""NeuralTopicModel: the per-word topics summed out against enumeration, the bag of words, the bound."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from latentnlp.families import LogisticNormal
from latentnlp.models import NeuralTopicModel

V, K = 7, 3


def _batch() -> dict:
    targets = torch.tensor([[0, 3, 3, 6], [5, 1, 2, 2], [4, 0, 0, 0]])
    lengths = torch.tensor([4, 3, 1])
    return {"targets": targets, "lengths": lengths, "inputs": targets}


def _model() -> NeuralTopicModel:
    torch.manual_seed(0)
    model = NeuralTopicModel(V, K, hidden_size=8).double()
    with torch.no_grad():
        model.topic_logits.normal_()
    return model


def test_per_word_marginalisation_equals_enumeration():
    """``sum_n log sum_k theta_k beta_k[x_n]`` equals ``log sum_y prod_n theta_{y_n} beta_{y_n}[x_n]``
    over all ``K^N`` per-word topic assignments ``y``."""
    model, batch = _model(), _batch()
    z = torch.randn(2, 3, K, dtype=torch.float64)
    got = model.log_likelihood(batch, z)  # [S, B]
    theta, beta = torch.softmax(z, -1), model.log_topics().exp().detach()
    expected = torch.empty(2, 3, dtype=torch.float64)
    for s in range(2):
        for b, (words, length) in enumerate(zip(batch["targets"].tolist(), batch["lengths"].tolist())):
            total = 0.0
            for topics in itertools.product(range(K), repeat=length):
                total += math.prod(float(theta[s, b, y] * beta[y, w]) for y, w in zip(topics, words[:length]))
            expected[s, b] = math.log(total)
    torch.testing.assert_close(got.detach(), expected)


def test_counts_ignore_padding():
    model, batch = _model(), _batch()
    counts = model.counts(batch)
    assert counts.shape == (3, V)
    assert counts[0].tolist() == [1, 0, 0, 2, 0, 0, 1]
    assert counts[1].tolist() == [0, 1, 1, 0, 0, 1, 0]
    assert counts[2].tolist() == [0, 0, 0, 0, 1, 0, 0]
    torch.testing.assert_close(counts.sum(1), batch["lengths"].double())


def test_elbo_is_the_reparameterised_bound_with_the_closed_form_kl():
    model, batch = _model(), _batch()
    q, prior = model.posterior(batch), model.prior()
    assert isinstance(q, LogisticNormal) and q.batch_shape == (3,) and q.event_shape == (K,)
    bound = model.elbo(batch, num_samples=4000)
    torch.testing.assert_close(bound.kl, torch.distributions.kl_divergence(q, prior))
    # reconstruction: a Monte Carlo mean of log p(x | softmax(z)); compare with an independent estimate
    z = q.sample((4000,))
    direct = model.log_likelihood(batch, z)
    tol = 5 * (direct.std(0) / math.sqrt(4000)) * math.sqrt(2)
    assert ((bound.reconstruction - direct.mean(0)).abs() <= tol).all()
    torch.testing.assert_close(bound.value, bound.reconstruction - bound.kl)
    # the prior is the Laplace approximation of Dirichlet(1)
    torch.testing.assert_close(prior.loc, torch.zeros(K, dtype=torch.float64))
    torch.testing.assert_close(prior.scale**2, torch.full((K,), (1 - 2 / K) + 1 / K, dtype=torch.float64))


def test_training_raises_the_bound_and_finds_the_topics():
    """Documents drawn from three disjoint topics: the ELBO rises and each topic's top words are one
    true topic's words."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    vocab, n_docs, length = 12, 96, 10
    truth = torch.zeros(3, vocab)
    for k in range(3):
        truth[k, 4 * k : 4 * k + 4] = 0.25
    theta = torch.distributions.Dirichlet(torch.full((3,), 0.3)).sample((n_docs,))
    topics = torch.multinomial(theta, length, replacement=True, generator=g)
    words = torch.multinomial(truth[topics.flatten()], 1, generator=g).view(n_docs, length)
    batch = {"targets": words, "lengths": torch.full((n_docs,), length)}
    model = NeuralTopicModel(vocab, 3, hidden_size=16)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    first = model.elbo(batch).value.mean().item()
    for _ in range(300):
        opt.zero_grad()
        model.loss(batch, "elbo").value.backward()
        opt.step()
    torch.manual_seed(1)
    last = model.elbo(batch, num_samples=20).value.mean().item()
    assert last > first + 3.0
    found = sorted(sorted(w // 4 for w in top) for top in model.top_words(4))
    assert found == [[0] * 4, [1] * 4, [2] * 4], model.top_words(4)


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match=r"word ids in \[0, 7\), got \[0, 9\]"):
        model.loss({"targets": torch.tensor([[0, 9]]), "lengths": torch.tensor([2])}, "elbo")
    # ids past a length are padding: never read
    model.loss({"targets": torch.tensor([[0, 9]]), "lengths": torch.tensor([1])}, "elbo")
    with pytest.raises(ValueError, match=r"lengths'\] must be \[B\]"):
        model.loss({"targets": torch.tensor([[0, 1]]), "lengths": torch.tensor([1, 2])}, "elbo")
    with pytest.raises(ValueError, match=r"lengths'\] must be an integer tensor, got torch.float32"):
        model.loss({"targets": torch.tensor([[0, 1]]), "lengths": torch.tensor([2.0], dtype=torch.float32)}, "elbo")
    with pytest.raises(ValueError, match=r"lengths'\] must lie in 1..2 \(T\), got \[3, 1\]"):
        model.loss({"targets": torch.tensor([[0, 1], [1, 0]]), "lengths": torch.tensor([3, 1])}, "elbo")
    with pytest.raises(ValueError, match=r"lengths'\] must lie in 1..2 \(T\), got \[0, 1\]"):
        model.iwae({"targets": torch.tensor([[0, 1], [1, 0]]), "lengths": torch.tensor([0, 1])}, 2)
    with pytest.raises(ValueError, match="num_topics"):
        NeuralTopicModel(5, 1)
    with pytest.raises(ValueError, match="alpha"):
        NeuralTopicModel(5, 2, alpha=0.0)


def test_generator_draws_the_samples():
    model, batch = _model(), _batch()
    for draw in (
        lambda g: model.elbo(batch, num_samples=3, generator=g).value,
        lambda g: model.iwae(batch, 3, chunk_size=2, generator=g),
    ):
        a, b = draw(torch.Generator().manual_seed(4)), draw(torch.Generator().manual_seed(4))
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, draw(torch.Generator().manual_seed(5)))
