"""Triton kernels of fastpool (installed as ``fastpool.kernels``).

Only ``@triton.jit`` kernels and the device helpers they share live here: no autograd, no
validation, no allocation. Launchers are in ``fastpool.launchers``.
"""
