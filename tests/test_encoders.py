"""encode_packed: padding never reaches the outputs of real positions nor the final state."""

import pytest
import torch
from torch import nn

from latentnlp.layers.encoders import encode_packed


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rows_are_encoded_alone(bidirectional):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, num_layers=2, batch_first=True, bidirectional=bidirectional)
    x = torch.randn(3, 5, 3)
    lengths = torch.tensor([5, 2, 4])
    out, (h, c) = encode_packed(lstm, x, lengths)
    assert out.shape == (3, 5, 8 if bidirectional else 4)
    for b, n in enumerate(lengths.tolist()):
        alone, (h_b, c_b) = lstm(x[b : b + 1, :n])
        torch.testing.assert_close(out[b, :n], alone[0])
        assert (out[b, n:] == 0).all()
        torch.testing.assert_close(h[:, b], h_b[:, 0])
        torch.testing.assert_close(c[:, b], c_b[:, 0])


def test_unpadded_batch_and_initial_state():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True)
    x = torch.randn(2, 4, 3)
    state = (torch.randn(1, 2, 4), torch.randn(1, 2, 4))
    out, final = encode_packed(lstm, x, torch.tensor([4, 4]), state)
    expected, expected_final = lstm(x, state)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(final, expected_final)
    with pytest.raises(ValueError, match="batch_first"):
        encode_packed(nn.LSTM(3, 4), x, torch.tensor([4, 4]))


def test_always_pack_agrees_on_an_unpadded_batch():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, batch_first=True, bidirectional=True)
    x = torch.randn(2, 4, 3)
    lengths = torch.tensor([4, 4])
    out, final = encode_packed(lstm, x, lengths, always_pack=True)
    expected, expected_final = encode_packed(lstm, x, lengths)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(final, expected_final)
