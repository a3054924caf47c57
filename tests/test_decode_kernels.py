"""encdec.decode_kernels: decoding's one-query attention and matrix products in C, against PyTorch."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from encdec import decode_kernels
from encdec.attention import KVCache, MultiHeadAttention, padding_mask, scaled_dot_product
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
