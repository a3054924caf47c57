"""Fast CPU inference: Linear layers swapped for pre-packed float32 or int8 versions.

Decoding multiplies a few rows (one per live hypothesis) by every weight matrix
at each step, so its speed is set by how the matrix products read the weights.
:func:`prepare_for_cpu` returns an inference-only copy of a model whose Linear
layers (attention projections, feed-forward, output layer) are replaced by

- :class:`PackedLinear`: float32 weights laid out once for the products decoding
  makes: in column panels for encdec's C kernel (:func:`encdec.decode_kernels.linear`,
  where built; 1.1-1.4x faster decoding than oneDNN's packed product on the 2-core AVX2
  EPYC), in oneDNN's blocked layout otherwise (measured 1.3-2.7x faster than ``F.linear``
  for decoding's shapes, for one row as well as for many); same results up to float
  rounding; the encoder's layers take ``F.linear`` for a whole batch of sources, where
  MKL is faster), or
- with ``precision="bf16"``, the same packed layers holding bfloat16 weights: each
  product rounds its input to bf16 and returns float32. On CPUs with AMX or
  AVX512-BF16 (see :func:`encdec.train.bf16_is_native`) that multiplies several
  times faster than float32; elsewhere it is emulated and slow, and where oneDNN cannot
  pack bf16 at all (CPUs without AVX512 or AVX-NE-CONVERT) the bf16 weights stay plain
  and ``F.linear`` multiplies them. Outputs may differ slightly from float32 ones (bf16
  keeps 8 bits of mantissa).
- with ``precision="int8"``, int8 dynamic quantization: int8 weights with one scale per
  output row, activations quantized per call from their observed range (so
  results depend slightly on what else is in the batch). On CPUs with int8 dot
  products (AVX512-VNNI, AMX-INT8) :class:`Int8Linear` multiplies them with oneDNN;
  elsewhere torch's fbgemm dynamic quantization does (it keeps 7 bits of each
  activation, which older CPUs need to avoid overflow). Half the weight memory
  of float32 with oneDNN (it keeps fbgemm's int8 copy too, for inputs of few rows),
  a quarter with fbgemm alone.

Embeddings, layer norm and softmax stay float32. In float32 with the C kernels built, each decoder
layer's decoding step also becomes one C call (:func:`fused_decoder_step`).

It also tunes glibc's allocator (:func:`encdec.allocator.reuse_freed_memory`).
"""
from __future__ import annotations

import copy
import functools
import sys
import warnings

import torch
from torch import Tensor, nn

from . import decode_kernels
from .allocator import reuse_freed_memory
from .linear import Linear, onednn_available
from .layers import ACTIVATIONS, DecoderLayer, FeedForward
from .model import Transformer


@functools.cache
def onednn_packs(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack weights of ``dtype`` on this CPU (bf16 needs AVX512 or AVX-NE-CONVERT)."""
    if not onednn_available():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=dtype), 1)
    except RuntimeError:
        return False
    return True


PRECISIONS = ("fp32", "bf16", "int8")


def check_precision(precision: str) -> None:
    """Raise ``ValueError`` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` laid out once for the CPU's matrix products.

    Inference only (no gradients, not saved). ``rows_hint`` is the number of input rows oneDNN's
    layout is tuned for; any number of rows and leading dimensions work. ``dtype`` is the weights'
    and the product's precision (float32 or bfloat16); inputs and outputs are float32 either way.

    Float32 where ``encdec/_decode_kernels.c`` is built: ``panels`` holds ``W^T`` in column panels
    (:func:`encdec.decode_kernels.column_panels`) and :func:`encdec.decode_kernels.linear`
    multiplies them, for every row count on CPUs without AVX512. There oneDNN's packed product
    pays a fixed 30-45 us a call and runs one row on one core, and decoding's products have one row
    per live hypothesis: whole searches, paired, 2 threads, AVX2 EPYC, small / base model, against
    the packed product (with column blocks for up to 16 rows before): greedy batch 32 +22 / +13 %,
    beam 5 batch 32 +4 / +6 %, greedy batch 1 +32 / +28 %, beam 5 batch 1 +36 / +38 %. With
    AVX512 oneDNN's packed product is fast from 2 rows (:func:`packed_few_rows_are_fast`), so the
    panels take one row only. The panels use the weights' memory once; ``weight``, in oneDNN's
    blocked layout, is kept only where some row count goes to it (with AVX512, for bf16, or
    without the C library, where it takes every row count: the column blocks that served one row
    there until 2026-12-07, at ~30 % faster batch-1 decoding, went with the few-row kernel they
    fed, so that few rows have one path). (Earlier, on a 2-core AVX512 EPYC, one row through ``F.linear``, MKL's
    matrix-vector kernel, was 2.2x slower than packed: 2.9 against 1.3 ms for the small model's
    matrices.)

    ``many_rows=True`` (layers that multiply whole sources: see :data:`MANY_ROWS`) keeps a plain
    copy of the float32 weights, and inputs of at least ``MANY_ROWS`` rows take ``F.linear`` (MKL)
    on it.

    Where oneDNN cannot pack ``dtype`` on this CPU (:func:`onednn_packs`), bf16 weights stay
    plain and ``F.linear`` multiplies them: the same results, more slowly.

    ``activation`` (a name in :data:`encdec.layers.ACTIVATIONS`; :func:`prepare_for_cpu` gives each
    feed-forward ``W_1`` its network's) is applied to the output: by the panels' product to its sums
    before they are stored, and there (without AVX512) for every row count, a whole batch of sources
    too; elsewhere by PyTorch after the product. Whole searches, paired, AVX2 EPYC, against the
    activation as a pass of its own and MKL for the encoder's batches: greedy batch 32, small model
    +2.6 % (5 of 8), base +2.4 % (4 of 4); batch 1 even.
    """

    def __init__(self, linear: nn.Linear, rows_hint: int = 32, dtype: torch.dtype = torch.float32,
                 many_rows: bool = False, activation: str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        self.activation = activation
        weight = linear.weight.detach().to(dtype)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype).clone()
        self.packed = onednn_packs(dtype)
        float32 = dtype == torch.float32
        panels = float32 and decode_kernels.available()
        # A layer whose activation the panels apply takes them for every row count without AVX512:
        # MKL's product is about as fast for many rows, and then the activation is a pass of its own.
        fused = panels and activation is not None and not packed_few_rows_are_fast()
        self.plain = weight.clone() if many_rows and self.packed and float32 and not fused else None  # (out, in)
        plain_rows = MANY_ROWS if self.plain is not None else sys.maxsize  # the fewest rows it takes
        self.panels = self.panel_bias = None  # (ceil(out / 16), in, 16), (ceil(out / 16) * 16,)
        self.panel_rows = 0  # the most rows the panels take
        if panels:
            self.panels, self.panel_bias = decode_kernels.column_panels(weight, self.bias)
            self.panel_rows = 1 if packed_few_rows_are_fast() else plain_rows - 1
        # (out_features, in_features), in oneDNN's blocked layout where packed; None if unused.
        self.weight = None
        if self.panel_rows < plain_rows - 1:
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint) if self.packed else weight.clone()

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features)`` -> ``(..., out_features)``."""
        rows = x.numel() // self.in_features
        if self.plain is not None and rows >= MANY_ROWS:
            return self._activate(nn.functional.linear(x, self.plain, self.bias))
        if self.panels is not None and rows <= self.panel_rows:
            flat = x if x.dim() == 2 else x.reshape(rows, self.in_features)  # decoding steps' states are 2-D
            y = decode_kernels.linear(flat, self.panels, self.panel_bias, self.out_features, self.activation)
            if y is None:  # another dtype, or a strided last dimension: a float32 copy
                y = decode_kernels.linear(flat.float().contiguous(), self.panels, self.panel_bias,
                                          self.out_features, self.activation).to(x.dtype)
            return y if x.dim() == 2 else y.view(*x.shape[:-1], self.out_features)
        same = x.dtype == self.dtype  # the common case: no casts (each a call, even when a no-op)
        inputs = x if same else x.to(self.dtype)
        if self.packed:
            y = torch.ops.mkldnn._linear_pointwise(inputs, self.weight, self.bias, "none", [], "")
        else:
            y = nn.functional.linear(inputs, self.weight, self.bias)
        return self._activate(y if same else y.to(x.dtype))

    def _activate(self, y: Tensor) -> Tensor:
        return y if self.activation is None else ACTIVATIONS[self.activation](y)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, packed={self.packed}, panel_rows={self.panel_rows}, "
                f"plain_from_rows={MANY_ROWS if self.plain is not None else None}, activation={self.activation}")


# Layers made with ``many_rows=True`` (the encoder's, and the encoder-decoder attention's key/value
# projection: they multiply every source position at once) multiply inputs of at least MANY_ROWS
# rows by a plain copy of the weights through ``F.linear`` (MKL) instead of the packed product:
# 2 threads, AVX2 EPYC, 1,120 rows (a batch of 32 sources): 256 x 768 152 against 144 GFLOP/s,
# 256 x 1024 168 against 154, 1024 x 256 173 against 140; at 160 rows the two are even, and at 32
# MKL is slower for some shapes (256 x 1024 170 against 141 us). Whole batch-32 greedy searches,
# paired: small model +3.9 % (8 of 10), base +3.7 % (4 of 5); below MANY_ROWS (a batch-1 source)
# nothing changes, where taking MKL for every size cost 10 %. (A second A/B of the small model read
# +1.4 %, 6 of 10: a few per cent.) Against the C kernel's panels at 1,120 rows MKL is faster for the
# small model's shapes (256 x 768 2.9 against 3.4 ms, 1024 x 256 3.7 against 4.3) and slower for the
# base model's (512 x 1536 12.8 against 10.2, 2048 x 512 20.5 against 17.0): MKL from MANY_ROWS as before.
MANY_ROWS = 256


@functools.cache
def packed_few_rows_are_fast() -> bool:
    """Whether oneDNN's packed float32 product is fast for a few rows on this CPU: with AVX512.

    2 threads, 5 rows alone, on a 2-core AMD EPYC with AVX512: 256 x 768 21 us packed against 32 in
    column blocks, 256 x 1024 23 against 48, 1024 x 256 23 against 39 (256 x 256 about even), and
    beam-5 batch-1 decoding took 10-11 % more tokens/s with the packed product for every row count
    above one (in-process A/B: small model 540 -> 592 tokens/s, base 134 -> 150); on a 2-core EPYC
    with AVX2 only, the packed product took 59 us for 256 x 256 against the blocks' 21.
    """
    return torch.backends.cpu.get_cpu_capability() == "AVX512"


def int8_onednn_available() -> bool:
    """Whether :class:`Int8Linear` runs fast here: oneDNN's int8 matmul on a CPU with AMX tiles.

    VNNI alone is not enough: on a 2-core AMD EPYC with AVX512-VNNI (no AMX) oneDNN's int8 matmul
    took 8.7 s for 160 x 256 by 256 x 8000, against 12.9 ms in float32 and 2.8 ms for fbgemm, so
    everywhere without AMX int8 decoding uses torch.ao's fbgemm kernels.
    """
    return (onednn_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")
            and torch.cpu._is_vnni_supported() and torch.cpu._is_amx_tile_supported())


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` (any shape, float32) as int8 over its largest magnitude: ``(q, scale)`` with ``x ~= q * scale``.

    Symmetric (zero stays exact, no zero point): three passes over ``x``, against five or more
    for an asymmetric uint8 range, which matters at decoding's small sizes.
    """
    scale = x.abs().amax().div_(127).clamp_(min=torch.finfo(torch.float32).tiny)
    return x.mul(1 / scale).round_().to(torch.int8), scale


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """A matrix ``(rows, cols)`` as int8 with one scale per row: ``(q, scale)``, ``weight ~= q * scale[:, None]``.

    Symmetric over each row's largest magnitude, so quantizing ``q * scale[:, None]`` again gives
    the same ``q`` and ``scale`` (int8-stored models re-quantize exactly for int8 decoding).
    """
    weight = weight.detach().float()
    scale = weight.abs().amax(1).div_(127).clamp_(min=torch.finfo(torch.float32).tiny)
    return torch.round(weight / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """``y = x W^T + b`` as an int8 product, float32 in and out: oneDNN (AMX-INT8 or VNNI) for
    inputs of at least :attr:`ONEDNN_ROWS` rows, torch.ao's fbgemm kernel for fewer.

    ``W`` is stored as int8 with one scale per output row (symmetric: ``W ~= W_q * scale[:, None]``),
    pre-packed for oneDNN; each call quantizes its input to int8 with :func:`quantize_activations`, so
    int8 x int8 products accumulate in int32 and oneDNN applies both scales and the float32 bias.
    ``python benchmarks/linear_kernels.py`` measured on a 2-thread AMX Xeon, 160 rows (batch-32
    beam 5): 1.7 against fbgemm's 6.0 ms for the 512 x 32000 output layer, 0.28 against 0.46 ms for
    512 x 2048; at 32 rows 0.68 against 1.24 ms (output layer), about even for the rest; but a call
    costs oneDNN ~30 us more, so from 1 to 5 rows fbgemm is faster (0.024 against 0.056 ms at
    512 x 512), and it keeps its own int8 copy of the weights for those. Inference only. See
    :func:`int8_onednn_available` for where it runs.
    """

    ONEDNN_ROWS = 32

    def __init__(self, linear: nn.Linear, rows_hint: int = 32) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, self.weight_scale = quantize_rows(linear.weight)
        self.weight_zero_point = torch.zeros(self.out_features, dtype=torch.int64)
        self._zero = torch.zeros((), dtype=torch.int32)  # the inputs' zero point
        self.packed_weight = torch.ops.onednn.qlinear_prepack(q, [rows_hint, self.in_features])
        self.bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.few_rows = _quantize_int8(nn.Sequential(copy.deepcopy(linear)))[0]

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features)`` float32 -> ``(..., out_features)`` float32."""
        if x.numel() < self.ONEDNN_ROWS * self.in_features:
            return self.few_rows(x)
        q, scale = quantize_activations(x)
        return torch.ops.onednn.qlinear_pointwise.tensor(
            q, scale, self._zero, self.packed_weight, self.weight_scale, self.weight_zero_point, self.bias,
            1.0, 0, torch.float32, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _quantize_int8(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        # torch.ao's eager-mode quantization is marked deprecated in favour of torchao, but it is
        # what torch 2.13 ships for int8 CPU matmuls, and the pinned torch keeps it.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        # In place: prepare_for_cpu already holds a copy (or was told it may convert the original)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def _swap_linears(module: nn.Module, make, kind: type[nn.Module] = nn.Linear) -> None:
    """Replace every ``kind`` (exactly that type) under ``module`` by ``make(module)``."""
    for name, child in module.named_children():
        if type(child) is kind:
            setattr(module, name, make(child))
        else:
            _swap_linears(child, make, kind)


def _plain_linear(linear: Linear) -> nn.Linear:
    """``nn.Linear`` holding ``linear``'s parameters."""
    plain = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    plain.weight, plain.bias = linear.weight, linear.bias
    return plain


def fused_decoder_step(layer: DecoderLayer) -> decode_kernels.DecoderLayerStep | None:
    """``layer``'s decoding step in one C call (:class:`encdec.decode_kernels.DecoderLayerStep`), where
    its six products all have float32 panels (``None`` elsewhere: bf16, no C kernels, other layers).
    It takes as many rows as every product's panels do (all, without AVX512; one with it, where
    oneDNN's packed product is faster from two rows).
    """
    attn, cross, ff = layer.self_attn, layer.cross_attn, layer.feed_forward
    linears = (attn.in_proj, attn.out_proj, cross.q_proj, cross.out_proj, ff.w_1, ff.w_2)
    if (not all(isinstance(linear, PackedLinear) and linear.panels is not None for linear in linears)
            or ff.activation_name not in decode_kernels.ACTIVATIONS):
        return None
    norms = [sublayer.norm for sublayer in layer.sublayers]
    return decode_kernels.DecoderLayerStep(
        [(linear.panels, linear.panel_bias) for linear in linears], [(norm.weight, norm.bias) for norm in norms],
        attn.heads, ff.activation_name, layer.sublayers[0].pre_norm, norms[0].eps,
        max_rows=min(linear.panel_rows for linear in linears))


def prepare_for_cpu(model: Transformer, precision: str = "fp32", inplace: bool = False) -> Transformer:
    """An inference-only copy of ``model`` whose Linear layers are packed float32, packed bf16 or int8.

    ``precision`` is one of :data:`PRECISIONS`. The model must be on the CPU.
    ``inplace`` converts ``model`` itself instead of a copy (for a caller that has no
    other use for it). Without oneDNN (an unusual PyTorch build) the float32 version
    keeps plain Linear layers, and bf16 is refused. It also makes glibc's malloc keep
    freed large blocks for reuse (:func:`reuse_freed_memory`).
    """
    check_precision(precision)
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("CPU inference preparation needs the model on the CPU; load it with device='cpu'")
    if precision == "bf16" and not onednn_available():
        raise ValueError("bf16 decoding needs a PyTorch build with oneDNN; use fp32 or int8")
    model = (model if inplace else copy.deepcopy(model)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.decoder.layers:
        layer.cross_attn.split_projections()  # so its W_Q and [W_K; W_V] blocks are swapped too
    # The conversions below (and torch.ao's) take plain nn.Linear; Linear's products serve training.
    _swap_linears(model, _plain_linear, kind=Linear)
    if precision == "int8":
        if int8_onednn_available():
            _swap_linears(model, Int8Linear)
        else:
            model = _quantize_int8(model)
    elif onednn_available():
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        # Each feed-forward network's W_1 applies the activation to its sums (one pass less).
        for stack in (model.encoder, model.decoder):
            for ff in (m for m in stack.modules() if isinstance(m, FeedForward)):
                ff.w_1 = PackedLinear(ff.w_1, dtype=dtype, many_rows=stack is model.encoder,
                                      activation=ff.activation_name)
                ff.activation_in_w_1 = True
        # The encoder's layers and the encoder-decoder key/value projections multiply whole sources.
        _swap_linears(model.encoder, lambda linear: PackedLinear(linear, dtype=dtype, many_rows=True))
        for layer in model.decoder.layers:
            layer.cross_attn.kv_proj = PackedLinear(layer.cross_attn.kv_proj, dtype=dtype, many_rows=True)
        _swap_linears(model, lambda linear: PackedLinear(linear, dtype=dtype))
        for layer in model.decoder.layers:
            layer.fused_step = fused_decoder_step(layer)
    reuse_freed_memory()
    return model
