"""LSTM language model with a softmax or a mixture-of-softmaxes output layer.

For a token sequence ``x_1..x_T`` (``inputs``) and its next tokens ``y_t``
(``targets``; ``y_t = x_{t+1}`` in a stream)::

    h_t = LSTM(embed(x_1..x_t))                                     [H]
    softmax: log p(y_t | x_<=t) = log softmax(W g(h_t) + b)_{y_t}
    MoS:     log p(y_t | x_<=t) = logsumexp_k(log pi_k(h_t) + log softmax(W g_k(h_t) + b)_{y_t})

With MoS the expert ``k`` is a per-token latent variable; it is summed out
exactly, so :meth:`LSTMLanguageModel.log_marginal` is exact and the only
objective is ``"marginal"``.

Streams (BPTT): when ``batch["stream"]`` is true, row ``b`` of a batch continues
row ``b`` of the previous stream batch, and the (detached) LSTM state is carried
from one call to the next.  :meth:`~LSTMLanguageModel.reset_state` forgets it;
it is part of ``state_dict()`` (``_extra_state``), so a run resumed from a
checkpoint continues bit-identically.  Batches without ``stream`` start from the
zero state and leave the carried state alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from latentnlp.layers import MixtureOfSoftmaxes, SoftmaxOutput
from latentnlp.layers.checks import IGNORE_INDEX
from latentnlp.layers.encoders import encode_packed
from latentnlp.masks import lengths_to_mask
from latentnlp.models.base import Batch, LatentModel
from latentnlp.models.stream_state import CarriesStreamState
from latentnlp.validation import is_validating

LSTMState = tuple[Tensor, Tensor]


class LSTMLanguageModel(CarriesStreamState, LatentModel):
    """``LSTMLanguageModel(vocab_size, embedding_size, hidden_size, num_layers=1, *,
    output="softmax"|"mos", softmax_input_size=None, num_experts=None, dropout=0.0,
    tie_weights=False, max_chunk_elements=None, output_activation="tanh", ignore_index=-100)``.

    * ``softmax_input_size`` (``d``): the size of the vectors the output embedding
      ``W [V, d]`` scores.  ``output="softmax"``: ``None`` scores the LSTM output
      directly (``d = hidden_size``), an integer inserts ``tanh(P h)`` of that size.
      ``output="mos"``: ``None`` means ``d = hidden_size``.
    * ``num_experts``: MoS only (default 15, Yang et al.'s PTB setting).
    * ``dropout``: on the embeddings, between LSTM layers, on the LSTM output,
      and on the output layer's projection ``g`` when it has one.
    * ``tie_weights``: share ``W`` with the input embedding (needs ``d == embedding_size``).
    * ``max_chunk_elements``: the most vocabulary scores the output layer builds at once
      (``None``: all; see :class:`~latentnlp.layers.SoftmaxOutput`).
    * ``output_activation``: ``"tanh"`` or ``"identity"`` on the output layer's
      projection (MoS experts, or the softmax's ``P h``); see ``SoftmaxOutput``.
    * ``ignore_index``: a target equal to it (within ``lengths``) is not scored and does not count
      as a token (as in ``torch.nn.functional.cross_entropy``).

    Batches: ``inputs [B, T]``, ``targets [B, T]`` (long), ``lengths [B]``,
    optional ``stream`` (bool).
    """

    objectives = ("marginal",)
    carried_names = ("hidden", "cell")

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        output: Literal["softmax", "mos"] = "softmax",
        softmax_input_size: int | None = None,
        num_experts: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = False,
        max_chunk_elements: int | None = None,
        output_activation: str = "tanh",
        ignore_index: int = IGNORE_INDEX,
    ) -> None:
        super().__init__()
        for arg, value in (
            ("vocab_size", vocab_size),
            ("embedding_size", embedding_size),
            ("hidden_size", hidden_size),
            ("num_layers", num_layers),
        ):
            if value < 1:
                raise ValueError(f"LSTMLanguageModel: {arg} must be >= 1, got {value}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LSTMLanguageModel: dropout must be in [0, 1), got {dropout}")
        self.output = output
        self.vocab_size = vocab_size
        self.ignore_index = ignore_index
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        self.lstm = nn.LSTM(
            embedding_size, hidden_size, num_layers, batch_first=True, dropout=dropout if num_layers > 1 else 0.0
        )
        self.dropout = nn.Dropout(dropout)
        if output == "softmax":
            if num_experts is not None:
                raise ValueError(f"LSTMLanguageModel: num_experts={num_experts} needs output='mos'")
            self.output_layer: SoftmaxOutput | MixtureOfSoftmaxes = SoftmaxOutput(
                hidden_size,
                vocab_size,
                softmax_input_size,
                dropout=0.0 if softmax_input_size is None else dropout,
                max_chunk_elements=max_chunk_elements,
                activation=output_activation,
            )
        elif output == "mos":
            self.output_layer = MixtureOfSoftmaxes(
                hidden_size,
                vocab_size,
                15 if num_experts is None else num_experts,
                softmax_input_size,
                dropout=dropout,
                max_chunk_elements=max_chunk_elements,
                activation=output_activation,
            )
        else:
            raise ValueError(f"LSTMLanguageModel: output must be 'softmax' or 'mos', got {output!r}")
        if tie_weights:
            d = self.output_layer.projection_size
            if d != embedding_size:
                raise ValueError(
                    f"LSTMLanguageModel: tie_weights needs softmax_input_size == "
                    f"embedding_size, got {d} and {embedding_size}"
                )
            self.output_layer.tie_weights(self.embedding)
        self.reset_state()

    # ---- carried state ----------------------------------------------------------------------
    def _initial_state(self, batch: Batch, like: Tensor) -> LSTMState | None:
        h, c = self.carried["hidden"], self.carried["cell"]
        if not batch.get("stream", False) or h is None or c is None:
            return None
        if h.shape[1] != like.shape[0]:
            raise ValueError(
                f"LSTMLanguageModel: the carried stream state has batch size {h.shape[1]},"
                f" the batch has inputs {tuple(like.shape)}; call reset_state() between"
                " streams of different batch sizes"
            )
        return h.to(like.device), c.to(like.device)

    # ---- the network ------------------------------------------------------------------------
    def _check_batch(self, batch: Batch, with_targets: bool = True) -> tuple[Tensor, ...]:
        """(inputs, targets or None, lengths, mask) with padding positions of ids set to 0."""
        names = ("inputs", "targets", "lengths") if with_targets else ("inputs", "lengths")
        missing = [n for n in names if not isinstance(batch.get(n), Tensor)]
        if missing:
            raise ValueError(f"LSTMLanguageModel: batch needs tensors {names}, missing {missing}")
        inputs, lengths = batch["inputs"], batch["lengths"]
        targets = batch["targets"] if with_targets else None
        if inputs.dim() != 2 or inputs.dtype != torch.long or 0 in inputs.shape:
            raise ValueError(
                f"LSTMLanguageModel: inputs must be a non-empty LongTensor [B, T], "
                f"got {inputs.dtype} {tuple(inputs.shape)}"
            )
        if targets is not None and (targets.shape != inputs.shape or targets.dtype != torch.long):
            raise ValueError(
                f"LSTMLanguageModel: targets must be a LongTensor of the shape of inputs "
                f"{tuple(inputs.shape)}, got {targets.dtype} {tuple(targets.shape)}"
            )
        B, T = inputs.shape
        if lengths.shape != (B,) or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise ValueError(
                f"LSTMLanguageModel: lengths must be an integer tensor [B] = [{B}], "
                f"got {lengths.dtype} {tuple(lengths.shape)}"
            )
        lengths = lengths.to(inputs.device, torch.long)
        mask = lengths_to_mask(lengths, T)
        inputs = inputs.masked_fill(~mask, 0)
        ids = [inputs]
        if targets is not None:
            targets = targets.masked_fill(~mask, 0)
            ids.append(targets)
        if is_validating():  # value ranges: one read from the device
            scored = [] if targets is None else [targets.masked_fill(targets == self.ignore_index, 0)]
            low_len, high_len, low_in, high_in, *bounds = torch.stack(
                [lengths.min(), lengths.max(), inputs.min(), inputs.max()]
                + [x.min() for x in scored]
                + [x.max() for x in scored]
            ).tolist()
            if low_len < 1 or high_len > T:
                raise ValueError(
                    f"LSTMLanguageModel: lengths must lie in 1..T = 1..{T}, got min {low_len} max {high_len}"
                )
            if low_in < 0 or high_in >= self.vocab_size:
                raise ValueError(
                    f"LSTMLanguageModel: inputs (token ids) must lie in 0..{self.vocab_size - 1},"
                    f" got {low_in}..{high_in}"
                )
            if bounds and (bounds[0] < 0 or bounds[1] >= self.vocab_size):
                raise ValueError(
                    f"LSTMLanguageModel: targets (token ids) must lie in 0..{self.vocab_size - 1} or be ignore_index = "
                    f"{self.ignore_index}, got {bounds[0]}..{bounds[1]} (ignore_index left out)"
                )
        return inputs, targets, lengths, mask

    def _encode(self, inputs: Tensor, lengths: Tensor, state: LSTMState | None) -> tuple[Tensor, LSTMState]:
        """LSTM outputs ``[B, T, H]`` and the state after the last valid position of each row."""
        out, final = encode_packed(self.lstm, self.dropout(self.embedding(inputs)), lengths, state)
        return self.dropout(out), final

    # ---- LatentModel ------------------------------------------------------------------------
    def log_marginal(self, batch: Batch) -> Tensor:
        """``sum_{t < length} log p(targets_t | inputs_<=t)`` per row, ``[B]`` (experts summed out)."""
        inputs, targets, lengths, mask = self._check_batch(batch)
        hidden, final = self._encode(inputs, lengths, self._initial_state(batch, inputs))
        if batch.get("stream", False):
            self.carried = {"hidden": final[0].detach(), "cell": final[1].detach()}
        log_p = self.output_layer.log_prob(hidden[mask], targets[mask], ignore_index=self.ignore_index)
        per_token = log_p.new_zeros(mask.shape)
        per_token[mask] = log_p
        return per_token.sum(-1)

    def num_tokens(self, batch: Batch) -> Tensor:
        """Target tokens of each row ``[B]``: positions within ``lengths`` whose target is not ``ignore_index``."""
        targets, lengths = batch["targets"], batch["lengths"]
        assert isinstance(targets, Tensor) and isinstance(lengths, Tensor)
        mask = lengths_to_mask(lengths.to(targets.device), targets.shape[1])
        return (mask & (targets != self.ignore_index)).sum(-1)

    @torch.no_grad()
    def generate(
        self,
        batch: Batch,
        max_length: int = 20,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        eos_index: int | None = None,
    ) -> Tensor:
        """Sample continuations of the prefixes ``inputs [B, T]`` (``lengths [B]``): ``[B, max_length]``.

        Each token is drawn from ``p(y | prefix)^(1/temperature)`` renormalised;
        ``temperature=0`` is greedy.  With ``eos_index``, a row that produced it
        is filled with it from there on, and sampling stops when every row has.
        Starts from the zero state (the carried stream state is neither used nor
        changed).  Call ``model.eval()`` first unless dropout is wanted.
        """
        if max_length < 0 or temperature < 0:
            raise ValueError(
                f"LSTMLanguageModel.generate: max_length and temperature must be >= 0, "
                f"got {max_length} and {temperature}"
            )
        inputs, _, lengths, _ = self._check_batch(batch, with_targets=False)
        B = inputs.shape[0]
        hidden, state = self._encode(inputs, lengths, None)
        last = hidden[torch.arange(B, device=hidden.device), lengths - 1]
        tokens = inputs.new_full((B, max_length), 0 if eos_index is None else eos_index)
        finished = torch.zeros(B, dtype=torch.bool, device=inputs.device)
        for step in range(max_length):
            log_p = self.output_layer.log_probs(last)  # [B, V]
            if temperature == 0:
                y = log_p.argmax(-1)
            else:
                probs = torch.softmax(log_p / temperature, dim=-1)
                y = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            if eos_index is not None:
                y = y.masked_fill(finished, eos_index)
                finished |= y == eos_index
            tokens[:, step] = y
            if (eos_index is not None and bool(finished.all())) or step == max_length - 1:
                break
            out, state = self.lstm(self.dropout(self.embedding(y[:, None])), state)
            last = self.dropout(out[:, 0])
        return tokens


class MixtureOfSoftmaxesLM(LSTMLanguageModel):
    """The LSTM language model of Yang et al. (2018): :class:`LSTMLanguageModel` with
    ``output="mos"`` (the expert of each token summed out exactly), ``num_experts`` experts of
    ``softmax_input_size`` dimensions.  Its one-softmax baseline is
    ``LSTMLanguageModel(..., output="softmax")``."""

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        num_layers: int = 1,
        *,
        num_experts: int = 15,
        **kwargs,
    ) -> None:
        super().__init__(
            vocab_size, embedding_size, hidden_size, num_layers, output="mos", num_experts=num_experts, **kwargs
        )
