"""Fast CPU inference: Linear layers swapped for pre-packed float32 or int8 versions.

Decoding multiplies a few rows (one per live hypothesis) by every weight matrix
at each step, so its speed is set by how the matrix products read the weights.
:func:`prepare_for_cpu` returns an inference-only copy of a model whose Linear
layers (attention projections, feed-forward, output layer) are replaced by

- :class:`PackedLinear`: float32 weights reordered once into oneDNN's blocked
  layout (measured 1.3-2.7x faster than ``F.linear`` for decoding's shapes on
  this project's 2-core CPU; same results up to float rounding); inputs of a
  few rows (batch-1 greedy decoding) go to ``F.linear`` on the plain weights
  instead, whose matrix-vector kernel is faster there, or
- with ``precision="bf16"``, the same packed layers holding bfloat16 weights: each
  product rounds its input to bf16 and returns float32. On CPUs with AMX or
  AVX512-BF16 (see :func:`encdec.train.bf16_is_native`) that multiplies several
  times faster than float32; elsewhere it is emulated and slow. Outputs may differ
  slightly from float32 ones (bf16 keeps 8 bits of mantissa).
- with ``precision="int8"``, int8 dynamic quantization: int8 weights with one scale per
  output row, activations quantized per call from their observed range (so
  results depend slightly on what else is in the batch), int8 products via
  fbgemm. A quarter of the weight memory and about 2x faster again.

Embeddings, layer norm and softmax stay float32.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import Transformer


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


PRECISIONS = ("fp32", "bf16", "int8")


def check_precision(precision: str) -> None:
    """Raise ``ValueError`` unless ``precision`` is one of :data:`PRECISIONS`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored in oneDNN's blocked layout for CPU matrix products.

    Inference only (no gradients, not saved). ``rows_hint`` is the number of input
    rows the layout is tuned for; any number of rows and leading dimensions work.
    ``dtype`` is the weights' and the product's precision (float32 or bfloat16);
    inputs and outputs are float32 either way.

    In float32 the plain weight is kept as well, and inputs of at most
    :attr:`FEW_ROWS` rows use it through ``F.linear`` (MKL's matrix-vector path):
    measured on a 2-thread AMX Xeon, one row times 512 x 1536 takes 32 us that way
    against 51 us packed, 1.26 against 1.53 ms for the 512 x 32000 output layer; from
    5 rows up the packed product is as fast or faster (1.7x at 32 rows). The cost is
    a second copy of the float32 weights.
    """

    FEW_ROWS = 4

    def __init__(self, linear: nn.Linear, rows_hint: int = 32, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        weight = linear.weight.detach().to(dtype)
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, rows_hint)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype).clone()
        self.weight = weight if dtype == torch.float32 else None  # for inputs of few rows

    def forward(self, x: Tensor) -> Tensor:
        """``(..., in_features)`` -> ``(..., out_features)``."""
        if self.weight is not None and x.dtype == torch.float32 and x.numel() <= self.FEW_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed_weight, self.bias, "none", [], "")
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}")


def _quantize_int8(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        # torch.ao's eager-mode quantization is marked deprecated in favour of torchao, but it is
        # what torch 2.13 ships for int8 CPU matmuls, and the pinned torch keeps it.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        # In place: prepare_for_cpu already holds a copy (or was told it may convert the original)
        return quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)


def _pack(module: nn.Module, dtype: torch.dtype) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Linear:
            setattr(module, name, PackedLinear(child, dtype=dtype))
        else:
            _pack(child, dtype)


def prepare_for_cpu(model: Transformer, precision: str = "fp32", inplace: bool = False) -> Transformer:
    """An inference-only copy of ``model`` whose Linear layers are packed float32, packed bf16 or int8.

    ``precision`` is one of :data:`PRECISIONS`. The model must be on the CPU.
    ``inplace`` converts ``model`` itself instead of a copy (for a caller that has no
    other use for it). Without oneDNN (an unusual PyTorch build) the float32 version
    keeps plain Linear layers, and bf16 is refused.
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
    if precision == "int8":
        return _quantize_int8(model)
    if onednn_available():
        _pack(model, torch.bfloat16 if precision == "bf16" else torch.float32)
    return model
