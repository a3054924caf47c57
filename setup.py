"""Builds encdec's one compiled piece, the MKL code-path shim (encdec/mkl.py); the rest is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds, and MKL keeps its default path.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("encdec._mkl_intel_path", ["encdec/_mkl_intel_path.c"], optional=True)])
