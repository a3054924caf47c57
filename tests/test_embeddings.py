"""Token embeddings and the paper's positional encoding."""
import math

import pytest
import torch

from encdec.embeddings import Embeddings, PositionalEncoding, sinusoids


def test_sinusoids_match_the_paper_formula_at_hand_checked_positions():
    d = 8
    pe = sinusoids(50, d)
    assert pe.shape == (50, d)
    assert pe[0].tolist() == [0.0, 1.0] * 4  # sin(0)=0 on even, cos(0)=1 on odd dimensions
    assert pe[1, 0] == pytest.approx(math.sin(1.0))
    assert pe[1, 1] == pytest.approx(math.cos(1.0))
    # PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(pos / 10000^(2i/d))
    assert pe[7, 2] == pytest.approx(math.sin(7 / 10000 ** (2 / 8)), abs=1e-6)
    assert pe[7, 3] == pytest.approx(math.cos(7 / 10000 ** (2 / 8)), abs=1e-6)
    assert pe[42, 6] == pytest.approx(math.sin(42 / 10000 ** (6 / 8)), abs=1e-6)
    assert pe[42, 7] == pytest.approx(math.cos(42 / 10000 ** (6 / 8)), abs=1e-6)


def test_halves_layout_puts_sines_first_then_cosines():
    inter, halves = sinusoids(20, 8), sinusoids(20, 8, layout="halves")
    torch.testing.assert_close(halves[:, :4], inter[:, 0::2])
    torch.testing.assert_close(halves[:, 4:], inter[:, 1::2])


def test_positional_encoding_adds_table_with_offset_and_rejects_too_long():
    enc = PositionalEncoding(8, max_len=10).eval()
    x = torch.zeros(2, 3, 8)
    torch.testing.assert_close(enc(x, offset=4)[0], sinusoids(10, 8)[4:7])
    with pytest.raises(ValueError, match="longer than the model's max_len=10"):
        enc(torch.zeros(1, 11, 8))
    learned = PositionalEncoding(8, max_len=10, kind="learned")
    assert learned(x).shape == x.shape
    assert any(p.requires_grad for p in learned.parameters())


def test_embeddings_scale_by_sqrt_d_model():
    emb = Embeddings(11, 16, pad_id=0)
    ids = torch.tensor([[3, 0]])
    torch.testing.assert_close(emb(ids)[0, 0], emb.lut.weight[3] * 4.0)
    assert torch.all(emb(ids)[0, 1] == 0), "the padding row starts at zero"
    unscaled = Embeddings(11, 16, scale=False)
    torch.testing.assert_close(unscaled(ids)[0, 0], unscaled.lut.weight[3])
