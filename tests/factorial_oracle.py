"""Float64 references for the factorial-chain tests, written from the score formula alone.

Score of a path ``z [N, L]`` (``N`` = the length) of ``L`` chains::

    s(z) = sum_l (init[l, z^l_0] + sum_{1 <= t < N} trans[t-1, l, z^l_{t-1}, z^l_t])
           + sum_{t < N} emit[t, z^0_t, ..., z^{L-1}_t]

``FactorialEnumeration`` lists all ``(K^L)^N`` paths of each batch element; ``product_chain``
builds the ``K^L``-state chain of the same distribution with the Kronecker-sum transition
(the flattening a user without ``FactorialChainPosterior`` would write).  Nothing here uses
the library's factorial module.
"""

from __future__ import annotations

import itertools

import torch

F64 = torch.float64


def expand(init, trans, emit):
    """Float64 ``init [B, L, K]``, ``trans [B, T-1, L, K, K]`` from ``[L, K] | [B, L, K]`` and
    ``[L, K, K] | [B, L, K, K] | [B, T-1, L, K, K]``."""
    batch, steps = emit.shape[:2]
    init, trans = init.to(F64), trans.to(F64)
    if init.dim() == 2:
        init = init.expand(batch, *init.shape)
    if trans.dim() == 3:
        trans = trans.expand(batch, *trans.shape)
    if trans.dim() == 4:
        trans = trans[:, None].expand(batch, max(steps - 1, 0), *trans.shape[1:])
    return init, trans


def kron_sum(logs):
    """``log (P^0 (x) ... (x) P^{L-1})`` from the chains' log matrices ``[..., L, K, K]``: ``[..., K^L, K^L]``."""
    num_chains, k = logs.shape[-3], logs.shape[-1]
    total = logs[..., 0, :, :]
    for ell in range(1, num_chains):
        nxt = logs[..., ell, :, :]
        total = (total[..., :, None, :, None] + nxt[..., None, :, None, :]).reshape(
            *logs.shape[:-3], k ** (ell + 1), k ** (ell + 1)
        )
    return total


def joint_init(init):
    """``sum_l init[.., l, z^l]`` over the joint states: ``[..., K^L]``."""
    total = init[..., 0, :]
    for ell in range(1, init.shape[-2]):
        total = (total[..., :, None] + init[..., ell, None, :]).flatten(-2)
    return total


def product_chain(init, trans, emit):
    """``(init [B, K^L], trans [B, T-1, K^L, K^L] or [B, K^L, K^L] or [K^L, K^L], emit [B, T, K^L])``."""
    batch, steps = emit.shape[:2]
    flat_init = joint_init(init)
    return flat_init, kron_sum(trans), emit.reshape(batch, steps, -1)


class FactorialEnumeration:
    """Every quantity of the factorial chain by listing its paths (float64, tiny sizes)."""

    def __init__(self, init, trans, emit, lengths):
        self.emit = emit.to(F64)
        self.batch, self.steps = emit.shape[:2]
        self.L, self.K = emit.dim() - 2, emit.shape[2]
        self.init, self.trans = expand(init, trans, emit)
        self.lengths = lengths.cpu()
        states = list(itertools.product(range(self.K), repeat=self.L))  # row-major joint states
        self.paths, self.scores = [], []
        for b in range(self.batch):
            n = int(self.lengths[b])
            paths = torch.tensor(list(itertools.product(states, repeat=n)), dtype=torch.long)  # [P, N, L]
            self.paths.append(paths)
            self.scores.append(self.score_one(b, paths))

    def score_one(self, b, paths):
        """Scores ``[P]`` of paths ``[P, N, L]`` of element ``b``."""
        count, n, num_chains = paths.shape
        chains = torch.arange(num_chains)
        score = self.init[b][chains, paths[:, 0]].sum(-1)
        for t in range(n):
            score = score + self.emit[b, t][tuple(paths[:, t].unbind(-1))]
            if t:
                score = score + self.trans[b, t - 1][chains, paths[:, t - 1], paths[:, t]].sum(-1)
        return score

    def probs(self, b):
        return torch.softmax(self.scores[b], 0)

    @property
    def log_partition(self):
        return torch.stack([torch.logsumexp(s, 0) for s in self.scores])

    @property
    def joint_marginals(self):
        out = self.emit.new_zeros(self.batch, self.steps, self.K**self.L)
        for b in range(self.batch):
            paths, n = self.paths[b], int(self.lengths[b])
            flat = torch.zeros(paths.shape[:2], dtype=torch.long)
            for ell in range(self.L):
                flat = flat * self.K + paths[..., ell]
            onehot = torch.nn.functional.one_hot(flat, self.K**self.L).to(F64)  # [P, N, S]
            out[b, :n] = torch.einsum("p,pts->ts", self.probs(b), onehot)
        return out.reshape(self.emit.shape)

    @property
    def marginals(self):
        out = self.emit.new_zeros(self.batch, self.steps, self.L, self.K)
        for b in range(self.batch):
            n = int(self.lengths[b])
            onehot = torch.nn.functional.one_hot(self.paths[b], self.K).to(F64)  # [P, N, L, K]
            out[b, :n] = torch.einsum("p,ptlk->tlk", self.probs(b), onehot)
        return out

    def entropy(self):
        out = []
        for b in range(self.batch):
            p, log_p = self.probs(b), torch.log_softmax(self.scores[b], 0)
            out.append(-torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum())  # 0 log 0 = 0
        return torch.stack(out)

    @property
    def max(self):
        return torch.stack([s.max() for s in self.scores])

    @property
    def argmax(self):
        out = torch.zeros(self.batch, self.steps, self.L, dtype=torch.long)
        for b in range(self.batch):
            out[b, : int(self.lengths[b])] = self.paths[b][self.scores[b].argmax()]
        return out

    def score(self, z):
        """Scores ``[*, B]`` of paths ``z [*, B, T, L]`` (padding ignored)."""
        lead = z.shape[:-3]
        flat = z.reshape(-1, self.batch, self.steps, self.L)
        out = [self.score_one(b, flat[:, b, : int(self.lengths[b])]) for b in range(self.batch)]
        return torch.stack(out, -1).reshape(*lead, self.batch)

    def path_probability(self, b, z):
        """``p(z)`` of one path ``z [N, L]`` of element ``b``."""
        hit = (self.paths[b] == z[: int(self.lengths[b])]).flatten(1).all(-1)
        return self.probs(b)[hit].sum()
