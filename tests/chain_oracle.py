"""Float64 reference implementations for the linear-chain tests.

Nothing here uses latentnlp: the oracles are written from the score formula of
``ChainPosterior`` alone, so that a test compares the library with an independent
computation.

Score of a state sequence ``z`` of length ``L`` for one batch element::

    score(z) = init[z_0] + sum_{t < L} emit[t, z_t] + sum_{1 <= t < L} trans[t-1, z_{t-1}, z_t]

``Enumeration`` lists all ``K**L`` sequences of each batch element and computes
every quantity of the distribution from the list of scores (exact, small shapes
only).  ``forward_log`` is a plain log-space forward loop, for long sequences.
``random_chain`` draws test inputs in every accepted layout.
"""

from __future__ import annotations

import itertools

import torch

F64 = torch.float64
TRANS_KINDS = ("shared", "batched", "time")  # [K,K], [B,K,K], [B,T-1,K,K]
INIT_KINDS = ("shared", "batched")  # [K], [B,K]


# --------------------------------------------------------------------------- layouts


def expand_params(init, trans, emit):
    """Return float64 ``init [B,K]``, ``trans [B,T-1,K,K]``, ``emit [B,T,K]`` (views where possible)."""
    emit = emit.to(F64)
    B, T, K = emit.shape
    init = init.to(F64)
    if init.dim() == 1:
        init = init.expand(B, K)
    trans = trans.to(F64)
    if trans.dim() == 2:
        trans = trans.expand(B, max(T - 1, 0), K, K)
    elif trans.dim() == 3:
        trans = trans[:, None].expand(B, max(T - 1, 0), K, K)
    return init, trans, emit


def full_lengths(emit, lengths):
    B, T, _ = emit.shape
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long)
    return lengths.to(torch.long).cpu()


# --------------------------------------------------------------------------- enumeration


def all_paths(K: int, L: int) -> torch.Tensor:
    """All ``K**L`` state sequences of length ``L`` as a LongTensor ``[K**L, L]`` (lexicographic)."""
    return torch.tensor(list(itertools.product(range(K), repeat=L)), dtype=torch.long).reshape(-1, L)


def path_scores(init_b, trans_b, emit_b, paths):
    """Scores ``[N]`` of ``paths [N, L]`` for one batch element (differentiable in the parameters).

    ``init_b [K]``, ``trans_b [T-1, K, K]``, ``emit_b [T, K]``; only positions ``< L`` are read.
    """
    N, L = paths.shape
    t = torch.arange(L)
    s = init_b[paths[:, 0]] + emit_b[t, paths].sum(-1)
    if L > 1:
        s = s + trans_b[t[:-1], paths[:, :-1], paths[:, 1:]].sum(-1)
    return s


class Enumeration:
    """Every member of the chain distribution, by listing all state sequences (float64).

    Gradients flow to the parameters when they require grad (the sums are plain torch ops).
    """

    def __init__(self, init, trans, emit, lengths=None):
        self.init, self.trans, self.emit = expand_params(init, trans, emit)
        self.B, self.T, self.K = self.emit.shape
        self.lengths = full_lengths(self.emit, lengths)
        self.paths = []  # per batch element: [N_b, L_b]
        self.scores = []  # per batch element: [N_b]
        for b in range(self.B):
            L = int(self.lengths[b])
            p = all_paths(self.K, L)
            self.paths.append(p)
            self.scores.append(path_scores(self.init[b], self.trans[b], self.emit[b], p))

    # -- sums
    @property
    def log_partition(self):
        return torch.stack([torch.logsumexp(s, 0) for s in self.scores])

    def probs(self, b):
        """Posterior probability ``[N_b]`` of each enumerated path of element ``b``."""
        s = self.scores[b]
        return torch.exp(s - torch.logsumexp(s, 0))

    @property
    def marginals(self):
        out = []
        for b in range(self.B):
            L = int(self.lengths[b])
            onehot = torch.nn.functional.one_hot(self.paths[b], self.K).to(F64)  # [N, L, K]
            m = torch.einsum("n,ntk->tk", self.probs(b), onehot)
            out.append(torch.cat([m, m.new_zeros(self.T - L, self.K)]))
        return torch.stack(out)

    @property
    def edge_marginals(self):
        out = []
        K = self.K
        for b in range(self.B):
            L = int(self.lengths[b])
            e = self.emit.new_zeros(max(self.T - 1, 0), K * K)
            if L > 1:
                p = self.paths[b]
                pair = p[:, :-1] * K + p[:, 1:]  # [N, L-1], index of (z_t = i, z_{t+1} = j)
                onehot = torch.nn.functional.one_hot(pair, K * K).to(F64)
                e = torch.cat([torch.einsum("n,ntk->tk", self.probs(b), onehot), e[L - 1 :]])
            out.append(e.reshape(-1, K, K))
        return torch.stack(out)

    def entropy(self):
        out = []
        for b in range(self.B):
            p = self.probs(b)
            logp = self.scores[b] - torch.logsumexp(self.scores[b], 0)
            out.append(-(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum())
        return torch.stack(out)

    # -- max
    @property
    def max(self):
        return torch.stack([s.max() for s in self.scores])

    @property
    def argmax(self):
        out = torch.zeros(self.B, self.T, dtype=torch.long)
        for b in range(self.B):
            L = int(self.lengths[b])
            out[b, :L] = self.paths[b][self.scores[b].argmax()]
        return out

    def sorted_scores(self, b):
        """Scores of element ``b`` in decreasing order, with their paths."""
        s, idx = torch.sort(self.scores[b], descending=True)
        return s, self.paths[b][idx]

    def top_gap(self, b):
        """Difference between the best and second-best score (inf when there is one path)."""
        s, _ = self.sorted_scores(b)
        return float("inf") if s.numel() < 2 else float(s[0] - s[1])

    # -- single paths
    def score(self, z):
        """Scores ``[*, B]`` of paths ``z [*, B, T]`` (padding positions ignored)."""
        z = torch.as_tensor(z)
        lead = z.shape[:-2]
        zf = z.reshape(-1, self.B, self.T)
        out = []
        for b in range(self.B):
            L = int(self.lengths[b])
            out.append(path_scores(self.init[b], self.trans[b], self.emit[b], zf[:, b, :L]))
        return torch.stack(out, -1).reshape(*lead, self.B)

    def log_prob(self, z):
        return self.score(z) - self.log_partition

    def path_index(self, b, z_b):
        """Index of path ``z_b [.., >= L]`` of element ``b`` in the lexicographic enumeration."""
        L = int(self.lengths[b])
        idx = torch.zeros(z_b.shape[:-1], dtype=torch.long)
        for t in range(L):
            idx = idx * self.K + z_b[..., t]
        return idx


# --------------------------------------------------------------------------- long sequences


def forward_log(init, trans, emit, lengths=None):
    """log-partition ``[B]`` by the plain log-space forward recursion in float64 (any T)."""
    init, trans, emit = expand_params(init, trans, emit)
    B, T, K = emit.shape
    lengths = full_lengths(emit, lengths)
    emits = emit.unbind(1)  # one unbind, not T selects: keeps autograd through the loop O(T)
    transs = trans.unbind(1)
    alpha = init + emits[0]
    for t in range(1, T):
        new = torch.logsumexp(alpha[:, :, None] + transs[t - 1], dim=1) + emits[t]
        alpha = torch.where((t < lengths)[:, None], new, alpha)
    return torch.logsumexp(alpha, -1)


def viterbi_lowest_index(init, trans, emit, lengths=None):
    """The Viterbi path ``[B, T]`` (padding 0) by stored back-pointers, every tie to the lowest index.

    Plain Python loops in float64: ``a_t[j] = max_i (a_{t-1}[i] + trans[t-1, i, j]) + emit[t, j]``
    with ``bp_t[j]`` the lowest maximising ``i``, the last state the lowest maximiser of
    ``a_{L-1}``.  With integer scores (exact in float32 and float64) this fixes the path among
    tied optima, the rule the library documents.
    """
    init, trans, emit = expand_params(init, trans, emit)
    B, T, K = emit.shape
    lengths = full_lengths(emit, lengths)
    out = torch.zeros(B, T, dtype=torch.long)

    def lowest_argmax(values):
        best = max(values)
        return values.index(best)

    for b in range(B):
        L = int(lengths[b])
        a = [float(init[b, k] + emit[b, 0, k]) for k in range(K)]
        pointers = []
        for t in range(1, L):
            step, bp = [], []
            for j in range(K):
                candidates = [a[i] + float(trans[b, t - 1, i, j]) for i in range(K)]
                i = lowest_argmax(candidates)
                bp.append(i)
                step.append(candidates[i] + float(emit[b, t, j]))
            a = step
            pointers.append(bp)
        z = lowest_argmax(a)
        for t in range(L - 1, 0, -1):
            out[b, t] = z
            z = pointers[t - 1][z]
        out[b, 0] = z
    return out


# --------------------------------------------------------------------------- inputs


def random_lengths(gen, B, T, *, full=False, min_length=1, reach_T=True):
    """Random lengths in ``min_length..T``: all ``T`` when ``full``; one of them ``T`` when ``reach_T``."""
    if full:
        return torch.full((B,), T, dtype=torch.long)
    lengths = torch.randint(min_length, T + 1, (B,), generator=gen)
    if reach_T:
        lengths[torch.randint(B, (1,), generator=gen)] = T
    return lengths


def random_chain(
    gen,
    B,
    T,
    K,
    *,
    trans_kind="shared",
    init_kind="shared",
    scale=1.0,
    zeros=False,
    dtype=F64,
    full=False,
    reach_T=True,
):
    """Random ``(init, trans, emit, lengths)`` in the requested layouts.

    ``scale`` multiplies every score.  With ``zeros`` some entries of every parameter are
    ``-inf`` (structural zeros), but one state ``s`` keeps ``init[s]``, ``trans[.., s, s]``
    and ``emit[.., s]`` finite, so every sequence length has a feasible path.
    """

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64) * scale

    init = randn(K) if init_kind == "shared" else randn(B, K)
    if trans_kind == "shared":
        trans = randn(K, K)
    elif trans_kind == "batched":
        trans = randn(B, K, K)
    elif trans_kind == "time":
        trans = randn(B, max(T - 1, 0), K, K)
    else:
        raise AssertionError(trans_kind)
    emit = randn(B, T, K)
    if zeros and K > 1:
        s = int(torch.randint(K, (1,), generator=gen))

        def mask(x, p, keep):
            m = torch.rand(x.shape, generator=gen) < p
            keep(m)
            return x.masked_fill(m, float("-inf"))

        def keep_init(m):
            m[..., s] = False

        def keep_trans(m):
            m[..., s, s] = False

        init = mask(init, 0.4, keep_init)
        trans = mask(trans, 0.4, keep_trans)
        emit = mask(emit, 0.2, keep_init)
    lengths = random_lengths(gen, B, T, full=full, reach_T=reach_T)
    return init.to(dtype), trans.to(dtype), emit.to(dtype), lengths


def padding_mask(lengths, T):
    """Bool ``[B, T]``: True at padding positions ``t >= length``."""
    return torch.arange(T)[None, :] >= lengths[:, None]


# --------------------------------------------------------------------------- low rank and divergences


def random_low_rank(gen, K, r, *, zeros=False, dtype=F64):
    """Log factors ``log_left [K, r]``, ``log_right [r, K]`` of random non-negative scores (not
    normalised: a CRF's).  With ``zeros`` some entries are ``-inf`` but pseudo-state 0 keeps
    every row of ``log_left`` and every column of ``log_right`` finite, so every pair stays possible."""
    log_left = torch.randn(K, r, generator=gen, dtype=F64)
    log_right = torch.randn(r, K, generator=gen, dtype=F64)
    if zeros and r > 1:
        log_left = log_left.masked_fill(torch.rand(K, r, generator=gen) < 0.4, float("-inf"))
        log_right = log_right.masked_fill(torch.rand(r, K, generator=gen) < 0.4, float("-inf"))
        log_left[:, 0] = 0.0
        log_right[0] = 0.0
    return log_left.to(dtype), log_right.to(dtype)


def low_rank_dense(log_left, log_right):
    """``trans[i, j] = log sum_c exp(log_left[i, c] + log_right[c, j])``: ``[K, K]`` (brute force)."""
    return torch.logsumexp(log_left.unsqueeze(-1) + log_right.unsqueeze(0), 1)


def enumerated_cross_entropy(p, q):
    """``-sum_z p(z) log q(z)`` of two :class:`Enumeration` s over the same states and lengths: ``[B]``."""
    out = []
    for b in range(p.B):
        prob = p.probs(b)
        log_q = q.scores[b] - torch.logsumexp(q.scores[b], 0)
        out.append(-(torch.where(prob > 0, prob * log_q, torch.zeros_like(prob))).sum())
    return torch.stack(out)
