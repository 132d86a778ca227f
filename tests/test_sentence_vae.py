"""SentenceVAE: the bounds against a marginal computed by quadrature, the analytic KL against Monte
Carlo, the CNN decoder's causality and receptive field, step-wise decoding against teacher forcing,
and the training options (free bits, word dropout)."""

import math

import pytest
import torch
from contract import ToyCorpus, lm_batch, mixture_batches
from torch.distributions import kl_divergence

from latentnlp import objectives
from latentnlp.models import SentenceVAE
from latentnlp.models.sentence_vae import DilatedCNNDecoder
from latentnlp.schedules import LinearWarmup
from latentnlp.training import TrainConfig, Trainer

V = 12


def small(decoder="lstm", **kwargs):
    torch.manual_seed(0)
    return SentenceVAE(V, 8, 10, kwargs.pop("latent_size", 3), decoder=decoder, bos_id=0, eos_id=1, **kwargs)


def batch(seed=0, **kwargs):
    return lm_batch(torch.Generator().manual_seed(seed), vocab_size=V, **kwargs)


# ---- the bounds against the exact marginal ---------------------------------------------------------


def _one_dimensional_model(decoder):
    """A model with a 1-d latent whose decoder leans on z, in float64, and log p(x) by quadrature."""
    model = small(decoder, latent_size=1, dilations=(1,)).double().eval()
    with torch.no_grad():
        if decoder == "lstm":
            model.initial_cell.weight.mul_(4.0)
            model.decoder.weight_ih_l0[:, -1].mul_(6.0)
        else:
            model.decoder.input.weight[:, -1].mul_(8.0)
        # q(z | x) = N(0.5, 0.8^2) whatever x: a poor posterior, so the bounds have a gap to close
        model.posterior_params.weight.zero_()
        model.posterior_params.bias.copy_(torch.tensor([0.5, 2 * math.log(0.8)]))
    data = batch(3, batch_size=3, max_len=4)
    inputs, targets, _, mask = model._check_batch(data)
    z = torch.linspace(-12.0, 12.0, 6001, dtype=torch.float64)
    with torch.no_grad():
        log_lik = model._log_likelihood(z.view(-1, 1, 1).expand(-1, 3, 1), inputs, targets, mask)  # [Z, B]
    log_prior = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    log_px = torch.logsumexp(log_lik + log_prior[:, None], 0) + math.log(float(z[1] - z[0]))
    return model, data, log_px


@pytest.mark.parametrize("decoder", ["lstm", "cnn"])
def test_iwae_rises_with_samples_towards_the_quadrature_marginal(decoder):
    model, data, log_px = _one_dimensional_model(decoder)
    torch.manual_seed(1)
    repeats = 50
    copies = {k: v.repeat(repeats, *([1] * (v.dim() - 1))) for k, v in data.items()}  # R copies of each row
    means, errors = [], []
    with torch.no_grad():
        for s in (1, 8, 64, 256):
            draws = model.iwae(copies, s).view(repeats, -1)  # [R, B]
            means.append(draws.mean(0))
            errors.append(draws.std(0) / math.sqrt(repeats))
    gap = [float((log_px - m).sum()) for m in means]
    for m, e in zip(means, errors):  # a lower bound of log p(x), row by row
        assert torch.all(m <= log_px + 4 * e + 1e-6), (m, log_px, e)
    for (a, ea), (b, eb) in zip(zip(means, errors), zip(means[1:], errors[1:])):  # rising with S
        assert float(b.sum()) >= float(a.sum()) - 4 * float((ea.pow(2) + eb.pow(2)).sum().sqrt())
    assert gap[0] > 0.3, gap  # the test has a gap to close
    assert gap[-1] < 0.2 * gap[0], gap


@pytest.mark.parametrize("decoder", ["lstm", "cnn"])
def test_one_sample_iwae_is_the_elbo_in_expectation(decoder):
    model, data, _ = _one_dimensional_model(decoder)
    torch.manual_seed(2)
    n = 2000
    copies = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in data.items()}
    with torch.no_grad():
        iw = model.iwae(copies, 1).view(n, -1)
        elbo = model.elbo(copies).value.view(n, -1)
    se = (iw.var(0) / n + elbo.var(0) / n).sqrt()
    assert torch.all((iw.mean(0) - elbo.mean(0)).abs() <= 4 * se), (iw.mean(0), elbo.mean(0), se)


def test_kl_is_analytic_and_matches_monte_carlo():
    model, data = small().double(), batch()
    bound = model.elbo(data)
    q = model.posterior(data)
    prior = q.__class__.standard(q.batch_shape, 3, dtype=torch.float64)
    z = q.sample((20000,), generator=torch.Generator().manual_seed(0))
    samples = q.log_prob(z) - prior.log_prob(z)  # [S, B]
    se = samples.std(0) / math.sqrt(z.shape[0])
    assert torch.all((samples.mean(0) - bound.kl).abs() <= 4 * se), (samples.mean(0), bound.kl, se)
    assert torch.allclose(bound.kl, kl_divergence(q, prior))
    assert torch.allclose(bound.value, bound.reconstruction - bound.kl)


def test_iwae_loss_reports_the_elbo_beside_the_importance_weighted_nll():
    model, data = small().double(), batch()
    torch.manual_seed(0)
    loss = model.loss(data, "iwae", num_samples=16)
    torch.manual_seed(0)
    chunked = model.loss(data, "iwae", num_samples=16, chunk_size=5)
    assert torch.allclose(loss.metrics["nll"], chunked.metrics["nll"])
    assert torch.allclose(loss.metrics["neg_elbo"], chunked.metrics["neg_elbo"])
    m = loss.metrics
    assert torch.allclose(m["neg_elbo"], m["kl"] - m["reconstruction"])
    assert torch.allclose(loss.value, m["nll"].sum() / m["tokens"].sum())


# ---- the CNN decoder ------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel_size, dilations", [(3, (1, 2, 4)), (2, (1, 1)), (4, (2,))])
def test_cnn_decoder_is_causal_with_the_stated_receptive_field(kernel_size, dilations):
    torch.manual_seed(0)
    net = DilatedCNNDecoder(5, 6, kernel_size, dilations).double()
    R = net.receptive_field
    assert R == 1 + (kernel_size - 1) * sum(dilations)
    T = R + 6
    x = torch.randn(2, T, 5, dtype=torch.float64)
    out = net(x)
    for t in range(T):
        other = x.clone()
        other[:, t] += torch.randn(2, 5, dtype=torch.float64)
        changed = (net(other) - out).abs().amax((0, 2)) > 1e-12  # [T]
        window = (torch.arange(T) >= t) & (torch.arange(T) < t + R)
        assert not changed[~window].any(), (t, changed)  # nothing before t, nothing R or more after
        assert changed[t] and (t + R - 1 >= T or changed[t + R - 1]), (t, changed)  # the window's two ends


def test_cnn_vae_log_likelihood_ignores_the_future():
    model, data = small("cnn").double(), batch(max_len=7)
    assert model.receptive_field == 1 + 2 * (1 + 2 + 4) and small().receptive_field is None
    inputs, targets, lengths, mask = model._check_batch(data)
    z = torch.randn(1, inputs.shape[0], 3, dtype=torch.float64)
    first = model._log_likelihood(z, inputs, targets, mask)
    # the words of rows cut to length 3 beyond position 3 do not matter
    cut = mask & (torch.arange(inputs.shape[1]) < 3)
    other_in = torch.where(cut, inputs, torch.randint(0, V, inputs.shape))
    other_tg = torch.where(cut, targets, torch.randint(0, V, targets.shape))
    a = model._log_likelihood(z, inputs, targets, cut)
    b = model._log_likelihood(z, other_in, other_tg, cut)
    assert torch.allclose(a, b)
    assert not torch.allclose(first, a)


# ---- decoding ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("decoder", ["lstm", "cnn"])
def test_step_decoding_matches_teacher_forcing(decoder):
    model = small(decoder).double().eval()
    data = batch(max_len=24)  # longer than the CNN's receptive field: steps read only its last R inputs
    assert decoder == "lstm" or model.receptive_field < 20
    inputs, targets, lengths, mask = model._check_batch(data)
    z = torch.randn(inputs.shape[0], 3, dtype=torch.float64)
    state, n = model.decoder_start({"z": z})
    assert n == inputs.shape[0]
    total = torch.zeros(n, dtype=torch.float64)
    for t in range(inputs.shape[1]):
        log_probs, state = model.decoder_step(state, inputs[:, t])
        total += torch.where(mask[:, t], log_probs.gather(1, targets[:, t : t + 1]).squeeze(1), 0.0)
    assert torch.allclose(total, model._log_likelihood(z[None], inputs, targets, mask)[0])


@pytest.mark.parametrize("decoder", ["lstm", "cnn"])
def test_generate_and_interpolate(decoder):
    model, data = small(decoder).eval(), batch()
    greedy = model.generate(data, max_length=9)
    assert greedy.tokens.shape[0] == 5 and greedy.tokens.shape[1] <= 9
    beam1 = model.generate(data, method="beam", beam_size=1, max_length=9)
    assert torch.equal(beam1.tokens, greedy.tokens)
    beam = model.generate(data, method="beam", beam_size=4, max_length=9)
    assert torch.all(beam.scores >= greedy.scores - 1e-5)  # beam search finds at least the greedy score
    g = torch.Generator().manual_seed(0)
    prior = model.generate(num_samples=7, method="sample", max_length=9, generator=g)
    again = model.generate(num_samples=7, method="sample", max_length=9, generator=torch.Generator().manual_seed(0))
    assert prior.tokens.shape[0] == 7 and torch.equal(prior.tokens, again.tokens)
    for row, length in zip(prior.tokens, prior.lengths):
        assert torch.all(row[length:] == 1)  # <eos> then <eos> padding
        if length < prior.tokens.shape[1] or row[length - 1] == 1:
            assert row[length - 1] == 1
    other = batch(1)
    path = model.interpolate(data, other, steps=4, max_length=9)
    assert path.tokens.shape[:2] == (4, 5)
    ends = [model.generate(b, max_length=9) for b in (data, other)]
    for k, end in ((0, ends[0]), (3, ends[1])):
        width = min(path.tokens.shape[-1], end.tokens.shape[-1])
        assert torch.equal(path.lengths[k], end.lengths)
        assert torch.equal(path.tokens[k, :, :width], end.tokens[:, :width])


# ---- training options -------------------------------------------------------------------------------


def test_free_bits_changes_the_surrogate_only():
    model, data = small().double(), batch()
    torch.manual_seed(0)
    plain = model.elbo(data, kl_weight=0.5)
    torch.manual_seed(0)
    floored = model.elbo(data, kl_weight=0.5, free_bits=10.0)
    assert torch.allclose(plain.value, floored.value) and torch.allclose(plain.kl, floored.kl)
    q = model.posterior(data)
    per_dim = kl_divergence(q.base_dist, q.__class__.standard(q.batch_shape, 3, dtype=torch.float64).base_dist)
    expected = plain.reconstruction - 0.5 * objectives.free_bits(per_dim, 10.0)
    assert torch.allclose(floored.surrogate, expected)
    # every dimension sits below a 10-nat floor: the KL term gives the encoder no gradient
    params = list(model.posterior_params.parameters())
    from_reconstruction = torch.autograd.grad(floored.reconstruction.sum(), params, retain_graph=True)
    from_surrogate = torch.autograd.grad(floored.surrogate.sum(), params)
    for a, b in zip(from_reconstruction, from_surrogate):
        assert torch.allclose(a, b)
    from_plain = torch.autograd.grad(plain.surrogate.sum(), params)
    assert not torch.allclose(from_plain[0], from_surrogate[0])


def test_free_bits_keep_a_score_function_surrogate():
    """Free bits replace only the weighted KL inside the estimator's surrogate: under the score function
    the surrogate still carries its ``log q`` term, ``surrogate_fb = surrogate + w (KL - F)`` exactly."""
    model, data = small().double(), batch()
    kwargs = {"estimator": "score_function", "kl_weight": 0.5, "num_samples": 2}
    plain = model.elbo(data, generator=torch.Generator().manual_seed(3), **kwargs)
    floored = model.elbo(data, free_bits=10.0, generator=torch.Generator().manual_seed(3), **kwargs)
    q = model.posterior(data)
    per_dim = kl_divergence(q.base_dist, q.__class__.standard(q.batch_shape, 3, dtype=torch.float64).base_dist)
    expected = plain.surrogate + 0.5 * (plain.kl - objectives.free_bits(per_dim, 10.0))
    assert torch.allclose(floored.surrogate, expected)
    # every dimension is under the floor, so only the score-function term can reach the encoder: it must
    grads = torch.autograd.grad(floored.surrogate.sum(), list(model.posterior_params.parameters()))
    assert any(g.abs().sum() > 0 for g in grads)


def test_word_dropout_acts_in_training_mode_only():
    dropped = small(word_dropout=1.0, unk_id=2)
    kept = small()
    kept.load_state_dict(dropped.state_dict())
    data = batch()
    dropped.eval(), kept.eval()
    torch.manual_seed(0)
    a = dropped.elbo(data).reconstruction
    torch.manual_seed(0)
    assert torch.equal(a, kept.elbo(data).reconstruction)
    dropped.train()
    seen = {}
    original = dropped._log_likelihood

    def spy(z, inputs, targets, mask):
        seen["inputs"] = inputs
        return original(z, inputs, targets, mask)

    dropped._log_likelihood = spy
    dropped.elbo(data)
    bos_or_eos = (data["inputs"] == 0) | (data["inputs"] == 1)
    mask = torch.arange(data["inputs"].shape[1]) < data["lengths"][:, None]
    assert torch.all(seen["inputs"][mask & ~bos_or_eos] == 2)
    assert torch.all(seen["inputs"][mask & bos_or_eos] == data["inputs"][mask & bos_or_eos])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unk_id"):
        SentenceVAE(V, 4, 4, 2, word_dropout=0.3)
    with pytest.raises(ValueError, match="decoder"):
        SentenceVAE(V, 4, 4, 2, decoder="gru")
    with pytest.raises(ValueError, match="latent_size"):
        SentenceVAE(V, 4, 4, 0)
    with pytest.raises(ValueError, match="dilations"):
        SentenceVAE(V, 4, 4, 2, decoder="cnn", dilations=())
    model = small()
    bad = batch()
    bad["targets"] = bad["targets"] + V
    with pytest.raises(ValueError, match="token ids"):
        model.elbo(bad)
    with pytest.raises(ValueError, match="lengths"):
        model.elbo({**batch(), "lengths": torch.tensor([9, 1, 1, 1, 1])})
    with pytest.raises(ValueError, match="bos_id"):
        SentenceVAE(V, 4, 4, 2).generate(num_samples=2)
    with pytest.raises(ValueError, match="z must be"):
        model.generate(z=torch.zeros(2, 5))


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path):
    """KL annealing, free bits and word dropout (random numbers) through the trainer: stopping after
    3 updates and resuming to 6 ends with the parameters of a straight run of 6."""
    train, valid = ToyCorpus(mixture_batches(4, vocab_size=V)), ToyCorpus(mixture_batches(1, vocab_size=V, seed=1))

    def fit(folder, max_steps):
        config = TrainConfig(
            objective="elbo",
            objective_kwargs={"kl_weight": LinearWarmup(0.1, 1.0, 6), "free_bits": 0.1},
            lr=1e-2,
            max_epochs=2,
            max_steps=max_steps,
            log_every=2,
            progress=False,
            device="cpu",
            output_dir=str(tmp_path / folder),
        )
        model = small("cnn", word_dropout=0.3, unk_id=2)
        return model, Trainer(model, config, train, valid).fit()

    straight, _ = fit("straight", 6)
    fit("resumed", 3)
    (tmp_path / "resumed" / "finished.json").unlink()
    resumed, summary = fit("resumed", 6)
    assert summary["resumed"] and summary["steps"] == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
