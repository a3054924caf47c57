"""The whole Transformer: shapes, causality, padding, the cache, and equality with torch.nn.Transformer."""
import math

import pytest
import torch
from torch import nn

from encdec import ConfigError, ModelConfig, build_model, padding_mask
from encdec.embeddings import sinusoids
from encdec.layers import DecoderLayer, EncoderLayer, FeedForward

from conftest import random_batch, randomize_norms, tiny_config, tiny_model


def test_block_shapes_and_dtypes():
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    assert FeedForward(32, 64)(x).shape == (2, 5, 32)
    assert EncoderLayer(32, 4, 64)(memory, None).shape == (2, 7, 32)
    assert DecoderLayer(32, 4, 64)(x, memory, None, None).shape == (2, 5, 32)
    model = tiny_model()
    src, tgt = random_batch(model.cfg)
    memory = model.encode(src)
    assert memory.shape == (3, 7, 32) and memory.dtype == torch.float32
    log_probs = model(src, tgt)
    assert log_probs.shape == (3, 5, model.cfg.tgt_vocab_size)
    torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(3, 5))


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_changing_a_future_target_token_never_changes_earlier_outputs(norm):
    model = tiny_model(norm=norm)
    src, tgt = random_batch(model.cfg, tgt_len=8)
    before = model(src, tgt)
    for j in range(1, 8):
        changed = tgt.clone()
        changed[:, j] = (changed[:, j] + 1 - 4) % (model.cfg.tgt_vocab_size - 4) + 4
        after = model(src, changed)
        torch.testing.assert_close(after[:, :j], before[:, :j], atol=1e-6, rtol=0)
        assert not torch.allclose(after[:, j:], before[:, j:]), "the change must be visible from position j on"


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_leaves_real_positions_unchanged(norm):
    model = tiny_model(norm=norm)
    src, tgt = random_batch(model.cfg, batch=1, src_len=6, tgt_len=4)
    alone = model(src, tgt)
    pad = model.cfg.pad_id
    longer_src, longer_tgt = random_batch(model.cfg, batch=1, src_len=10, tgt_len=9, seed=3)
    padded_src = torch.cat([torch.cat([src, torch.full((1, 4), pad)], 1), longer_src])
    padded_tgt = torch.cat([torch.cat([tgt, torch.full((1, 5), pad)], 1), longer_tgt])
    batched = model(padded_src, padded_tgt)
    torch.testing.assert_close(batched[:1, :4], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"norm": "pre"}, {"positional": "learned"}])
def test_cached_step_by_step_decoding_equals_full_sequence(overrides):
    model = tiny_model(**overrides)
    src, tgt = random_batch(model.cfg, tgt_len=9)
    src[1, 5:] = model.cfg.pad_id
    src_mask = padding_mask(src, model.cfg.pad_id)
    memory = model.encode(src, src_mask)
    full = model.decode(tgt, memory, src_mask)
    cache = model.new_cache()
    steps = [model.decode(tgt[:, t:t + 1], memory, src_mask, cache) for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    # a multi-token chunk after a cached prefix works too
    cache = model.new_cache()
    chunks = [model.decode(tgt[:, :4], memory, src_mask, cache), model.decode(tgt[:, 4:], memory, src_mask, cache)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"norm": "pre"}, {"positional": "learned"}])
@pytest.mark.parametrize("capacity", [0, 4, 16])  # no buffers, buffers that must grow, enough room
def test_decode_step_equals_full_sequence_decoding(overrides, capacity):
    model = randomize_norms(tiny_model(**overrides))
    src, tgt = random_batch(model.cfg, tgt_len=9)
    src[1, 5:] = model.cfg.pad_id
    src_mask = padding_mask(src, model.cfg.pad_id)
    memory = model.encode(src, src_mask)
    full = model.decode(tgt, memory, src_mask)
    cache = model.new_cache(capacity)
    cache.fill_cross_attention(model.decoder, memory)
    steps = torch.stack([model.decode_step(tgt[:, t], cache, src_mask) for t in range(tgt.size(1))], 1)
    assert len(cache) == tgt.size(1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_decode_step_with_beams_sharing_one_sentence_s_encoder_keys_and_values():
    model = tiny_model().eval()
    beams = 3
    src, tgt = random_batch(model.cfg, batch=2, tgt_len=6)
    src[0, 4:] = model.cfg.pad_id
    tgt = tgt.repeat_interleave(beams, 0)
    tgt[1::beams, 2:] = (tgt[1::beams, 2:] + 1) % model.cfg.tgt_vocab_size  # beams that differ
    src_mask = padding_mask(src, model.cfg.pad_id)
    memory = model.encode(src, src_mask)
    full = model.decode(tgt, memory.repeat_interleave(beams, 0), src_mask.repeat_interleave(beams, 0))
    cache = model.new_cache(8)
    cache.fill_cross_attention(model.decoder, memory)  # once per sentence, not per beam
    steps = torch.stack([model.decode_step(tgt[:, t], cache, src_mask) for t in range(tgt.size(1))], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    uneven = model.new_cache(8)
    uneven.fill_cross_attention(model.decoder, memory)
    with pytest.raises(ValueError, match="whole number of beams"):
        model.decode_step(tgt[:5, 0], uneven, src_mask)  # 5 rows for 2 sentences
    with pytest.raises(ValueError, match="fill it first"):
        model.decode_step(tgt[:, 0], model.new_cache(8), src_mask)


def test_sharing_and_tying_use_one_tensor():
    model = build_model(tiny_config(tgt_vocab_size=23, share_embeddings=True, tie_output=True))
    assert model.src_embed.weight is model.tgt_embed.weight
    assert model.output.weight is model.tgt_embed.weight
    separate = build_model(tiny_config())
    assert separate.src_embed.weight is not separate.tgt_embed.weight
    assert separate.output.weight is not separate.tgt_embed.weight


def test_config_errors_are_one_line_and_name_the_key():
    with pytest.raises(ConfigError, match=r"model.norm: 'middle' is not allowed; use one of 'post', 'pre'"):
        ModelConfig(src_vocab_size=10, tgt_vocab_size=10, norm="middle")
    with pytest.raises(ConfigError, match="model.heads"):
        ModelConfig(src_vocab_size=10, tgt_vocab_size=10, d_model=30, heads=4)
    with pytest.raises(ConfigError, match="model.share_embeddings"):
        ModelConfig(src_vocab_size=10, tgt_vocab_size=12, share_embeddings=True)
    assert ModelConfig(src_vocab_size=10, tgt_vocab_size=10, norm="pre").final_norm is True
    assert ModelConfig(src_vocab_size=10, tgt_vocab_size=10).final_norm is False


# --- Equality with torch.nn.Transformer ------------------------------------------------------

class TorchReference(nn.Module):
    """torch.nn.Transformer with the paper's embeddings, positions and output layer around it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.src_embed = nn.Embedding(cfg.src_vocab_size, cfg.d_model)
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        self.register_buffer("pe", sinusoids(cfg.max_len, cfg.d_model))
        self.transformer = nn.Transformer(
            cfg.d_model, cfg.heads, cfg.encoder_layers, cfg.decoder_layers, cfg.ff, dropout=cfg.dropout,
            batch_first=True, norm_first=cfg.norm == "pre")
        self.output = nn.Linear(cfg.d_model, cfg.tgt_vocab_size)

    def forward(self, src, tgt):
        scale = math.sqrt(self.cfg.d_model)
        s = self.src_embed(src) * scale + self.pe[: src.size(1)]
        t = self.tgt_embed(tgt) * scale + self.pe[: tgt.size(1)]
        src_pad = src == self.cfg.pad_id
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.size(1))
        h = self.transformer(s, t, tgt_mask=causal, src_key_padding_mask=src_pad,
                             memory_key_padding_mask=src_pad, tgt_is_causal=True)
        return torch.log_softmax(self.output(h), -1)


def copy_torch_weights(theirs: TorchReference, ours) -> None:
    """Load a TorchReference's weights into an encdec Transformer of the same shape."""
    t = theirs.transformer
    state = {"src_embed.lut.weight": theirs.src_embed.weight, "tgt_embed.lut.weight": theirs.tgt_embed.weight,
             "output.weight": theirs.output.weight, "output.bias": theirs.output.bias,
             "encoder.norm.weight": t.encoder.norm.weight, "encoder.norm.bias": t.encoder.norm.bias,
             "decoder.norm.weight": t.decoder.norm.weight, "decoder.norm.bias": t.decoder.norm.bias}

    def attention(ours_name, mha):
        state.update({f"{ours_name}.in_proj.weight": mha.in_proj_weight, f"{ours_name}.in_proj.bias": mha.in_proj_bias,
                      f"{ours_name}.out_proj.weight": mha.out_proj.weight, f"{ours_name}.out_proj.bias": mha.out_proj.bias})

    def rest(prefix, layer, norms):
        for ours_i, theirs_norm in enumerate(norms):
            state[f"{prefix}.sublayers.{ours_i}.norm.weight"] = theirs_norm.weight
            state[f"{prefix}.sublayers.{ours_i}.norm.bias"] = theirs_norm.bias
        for w, lin in (("w_1", layer.linear1), ("w_2", layer.linear2)):
            state[f"{prefix}.feed_forward.{w}.weight"] = lin.weight
            state[f"{prefix}.feed_forward.{w}.bias"] = lin.bias

    for i, layer in enumerate(t.encoder.layers):
        attention(f"encoder.layers.{i}.self_attn", layer.self_attn)
        rest(f"encoder.layers.{i}", layer, [layer.norm1, layer.norm2])
    for i, layer in enumerate(t.decoder.layers):
        attention(f"decoder.layers.{i}.self_attn", layer.self_attn)
        attention(f"decoder.layers.{i}.cross_attn", layer.multihead_attn)
        rest(f"decoder.layers.{i}", layer, [layer.norm1, layer.norm2, layer.norm3])
    ours.load_state_dict(state, strict=True)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_equals_torch_nn_transformer_with_padding(norm):
    # nn.Transformer always ends both stacks with a LayerNorm: final_norm=True matches it.
    cfg = tiny_config(norm=norm, final_norm=True, output_bias=True, pad_id=0)
    torch.manual_seed(0)
    theirs = TorchReference(cfg).eval()
    ours = build_model(cfg).eval()
    copy_torch_weights(theirs, ours)
    src, tgt = random_batch(cfg, batch=4, src_len=9, tgt_len=7)
    src[1, 6:] = 0
    src[3, 2:] = 0
    tgt[2, 5:] = 0
    with torch.no_grad():
        expected, got = theirs(src, tgt), ours(src, tgt)
    real = tgt != 0
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
