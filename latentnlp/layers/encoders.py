"""Running an ``nn.LSTM`` over padded batches: the one packed-sequence encoding of the library.

For inputs ``x [B, T, D]`` with ``lengths [B]`` (``1 <= lengths[b] <= T``) the LSTM reads row ``b``
up to ``lengths[b]`` only, so padding never changes the outputs of real positions nor the final
state, which is the state after the last real position of each row (for a bidirectional LSTM
the backward direction starts at that position)::

    out[b, t] = LSTM(x[b, :lengths[b]])_t   for t < lengths[b],   0 for t >= lengths[b]
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["encode_packed"]

LSTMState = tuple[Tensor, Tensor]


def encode_packed(
    lstm: nn.LSTM, x: Tensor, lengths: Tensor, state: LSTMState | None = None, *, always_pack: bool = False
) -> tuple[Tensor, LSTMState]:
    """``lstm`` over ``x [B, T, D]`` (``batch_first``), row ``b`` up to ``lengths[b]``.

    Returns the outputs ``[B, T, directions * H]`` (zero at padding) and the final ``(h, c)``,
    each ``[layers * directions, B, H]``; ``state`` is the initial ``(h, c)`` (default zeros).
    A batch without padding runs unpacked unless ``always_pack``: the two LSTM kernels give the
    same result up to rounding, and a model trained with one keeps it so that a seed reproduces
    its numbers bit for bit.  Packing needs the lengths on the CPU, so this reads them from the
    device once.
    """
    if not lstm.batch_first:
        raise ValueError("encode_packed needs an nn.LSTM with batch_first=True")
    T = x.shape[1]
    lengths_cpu = lengths.cpu()
    if not always_pack and bool((lengths_cpu == T).all()):
        return lstm(x, state)
    packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
    out, final = lstm(packed, state)
    out, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
    return out, final
