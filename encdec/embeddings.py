"""Token embeddings and positional encodings."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .layers import Dropout


class Embeddings(nn.Module):
    """Token ids ``(batch, len)`` -> vectors ``(batch, len, d_model)``, times ``sqrt(d_model)``.

    The scaling (section 3.4 of the paper) keeps token vectors, initialised with
    std ``d_model**-0.5``, on the same scale as the positional encoding.
    """

    def __init__(self, vocab_size: int, d_model: int, pad_id: int | None = None, scale: bool = True) -> None:
        super().__init__()
        self.lut = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.scale = math.sqrt(d_model) if scale else 1.0
        nn.init.normal_(self.lut.weight, std=d_model ** -0.5)
        if pad_id is not None:
            nn.init.zeros_(self.lut.weight[pad_id])

    @property
    def weight(self) -> nn.Parameter:
        return self.lut.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.lut(tokens) * self.scale


def sinusoids(max_len: int, d_model: int, layout: str = "interleaved") -> Tensor:
    """The paper's table ``PE[pos, 2i] = sin(pos / 10000^(2i/d))``, ``PE[pos, 2i+1] = cos(...)``.

    ``layout="halves"`` puts all sines in the first half of the dimensions and all
    cosines in the second (Marian's arrangement). Returns ``(max_len, d_model)``.
    """
    position = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    angles = position * inv_freq  # (max_len, d_model / 2)
    if layout == "interleaved":
        table = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(1)
    elif layout == "halves":
        table = torch.cat([angles.sin(), angles.cos()], dim=-1)
    else:
        raise ValueError(f"unknown sinusoid layout {layout!r}; use 'interleaved' or 'halves'")
    return table.float()


class PositionalEncoding(nn.Module):
    """Adds position information to ``(batch, len, d_model)`` embeddings, then dropout.

    ``kind="sinusoidal"`` uses the fixed table of :func:`sinusoids`; ``kind="learned"``
    learns one vector per position. Positions start at ``offset`` so incremental
    decoding can encode step ``t`` alone.
    """

    def __init__(self, d_model: int, max_len: int, dropout: float = 0.0, kind: str = "sinusoidal",
                 layout: str = "interleaved") -> None:
        super().__init__()
        self.max_len = max_len
        self.dropout = Dropout(dropout)
        if kind == "sinusoidal":
            self.register_buffer("table", sinusoids(max_len, d_model, layout), persistent=False)
        elif kind == "learned":
            self.table = nn.Parameter(torch.randn(max_len, d_model) * d_model ** -0.5)
        else:
            raise ValueError(f"unknown positional encoding {kind!r}; use 'sinusoidal' or 'learned'")

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """``x`` ``(batch, len, d_model)``, positions ``offset`` to ``offset + len - 1``."""
        self._check(offset + x.size(1))
        return self.dropout(x + self.table[offset:offset + x.size(1)])

    def at(self, x: Tensor, position: int) -> Tensor:
        """``x`` ``(batch, d_model)``, all at ``position`` (one decoding step)."""
        self._check(position + 1)
        return self.dropout(x + self.table[position])

    def _check(self, end: int) -> None:
        if end > self.max_len:
            raise ValueError(f"sequence of length {end} is longer than the model's max_len={self.max_len}; "
                             "shorten the input or build the model with a larger max_len")
