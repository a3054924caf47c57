"""CPU inference copies: packed float32 weights give the float model's results; packed bf16 weights
and int8 dynamic quantization convert every Linear layer and stay close to the float model."""
import sys

import pytest
import torch
from torch import nn

from encdec import decode_kernels, inference
from encdec.inference import (Int8Linear, PackedLinear, int8_onednn_available, onednn_available, onednn_packs,
                              prepare_for_cpu, quantize_activations)
from encdec.layers import ACTIVATIONS, FeedForward
from encdec.linear import Linear
from encdec.search import beam_search, greedy_search

from conftest import random_batch, tiny_model


def test_split_projections_change_nothing():
    model = tiny_model()
    src, tgt = random_batch(model.cfg)
    before = model(src, tgt)
    for layer in model.decoder.layers:
        weight = layer.cross_attn.in_proj.weight
        layer.cross_attn.split_projections()
        assert layer.cross_attn.q_proj.weight.data_ptr() == weight.data_ptr(), "a view, not a copy"
    assert torch.equal(model(src, tgt), before)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_packed_float32_model_gives_the_same_results():
    model = tiny_model(d_model=48, heads=4, ff=96, src_vocab_size=40, tgt_vocab_size=37)
    packed = prepare_for_cpu(model)
    assert not [name for name, m in packed.named_modules() if type(m) is nn.Linear]
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 2 * 4 + 2 * 7 + 1
    src, tgt = random_batch(model.cfg, batch=5, src_len=9, tgt_len=8)
    src[1, 6:] = model.cfg.pad_id
    with torch.no_grad():
        torch.testing.assert_close(packed(src, tgt), model(src, tgt), atol=1e-5, rtol=1e-5)
    assert greedy_search(packed, src, max_len_extra=12) == greedy_search(model, src, max_len_extra=12)
    beams = [[h.tokens for h in hyps] for hyps in beam_search(packed, src, beam_size=3, n_best=3, max_len_extra=12)]
    assert beams == [[h.tokens for h in hyps] for hyps in beam_search(model, src, beam_size=3, n_best=3,
                                                                       max_len_extra=12)]


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("shape", [(1,), (4,), (2, 2), (1, 1), (3, 11), (32,), (0,)])
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("size", [(24, 41), (1024, 601)])
@pytest.mark.parametrize("cpu", ["avx2", "avx512", "no C kernel"])
def test_packed_linear_equals_linear_for_few_and_many_rows(shape, threads, size, cpu, monkeypatch):
    """Where the C kernel is built, every row count takes its panels without AVX512 (no oneDNN copy
    kept), one row with AVX512 (more rows the packed product); without it the packed product takes
    all. Each gives Linear's result."""
    if cpu != "no C kernel" and not decode_kernels.available():
        pytest.skip("encdec/_decode_kernels.c is not built here")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    monkeypatch.setattr(inference, "packed_few_rows_are_fast", lambda: cpu == "avx512")
    monkeypatch.setattr(decode_kernels, "available", lambda: cpu != "no C kernel" and decode_kernels._linear_kernel)
    calls, kernel = [], decode_kernels._linear_kernel
    monkeypatch.setattr(decode_kernels, "_linear_kernel", lambda *args: calls.append(args[2]) or kernel(*args))
    linear = nn.Linear(*size)
    packed = PackedLinear(linear)
    panel_rows = {"avx2": sys.maxsize - 1, "avx512": 1, "no C kernel": 0}[cpu]
    assert packed.panel_rows == panel_rows and f"panel_rows={panel_rows}" in repr(packed)
    assert (packed.weight is None) == (cpu == "avx2")
    if cpu != "no C kernel":
        assert packed.panels.shape == (-(-size[1] // 16), size[0], 16)
    x = torch.randn(*shape, size[0])
    with torch.no_grad():
        torch.testing.assert_close(packed(x), linear(x), atol=1e-4, rtol=1e-4)
    rows = x.numel() // size[0]
    assert calls == ([rows] if cpu != "no C kernel" and rows <= panel_rows else [])


@pytest.mark.skipif(not decode_kernels.available(), reason="encdec/_decode_kernels.c is not built here")
def test_packed_linear_takes_other_dtypes_and_strided_inputs_through_the_panels():
    linear = nn.Linear(24, 41)
    packed = PackedLinear(linear)
    x = torch.randn(3, 2 * 24)
    with torch.no_grad():
        torch.testing.assert_close(packed(x[:, ::2]), linear(x[:, ::2]), atol=1e-5, rtol=1e-5)
        wide = packed(x[:, :24].double())
        assert wide.dtype == torch.float64
        torch.testing.assert_close(wide, linear(x[:, :24]).double(), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("rows", [1, 7, inference.MANY_ROWS - 1, inference.MANY_ROWS, 3 * inference.MANY_ROWS])
def test_many_rows_layers_take_the_plain_weights_from_many_rows_and_equal_linear(rows, monkeypatch):
    linear = nn.Linear(48, 40)
    packed = PackedLinear(linear, many_rows=True)
    assert packed.plain.shape == (40, 48)
    assert packed.panel_rows == (0 if packed.panels is None else 1 if inference.packed_few_rows_are_fast()
                                 else inference.MANY_ROWS - 1)
    x = torch.randn(rows, 48)
    with torch.no_grad():
        want = linear(x)
        calls, plain_linear = [], nn.functional.linear
        monkeypatch.setattr(nn.functional, "linear", lambda *a: calls.append(a) or plain_linear(*a))
        torch.testing.assert_close(packed(x), want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(packed(x.view(1, rows, 48))[0], want, atol=1e-4, rtol=1e-4)
    assert len(calls) == (2 if rows >= inference.MANY_ROWS else 0)


def test_prepare_for_cpu_gives_the_plain_weights_to_the_layers_that_multiply_whole_sources():
    fast = prepare_for_cpu(tiny_model())
    if not onednn_available():
        pytest.skip("this PyTorch build has no oneDNN")
    many = {name for name, m in fast.named_modules() if isinstance(m, PackedLinear) and m.plain is not None}
    everything = {name for name, m in fast.named_modules() if isinstance(m, PackedLinear)}
    # The feed-forward W_1 that applies its activation in the panels takes them for every row count.
    fused = decode_kernels.available() and not inference.packed_few_rows_are_fast()
    assert many == {n for n in everything if (n.startswith("encoder.") and not (fused and n.endswith("w_1")))
                    or n.endswith("cross_attn.kv_proj")}
    assert {n for n in everything if n.startswith("encoder.")} and everything - many
    for name, ff in ((n, m) for n, m in fast.named_modules() if isinstance(m, FeedForward)):
        assert ff.activation_in_w_1 and ff.w_1.activation == "relu", name
        if fused:
            assert ff.w_1.panel_rows == sys.maxsize - 1 and ff.w_1.plain is None, name


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
@pytest.mark.parametrize("activation", ["relu", "swish", "gelu"])
@pytest.mark.parametrize("rows", [1, 7, inference.MANY_ROWS + 3])
@pytest.mark.parametrize("cpu", ["avx2", "avx512", "no C kernel"])
def test_packed_linear_applies_its_activation_on_every_path(activation, rows, cpu, monkeypatch):
    """In the panels' product (with or without AVX512), after oneDNN's packed product, after MKL's."""
    if cpu != "no C kernel" and not decode_kernels.available():
        pytest.skip("encdec/_decode_kernels.c is not built here")
    monkeypatch.setattr(inference, "packed_few_rows_are_fast", lambda: cpu == "avx512")
    monkeypatch.setattr(decode_kernels, "available", lambda: cpu != "no C kernel" and decode_kernels._linear_kernel)
    linear = nn.Linear(24, 41)
    x = torch.randn(rows, 24) * 3
    with torch.no_grad():
        want = ACTIVATIONS[activation](linear(x))
        for many_rows in (False, True):
            packed = PackedLinear(linear, many_rows=many_rows, activation=activation)
            torch.testing.assert_close(packed(x), want, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(packed(x[None])[0], want, atol=1e-4, rtol=1e-4)


INT8_KINDS = ["fbgemm", pytest.param("onednn", marks=pytest.mark.skipif(
    not int8_onednn_available(), reason="no oneDNN int8 matmul or no AMX on this CPU"))]


@pytest.fixture(params=INT8_KINDS)
def int8_kind(request, monkeypatch):
    """Both int8 paths of prepare_for_cpu: oneDNN's Int8Linear where the CPU allows, torch.ao's fbgemm."""
    if request.param == "fbgemm":
        monkeypatch.setattr(inference, "int8_onednn_available", lambda: False)
    return request.param


def test_every_linear_is_quantized_and_the_float_model_is_kept(int8_kind):
    model = tiny_model()
    quantized = prepare_for_cpu(model, "int8")
    assert not [name for name, m in quantized.named_modules() if type(m) is nn.Linear]
    kind = Int8Linear if int8_kind == "onednn" else torch.ao.nn.quantized.dynamic.Linear
    int8 = [m for m in quantized.modules() if isinstance(m, kind)]
    # per layer: in_proj (q_proj and kv_proj for encoder-decoder attention) and out_proj per attention,
    # w_1 and w_2; plus the output layer
    cfg = model.cfg
    assert len(int8) == cfg.encoder_layers * 4 + cfg.decoder_layers * 7 + 1
    assert all(type(m) is Linear for m in (model.output, model.encoder.layers[0].feed_forward.w_1))


@pytest.mark.parametrize("shift", [0.0, 3.0, -3.0])
def test_quantized_activations_round_trip_within_half_a_step(shift):
    """Symmetric int8 over the largest magnitude: within half a step, zeros exact, the range used."""
    x = torch.randn(6, 33) + shift
    x[0, :5] = 0.0
    q, scale = quantize_activations(x)
    assert q.dtype == torch.int8 and scale.numel() == 1
    back = q.float() * scale
    assert (back - x).abs().max() <= scale / 2 + 1e-6
    assert torch.equal(back[0, :5], torch.zeros(5))
    assert q.abs().max() == 127
    q, scale = quantize_activations(torch.zeros(3, 4))
    assert torch.equal(q.float() * scale, torch.zeros(3, 4))


@pytest.mark.skipif(not int8_onednn_available(), reason="no oneDNN int8 matmul or no AMX on this CPU")
@pytest.mark.parametrize("shape", [(1,), (5,), (3, 11), (2, 40), (160,)])  # below and above ONEDNN_ROWS
@pytest.mark.parametrize("bias", [True, False])
def test_int8_linear_is_close_to_linear(shape, bias):
    """Errors of int8 weights (per-row scales) and uint8 inputs stay small against the outputs' scale,
    and a random error this small is what int8 rounding gives, not a misplaced scale or bias."""
    linear = nn.Linear(64, 48, bias=bias)
    x = torch.randn(*shape, 64)
    with torch.no_grad():
        y, reference = Int8Linear(linear)(x), linear(x)
    assert y.shape == reference.shape and y.dtype == torch.float32
    error = (y - reference).abs().max()
    assert 0 < error < 0.02 * reference.abs().max()


@pytest.mark.parametrize("precision", ["int8", "int8-fbgemm", "bf16-plain", pytest.param("bf16", marks=pytest.mark.skipif(
    not onednn_packs(torch.bfloat16), reason="oneDNN cannot pack bf16 on this CPU (no AVX512)"))])
def test_low_precision_predictions_stay_close_to_float(precision, monkeypatch):
    if precision == "int8-fbgemm":  # the fallback where the CPU has no VNNI
        monkeypatch.setattr(inference, "int8_onednn_available", lambda: False)
        precision = "int8"
    if precision == "bf16-plain":  # the fallback where oneDNN cannot pack bf16
        monkeypatch.setattr(inference, "onednn_packs", lambda dtype: dtype == torch.float32)
        precision = "bf16"
    model = tiny_model(d_model=64, ff=128, src_vocab_size=50, tgt_vocab_size=50)
    src, tgt = random_batch(model.cfg, batch=8, src_len=12, tgt_len=10)
    with torch.no_grad():
        reference, quantized = model(src, tgt), prepare_for_cpu(model, precision)(src, tgt)
    assert quantized.dtype == torch.float32
    error = (quantized - reference).abs().max()
    assert 0 < error < 0.1 * reference.std(), f"{precision} log-probs off by {error:.4f}"
    agree = (quantized.argmax(-1) == reference.argmax(-1)).float().mean()
    assert agree > 0.9, f"{precision} and float32 agree on only {agree:.0%} of next-token predictions"


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_bf16_packs_every_linear_in_bf16():
    packed = prepare_for_cpu(tiny_model(), "bf16")
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 2 * 4 + 2 * 7 + 1 and all(m.weight.dtype == torch.bfloat16 for m in layers)
    with pytest.raises(ValueError, match="precision 'fp16' is not one of"):
        prepare_for_cpu(tiny_model(), "fp16")


def test_int8_search_beam_1_equals_greedy(int8_kind):
    """(Not for bf16: its products round to 8 mantissa bits, so a different batch layout can flip a
    near-tie of a random model; bf16's closeness to float32 is tested above.)"""
    quantized = prepare_for_cpu(tiny_model(), "int8")
    src, _ = random_batch(quantized.cfg, batch=4)
    greedy = greedy_search(quantized, src, max_len_extra=8)
    assert [h[0].tokens for h in beam_search(quantized, src, beam_size=1, alpha=0.0, max_len_extra=8)] == greedy


