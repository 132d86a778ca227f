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


def _brute_force(model, b, max_length, alpha):
    best, best_value = None, -float("inf")
    for n in range(1, max_length + 1):
        for seq in itertools.product(range(V), repeat=n):
            if EOS in seq[:-1] or (n < max_length and seq[-1] != EOS):
                continue  # ends at its first <eos>, or runs to max_length
            value = model.score(b, seq) / float(gnmt_length_penalty(torch.tensor(n), alpha))
            if value > best_value:
                best, best_value = list(seq), value
    return best


BATCH = {"src": torch.zeros(B, 1, dtype=torch.long)}


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_wide_beam_is_exact_search(alpha):
    model, max_length = MarkovDecoder(), 4
    out = beam_search(
        model, BATCH, beam_size=V**max_length, bos_id=BOS, eos_id=EOS, max_length=max_length, length_penalty=alpha
    )
    for b in range(B):
        n = int(out.lengths[b])
        tokens = out.tokens[b, :n].tolist()
        assert tokens == _brute_force(model, b, max_length, alpha)
        assert float(out.scores[b]) == pytest.approx(model.score(b, tokens))
        assert (out.tokens[b, n:] == EOS).all()


@pytest.mark.parametrize("seed", range(4))
def test_beam_of_one_is_greedy(seed):
    model = MarkovDecoder(seed)
    g = greedy(model, BATCH, bos_id=BOS, eos_id=EOS, max_length=7)
    b = beam_search(model, BATCH, beam_size=1, bos_id=BOS, eos_id=EOS, max_length=7)
    assert torch.equal(g.tokens, b.tokens) and torch.equal(g.lengths, b.lengths)
    torch.testing.assert_close(g.scores, b.scores)
    for row in range(B):
        n = int(g.lengths[row])
        assert float(g.scores[row]) == pytest.approx(model.score(row, g.tokens[row, :n].tolist()))


def _plain_beam_search(model, beam_size, max_length, alpha):
    """The module's rules without early stopping: every hypothesis stepped until all finish."""
    k = beam_size
    state, size = model.decoder_start(BATCH)
    state = model.reorder_state(state, torch.arange(size).repeat_interleave(k))
    tokens = torch.full((size * k,), BOS)
    scores = torch.full((size, k), -float("inf"), dtype=torch.float64)
    scores[:, 0] = 0.0
    finished = torch.zeros(size, k, dtype=torch.bool)
    lengths = torch.zeros(size, k, dtype=torch.long)
    seqs = [[[] for _ in range(k)] for _ in range(size)]
    for _ in range(max_length):
        log_probs, state = model.decoder_step(state, tokens)
        log_probs = log_probs.view(size, k, V).clone()
        log_probs[finished] = torch.tensor([0.0 if v == EOS else -float("inf") for v in range(V)], dtype=torch.float64)
        scores, flat = (scores[..., None] + log_probs).view(size, -1).topk(k, dim=-1)
        beam, word = flat // V, flat % V
        was = finished.gather(1, beam)
        lengths = lengths.gather(1, beam) + (~was).long()
        finished = was | (word == EOS)
        seqs = [
            [seqs[b][int(beam[b, j])] + ([] if was[b, j] else [int(word[b, j])]) for j in range(k)] for b in range(size)
        ]
        state = model.reorder_state(state, (beam + torch.arange(size)[:, None] * k).view(-1))
        tokens = torch.where(was, EOS, word).view(-1)
        if finished.all():
            break
    best = (scores / gnmt_length_penalty(lengths, alpha)).argmax(-1)
    return [seqs[b][int(best[b])] for b in range(size)], scores.gather(1, best[:, None]).squeeze(1)


class CountingDecoder(MarkovDecoder):
    """Records how many hypotheses each decoder step was given."""

    def __init__(self, seed=0):
        super().__init__(seed)
        self.rows = []

    def decoder_step(self, state, tokens):
        self.rows.append(len(tokens))
        return super().decoder_step(state, tokens)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beam_size,alpha", [(2, 0.0), (3, 1.0), (5, 0.6), (4, -0.5)])
def test_early_stopping_keeps_the_answer(seed, beam_size, alpha):
    """Settled examples and finished hypotheses are not stepped, and the answer is unchanged."""
    model, max_length = CountingDecoder(seed), 9
    out = beam_search(
        model, BATCH, beam_size=beam_size, bos_id=BOS, eos_id=EOS, max_length=max_length, length_penalty=alpha
    )
    expected, expected_scores = _plain_beam_search(MarkovDecoder(seed), beam_size, max_length, alpha)
    for b in range(B):
        n = int(out.lengths[b])
        assert out.tokens[b, :n].tolist() == expected[b]
    torch.testing.assert_close(out.scores, expected_scores)
    assert model.rows[0] == B * beam_size and all(r <= B * beam_size for r in model.rows)


def test_decoder_is_stepped_on_running_rows_only():
    model = CountingDecoder(1)
    g = greedy(model, BATCH, bos_id=BOS, eos_id=EOS, max_length=12)
    # each step holds exactly the examples that had not ended before it
    for t, rows in enumerate(model.rows):
        assert rows == int((g.lengths > t).sum())
    model.rows.clear()
    beam_search(model, BATCH, beam_size=3, bos_id=BOS, eos_id=EOS, max_length=12)
    assert model.rows[-1] < B * 3


def test_pad_id_and_argument_checks():
    model = MarkovDecoder()
    g = greedy(model, BATCH, bos_id=BOS, eos_id=EOS, max_length=6, pad_id=-1)
    for row in range(B):
        assert (g.tokens[row, int(g.lengths[row]) :] == -1).all()
    with pytest.raises(ValueError, match="max_length"):
        greedy(model, BATCH, bos_id=BOS, eos_id=EOS, max_length=0)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, BATCH, beam_size=0, bos_id=BOS, eos_id=EOS, max_length=3)
