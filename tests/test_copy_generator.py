"""CopyGenerator against a probability-space brute force (float64)."""

import math

import pytest
import torch

from latentnlp.layers.copy_generator import CopyGenerator
from latentnlp.layers.extended_vocabulary import source_extended_ids, target_extended_ids

B, T, S, D, V = 3, 4, 5, 6, 7
LENGTHS = torch.tensor([5, 3, 1])

pytestmark = pytest.mark.usefixtures("float64")  # every test computes in float64


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    mask = torch.arange(S) < LENGTHS[:, None]
    scores = torch.randn(B, T, S, generator=g).masked_fill(~mask[:, None, :], -math.inf)
    log_alpha = torch.log_softmax(scores, -1)
    # ids: in-vocabulary words, a repeated word, and source-only words 7, 8
    src_ext = torch.tensor([[1, 7, 1, 8, 2], [3, 7, 3, 0, 0], [8, 5, 5, 5, 5]])
    return hidden, log_alpha, src_ext, mask


def _layer(seed=0):
    torch.manual_seed(seed)
    return CopyGenerator(D, V)


def _brute(layer, hidden, log_alpha, src_ext, mask, size):
    p_gen = torch.sigmoid(layer.switch(hidden)).squeeze(-1)
    p_vocab = torch.softmax(layer.output_projection(hidden), -1)
    out = torch.zeros(B, T, size)
    for b in range(B):
        for t in range(T):
            out[b, t, :V] += p_gen[b, t] * p_vocab[b, t]
            for m in range(S):
                if mask[b, m]:
                    out[b, t, src_ext[b, m]] += (1 - p_gen[b, t]) * log_alpha[b, t, m].exp()
    return out


def test_full_distribution_matches_brute_force_and_sums_to_one():
    layer = _layer()
    hidden, log_alpha, src_ext, mask = _inputs()
    out = layer(hidden, log_alpha, src_ext, full=True)
    assert out.log_probs.shape == (B, T, 9)
    torch.testing.assert_close(out.log_probs.logsumexp(-1), torch.zeros(B, T))
    torch.testing.assert_close(out.log_probs.exp(), _brute(layer, hidden, log_alpha, src_ext, mask, 9))
    # a larger requested extended vocabulary only adds impossible words
    wide = layer(hidden, log_alpha, src_ext, full=True, extended_size=12)
    assert torch.isneginf(wide.log_probs[..., 9:]).all()
    torch.testing.assert_close(wide.log_probs[..., :9], out.log_probs)
    with pytest.raises(ValueError, match="extended_size"):
        layer(hidden, log_alpha, src_ext, full=True, extended_size=8)


def test_target_scores_match_full_distribution():
    layer = _layer()
    hidden, log_alpha, src_ext, mask = _inputs()
    targets = torch.tensor([[1, 7, 8, 0], [3, 7, 6, 2], [8, 5, 0, 7]])  # row 2: 7 is not in its source
    out = layer(hidden, log_alpha, src_ext, targets, full=True)
    torch.testing.assert_close(out.log_prob, out.log_probs.gather(-1, targets[..., None]).squeeze(-1))
    assert torch.isneginf(out.log_prob[2, 3])  # source-only word of another sentence: impossible
    assert torch.isfinite(out.log_prob[:, :3]).all()
    # the gathered path alone gives the same numbers, and finite gradients even through -inf
    h = hidden.clone().requires_grad_()
    a = log_alpha.clone().requires_grad_()
    only = layer(h, a, src_ext, targets)
    assert only.log_probs is None
    torch.testing.assert_close(only.log_prob, out.log_prob)
    torch.where(torch.isfinite(only.log_prob), only.log_prob, 0.0).sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(a.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_padding_invariance_and_gradients_through_full():
    layer = _layer()
    hidden, log_alpha, src_ext, mask = _inputs()
    garbage = src_ext.clone()
    garbage[~mask] = 4  # padded ids are ignored (any value in range)
    a = layer(hidden, log_alpha, src_ext, full=True, extended_size=9)
    la = log_alpha.clone().requires_grad_()
    b = layer(hidden, la, garbage, full=True, extended_size=9)
    torch.testing.assert_close(a.log_probs, b.log_probs)
    (b.log_probs.exp() * torch.randn(B, T, 9)).sum().backward()
    assert torch.isfinite(la.grad).all()
    assert (la.grad[~mask[:, None, :].expand(B, T, S)] == 0).all()


def test_peaked_attention_stays_exact_in_log_space():
    layer = _layer()
    hidden, _, src_ext, mask = _inputs()
    scores = torch.zeros(B, T, S)
    scores[..., 0] = 800.0  # alpha of every other position ~ e^-800: underflows in probability space
    log_alpha = torch.log_softmax(scores.masked_fill(~mask[:, None, :], -math.inf), -1)
    out = layer(hidden, log_alpha, src_ext, full=True, extended_size=9)
    assert torch.isfinite(out.log_probs[0, :, 8]).all()  # word 8 only at position 3, alpha = e^-800
    switch = torch.nn.functional.logsigmoid(-layer.switch(hidden[0]).squeeze(-1))
    torch.testing.assert_close(out.log_probs[0, :, 8], switch + log_alpha[0, :, 3])


def test_extended_id_helpers():
    vocab = {"<unk>": 0, "a": 1, "b": 2}
    ids, oovs = source_extended_ids(["a", "x", "b", "y", "x"], vocab)
    assert ids == [1, 3, 2, 4, 3] and oovs == ["x", "y"]
    assert target_extended_ids(["y", "a", "z"], vocab, oovs, unk_id=0) == [4, 1, 0]
    assert source_extended_ids(["q"], vocab, vocab_size=10) == ([10], ["q"])


def test_argument_checks():
    layer = _layer()
    hidden, log_alpha, src_ext, _ = _inputs()
    with pytest.raises(ValueError, match="log_alpha"):
        layer(hidden, log_alpha[:, :2], src_ext)
    with pytest.raises(ValueError, match="src_ext"):
        layer(hidden, log_alpha, src_ext[:, :2])
    with pytest.raises(ValueError, match="targets"):
        layer(hidden, log_alpha, src_ext, src_ext)
    with pytest.raises(ValueError, match="output_projection"):
        CopyGenerator(D, V, output_projection=torch.nn.Linear(D, V + 1))
    shared = torch.nn.Linear(D, V)
    assert CopyGenerator(D, V, output_projection=shared).output_projection is shared


def test_extended_size_is_trusted_when_validation_is_off(monkeypatch):
    """Checking a given extended_size reads ids back from the device: only with validation on."""
    from torch.distributions import Distribution

    layer = _layer()
    hidden, log_alpha, src_ext, _ = _inputs()
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:

        def no_read(self):
            raise AssertionError("read back from the device for a check")

        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "__int__", no_read)
            patch.setattr(torch.Tensor, "__bool__", no_read)
            out = layer.log_probs(hidden, log_alpha=log_alpha, src_ext=src_ext, extended_size=12)
        assert out.shape == (B, T, 12)
    finally:
        Distribution.set_default_validate_args(previous)
    with pytest.raises(ValueError, match="extended_size"):
        layer.log_probs(hidden, log_alpha=log_alpha, src_ext=src_ext, extended_size=8)
