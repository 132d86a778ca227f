"""ChainPosterior against its peers: torch-struct's LinearChainCRF and Pyro's DiscreteHMM.

torch-struct scores a sequence ``z_0 .. z_{N-1}`` as ``sum_n edges[b, n, z_{n+1}, z_n]``
(``edges[b, n, c_next, c_prev]``; checked below by enumeration rather than trusted), and its
``lengths`` count positions.  An HMM ``(init, trans, emit)`` goes into that layout as::

    edges[b, n, j, i] = trans[(b, n), i, j] + emit[b, n+1, j]  (+ init[i] + emit[b, 0, i] when n == 0)

which needs ``length >= 2`` (a length-1 torch-struct chain has no edge to carry ``init``).

Pyro's DiscreteHMM draws an initial state *before* the first observation and then one
transition per observation.  Making the first transition's every row equal to ``init``
turns it into our chain: ``p(z_0 = k) = init[k]`` whatever the earlier state was.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from chain_oracle import F64, padding_mask, random_lengths

from latentnlp import ChainPosterior

torch_struct = pytest.importorskip("torch_struct")
dist = pytest.importorskip("pyro.distributions")

METHODS = ("scaled", "log", "scan", "auto")
pytestmark = pytest.mark.filterwarnings("ignore:.*arg_constraints:UserWarning")  # torch-struct's distributions


def close(actual, expected, rtol=1e-6, atol=1e-6, msg=""):
    torch.testing.assert_close(
        actual.detach().to(F64), expected.detach().to(F64), rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}"
    )


def ts_path(edge_indicators, lengths):
    """torch-struct's argmax (edge indicators ``[B, N-1, C, C]``) as a state sequence ``[B, N]``, padding 0."""
    path, _ = torch_struct.LinearChain.from_parts(edge_indicators.detach().long())
    return path.masked_fill(padding_mask(lengths, path.shape[1]), 0)


def edge_scores(edges_b, paths):
    """torch-struct's scores ``[M]`` of sequences ``paths [M, L]`` under ``edges_b [N-1, C, C]``."""
    paths = torch.atleast_2d(torch.as_tensor(paths))
    n = torch.arange(paths.shape[1] - 1)
    return edges_b.detach()[n, paths[:, 1:], paths[:, :-1]].sum(-1)


def time_varying(trans, B, T):
    """Any accepted ``trans`` layout as ``[B, T-1, K, K]``."""
    K = trans.shape[-1]
    if trans.dim() == 2:
        return trans.expand(B, T - 1, K, K)
    if trans.dim() == 3:
        return trans[:, None].expand(B, T - 1, K, K)
    return trans


# --------------------------------------------------------------------------- torch-struct


def test_torch_struct_index_convention_by_enumeration():
    """edges[b, n, c_next, c_prev] scores (z_n = c_prev, z_{n+1} = c_next); lengths count positions."""
    gen = torch.Generator().manual_seed(0)
    B, N, C = 3, 4, 3
    edges = torch.randn(B, N - 1, C, C, generator=gen, dtype=F64)
    lengths = torch.tensor([4, 1, 3])
    crf = torch_struct.LinearChainCRF(edges, lengths=lengths)
    marg = crf.marginals
    best = ts_path(crf.argmax, lengths)
    for b in range(B):
        L = int(lengths[b])
        paths = torch.tensor(list(itertools.product(range(C), repeat=L)))  # [C**L, L]
        scores = edge_scores(edges[b], paths)
        close(crf.partition[b], torch.logsumexp(scores, 0), msg=f"partition b={b}")
        close(crf.max[b], scores.max(), msg=f"max b={b}")
        probs = torch.exp(scores - torch.logsumexp(scores, 0))
        expected = torch.zeros(N - 1, C, C, dtype=F64)
        for n in range(L - 1):  # expected[n, c_next, c_prev] = P(z_n = c_prev, z_{n+1} = c_next)
            expected[n].index_put_((paths[:, n + 1], paths[:, n]), probs, accumulate=True)
        close(marg[b], expected, msg=f"marginals b={b}")
        if L > 1:
            assert torch.equal(best[b, :L], paths[scores.argmax()])
            # the transposed reading is really different on these (asymmetric) edges
            transposed = edge_scores(edges[b].transpose(-1, -2), paths)
            assert abs(float(torch.logsumexp(transposed, 0) - crf.partition[b].detach())) > 1e-3


@pytest.mark.parametrize("B,N,C", [(1, 2, 1), (3, 2, 2), (2, 5, 3), (4, 6, 4), (3, 3, 5)])
def test_from_edges_agrees_with_torch_struct(B, N, C):
    gen = torch.Generator().manual_seed(B * 100 + N * 10 + C)
    edges = 2.0 * torch.randn(B, N - 1, C, C, generator=gen, dtype=F64)
    lengths = random_lengths(gen, B, N)  # one of them N, as torch-struct requires
    crf = torch_struct.LinearChainCRF(edges, lengths=lengths)
    d = ChainPosterior.from_edges(edges, lengths=lengths)
    close(d.log_partition, crf.partition)
    close(d.edge_marginals, crf.marginals.transpose(-1, -2))
    close(d.max, crf.max)
    # argmax: equal paths where they are unique (length-1 chains with zero scores are all ties)
    ours, theirs = d.argmax, ts_path(crf.argmax, lengths)
    for b in range(B):
        close(edge_scores(edges[b], ours[b, : int(lengths[b])])[0], crf.max[b], msg=f"score(argmax) b={b}")
        if lengths[b] > 1:
            assert torch.equal(ours[b], theirs[b]), (b, ours[b], theirs[b])


def test_from_edges_agrees_with_torch_struct_long():
    """Beyond enumeration: B=4, N=64, C=8."""
    gen = torch.Generator().manual_seed(5)
    B, N, C = 4, 64, 8
    edges = torch.randn(B, N - 1, C, C, generator=gen, dtype=F64)
    lengths = torch.tensor([64, 17, 1, 40])
    crf = torch_struct.LinearChainCRF(edges, lengths=lengths)
    for method in METHODS:
        d = ChainPosterior.from_edges(edges, lengths=lengths, method=method)
        close(d.log_partition, crf.partition, msg=method)
        close(d.edge_marginals, crf.marginals.transpose(-1, -2), msg=method)
    d = ChainPosterior.from_edges(edges, lengths=lengths)
    close(d.max, crf.max)
    ours, theirs = d.argmax, ts_path(crf.argmax, lengths)
    assert torch.equal(ours[lengths > 1], theirs[lengths > 1])


def hmm_to_edges(init, trans, emit):
    """HMM scores -> torch-struct edges ``[B, T-1, c_next, c_prev]`` (see the module docstring)."""
    B, T, K = emit.shape
    init = init.expand(B, K)
    # edges[b, n, j, i] = trans[i, j] + emit[n+1, j]
    edges = time_varying(trans, B, T).transpose(-1, -2) + emit[:, 1:, :, None]
    first = (init + emit[:, 0])[:, None, None, :]  # added to edge 0 along c_prev
    return torch.cat([edges[:, :1] + first, edges[:, 1:]], 1)


def random_hmm(gen, B, T, K, V, trans_kind):
    init = torch.log_softmax(torch.randn(K, generator=gen, dtype=F64), -1)
    shape = {"shared": (K, K), "batched": (B, K, K), "time": (B, T - 1, K, K)}[trans_kind]
    trans = torch.log_softmax(2.0 * torch.randn(*shape, generator=gen, dtype=F64), -1)
    emission = torch.log_softmax(2.0 * torch.randn(K, V, generator=gen, dtype=F64), -1)  # log p(x = v | z = k)
    x = torch.randint(V, (B, T), generator=gen)
    emit = emission[:, x].permute(1, 2, 0)  # [B, T, K]
    return init, trans, emission, x, emit


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("trans_kind", ["shared", "batched", "time"])
def test_hmm_agrees_with_torch_struct(method, trans_kind):
    gen = torch.Generator().manual_seed(7)
    B, T, K, V = 4, 6, 3, 5
    init, trans, _, _, emit = random_hmm(gen, B, T, K, V, trans_kind)
    lengths = random_lengths(gen, B, T, min_length=2)
    edges = hmm_to_edges(init, trans, emit)
    crf = torch_struct.LinearChainCRF(edges, lengths=lengths)
    d = ChainPosterior(init, trans, emit, lengths=lengths, method=method)
    close(d.log_partition, crf.partition)
    close(d.edge_marginals, crf.marginals.transpose(-1, -2))
    close(d.max, crf.max)
    assert torch.equal(d.argmax, ts_path(crf.argmax, lengths))
    # node marginals: sum the edge marginals over the other end
    tm = crf.marginals
    node = torch.cat([tm[:, :1].sum(-2), tm.sum(-1)], 1)  # p(z_0) from edge 0, p(z_{n+1}) from edge n
    node = node.masked_fill(padding_mask(lengths, T)[..., None], 0.0)
    close(d.marginals, node)


def test_hmm_conversion_matches_torch_struct_adapter():
    """Our HMM -> edges conversion equals torch-struct's own ``LinearChain.hmm`` adapter."""
    gen = torch.Generator().manual_seed(8)
    init, trans, emission, x, emit = random_hmm(gen, 3, 5, 4, 6, "shared")
    # torch-struct's adapter takes transition[c_next, c_prev] and emission [V, C]
    theirs = torch_struct.LinearChain.hmm(trans.T, emission.T, init, x)
    close(hmm_to_edges(init, trans, emit), theirs, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- Pyro


def pyro_hmm(init, steps, emission):
    """DiscreteHMM equal to our chain with ``steps [B, T-1, K, K]``: Pyro's first transition has every row = init."""
    B, _, K, _ = steps.shape
    first = init.expand(B, K)[:, None, None, :].expand(B, 1, K, K)
    return dist.DiscreteHMM(
        torch.zeros(K, dtype=init.dtype),  # Pyro's z_{-1}: any distribution, the rows agree
        torch.cat([first, steps], 1),
        dist.Categorical(logits=emission),
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("trans_kind,T", [("shared", 1), ("shared", 2), ("shared", 7), ("time", 2), ("time", 7)])
def test_log_partition_agrees_with_pyro_discrete_hmm(method, trans_kind, T):
    gen = torch.Generator().manual_seed(11 + T)
    B, K, V = 3, 4, 6
    init, trans, emission, x, emit = random_hmm(gen, B, T, K, V, trans_kind)
    hmm = pyro_hmm(init, time_varying(trans, B, T), emission)
    d = ChainPosterior(init, trans, emit, method=method)
    close(d.log_partition, hmm.log_prob(x))
    # Pyro's filter: posterior of the last state given all observations
    close(d.marginals[:, -1], torch.softmax(hmm.filter(x).logits, -1))


@pytest.mark.parametrize("method", METHODS)
def test_variable_lengths_agree_with_pyro_per_sequence(method):
    gen = torch.Generator().manual_seed(13)
    B, T, K, V = 4, 6, 3, 5
    init, trans, emission, x, emit = random_hmm(gen, B, T, K, V, "time")
    lengths = torch.tensor([6, 1, 4, 2])
    d = ChainPosterior(init, trans, emit, lengths=lengths, method=method)
    lz = d.log_partition
    for b in range(B):
        L = int(lengths[b])
        hmm = pyro_hmm(init, trans[b : b + 1, : L - 1], emission)
        close(lz[b], hmm.log_prob(x[b : b + 1, :L])[0], msg=f"b={b}")


@pytest.mark.parametrize("method", METHODS)
def test_gradient_agrees_with_pyro(method):
    """d log p(x) / d (emission logits, transition logits): our DP against Pyro's autograd."""
    gen = torch.Generator().manual_seed(17)
    B, T, K, V = 2, 5, 3, 4
    init, trans, emission, x, _ = random_hmm(gen, B, T, K, V, "shared")
    logits_ours = emission.clone().requires_grad_()
    trans_ours = trans.clone().requires_grad_()
    emit = torch.log_softmax(logits_ours, -1)[:, x].permute(1, 2, 0)
    lz = ChainPosterior(init, torch.log_softmax(trans_ours, -1), emit, method=method).log_partition
    g_ours = torch.autograd.grad(lz.sum(), (logits_ours, trans_ours))
    logits_pyro = emission.clone().requires_grad_()
    trans_pyro = trans.clone().requires_grad_()
    hmm = pyro_hmm(init, time_varying(trans_pyro, B, T), logits_pyro)
    g_pyro = torch.autograd.grad(hmm.log_prob(x).sum(), (logits_pyro, trans_pyro))
    for a, b in zip(g_ours, g_pyro):
        close(a, b)
