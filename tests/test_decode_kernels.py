"""encdec.decode_kernels: decoding's one-query attention and matrix products in C, against PyTorch."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from encdec import decode_kernels
from encdec import model as model_module
from encdec.attention import (KVCache, MultiHeadAttention, packed_layout, padding_mask, scaled_dot_product,
                               subsequent_mask)
from encdec.inference import prepare_for_cpu
from encdec.layers import ACTIVATIONS
from encdec.search import beam_search, greedy_search

from conftest import randomize_norms, tiny_model

BUILT = importlib.util.find_spec("encdec._decode_kernels") is not None
needs_kernel = pytest.mark.skipif(not decode_kernels.available(),
                                  reason="encdec._decode_kernels not built (no C compiler at install) or switched off")


def test_the_kernel_is_loaded_where_it_was_built_and_not_switched_off():
    assert decode_kernels.available() == (BUILT and os.environ.get(decode_kernels.ENV_SWITCH, "1") != "0")
    code = "import encdec.decode_kernels as k; print(k.available())"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, decode_kernels.ENV_SWITCH: "0"})
    assert off.stdout.strip() == "False", off.stderr[-2000:]


def reference(q, k_buf, v_buf, length, allowed, groups):
    """What the kernel computes, with PyTorch ops: every row's keys and values repeated per beam."""
    k = k_buf[:length].permute(1, 2, 0, 3).repeat_interleave(groups, 0)
    v = v_buf[:length].permute(1, 2, 0, 3).repeat_interleave(groups, 0)
    mask = None if allowed is None else allowed.repeat_interleave(groups, 0)[:, None, None, :]
    return scaled_dot_product(q[:, :, None].double(), k.double(), v.double(), mask)[0][:, :, 0].float()


@needs_kernel
@pytest.mark.parametrize("sentences,groups,heads,dim,length,capacity,masked", [
    (32, 1, 4, 64, 35, 35, True),  # greedy cross-attention over padded sources
    (32, 5, 4, 64, 20, 50, False),  # beam 5: each sentence's keys shared by its 5 consecutive rows
    (1, 1, 8, 64, 1, 60, False),  # the first step: one key
    (3, 5, 8, 32, 40, 40, True),
    (7, 2, 3, 20, 13, 16, True),  # odd sizes: vector loops' remainders
    # Many query rows a sentence (a source attending to itself): in blocks, tiled products
    (2, 12, 4, 64, 12, 12, True),
    (1, 30, 4, 32, 30, 30, False),
    (3, 9, 2, 16, 40, 41, True),  # keys past one panel of 16, a partial last one
    (2, 10, 3, 20, 10, 10, True),  # head_dim not a multiple of 16: one query at a time
])
def test_equals_scaled_dot_product_in_float64(sentences, groups, heads, dim, length, capacity, masked):
    g = torch.Generator().manual_seed(sentences * 100 + length)
    rows = sentences * groups
    k_buf = torch.randn(capacity, sentences, heads, dim, generator=g)
    v_buf = torch.randn(capacity, sentences, heads, dim, generator=g)
    qkv = torch.randn(rows, 3, heads, dim, generator=g) * 2  # the queries as a strided view, as decoding has them
    allowed = None
    if masked:
        allowed = torch.rand(sentences, length, generator=g) > 0.4
        allowed[:, 0] = True
    got = decode_kernels.attend_one(qkv[:, 0], k_buf, v_buf, length, allowed)
    assert got.shape == (rows, heads, dim) and got.is_contiguous()
    torch.testing.assert_close(got, reference(qkv[:, 0], k_buf, v_buf, length, allowed, groups), atol=2e-6, rtol=1e-5)


@needs_kernel
def test_masked_keys_get_no_weight_and_a_row_with_none_left_is_nan_as_in_torch():
    k_buf, v_buf = torch.randn(6, 2, 2, 8), torch.randn(6, 2, 2, 8)
    q = torch.randn(2, 2, 8)
    allowed = torch.tensor([[True, True, False, False, False, False], [False] * 6])
    got = decode_kernels.attend_one(q, k_buf, v_buf, 6, allowed)
    # Changing masked keys and values changes nothing.
    k_buf[2:, 0], v_buf[2:, 0] = 1e4, -1e4
    torch.testing.assert_close(decode_kernels.attend_one(q, k_buf, v_buf, 6, allowed)[0], got[0])
    assert torch.isnan(got[1]).all()
    want = torch.softmax(torch.full((4,), float("-inf")), 0)
    assert torch.isnan(want).all()


@needs_kernel
def test_in_blocks_too_masked_keys_get_no_weight_and_a_sentence_with_none_left_is_nan():
    k_buf, v_buf = torch.randn(6, 2, 2, 16), torch.randn(6, 2, 2, 16)
    q = torch.randn(2 * 9, 2, 16)  # 9 query rows a sentence
    allowed = torch.tensor([[True, True, False, False, False, False], [False] * 6])
    got = decode_kernels.attend_one(q, k_buf, v_buf, 6, allowed)
    k_buf[2:, 0], v_buf[2:, 0] = 1e4, -1e4
    torch.testing.assert_close(decode_kernels.attend_one(q, k_buf, v_buf, 6, allowed)[:9], got[:9])
    assert torch.isnan(got[9:]).all() and not torch.isnan(got[:9]).any()


@needs_kernel
@pytest.mark.parametrize("masked", [True, False])
def test_a_source_attending_to_itself_equals_the_pytorch_path(masked, monkeypatch):
    """The encoder's self-attention at inference takes the kernel (one call, every sentence's
    positions as its query rows); with gradients, weights recorded, or a causal mask it does not."""
    attn = MultiHeadAttention(64, 4).eval()
    x = torch.randn(3, 11, 64)
    mask = padding_mask(torch.tensor([[1] * 11, [1] * 5 + [0] * 6, [1] * 2 + [0] * 9]), 0) if masked else None
    calls, kernel = [], decode_kernels._attend_kernel
    monkeypatch.setattr(decode_kernels, "_attend_kernel", lambda *args: calls.append(args) or kernel(*args))
    with torch.inference_mode():
        got = attn(x, mask=mask)
        assert len(calls) == 1
        attn.record_weights = True  # the PyTorch ops
        want = attn(x, mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    attn.record_weights = False
    with torch.enable_grad():
        attn(x.requires_grad_(), mask=mask).sum().backward()  # training: autograd through PyTorch ops
    assert len(calls) == 1
    with torch.inference_mode():
        attn(x.detach()[:, :4], mask=subsequent_mask(4))  # a decoder's causal mask: not this kernel's
    assert len(calls) == 1


@needs_kernel
def test_large_score_gaps_underflow_to_zero_weight_without_nan():
    k_buf = torch.zeros(3, 1, 1, 4)
    k_buf[0, 0, 0] = 100.0  # scores 100 * 10 / 2 = 500 against 0: the others' weights underflow
    v_buf = torch.arange(12, dtype=torch.float32).view(3, 1, 1, 4)
    got = decode_kernels.attend_one(torch.full((1, 1, 4), 10.0), k_buf, v_buf, 3)
    torch.testing.assert_close(got[0, 0], v_buf[0, 0, 0])


def test_declines_what_it_does_not_handle():
    k_buf = torch.randn(4, 2, 2, 8)
    q = torch.randn(2, 2, 8)
    assert decode_kernels.attend_one(q.bfloat16(), k_buf.bfloat16(), k_buf.bfloat16(), 4) is None
    assert decode_kernels.attend_one(q.requires_grad_(), k_buf, k_buf, 4) is None
    assert decode_kernels.attend_one(torch.randn(3, 2, 8), k_buf, k_buf, 4) is None  # 3 rows for 2 sentences
    assert decode_kernels.attend_one(torch.randn(2, 2, 8), k_buf, k_buf, 5) is None  # past the buffer


@needs_kernel
@pytest.mark.parametrize("self_attention", [True, False])
def test_decoding_steps_equal_the_pytorch_path(monkeypatch, self_attention):
    attn = MultiHeadAttention(32, 4).eval()
    memory, x = torch.randn(3, 9, 32), torch.randn(6, 32)
    mask = padding_mask(torch.tensor([[1] * 9, [1] * 5 + [0] * 4, [1] * 2 + [0] * 7]), 0)
    if not self_attention:
        attn.split_projections()  # as prepare_for_cpu does for encoder-decoder attention
    outputs = []
    for kernel in (decode_kernels._attend_kernel, None):
        monkeypatch.setattr(decode_kernels, "_attend_kernel", kernel)
        cache = KVCache(capacity=4)
        with torch.inference_mode():
            if self_attention:
                steps = [attn.self_attention_step(x[:3] * (i + 1), cache) for i in range(4)]
            else:
                cache.append(*attn.project_keys_values(memory))
                steps = [attn.cross_attention_step(x, cache, mask)]  # 2 beams a sentence
        outputs.append(torch.stack(steps))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-6, rtol=1e-5)


@needs_kernel
def test_searches_find_the_same_tokens_with_and_without_it(monkeypatch):
    model = randomize_norms(tiny_model())
    src = torch.tensor([[5, 6, 7, 8, 2, 0, 0], [9, 3, 4, 10, 11, 12, 2], [4, 4, 2, 0, 0, 0, 0]])
    found, calls, kernel = [], [], decode_kernels._attend_kernel

    def counted(*args):
        calls.append(args)
        return kernel(*args)
    for variant in (counted, None):
        monkeypatch.setattr(decode_kernels, "_attend_kernel", variant)
        found.append((greedy_search(model, src), [[h.tokens for h in hyps] for hyps in beam_search(model, src, 4)]))
    assert found[0] == found[1]
    assert calls, "the searches did not use the kernel"


@needs_kernel
@pytest.mark.parametrize("rows", [0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 40, 161])
@pytest.mark.parametrize("size, bias", [((256, 768), True), ((24, 41), True), ((37, 16), False), ((1030, 100), False),
                                        ((3, 5), True), ((0, 5), True), ((5, 0), True)])
@pytest.mark.parametrize("threads", [1, 2, 7])
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # nn.Linear(0, 5)'s init
def test_panel_product_equals_linear(rows, size, bias, threads, monkeypatch):
    """Any number of rows (tiles of 6, the rest, one row on its own path), panels of 16 columns and a
    padded last one, input widths that four does not divide, no inputs or no outputs, with and
    without a bias, threads that do or do not divide the panels (more threads than panels too)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    linear = torch.nn.Linear(*size, bias=bias)
    panels, panel_bias = decode_kernels.column_panels(linear.weight.detach(), linear.bias if bias else None)
    assert panels.shape == (-(-size[1] // 16), size[0], 16) and (panel_bias is None) != bias
    x = torch.randn(rows, size[0])
    strided = torch.randn(rows, size[0] + 3)[:, :size[0]]  # rows further apart than their length
    with torch.no_grad():
        for inputs in (x, strided):
            got = decode_kernels.linear(inputs, panels, panel_bias, size[1])
            torch.testing.assert_close(got, linear(inputs), atol=1e-5, rtol=1e-5)


def test_panel_product_declines_what_it_does_not_handle():
    panels, bias = decode_kernels.column_panels(torch.randn(10, 6), torch.randn(10))
    assert decode_kernels.linear(torch.randn(6, 2)[:, 0][None], panels, bias, 10) is None  # strided
    assert decode_kernels.linear(torch.randn(2, 6).double(), panels, bias, 10) is None


@needs_kernel
@pytest.mark.parametrize("activation", ["relu", "swish", "gelu"])
@pytest.mark.parametrize("rows", [1, 7])
def test_panel_product_applies_the_activation(activation, rows):
    linear = torch.nn.Linear(40, 37)
    panels, panel_bias = decode_kernels.column_panels(linear.weight.detach(), linear.bias.detach())
    x = torch.randn(rows, 40) * 8  # sums far out on both sides (swish's exponential clamps above 88)
    x[0, :] = torch.linspace(-400, 400, 40)
    with torch.no_grad():
        want = ACTIVATIONS[activation](linear(x))
    torch.testing.assert_close(decode_kernels.linear(x, panels, panel_bias, 37, activation), want,
                               atol=2e-5, rtol=2e-5)


def fused_pair(**config):
    """A CPU-prepared random model whose decoder layers have their fused C step, and one without."""
    model = randomize_norms(tiny_model(**config))
    fused, plain = prepare_for_cpu(model), prepare_for_cpu(model)
    for layer in plain.decoder.layers:
        layer.fused_step = None
    assert all(layer.fused_step is not None for layer in fused.decoder.layers)
    return fused, plain


@needs_kernel
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("activation", ["relu", "swish", "gelu"])
@pytest.mark.parametrize("beams, masked, capacity", [(1, True, 0), (3, True, 8), (2, False, 3)])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_fused_decoder_layer_step_equals_the_python_step(norm, activation, beams, masked, capacity, threads,
                                                         monkeypatch):
    """Each layer's output and its self-attention cache, step after step: a cache that grows
    (capacity 0 or smaller than the steps) or is preallocated, beams sharing a sentence's keys, padded
    or unpadded sources, more threads than rows or sentences."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    fused, plain = fused_pair(norm=norm, activation=activation, heads=2 if beams == 2 else 4)
    src = torch.tensor([[5, 6, 7, 8, 2, 0, 0], [9, 3, 4, 10, 11, 12, 2], [4, 4, 2, 0, 0, 0, 0]])
    if not masked:
        src = src[1:2]
    mask = padding_mask(src, 0)
    rows = src.size(0) * beams
    outputs, caches = [], []
    with torch.inference_mode():
        for model in (fused, plain):
            cache = model.new_cache(capacity)
            cache.fill_cross_attention(model.decoder, model.encode(src, mask))
            tokens = torch.arange(rows) % 15 + 3
            outputs.append(torch.stack([model.decode_step(tokens + t, cache, mask if masked else None)
                                        for t in range(5)]))
            caches.append(cache)
    torch.testing.assert_close(outputs[0], outputs[1], atol=2e-5, rtol=2e-5)
    for fused_cache, plain_cache in zip(caches[0].self_attn, caches[1].self_attn):
        assert len(fused_cache) == len(plain_cache) == 5
        torch.testing.assert_close(fused_cache.k, plain_cache.k, atol=2e-5, rtol=2e-5)
        torch.testing.assert_close(fused_cache.v, plain_cache.v, atol=2e-5, rtol=2e-5)


@needs_kernel
def test_fused_decoder_layer_step_declines_what_it_does_not_handle():
    fused, _ = fused_pair()
    layer, step = fused.decoder.layers[0], fused.decoder.layers[0].fused_step
    memory = torch.randn(2, 5, 32)
    with torch.inference_mode():
        self_cache, cross_cache = KVCache(4), KVCache()
        assert step(torch.randn(2, 32), self_cache, cross_cache, None) is None  # no encoder keys yet
        cross_cache.append(*layer.cross_attn.project_keys_values(memory))
        assert step(torch.randn(3, 32), self_cache, cross_cache, None) is None  # 3 rows for 2 sentences
        assert step(torch.randn(2, 32).double(), self_cache, cross_cache, None) is None
        assert step(torch.randn(2, 64)[:, ::2], self_cache, cross_cache, None) is None  # strided
        assert step(torch.randn(2, 32), self_cache, cross_cache, torch.ones(2, 4, dtype=torch.bool)) is None
        step.max_rows = 1
        assert step(torch.randn(2, 32), self_cache, cross_cache, None) is None
        assert len(self_cache) == 0
        step.max_rows = 2
        assert step(torch.randn(2, 32), self_cache, cross_cache, torch.ones(2, 5, dtype=torch.bool)).shape == (2, 32)
        assert len(self_cache) == 1
    panels = [(linear.panels, linear.panel_bias) for linear in (layer.self_attn.in_proj, layer.self_attn.out_proj,
                                                                 layer.cross_attn.q_proj, layer.cross_attn.out_proj,
                                                                 layer.feed_forward.w_1, layer.feed_forward.w_2)]
    norms = [(s.norm.weight, s.norm.bias) for s in layer.sublayers]
    with pytest.raises(ValueError, match="panels of shape"):
        decode_kernels.DecoderLayerStep(panels[::-1], norms, 4, "relu", False, 1e-5, 8)
    with pytest.raises(ValueError, match="activation 'tanh'"):
        decode_kernels.DecoderLayerStep(panels, norms, 4, "tanh", False, 1e-5, 8)


@needs_kernel
@pytest.mark.parametrize("norm", ["post", "pre"])
def test_searches_find_the_same_tokens_with_and_without_the_fused_step(norm, monkeypatch):
    fused, plain = fused_pair(norm=norm, activation="swish")
    src = torch.tensor([[5, 6, 7, 8, 2, 0, 0], [9, 3, 4, 10, 11, 12, 2], [4, 4, 2, 0, 0, 0, 0]])
    calls, kernel = [], decode_kernels._layer_kernel
    monkeypatch.setattr(decode_kernels, "_layer_kernel", lambda *args: calls.append(args[3]) or kernel(*args))
    found = [(greedy_search(model, src, max_len_extra=12),
              [[h.tokens for h in hyps] for hyps in beam_search(model, src, beam_size=4, n_best=2, max_len_extra=12)])
             for model in (fused, plain)]
    assert found[0] == found[1]
    assert 3 in calls and 12 in calls  # greedy's 3 rows, beam search's 3 x 4


def test_prepare_for_cpu_fuses_decoder_steps_only_where_every_product_has_panels(monkeypatch):
    fp32 = prepare_for_cpu(tiny_model())
    assert all((layer.fused_step is not None) == decode_kernels.available() for layer in fp32.decoder.layers)
    int8 = prepare_for_cpu(tiny_model(), "int8")
    assert all(layer.fused_step is None for layer in int8.decoder.layers)
    monkeypatch.setattr(decode_kernels, "available", lambda: False)  # no C library: no panels, no fused step
    assert all(layer.fused_step is None for layer in prepare_for_cpu(tiny_model()).decoder.layers)


@needs_kernel
@pytest.mark.parametrize("rows, vocab, block", [(160, 8000, 32), (3, 100, 32), (5, 31, 32), (2, 70, 7), (0, 64, 32)])
def test_row_normalizers_equal_logsumexp_and_block_maxima(rows, vocab, block):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(rows, vocab, generator=g) * 10
    if rows > 2:
        logits[1, : vocab // 2] = float("-inf")  # tokens ruled out
        logits[2, -1] = 90.0  # the best past the last whole block, e^90 past float32's range
    lse, block_max = decode_kernels.row_normalizers(logits, block)
    torch.testing.assert_close(lse, torch.logsumexp(logits, 1), atol=1e-5, rtol=1e-6)
    whole = vocab // block * block
    assert torch.equal(block_max, logits[:, :whole].view(rows, vocab // block, block).amax(2))
    nothing = torch.full((1, vocab), float("-inf"))  # every token ruled out: NaN, as log_softmax's
    assert decode_kernels.row_normalizers(nothing, block)[0].isnan().all() and nothing.log_softmax(1).isnan().all()
    assert decode_kernels.row_normalizers(logits.double(), block) is None
    assert decode_kernels.row_normalizers(torch.randn(vocab, 3).t(), block) is None  # not contiguous


@needs_kernel
@pytest.mark.parametrize("lengths, heads, dim", [([5, 0, 17, 1, 40], 2, 16), ([30, 25, 33], 4, 64), ([3], 1, 32)])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_packed_attention_equals_each_sentence_alone(lengths, heads, dim, threads, monkeypatch):
    """Sentences of any length (none, one, under and over a panel of 16 keys) packed row after row,
    each attending to its own positions only."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(sum(lengths))
    rows, d = sum(lengths), heads * dim
    qkv = torch.randn(rows, 3 * d, generator=g) * 2
    lengths = torch.tensor(lengths)
    offsets = lengths.cumsum(0) - lengths
    got = decode_kernels.attend_packed(qkv, offsets, lengths, heads)
    assert got.shape == (rows, d)
    for start, length in zip(offsets.tolist(), lengths.tolist()):
        if length:
            q, k, v = qkv[start: start + length].double().view(length, 3, heads, dim).permute(1, 2, 0, 3)
            want = scaled_dot_product(q, k, v, None)[0].transpose(0, 1).reshape(length, d).float()
            torch.testing.assert_close(got[start: start + length], want, atol=1e-5, rtol=1e-5)
    assert decode_kernels.attend_packed(torch.randn(rows, 3 * 24), offsets, lengths, 1) is None  # head size 24
    assert decode_kernels.attend_packed(qkv.double(), offsets, lengths, heads) is None
    assert decode_kernels.attend_packed(qkv, offsets.int(), lengths, heads) is None


def test_packed_layout_lays_out_right_padded_sentences_only():
    mask = padding_mask(torch.tensor([[5, 6, 7, 0], [5, 0, 0, 0], [5, 6, 7, 8]]), 0)
    layout = packed_layout(mask)
    assert layout.lengths.tolist() == [3, 1, 4] and layout.offsets.tolist() == [0, 3, 4]
    assert layout.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert packed_layout(padding_mask(torch.tensor([[5, 6], [7, 8]]), 0)) is None  # no padding: nothing to drop
    assert packed_layout(padding_mask(torch.tensor([[0, 5, 6], [7, 8, 9]]), 0)) is None  # padded in front


@needs_kernel
def test_the_encoder_skips_the_padding_at_inference_with_the_same_results(monkeypatch):
    """Real positions as with padding, pads 0; the same tokens decoded; training, recorded weights
    and left padding keep the padded path."""
    model = randomize_norms(tiny_model(heads=2))  # head_dim 16: the packed kernel's
    src = torch.tensor([[5, 6, 7, 8, 2, 0, 0], [9, 3, 4, 10, 11, 12, 2], [4, 4, 2, 0, 0, 0, 0]])
    mask = padding_mask(src, 0)
    calls, kernel = [], decode_kernels._packed_kernel
    monkeypatch.setattr(decode_kernels, "_packed_kernel", lambda *args: calls.append(args) or kernel(*args))
    with torch.inference_mode():
        packed = model.encode(src, mask)
        assert len(calls) == model.cfg.encoder_layers
        found = (greedy_search(model, src), [h[0].tokens for h in beam_search(model, src, 3)])
        monkeypatch.setattr(model_module, "packed_layout", lambda mask: None)
        padded = model.encode(src, mask)
        assert found == (greedy_search(model, src), [h[0].tokens for h in beam_search(model, src, 3)])
    real = mask[:, 0, 0]
    torch.testing.assert_close(packed[real], padded[real], atol=1e-5, rtol=1e-5)
    assert (packed[~real] == 0).all()
    calls.clear()
    model.encode(src, mask).sum()  # gradients wanted (parameters require them): padded
    model.record_attention()
    with torch.inference_mode():
        model.encode(src, mask)
    assert not calls
