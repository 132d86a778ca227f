"""The blocked scaled algorithm (``method="blocked"``) at every block size against float64 enumeration.

The ``METHODS`` grid of tests/test_chain.py runs ``method="blocked"`` with its default block
size; here :func:`latentnlp.chain.blocked_log_partition` is called with every block size from 1
to past ``T`` (sizes that divide ``T - 1`` and sizes that do not, blocks longer than some or all
lengths), for every transition layout, float32 and float64, and its log-partition, marginals
(its gradient) and final filter are compared with the enumeration.
"""

from __future__ import annotations

import pytest
import torch
from chain_oracle import F64, TRANS_KINDS, Enumeration, low_rank_dense, random_chain, random_low_rank

from latentnlp import ChainPosterior, LowRankTransition, chain

TOLERANCE = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def check_every_block(d, ref, dtype, what):
    for block in range(1, ref.T + 2):
        emit = d.emit.detach().clone().requires_grad_()
        log_z, final_filter, underflowed = chain.blocked_log_partition(d.init, d.transition, emit, d.lengths, block)
        (marginals,) = torch.autograd.grad(log_z.sum(), emit)
        msg = f"{what} block={block} lengths={ref.lengths.tolist()}"
        assert log_z.dtype == dtype and not underflowed.any(), msg
        torch.testing.assert_close(log_z.to(F64), ref.log_partition, **TOLERANCE[dtype], msg=msg)
        torch.testing.assert_close(marginals.to(F64), ref.marginals, **TOLERANCE[dtype], msg=msg)
        last = (ref.lengths - 1).view(-1, 1, 1).expand(-1, 1, ref.K)
        torch.testing.assert_close(
            final_filter.to(F64), ref.marginals.gather(1, last).squeeze(1), **TOLERANCE[dtype], msg=msg
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("trans_kind", TRANS_KINDS)
def test_blocked_matches_enumeration_at_every_block_size(trans_kind, zeros, dtype):
    gen = torch.Generator().manual_seed(TRANS_KINDS.index(trans_kind) + 10 * zeros)
    for T, K in ((1, 3), (2, 2), (5, 3), (7, 2)):
        init, trans, emit, lengths = random_chain(gen, 4, T, K, trans_kind=trans_kind, zeros=zeros, reach_T=True)
        lengths[0] = T  # one chain of full length, the others drawn (often shorter than a block)
        ref = Enumeration(init, trans, emit, lengths)
        d = ChainPosterior(init.to(dtype), trans.to(dtype), emit.to(dtype), lengths)
        check_every_block(d, ref, dtype, f"{trans_kind} T={T} K={K}")


@pytest.mark.parametrize("zeros", [False, True])
def test_blocked_through_a_low_rank_transition(zeros):
    gen = torch.Generator().manual_seed(3)
    init, _, emit, lengths = random_chain(gen, 3, 6, 3, init_kind="batched", zeros=zeros)
    log_left, log_right = random_low_rank(gen, 3, 2, zeros=zeros)
    ref = Enumeration(init, low_rank_dense(log_left, log_right), emit, lengths)
    d = ChainPosterior(init, LowRankTransition(log_left, log_right), emit, lengths)
    check_every_block(d, ref, F64, "low rank")
    # the factors' gradients agree with the scaled algorithm's
    left, right = log_left.clone().requires_grad_(), log_right.clone().requires_grad_()

    def factor_gradients(method):
        log_z = ChainPosterior(init, LowRankTransition(left, right), emit, lengths, method=method).log_partition
        return torch.autograd.grad(log_z.sum(), (left, right))

    for blocked, scaled in zip(factor_gradients("blocked"), factor_gradients("scaled")):
        torch.testing.assert_close(blocked, scaled)


def test_blocked_default_block_is_the_square_root():
    assert [chain.default_block(T) for T in (1, 2, 3, 17, 18, 1025)] == [1, 1, 2, 4, 5, 32]
