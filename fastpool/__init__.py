"""fastpool: fused masked pooling (mean, max, CLS, last token) of transformer hidden states.

``import fastpool`` works without triton and without a GPU; CUDA tensors use the Triton kernels,
everything else eager PyTorch with the same semantics (see ``fastpool.functional``).
"""

from . import nn
from .attention import attention_pool
from .backend import use_backend
from .functional import cls_pool, last_token_pool, max_pool, mean_pool, pool, weighted_mean_pool
from .global_pool import global_pool
from .modes import MODES
from .partial import PoolState, merge, pool_partial

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "PoolState",
    "__version__",
    "attention_pool",
    "cls_pool",
    "global_pool",
    "last_token_pool",
    "max_pool",
    "mean_pool",
    "merge",
    "nn",
    "pool",
    "pool_partial",
    "use_backend",
    "weighted_mean_pool",
]
