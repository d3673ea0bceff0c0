"""Triton kernels of fastpool (installed as ``fastpool.kernels``).

Only ``@triton.jit`` kernels and the device helpers they share live here: no autograd, no
validation, no allocation. Launchers are in ``fastpool.launchers``.

Every launcher imports its kernels from here, so importing this package is the Triton backend's
first use: it checks the installed triton first (a ``RuntimeError`` naming the supported releases
when it is too old, see ``fastpool._triton_version``).
"""

from fastpool._triton_version import require_supported_triton

require_supported_triton()
