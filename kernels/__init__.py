"""Triton kernels, installed as ``vexport.kernels`` (a top-level ``kernels`` package would collide with a PyPI package)."""
