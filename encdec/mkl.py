"""MKL's AVX512 code on AMD processors: what ``import encdec`` does before it imports PyTorch.

PyTorch's x86 wheels multiply float32 matrices with Intel MKL (``torch.mm``, ``F.linear``,
``bmm``, the CPU flash-attention kernel's block products), and MKL chooses its code path by the
CPU's vendor as well as its features: on an AMD processor it runs its AVX2 code even where the CPU
has AVX512. MKL asks one exported function, ``mkl_serv_intel_cpu_true``, whether the CPU is Intel's;
:func:`enable_avx512` loads a definition of it that answers yes (``encdec/_mkl_intel_path.c``, built
at install) into the process's global symbol scope, where libtorch_cpu.so's call finds it when
PyTorch is loaded. MKL then picks among its paths by the CPU's feature flags, as on an Intel CPU.

On the 2-core AMD EPYC (Zen 4: AVX512, AVX512-BF16, no AMX) this project measures on, 2 threads:
``torch.mm`` of 2048 x 2048 215 -> 506 GFLOP/s (oneDNN's product, which training used instead,
~458); attention's batched ``(268, 61, 64) @ (268, 64, 61)`` 140 -> 426. Whole training steps of
``benchmarks/speed.py``'s models, products on MKL's AVX512 path against oneDNN: small +15 to +23 %
(two paired same-batch A/Bs, 8 of 8 rounds each), base +8 to +11 % (separate processes).

It works only if it runs before PyTorch is loaded (PyTorch binds the function at import), so
``encdec/__init__.py`` calls it first; a program that imports ``torch`` before ``encdec`` keeps
MKL's default path (:func:`status` says so). It applies to AMD CPUs with AVX512 on Linux x86-64;
``ENCDEC_MKL_AVX512=0`` turns it off. Results equal the default path's up to float rounding.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys

ENV_SWITCH = "ENCDEC_MKL_AVX512"

_shim: ctypes.CDLL | None = None
_reason = "not attempted"


def _cpu() -> tuple[str, set[str]]:
    """The first processor's vendor id and feature flags, from ``/proc/cpuinfo``."""
    vendor, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return vendor, flags


def _why_not() -> str | None:
    """Why this process should keep MKL's default path, or None if it should not."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return f"{ENV_SWITCH}=0"
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "not Linux on x86-64"
    vendor, flags = _cpu()
    if vendor != "AuthenticAMD":
        return f"CPU vendor {vendor or 'unknown'} (MKL's own choice is right there)"
    if "avx512f" not in flags:
        return "the CPU has no AVX512"
    if "torch" in sys.modules:
        return "torch was imported before encdec"
    return None


def enable_avx512() -> bool:
    """Let MKL run its AVX512 code on this AMD CPU; returns whether the shim is loaded.

    Must run before ``import torch``; a no-op (False) after it, on other CPUs and systems, with
    ``ENCDEC_MKL_AVX512=0``, or where the shim was not built (no C compiler at install).
    """
    global _shim, _reason
    if _shim is not None:
        return True
    reason = _why_not()
    if reason is not None:
        _reason = reason
        return False
    spec = importlib.util.find_spec(f"{__package__}._mkl_intel_path")  # finds the built file, loads nothing
    if spec is None or not spec.origin:
        _reason = "the shim was not built (no C compiler when encdec was installed)"
        return False
    try:  # global scope: libtorch_cpu.so, loaded later, binds MKL's call to it
        shim = ctypes.CDLL(spec.origin, mode=os.RTLD_GLOBAL)
    except OSError as error:
        _reason = f"the shim did not load: {error}"
        return False
    shim.encdec_mkl_consulted.restype = ctypes.c_long
    _shim, _reason = shim, "on"
    return True


def enabled() -> bool:
    """Whether the shim is loaded (MKL then runs its AVX512 code in this process)."""
    return _shim is not None


def consulted() -> int:
    """How many times MKL has asked the shim about the CPU (0 if it is not loaded or not yet asked)."""
    return int(_shim.encdec_mkl_consulted()) if _shim is not None else 0


def status() -> str:
    """One line for logs: whether MKL runs its AVX512 code through the shim, and if not, why."""
    if _shim is not None:
        return "MKL AVX512 path on AMD: on"
    return f"MKL AVX512 path on AMD: off ({_reason})"
