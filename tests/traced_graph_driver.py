"""Traces fastpool under torch.compile with real (not interpreted) Triton kernels, on a machine without a GPU,
and prints what the compiled graphs call, as JSON (run by tests/test_traced_ops.py in a subprocess).

Nothing launches: a stub Triton driver names an sm_90 target (enough to compile kernels to the IR that
torch's triton_op tracing reads), CPU tensors stand in for CUDA ones, and the captured graphs run on fake
tensors. What this checks is the trace: the forward and backward graphs hold the kernels' launches
(``triton_kernel_wrapper_functional``) and no opaque ``fastpool`` op.
"""

import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402


class TraceOnlyDriver(DriverBase):
    """Enough of a CUDA driver to compile kernels for sm_90; launches nothing."""

    @classmethod
    def is_active(cls):
        return True

    def __init__(self):
        pass

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cuda", 0)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def set_current_device(self, device):
        pass

    def get_benchmarker(self):
        raise NotImplementedError

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty):
        return ty


triton.runtime.driver.set_active(TraceOnlyDriver())

import fastpool  # noqa: E402
import fastpool.backend  # noqa: E402
from fastpool import ops, ops_triton  # noqa: E402

# CPU tensors stand in for CUDA tensors (nothing runs on them).
fastpool.backend.triton_interpreter_enabled = lambda: True

graphs: list[str] = []


def capture(gm, example_inputs):
    graphs.append(gm.code)

    def run_on_fakes(*args):
        with FakeTensorMode(allow_non_fake_inputs=True):
            return gm(*args)

    return run_on_fakes


def calls(code: str) -> dict[str, int]:
    """How often a graph calls each fastpool op and higher-order op (kernel launches)."""
    counts: dict[str, int] = {}
    for name in re.findall(r"torch\.ops\.((?:fastpool|higher_order)\.[A-Za-z_]+)(?:\.default)?\(", code):
        counts[name] = counts.get(name, 0) + 1
    return counts


def trace(fn, *args, backward: bool, dynamic: bool = False) -> dict:
    graphs.clear()
    torch._dynamo.reset()
    compiled = torch.compile(
        fn, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture), fullgraph=True, dynamic=dynamic
    )
    out = compiled(*args)
    if backward:
        out.float().sum().backward()
    return {"graphs": [calls(code) for code in graphs]}


def main() -> int:
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(2, 600, 8, generator=gen, requires_grad=True)
    m = torch.ones(2, 600, dtype=torch.int64)
    w = torch.rand(2, 600, generator=gen, requires_grad=True)
    packed = torch.randn(700, 8, generator=gen, requires_grad=True)
    cu = torch.tensor([0, 300, 700], dtype=torch.int32)
    result = {"enabled": ops_triton.ENABLED}
    with fastpool.use_backend("triton"):
        result["padded"] = trace(lambda h, m: fastpool.pool(h, m, mode=["mean", "max"]), h, m, backward=True)
        result["weights_normalize"] = trace(
            lambda h, m, w: fastpool.pool(h, m, mode="weighted_mean", weights=w, normalize=True), h, m, w,
            backward=True,
        )  # fmt: skip
        # On CUDA with max_seqlen the offsets' values are trusted (the kernels clamp them); CPU tensors
        # stand in here, so the ops layer is called as fastpool.pool calls it for such a batch.
        result["packed"] = trace(
            lambda x, cu: ops.packed_pool_forward(x, cu, None, "mean,last", "triton", 400)[0], packed, cu,
            backward=True,
        )  # fmt: skip
        result["packed_checked"] = trace(
            lambda x, cu: fastpool.pool(x, cu_seqlens=cu, mode="mean"), packed, cu, backward=False
        )
        result["inference_dynamic"] = trace(
            lambda h, m: fastpool.pool(h, m, mode="max"), h.detach(), m, backward=False, dynamic=True
        )
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
