"""LatentAlignmentSeq2Seq: the LatentModel contract, bounds, estimators, decoding, padding."""

import math

import pytest
import torch
from contract import CHECKS, ModelCase

from latentnlp.families import MaskedCategorical
from latentnlp.masks import lengths_to_mask
from latentnlp.models.base import UnsupportedObjectiveError
from latentnlp.models.latent_alignment import TOP_K, LatentAlignmentSeq2Seq

V, BOS, EOS, UNK = 9, 1, 2, 0
MODES = ["soft", "exact", "elbo-enum", "elbo-sample", "elbo-gumbel", "copy", "exact-top3"]


def make_batch(g, *, size=4, src_len=6, tgt_len=5, extended=False):
    """A padded parallel batch (padding holds <eos>); ``extended`` adds copy ids ``src_ext`` / ``tgt_out_ext``."""
    src_lengths = torch.randint(1, src_len + 1, (size,), generator=g)
    tgt_lengths = torch.randint(1, tgt_len + 1, (size,), generator=g)
    src_lengths[0], tgt_lengths[1] = src_len, tgt_len
    src = torch.randint(3, V, (size, src_len), generator=g)
    words = torch.randint(3, V, (size, tgt_len), generator=g)
    words[:, 0] = src[:, 0]  # something to copy
    rows = torch.arange(size)
    tgt_out = words.clone()
    tgt_out[rows, tgt_lengths - 1] = EOS
    tgt_in = torch.cat([torch.full((size, 1), BOS), words[:, :-1]], 1)
    src_pad = torch.arange(src_len) >= src_lengths[:, None]
    tgt_pad = torch.arange(tgt_len) >= tgt_lengths[:, None]
    batch = {
        "src": src.masked_fill(src_pad, EOS),
        "src_lengths": src_lengths,
        "tgt_in": tgt_in.masked_fill(tgt_pad, EOS),
        "tgt_out": tgt_out.masked_fill(tgt_pad, EOS),
        "tgt_lengths": tgt_lengths,
        "lengths": tgt_lengths,
    }
    if extended:  # word V (source-only) at source position 0, copied as the first target word
        src_ext = batch["src"].clone()
        src_ext[:, 0] = V
        tgt_out_ext = batch["tgt_out"].clone()
        first = tgt_lengths >= 2
        tgt_out_ext[first, 0] = V
        batch["tgt_in"][first, 1] = UNK
        batch.update(src_ext=src_ext, tgt_out_ext=tgt_out_ext)
    return batch


def make_model(mode, **kw):
    kw = dict(embedding_size=6, hidden_size=8, bos_id=BOS, eos_id=EOS, unk_id=UNK, **kw)
    return LatentAlignmentSeq2Seq.from_mode(mode, V, V, **kw)


PADDED = {
    "src": "src_lengths",
    "tgt_in": "tgt_lengths",
    "tgt_out": "tgt_lengths",
    "src_ext": "src_lengths",
    "tgt_out_ext": "tgt_lengths",
}
CASES = [
    ModelCase(
        mode,
        make_model=lambda mode=mode: make_model(mode),
        make_batch=lambda g, mode=mode: make_batch(g, extended=mode == "copy"),
        padded=PADDED,
        objective_kwargs={"elbo": {"num_samples": 2}},
    )
    for mode in MODES
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_contract(case, check):
    check(case)


def _double(mode, seed=0, **kw):
    torch.manual_seed(seed)
    return make_model(mode, **kw).double().eval()


def _batch(seed=0, **kw):
    return make_batch(torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("mode", ["elbo-enum", "elbo-sample", "elbo-gumbel"])
def test_elbo_below_marginal_and_tight_at_exact_posterior(mode):
    model, batch = _double(mode), _batch()
    log_px = model.log_marginal(batch)
    bound = model.elbo(batch, estimator="exact")
    assert (bound.value <= log_px + 1e-10).all()
    assert (bound.value < log_px - 1e-6).any()  # an untrained q is not the posterior
    tight = model.elbo(batch, estimator="exact", q=model.posterior(batch))
    torch.testing.assert_close(tight.value, log_px, rtol=0, atol=1e-10)
    torch.testing.assert_close(bound.value, bound.reconstruction - bound.kl)


def test_posterior_is_bayes_rule_on_the_public_prior():
    model, batch = _double("exact"), _batch()
    post, prior = model.posterior(batch), model.prior(batch)
    for dist in (post, prior):
        assert dist.batch_shape == batch["tgt_out"].shape
        torch.testing.assert_close(dist.probs.sum(-1), torch.ones(dist.batch_shape, dtype=torch.float64))
    # posterior = prior x emission, normalised; sum_t log sum_m alpha p = log_marginal
    run = model.decode(batch)
    torch.testing.assert_close(prior.logits, run.log_alpha - run.log_alpha.logsumexp(-1, keepdim=True))
    emission = model.core.attention.emission_log_probs(run.hidden, run.memory, batch["tgt_out"], run.memory_mask)
    mask = run.target_mask
    joint = torch.where(mask[..., None], run.log_alpha + emission, run.log_alpha)  # nothing observed at padding
    torch.testing.assert_close(post.logits, joint - joint.logsumexp(-1, keepdim=True))
    torch.testing.assert_close(torch.where(mask, joint.logsumexp(-1), 0.0).sum(1), model.log_marginal(batch))
    with pytest.raises(NotImplementedError):
        _double("soft").prior(batch)


@pytest.mark.parametrize("mode", MODES)
def test_training_marginal_equals_stepwise_decoder(mode):
    """Teacher-forced decoder_step distributions: normalised, and they score the data like log_marginal.

    A pruned head decodes with its pruned scores: each step sums to the prior mass kept (``<= 1``),
    and they score the data like its bound, the ELBO."""
    extended, pruned = mode == "copy", mode in TOP_K
    model, batch = _double(mode), _batch(1, extended=extended)
    targets = batch["tgt_out_ext"] if extended else batch["tgt_out"]
    state, size = model.decoder_start(batch)
    total = torch.zeros(size, dtype=torch.float64)
    with torch.no_grad():
        for t in range(batch["tgt_in"].shape[1]):
            log_probs, state = model.decoder_step(state, batch["tgt_in"][:, t])
            assert log_probs.shape == (size, V + 1 if extended else V)
            if pruned:
                assert (log_probs.logsumexp(-1) <= 1e-12).all()
            else:
                torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(size, dtype=torch.float64))
            step = log_probs.gather(1, targets[:, t : t + 1]).squeeze(1)
            total += torch.where(t < batch["tgt_lengths"], step, 0.0)
        torch.testing.assert_close(total, model.elbo(batch).value if pruned else model.log_marginal(batch))


@pytest.mark.parametrize("mode", ["soft", "exact", "copy", "elbo-enum", "exact-top3"])
def test_beam_of_one_equals_greedy(mode):
    model, batch = _double(mode, seed=3), _batch(2, extended=mode == "copy")
    greedy = model.generate(batch, method="greedy", max_length=8)
    beam = model.generate(batch, method="beam", beam_size=1, max_length=8)
    assert torch.equal(greedy.tokens, beam.tokens) and torch.equal(greedy.lengths, beam.lengths)
    torch.testing.assert_close(greedy.scores, beam.scores)
    wide = model.generate(batch, beam_size=4, max_length=8, length_penalty=0.6)
    assert wide.tokens.shape[0] == batch["src"].shape[0] and (wide.lengths <= 8).all()


@pytest.mark.parametrize("mode", ["exact", "copy", "elbo-enum", "exact-top3"])
def test_padding_invariance_against_single_examples(mode):
    extended = mode == "copy"
    model, batch = _double(mode), _batch(4, extended=extended)
    together = model.log_marginal(batch)
    bound = model.elbo(batch).value if mode in ("elbo-enum", "exact-top3") else None
    for b in range(batch["src"].shape[0]):
        s, t = int(batch["src_lengths"][b]), int(batch["tgt_lengths"][b])
        single = {k: v[b : b + 1] for k, v in batch.items()}
        for key in ("src", "src_ext"):
            if key in single:
                single[key] = single[key][:, :s]
        for key in ("tgt_in", "tgt_out", "tgt_out_ext"):
            if key in single:
                single[key] = single[key][:, :t]
        torch.testing.assert_close(model.log_marginal(single)[0], together[b])
        if bound is not None:
            torch.testing.assert_close(model.elbo(single).value[0], bound[b])


def test_reinforce_gradient_is_unbiased():
    """Mean of score-function gradients (w.r.t. q's logits and a decoder weight) = enumerated gradient."""
    model, batch = _double("elbo-sample"), _batch(5, size=2, src_len=3, tgt_len=3)
    mask = lengths_to_mask(batch["src_lengths"], 3)[:, None, :]
    logits = torch.randn(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    weight = model.core.attention.output_projection.weight

    def gradients(estimator, **kw):
        bound = model.elbo(batch, estimator=estimator, q=MaskedCategorical(logits, mask), **kw)
        return torch.cat([g.flatten() for g in torch.autograd.grad(bound.surrogate.sum(), [logits, weight])])

    exact = gradients("exact")
    torch.manual_seed(0)
    draws = torch.stack([gradients("score_function", num_samples=500) for _ in range(16)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    # 5 standard errors: the spread is itself estimated from 16 draws (t with 15 d.o.f.)
    assert ((mean - exact).abs() <= 5 * se + 1e-9).all(), ((mean - exact).abs() / se).max()
    assert (se > 0).any()


def test_gumbel_hard_sample_estimates_the_elbo_without_bias():
    model, batch = _double("elbo-gumbel"), _batch(6, size=2, src_len=4, tgt_len=3)
    exact = model.elbo(batch, estimator="exact").value
    torch.manual_seed(0)
    with torch.no_grad():
        draws = torch.stack([model.elbo(batch, num_samples=200).value for _ in range(16)])
    se = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - exact).abs() <= 5 * se + 1e-9).all()


def test_errors():
    with pytest.raises(ValueError, match="mode"):
        make_model("hard")
    with pytest.raises(ValueError, match="even"):
        LatentAlignmentSeq2Seq.from_mode("soft", V, V, hidden_size=7)
    batch = _batch()
    with pytest.raises(UnsupportedObjectiveError):
        make_model("soft").elbo(batch)
    with pytest.raises(NotImplementedError):
        make_model("soft").posterior(batch)
    with pytest.raises(ValueError, match="src_ext"):
        LatentAlignmentSeq2Seq.from_mode("copy", V, V + 1, hidden_size=8).log_marginal(batch)
    with pytest.raises(ValueError, match="src_lengths"):
        make_model("soft").log_marginal({**batch, "src_lengths": batch["src_lengths"] * 0})
    with pytest.raises(ValueError, match="bos_id"):
        LatentAlignmentSeq2Seq.from_mode("soft", V, V, hidden_size=8).generate(batch)
    with pytest.raises(ValueError, match="estimator"):
        make_model("elbo-enum").elbo(batch, estimator="wake-sleep")


# ---------------------------------------------------------------------------------------- ignore_index
IGNORE = -100


def _ignored_padding(batch):
    """``batch`` with every row as long as the longest and the targets past each true length set to
    ``ignore_index``: the same examples, their padding marked by the targets alone."""
    T = batch["tgt_out"].shape[1]
    pad = torch.arange(T) >= batch["tgt_lengths"][:, None]
    out = {**batch, "tgt_lengths": torch.full_like(batch["tgt_lengths"], T)}
    for key in ("tgt_out", "tgt_out_ext"):
        if key in batch:
            out[key] = batch[key].masked_fill(pad, IGNORE)
    return out


def _loss_and_gradients(model, batch, objective, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model.loss(batch, objective)
    loss.value.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss, grads


@pytest.mark.parametrize("mode", MODES)
def test_ignored_targets_contribute_nothing(mode):
    """Padding marked only by ``ignore_index`` (``tgt_lengths`` = T) gives the loss, metrics, token
    counts and gradients of the same batch with its true lengths (the manual mask), every objective."""
    model, batch = _double(mode), _batch(7, extended=mode == "copy")
    ignored = _ignored_padding(batch)
    assert torch.equal(model.num_tokens(ignored), batch["tgt_lengths"])
    for objective in model.objectives:
        expected, expected_grads = _loss_and_gradients(model, batch, objective, seed=3)
        actual, actual_grads = _loss_and_gradients(model, ignored, objective, seed=3)
        torch.testing.assert_close(actual.value, expected.value)
        assert set(actual.metrics) == set(expected.metrics)
        for name in expected.metrics:
            torch.testing.assert_close(actual.metrics[name], expected.metrics[name])
        assert set(actual_grads) == set(expected_grads)
        for name in expected_grads:
            torch.testing.assert_close(actual_grads[name], expected_grads[name], msg=name)


def _ignore_inside(batch, key="tgt_out"):
    """``batch`` with the targets at real positions (0, 1) and (1, 2) set to ``ignore_index`` and
    the bool ``[B, T]`` mask of the positions still scored."""
    T = batch[key].shape[1]
    keep = torch.arange(T) < batch["tgt_lengths"][:, None]
    out = {**batch}
    for k in ("tgt_out", "tgt_out_ext"):
        if k in batch:
            out[k] = batch[k].clone()
            out[k][0, 1] = out[k][1, 2] = IGNORE
    keep[0, 1] = keep[1, 2] = False
    return out, keep


@pytest.mark.parametrize("mode", ["soft", "exact", "copy", "exact-top3"])
def test_ignored_targets_inside_a_row_against_a_manual_mask(mode):
    """Ignored real positions: the exact marginal (and a pruned head's bound) is the sum of the
    head's per-token log-probabilities of the unchanged batch over the positions kept."""
    extended = mode == "copy"
    model, batch = _double(mode), _batch(8, extended=extended)
    assert batch["tgt_lengths"][0] >= 2 and batch["tgt_lengths"][1] >= 3
    ignored, keep = _ignore_inside(batch)
    run = model.decode(batch)
    context = {**run.context, **model.head.batch_context(batch)}
    targets = model.head.batch_targets(batch)
    exact = model.head.exact_log_prob(run.hidden, targets, **context)
    torch.testing.assert_close(model.log_marginal(ignored), (exact * keep).sum(1))
    assert torch.equal(model.num_tokens(ignored), keep.sum(1))
    if mode in TOP_K:
        pruned = model.head.log_prob(run.hidden, targets, **context)
        bound = model.elbo(ignored)
        torch.testing.assert_close(bound.value, (pruned * keep).sum(1))
        torch.testing.assert_close(bound.value, bound.reconstruction - bound.kl)


@pytest.mark.parametrize("estimator", ["exact", "score_function", "gumbel_softmax"])
def test_ignored_targets_inside_a_row_leave_the_elbo_terms_of_the_others(estimator):
    """With the inference network's ``q`` of the ignored batch, the KL is the sum over the kept
    positions of ``KL(q_t || alpha_t)`` and (enumerated) the ELBO that of
    ``E_q[log p(y_t | h_t, s_m)] - KL(q_t || alpha_t)``, both computed from the unchanged batch."""
    mode = {"exact": "elbo-enum", "score_function": "elbo-sample", "gumbel_softmax": "elbo-gumbel"}[estimator]
    model, batch = _double(mode), _batch(8)
    ignored, keep = _ignore_inside(batch)
    q = model.approximate_posterior(ignored)
    torch.manual_seed(1)
    actual = model.elbo(ignored, estimator=estimator, q=q)
    run = model.decode(batch)
    emission = model.head.emission_log_probs(run.hidden, batch["tgt_out"], run.memory, run.memory_mask)
    prior = MaskedCategorical(run.log_alpha, run.memory_mask[:, None, :])
    terms = (q.probs * emission.masked_fill(~run.memory_mask[:, None, :], 0.0)).sum(-1)
    kl = torch.distributions.kl_divergence(q, prior)
    torch.testing.assert_close(actual.kl, (kl * keep).sum(1))
    assert torch.isfinite(actual.value).all()
    if estimator == "exact":
        torch.testing.assert_close(actual.value, ((terms - kl) * keep).sum(1))


def test_target_ids_out_of_range_name_the_batch_key():
    batch = _batch(9)
    T = batch["tgt_out"].shape[1]
    real = torch.arange(T) < batch["tgt_lengths"][:, None]
    too_large = {**batch, "tgt_out": batch["tgt_out"].clone()}
    too_large["tgt_out"][1, 1] = V  # row 1 is full length
    for mode in ("soft", "exact", "elbo-enum", "exact-top3"):
        model = make_model(mode)
        with pytest.raises(ValueError, match=r"batch\['tgt_out'\] must hold target ids in 0..8 .* got ids \d+..9"):
            model.loss(too_large, model.objectives[0])
    negative = {**batch, "tgt_out": batch["tgt_out"].clone()}
    negative["tgt_out"][0, 0] = -1
    with pytest.raises(ValueError, match=r"batch\['tgt_out'\] must hold target ids .*ignore_index = -100"):
        make_model("exact").log_marginal(negative)
    # -1 is fine when it is the model's ignore_index (and then -100 is out of range)
    minus_one = make_model("exact", ignore_index=-1)
    assert minus_one.num_tokens(negative)[0] == batch["tgt_lengths"][0] - 1
    assert torch.isfinite(minus_one.log_marginal(negative)).all()
    with pytest.raises(ValueError, match=r"ignore_index = -1"):
        minus_one.log_marginal(_ignored_padding(batch))
    # junk past tgt_lengths is never read
    junk = {**batch, "tgt_out": batch["tgt_out"].masked_fill(~real, 12345)}
    model = make_model("exact")
    torch.testing.assert_close(model.log_marginal(junk), model.log_marginal(batch))
    # the copy head scores extended ids (past V) but refuses negative ones, naming tgt_out_ext
    extended = _batch(9, extended=True)
    extended["tgt_out_ext"][0, 0] = -7
    with pytest.raises(ValueError, match=r"batch\['tgt_out_ext'\] must hold target ids in 0 or more"):
        make_model("copy").log_marginal(extended)
