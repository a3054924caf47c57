"""Builds encdec's compiled pieces; the rest is in pyproject.toml.

- ``encdec._mkl_intel_path``: the MKL code-path shim (encdec/mkl.py);
- ``encdec._decode_kernels``: decoding's one-query attention, products and fused decoder-layer step
  (encdec/decode_kernels.py).

Both are plain C loaded with ctypes, not Python modules. ``optional=True``: without a C compiler the
install still succeeds; MKL then keeps its default path and decoding attends with PyTorch ops.
"""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("encdec._mkl_intel_path", ["encdec/_mkl_intel_path.c"], optional=True),
    # OpenMP: the library needs libgomp.so.1, which resolves to the copy PyTorch has already loaded.
    # -fno-trapping-math: without it GCC keeps the selects in exp_float (softmax, swish) as branches
    # on AVX2 (computing both sides could raise a floating-point exception nobody reads), and those
    # loops stay scalar; AVX512's masks vectorize them either way. Results do not change.
    Extension("encdec._decode_kernels", ["encdec/_decode_kernels.c", "encdec/_decoder_layer.c"],
              depends=["encdec/_decode_kernels.h"], extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"],
              extra_link_args=["-fopenmp"], optional=True),
])
