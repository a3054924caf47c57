"""The position-wise feed-forward network and the encoder and decoder layers."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KVCache, MultiHeadAttention, PackedLayout
from .linear import Linear

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu}


class Dropout(nn.Module):
    """Inverted dropout: zero each element with probability ``p``, scale the rest by ``1 / (1 - p)``.

    On a CPU, ``nn.Dropout`` draws one random number per element and spends more time in
    the generator than the layer's matrix products do (2.8 ms for 0.5 M elements, 2 threads).
    This draws one 64-bit number per four elements and keeps 15 bits of each quarter
    (``p`` is resolved to 1/32768), 3x faster. On other devices it is ``F.dropout``.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or x.numel() % 4:
            return F.dropout(x, self.p, training=True)
        bits = torch.empty(x.numel() // 4, dtype=torch.int64, device=x.device).random_()
        keep = (bits.view(torch.int16) & 0x7FFF).view(x.shape) >= round(self.p * 32768)
        return (x * keep).mul_(1.0 / (1.0 - self.p))  # one temporary, not two

    def extra_repr(self) -> str:
        return f"p={self.p}"


class FeedForward(nn.Module):
    """``FFN(x) = W_2 act(W_1 x + b_1) + b_2`` applied to each position: ``(..., d_model) -> (..., d_model)``."""

    def __init__(self, d_model: int, ff: int, activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        self.w_1 = Linear(d_model, ff)
        self.w_2 = Linear(ff, d_model)
        self.activation, self.activation_name = ACTIVATIONS[activation], activation
        self.dropout = Dropout(dropout)
        # Set by encdec.inference.prepare_for_cpu, whose w_1 applies the activation to its sums itself.
        self.activation_in_w_1 = False

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.w_1(x)
        return self.w_2(self.dropout(hidden if self.activation_in_w_1 else self.activation(hidden)))

    def step(self, x: Tensor) -> Tensor:
        """:meth:`forward` at inference (no dropout), for decoding steps: see :meth:`DecoderLayer.step`."""
        hidden = self.w_1.forward(x)
        return self.w_2.forward(hidden if self.activation_in_w_1 else self.activation(hidden))


class SublayerConnection(nn.Module):
    """A residual connection around a sub-layer, with layer norm and dropout.

    Post-norm (the paper): ``LayerNorm(x + Dropout(sublayer(x)))``.
    Pre-norm: ``x + Dropout(sublayer(LayerNorm(x)))``, which trains deep stacks more stably.
    """

    def __init__(self, d_model: int, dropout: float, pre_norm: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.pre_norm:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))

    def step(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        """:meth:`forward` at inference (no dropout), for decoding steps: see :meth:`DecoderLayer.step`."""
        norm = self.norm
        if self.pre_norm:
            return x + sublayer(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
        return F.layer_norm(x + sublayer(x), norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class EncoderLayer(nn.Module):
    """Self-attention then feed-forward, each wrapped in a :class:`SublayerConnection`."""

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float = 0.1, attention_dropout: float = 0.0,
                 activation: str = "relu", activation_dropout: float = 0.0, pre_norm: bool = False,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.feed_forward = FeedForward(d_model, ff, activation, activation_dropout)
        self.sublayers = nn.ModuleList(SublayerConnection(d_model, dropout, pre_norm, eps) for _ in range(2))

    def forward(self, x: Tensor, src_mask: Tensor | None) -> Tensor:
        """``x``: ``(batch, src_len, d_model)``; ``src_mask``: ``(batch, 1, 1, src_len)``."""
        x = self.sublayers[0](x, lambda y: self.self_attn(y, mask=src_mask))
        return self.sublayers[1](x, self.feed_forward)

    def forward_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        """:meth:`forward` at inference on the real positions only, ``(rows, d_model)`` packed as
        ``layout`` says (:class:`encdec.model.Encoder` checks that the kernel applies first)."""
        x = self.sublayers[0](x, lambda y: self.self_attn.packed_self_attention(y, layout))
        return self.sublayers[1](x, self.feed_forward)


class DecoderLayer(nn.Module):
    """Causal self-attention, encoder-decoder attention, then feed-forward.

    The encoder-decoder attention's queries come from the decoder; its keys and
    values from ``memory``, the encoder's last-layer output.
    """

    def __init__(self, d_model: int, heads: int, ff: int, dropout: float = 0.1, attention_dropout: float = 0.0,
                 activation: str = "relu", activation_dropout: float = 0.0, pre_norm: bool = False,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.feed_forward = FeedForward(d_model, ff, activation, activation_dropout)
        self.sublayers = nn.ModuleList(SublayerConnection(d_model, dropout, pre_norm, eps) for _ in range(3))
        # Set for CPU inference where the C kernels are built (encdec.inference.prepare_for_cpu):
        # :meth:`step` in one call, an encdec.decode_kernels.DecoderLayerStep.
        self.fused_step = None

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor | None, tgt_mask: Tensor | None,
                self_cache: KVCache | None = None, cross_cache: KVCache | None = None) -> Tensor:
        """``x``: ``(batch, tgt_len, d_model)``; ``memory``: ``(batch, src_len, d_model)``.

        ``src_mask``: ``(batch, 1, 1, src_len)``; ``tgt_mask``: ``(batch or 1, 1, tgt_len, past + tgt_len)``.
        """
        x = self.sublayers[0](x, lambda y: self.self_attn(y, mask=tgt_mask, cache=self_cache))
        x = self.sublayers[1](x, lambda y: self.cross_attn(y, memory, mask=src_mask, cache=cross_cache))
        return self.sublayers[2](x, self.feed_forward)

    def step(self, x: Tensor, self_cache: KVCache, cross_cache: KVCache, src_mask: Tensor | None) -> Tensor:
        """One new position per row (incremental decoding, inference): ``x`` ``(rows, d_model)`` ->
        ``(rows, d_model)``, as :meth:`forward` with caches computes it for ``(rows, 1, d_model)``.

        The sub-layers' ``step`` methods call their modules' ``forward`` directly, without dropout
        (inference has none) and without ``Module.__call__`` (~0.6 us a call; a step made ~17 a
        layer), whose cost counts where a step's matrix products are small. In-process A/B on the
        2-core EPYC, small model, greedy: batch 1 +13 %, batch 32 +2.5 to +3.7 %; same tokens.
        Where :attr:`fused_step` is set (CPU inference, :func:`encdec.inference.prepare_for_cpu`),
        all of it is one C call instead, wherever that call takes the step.
        """
        if self.fused_step is not None:
            y = self.fused_step(x, self_cache, cross_cache, None if src_mask is None else src_mask[:, 0, 0])
            if y is not None:
                return y
        sublayers = self.sublayers
        x = sublayers[0].step(x, lambda y: self.self_attn.self_attention_step(y, self_cache))
        x = sublayers[1].step(x, lambda y: self.cross_attn.cross_attention_step(y, cross_cache, src_mask))
        return sublayers[2].step(x, self.feed_forward.step)
