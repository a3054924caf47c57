"""Decoding's small steps in C: one-query attention over a KV cache, and the steps' matrix products.

A decoding step attends from one new position per hypothesis to every cached key and value,
``2 x layers`` times a step. As PyTorch ops that is two batched products of one-row matrices (MKL
runs each (row, head) as its own matrix-vector product), a scale, a mask and a softmax: calls with
temporaries of their own, small enough that their fixed costs dominate. :func:`attend_one` does
the same in one pass per (sentence, head), over the cache's buffers in place.

Each of a step's products multiplies one row per live hypothesis (1 to a few hundred) by a weight
matrix. oneDNN's packed product pays a fixed 30-45 us a call on CPUs without AVX512 and runs one
row on one core (as does MKL's matrix-vector product). :func:`linear` multiplies from the weights
laid out for it by :func:`column_panels` (``W^T`` in panels of 16 output columns, each contiguous),
a tile of 6 rows x 16 columns at a time with its sums in registers, the threads taking equal runs
of panels (2 threads, AVX2 EPYC, alone, us, oneDNN packed / this: 256 x 768 at 1 row 40 / 12, 32
rows 130 / 94, 160 rows 455 / 446; 1024 x 256 at 32 rows 165 / 118; 512 x 2048 at 5 rows 143 /
88; 2048 x 512 at 1 row 86 / 48; 256 x 8000 at 32 rows 1,111 / 1,069).

Both are in ``encdec/_decode_kernels.c``, share the (sentence, head) pairs or the panels among
PyTorch's threads (OpenMP), and are built at install like :mod:`encdec.mkl`'s shim (optional:
without a C compiler there is no library, and both functions return ``None`` so callers keep the
PyTorch ops); ``ENCDEC_DECODE_KERNELS=0`` turns them off. Float32 on the CPU without gradients
only. Results equal PyTorch's up to float rounding (they sum in another order). Measured on whole
searches (paired, AVX2 EPYC): the attention +13 % tokens/s for the small model's batch-32 greedy
(10 of 10) and +7 % for beam 5 (7 of 8); the products (against oneDNN's packed product and the
few-row kernel before them), small / base model: greedy batch 32 +22 / +13 %, beam 5 batch 32
+4 / +6 %, greedy batch 1 +32 / +28 %, beam 5 batch 1 +36 / +38 %, the same tokens.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

import torch
from torch import Tensor

ENV_SWITCH = "ENCDEC_DECODE_KERNELS"

_FLOAT32 = torch.float32
_long, _ptr = ctypes.c_long, ctypes.c_void_p
# The C functions' parameters, in order (see encdec/_decode_kernels.c).
_ATTEND_ARGS = (_ptr, _long, _long, _ptr, _ptr, _long, _long, _long, _ptr, _long, _ptr, _long, _long, _long, _long,
                _long, ctypes.c_float, _long)
_LINEAR_ARGS = (_ptr, _long, _long, _ptr, _long, _long, _ptr, _ptr, _long, _long)
PANEL = 16  # output columns a panel (encdec/_decode_kernels.c's PANEL)


def _load() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    spec = importlib.util.find_spec("encdec._decode_kernels")
    if spec is None or spec.origin is None:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    library.encdec_attend_one.argtypes, library.encdec_attend_one.restype = _ATTEND_ARGS, ctypes.c_int
    library.encdec_linear.argtypes, library.encdec_linear.restype = _LINEAR_ARGS, None
    return library


_library = _load()
_attend_kernel = None if _library is None else _library.encdec_attend_one
_linear_kernel = None if _library is None else _library.encdec_linear


def available() -> bool:
    """Whether the compiled kernels are loaded (built at install, not switched off)."""
    return _attend_kernel is not None


def attend_one(q: Tensor, k: Tensor, v: Tensor, length: int, allowed: Tensor | None = None) -> Tensor | None:
    """``softmax(q K^T / sqrt(head_dim)) V`` for one query per (row, head), from cache buffers.

    Args:
        q: ``(rows, heads, head_dim)`` float32 queries, last dimension contiguous (any row and head
            strides: a view into a fused projection's output will do).
        k, v: a cache's position-major buffers ``(capacity, sentences, heads, head_dim)``, the same
            strides for both, last dimension contiguous; the first ``length`` positions are attended.
            ``rows`` is a multiple of ``sentences``: each sentence's ``rows / sentences`` beams are
            consecutive rows and attend to its keys and values.
        allowed: ``(sentences, length)`` bool, ``False`` where a key is masked (padding); or ``None``.
    Returns:
        ``(rows, heads, head_dim)``, or ``None`` where the kernel does not apply (not built, not
        float32 on the CPU, gradients wanted, other layouts): the caller then uses PyTorch ops.
    """
    if (_attend_kernel is None or q.dtype != _FLOAT32 or k.dtype != _FLOAT32 or q.requires_grad
            or q.device.type != "cpu"):
        return None
    (rows, heads, dim), (capacity, sentences, *_), q_strides, kv_strides = q.shape, k.shape, q.stride(), k.stride()
    if (q_strides[2] != 1 or kv_strides[3] != 1 or v.stride() != kv_strides or k.shape[2:] != (heads, dim)
            or rows % sentences or not 0 < length <= capacity or k.requires_grad or v.requires_grad):
        return None
    mask_pointer, mask_stride = None, 0
    if allowed is not None:
        if allowed.dtype != torch.bool or allowed.stride(1) != 1 or allowed.shape != (sentences, length):
            return None
        mask_pointer, mask_stride = allowed.data_ptr(), allowed.stride(0)
    out = torch.empty(rows, heads, dim)
    failed = _attend_kernel(q.data_ptr(), q_strides[0], q_strides[1], k.data_ptr(), v.data_ptr(), *kv_strides[:3],
                            mask_pointer, mask_stride, out.data_ptr(), sentences, rows // sentences, heads, dim,
                            length, dim ** -0.5, torch.get_num_threads())
    return None if failed else out


def column_panels(weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """An ``(out, in)`` float32 ``weight`` as :func:`linear` reads it: ``W^T`` cut into panels of
    :data:`PANEL` output columns, ``(ceil(out / PANEL), in, PANEL)``, contiguous, the last panel
    padded with zero columns; and the bias zero-padded likewise to ``(ceil(out / PANEL) * PANEL,)``,
    or ``None``. The same memory as the weight (plus the padding)."""
    (out, width), n_panels = weight.shape, -(-weight.size(0) // PANEL)
    padded = weight.new_zeros(n_panels * PANEL, width)
    padded[:out] = weight
    panels = padded.view(n_panels, PANEL, width).transpose(1, 2).contiguous()
    if bias is None:
        return panels, None
    padded_bias = bias.new_zeros(padded.size(0))
    padded_bias[:out] = bias
    return panels, padded_bias


def linear(x: Tensor, panels: Tensor, panel_bias: Tensor | None, out_features: int) -> Tensor | None:
    """``x W^T + b`` from :func:`column_panels`' layout: ``(rows, in)`` -> ``(rows, out_features)``.

    ``x``: float32, last dimension contiguous, any number of rows; no gradients flow through the
    product. Returns ``None`` where the kernel is not loaded, or for other dtypes and layouts (the
    caller multiplies with PyTorch).
    """
    if _linear_kernel is None or x.dim() != 2 or x.stride(1) != 1 or x.dtype != _FLOAT32:
        return None
    y = torch.empty(x.size(0), out_features)
    _linear_kernel(x.data_ptr(), x.stride(0), x.size(0), panels.data_ptr(), panels.size(0), panels.size(1),
                   None if panel_bias is None else panel_bias.data_ptr(), y.data_ptr(), out_features,
                   torch.get_num_threads())
    return y
