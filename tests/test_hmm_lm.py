"""HMMLanguageModel: exact marginal against enumeration and the chain DP, streams, low rank."""

import itertools

import pytest
import torch

from latentnlp.models.hmm_lm import HMMLanguageModel


def enumerate_log_marginal(model: HMMLanguageModel, words: list[int]) -> torch.Tensor:
    """log p(x) = log sum_z p(z_0) prod p(z_t | z_{t-1}) prod p(x_t | z_t), by brute force."""
    params = model.log_parameters()
    trans = model.transition(params).dense()
    terms = []
    for z in itertools.product(range(model.num_states), repeat=len(words)):
        score = params["init"][z[0]] + sum(params["emission"][z[t], w] for t, w in enumerate(words))
        score = score + sum(trans[z[t - 1], z[t]] for t in range(1, len(words)))
        terms.append(score)
    return torch.logsumexp(torch.stack(terms), 0)


@pytest.mark.parametrize("rank", [None, 2])
def test_log_marginal_matches_enumeration(rank):
    torch.manual_seed(0)
    model = HMMLanguageModel(vocab_size=7, num_states=3, embedding_size=8, transition_rank=rank).double().eval()
    targets = torch.randint(7, (3, 4))
    lengths = torch.tensor([4, 2, 1])
    log_px = model.log_marginal({"targets": targets, "lengths": lengths})
    for b in range(3):
        expected = enumerate_log_marginal(model, targets[b, : lengths[b]].tolist())
        torch.testing.assert_close(log_px[b], expected)


@pytest.mark.parametrize("rank", [None, 3])
def test_log_marginal_equals_chain_posterior_and_normalises(rank):
    torch.manual_seed(1)
    model = HMMLanguageModel(vocab_size=6, num_states=5, embedding_size=8, transition_rank=rank).double().eval()
    sequences = torch.cartesian_prod(*[torch.arange(6)] * 3)
    batch = {"targets": sequences, "lengths": torch.full((len(sequences),), 3)}
    log_px = model.log_marginal(batch)
    torch.testing.assert_close(log_px, model.posterior(batch).log_partition)
    torch.testing.assert_close(torch.logsumexp(log_px, 0), torch.zeros((), dtype=torch.float64))


@pytest.mark.parametrize("rank", [None, 2])
def test_stream_chunks_add_up_to_the_whole(rank):
    torch.manual_seed(2)
    model = HMMLanguageModel(vocab_size=9, num_states=4, embedding_size=8, transition_rank=rank).double().eval()
    targets = torch.randint(9, (2, 10))
    whole = model.log_marginal({"targets": targets, "lengths": torch.tensor([10, 10])})
    model.reset_state()
    parts = sum(
        model.log_marginal({"targets": targets[:, s:e], "lengths": torch.tensor([e - s] * 2), "stream": True})
        for s, e in [(0, 3), (3, 7), (7, 10)]
    )
    torch.testing.assert_close(parts, whole)
    # the carried state is part of the state dict, so a restored model continues the stream
    model.reset_state()
    model.log_marginal({"targets": targets[:, :3], "lengths": torch.tensor([3, 3]), "stream": True})
    restored = HMMLanguageModel(vocab_size=9, num_states=4, embedding_size=8, transition_rank=rank).double().eval()
    restored.load_state_dict(model.state_dict())
    rest = {"targets": targets[:, 3:], "lengths": torch.tensor([7, 7]), "stream": True}
    torch.testing.assert_close(restored.log_marginal(rest), model.log_marginal(rest))


def test_padding_does_not_change_marginal_or_gradient():
    torch.manual_seed(3)
    model = HMMLanguageModel(vocab_size=8, num_states=4, embedding_size=8).double().eval()
    targets = torch.randint(8, (2, 6))
    lengths = torch.tensor([6, 3])
    other = targets.clone()
    other[1, 3:] = torch.randint(8, (3,))
    first = model.log_marginal({"targets": targets, "lengths": lengths})
    grads_first = torch.autograd.grad(first[1], model.word_embedding)
    second = model.log_marginal({"targets": other, "lengths": lengths})
    grads_second = torch.autograd.grad(second[1], model.word_embedding)
    torch.testing.assert_close(first, second)
    torch.testing.assert_close(grads_first, grads_second)


def test_state_dropout_trains_and_evaluates_on_all_states():
    torch.manual_seed(4)
    model = HMMLanguageModel(vocab_size=10, num_states=8, embedding_size=8, state_dropout=0.5)
    batch = {"targets": torch.randint(10, (4, 5)), "lengths": torch.tensor([5, 4, 3, 2]), "stream": True}
    loss = model.loss(batch)
    loss.value.backward()
    assert torch.isfinite(loss.value)
    assert model.state_embedding.grad is not None
    # a second stream batch after a different dropout draw is still a finite, valid continuation
    assert torch.isfinite(model.loss(batch).value)
    model.eval()
    model.reset_state()
    assert torch.isfinite(model.log_marginal(batch)).all()


def test_generate_and_top_words_shapes():
    model = HMMLanguageModel(vocab_size=10, num_states=4, embedding_size=8)
    sample = model.generate(num_samples=3, length=7, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (3, 7) and sample.max() < 10
    assert model.top_words(5).shape == (4, 5)


def test_bad_batch_raises_value_error():
    model = HMMLanguageModel(vocab_size=10, num_states=4, embedding_size=8)
    with pytest.raises(ValueError, match="targets"):
        model.log_marginal({"targets": torch.zeros(5, dtype=torch.long), "lengths": torch.tensor([5])})
    with pytest.raises(ValueError, match="lengths"):
        model.log_marginal({"targets": torch.zeros(2, 5, dtype=torch.long), "lengths": torch.tensor([5])})


def test_log_space_fallback_when_probability_space_underflows():
    """A transition of probability e^-100 that carries all the mass is subnormal in float32."""

    class FixedTables(HMMLanguageModel):
        def log_parameters(self, states=None):
            nearly_one = (-torch.expm1(torch.tensor(-100.0))).log()  # log(1 - e^-100), not NaN
            return {
                "init": torch.tensor([0.0, float("-inf")]),
                "trans": torch.tensor([[nearly_one, -100.0], [nearly_one, -100.0]]),
                "emission": torch.tensor([[0.0, -200.0], [float("-inf"), 0.0]]),
            }

    model = FixedTables(vocab_size=2, num_states=2, embedding_size=4).eval()
    batch = {"targets": torch.tensor([[0, 1]]), "lengths": torch.tensor([2])}
    # log p(x) = log(e^-200 + e^-100) = -100 (+ e^-100), out of reach of float32 probabilities
    torch.testing.assert_close(model.log_marginal(batch), torch.tensor([-100.0]))


def test_validation_catches_zero_length_rows_and_out_of_range_targets():
    model = HMMLanguageModel(vocab_size=10, num_states=4, embedding_size=8).eval()
    targets = torch.randint(10, (2, 5))
    with pytest.raises(ValueError, match="lengths"):
        model.log_marginal({"targets": targets, "lengths": torch.tensor([5, 0])})
    with pytest.raises(ValueError, match="lengths"):
        model.log_marginal({"targets": targets, "lengths": torch.tensor([6, 5])})
    with pytest.raises(ValueError, match="targets"):
        model.log_marginal({"targets": torch.full((2, 5), 10), "lengths": torch.tensor([5, 5])})
    # ids past a row's length are padding: never looked at, whatever they hold
    padded = targets.clone()
    padded[1, 3:] = -7
    torch.testing.assert_close(
        model.log_marginal({"targets": padded, "lengths": torch.tensor([5, 3])}),
        model.log_marginal({"targets": targets, "lengths": torch.tensor([5, 3])}),
    )
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:  # validation off: no check (and no synchronisation for one)
        model.log_marginal({"targets": targets, "lengths": torch.tensor([5, 0])})
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def test_low_rank_model_never_builds_the_dense_transition(monkeypatch):
    from latentnlp.transitions import LowRankTransition

    def refuse(self):
        raise AssertionError("LowRankTransition.dense called")

    monkeypatch.setattr(LowRankTransition, "dense", refuse)
    torch.manual_seed(5)
    model = HMMLanguageModel(vocab_size=9, num_states=6, embedding_size=8, transition_rank=2).double().eval()
    batch = {"targets": torch.randint(9, (3, 5)), "lengths": torch.tensor([5, 2, 4])}
    assert torch.isfinite(model.log_marginal(batch)).all()
    for start, end in [(0, 2), (2, 5)]:
        chunk = {"targets": batch["targets"][:, start:end], "lengths": torch.tensor([end - start] * 3), "stream": True}
        assert torch.isfinite(model.log_marginal(chunk)).all()
    posterior = model.posterior(batch)
    assert posterior.marginals.shape == (3, 5, 6)
    samples = posterior.sample((4,), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(posterior.log_prob(samples)).all()
    assert model.generate(num_samples=2, length=4, generator=torch.Generator().manual_seed(1)).shape == (2, 4)


from contract import CHECKS, ModelCase, lm_batch  # noqa: E402

CONTRACT_CASES = [
    ModelCase(
        "hmm-lm/dense", make_model=lambda: HMMLanguageModel(12, 5, 8), make_batch=lambda g: lm_batch(g, vocab_size=12)
    ),
    ModelCase(
        "hmm-lm/low-rank",
        make_model=lambda: HMMLanguageModel(12, 6, 8, transition_rank=2, dropout=0.1),
        make_batch=lambda g: lm_batch(g, vocab_size=12),
    ),
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("case", CONTRACT_CASES, ids=lambda c: c.name)
def test_latent_model_contract(case, check):
    check(case)


def test_a_stream_batch_of_another_size_than_the_carried_state_is_refused():
    model = HMMLanguageModel(vocab_size=7, num_states=3, embedding_size=4)
    model.log_marginal(
        {"targets": torch.zeros(2, 3, dtype=torch.long), "lengths": torch.tensor([3, 2]), "stream": True}
    )
    with pytest.raises(ValueError, match="carried stream state has 2 rows"):
        model.log_marginal(
            {"targets": torch.zeros(3, 3, dtype=torch.long), "lengths": torch.tensor([3, 3, 3]), "stream": True}
        )
    model.reset_state()
    model.log_marginal(
        {"targets": torch.zeros(3, 3, dtype=torch.long), "lengths": torch.tensor([3, 3, 3]), "stream": True}
    )
