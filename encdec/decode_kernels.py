"""Decoding's small steps in C: one-query attention over a KV cache, and products of a few rows.

A decoding step attends from one new position per hypothesis to every cached key and value,
``2 x layers`` times a step. As PyTorch ops that is two batched products of one-row matrices (MKL
runs each (row, head) as its own matrix-vector product), a scale, a mask and a softmax: calls with
temporaries of their own, small enough that their fixed costs dominate. :func:`attend_one` does
the same in one pass per (sentence, head), over the cache's buffers in place.

At batch 1 each of the step's products has one row (five with beams): :func:`linear_few_rows`
multiplies them from :class:`~encdec.inference.PackedLinear`'s column blocks, keeping each row's
sums for 16 outputs in registers while the weights stream by (PyTorch's batched product of the
blocks, or oneDNN's packed product, pay tens of microseconds a call: 2 threads, AVX2 EPYC, 5 rows,
256 x 768 24 us against 57-69, 1024 x 256 41 against 81-91).

Both are in ``encdec/_decode_kernels.c``, share the (sentence, head) pairs or the blocks among
PyTorch's threads (OpenMP), and are built at install like :mod:`encdec.mkl`'s shim (optional:
without a C compiler there is no library, and both functions return ``None`` so callers keep the
PyTorch ops); ``ENCDEC_DECODE_KERNELS=0`` turns them off. Float32 on the CPU without gradients
only. Results equal PyTorch's up to float rounding (they sum in another order). Measured on whole
searches (paired, small model, AVX2 EPYC): the attention +13 % tokens/s for batch-32 greedy (10 of
10) and +7 % for beam 5 (7 of 8); the few-row products +10 % for beam 5 at batch 1 (6 of 8),
+1.5 % for greedy at batch 1 (6 of 10).
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
_LINEAR_ARGS = (_ptr, _long, _long, _ptr, _long, _long, _long, _ptr, _ptr, _long, _long)


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
    library.encdec_linear_few_rows.argtypes, library.encdec_linear_few_rows.restype = _LINEAR_ARGS, None
    return library


_library = _load()
_attend_kernel = None if _library is None else _library.encdec_attend_one
_linear_kernel = None if _library is None else _library.encdec_linear_few_rows


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


def linear_few_rows(x: Tensor, blocks: Tensor, block_bias: Tensor | None, out_features: int) -> Tensor | None:
    """``x W^T + b`` for a few rows from ``W^T`` in column blocks: ``(rows, in)`` -> ``(rows, out_features)``.

    Any number of rows works; up to ~16 it beats oneDNN's packed product for matrices that fit the
    CPU's caches (2 threads, AVX2 EPYC, 16 rows: 256 x 256 31 against 60 us, 1024 x 256 102
    against 154), from 32 rows it does not (:data:`encdec.inference.FEW_ROWS` draws the line).

    ``x``: float32, last dimension contiguous; ``blocks``: ``(n_blocks, in, width)`` contiguous, and
    ``block_bias`` ``(n_blocks, 1, width)`` or ``None``, as :func:`encdec.inference.column_blocks`
    makes them. Each thread takes a block: together they stream the weights at the memory's
    multi-core rate. Returns ``None`` where the kernel is not loaded (the caller multiplies with
    PyTorch).
    """
    if _linear_kernel is None or x.dim() != 2 or x.stride(1) != 1 or x.dtype != _FLOAT32:
        return None
    rows, (n_blocks, width) = x.size(0), (blocks.size(0), blocks.size(2))
    y = torch.empty(rows, out_features)
    _linear_kernel(x.data_ptr(), x.stride(0), rows, blocks.data_ptr(), n_blocks, blocks.size(1), width,
                   None if block_bias is None else block_bias.data_ptr(), y.data_ptr(), out_features,
                   torch.get_num_threads())
    return y
