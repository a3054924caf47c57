"""glibc's malloc, told to keep freed large blocks: what training and decoding processes call first.

glibc serves a block above its mmap threshold (128 KiB, raised only up to 32 MiB as such blocks
are freed) with fresh ``mmap`` pages and returns freed heap tops to the system. Training and
decoding allocate the same large temporaries step after step, so with the defaults every step's
large tensors page-fault in again and are zeroed by the kernel. :func:`reuse_freed_memory` raises
both thresholds so that freed blocks stay in the heap for the next step.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# glibc's mallopt parameters (malloc.h) and the values reuse_freed_memory() sets.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 * 2 ** 20
TRIM_THRESHOLD = 2 ** 30


@functools.cache
def reuse_freed_memory() -> bool:
    """Make glibc's malloc keep freed large blocks for reuse; returns whether it did.

    Raises the mmap threshold to :data:`MMAP_THRESHOLD` and the trim threshold to
    :data:`TRIM_THRESHOLD`. The cost: up to :data:`TRIM_THRESHOLD` of freed memory stays with the
    process for reuse. Measured on a 2-core AMD EPYC (2 threads):

    - Decoding (:func:`encdec.inference.prepare_for_cpu` calls it): a step's logits of ``(rows,
      vocab)`` (20 MB for 160 beams x 32,000), feed-forward activations and cache copies. The base
      model's int8 output layer at 160 rows 12-13 -> 4.6 ms a step, as fast as alone; beam-5 batch-32
      decoding of the base model in int8 +30-40 % (749-862 -> 991-1,095 tokens/s), of the small
      model +4-6 %; greedy and batch 1 within the noise.
    - Training (:class:`encdec.train.Trainer` calls it): the base model's (32,000 x 512) embedding
      gradient, Adam's work on it, the output layer's chunks (each over 32 MiB) came as fresh pages
      every step: 226,700 page faults a step (~900 MB), 113 with this. Float32 training of the
      benchmark's base model 720 -> 817 real target tokens/s; the small model (8,000 words, its
      blocks under 32 MiB) was already at ~115 faults a step and stays as fast.

    Only on glibc, once per process, and not where the user set glibc's malloc tunables
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES``) or asked for
    glibc's defaults (``ENCDEC_MALLOC_DEFAULTS=1``). A preloaded allocator (tcmalloc, jemalloc)
    ignores it.
    """
    if os.environ.get("ENCDEC_MALLOC_DEFAULTS") == "1" or any(
            name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc (musl, macOS): its mallopt means other things
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


__all__ = ["reuse_freed_memory", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]
