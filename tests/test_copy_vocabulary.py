"""Copy plumbing end to end: ExtendedVocabulary from token strings, CopyGenerator.attend, and a
user-written GRU encoder-decoder with copy attention that learns to copy words it has no id for."""

import pytest
import torch
from torch import nn

from latentnlp.data.vocabulary import Vocabulary
from latentnlp.layers import CopyGenerator, ExtendedVocabulary, LatentAttention

VOCAB = {"<unk>": 0, "<bos>": 1, "<eos>": 2, "the": 3, "cat": 4, "sat": 5, "dog": 6}
UNK, BOS, EOS, V = 0, 1, 2, len(VOCAB)


def test_from_batch_builds_the_source_map_targets_and_words():
    src = [["the", "zork", "cat", "zork", "blip"], ["blip", "sat"]]
    tgt = [["blip", "cat", "frob", "<eos>"], ["zork", "<eos>"]]
    ext = ExtendedVocabulary.from_batch(src, VOCAB, unk_id=UNK)
    # per row: the k-th distinct source-only word is V + k
    assert ext.src_ext.tolist() == [[3, V, 4, V, V + 1], [V, 5, 0, 0, 0]]
    assert ext.memory_mask.tolist() == [[True] * 5, [True, True, False, False, False]]
    assert ext.oovs == [["zork", "blip"], ["blip"]] and ext.extended_size == V + 2
    y = ext.extended_targets(tgt)
    # "frob" is in neither the vocabulary nor the source: unk; "zork" is not in row 1's source: unk
    assert y.tolist() == [[V + 1, 4, UNK, EOS], [UNK, EOS, -100, -100]]
    assert ext.words(y) == [["blip", "cat", "<unk>", "<eos>"], ["<unk>", "<eos>"]]
    assert ext.words([[V, V + 1], [V]]) == [["zork", "blip"], ["blip"]]
    assert ext.decoder_inputs(y).tolist() == [[UNK, 4, UNK, EOS], [UNK, EOS, UNK, UNK]]
    with pytest.raises(ValueError, match="past its extended vocabulary"):
        ext.words([[V + 1], [V + 1]])  # row 1 has one source-only word
    with pytest.raises(ValueError, match="needs unk_id"):
        ExtendedVocabulary.from_batch(src, VOCAB).extended_targets(tgt)
    with pytest.raises(ValueError, match="one target per source row"):
        ext.extended_targets(tgt[:1])


def test_a_library_vocabulary_works_like_a_dict():
    vocab = Vocabulary(list(VOCAB), pad=None, bos="<bos>", eos="<eos>", unk="<unk>")
    src = [["the", "zork"]]
    a = ExtendedVocabulary.from_batch(src, vocab, unk_id=vocab.unk_id)
    b = ExtendedVocabulary.from_batch(src, VOCAB, unk_id=UNK)
    assert torch.equal(a.src_ext, b.src_ext)
    assert a.words(a.extended_targets([["zork", "the"]])) == [["zork", "the"]]


def test_attend_is_the_three_calls_it_replaces():
    torch.manual_seed(0)
    attention = LatentAttention(6, 6, V, mode="soft")
    copy = CopyGenerator.for_attention(attention)
    assert copy.output_projection is attention.output_projection
    hidden, memory = torch.randn(2, 3, 6), torch.randn(2, 5, 6)
    ext = ExtendedVocabulary.from_batch([["the", "zork", "cat", "dog", "blip"], ["sat", "zork"]], VOCAB, unk_id=UNK)
    targets = torch.tensor([[V, 4, V + 1], [V, 5, 2]])
    out = copy.attend(
        attention, hidden, memory, ext.memory_mask, targets, src_ext=ext.src_ext, extended_size=ext.extended_size
    )
    log_alpha = attention.alignment(hidden, memory, ext.memory_mask).logits
    o = attention.attentional_hidden(hidden, torch.bmm(log_alpha.exp(), memory))
    by_hand = copy(o, log_alpha, ext.src_ext, targets, extended_size=ext.extended_size)
    torch.testing.assert_close(out.log_prob, by_hand.log_prob)
    torch.testing.assert_close(out.attentional, o)
    torch.testing.assert_close(out.log_alpha, log_alpha)
    assert out.log_prob[1, 0] > -float("inf")  # "zork" copied in row 1
    padding = copy.attend(
        attention, hidden, memory, targets=targets, key_padding_mask=~ext.memory_mask, src_ext=ext.src_ext
    )
    torch.testing.assert_close(padding.log_prob, out.log_prob)
    with pytest.raises(ValueError, match="projection_size"):
        CopyGenerator(5, V).attend(attention, hidden, memory, ext.memory_mask, src_ext=ext.src_ext)


class GRUCopyModel(nn.Module):
    """What a user writes: a GRU encoder, a GRU decoder with input feeding, copy attention."""

    def __init__(self, vocab_size: int, size: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, size)
        self.encoder = nn.GRU(size, size, batch_first=True)
        self.cell = nn.GRUCell(2 * size, size)
        self.attention = LatentAttention(size, size, vocab_size, mode="soft")
        self.copy = CopyGenerator.for_attention(self.attention)
        self.size = size

    def start(self, ext: ExtendedVocabulary):
        memory, h = self.encoder(self.embed(ext.decoder_inputs(ext.src_ext)))
        return memory, h[0], memory.new_zeros(memory.shape[0], self.size)

    def step(self, ext, memory, h, feed, y_prev, y=None):
        h = self.cell(torch.cat([self.embed(ext.decoder_inputs(y_prev)), feed], -1), h)
        out = self.copy.attend(
            self.attention,
            h[:, None],
            memory,
            ext.memory_mask,
            None if y is None else y[:, None],
            src_ext=ext.src_ext,
            extended_size=ext.extended_size,
            full=y is None,
        )
        return out, h, out.attentional[:, 0]

    def loss(self, ext: ExtendedVocabulary, y_out: torch.Tensor) -> torch.Tensor:
        memory, h, feed = self.start(ext)
        y_prev = torch.full_like(y_out[:, 0], BOS)
        total = 0.0
        for t in range(y_out.shape[1]):
            out, h, feed = self.step(ext, memory, h, feed, y_prev, y_out[:, t])
            total = total - out.log_prob[:, 0].sum()  # 0 at ignore_index padding
            y_prev = y_out[:, t]
        return total / (y_out >= 0).sum()

    @torch.no_grad()
    def greedy(self, ext: ExtendedVocabulary, steps: int) -> torch.Tensor:
        memory, h, feed = self.start(ext)
        y_prev, ys = torch.full((memory.shape[0],), BOS, dtype=torch.long), []
        for _ in range(steps):
            out, h, feed = self.step(ext, memory, h, feed, y_prev)
            y_prev = out.log_probs[:, 0].argmax(-1)
            ys.append(y_prev)
        return torch.stack(ys, 1)


def _copy_task(g: torch.Generator, batch: int):
    """Sources: 'the <name> sat' with names the vocabulary lacks; target: '<name> sat <eos>'."""
    names = [f"name{i}" for i in range(30)]
    src, tgt = [], []
    for _ in range(batch):
        name = names[int(torch.randint(len(names), (1,), generator=g))]
        verb = ["sat", "cat", "dog"][int(torch.randint(3, (1,), generator=g))]
        src.append(["the", name, verb])
        tgt.append([name, verb, "<eos>"])
    return src, tgt


def test_a_gru_decoder_with_copy_learns_to_copy_unknown_words():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = GRUCopyModel(V)
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    first = None
    for _ in range(80):
        src, tgt = _copy_task(g, 16)
        ext = ExtendedVocabulary.from_batch(src, VOCAB, unk_id=UNK)
        loss = model.loss(ext, ext.extended_targets(tgt))
        assert torch.isfinite(loss)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first, (first, loss.item())
    src, tgt = _copy_task(torch.Generator().manual_seed(1), 8)
    ext = ExtendedVocabulary.from_batch(src, VOCAB, unk_id=UNK)
    assert ext.words(model.greedy(ext, 3)) == tgt  # the names come back as strings


def test_the_docstring_example_runs():
    """The example in ExtendedVocabulary's docstring (copied into the docs) runs as written."""
    example = ExtendedVocabulary.__doc__.split("::\n", 1)[1]
    code = "\n".join(line[8:] for line in example.splitlines()).strip()
    namespace = {"torch": torch, "nn": nn, "E": 5, "H": 8}
    namespace.update(
        ExtendedVocabulary=ExtendedVocabulary, LatentAttention=LatentAttention, CopyGenerator=CopyGenerator
    )
    exec(code, namespace)
    assert torch.isfinite(namespace["loss"])
    assert namespace["ext"].words(namespace["y_out"]) == [["zork", "sat", "<eos>"], ["the", "zork", "<eos>"]]
