"""MultiSpaceVAE (MSVED): its KL terms against Monte Carlo, the labelled bound as the unlabelled one
with a one-hot q(y | x), the score-function path against exact enumeration over the tags, and
reinflection by the step-wise decoder against the teacher-forced likelihood."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from contract import reinflection_batch

from latentnlp.families import DiagonalGaussian, MaskedCategorical
from latentnlp.models import MultiSpaceVAE
from latentnlp.models.multi_space_vae import TagState, expect_over_tags

pytestmark = pytest.mark.usefixtures("float64")

TAGS = [3, 2, 4]


def _model(estimator="gumbel_softmax", tag_sizes=TAGS, **kw):
    torch.manual_seed(0)
    return MultiSpaceVAE(
        10,
        tag_sizes,
        embedding_size=8,
        hidden_size=12,
        latent_size=4,
        tag_dim=6,
        estimator=estimator,
        bos_id=1,
        eos_id=2,
        **kw,
    )


def _batch(seed=0, tag_sizes=TAGS, **kw):
    return reinflection_batch(torch.Generator().manual_seed(seed), tag_sizes=tag_sizes, **kw)


def test_kl_terms_match_monte_carlo():
    model, batch = _model(), _batch()
    bound = model.elbo(batch)
    q_z, q_y, _ = model.encode(batch["src"], batch["src_lengths"])
    q_y = model.observed(q_y, batch)
    n = 20000
    g = torch.Generator().manual_seed(1)
    z = q_z.sample((n,), generator=g)
    y = q_y.sample((n,), generator=g)
    prior_z = DiagonalGaussian.standard(q_z.batch_shape, 4)
    log_prior_y = -torch.tensor([math.log(k) for k in TAGS])  # uniform over each feature's K_i categories
    draws = (q_z.log_prob(z) - prior_z.log_prob(z) + q_y.log_prob(y).sum(-1) - log_prior_y.sum()).detach()
    mc, err = draws.mean(0), draws.std(0) / math.sqrt(n)
    assert torch.all((bound.kl.detach() - mc).abs() <= 4 * err + 1e-9), (bound.kl, mc, err)
    # labelled rows: q(y) is a point mass on the tags, KL(y) = -log p(y) = sum_i log K_i
    kl_y = torch.distributions.kl_divergence(q_y, model.tag_prior((6,))).sum(-1).detach()
    labelled = batch["labelled"]
    assert torch.allclose(kl_y[labelled], torch.full_like(kl_y[labelled], sum(map(math.log, TAGS))))


@pytest.mark.parametrize("estimator", ["gumbel_softmax", "score_function"])
def test_observed_tags_equal_one_hot_q(estimator):
    """The unlabelled bound with q(y | x) one-hot on the truth is the labelled bound, and its
    reconstruction is the step-wise decoder's log p(x | z, y) at the same z."""
    model, batch = _model(estimator), _batch()
    model.eval()
    labelled = dict(batch, labelled=torch.ones(6, dtype=torch.bool))
    unlabelled = dict(batch, labelled=torch.zeros(6, dtype=torch.bool))
    truth = F.one_hot(batch["tags"], 4).bool() & model.tag_mask
    one_hot_q = MaskedCategorical(torch.randn(6, 3, 4), truth)
    sup = model.elbo(labelled, estimator=estimator, generator=torch.Generator().manual_seed(5))
    uns = model.elbo(unlabelled, estimator=estimator, q_y=one_hot_q, generator=torch.Generator().manual_seed(5))
    for name in ("value", "reconstruction", "kl"):
        assert torch.allclose(getattr(sup, name), getattr(uns, name), atol=1e-10), name
    # oracle: the same z drawn again, the tags fed one-hot, the decoder stepped character by character
    q_z = model.posterior(batch)
    z = q_z.rsample((1,), generator=torch.Generator().manual_seed(5))[0]
    cond = model.condition(z, F.one_hot(batch["tags"], 4).double())
    h, c = model.initial_state(cond)
    state, total = TagState(h, c, cond), torch.zeros(6)
    for t in range(batch["inputs"].shape[1]):
        log_probs, state = model.decoder_step(state, batch["inputs"][:, t])
        step = log_probs.gather(1, batch["targets"][:, t : t + 1])[:, 0]
        total = total + torch.where(t < batch["lengths"], step, 0.0)
    assert torch.allclose(sup.reconstruction, total, atol=1e-10)
    kl_z = torch.distributions.kl_divergence(q_z, DiagonalGaussian.standard((6,), 4))
    log_p_y = -sum(map(math.log, TAGS))
    assert torch.allclose(sup.value, total + log_p_y - kl_z, atol=1e-10)


def test_score_function_path_is_unbiased():
    """E_q[f(y)] and its gradient in the logits of q(y) from the score function (with a baseline)
    against exact enumeration of the 3 x 2 tag configurations, at a fixed z."""
    sizes = [3, 2]
    model = _model("score_function", tag_sizes=sizes)
    batch = _batch(tag_sizes=sizes, batch_size=2)
    with torch.no_grad():  # tags that matter: f(y) varies by about 1 nat over the configurations
        model.tag_embedding.mul_(30)
    mask = model.tag_mask
    logits = torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(2), requires_grad=True)
    z0 = torch.randn(2, 4, generator=torch.Generator().manual_seed(3))

    def f(y):
        return model.reconstruction(batch, z0.expand(y.shape[0], 2, 4), y).detach()

    q = MaskedCategorical(logits, mask)
    configs = list(itertools.product(range(3), range(2)))
    y_all = F.one_hot(torch.tensor(configs), 3).double()[:, None].expand(-1, 2, -1, -1)  # [6, B, M, K]
    log_q_all = torch.stack([q.log_prob(torch.tensor(c).expand(2, 2)).sum(-1) for c in configs])  # [6, B]
    exact = (log_q_all.exp() * f(y_all)).sum(0)
    (exact_grad,) = torch.autograd.grad(exact.sum(), logits)

    baseline = torch.full((2,), float(exact.detach().mean()) + 0.5)  # any input-independent value
    values, grads = [], []
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        q = MaskedCategorical(logits, mask)
        est = expect_over_tags(f, q, estimator="score_function", num_samples=300, baseline=baseline, generator=g)
        (grad,) = torch.autograd.grad(est.surrogate.sum(), logits)
        values.append(est.value)
        grads.append(grad)
    values, grads = torch.stack(values), torch.stack(grads)
    err_v, err_g = values.std(0) / math.sqrt(20), grads.std(0) / math.sqrt(20)
    assert torch.all((values.mean(0) - exact.detach()).abs() <= 4 * err_v + 1e-9)
    allowed = mask.expand_as(exact_grad)
    assert torch.all(((grads.mean(0) - exact_grad).abs() <= 4 * err_g + 1e-9)[allowed])
    assert torch.all(grads[:, ~allowed] == 0)  # no gradient to padded categories

    # the straight-through Gumbel sample is an exact draw of q: its value is unbiased too
    est = expect_over_tags(
        f, MaskedCategorical(logits, mask), estimator="gumbel_softmax", num_samples=6000, generator=g
    )
    draws_sd = (f(y_all) - exact.detach()).abs().max(0).values  # a bound on the draws' spread
    assert torch.all((est.value - exact.detach()).abs() <= 4 * draws_sd / math.sqrt(6000))


def test_beam_scores_are_the_model_likelihood():
    model, batch = _model(), _batch()
    model.eval()
    hyp = model.generate(batch, beam_size=3, max_length=8)
    greedy = model.generate(batch, method="greedy", max_length=8)
    assert torch.all(hyp.scores >= greedy.scores - 1e-9)  # beam search finds at least greedy's score
    decoded = dict(
        batch,
        inputs=torch.cat([torch.ones(6, 1, dtype=torch.long), hyp.tokens[:, :-1]], 1),
        targets=hyp.tokens,
        lengths=hyp.lengths,
    )
    z = model.posterior(batch).loc[None]
    y = F.one_hot(batch["tags"], 4).double()[None]
    assert torch.allclose(model.reconstruction(decoded, z, y)[0], hyp.scores, atol=1e-8)


def test_classifier_term():
    model, batch = _model(classifier_weight=0.5), _batch()
    base = _model(classifier_weight=0.0)
    torch.manual_seed(7)
    with_term = model.loss(batch, "elbo")
    torch.manual_seed(7)
    without = base.loss(batch, "elbo")
    forms = {"src": batch["targets"], "src_lengths": batch["lengths"] - 1}
    tag_nll = -model.tag_posterior(forms).log_prob(batch["tags"]).sum(-1).detach()
    expected = torch.where(batch["labelled"], tag_nll, 0.0)
    assert torch.allclose(with_term.metrics["tag_nll"], expected)
    tokens = batch["lengths"].sum()
    assert torch.allclose(with_term.value - without.value, 0.5 * expected.sum() / tokens)


def test_bad_inputs():
    model, batch = _model(), _batch()
    with pytest.raises(ValueError, match="tags must be"):
        model.elbo(dict(batch, tags=batch["tags"][:, :2]))
    with pytest.raises(ValueError, match="tags must lie"):
        model.elbo(dict(batch, tags=batch["tags"] + 5))
    with pytest.raises(ValueError, match="labelled must be"):
        model.elbo(dict(batch, labelled=batch["labelled"].long()))
    with pytest.raises(ValueError, match="estimator must be"):
        model.elbo(batch, estimator="exact")
    with pytest.raises(ValueError, match="tag_sizes"):
        MultiSpaceVAE(10, [3, 1])
    with pytest.raises(ValueError, match="target tags"):
        model.generate({k: v for k, v in batch.items() if k != "tags"})


def test_bad_batches_name_the_key():
    model, batch = _model(), _batch()
    for key in ("src", "src_lengths", "inputs", "targets", "lengths"):
        with pytest.raises(ValueError, match=f"lacks \\['{key}'\\]"):
            model.elbo({k: v for k, v in batch.items() if k != key})
    with pytest.raises(ValueError, match=r"batch\['src'\] ids must lie in 0..9 .* got 3..10"):
        model.elbo(dict(batch, src=batch["src"].masked_fill(batch["src"] == batch["src"].max(), 10)))
    with pytest.raises(ValueError, match=r"batch\['targets'\] ids must lie in 0..9 .* got -1"):
        model.iwae(dict(batch, targets=batch["targets"].masked_fill(batch["targets"] == 2, -1)), 2)
    with pytest.raises(ValueError, match=r"batch\['inputs'\] must be an integer tensor, got torch.float64"):
        model.elbo(dict(batch, inputs=batch["inputs"].double()))
    with pytest.raises(ValueError, match=r"lengths must lie in 1..6, got \[7"):
        model.elbo(dict(batch, lengths=torch.full_like(batch["lengths"], 7)))
    with pytest.raises(ValueError, match="src and inputs must have the same B"):
        model.elbo(dict(batch, src=batch["src"][:3], src_lengths=batch["src_lengths"][:3]))
    # padding past a length may hold any id (here the -100 of torch's ignore_index)
    lengths = batch["lengths"].clone()
    lengths[1:] = torch.minimum(lengths[1:], torch.full_like(lengths[1:], 5))
    padded = batch["targets"].masked_fill(torch.arange(6) >= lengths[:, None], -100)
    assert torch.isfinite(model.elbo(dict(batch, targets=padded, lengths=lengths)).value).all()


def test_score_function_needs_the_models_baseline():
    """A model built for Gumbel-softmax has no learned baseline: the score function is refused
    rather than run without one."""
    with pytest.raises(ValueError, match="needs the learned baseline .* built with estimator='gumbel_softmax'"):
        _model("gumbel_softmax").elbo(_batch(), estimator="score_function")
    assert _model("score_function").elbo(_batch(), estimator="gumbel_softmax").value.shape == (6,)


def test_a_float32_default_does_not_leak_into_a_double_model():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = _model().double()
        bound = model.elbo(_batch(), num_samples=2)
        assert model.tag_prior((6,)).logits.dtype == torch.float64
        assert bound.value.dtype == bound.kl.dtype == bound.surrogate.dtype == torch.float64
        assert model.iwae(_batch(), 2).dtype == torch.float64
    finally:
        torch.set_default_dtype(old)
