"""Decoding's attention step in C: one query per (row, head) against a :class:`~encdec.attention.KVCache`.

A decoding step attends from one new position per hypothesis to every cached key and value,
``2 x layers`` times a step. As PyTorch ops that is two batched products of one-row matrices (MKL
runs each (row, head) as its own matrix-vector product), a scale, a mask and a softmax: calls with
temporaries of their own, small enough that their fixed costs dominate.
``encdec/_decode_attention.c`` does the same in one pass per (sentence, head), over the cache's
buffers in place, sharing the (sentence, head) pairs among PyTorch's threads (OpenMP).

It is built at install like :mod:`encdec.mkl`'s shim (optional: without a C compiler there is no
library, and :func:`attend_one` returns ``None`` so callers keep the PyTorch ops);
``ENCDEC_DECODE_KERNEL=0`` turns it off. Float32 on the CPU without gradients only. Results equal
:func:`encdec.attention.scaled_dot_product`'s up to float rounding (it sums in another order).
"""
from __future__ import annotations

import ctypes
import importlib.util
import os

import torch
from torch import Tensor

ENV_SWITCH = "ENCDEC_DECODE_KERNEL"

_FLOAT32 = torch.float32
_long, _ptr = ctypes.c_long, ctypes.c_void_p
_SIGNATURE = (_ptr, _long, _long, _ptr, _ptr, _long, _long, _long, _ptr, _long, _ptr, _long, _long, _long, _long,
              _long, ctypes.c_float)


def _load() -> ctypes.CDLL | None:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    spec = importlib.util.find_spec("encdec._decode_attention")
    if spec is None or spec.origin is None:
        return None
    try:
        library = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    function = library.encdec_attend_one
    function.argtypes, function.restype = _SIGNATURE, ctypes.c_int
    return library


_library = _load()
_kernel = None if _library is None else _library.encdec_attend_one


def available() -> bool:
    """Whether the compiled kernel is loaded (built at install, not switched off)."""
    return _kernel is not None


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
    if _kernel is None or q.dtype != _FLOAT32 or k.dtype != _FLOAT32 or q.requires_grad or q.device.type != "cpu":
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
    failed = _kernel(q.data_ptr(), q_strides[0], q_strides[1], k.data_ptr(), v.data_ptr(), *kv_strides[:3],
                     mask_pointer, mask_stride, out.data_ptr(), sentences, rows // sentences, heads, dim, length,
                     dim ** -0.5)
    return None if failed else out
