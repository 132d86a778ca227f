"""Factorial chains against float64 references (tests/factorial_oracle.py).

Exact inference (``FactorialChainPosterior``) is compared with the enumeration of every joint
path on tiny sizes, with the ``K^L``-state ``ChainPosterior`` built from the Kronecker-sum
transition on larger ones (values and gradients), with ``ChainPosterior`` itself for one
chain, and by ``gradcheck``; FFBS frequencies against path probabilities; the underflow
fallback; then structured mean field (a bound, monotone, exact when the emission factorises,
the Gaussian, Bernoulli and categorical closed forms against the joint-tensor update) and every ``ValueError``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from factorial_oracle import FactorialEnumeration, kron_sum, product_chain
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentnlp import ChainPosterior, DenseTransition, FactorialChainPosterior, LowRankTransition
from latentnlp.chain import scaled_log_partition
from latentnlp.factorial import (
    BernoulliEmission,
    CategoricalEmission,
    GaussianEmission,
    JointEmission,
    ProductTransition,
    _ProductProbabilities,
    structured_mean_field,
)

pytestmark = pytest.mark.usefixtures("float64")

RTOL, ATOL = 1e-7, 1e-9
METHODS = ("auto", "scaled", "log")


def close(actual, expected, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def random_factorial(batch, steps, num_chains, k, init_kind="shared", trans_kind="shared", seed=0, zeros=False):
    """``(init, trans, emit, lengths, oracle_trans)``: ``trans`` as the library takes it, ``oracle_trans``
    a tensor ``[L, K, K] | [B, L, K, K] | [B, T-1, L, K, K]`` for the references."""
    g = torch.Generator().manual_seed(seed)
    init_shape = (num_chains, k) if init_kind == "shared" else (batch, num_chains, k)
    init = torch.randn(init_shape, generator=g).log_softmax(-1)
    lead = {"shared": (), "batched": (batch,), "time": (batch, max(steps - 1, 0))}[trans_kind]
    oracle_trans = torch.randn(*lead, num_chains, k, k, generator=g).log_softmax(-1)
    if zeros and k > 1:  # structural zeros: chain 0 never moves from state 0 to state 1
        oracle_trans[..., 0, 0, 1] = float("-inf")
    emit = torch.randn(batch, steps, *(k,) * num_chains, generator=g)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    if trans_kind == "time":
        trans = [DenseTransition(oracle_trans[:, :, ell]) for ell in range(num_chains)]
    else:
        trans = oracle_trans
    return init, trans, emit, lengths, oracle_trans


def product_posterior(init, oracle_trans, emit, lengths, **kwargs):
    """The same distribution as one ``ChainPosterior`` over ``K^L`` states (Kronecker-sum transition)."""
    flat_init, flat_trans, flat_emit = product_chain(init, oracle_trans, emit)
    return ChainPosterior(flat_init, flat_trans, flat_emit, lengths, **kwargs)


# =========================================================================== enumeration
# (L, K, T): two and three chains, two and three states; (K^L)^T paths at most 6561
SIZES = ((2, 2, 4), (2, 3, 4), (3, 2, 3), (3, 3, 2), (1, 3, 4))
LAYOUTS = (("shared", "shared"), ("batched", "batched"), ("shared", "time"))


@pytest.mark.parametrize("num_chains,k,steps", SIZES)
@pytest.mark.parametrize("init_kind,trans_kind", LAYOUTS)
@pytest.mark.parametrize("method", METHODS)
def test_members_equal_enumeration(num_chains, k, steps, init_kind, trans_kind, method):
    init, trans, emit, lengths, oracle_trans = random_factorial(3, steps, num_chains, k, init_kind, trans_kind)
    p = FactorialChainPosterior(init, trans, emit, lengths, method=method)
    ref = FactorialEnumeration(init, oracle_trans, emit, lengths)
    close(p.log_partition, ref.log_partition)
    close(p.marginals, ref.marginals)
    close(p.joint_marginals, ref.joint_marginals)
    close(p.entropy(), ref.entropy())
    assert torch.equal(p.argmax, ref.argmax)
    close(p.max, ref.max)
    paths = torch.randint(0, k, (5, 3, steps, num_chains), generator=torch.Generator().manual_seed(1))
    close(p.log_prob(paths), ref.score(paths) - ref.log_partition)


@pytest.mark.parametrize("method", METHODS)
def test_structural_zeros_equal_enumeration(method):
    init, trans, emit, lengths, oracle_trans = random_factorial(3, 4, 2, 3, "batched", "batched", seed=3, zeros=True)
    init[1, 1, 2] = float("-inf")
    p = FactorialChainPosterior(init, trans, emit, lengths, method=method)
    ref = FactorialEnumeration(init, oracle_trans, emit, lengths)
    close(p.log_partition, ref.log_partition)
    close(p.marginals, ref.marginals)
    close(p.entropy(), ref.entropy())
    assert torch.equal(p.argmax, ref.argmax)
    assert torch.isfinite(p.max).all()


# =========================================================================== the product-state chain
@pytest.mark.parametrize("init_kind,trans_kind", LAYOUTS)
def test_agrees_with_product_state_chain_values_and_gradients(init_kind, trans_kind):
    batch, steps, num_chains, k = 4, 12, 3, 3
    init, trans, emit, lengths, oracle_trans = random_factorial(batch, steps, num_chains, k, init_kind, trans_kind, 5)
    leaves = [x.clone().requires_grad_() for x in (init, oracle_trans, emit)]
    init_l, trans_l, emit_l = leaves
    if trans_kind == "time":
        ours = [DenseTransition(trans_l[:, :, ell]) for ell in range(num_chains)]
    else:
        ours = trans_l
    weights = torch.randn(batch)
    p = FactorialChainPosterior(init_l, ours, emit_l, lengths)
    grads = torch.autograd.grad((p.log_partition * weights).sum(), leaves)
    q = product_posterior(init_l, trans_l, emit_l, lengths, method="log")
    expected = torch.autograd.grad((q.log_partition * weights).sum(), leaves)
    close(p.log_partition, q.log_partition)
    for grad, reference in zip(grads, expected):
        close(grad, reference)
    close(p.joint_marginals.reshape(batch, steps, -1), q.marginals)
    assert torch.equal(p.argmax, torch.stack([(q.argmax // k ** (2 - ell)) % k for ell in range(3)], -1))
    close(p.entropy(), q.entropy())


def test_transition_objects_are_densified_per_chain():
    init, _, emit, lengths, oracle_trans = random_factorial(2, 6, 2, 3, seed=7)
    g = torch.Generator().manual_seed(7)
    low_rank = LowRankTransition(torch.randn(3, 2, generator=g), torch.randn(2, 3, generator=g))
    p = FactorialChainPosterior(init, [oracle_trans[0], low_rank], emit, lengths)
    q = product_posterior(init, torch.stack([oracle_trans[0], low_rank.dense()]), emit, lengths)
    close(p.log_partition, q.log_partition)
    close(p.joint_marginals.reshape(2, 6, 9), q.marginals)
    assert torch.equal(p.argmax[..., 0] * 3 + p.argmax[..., 1], q.argmax)


def test_float32_and_half_inputs_are_computed_in_float32():
    init, trans, emit, lengths, _ = random_factorial(4, 16, 3, 3, "batched", "batched", seed=8)
    reference = FactorialChainPosterior(init, trans, emit, lengths)
    for dtype in (torch.float32, torch.bfloat16):
        p = FactorialChainPosterior(init.float(), trans.float(), emit.to(dtype), lengths)
        assert p.log_partition.dtype == torch.float32
        rounded = FactorialChainPosterior(init, trans, emit.to(dtype).double(), lengths)
        close(p.log_partition, rounded.log_partition, rtol=1e-5, atol=1e-4)
        close(p.marginals, rounded.marginals, rtol=1e-4, atol=1e-5)
    assert reference.log_partition.dtype == torch.float64


def test_product_transition_dense_is_the_kronecker_sum():
    g = torch.Generator().manual_seed(2)
    shared, batched = torch.randn(3, 3, generator=g), torch.randn(4, 3, 3, generator=g)
    timed = torch.randn(4, 5, 3, 3, generator=g)
    close(ProductTransition([shared, shared.T]).dense(), kron_sum(torch.stack([shared, shared.T])))
    close(ProductTransition([shared, batched]).dense(), kron_sum(torch.stack([shared.expand(4, 3, 3), batched], 1)))
    expected = kron_sum(torch.stack([batched[:, None].expand(4, 5, 3, 3), timed, shared.expand(4, 5, 3, 3)], 2))
    close(ProductTransition([batched, timed, shared]).dense(), expected)


def test_product_transition_samples_each_chain():
    # deterministic chains: 0 -> 1 -> 2 -> 0 and 0 -> 0, 1 -> 2, 2 -> 1
    cycle, swap = torch.full((3, 3), float("-inf")), torch.full((3, 3), float("-inf"))
    cycle[[0, 1, 2], [1, 2, 0]] = 0.0
    swap[[0, 1, 2], [0, 2, 1]] = 0.0
    previous = torch.arange(9)
    following = ProductTransition([cycle, swap]).sample_next(previous)
    assert following.tolist() == [((i // 3 + 1) % 3) * 3 + [0, 2, 1][i % 3] for i in range(9)]


def test_one_chain_is_a_chain_posterior():
    g = torch.Generator().manual_seed(4)
    init, trans = torch.randn(2, 4, generator=g), torch.randn(2, 4, 4, generator=g)
    emit, lengths = torch.randn(2, 6, 4, generator=g), torch.tensor([6, 3])
    p = FactorialChainPosterior(init[:, None], trans[:, None], emit, lengths)
    q = ChainPosterior(init, trans, emit, lengths)
    close(p.log_partition, q.log_partition)
    close(p.marginals[:, :, 0], q.marginals)
    assert torch.equal(p.argmax[..., 0], q.argmax)
    close(p.max, q.max)
    close(p.entropy(), q.entropy())
    paths = q.sample((3,), generator=torch.Generator().manual_seed(0))
    close(p.log_prob(paths[..., None]), q.log_prob(paths))


def test_entropy_and_marginals_are_differentiable():
    init, trans, emit, lengths, oracle_trans = random_factorial(2, 3, 2, 2, "batched", "batched", seed=9)
    emit = emit.requires_grad_()
    p = FactorialChainPosterior(init, trans, emit, lengths)
    (grad,) = torch.autograd.grad(p.entropy().sum(), emit)
    (expected,) = torch.autograd.grad(FactorialEnumeration(init, oracle_trans, emit, lengths).entropy().sum(), emit)
    close(grad, expected)
    q = FactorialChainPosterior(init, trans, emit, lengths, method="log")
    (grad,) = torch.autograd.grad(q.marginals[:, :, 0, 1].sum(), emit)
    (expected,) = torch.autograd.grad(
        FactorialEnumeration(init, oracle_trans, emit, lengths).marginals[:, :, 0, 1].sum(), emit
    )
    close(grad, expected)


# =========================================================================== gradcheck
@pytest.mark.parametrize("method", ("scaled", "log"))
@pytest.mark.parametrize("trans_kind", ("shared", "batched", "time"))
def test_gradcheck_log_partition(method, trans_kind):
    init, _, emit, lengths, oracle_trans = random_factorial(2, 3, 2, 2, "batched", trans_kind, seed=11)
    num_chains = 2

    def log_partition(init, trans, emit):
        chains = [DenseTransition(trans[:, :, ell]) for ell in range(num_chains)] if trans_kind == "time" else trans
        return FactorialChainPosterior(init, chains, emit, lengths, method=method).log_partition

    inputs = tuple(x.clone().requires_grad_() for x in (init, oracle_trans, emit))
    assert torch.autograd.gradcheck(log_partition, inputs)


def test_padding_never_changes_a_value_or_a_gradient():
    init, trans, emit, lengths, _ = random_factorial(3, 5, 2, 3, seed=12)
    emit = emit.requires_grad_()
    p = FactorialChainPosterior(init, trans, emit, lengths)
    (grad,) = torch.autograd.grad(p.log_partition.sum(), emit)
    padding = ~(torch.arange(5) < lengths[:, None])
    assert (grad[padding] == 0).all()
    noisy = torch.where(padding[..., None, None], torch.full_like(emit, 1e6), emit.detach())
    close(FactorialChainPosterior(init, trans, noisy, lengths).log_partition, p.log_partition)


# =========================================================================== sampling
def test_sample_frequencies_match_path_probabilities():
    init, trans, emit, lengths, oracle_trans = random_factorial(2, 3, 2, 2, "batched", "batched", seed=13)
    lengths = torch.tensor([3, 2])
    p = FactorialChainPosterior(init, trans, emit, lengths)
    ref = FactorialEnumeration(init, oracle_trans, emit, lengths)
    draws = 20000
    samples = p.sample((draws,), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (draws, 2, 3, 2)
    assert (samples[:, 1, 2] == 0).all()  # padding is 0
    for b in range(2):
        paths = ref.paths[b]
        hits = (samples[:, b, None, : int(lengths[b])] == paths).flatten(2).all(-1)  # [draws, P]
        frequency = hits.double().mean(0)
        probability = ref.probs(b)
        sigma = torch.sqrt(probability * (1 - probability) / draws)
        assert (hits.sum(-1) == 1).all()
        assert ((frequency - probability).abs() <= 5 * sigma + 1e-3).all()


# =========================================================================== underflow
def test_underflow_is_redone_in_log_space():
    # chain 0 leaves state 0 with probability e^-700; then the emission all but rules state 0 out,
    # so the scaled step keeps ~1e-304 of its mass: flagged, and "auto" recomputes that row
    k = 2
    init = torch.tensor([[0.0, -1e4], [0.0, 0.0]]).log_softmax(-1)
    trans = torch.tensor([[[0.0, -700.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    emit = torch.zeros(2, 3, k, k)
    emit[0, 1, 0] = -1e4  # row 0: chain 0 must be in state 1 at t = 1
    lengths = torch.tensor([3, 3])
    ref = FactorialEnumeration(init, trans, emit, lengths)
    emit = emit.requires_grad_()
    auto = FactorialChainPosterior(init, trans, emit, lengths)
    flat = auto.chain
    assert scaled_log_partition(flat.init, flat.transition, flat.emit, lengths)[2].tolist() == [True, False]
    log = FactorialChainPosterior(init, trans, emit, lengths, method="log")
    close(auto.log_partition, ref.log_partition)
    close(log.log_partition, ref.log_partition)
    (grad,) = torch.autograd.grad(auto.log_partition.sum(), emit)
    assert torch.isfinite(grad).all()
    close(grad.reshape(2, 3, k, k), ref.joint_marginals, atol=1e-6, rtol=1e-6)


# =========================================================================== hypothesis
@settings(
    max_examples=25,
    deadline=None,
    derandomize="CI" in os.environ,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    batch=st.integers(1, 3),
    steps=st.integers(1, 6),
    num_chains=st.integers(1, 3),
    k=st.integers(1, 3),
    init_kind=st.sampled_from(("shared", "batched")),
    trans_kind=st.sampled_from(("shared", "batched", "time")),
    seed=st.integers(0, 2**16),
)
def test_property_log_partition_equals_product_state_chain(batch, steps, num_chains, k, init_kind, trans_kind, seed):
    init, trans, emit, lengths, oracle_trans = random_factorial(
        batch, steps, num_chains, k, init_kind, trans_kind, seed
    )
    p = FactorialChainPosterior(init, trans, emit, lengths)
    q = product_posterior(init, oracle_trans, emit, lengths)
    close(p.log_partition, q.log_partition)
    close(p.joint_marginals.reshape(batch, steps, -1), q.marginals)


# =========================================================================== mean field
def gaussian_joint(observations, weights, variance):
    """The Gaussian emission materialised: ``log N(x_t; sum_l W_l[z^l], diag variance)`` ``[B, T, K, ..., K]``."""
    num_chains, k, dim = weights.shape
    mean = 0
    for ell in range(num_chains):
        shape = [1] * num_chains
        shape[ell] = k
        mean = mean + weights[ell].reshape(*shape, dim)
    x = observations.reshape(*observations.shape[:2], *(1,) * num_chains, dim)
    return torch.distributions.Normal(mean, variance.sqrt()).log_prob(x).sum(-1)


def random_gaussian(batch, steps, num_chains, k, dim, seed):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_chains, k, dim, generator=g)
    variance = torch.rand(dim, generator=g) + 0.5
    observations = torch.randn(batch, steps, dim, generator=g) * 2
    return observations, weights, variance


def random_marginals(batch, steps, num_chains, k, seed):
    return torch.rand(batch, steps, num_chains, k, generator=torch.Generator().manual_seed(seed)).softmax(-1)


def test_mean_field_is_a_monotone_lower_bound():
    init, trans, emit, lengths, _ = random_factorial(3, 5, 3, 2, "batched", "batched", seed=20)
    emit = emit * 3
    exact = FactorialChainPosterior(init, trans, emit, lengths).log_partition
    result = structured_mean_field(init, trans, emit, lengths, iterations=8)
    assert result.elbo_trace.shape == (8, 3)
    assert (result.elbo_trace <= exact + 1e-9).all()
    assert (result.elbo_trace[1:] >= result.elbo_trace[:-1] - 1e-9).all()
    close(result.elbo, result.elbo_trace[-1])
    assert (result.elbo < exact - 1e-3).any()  # a strict bound here: the chains are coupled
    for ell, chain in enumerate(result.chains):
        close(chain.marginals, result.marginals[:, :, ell])


def test_mean_field_is_exact_when_the_emission_factorises():
    batch, steps, num_chains, k = 3, 5, 3, 3
    init, trans, _, lengths, _ = random_factorial(batch, steps, num_chains, k, seed=21)
    parts = torch.randn(batch, steps, num_chains, k, generator=torch.Generator().manual_seed(21))
    emit = sum(parts[:, :, ell].reshape(batch, steps, *[k if m == ell else 1 for m in range(3)]) for ell in range(3))
    emit = emit.expand(batch, steps, k, k, k).clone().requires_grad_()
    result = structured_mean_field(init, trans, emit, lengths, iterations=3)
    p = FactorialChainPosterior(init, trans, emit, lengths)
    close(result.elbo, p.log_partition)
    close(result.elbo_trace, p.log_partition.detach().expand(3, batch))
    close(result.marginals, p.marginals)
    # at q = p the bound's gradient (q held fixed) is that of log Z
    (grad,) = torch.autograd.grad(result.elbo.sum(), emit)
    (expected,) = torch.autograd.grad(p.log_partition.sum(), emit)
    close(grad, expected)


def test_mean_field_of_one_chain_is_exact():
    init, trans, emit, lengths, _ = random_factorial(3, 6, 1, 4, seed=22)
    result = structured_mean_field(init, trans, emit, lengths, iterations=1)
    p = FactorialChainPosterior(init, trans, emit, lengths)
    close(result.elbo, p.log_partition)
    close(result.marginals, p.marginals)


def test_mean_field_takes_transition_objects_and_stops_at_tol():
    init, trans, emit, lengths, _ = random_factorial(2, 5, 2, 3, seed=23)
    g = torch.Generator().manual_seed(23)
    low_rank = LowRankTransition(torch.randn(3, 2, generator=g), torch.randn(2, 3, generator=g))
    chains = [DenseTransition(trans[0]), low_rank]
    result = structured_mean_field(init, chains, emit, lengths, iterations=50, tol=1e-10)
    assert 1 < result.elbo_trace.shape[0] < 50
    dense = torch.stack([trans[0], low_rank.dense()])
    assert (result.elbo <= FactorialChainPosterior(init, dense, emit, lengths).log_partition + 1e-9).all()


@pytest.mark.parametrize("num_chains,k", ((1, 3), (2, 3), (3, 2)))
def test_gaussian_closed_form_equals_the_joint_tensor_update(num_chains, k):
    batch, steps, dim = 2, 4, 3
    observations, weights, variance = random_gaussian(batch, steps, num_chains, k, dim, seed=30)
    closed = GaussianEmission(observations, weights, variance)
    joint = JointEmission(gaussian_joint(observations, weights, variance))
    marginals = random_marginals(batch, steps, num_chains, k, seed=31)
    for ell in range(num_chains):
        close(closed.potentials(marginals, ell), joint.potentials(marginals, ell))
    close(closed.expected_log_likelihood(marginals), joint.expected_log_likelihood(marginals))
    init, trans, _, lengths, _ = random_factorial(batch, steps, num_chains, k, seed=32)
    ours = structured_mean_field(init, trans, closed, lengths, iterations=4)
    reference = structured_mean_field(init, trans, joint, lengths, iterations=4)
    close(ours.elbo_trace, reference.elbo_trace)
    close(ours.marginals, reference.marginals)
    exact = FactorialChainPosterior(init, trans, joint.emit, lengths).log_partition
    assert (ours.elbo_trace <= exact + 1e-9).all()
    assert (ours.elbo_trace[1:] >= ours.elbo_trace[:-1] - 1e-9).all()


def on_axis(x, ell, num_chains):
    """``x [..., K, V]`` with its states on joint axis ``ell`` of ``L``: ``[..., 1, .., K, .., 1, V]``."""
    shape = [1] * num_chains
    shape[ell] = x.shape[-2]
    return x.reshape(*x.shape[:-2], *shape, x.shape[-1])


def bernoulli_bound(observations, weights, bias, marginals):
    """``(exact [B, T, K..K], bounded [B, T, K..K])``: ``sum_v log sigmoid(s eta)`` and its
    Jaakkola-Jordan bound at ``xi^2 = E_q[eta^2]``, from the materialised logits ``eta``."""
    batch, steps, num_chains, k = marginals.shape
    eta = bias + sum(on_axis(weights[ell], ell, num_chains) for ell in range(num_chains))  # [K..K, V]
    joint = 1
    for ell in range(num_chains):
        joint = joint * on_axis(marginals[:, :, ell, :, None], ell, num_chains)[..., 0]
    axes = tuple(range(2, 2 + num_chains))
    xi = (joint[..., None] * eta.square()).sum(axes).sqrt()  # [B, T, V]
    xi = xi.reshape(batch, steps, *(1,) * num_chains, -1)
    curvature = torch.tanh(xi / 2) / (4 * xi)
    sign = (2 * observations - 1).reshape(xi.shape)
    exact = torch.nn.functional.logsigmoid(sign * eta).sum(-1)
    bounded = torch.nn.functional.logsigmoid(xi) + (sign * eta - xi) / 2 - curvature * (eta.square() - xi.square())
    return exact, bounded.sum(-1)


def random_bernoulli(batch, steps, num_chains, k, dim, seed):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_chains, k, dim, generator=g)
    bias = torch.randn(dim, generator=g)
    observations = (torch.rand(batch, steps, dim, generator=g) < 0.3).double()
    return observations, weights, bias


@pytest.mark.parametrize("num_chains,k", ((1, 3), (2, 3), (3, 2)))
def test_bernoulli_closed_form_equals_the_joint_tensor_update_of_its_bound(num_chains, k):
    batch, steps, dim = 2, 4, 5
    observations, weights, bias = random_bernoulli(batch, steps, num_chains, k, dim, seed=34)
    closed = BernoulliEmission(observations, weights, bias)
    marginals = random_marginals(batch, steps, num_chains, k, seed=35)
    exact, bounded = bernoulli_bound(observations, weights, bias, marginals)
    joint = JointEmission(bounded)
    for ell in range(num_chains):
        close(closed.potentials(marginals, ell), joint.potentials(marginals, ell))
    close(closed.expected_log_likelihood(marginals), joint.expected_log_likelihood(marginals))
    assert (closed.expected_log_likelihood(marginals) <= JointEmission(exact).expected_log_likelihood(marginals)).all()
    init, trans, _, lengths, _ = random_factorial(batch, steps, num_chains, k, seed=36)
    result = structured_mean_field(init, trans, closed, lengths, iterations=6)
    assert (result.elbo_trace[1:] >= result.elbo_trace[:-1] - 1e-9).all()
    assert (result.elbo_trace <= FactorialChainPosterior(init, trans, exact, lengths).log_partition + 1e-9).all()


def categorical_bound(observations, weights, bias, marginals):
    """``(exact [B, T, K..K], minorant [B, T, K..K])``: ``log softmax(eta)[x_t]`` and
    ``eta_x - sum_v exp(eta_v) / phi_t - log phi_t + 1`` at ``phi_t = E_q[sum_v exp eta_v]``."""
    batch, steps, num_chains, k = marginals.shape
    eta = bias + sum(on_axis(weights[ell], ell, num_chains) for ell in range(num_chains))  # [K..K, V]
    joint = 1
    for ell in range(num_chains):
        joint = joint * on_axis(marginals[:, :, ell, :, None], ell, num_chains)[..., 0]
    axes = tuple(range(2, 2 + num_chains))
    total = eta.exp().sum(-1)  # [K..K]
    phi = (joint * total).sum(axes).reshape(batch, steps, *(1,) * num_chains)
    observed = eta.movedim(-1, 0)[observations]  # [B, T, K..K]
    exact = observed - torch.logsumexp(eta, -1)
    return exact, observed - total / phi - phi.log() + 1


@pytest.mark.parametrize("num_chains,k", ((1, 3), (2, 3), (3, 2)))
def test_categorical_closed_form_equals_the_joint_tensor_update_of_its_bound(num_chains, k):
    batch, steps, vocabulary = 2, 4, 6
    g = torch.Generator().manual_seed(37)
    weights, bias = torch.randn(num_chains, k, vocabulary, generator=g), torch.randn(vocabulary, generator=g)
    observations = torch.randint(0, vocabulary, (batch, steps), generator=g)
    closed = CategoricalEmission(observations, weights, bias)
    marginals = random_marginals(batch, steps, num_chains, k, seed=38)
    exact, minorant = categorical_bound(observations, weights, bias, marginals)
    joint = JointEmission(minorant)
    for ell in range(num_chains):
        close(closed.potentials(marginals, ell), joint.potentials(marginals, ell))
    close(closed.expected_log_likelihood(marginals), joint.expected_log_likelihood(marginals))
    assert (closed.expected_log_likelihood(marginals) <= JointEmission(exact).expected_log_likelihood(marginals)).all()
    init, trans, _, lengths, _ = random_factorial(batch, steps, num_chains, k, seed=39)
    result = structured_mean_field(init, trans, closed, lengths, iterations=6)
    assert torch.isfinite(result.elbo_trace).all()
    assert (result.elbo_trace[1:] >= result.elbo_trace[:-1] - 1e-9).all()
    assert (result.elbo_trace <= FactorialChainPosterior(init, trans, exact, lengths).log_partition + 1e-9).all()


@pytest.mark.parametrize("kind", ("gaussian", "bernoulli", "categorical"))
def test_bound_is_differentiable_in_the_emission_parameters(kind):
    if kind == "gaussian":
        observations, weights, other = random_gaussian(2, 4, 2, 2, 3, seed=33)
        emission = GaussianEmission
    elif kind == "bernoulli":
        observations, weights, other = random_bernoulli(2, 4, 2, 2, 3, seed=33)
        emission = BernoulliEmission
    else:
        g = torch.Generator().manual_seed(33)
        observations, weights = torch.randint(0, 3, (2, 4), generator=g), torch.randn(2, 2, 3, generator=g)
        other, emission = torch.randn(3, generator=g), CategoricalEmission
    weights.requires_grad_()
    init, trans, _, lengths, _ = random_factorial(2, 4, 2, 2, seed=33)
    result = structured_mean_field(init, trans, emission(observations, weights, other), lengths)
    (grad,) = torch.autograd.grad(result.elbo.sum(), weights)
    # q held fixed, the bound's gradient is that of E_q[log p(x | z)], checked by finite differences
    step = 1e-6

    def bound(w):
        expected = emission(observations, w, other).expected_log_likelihood(result.marginals)
        return torch.where(torch.arange(4) < lengths[:, None], expected, torch.zeros_like(expected)).sum()

    direction = torch.randn_like(weights)
    numeric = (bound(weights.detach() + step * direction) - bound(weights.detach() - step * direction)) / (2 * step)
    assert math.isclose(float((grad * direction).sum()), float(numeric), rel_tol=1e-5, abs_tol=1e-6)


# =========================================================================== bad input
def test_value_errors_name_the_argument():
    init, trans, emit, lengths, _ = random_factorial(2, 3, 2, 3, seed=40)
    cases = [
        (dict(emit=emit[..., 0, 0]), "emit"),
        (dict(emit=emit[..., :2]), "emit"),
        (dict(emit=emit.long()), "emit"),
        (dict(init=init[:1]), "init"),
        (dict(init=init[:, :2]), "init"),
        (dict(init=init.expand(3, 2, 3)), "init"),
        (dict(trans=trans[:1]), "trans"),
        (dict(trans=trans[:, :2, :2]), "trans"),
        (dict(trans=trans.expand(3, 2, 3, 3)), "trans"),
        (dict(trans=[trans[0]]), "trans"),
        (dict(trans=[trans[0], trans[1, :2, :2]]), r"trans\[1\]"),
        (dict(trans=3), "trans"),
        (dict(lengths=torch.tensor([0, 3])), "lengths"),
        (dict(lengths=torch.tensor([4, 3])), "lengths"),
        (dict(lengths=torch.tensor([3])), "lengths"),
        (dict(lengths=torch.tensor([3.0, 3.0])), "lengths"),
    ]
    for change, name in cases:
        arguments = dict(init=init, trans=trans, emit=emit, lengths=lengths) | change
        with pytest.raises(ValueError, match=name):
            FactorialChainPosterior(**arguments)
        if "emit" not in change:
            with pytest.raises(ValueError, match=name):
                structured_mean_field(**(arguments | dict(emission=arguments.pop("emit"))))
    with pytest.raises(ValueError, match="method"):
        FactorialChainPosterior(init, trans, emit, lengths, method="scan")


@pytest.mark.parametrize("name", ("init", "trans", "emit"))
def test_nan_is_a_value_error_when_validating(name):
    arguments = dict(zip(("init", "trans", "emit"), random_factorial(2, 3, 2, 2, seed=41)[:3]))
    arguments[name] = arguments[name].clone()
    arguments[name].view(-1)[1] = float("nan")
    with pytest.raises(ValueError, match=name):
        FactorialChainPosterior(**arguments)
    with pytest.raises(ValueError, match=name):
        structured_mean_field(arguments["init"], arguments["trans"], arguments["emit"])
    FactorialChainPosterior(**arguments, validate_args=False)  # unvalidated: no check reads the values


def test_paths_are_checked():
    init, trans, emit, lengths, _ = random_factorial(2, 3, 2, 2, seed=42)
    p = FactorialChainPosterior(init, trans, emit, lengths)
    with pytest.raises(ValueError, match="value"):
        p.log_prob(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="value"):
        p.log_prob(torch.full((2, 3, 2), 2, dtype=torch.long))


def test_mean_field_value_errors():
    init, trans, emit, lengths, _ = random_factorial(2, 3, 2, 2, seed=43)
    observations, weights, variance = random_gaussian(2, 3, 2, 2, 4, seed=43)
    with pytest.raises(ValueError, match="iterations"):
        structured_mean_field(init, trans, emit, lengths, iterations=0)
    with pytest.raises(ValueError, match="tol"):
        structured_mean_field(init, trans, emit, lengths, tol=-1.0)
    with pytest.raises(ValueError, match="emission"):
        structured_mean_field(init, trans, "gaussian", lengths)
    with pytest.raises(ValueError, match="weights"):
        GaussianEmission(observations, weights[..., :3], variance)
    with pytest.raises(ValueError, match="variance"):
        GaussianEmission(observations, weights, variance[:3])
    with pytest.raises(ValueError, match="variance"):
        structured_mean_field(init, trans, GaussianEmission(observations, weights, -variance), lengths)
    with pytest.raises(ValueError, match="init"):
        structured_mean_field(init, trans, GaussianEmission(observations, weights[:1], variance), lengths)
    with pytest.raises(ValueError, match="bias"):
        BernoulliEmission(observations, weights, variance[:3])
    with pytest.raises(ValueError, match="observations"):
        structured_mean_field(init, trans, BernoulliEmission(observations, weights, variance), lengths)
    with pytest.raises(ValueError, match="observations"):
        CategoricalEmission(observations, weights, variance)
    with pytest.raises(ValueError, match="bias"):
        CategoricalEmission(observations[..., 0].long(), weights, variance[:3])
    with pytest.raises(ValueError, match="observations"):
        structured_mean_field(init, trans, CategoricalEmission(torch.full((2, 3), 4), weights, variance), lengths)
    with pytest.raises(ValueError, match="trans"):
        ProductTransition([trans[0], trans[1, :1, :1]])
    with pytest.raises(ValueError, match="emit"):
        JointEmission(emit[..., :1])


def test_probabilities_dense_is_the_kronecker_product_of_the_shifted_chains():
    gen = torch.Generator().manual_seed(3)
    transition = ProductTransition(list(torch.randn(2, 3, 3, generator=gen, dtype=torch.float64).log_softmax(-1)))
    probs = transition.probabilities()
    log_shift = probs.log_shift_total(torch.ones(1, 1, dtype=torch.float64))
    torch.testing.assert_close(probs.dense().log() + log_shift, transition.dense())


def test_probabilities_of_mixed_chain_layouts_equal_the_dense_product():
    """Forward, backward and the parameter gradients of chains that mix the shared, per-row and
    time-varying layouts against the dense ``[B, T-1, S, S]`` product, and one probabilities object
    of shared chains applied to two batch sizes (its laid-out matrices and buffers are kept per
    batch size)."""
    gen = torch.Generator().manual_seed(4)
    batch, steps, k = 3, 5, 3
    shared, batched = torch.randn(k, k, generator=gen), torch.randn(batch, k, k, generator=gen)
    timed = torch.randn(batch, steps - 1, k, k, generator=gen)
    mixed = ProductTransition([batched, timed, shared]).probabilities()
    only_shared = ProductTransition([shared, shared.T, shared]).probabilities()
    for probs, batch_sizes in ((mixed, (batch,)), (only_shared, (batch, 1, batch))):
        dense = probs.dense().expand(batch, steps - 1, k**3, k**3)
        for rows in batch_sizes:
            for t in range(1, steps):
                vector = torch.rand(rows, k**3, generator=gen)
                out = torch.empty_like(vector)
                close(probs.forward(vector, t, out), torch.einsum("bi,bij->bj", vector, dense[:rows, t - 1]))
                close(probs.backward(vector, t, out), torch.einsum("bij,bj->bi", dense[:rows, t - 1], vector))
    # d/d trans^l of sum_t alpha_{t-1} P_t u_t, by autograd through the per-chain probabilities
    alpha = torch.rand(steps - 1, batch, k**3, generator=gen)
    u = torch.rand(steps - 1, batch, k**3, generator=gen)
    leaves = [p.clone().requires_grad_() for p in mixed.probs]
    product = _ProductProbabilities([(p, torch.zeros(())) for p in leaves], k, [p.log() for p in leaves]).dense()
    total = torch.einsum("tbi,btij,tbj->", alpha, product, u)
    expected = torch.autograd.grad(total, leaves)
    for grad, p, reference in zip(mixed.parameter_gradients(alpha, u), mixed.probs, expected):
        close(grad, p * reference)


def test_empty_batch_gives_empty_results():
    """B = 0: every member is an empty tensor of the right shape (no reshape or division error)."""
    init = torch.zeros(2, 3).log_softmax(-1)
    trans = torch.zeros(2, 3, 3).log_softmax(-1)
    emit = torch.randn(0, 4, 3, 3, requires_grad=True)
    p = FactorialChainPosterior(init, trans, emit)
    assert p.log_partition.shape == (0,) and p.max.shape == (0,) and p.entropy().shape == (0,)
    assert p.marginals.shape == (0, 4, 2, 3) and p.joint_marginals.shape == (0, 4, 3, 3)
    assert p.argmax.shape == (0, 4, 2) and p.sample((2,)).shape == (2, 0, 4, 2)
    assert p.log_prob(torch.zeros(0, 4, 2, dtype=torch.long)).shape == (0,)
    p.log_partition.sum().backward()
    assert emit.grad.shape == emit.shape
