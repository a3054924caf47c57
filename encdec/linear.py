"""Linear layers whose float32 CPU matrix products run through oneDNN where it beats the BLAS.

PyTorch multiplies float32 matrices on a CPU with its BLAS (MKL in the x86 wheels), and MKL takes
its AVX2 code on AMD processors even where they have AVX512, unless :mod:`encdec.mkl` has put it on
its AVX512 path (``import encdec`` before ``torch``). On this project's 2-core AMD EPYC (AVX512, no
AMX) a 2048 x 2048 product runs at ~195 GFLOP/s through ``torch.mm`` on MKL's default path, ~455
through oneDNN, which the same wheels carry (decoding packs its weights for it:
:mod:`encdec.inference`), and ~480-506 through MKL's AVX512 path. Here training's products take
oneDNN where :func:`onednn_beats_blas` finds it clearly faster on the machine (there: MKL on its
default path), and the BLAS elsewhere (MKL on its AVX512 path, and on Intel CPUs). Results equal
``F.linear``'s up to float rounding: the sums run in another order.

- :func:`linear`: ``F.linear`` with autograd, oneDNN in the forward and backward products;
  :class:`Linear` is ``nn.Linear`` calling it (same parameters, same state dict).
- :func:`product` (``x @ weight.T + bias``) and :func:`product_tn` (``a.T @ b``): the same choice
  for code that forms its gradients itself (the fused output layer and loss, :mod:`encdec.loss`).
- :func:`bound_onednn_caches`: what a training process calls first, so that oneDNN's caches do not
  grow its memory by a few MB for every new batch shape.
"""
from __future__ import annotations

import functools
import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable


def onednn_available() -> bool:
    """Whether this PyTorch build has oneDNN and its linear operator."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


# Entries a training process lets each of oneDNN's caches keep (see bound_onednn_caches).
TRAINING_CACHE_ENTRIES = 16


def bound_onednn_caches(entries: int = TRAINING_CACHE_ENTRIES) -> None:
    """Cap oneDNN's primitive cache and PyTorch's cache of oneDNN computations (ideep's) at
    ``entries`` each, unless the user set them (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``,
    ``LRU_CACHE_CAPACITY``). Both read the variables at the process's first oneDNN product, so a
    training process calls this before it multiplies anything; later calls change nothing.

    Both keep up to 1,024 entries by default, one per product shape, and an entry for a product of
    4,096 rows holds a few MB. Training batches differ in shape (their row count is sentences x
    padded length), so with the defaults a training's memory grew with every new shape: the
    benchmark's small model in float32 930 MB through MKL, 1.37 -> 2.46 GB over 60 steps through
    oneDNN, in bf16 autocast (oneDNN's too) 1.33 -> 2.37 GB; with 16 entries 0.93-1.0 and 0.74-0.87
    GB throughout, and as fast or faster. Decoding wants the defaults (its row counts
    repeat from batch to batch; greedy batch 32 lost ~8 % with 16 or 64 entries), so only training
    calls this.
    """
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))


def _onednn_product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` through oneDNN: ``x`` ``(rows, in)``, ``weight`` ``(out, in)``, any
    strides (oneDNN reads a transposed weight in place; a strided ``x`` is copied)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# Rounds of the probe below: each times both libraries once, alternating.
PROBE_ROUNDS = 5


@functools.cache
def onednn_beats_blas() -> bool:
    """Whether oneDNN's float32 product is clearly faster than the BLAS's on this CPU.

    Measured once per process, at the thread count of the time (~50 ms): (1024 x 512) by
    (512 x 1024), each library's best of :data:`PROBE_ROUNDS` calls; oneDNN must take under 80 %
    of the BLAS's time, so machines where the two are about even keep the BLAS and do not flip
    between runs. The rounds alternate the libraries, so a slow spell of the machine (a shared VM
    losing its CPU for a few ms) cannot spoil all of one library's calls: timed back to back, three
    calls each, one profiling run of the base model on this VM got the BLAS and trained at ~60 % of
    its speed. On the 2-core AVX512 EPYC against MKL's default (AVX2) path: 2.2x for forward and
    input-gradient products, 1.2-1.9x for weight gradients (their transposed operand is copied).
    Against MKL's AVX512 path (:mod:`encdec.mkl`) oneDNN is slower, and the BLAS is kept: whole
    training steps of the small benchmark model ran 0.87x as fast with every product on oneDNN.
    """
    if not onednn_available():
        return False
    g = torch.Generator().manual_seed(0)  # its own: the probe must not move the caller's random stream
    x, weight = torch.randn(1024, 512, generator=g), torch.randn(1024, 512, generator=g)
    libraries = {"onednn": lambda: _onednn_product(x, weight), "blas": lambda: F.linear(x, weight)}
    try:
        libraries["onednn"]()  # the first call also builds oneDNN's kernel
    except RuntimeError:  # an oneDNN build that cannot run float32 here
        return False
    libraries["blas"]()
    best = dict.fromkeys(libraries, float("inf"))
    for _ in range(PROBE_ROUNDS):
        for name, multiply in libraries.items():
            start = time.perf_counter()
            multiply()
            best[name] = min(best[name], time.perf_counter() - start)
    return best["onednn"] < 0.8 * best["blas"]


def uses_onednn(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`linear` and :func:`product` multiply ``x`` by ``weight`` through oneDNN."""
    return (x.device.type == "cpu" and x.dtype == weight.dtype == torch.float32 and x.numel() > 0
            and not torch.is_autocast_enabled("cpu") and onednn_beats_blas())


def product(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T (+ bias)`` without autograd: ``(rows, in)``, ``(out, in)`` -> ``(rows, out)``."""
    if uses_onednn(x, weight):
        return _onednn_product(x, weight, bias)
    return F.linear(x, weight, bias)


def product_tn(a: Tensor, b: Tensor) -> Tensor:
    """``a.T @ b`` without autograd: ``(rows, m)``, ``(rows, n)`` -> ``(m, n)`` (a weight gradient).

    Through oneDNN, whose input must be contiguous: the operand with fewer columns is the one
    transposed and copied, and the result may be a transposed view.
    """
    if not uses_onednn(a, b):
        return a.t() @ b
    if a.size(1) <= b.size(1):
        return _onednn_product(a.t(), b.t())
    return _onednn_product(b.t(), a.t()).t()


class _OneDNNLinear(torch.autograd.Function):
    """``F.linear`` with oneDNN's products for the output and both gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, x.size(-1))
        ctx.save_for_backward(rows, weight)
        ctx.input_shape = x.shape
        return _onednn_product(rows, weight, bias).view(*x.shape[:-1], weight.size(0))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        rows, weight = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.size(-1))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _onednn_product(grad_rows, weight.t()).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_weight = product_tn(grad_rows, rows)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_rows.sum(0)
        return grad_x, grad_weight, grad_bias


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``: ``(..., in)`` -> ``(..., out)``, through oneDNN where it is faster."""
    if uses_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose products go through :func:`linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
