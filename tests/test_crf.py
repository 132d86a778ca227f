"""ChainCRF against brute-force enumeration (float64), against pytorch-crf, and its constraints and errors.

The oracle lists every tag sequence of each row and scores it from the CRF's formula alone::

    s(y) = start[y_0] + sum_{t<L} x[t, y_t] + sum_{1<=t<L} W[y_{t-1}, y_t] + end[y_{L-1}]

with ``-inf`` for a disallowed transition, start or end tag.  The tagging-scheme checks use an
independent formulation of BIO and BIOES validity (a reading of the tag strings, not the masks).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from latentnlp.layers import ChainCRF, bio_constraints, bioes_constraints

F64 = torch.float64
BIO_TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
BIOES_TAGS = ["O", "B-PER", "I-PER", "E-PER", "S-PER"]


# ---------------------------------------------------------------------------------------- oracle
def paths_of(K: int, L: int) -> torch.Tensor:
    """All ``K**L`` tag sequences of length ``L``: ``[K**L, L]`` long."""
    return torch.tensor(list(itertools.product(range(K), repeat=L)), dtype=torch.long).reshape(-1, L)


def scores_of(crf: ChainCRF, emissions_b: torch.Tensor, paths: torch.Tensor) -> torch.Tensor:
    """``s(y)`` of ``paths [N, L]`` for one row's batch-first emissions ``[T, K]`` (float64)."""
    W, start, end = crf.transitions.to(F64), crf.start_transitions.to(F64), crf.end_transitions.to(F64)
    minus_inf = torch.tensor(float("-inf"), dtype=F64)
    if crf.allowed_transitions is not None:
        W = torch.where(crf.allowed_transitions, W, minus_inf)
    if crf.allowed_start is not None:
        start = torch.where(crf.allowed_start, start, minus_inf)
    if crf.allowed_end is not None:
        end = torch.where(crf.allowed_end, end, minus_inf)
    L = paths.shape[1]
    s = start[paths[:, 0]] + emissions_b.to(F64)[torch.arange(L), paths].sum(-1) + end[paths[:, -1]]
    if L > 1:
        s = s + W[paths[:, :-1], paths[:, 1:]].sum(-1)
    return s


class Oracle:
    """Every quantity of the CRF by enumerating each row's ``K**L`` tag sequences."""

    def __init__(self, crf, emissions, lengths):
        self.K = crf.num_tags
        self.T = emissions.shape[1]
        self.lengths = [int(n) for n in lengths]
        self.paths = [paths_of(self.K, n) for n in self.lengths]
        self.scores = [scores_of(crf, emissions[b], p) for b, p in enumerate(self.paths)]

    def log_z(self):
        return torch.stack([torch.logsumexp(s, 0) for s in self.scores])

    def nll(self, tags):
        out = []
        for b, (p, s) in enumerate(zip(self.paths, self.scores)):
            index = (p == tags[b, : self.lengths[b]]).all(-1).nonzero()[0, 0]
            out.append(torch.logsumexp(s, 0) - s[index])
        return torch.stack(out)

    def padded(self, path):
        return torch.cat([path, path.new_zeros(self.T - len(path))])

    def kbest(self, k):
        """``(paths [k, B, T], scores [k, B])`` best first."""
        paths, scores = [], []
        for p, s in zip(self.paths, self.scores):
            order = s.argsort(descending=True)[:k]
            paths.append(torch.stack([self.padded(p[i]) for i in order]))
            scores.append(s[order])
        return torch.stack(paths, 1), torch.stack(scores, 1)

    def marginals(self):
        out = torch.zeros(len(self.paths), self.T, self.K, dtype=F64)
        for b, (p, s) in enumerate(zip(self.paths, self.scores)):
            prob = torch.softmax(s, 0)
            for t in range(p.shape[1]):
                out[b, t].index_add_(0, p[:, t], prob)
        return out

    def sample_allowed(self, gen):
        """One allowed tag sequence per row (uniformly among those of finite score): ``[B, T]``."""
        rows = []
        for p, s in zip(self.paths, self.scores):
            allowed = torch.isfinite(s).nonzero()[:, 0]
            rows.append(self.padded(p[allowed[torch.randint(len(allowed), (), generator=gen)]]))
        return torch.stack(rows)


# ---------------------------------------------------------------------------------------- inputs
def make_crf(K, constrained=False, seed=0, constraints=None, **kwargs):
    """A float64 CRF with O(1) random scores; with ``constrained`` random masks that keep tag 0 -> 0
    allowed (so every length has an allowed path), else ``constraints``."""
    gen = torch.Generator().manual_seed(seed)
    if constrained:
        allowed = torch.rand(K, K, generator=gen) < 0.6
        start, end = torch.rand(K, generator=gen) < 0.6, torch.rand(K, generator=gen) < 0.6
        allowed[0, 0] = start[0] = end[0] = True
        constraints = (allowed, start, end)
    crf = ChainCRF(K, constraints=constraints, **kwargs).double()
    with torch.no_grad():
        for p in crf.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64))
    return crf


def make_inputs(B, T, K, seed=0, full=False):
    gen = torch.Generator().manual_seed(seed + 1)
    emissions = torch.randn(B, T, K, generator=gen, dtype=F64)
    lengths = torch.full((B,), T) if full else torch.randint(1, T + 1, (B,), generator=gen)
    lengths[0] = T
    return emissions, lengths, gen


def prefix_mask(lengths, T):
    return torch.arange(T) < lengths.unsqueeze(-1)


def close(actual, expected, tol=1e-9):
    torch.testing.assert_close(actual.detach().to(F64), expected.detach().to(F64), rtol=tol, atol=tol)


# ---------------------------------------------------------------------------------------- enumeration
@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("B,T,K", [(4, 4, 3), (3, 5, 2), (2, 1, 4), (3, 3, 4)])
def test_loss_every_reduction_matches_enumeration(B, T, K, constrained):
    crf = make_crf(K, constrained, seed=B * T * K)
    emissions, lengths, gen = make_inputs(B, T, K, seed=K)
    oracle = Oracle(crf, emissions, lengths)
    tags = oracle.sample_allowed(gen)
    expected = oracle.nll(tags)
    mask = prefix_mask(lengths, T)
    close(crf.loss(emissions, tags, lengths, reduction="none"), expected)
    close(crf.loss(emissions, tags, mask, reduction="sum"), expected.sum())
    close(crf.loss(emissions, tags, lengths, reduction="mean"), expected.mean())
    close(crf.loss(emissions, tags, mask, reduction="token_mean"), expected.sum() / lengths.sum())
    # the same padding given by ignore_index alone
    ignored = torch.where(mask, tags, torch.full_like(tags, -100))
    close(crf.loss(emissions, ignored, reduction="none"), expected)
    close(crf.loss(emissions, torch.where(mask, tags, -7), reduction="none", ignore_index=-7), expected)


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("B,T,K", [(5, 4, 3), (3, 6, 2), (2, 1, 4)])
def test_decode_and_kbest_match_enumeration(B, T, K, constrained):
    crf = make_crf(K, constrained, seed=B + T + K)
    emissions, lengths, _ = make_inputs(B, T, K, seed=T)
    oracle = Oracle(crf, emissions, lengths)
    best_paths, best_scores = oracle.kbest(3)
    assert torch.equal(crf.decode(emissions, lengths), best_paths[0])
    assert torch.equal(crf.decode(emissions, prefix_mask(lengths, T)), best_paths[0])
    paths, scores = crf.decode(emissions, lengths, k=3)
    assert paths.shape == (3, B, T) and scores.shape == (3, B)
    for b in range(B):
        n = min(3, int(torch.isfinite(oracle.scores[b]).sum()))  # rows with fewer allowed paths
        assert torch.equal(paths[:n, b], best_paths[:n, b])
        close(scores[:n, b], best_scores[:n, b])
        assert (scores[n:, b] == float("-inf")).all()


@pytest.mark.parametrize("constrained", [False, True])
def test_marginals_and_log_partition_match_enumeration(constrained):
    B, T, K = 4, 5, 3
    crf = make_crf(K, constrained, seed=3)
    emissions, lengths, _ = make_inputs(B, T, K, seed=3)
    oracle = Oracle(crf, emissions, lengths)
    close(crf.marginals(emissions, lengths), oracle.marginals())
    close(crf.distribution(emissions, lengths).log_partition, oracle.log_z())


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_loss_matches_enumeration_on_random_sizes(data):
    B, T, K = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4)), data.draw(st.integers(1, 3))
    lengths = torch.tensor(data.draw(st.lists(st.integers(1, T), min_size=B, max_size=B)))
    constrained = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**16))
    crf = make_crf(K, constrained, seed=seed)
    emissions = torch.randn(B, T, K, generator=torch.Generator().manual_seed(seed), dtype=F64)
    oracle = Oracle(crf, emissions, lengths)
    tags = oracle.sample_allowed(torch.Generator().manual_seed(seed))
    close(crf.loss(emissions, tags, lengths, reduction="none"), oracle.nll(tags))


# ---------------------------------------------------------------------------------------- gradients
class _LossOf(torch.nn.Module):
    """The CRF's summed loss as a module's forward, so ``functional_call`` can swap its parameters."""

    def __init__(self, crf):
        super().__init__()
        self.crf = crf

    def forward(self, emissions, tags, lengths):
        return self.crf.loss(emissions, tags, lengths, reduction="sum")


@pytest.mark.parametrize("constrained", [False, True])
def test_gradcheck_loss_wrt_emissions_and_parameters(constrained):
    B, T, K = 3, 4, 3
    crf = make_crf(K, constrained, seed=11)
    emissions, lengths, gen = make_inputs(B, T, K, seed=11)
    tags = Oracle(crf, emissions, lengths).sample_allowed(gen)
    module = _LossOf(crf)
    names = ["crf.transitions", "crf.start_transitions", "crf.end_transitions"]

    def loss(emissions, transitions, start, end):
        params = dict(zip(names, (transitions, start, end)))
        return torch.func.functional_call(module, params, (emissions, tags, lengths))

    inputs = [emissions.clone().requires_grad_()] + [p.detach().clone().requires_grad_() for p in crf.parameters()]
    assert torch.autograd.gradcheck(loss, inputs)


def test_disallowed_entries_get_zero_gradient_and_padding_none():
    B, T, K = 4, 6, 5
    crf = make_crf(K, seed=2, constraints=bio_constraints(BIO_TAGS))
    emissions, lengths, _ = make_inputs(B, T, K, seed=2)
    emissions.requires_grad_()
    tags = crf.decode(emissions, lengths)
    crf.loss(emissions, tags, lengths).backward()
    allowed, start, _ = bio_constraints(BIO_TAGS)
    assert (crf.transitions.grad[~allowed] == 0).all() and (crf.transitions.grad[allowed] != 0).any()
    assert (crf.start_transitions.grad[~start] == 0).all()
    mask = prefix_mask(lengths, T)
    assert (emissions.grad[~mask] == 0).all()


def test_padding_changes_nothing_and_emissions_are_not_modified():
    B, T, K = 4, 6, 3
    crf = make_crf(K, seed=4)
    emissions, lengths, gen = make_inputs(B, T, K, seed=4)
    tags = torch.randint(K, (B, T), generator=gen)
    original = emissions.clone()
    loss = crf.loss(emissions, tags, lengths, reduction="none")
    assert torch.equal(emissions, original)
    padded = torch.where(prefix_mask(lengths, T).unsqueeze(-1), emissions, torch.full_like(emissions, 1e6))
    junk_tags = torch.where(prefix_mask(lengths, T), tags, torch.full_like(tags, 99))
    close(crf.loss(padded, junk_tags, lengths, reduction="none"), loss)
    assert torch.equal(crf.decode(padded, lengths), crf.decode(emissions, lengths))
    close(crf.marginals(padded, lengths), crf.marginals(emissions, lengths))


def test_time_first_layout_agrees_with_batch_first():
    B, T, K = 3, 5, 4
    ours = make_crf(K, seed=5)
    time_first = make_crf(K, seed=5, batch_first=False)
    emissions, lengths, gen = make_inputs(B, T, K, seed=5)
    tags = torch.randint(K, (B, T), generator=gen)
    mask = prefix_mask(lengths, T)
    close(
        time_first.loss(emissions.transpose(0, 1), tags.T, mask.T, reduction="none"),
        ours.loss(emissions, tags, mask, reduction="none"),
    )
    close(
        time_first.loss(emissions.transpose(0, 1), tags.T, lengths, reduction="none"),
        ours.loss(emissions, tags, lengths, reduction="none"),
    )
    assert torch.equal(time_first.decode(emissions.transpose(0, 1), mask.T), ours.decode(emissions, mask).T)
    paths, scores = time_first.decode(emissions.transpose(0, 1), lengths, k=2)
    expected_paths, expected_scores = ours.decode(emissions, lengths, k=2)
    assert torch.equal(paths, expected_paths.transpose(1, 2))
    close(scores, expected_scores)
    close(time_first.marginals(emissions.transpose(0, 1), mask.T), ours.marginals(emissions, mask).transpose(0, 1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_emissions_are_computed_in_float32(dtype):
    B, T, K = 3, 5, 4
    crf = make_crf(K, seed=6).float()
    emissions, lengths, gen = make_inputs(B, T, K, seed=6)
    tags = torch.randint(K, (B, T), generator=gen)
    half = emissions.to(dtype).requires_grad_()
    loss = crf.loss(half, tags, lengths, reduction="none")
    loss.sum().backward()
    assert loss.dtype == torch.float32 and half.grad.dtype == dtype
    close(loss, crf.loss(half.detach().float(), tags, lengths, reduction="none"), tol=1e-5)
    assert torch.equal(crf.decode(half, lengths), crf.decode(half.detach().float(), lengths))


# ---------------------------------------------------------------------------------------- pytorch-crf
torchcrf = pytest.importorskip("torchcrf")


def peer_of(crf: ChainCRF, batch_first=True):
    """A pytorch-crf ``CRF`` with our parameters (same names, same orientation: ``[i, j]`` = i -> j)."""
    peer = torchcrf.CRF(crf.num_tags, batch_first=batch_first).to(crf.transitions.dtype)
    with torch.no_grad():
        for name in ("transitions", "start_transitions", "end_transitions"):
            getattr(peer, name).copy_(getattr(crf, name))
    return peer


@pytest.mark.parametrize("B,T,K", [(8, 12, 5), (5, 30, 9), (6, 1, 3)])
def test_agrees_with_pytorch_crf(B, T, K):
    crf = make_crf(K, seed=K)
    peer = peer_of(crf)
    emissions, lengths, gen = make_inputs(B, T, K, seed=K)
    mask = prefix_mask(lengths, T)
    tags = torch.randint(K, (B, T), generator=gen)
    close(-crf.loss(emissions, tags, mask, reduction="none"), peer(emissions, tags, mask, reduction="none"))
    close(-crf.loss(emissions, tags, mask, reduction="token_mean"), peer(emissions, tags, mask, reduction="token_mean"))
    paths = crf.decode(emissions, mask)
    assert [row[:n].tolist() for row, n in zip(paths, lengths)] == peer.decode(emissions, mask)


def test_agrees_with_time_first_pytorch_crf():
    B, T, K = 4, 7, 4
    crf = make_crf(K, seed=9, batch_first=False)
    peer = peer_of(crf, batch_first=False)
    emissions, lengths, gen = make_inputs(B, T, K, seed=9)
    emissions, mask = emissions.transpose(0, 1), prefix_mask(lengths, T).T
    tags = torch.randint(K, (T, B), generator=gen)
    close(-crf.loss(emissions, tags, mask, reduction="sum"), peer(emissions, tags, mask))
    paths = crf.decode(emissions, mask)
    assert [paths[:n, b].tolist() for b, n in enumerate(lengths)] == peer.decode(emissions, mask)


# ---------------------------------------------------------------------------------------- tagging schemes
def bio_valid(tags):
    """BIO: every I-X continues an entity X opened by B-X (directly or through I-X)."""
    inside = None
    for tag in tags:
        prefix, _, label = tag.partition("-")
        if prefix == "I" and inside != label:
            return False
        inside = label if prefix in "BI" else None
    return True


def bioes_valid(tags):
    """BIOES read as a state machine: B-X opens X, I-X continues it, E-X closes it, S-X and O stay outside."""
    inside = None
    for tag in tags:
        prefix, _, label = tag.partition("-")
        if prefix in ("I", "E"):
            if inside != label:
                return False
            inside = label if prefix == "I" else None
        elif inside is not None:
            return False
        else:
            inside = label if prefix == "B" else None
    return inside is None


SCHEMES = [
    (bio_constraints, BIO_TAGS, bio_valid),
    (bioes_constraints, BIOES_TAGS, bioes_valid),
    (bioes_constraints, ["O", "B-A", "I-A", "E-A", "S-A", "B-B", "E-B", "S-B"], bioes_valid),
]


def test_bio_constraints_table():
    allowed, start, end = bio_constraints(BIO_TAGS)
    expected = torch.tensor(
        [
            [1, 1, 0, 1, 0],  # O     -> O, B-PER, B-LOC
            [1, 1, 1, 1, 0],  # B-PER -> also I-PER
            [1, 1, 1, 1, 0],  # I-PER -> also I-PER
            [1, 1, 0, 1, 1],  # B-LOC -> also I-LOC
            [1, 1, 0, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    assert start.tolist() == [True, True, False, True, False] and end.all()


def test_bioes_constraints_table():
    allowed, start, end = bioes_constraints(BIOES_TAGS)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 1],  # O     -> O, B, S
            [0, 0, 1, 1, 0],  # B-PER -> I, E
            [0, 0, 1, 1, 0],  # I-PER -> I, E
            [1, 1, 0, 0, 1],  # E-PER -> O, B, S
            [1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)
    assert start.tolist() == [True, True, False, False, True]
    assert end.tolist() == [True, False, False, True, True]


@pytest.mark.parametrize("constraints,tags,valid", SCHEMES)
def test_decode_never_breaks_the_scheme(constraints, tags, valid):
    K = len(tags)
    crf = make_crf(K, seed=K, constraints=constraints(tags))
    with torch.no_grad():
        crf.transitions.mul_(3.0)  # strong transitions: the unconstrained argmax would break the scheme
    gen = torch.Generator().manual_seed(0)
    emissions = 3 * torch.randn(64, 12, K, generator=gen, dtype=F64)
    lengths = torch.randint(1, 13, (64,), generator=gen)
    paths = crf.decode(emissions, lengths)
    kbest, scores = crf.decode(emissions, lengths, k=3)
    for b, n in enumerate(lengths.tolist()):
        assert valid([tags[i] for i in paths[b, :n]])
        # short rows may have fewer than 3 allowed paths: the rest score -inf
        assert all(valid([tags[i] for i in kbest[r, b, :n]]) for r in range(3) if scores[r, b] > float("-inf"))
    unconstrained = make_crf(K, seed=K)
    with torch.no_grad():
        unconstrained.transitions.mul_(3.0)
    free_paths = unconstrained.decode(emissions, lengths)
    assert not all(valid([tags[i] for i in row[:n]]) for row, n in zip(free_paths, lengths))


@pytest.mark.parametrize("constraints,tags,valid", SCHEMES[:2])
def test_constrained_partition_excludes_exactly_the_invalid_paths(constraints, tags, valid):
    K, T = len(tags), 4
    constrained = make_crf(K, seed=7, constraints=constraints(tags))
    free = make_crf(K, seed=7)  # same parameters, no constraints
    emissions = torch.randn(3, T, K, generator=torch.Generator().manual_seed(7), dtype=F64)
    lengths = torch.tensor([4, 3, 1])
    log_z = constrained.distribution(emissions, lengths).log_partition
    for b, n in enumerate(lengths.tolist()):
        paths = paths_of(K, n)
        keep = torch.tensor([valid([tags[i] for i in p]) for p in paths])
        scores = scores_of(free, emissions[b], paths)
        close(log_z[b], torch.logsumexp(scores[keep], 0))
        assert torch.isfinite(scores_of(constrained, emissions[b], paths)).eq(keep).all()


# ---------------------------------------------------------------------------------------- errors
def _bad_calls():
    crf = ChainCRF(3)
    x = torch.randn(2, 4, 3)
    tags = torch.zeros(2, 4, dtype=torch.long)
    nan = x.clone()
    nan[1, 2, 0] = float("nan")
    inf = x.clone()
    inf[0, 1, 1] = float("inf")
    gap = torch.tensor([[True, True, True, True], [True, False, True, False]])
    empty = torch.tensor([[True, True, False, False], [False, False, False, False]])
    ignored_first = torch.tensor([[0, 0, 0, 0], [0, -100, 1, -100]])
    all_ignored = torch.tensor([[0, 0, 0, 0], [-100, -100, -100, -100]])
    diverged = ChainCRF(3)
    with torch.no_grad():
        diverged.transitions[1, 2] = float("nan")
    return [
        (lambda: diverged.loss(x, tags), r"transitions must be finite, got 1 NaN or inf entries"),
        (lambda: crf.loss(x[0], tags), r"emissions must have shape \[B, T, K\].*got shape \(4, 3\)"),
        (lambda: crf.decode(torch.randn(2, 4, 5)), r"emissions .*K = num_tags = 3, got shape \(2, 4, 5\)"),
        (lambda: crf.marginals(x.long()), r"emissions must be a floating-point tensor, got torch.int64"),
        (lambda: crf.decode(torch.randn(2, 0, 3)), r"emissions must have B >= 1 and T >= 1"),
        (lambda: crf.loss(x, tags[:, :3]), r"tags must have shape \[B, T\] = \[2, 4\].*got shape \(2, 3\)"),
        (lambda: crf.loss(x, tags.float()), r"tags must be an integer tensor, got torch.float32"),
        (lambda: crf.loss(x, tags + 3), r"tags must lie in 0..2 .*got values from 3 to 3"),
        (lambda: crf.loss(x, tags - 1), r"tags must lie in 0..2 .*got values from -1 to -1"),
        (lambda: crf.loss(nan, tags), r"emissions must be finite .*nan .*batch row 1, position 2, tag 0"),
        (lambda: crf.decode(inf), r"emissions must be finite .*inf .*batch row 0, position 1, tag 1"),
        (lambda: crf.decode(x, gap), r"mask: real positions must be a prefix.*batch row 1 .*position 2"),
        (lambda: crf.loss(x, tags, gap.T), r"mask must have shape \[B, T\] = \[2, 4\].*got shape \(4, 2\)"),
        (lambda: crf.decode(x, empty), r"lengths_or_mask: every row needs .*batch row 1 has none"),
        (lambda: crf.decode(x, torch.tensor([4, 0])), r"lengths must lie in 1..T = 1..4, got values from 0 to 4"),
        (lambda: crf.decode(x, torch.tensor([5, 1])), r"lengths must lie in 1..T = 1..4, got values from 1 to 5"),
        (lambda: crf.decode(x, torch.tensor([4, 1, 2])), r"lengths must have shape \[B\] = \[2\], got shape \(3,\)"),
        (lambda: crf.decode(x, torch.tensor([4.0, 1.0])), r"lengths_or_mask must be None, integer lengths .*float32"),
        (lambda: crf.loss(x, ignored_first), r"tags: real positions must be a prefix.*batch row 1 has ignore_index"),
        (lambda: crf.loss(x, all_ignored), r"tags: every row needs .*batch row 1 has none"),
        (lambda: crf.loss(x, tags, reduction="avg"), r"reduction must be one of .*got 'avg'"),
        (lambda: crf.decode(x, k=0), r"k must be None or a positive int, got 0"),
        (lambda: ChainCRF(0), r"num_tags must be a positive int, got 0"),
        (lambda: ChainCRF(3, torch.ones(3, 2, dtype=torch.bool)), r"allowed transitions must be a bool .*\[3, 3\]"),
        (lambda: ChainCRF(3, torch.ones(3, 3)), r"allowed transitions must be a bool .*torch.float32"),
        (
            lambda: ChainCRF(3, (torch.ones(3, 3, dtype=torch.bool), torch.ones(2, dtype=torch.bool))),
            r"allowed start must be a bool tensor of shape \[3\]",
        ),
        (lambda: bio_constraints(["O", "B-PER", "E-PER"]), r"'E-PER' is neither 'O' nor one of B-X, I-X"),
        (lambda: bioes_constraints(["O", "PER"]), r"'PER' is neither 'O' nor one of B-X, I-X, E-X, S-X"),
        (lambda: bio_constraints(["O", "O"]), r"tags must be distinct"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_it(index):
    call, message = _bad_calls()[index]
    with pytest.raises(ValueError, match=message):
        call()


def test_value_checks_follow_the_validation_switch():
    crf = ChainCRF(3, validate_args=False)
    x = torch.randn(2, 4, 3)
    gap = torch.tensor([[True, True, True, True], [True, False, True, True]])
    crf.decode(x, gap)  # not checked: counted as lengths [4, 3]
    with pytest.raises(ValueError, match="emissions must have shape"):
        crf.decode(x[0])  # shapes are always checked


def test_a_row_with_every_tag_ignored_adds_nothing_without_validation():
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        crf = ChainCRF(3)
        emissions = torch.randn(2, 4, 3)
        tags = torch.tensor([[0, 1, 2, 1], [-100] * 4])
        nll = crf.loss(emissions, tags, reduction="none")
        assert nll[1] == 0 and torch.isfinite(nll).all()
        torch.testing.assert_close(nll[0], crf.loss(emissions[:1], tags[:1], reduction="none")[0])
    finally:
        torch.distributions.Distribution.set_default_validate_args(True)


def test_checks_pass_non_finite_padding_and_overflowing_sums():
    """The value checks first test sums; a non-finite sum from padding (never read) or from finite
    emissions whose sum overflows is not an error, and the results are those of clean inputs."""
    B, T, K = 3, 5, 3
    crf = ChainCRF(K)
    emissions, lengths, gen = make_inputs(B, T, K, seed=7)
    emissions = emissions.float()
    tags = torch.randint(K, (B, T), generator=gen)
    real = prefix_mask(lengths, T).unsqueeze(-1)
    for junk in (float("nan"), float("inf"), float("-inf")):
        padded = torch.where(real, emissions, torch.full_like(emissions, junk))
        assert torch.equal(crf.decode(padded, lengths), crf.decode(emissions, lengths))
        close(crf.loss(padded, tags, lengths, reduction="none"), crf.loss(emissions, tags, lengths, reduction="none"))
        close(crf.marginals(padded, lengths), crf.marginals(emissions, lengths))
    huge = torch.full((B, T, K), 1e37)  # every path score finite, but the float32 sum of all is inf
    huge[:, :, 1] = 2e37
    assert torch.isinf(huge.sum())
    assert torch.equal(crf.decode(huge, lengths), real[..., 0].long())
    assert torch.isfinite(crf.loss(huge, tags, lengths)) and torch.isfinite(crf.marginals(huge, lengths)).all()


def test_decoded_paths_are_ordinary_tensors():
    """decode computes in inference mode but hands back tensors that may be changed in place."""
    crf = ChainCRF(3)
    emissions = torch.randn(2, 4, 3, requires_grad=True)
    paths = crf.decode(emissions)
    paths += 1
    best, scores = crf.decode(emissions, k=2)
    best.zero_()
    scores.mul_(2)
    assert not torch.is_inference(paths) and not torch.is_inference(best) and not torch.is_inference(scores)
