"""MixtureOfSoftmaxes and SoftmaxOutput: normalisation, gradients, chunking, the softmax bottleneck."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from latentnlp.layers import MixtureOfSoftmaxes, SoftmaxOutput
from latentnlp.layers.chunked_softmax import log_softmax_linear

H, V, K, D = 6, 13, 4, 3


def _mos(num_experts=K, **kw):
    torch.manual_seed(0)
    layer = MixtureOfSoftmaxes(H, V, num_experts, D, **kw).double()
    with torch.no_grad():  # non-trivial bias so chunks see different offsets
        layer.output_projection.bias.normal_()
    return layer


def _data(shape=(2, 5)):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(*shape, H, generator=g, dtype=torch.float64)
    targets = torch.randint(0, V, shape, generator=g)
    return hidden, targets


@pytest.mark.parametrize("shape", [(), (7,), (2, 5)])
def test_mos_is_normalised(shape):
    layer = _mos()
    hidden, _ = _data(shape)
    log_p = layer.log_probs(hidden)
    assert log_p.shape == (*shape, V)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(shape, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        layer.log_probs(hidden, max_chunk_elements=1), log_p, rtol=0, atol=1e-12
    )  # experts one at a time


def test_mos_forward_is_the_mixture_of_expert_softmaxes():
    layer = _mos()
    hidden, _ = _data()
    pi = torch.softmax(hidden @ layer.prior.weight.T, -1)
    g = torch.tanh(layer.projection(hidden)).unflatten(-1, (K, D))
    experts = torch.softmax(g @ layer.output_projection.weight.T + layer.output_projection.bias, -1)
    p = (pi.unsqueeze(-1) * experts).sum(-2)
    torch.testing.assert_close(layer.log_probs(hidden), p.log(), rtol=0, atol=1e-12)


def test_mos_log_space_survives_tiny_probabilities():
    layer = _mos()
    hidden, targets = _data()
    with torch.no_grad():
        layer.output_projection.weight.mul_(1e4)  # expert softmaxes below float64's smallest p
    log_p = layer.log_prob(hidden, targets)
    assert torch.isfinite(log_p).all() and log_p.min() < -750
    torch.testing.assert_close(layer.log_prob(hidden, targets, max_chunk_elements=4 * 10 * K), log_p)
    torch.testing.assert_close(layer.log_probs(hidden).gather(-1, targets[..., None])[..., 0], log_p)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, V, 100])
def test_mos_chunked_equals_unchunked(chunk_size):
    """``chunk_size`` vocabulary columns per block: ``max_chunk_elements = chunk_size x rows``."""
    layer = _mos()
    hidden, targets = _data()
    hidden.requires_grad_(True)

    def value_and_grads(chunk):
        layer.zero_grad()
        hidden.grad = None
        out = layer.log_prob(hidden, targets, max_chunk_elements=chunk)
        (out * torch.linspace(-1, 2, out.numel()).view_as(out).double()).sum().backward()
        grads = [hidden.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
        return out.detach(), grads

    full, full_grads = value_and_grads(None)
    elements = chunk_size * targets.numel() * K
    chunked, chunked_grads = value_and_grads(elements)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    for a, b in zip(chunked_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    gathered = layer.log_probs(hidden).gather(-1, targets[..., None])[..., 0]
    torch.testing.assert_close(full, gathered.detach(), rtol=0, atol=1e-12)
    # the layer's own max_chunk_elements is the default
    layer.max_chunk_elements = elements
    torch.testing.assert_close(layer.log_prob(hidden, targets).detach(), full, rtol=0, atol=1e-12)


class _Method(nn.Module):
    """``layer.<method>`` as a module, so ``torch.func.functional_call`` can swap its parameters."""

    def __init__(self, layer, method, **kwargs):
        super().__init__()
        self.layer, self.method, self.kwargs = layer, method, kwargs

    def forward(self, *args):
        return getattr(self.layer, self.method)(*args, **self.kwargs)


def _gradcheck(layer, method, hidden, *args, **kwargs):
    """gradcheck of ``layer.<method>(hidden, *args)`` w.r.t. ``hidden`` and every parameter."""
    module = _Method(layer, method, **kwargs)
    names = [name for name, _ in module.named_parameters()]
    values = [p.detach().clone().requires_grad_(True) for p in module.parameters()]

    def fn(h, *params):
        return torch.func.functional_call(module, dict(zip(names, params)), (h, *args))

    return torch.autograd.gradcheck(fn, (hidden.detach().requires_grad_(True), *values))


def test_mos_gradcheck():
    torch.manual_seed(0)
    layer = MixtureOfSoftmaxes(3, 5, 2, 2).double()  # tiny: gradcheck is O(#parameters)
    hidden = torch.randn(3, 3, dtype=torch.float64)
    targets = torch.tensor([0, 4, 2])
    assert _gradcheck(layer, "log_probs", hidden)
    assert _gradcheck(layer, "log_probs", hidden, max_chunk_elements=1)
    assert _gradcheck(layer, "log_prob", hidden, targets)
    assert _gradcheck(layer, "log_prob", hidden, targets, max_chunk_elements=2 * 3 * 2)


@pytest.mark.parametrize("activation", ["tanh", "identity"])
def test_one_expert_equals_softmax_with_the_same_parameters(activation):
    mos = _mos(num_experts=1)
    mos.activation = activation
    softmax = SoftmaxOutput(H, V, projection_size=D, activation=activation).double()
    softmax.projection.load_state_dict(mos.projection.state_dict())
    softmax.output_projection.load_state_dict(mos.output_projection.state_dict())
    hidden, targets = _data()
    torch.testing.assert_close(mos.log_probs(hidden), softmax.log_probs(hidden), rtol=0, atol=1e-12)
    torch.testing.assert_close(mos.log_prob(hidden, targets), softmax.log_prob(hidden, targets), rtol=0, atol=1e-12)


@pytest.mark.parametrize("projection_size", [None, D])
def test_softmax_output(projection_size):
    torch.manual_seed(0)
    layer = SoftmaxOutput(H, V, projection_size).double()
    hidden, targets = _data()
    log_p = layer.log_probs(hidden)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    full = layer.log_prob(hidden, targets)
    torch.testing.assert_close(full, log_p.gather(-1, targets[..., None])[..., 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.log_prob(hidden, targets, max_chunk_elements=3 * 10), full, rtol=0, atol=1e-12)
    assert _gradcheck(layer, "log_prob", hidden, targets, max_chunk_elements=4 * 10)


@pytest.mark.parametrize("cls", [SoftmaxOutput, MixtureOfSoftmaxes])
def test_weight_tying(cls):
    embedding = nn.Embedding(V, D)
    layer = cls(H, V, 2, D) if cls is MixtureOfSoftmaxes else cls(H, V, D)
    layer.tie_weights(embedding)
    assert layer.output_projection.weight is embedding.weight
    hidden, targets = _data()
    layer.log_prob(hidden.float(), targets, max_chunk_elements=5).sum().backward()
    assert embedding.weight.grad is not None and embedding.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="embedding.weight"):
        layer.tie_weights(nn.Embedding(V, D + 1))


@pytest.mark.parametrize("cls", [SoftmaxOutput, MixtureOfSoftmaxes])
def test_identity_activation_is_a_linear_projection(cls):
    torch.manual_seed(0)
    layer = (
        cls(H, V, 2, D, activation="identity") if cls is MixtureOfSoftmaxes else cls(H, V, D, activation="identity")
    ).double()
    hidden, targets = _data()
    g = layer.features(hidden)
    torch.testing.assert_close(g.flatten(-2) if cls is MixtureOfSoftmaxes else g, layer.projection(hidden))
    torch.testing.assert_close(layer.log_probs(hidden).exp().sum(-1), torch.ones(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="activation must be one of"):
        cls(H, V, 2, D, activation="relu") if cls is MixtureOfSoftmaxes else cls(H, V, D, activation="relu")


def test_bad_input_raises_value_error():
    layer = _mos()
    hidden, targets = _data()
    with pytest.raises(ValueError, match=r"hidden must be \[\.\.\., 6\]"):
        layer.log_probs(hidden[..., :-1])
    with pytest.raises(ValueError, match="targets"):
        layer.log_prob(hidden, targets[:, :-1])
    with pytest.raises(ValueError, match="num_experts"):
        MixtureOfSoftmaxes(H, V, 0)
    with pytest.raises(ValueError, match="max_chunk_elements"):
        SoftmaxOutput(H, V, max_chunk_elements=0)


def test_half_precision_is_normalised_in_float32():
    layer = _mos().to(torch.bfloat16)
    hidden, targets = _data()
    out = layer.log_prob(hidden.to(torch.bfloat16), targets, max_chunk_elements=4 * 10 * K)
    assert out.dtype == torch.float32
    assert layer.log_probs(hidden.to(torch.bfloat16)).dtype == torch.float32


def test_mos_breaks_the_softmax_bottleneck():
    """A random conditional table p(y | c) has rank C >> d: one softmax of input size d cannot
    fit it, a mixture of softmaxes with the same d can (Yang et al. 2018)."""
    C, d, experts, hidden_size, steps = 64, 4, 16, 32, 400
    g = torch.Generator().manual_seed(0)
    true_log_p = torch.log_softmax(2.0 * torch.randn(C, C, generator=g), -1)  # V = C
    assert torch.linalg.matrix_rank(true_log_p) > 8 * d
    p = true_log_p.exp()
    entropy = -(p * true_log_p).sum() / C
    contexts = torch.arange(C)
    kl = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in ("softmax", "mos"):
            torch.manual_seed(0)
            output = (
                SoftmaxOutput(hidden_size, C, d)
                if name == "softmax"
                else MixtureOfSoftmaxes(hidden_size, C, experts, d)
            )
            model = nn.Sequential(nn.Embedding(C, hidden_size), output)  # contexts as input ids
            opt = torch.optim.Adam(model.parameters(), lr=0.02)
            for _ in range(steps):
                cross_entropy = -(p * model(contexts).log_probs).sum() / C
                opt.zero_grad()
                cross_entropy.backward()
                opt.step()
            with torch.no_grad():
                kl[name] = (-(p * model(contexts).log_probs).sum() / C - entropy).item()
    finally:
        torch.set_num_threads(threads)
    # measured (seed 0): softmax ~0.73 nats, MoS ~0.19 nats
    assert kl["mos"] < 0.5 * kl["softmax"], kl
    assert kl["softmax"] - kl["mos"] > 0.25, kl


@given(
    rows=st.integers(1, 9),
    vocab=st.integers(1, 7),
    chunk=st.integers(1, 10),
    bias=st.booleans(),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
)
def test_row_chunked_log_softmax_linear_matches_autograd(rows, vocab, chunk, bias, scale):
    g = torch.Generator().manual_seed(rows * 100 + vocab * 10 + chunk)
    x = (scale * torch.randn(rows, 3, generator=g, dtype=torch.float64)).requires_grad_()
    w = torch.randn(vocab, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(vocab, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g, dtype=torch.float64)
    params = [x, w] + ([b] if bias else [])
    reference = torch.log_softmax(x @ w.T + (0 if b is None else b), -1).gather(-1, y[:, None])[:, 0]
    expected = torch.autograd.grad((reference * upstream).sum(), params)
    chunked = log_softmax_linear(x, w, b, y, chunk * vocab)  # chunk rows at a time
    torch.testing.assert_close(chunked, reference, rtol=0, atol=1e-10)
    for got, want in zip(torch.autograd.grad((chunked * upstream).sum(), params), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_row_chunked_log_softmax_linear_gradcheck_and_errors():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 1, 2])
    assert torch.autograd.gradcheck(lambda *a: log_softmax_linear(*a, y, 2 * 4), (x, w, b))
    with pytest.raises(ValueError, match=r"x \[N, d\], weight \[V, d\], targets \[N\]; got x \(5, 3\)"):
        log_softmax_linear(x, w, b, y[:4], 2 * 4)
    with pytest.raises(ValueError, match="max_chunk_elements must be >= 1"):
        log_softmax_linear(x, w, b, y, 0)
