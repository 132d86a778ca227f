"""LSTMLanguageModel: exact log marginal, padding invariance, stream state, checkpoints, sampling."""

import io

import pytest
import torch
from contract import CHECKS, ModelCase, lm_batch

from latentnlp.models.base import UnsupportedObjectiveError
from latentnlp.models.lstm_lm import LSTMLanguageModel

V, E, H = 11, 5, 7
OUTPUTS = [
    dict(output="softmax"),
    dict(output="softmax", softmax_input_size=E, tie_weights=True),
    dict(output="mos", num_experts=3, softmax_input_size=4),
]


def _model(seed=0, num_layers=2, **kw):
    torch.manual_seed(seed)
    return LSTMLanguageModel(V, E, H, num_layers, **kw).double()


def _batch(B=3, T=6, lengths=None, seed=1, stream=None):
    g = torch.Generator().manual_seed(seed)
    batch = {
        "inputs": torch.randint(0, V, (B, T), generator=g),
        "targets": torch.randint(0, V, (B, T), generator=g),
        "lengths": torch.full((B,), T) if lengths is None else torch.tensor(lengths),
    }
    if stream is not None:
        batch["stream"] = stream
    return batch


def _manual_log_marginal(model, batch):
    """Step the LSTM one token at a time and score each target with the full output distribution."""
    out = []
    for b in range(batch["inputs"].shape[0]):
        state, total = None, torch.zeros((), dtype=torch.float64)
        for t in range(int(batch["lengths"][b])):
            x = model.embedding(batch["inputs"][b, t].view(1, 1))
            h, state = model.lstm(x, state)
            total = total + model.output_layer.log_probs(h[0, 0])[batch["targets"][b, t]]
        out.append(total)
    return torch.stack(out)


@pytest.mark.parametrize("kw", OUTPUTS)
def test_log_marginal_equals_manual_computation(kw):
    model = _model(**kw)
    batch = _batch(lengths=[6, 2, 4])
    log_px = model.log_marginal(batch)
    assert log_px.shape == (3,)
    torch.testing.assert_close(log_px, _manual_log_marginal(model, batch), rtol=1e-10, atol=1e-10)
    loss = model.loss(batch)
    torch.testing.assert_close(loss.value, -log_px.sum() / 12)
    torch.testing.assert_close(loss.metrics["nll"], -log_px.detach())
    assert loss.metrics["tokens"].tolist() == [6, 2, 4]


@pytest.mark.parametrize("kw", OUTPUTS)
def test_padding_never_changes_results_or_gradients(kw):
    model = _model(**kw)
    short = _batch(T=4, lengths=[4, 2, 3])
    g = torch.Generator().manual_seed(5)
    valid = torch.arange(9) < short["lengths"][:, None]
    padded = {"lengths": short["lengths"]}
    for key in ("inputs", "targets"):  # garbage padding, out-of-range ids too
        garbage = torch.randint(-3, 3 * V, (3, 9), generator=g)
        padded[key] = torch.where(valid, torch.cat([short[key], garbage[:, 4:]], 1), garbage)

    def value_and_grads(batch):
        model.zero_grad()
        value = model.log_marginal(batch)
        value.sum().backward()
        return value.detach(), [p.grad.clone() for p in model.parameters()]

    a, grads_a = value_and_grads(short)
    b, grads_b = value_and_grads(padded)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
    # each row scored alone gives the same number
    for row in range(3):
        alone = {k: v[row : row + 1, : int(short["lengths"][row])] for k, v in short.items() if k != "lengths"}
        alone["lengths"] = short["lengths"][row : row + 1]
        torch.testing.assert_close(model.log_marginal(alone), a[row : row + 1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kw", OUTPUTS)
def test_stream_state_two_halves_equal_one_chunk(kw):
    model = _model(**kw)
    full = _batch(T=8, stream=True)
    whole = model.log_marginal(full)
    model.reset_state()
    halves = [
        {
            "inputs": full["inputs"][:, s],
            "targets": full["targets"][:, s],
            "lengths": torch.full((3,), 4),
            "stream": True,
        }
        for s in (slice(0, 4), slice(4, 8))
    ]
    total = model.log_marginal(halves[0]) + model.log_marginal(halves[1])
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
    # a ragged last chunk continues from the carried state too (rows sorted by length differ)
    ragged = {**full, "lengths": torch.tensor([8, 5, 7]), "stream": False}
    model.reset_state()
    first = model.log_marginal(halves[0])
    second = model.log_marginal({**halves[1], "lengths": torch.tensor([4, 1, 3])})
    torch.testing.assert_close(first + second, model.log_marginal(ragged), rtol=1e-12, atol=1e-12)
    # after a reset the second half starts from zero again, as does any non-stream batch
    model.reset_state()
    fresh = model.log_marginal(halves[1])
    assert not torch.allclose(fresh, model.log_marginal(halves[1]))  # state was carried
    no_stream = {k: v for k, v in halves[1].items() if k != "stream"}
    torch.testing.assert_close(model.log_marginal(no_stream), fresh, rtol=0, atol=0)


def test_carried_state_is_detached_and_taken_at_each_row_length():
    model = _model(output="mos", num_experts=2)
    for seed in (1, 2):  # a backward per batch: no graph reaches back
        model.log_marginal(_batch(seed=seed, stream=True)).sum().backward()
    assert not model.carried["hidden"].requires_grad
    model.reset_state()
    model.log_marginal(_batch(T=6, lengths=[6, 3, 5], stream=True))
    h_padded, c_padded = model.carried["hidden"], model.carried["cell"]
    for row, length in enumerate([6, 3, 5]):
        model.reset_state()
        prefix = {k: v[row : row + 1, :length] for k, v in _batch(T=6).items() if k != "lengths"}
        model.log_marginal({**prefix, "lengths": torch.tensor([length]), "stream": True})
        torch.testing.assert_close(model.carried["hidden"][:, 0], h_padded[:, row], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model.carried["cell"][:, 0], c_padded[:, row], rtol=1e-12, atol=1e-12)


def test_stream_batch_size_mismatch_is_a_value_error():
    model = _model()
    model.log_marginal(_batch(B=3, stream=True))
    with pytest.raises(ValueError, match="batch size 3"):
        model.log_marginal(_batch(B=2, stream=True))
    model.reset_state()
    model.log_marginal(_batch(B=2, stream=True))


def test_resume_from_state_dict_is_bit_identical():
    def train(model, opt, seeds):
        losses = []
        for seed in seeds:
            loss = model.loss(_batch(T=5, seed=seed, stream=True))
            opt.zero_grad()
            loss.value.backward()
            opt.step()
            losses.append(loss.value.detach())
        return losses

    model = _model(output="mos", num_experts=3).float()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    train(model, opt, [1, 2])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    assert model.state_dict()["_extra_state"]["hidden"] is not None
    straight = train(model, opt, [3, 4])

    resumed = _model(seed=9, output="mos", num_experts=3).float()
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=0.01)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["opt"])
    again = train(resumed, resumed_opt, [3, 4])
    for a, b in zip(straight, again):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    # a reset model's state_dict says so, and loading it clears the carried state
    model.reset_state()
    assert model.state_dict()["_extra_state"] == {"hidden": None, "cell": None}
    resumed.load_state_dict(model.state_dict())
    assert resumed.carried == {"hidden": None, "cell": None}


def test_generate_samples_from_the_model():
    model = _model(output="mos", num_experts=3).eval()
    prefix = {"inputs": torch.tensor([[1, 2, 3], [4, 0, 0]]), "lengths": torch.tensor([3, 1])}
    gen = torch.Generator().manual_seed(0)
    tokens = model.generate(prefix, max_length=6, generator=gen)
    assert tokens.shape == (2, 6) and tokens.dtype == torch.long
    assert tokens.min() >= 0 and tokens.max() < V
    assert torch.equal(tokens, model.generate(prefix, max_length=6, generator=torch.Generator().manual_seed(0)))
    # greedy = argmax of the next-token distribution, step by step
    greedy = model.generate(prefix, max_length=3, temperature=0)
    for row, length in enumerate([3, 1]):
        seq = prefix["inputs"][row, :length].tolist()
        for step in range(3):
            x = torch.tensor([seq])
            h, _ = model.lstm(model.embedding(x))
            seq.append(int(model.output_layer.log_probs(h[0, -1]).argmax()))
        assert greedy[row].tolist() == seq[length:]
    # the first sampled token follows p(y | prefix)
    n = 20000
    many = {"inputs": torch.tensor([[1, 2, 3]]).repeat(n, 1), "lengths": torch.full((n,), 3)}
    first = model.generate(many, max_length=1, generator=torch.Generator().manual_seed(1))[:, 0]
    freq = torch.bincount(first, minlength=V).double() / n
    h, _ = model.lstm(model.embedding(torch.tensor([[1, 2, 3]])))
    probs = model.output_layer.log_probs(h[0, -1]).exp().detach()
    assert (freq - probs).abs().max() < 4 * (probs * (1 - probs) / n).sqrt().max() + 1e-3
    # temperature 0.5 sharpens: p^2 renormalised
    first = model.generate(many, max_length=1, temperature=0.5, generator=torch.Generator().manual_seed(2))[:, 0]
    freq = torch.bincount(first, minlength=V).double() / n
    sharp = probs**2 / (probs**2).sum()
    assert (freq - sharp).abs().max() < 4 * (sharp * (1 - sharp) / n).sqrt().max() + 1e-3


def test_generate_stops_at_eos():
    model = _model().eval()
    with torch.no_grad():
        model.output_layer.output_projection.bias[3] = 50.0  # eos = 3 almost surely at every step
    prefix = {"inputs": torch.tensor([[1, 2]]), "lengths": torch.tensor([2])}
    tokens = model.generate(prefix, max_length=4, eos_index=3, generator=torch.Generator().manual_seed(0))
    assert tokens.tolist() == [[3, 3, 3, 3]]


def test_constructor_and_batch_errors():
    with pytest.raises(ValueError, match="output"):
        LSTMLanguageModel(V, E, H, output="sparsemax")
    with pytest.raises(ValueError, match="tie_weights"):
        LSTMLanguageModel(V, E, H, tie_weights=True)  # d = H != E
    with pytest.raises(ValueError, match="num_experts"):
        LSTMLanguageModel(V, E, H, num_experts=4)
    model = _model()
    with pytest.raises(ValueError, match="lengths"):
        model.log_marginal(_batch(lengths=[7, 1, 1]))
    with pytest.raises(ValueError, match="lengths"):
        model.log_marginal(_batch(lengths=[0, 1, 1]))
    with pytest.raises(ValueError, match="token ids"):
        model.log_marginal({**_batch(), "targets": torch.full((3, 6), V)})
    with pytest.raises(ValueError, match="targets"):
        model.log_marginal({**_batch(), "targets": torch.zeros(3, 5, dtype=torch.long)})
    with pytest.raises(ValueError, match="missing"):
        model.log_marginal({"inputs": torch.zeros(3, 5, dtype=torch.long)})
    with pytest.raises(UnsupportedObjectiveError):
        model.loss(_batch(), objective="elbo")


def test_chunked_output_layer_gives_the_same_model():
    a = _model(output="mos", num_experts=3)
    b = _model(output="mos", num_experts=3, max_chunk_elements=4)
    batch = _batch(lengths=[6, 2, 4])
    torch.testing.assert_close(a.log_marginal(batch), b.log_marginal(batch), rtol=1e-12, atol=1e-12)


CONTRACT_CASES = [
    ModelCase(
        "lstm-lm/softmax",
        make_model=lambda: LSTMLanguageModel(12, 6, 8, 2),
        make_batch=lambda g: lm_batch(g, vocab_size=12),
    ),
    ModelCase(
        "lstm-lm/mos",
        make_model=lambda: LSTMLanguageModel(
            12,
            6,
            8,
            2,
            output="mos",
            num_experts=3,
            softmax_input_size=6,
            tie_weights=True,
            dropout=0.2,
            max_chunk_elements=5,
        ),
        make_batch=lambda g: lm_batch(g, vocab_size=12),
    ),
]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__.removeprefix("check_"))
@pytest.mark.parametrize("case", CONTRACT_CASES, ids=lambda c: c.name)
def test_latent_model_contract(case, check):
    check(case)


def test_mixture_of_softmaxes_lm_is_the_mos_lstm():
    from latentnlp.models import MixtureOfSoftmaxesLM

    torch.manual_seed(0)
    mos = MixtureOfSoftmaxesLM(12, 6, 8, 2, num_experts=3, softmax_input_size=4)
    torch.manual_seed(0)
    reference = LSTMLanguageModel(12, 6, 8, 2, output="mos", num_experts=3, softmax_input_size=4)
    batch = {
        "inputs": torch.randint(12, (3, 5)),
        "targets": torch.randint(12, (3, 5)),
        "lengths": torch.tensor([5, 2, 4]),
    }
    torch.testing.assert_close(mos.log_marginal(batch), reference.log_marginal(batch))


def test_value_checks_follow_the_validation_switch(monkeypatch):
    """Out-of-range ids raise when validation is on; when it is off the batch is not read back for checks."""
    from torch.distributions import Distribution

    model = LSTMLanguageModel(11, 6, 8)
    inputs = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(0))
    batch = {"inputs": inputs, "targets": inputs, "lengths": torch.tensor([5, 3, 2])}
    with pytest.raises(ValueError, match="token ids"):
        model.log_marginal({**batch, "targets": inputs + 11})
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:

        def no_read(self):
            raise AssertionError("read back from the device for a check")

        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "tolist", no_read)
            assert model.log_marginal(batch).shape == (3,)
        with pytest.raises(ValueError, match="inputs"):  # shape checks stay on
            model.log_marginal({**batch, "inputs": inputs[0]})
    finally:
        Distribution.set_default_validate_args(previous)
