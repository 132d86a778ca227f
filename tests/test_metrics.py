"""latentnlp.metrics against hand computations."""

import math

import pytest
import torch
from torch.distributions import kl_divergence

from latentnlp.families import DiagonalGaussian, MeanFieldBernoulli, VonMisesFisher
from latentnlp.metrics import (
    MetricSums,
    active_units,
    average_kl,
    concatenate_posteriors,
    corpus_bleu,
    corpus_summary,
    gaussian_kl,
    mutual_information,
    perplexity,
    posterior_mutual_information,
    tokenized_bleu,
)


def test_perplexity_from_sums():
    assert perplexity(0.0, 10) == 1.0
    assert perplexity(10 * math.log(7.0), 10) == pytest.approx(7.0)
    assert perplexity(torch.tensor(6.0), torch.tensor(3.0)) == pytest.approx(math.exp(2.0))
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_metric_sums_and_corpus_summary():
    sums = MetricSums()
    sums.add({"nll": torch.tensor([3.0, 1.0]), "tokens": torch.tensor([2.0, 1.0]), "kl": torch.tensor([0.5, 0.5])})
    sums.add({"nll": torch.tensor([5.0]), "tokens": torch.tensor([3.0]), "kl": torch.tensor([2.0])})
    totals = sums.totals()
    assert totals == {"nll": 9.0, "tokens": 6.0, "kl": 3.0, "examples": 3.0}
    out = corpus_summary(totals)
    assert out["nll"] == pytest.approx(9 / 6)  # per target token, not per batch
    assert out["ppl"] == pytest.approx(math.exp(9 / 6))
    assert out["kl"] == pytest.approx(3 / 6)
    assert out["kl_per_example"] == pytest.approx(1.0)
    assert out["nll_per_example"] == pytest.approx(3.0)
    assert out["tokens"] == 6 and out["examples"] == 3
    assert MetricSums.from_totals(totals).totals() == totals
    with pytest.raises(ValueError, match="tokens"):
        sums.add({"nll": torch.tensor([1.0])})


def test_corpus_summary_of_the_negative_elbo_is_a_perplexity_bound():
    sums = MetricSums()
    sums.add({"neg_elbo": torch.tensor([4.0, 2.0]), "kl": torch.tensor([1.0, 0.5]), "tokens": torch.tensor([2.0, 2.0])})
    out = corpus_summary(sums.totals())
    assert out["neg_elbo"] == pytest.approx(6 / 4)
    assert out["neg_elbo_per_example"] == pytest.approx(3.0)
    assert out["ppl_bound"] == pytest.approx(math.exp(6 / 4))
    assert "ppl" not in out and "nll" not in out  # a bound is never reported as the perplexity
    # with both, nll keeps its numbers and the bound sits beside them
    both = corpus_summary({"nll": 5.0, "neg_elbo": 6.0, "tokens": 4.0, "examples": 2.0})
    assert both["ppl"] == pytest.approx(math.exp(5 / 4)) and both["nll"] == pytest.approx(5 / 4)
    assert both["ppl_bound"] == pytest.approx(math.exp(6 / 4)) and both["ppl_bound"] >= both["ppl"]
    assert corpus_summary({"nll": 5.0, "tokens": 4.0, "examples": 2.0}).keys() == {
        "tokens",
        "examples",
        "nll",
        "nll_per_example",
        "ppl",
    }


# BLEU by hand.  Sentence 1: hyp "the cat sat on the mat", ref "the cat sat on a mat":
# clipped matches 1-4-grams 5/6, 3/5, 2/4, 1/3.  Sentence 2: hyp "A dog barks", ref
# "a dog barks loudly": lowercased 3/3, 2/2, 1/1, 0/0; case-sensitive 2/3, 1/2, 0/1, 0/0.
# Corpus lengths c = 9, r = 10, so BP = exp(1 - 10/9).
HYPS = ["the cat sat on the mat", "A dog barks"]
REFS = ["the cat sat on a mat", "a dog barks loudly"]


def test_tokenized_bleu_matches_hand_computation():
    bp = math.exp(1 - 10 / 9)
    lowercased = bp * (8 / 9 * 5 / 7 * 3 / 5 * 1 / 3) ** 0.25
    assert tokenized_bleu(HYPS, REFS).score == pytest.approx(100 * lowercased)
    cased = bp * (7 / 9 * 4 / 7 * 2 / 5 * 1 / 3) ** 0.25
    assert tokenized_bleu(HYPS, REFS, lowercase=False).score == pytest.approx(100 * cased)
    # references as sacreBLEU streams give the same
    assert tokenized_bleu(HYPS, [REFS]).score == pytest.approx(100 * lowercased)


def test_tokenized_bleu_is_zero_without_a_4gram_match_like_multi_bleu():
    assert tokenized_bleu(["a b c"], ["a b c d"]).score == 0.0


def test_detokenized_bleu_13a():
    # 13a splits the final period: 7 tokens each; matches 6/7, 4/6, 2/5, 1/4; BP = 1
    hyp, ref = ["The cat sat on the mat."], ["The cat sat on a mat."]
    assert corpus_bleu(hyp, ref).score == pytest.approx(100 * (2 / 35) ** 0.25)
    # without tokenisation "mat." is one token: 5/6, 3/5, 2/4, 1/3
    none = corpus_bleu(hyp, ref, tokenize="none")
    assert none.score == pytest.approx(100 * (1 / 12) ** 0.25)


def test_bleu_rejects_misaligned_references():
    with pytest.raises(ValueError):
        corpus_bleu(["a b"], ["a b", "c d"])
    with pytest.raises(TypeError):
        corpus_bleu("a b", ["a b"])


def test_gaussian_kl_and_average():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # row 0: 1/2 [(1 + 1 - 1 - 0) + (0 + 2 - 1 - log 2)] = 1/2 (2 - log 2); row 1: 0
    expected = torch.tensor([0.5 * (2 - math.log(2.0)), 0.0])
    assert torch.allclose(gaussian_kl(mu, logvar), expected)
    assert average_kl(mu, logvar) == pytest.approx(0.25 * (2 - math.log(2.0)))
    with pytest.raises(ValueError):
        gaussian_kl(mu, logvar[:, :1])


def test_gaussian_kl_is_the_family_kl():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g), 2 * torch.randn(5, 3, generator=g)
    q = DiagonalGaussian.from_logvar(mu, logvar)
    torch.testing.assert_close(gaussian_kl(mu, logvar), kl_divergence(q, DiagonalGaussian.standard((5,), 3)))
    closed = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), closed)
    # float32 down to logvar = -87 (a normal-float variance) keeps the closed form
    narrow = torch.tensor([[0.0, -87.0, 40.0]])
    assert gaussian_kl(torch.zeros(1, 3), narrow).item() == pytest.approx(
        0.5 * float((narrow.double().exp() - 1 - narrow.double()).sum()), rel=1e-6
    )


def _normal_pdf(z, m, var):
    return math.exp(-0.5 * (z - m) ** 2 / var) / math.sqrt(2 * math.pi * var)


def test_mutual_information_hand_computation():
    mu = torch.tensor([[-1.0], [1.0]], dtype=torch.float64)
    logvar = torch.tensor([[0.0], [math.log(4.0)]], dtype=torch.float64)
    z = torch.tensor([[0.5], [-0.2]], dtype=torch.float64)
    # E_x[-H(q(z|x))] with H = 1/2 log(2 pi e var)
    neg_entropy = -0.5 * (0.5 * math.log(2 * math.pi * math.e * 1.0) + 0.5 * math.log(2 * math.pi * math.e * 4.0))
    log_qz = [math.log(0.5 * (_normal_pdf(v, -1.0, 1.0) + _normal_pdf(v, 1.0, 4.0))) for v in (0.5, -0.2)]
    expected = neg_entropy - sum(log_qz) / 2
    assert mutual_information(mu, logvar, z) == pytest.approx(expected, rel=1e-10)
    # [S, N, D] samples are pooled
    z2 = torch.stack([z, z])
    assert mutual_information(mu, logvar, z2) == pytest.approx(expected, rel=1e-10)
    # sampled z are the family's draws from the generator
    drawn = DiagonalGaussian.from_logvar(mu, logvar).sample((3,), generator=torch.Generator().manual_seed(2))
    assert mutual_information(mu, logvar, num_samples=3, generator=torch.Generator().manual_seed(2)) == pytest.approx(
        mutual_information(mu, logvar, drawn), rel=1e-12
    )


def test_mutual_information_limits():
    g = torch.Generator().manual_seed(0)
    # far-apart posteriors: z identifies x, so I = log N (up to the sampled E_q log q term)
    mu = torch.tensor([[-100.0, 0.0], [100.0, 0.0], [0.0, 100.0], [0.0, -100.0]])
    logvar = torch.zeros(4, 2)
    mi = mutual_information(mu, logvar, num_samples=5000, generator=g)
    assert mi == pytest.approx(math.log(4), abs=0.03)
    # identical posteriors: z says nothing about x
    mi = mutual_information(torch.zeros(4, 3), torch.zeros(4, 3), num_samples=4000, generator=g)
    assert abs(mi) < 0.05


def _circle_i0(kappa):
    """``I_0(kappa) = 1/pi int_0^pi exp(kappa cos t) dt`` by the midpoint rule."""
    n = 20000
    return sum(math.exp(kappa * math.cos((k + 0.5) * math.pi / n)) for k in range(n)) / n


def _circle_vmf_pdf(z, angle, kappa, i0):
    """vMF density on the unit circle at the point ``z``: ``exp(kappa mu^T z) / (2 pi I_0(kappa))``."""
    return math.exp(kappa * (math.cos(angle) * z[0] + math.sin(angle) * z[1])) / (2 * math.pi * i0)


def _circle_vmf_entropy(angle, kappa, i0):
    n = 4000
    points = [(k + 0.5) * 2 * math.pi / n for k in range(n)]
    densities = [_circle_vmf_pdf((math.cos(t), math.sin(t)), angle, kappa, i0) for t in points]
    return -sum(p * math.log(p) for p in densities) * 2 * math.pi / n


def test_posterior_mutual_information_of_a_vmf_by_quadrature():
    """Two vMF posteriors on the circle, two given points: the estimate is the negative entropy
    (by quadrature) minus the log aggregate density (from the circle densities), averaged."""
    angles, kappas = (0.3, 2.0), (1.5, 4.0)
    loc = torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64)
    q = VonMisesFisher(loc, torch.tensor(kappas, dtype=torch.float64))
    z = torch.tensor([[math.cos(1.0), math.sin(1.0)], [math.cos(-2.5), math.sin(-2.5)]], dtype=torch.float64)
    i0 = [_circle_i0(k) for k in kappas]
    neg_entropy = -sum(_circle_vmf_entropy(a, k, i) for a, k, i in zip(angles, kappas, i0)) / 2
    log_qz = [math.log(sum(_circle_vmf_pdf(v.tolist(), *c) for c in zip(angles, kappas, i0)) / 2) for v in z]
    expected = neg_entropy - sum(log_qz) / 2
    assert posterior_mutual_information(q, z) == pytest.approx(expected, rel=1e-6)
    # sampled z are the family's draws from the generator
    drawn = q.sample((4,), generator=torch.Generator().manual_seed(3))
    sampled = posterior_mutual_information(q, num_samples=4, generator=torch.Generator().manual_seed(3))
    assert sampled == pytest.approx(posterior_mutual_information(q, drawn), rel=1e-12)
    # the Gaussian form is the same estimator of the same family
    mu, logvar = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    zs = torch.randn(2, 5, 3, dtype=torch.float64)
    gaussian = DiagonalGaussian.from_logvar(mu, logvar)
    assert posterior_mutual_information(gaussian, zs) == pytest.approx(mutual_information(mu, logvar, zs), rel=1e-12)


def test_concatenate_posteriors_joins_batches_and_refuses_other_families():
    a = DiagonalGaussian(torch.zeros(2, 3), torch.ones(2, 3))
    b = DiagonalGaussian(torch.ones(1, 3), torch.full((1, 3), 2.0))
    q = concatenate_posteriors([a, b])
    assert isinstance(q, DiagonalGaussian) and q.batch_shape == (3,) and q.loc.dtype == torch.float64
    assert q.loc[:, 0].tolist() == [0.0, 0.0, 1.0] and q.scale[:, 0].tolist() == [1.0, 1.0, 2.0]
    loc = torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    v = concatenate_posteriors([VonMisesFisher(loc[:3], 5.0), VonMisesFisher(loc[3:], 7.0)])
    assert isinstance(v, VonMisesFisher) and v.concentration.tolist() == [5.0, 5.0, 5.0, 7.0]
    # active units read the family's posterior mean: A_D(kappa) mu_i for a vMF
    assert torch.allclose(v.mean, v.mean_resultant_length.unsqueeze(-1) * loc.double())
    assert 0 <= active_units(v.mean) <= 3
    with pytest.raises(ValueError, match="all be DiagonalGaussian or all VonMisesFisher"):
        concatenate_posteriors([a, VonMisesFisher(loc[:2], 5.0)])
    with pytest.raises(ValueError, match="MeanFieldBernoulli"):
        concatenate_posteriors([MeanFieldBernoulli(logits=torch.zeros(2, 3))])
    with pytest.raises(ValueError, match="one event shape"):
        concatenate_posteriors([a, DiagonalGaussian(torch.zeros(1, 4), torch.ones(1, 4))])
    with pytest.raises(ValueError, match="at least one"):
        concatenate_posteriors([])


def test_active_units_hand_computation():
    mu = torch.tensor([[0.000, 1.0, 0.0000], [0.125, -1.0, 0.0625], [0.250, 0.0, 0.1250]])
    # unbiased variances over rows: 0.015625, 1.0, 0.00390625
    assert active_units(mu) == 2
    assert active_units(mu, threshold=0.02) == 1
    assert active_units(mu, threshold=0.003) == 3
    with pytest.raises(ValueError):
        active_units(mu[:1])
