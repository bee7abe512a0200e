"""Triton kernels of demul_fast, installed as ``demul_fast.kernels``.

Kernels only: no autograd, no modules (those live in demul_fast). See docs/SPEC.md section 4.
"""
