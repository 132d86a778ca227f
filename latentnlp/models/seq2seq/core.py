"""The encoder-decoder core of attentional sequence-to-sequence models (Deng et al. 2018).

Encoder: a bidirectional LSTM over the source gives ``s_1..s_S`` (``memory [B, S, H]``, each
direction ``H / 2``; ``memory_mask [B, S]`` True at real positions).  Decoder: an LSTM with
input feeding,

    h_t     = LSTM([emb(y_{t-1}); o_{t-1}], h_{t-1}),
    alpha_t = softmax_m score(h_t, s_m),      o_t = tanh(W_h h_t + W_c sum_m alpha_tm s_m + b),

so ``h_t`` depends on ``y_{<t}`` but not on the alignments ``z_{<t}`` (the fed vector uses the
soft context).  The core stops there: it gives the decoder states ``hidden [B, T, H]`` (the
``h_t``), the prior alignments ``log_alpha [B, T, S]`` and the attentional vectors
``attentional [B, T, H]`` (the fed ``o_t``); an output head turns them into ``log p(y_t | ...)``.
The score and ``o_t`` are those of a :class:`~latentnlp.layers.LatentAttention` (``attention``),
whose read-out the heads share.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from latentnlp.layers.encoders import encode_packed
from latentnlp.layers.latent_attention import DEFAULT_MAX_CHUNK_ELEMENTS, LatentAttention
from latentnlp.masks import lengths_to_mask
from latentnlp.validation import is_validating

__all__ = ["AttentionalEncoderDecoder", "DecoderOutput", "DecoderState", "masked_sum"]


@dataclass
class DecoderState:
    """What one decoding step needs; every tensor is batch-first (rows picked by :meth:`index_select`).

    ``h``, ``c``: per decoder layer ``[N, H]``; ``feed``: ``o_{t-1} [N, H]``; ``memory [N, S, H]``,
    ``memory_mask [N, S]`` (True at real positions); ``context``: what the output head added for
    decoding (tensors ``[N, ...]`` are reordered with the rest, anything else is kept).
    """

    h: tuple[Tensor, ...]
    c: tuple[Tensor, ...]
    feed: Tensor
    memory: Tensor
    memory_mask: Tensor
    context: dict[str, object] = field(default_factory=dict)

    def index_select(self, index: Tensor) -> DecoderState:
        def pick(x: Tensor) -> Tensor:
            return x.index_select(0, index)

        context = {k: pick(v) if isinstance(v, Tensor) else v for k, v in self.context.items()}
        return replace(
            self,
            h=tuple(map(pick, self.h)),
            c=tuple(map(pick, self.c)),
            feed=pick(self.feed),
            memory=pick(self.memory),
            memory_mask=pick(self.memory_mask),
            context=context,
        )


@dataclass
class DecoderOutput:
    """Teacher-forced decoder outputs for a batch (see the module docstring)."""

    memory: Tensor  # [B, S, H]
    memory_mask: Tensor  # [B, S]     True at real source positions
    hidden: Tensor  # [B, T, H]  decoder states h_t
    log_alpha: Tensor  # [B, T, S]  prior alignments, -inf at padded sources
    attentional: Tensor  # [B, T, H]  o_t (soft context), the fed vectors
    target_mask: Tensor  # [B, T]     True at real target positions

    @property
    def context(self) -> dict[str, Tensor]:
        """The output heads' context: ``memory``, ``memory_mask``, ``log_alpha``, ``attentional``."""
        return {
            "memory": self.memory,
            "memory_mask": self.memory_mask,
            "log_alpha": self.log_alpha,
            "attentional": self.attentional,
        }


class AttentionalEncoderDecoder(nn.Module):
    """BiLSTM encoder and input-feeding LSTM decoder with attention.

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        embedding_size, hidden_size: sizes (``hidden_size`` even: each encoder direction has half).
        num_layers: LSTM layers of the encoder and of the decoder.
        attention: alignment score, ``"mlp"``, ``"bilinear"`` or ``"dot"``.
        dropout: on embeddings, between LSTM layers and on the attentional vector.
        max_chunk_elements: see :class:`~latentnlp.layers.LatentAttention`.

    Submodules: ``src_embedding``, ``tgt_embedding``, ``encoder``, ``decoder`` (``LSTMCell`` per
    layer) and ``attention`` (score, ``o_t`` and the vocabulary read-out the heads use).
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        *,
        embedding_size: int = 256,
        hidden_size: int = 256,
        num_layers: int = 1,
        attention: str = "mlp",
        dropout: float = 0.0,
        max_chunk_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS,
    ) -> None:
        super().__init__()
        if hidden_size % 2:
            raise ValueError(f"hidden_size must be even (two encoder directions), got {hidden_size}")
        self.src_vocab_size, self.tgt_vocab_size = src_vocab_size, tgt_vocab_size
        self.embedding_size, self.hidden_size = embedding_size, hidden_size
        self.dropout = nn.Dropout(dropout)
        self.src_embedding = nn.Embedding(src_vocab_size, embedding_size)
        self.tgt_embedding = nn.Embedding(tgt_vocab_size, embedding_size)
        self.encoder = nn.LSTM(
            embedding_size,
            hidden_size // 2,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.decoder = nn.ModuleList(
            nn.LSTMCell(embedding_size + hidden_size if i == 0 else hidden_size, hidden_size) for i in range(num_layers)
        )
        self.attention = LatentAttention(
            hidden_size,
            hidden_size,
            tgt_vocab_size,
            score=attention,
            dropout=dropout,
            max_chunk_elements=max_chunk_elements,
        )

    # ---- pieces ---------------------------------------------------------------------------------
    def embed_source(self, src: Tensor) -> Tensor:
        """``dropout(emb(src))`` ``[B, S, E]``."""
        return self.dropout(self.src_embedding(src))

    def embed_target(self, tokens: Tensor) -> Tensor:
        """``dropout(emb(tokens))`` ``[..., E]``."""
        return self.dropout(self.tgt_embedding(tokens))

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor, DecoderState]:
        """``memory [B, S, H]``, ``memory_mask [B, S]`` (True at real positions) and the first decoder state."""
        if src.dim() != 2 or src_lengths.shape != src.shape[:1]:
            raise ValueError(
                f"src must be [B, S] with src_lengths [B], got {tuple(src.shape)} and {tuple(src_lengths.shape)}"
            )
        if is_validating() and (bool((src_lengths < 1).any()) or bool((src_lengths > src.shape[1]).any())):
            raise ValueError(f"src_lengths must lie in 1..{src.shape[1]}, got {src_lengths.tolist()}")
        memory, (h, c) = encode_packed(self.encoder, self.embed_source(src), src_lengths, always_pack=True)
        layers = len(self.decoder)

        def merge(x: Tensor) -> tuple[Tensor, ...]:  # [layers * 2, B, H/2] -> layers x [B, H]
            x = x.view(layers, 2, x.shape[1], x.shape[2]).transpose(1, 2)
            return tuple(x.reshape(layers, x.shape[1], -1).unbind(0))

        mask = lengths_to_mask(src_lengths, src.shape[1])
        feed = memory.new_zeros(memory.shape[0], self.attention.input_size)
        return memory, mask, DecoderState(merge(h), merge(c), feed, memory, mask)

    def step(self, state: DecoderState, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor, DecoderState]:
        """One decoder step on ``tokens [N]`` (``y_{t-1}``).

        Returns ``h_t [N, 1, H]``, ``log alpha_t [N, 1, S]``, ``o_t [N, 1, H]`` and the next state.
        """
        return self._step_embedded(self.embed_target(tokens), state)

    def _step_embedded(self, emb: Tensor, state: DecoderState) -> tuple[Tensor, Tensor, Tensor, DecoderState]:
        x = torch.cat([emb, state.feed], -1)
        new_h, new_c = [], []
        for i, cell in enumerate(self.decoder):
            hi, ci = cell(x, (state.h[i], state.c[i]))
            new_h.append(hi)
            new_c.append(ci)
            x = self.dropout(hi)
        top = new_h[-1][:, None, :]
        # the source was checked by encode: no per-step reads from the device
        log_alpha = self.attention.alignment(top, state.memory, state.memory_mask, validate_args=False).logits
        o = self.attention.attentional_hidden(top, torch.bmm(log_alpha.exp(), state.memory))
        return top, log_alpha, o, replace(state, h=tuple(new_h), c=tuple(new_c), feed=o[:, 0])

    # ---- the teacher-forced pass ----------------------------------------------------------------
    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor, tgt_lengths: Tensor) -> DecoderOutput:
        """Teacher-forced decoding of ``tgt_in [B, T]`` (``<bos> y``) given ``src [B, S]``."""
        if tgt_in.dim() != 2 or tgt_lengths.shape != tgt_in.shape[:1]:
            raise ValueError(
                f"tgt_in must be [B, T] with tgt_lengths [B], got {tuple(tgt_in.shape)} and {tuple(tgt_lengths.shape)}"
            )
        if is_validating() and (bool((tgt_lengths < 1).any()) or bool((tgt_lengths > tgt_in.shape[1]).any())):
            raise ValueError(f"tgt_lengths must lie in 1..{tgt_in.shape[1]}, got {tgt_lengths.tolist()}")
        memory, mask, state = self.encode(src, src_lengths)
        emb = self.embed_target(tgt_in)  # [B, T, E], one dropout draw for the whole batch
        hidden, log_alpha, attentional = [], [], []
        for t in range(tgt_in.shape[1]):
            top, la, o, state = self._step_embedded(emb[:, t], state)
            hidden.append(top)
            log_alpha.append(la)
            attentional.append(o)
        return DecoderOutput(
            memory,
            mask,
            torch.cat(hidden, 1),
            torch.cat(log_alpha, 1),
            torch.cat(attentional, 1),
            lengths_to_mask(tgt_lengths, tgt_in.shape[1]),
        )


def masked_sum(per_token: Tensor, mask: Tensor) -> Tensor:
    """``sum_t mask_t x_t`` over the last dimension (padding may hold anything, even -inf/NaN)."""
    return torch.where(mask, per_token, 0.0).sum(-1)
