"""Greedy and beam search on a toy Markov decoder against brute-force search."""

import itertools

import pytest
import torch

from latentnlp.decoding import beam_search, gnmt_length_penalty, greedy

V, BOS, EOS, B = 4, 0, 3, 3


class MarkovDecoder:
    """``log p(y_t | y_{t-1})`` from a per-example transition table ``[B, V, V]``."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.log_softmax(2 * torch.randn(B, V, V, generator=g, dtype=torch.float64), -1)

    def decoder_start(self, batch):
        return torch.arange(B), B

    def decoder_step(self, state, tokens):
        return self.table[state, tokens], state

    def reorder_state(self, state, index):
        return state[index]

    def score(self, b, tokens):
        prev, total = BOS, 0.0
        for tok in tokens:
            total += float(self.table[b, prev, tok])
            prev = tok
        return total


def _brute_force(model, b, max_len, alpha):
    best, best_value = None, -float("inf")
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS in seq[:-1] or (n < max_len and seq[-1] != EOS):
                continue  # ends at its first <eos>, or runs to max_len
            value = model.score(b, seq) / float(gnmt_length_penalty(torch.tensor(n), alpha))
            if value > best_value:
                best, best_value = list(seq), value
    return best


BATCH = {"src": torch.zeros(B, 1, dtype=torch.long)}


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_is_exact_search(alpha):
    model, max_len = MarkovDecoder(), 4
    out = beam_search(model, BATCH, beam_size=V ** max_len, bos_id=BOS, eos_id=EOS, max_len=max_len,
                      length_penalty=alpha)
    for b in range(B):
        n = int(out.lengths[b])
        tokens = out.tokens[b, :n].tolist()
        assert tokens == _brute_force(model, b, max_len, alpha)
        assert float(out.scores[b]) == pytest.approx(model.score(b, tokens))
        assert (out.tokens[b, n:] == EOS).all()


@pytest.mark.parametrize("seed", range(4))
def test_beam_of_one_is_greedy(seed):
    model = MarkovDecoder(seed)
    g = greedy(model, BATCH, bos_id=BOS, eos_id=EOS, max_len=7)
    b = beam_search(model, BATCH, beam_size=1, bos_id=BOS, eos_id=EOS, max_len=7)
    assert torch.equal(g.tokens, b.tokens) and torch.equal(g.lengths, b.lengths)
    torch.testing.assert_close(g.scores, b.scores)
    for row in range(B):
        n = int(g.lengths[row])
        assert float(g.scores[row]) == pytest.approx(model.score(row, g.tokens[row, :n].tolist()))


def test_pad_id_and_argument_checks():
    model = MarkovDecoder()
    g = greedy(model, BATCH, bos_id=BOS, eos_id=EOS, max_len=6, pad_id=-1)
    for row in range(B):
        assert (g.tokens[row, int(g.lengths[row]):] == -1).all()
    with pytest.raises(ValueError, match="max_len"):
        greedy(model, BATCH, bos_id=BOS, eos_id=EOS, max_len=0)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, BATCH, beam_size=0, bos_id=BOS, eos_id=EOS, max_len=3)
