"""The encoder-decoder Transformer: encoder and decoder stacks, output layer, factory.

Shapes: ``src`` ``(batch, src_len)`` and ``tgt`` ``(batch, tgt_len)`` token ids;
hidden states ``(batch, len, d_model)``; outputs ``(batch, tgt_len, tgt_vocab)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import decode_kernels
from .attention import KVCache, MultiHeadAttention, PackedLayout, packed_layout, padding_mask, subsequent_mask
from .config import ModelConfig
from .embeddings import Embeddings, PositionalEncoding
from .layers import DecoderLayer, EncoderLayer
from .linear import Linear


def _layer_options(cfg: ModelConfig) -> dict:
    return dict(d_model=cfg.d_model, heads=cfg.heads, ff=cfg.ff, dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout, activation=cfg.activation,
                activation_dropout=cfg.activation_dropout, pre_norm=cfg.norm == "pre", eps=cfg.layer_norm_eps)


class Encoder(nn.Module):
    """A stack of ``cfg.encoder_layers`` identical :class:`EncoderLayer` (plus a final norm for pre-norm)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(**_layer_options(cfg)) for _ in range(cfg.encoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()

    def forward(self, x: Tensor, src_mask: Tensor | None) -> Tensor:
        """``(batch, src_len, d_model)`` embedded source -> ``(batch, src_len, d_model)`` memory."""
        layout = packed_layout(src_mask) if src_mask is not None and self._packs(x) else None
        if layout is not None:
            return self._forward_packed(x, layout)
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.norm(x)

    def _packs(self, x: Tensor) -> bool:
        """Whether to drop the padding: at inference on a CPU, where the packed attention kernel applies."""
        attn = self.layers[0].self_attn if len(self.layers) else None
        return (attn is not None and not self.training and not torch.is_grad_enabled() and x.dtype == torch.float32
                and x.device.type == "cpu" and decode_kernels.available() and attn.head_dim % decode_kernels.PANEL == 0
                and not any(layer.self_attn.record_weights for layer in self.layers))

    def _forward_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        """:meth:`forward` on the real positions only: every product and norm skips the padding
        (~15 % of a batch of sources of 25-35 tokens), attention runs per sentence in C
        (:func:`encdec.decode_kernels.attend_packed`). Padded positions of the result are 0 (every
        reader masks them)."""
        b, t, d = x.shape
        rows = x.reshape(b * t, d).index_select(0, layout.index)
        for layer in self.layers:
            rows = layer.forward_packed(rows, layout)
        return x.new_zeros(b * t, d).index_copy_(0, layout.index, self.norm(rows)).view(b, t, d)


class DecoderCache:
    """Everything incremental decoding keeps between steps, per decoder layer:
    the growing self-attention keys/values and the encoder-decoder keys/values,
    which are computed from the encoder output once per source sentence."""

    def __init__(self, num_layers: int, capacity: int = 0) -> None:
        self.self_attn = [KVCache(capacity) for _ in range(num_layers)]
        self.cross_attn = [KVCache() for _ in range(num_layers)]

    def __len__(self) -> int:
        """Number of target positions decoded so far."""
        return len(self.self_attn[0])

    def fill_cross_attention(self, decoder: "Decoder", memory: Tensor) -> None:
        """Compute every layer's encoder-decoder keys and values from ``memory`` ``(batch, src_len, d_model)``.

        They are kept once per sentence, however many beams (consecutive decoder rows) it has.
        """
        for layer, cache in zip(decoder.layers, self.cross_attn):
            cache.append(*layer.cross_attn.project_keys_values(memory))

    def reorder_self_attention(self, index: Tensor, shared: Tensor | None = None) -> None:
        """Keep (and repeat) hypothesis rows ``index``: the surviving beams. ``shared`` ``(rows,)``:
        how many leading positions each row shares with row ``index[row]`` (:meth:`KVCache.reorder`)."""
        plan = self.self_attn[0].plan_reorder(index, shared)  # the same for every layer
        for cache in self.self_attn:
            cache.apply_reorder(index, plan)

    def reorder_cross_attention(self, index: Tensor) -> None:
        """Keep sentences ``index`` (those not finished yet)."""
        for cache in self.cross_attn:
            cache.reorder(index)


class Decoder(nn.Module):
    """A stack of ``cfg.decoder_layers`` identical :class:`DecoderLayer` (plus a final norm for pre-norm)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(**_layer_options(cfg)) for _ in range(cfg.decoder_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps) if cfg.final_norm else nn.Identity()

    def forward(self, x: Tensor, memory: Tensor, src_mask: Tensor | None, tgt_mask: Tensor | None,
                cache: DecoderCache | None = None) -> Tensor:
        """``(batch, tgt_len, d_model)`` embedded target -> ``(batch, tgt_len, d_model)``."""
        for i, layer in enumerate(self.layers):
            if cache is None:
                x = layer(x, memory, src_mask, tgt_mask)
            else:
                x = layer(x, memory, src_mask, tgt_mask, cache.self_attn[i], cache.cross_attn[i])
        return self.norm(x)

    def step(self, x: Tensor, cache: DecoderCache, src_mask: Tensor | None) -> Tensor:
        """One new position per row: ``(rows, d_model)`` embedded tokens -> ``(rows, d_model)``."""
        for layer, self_cache, cross_cache in zip(self.layers, cache.self_attn, cache.cross_attn):
            x = layer.step(x, self_cache, cross_cache, src_mask)
        return self.norm(x)


class Transformer(nn.Module):
    """Embeddings + positional encoding, :class:`Encoder`, :class:`Decoder` and the output layer.

    ``forward(src, tgt_in)`` returns log-probabilities ``(batch, tgt_len, tgt_vocab)``
    of the next target token at each position (teacher forcing). Decoding uses the
    parts: :meth:`encode` once, then :meth:`decode` step by step with a
    :class:`DecoderCache`, and :meth:`project` for the logits.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        scale = cfg.scale_embeddings
        self.src_embed = Embeddings(cfg.src_vocab_size, cfg.d_model, cfg.pad_id, scale)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else Embeddings(
            cfg.tgt_vocab_size, cfg.d_model, cfg.pad_id, scale)
        self.src_pos = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout, cfg.positional, cfg.sinusoid_layout)
        self.tgt_pos = PositionalEncoding(cfg.d_model, cfg.max_len, cfg.dropout, cfg.positional, cfg.sinusoid_layout)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.output = Linear(cfg.d_model, cfg.tgt_vocab_size, bias=cfg.output_bias)
        self._init_weights()
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.weight

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """``src`` ``(batch, src_len)`` -> memory ``(batch, src_len, d_model)``."""
        if src_mask is None:
            src_mask = padding_mask(src, self.cfg.pad_id)
        return self.encoder(self.src_pos(self.src_embed(src)), src_mask)

    def decode(self, tgt: Tensor, memory: Tensor, src_mask: Tensor | None,
               cache: DecoderCache | None = None) -> Tensor:
        """Decoder states for target tokens ``tgt`` ``(batch, tgt_len)`` -> ``(batch, tgt_len, d_model)``.

        Without a cache, ``tgt`` is the whole target prefix, right-padded. The
        causal mask alone is the padding mask here: every pad comes after the
        real tokens of its row, so no real position can see one (and pad
        positions' outputs are never used). Masking pads by id would be wrong
        for Marian, whose start token *is* <pad>.

        With a cache, ``tgt`` holds only the new tokens (usually one per row)
        and attends to the cached positions before them. The encoder-decoder keys
        and values come from ``memory`` on the first call, unless
        :meth:`DecoderCache.fill_cross_attention` has filled them (then ``memory``
        is not read).
        """
        past = len(cache) if cache is not None else 0
        tgt_len = tgt.size(1)
        # One new query may see every cached position: no mask needed.
        tgt_mask = subsequent_mask(tgt_len, past, device=tgt.device) if tgt_len > 1 else None
        x = self.tgt_pos(self.tgt_embed(tgt), offset=past)
        return self.decoder(x, memory, src_mask, tgt_mask, cache)

    def decode_step(self, last: Tensor, cache: DecoderCache, src_mask: Tensor | None) -> Tensor:
        """One step of incremental decoding (inference): each row's newest token ``last`` ``(rows,)``
        -> its decoder state ``(rows, d_model)``, appended to ``cache``.

        ``decode(last[:, None], memory, src_mask, cache)[:, 0]`` computed on 2-D states, with fewer
        views and calls (no masks to build, one copy per cached key and value). In-process A/B on
        the 2-core EPYC, small model, greedy median tokens/s in two sessions of the VM: batch 1
        272 -> 310 and 377 -> 398, batch 32 2,288 -> 2,519 and 2,691 -> 2,720; beam 5 and the base
        model, whose steps are mostly matrix products, within the noise. The encoder-decoder keys
        and values must be in the cache (:meth:`DecoderCache.fill_cross_attention`); attention
        weights are not recorded.
        """
        x = self.tgt_pos.at(self.tgt_embed(last), len(cache))
        return self.decoder.step(x, cache, src_mask)

    def project(self, hidden: Tensor) -> Tensor:
        """Decoder states ``(..., d_model)`` -> logits ``(..., tgt_vocab)``."""
        return self.output(hidden)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced log-probabilities ``(batch, tgt_len, tgt_vocab)``."""
        src_mask = padding_mask(src, self.cfg.pad_id)
        memory = self.encode(src, src_mask)
        return F.log_softmax(self.project(self.decode(tgt_in, memory, src_mask)), dim=-1)

    def new_cache(self, capacity: int = 0) -> DecoderCache:
        """An empty cache; ``capacity`` (target positions) preallocates the self-attention buffers."""
        return DecoderCache(len(self.decoder.layers), capacity)

    def record_attention(self, on: bool = True) -> None:
        """Keep every attention layer's weights (``layer.self_attn.weights`` etc.) for plots."""
        for module in self.modules():
            if isinstance(module, MultiHeadAttention):
                module.record_weights = on
                module.weights = None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, seed: int | None = None) -> Transformer:
    """The one factory: a freshly initialised :class:`Transformer` for ``cfg``."""
    if seed is not None:
        torch.manual_seed(seed)
    return Transformer(cfg)
