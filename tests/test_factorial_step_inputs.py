"""The factorial chain's numpy steps and gradient buffers on inputs the layout tests do not use.

Non-contiguous parameters (transposed storage), float32 beside float64, a gradient asked of one
input only (emissions, transitions or init), one chain in the batch and lengths 1 and ``T`` mixed:
``log Z`` and the gradient of :class:`~latentnlp.FactorialChainPosterior` on each step path against
autograd through the float64 log-space forward of the ``K^L``-state chain with the Kronecker-sum
transition (:func:`factorial_oracle.product_chain`).
"""

from __future__ import annotations

import pytest
import torch
from factorial_oracle import product_chain

import latentnlp.chain
import latentnlp.factorial
from latentnlp import ChainPosterior, DenseTransition, FactorialChainPosterior

F64 = torch.float64
TOLERANCE = {F64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5)}


def per_step(x, batch, steps):
    """``[K, K]``, ``[B, K, K]`` or ``[B, T-1, K, K]`` laid out as ``[B, T-1, K, K]``."""
    x = x[:, None] if x.dim() == 3 else x
    return x.expand(batch, steps - 1, *x.shape[-2:])


def transposed_storage(x):
    """``x`` with the same values and its last two dimensions' strides swapped (not contiguous)."""
    return x.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("path", ("arrays", "numpy steps", "torch"))
def test_gradient_of_one_input_on_non_contiguous_parameters(monkeypatch, path, dtype):
    if path != "arrays":
        monkeypatch.setattr(latentnlp.chain, "ARRAY_LOOP_MAX_WORK", 0)
    if path == "torch":
        monkeypatch.setattr(latentnlp.factorial, "ARRAY_LOOP_MAX_WORK", 0)
    gen = torch.Generator().manual_seed(5)
    steps, k, num_chains = 6, 3, 2
    for layout in ("shared", "batched", "time"):
        for batch in (1, 3):
            shape = {"shared": (k, k), "batched": (batch, k, k), "time": (batch, steps - 1, k, k)}[layout]
            logs = [torch.randn(shape, generator=gen, dtype=F64).log_softmax(-1) for _ in range(num_chains)]
            init = torch.randn(batch, num_chains, k, generator=gen, dtype=F64).log_softmax(-1)
            emit = torch.randn(batch, steps, k, k, generator=gen, dtype=F64)
            lengths = torch.tensor([steps, 1, 4][:batch])
            for wrt in ("emit", "trans", "init"):
                msg = f"{layout} B={batch} gradient of {wrt}"
                narrow_logs = [transposed_storage(x.to(dtype)).requires_grad_(wrt == "trans") for x in logs]
                narrow_init = transposed_storage(init.to(dtype)).requires_grad_(wrt == "init")
                narrow_emit = transposed_storage(emit.to(dtype)).requires_grad_(wrt == "emit")
                assert not narrow_emit.is_contiguous() and not narrow_logs[0].is_contiguous()
                p = FactorialChainPosterior(narrow_init, narrow_logs, narrow_emit, lengths, method="scaled")
                leaves = {"trans": narrow_logs, "init": [narrow_init], "emit": [narrow_emit]}[wrt]
                grads = torch.autograd.grad(p.log_partition.sum(), leaves)

                wide_logs = [x.clone().requires_grad_() for x in logs]
                wide_init, wide_emit = init.clone().requires_grad_(), emit.clone().requires_grad_()
                stacked = torch.stack([per_step(x, batch, steps) for x in wide_logs], 2)
                flat_init, flat_trans, flat_emit = product_chain(wide_init, stacked, wide_emit)
                q = ChainPosterior(flat_init, DenseTransition(flat_trans), flat_emit, lengths, method="log")
                wide_leaves = {"trans": wide_logs, "init": [wide_init], "emit": [wide_emit]}[wrt]
                expected = torch.autograd.grad(q.log_partition.sum(), wide_leaves)
                assert p.log_partition.dtype == dtype, msg
                torch.testing.assert_close(p.log_partition.double(), q.log_partition, **TOLERANCE[dtype], msg=msg)
                for grad, reference in zip(grads, expected):
                    torch.testing.assert_close(grad.double(), reference, **TOLERANCE[dtype], msg=msg)
