"""Property-based tests: random shapes, masks, dtypes and modes against the oracle."""

import oracle
import torch
from helpers import kernel_config, np_mask, to_numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tolerances import for_mode

import fastpool

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int32, torch.int64, torch.float32, torch.float16]


@st.composite
def cases(draw):
    B = draw(st.integers(0, 4))
    T = draw(st.integers(0, 12))
    d = draw(st.integers(0, 20))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, d, generator=gen).to(dtype)
    use_mask = draw(st.booleans())
    mask = None
    if use_mask:
        bits = draw(st.lists(st.booleans(), min_size=B * T, max_size=B * T))
        mask = torch.tensor(bits, dtype=torch.bool).reshape(B, T).to(draw(st.sampled_from(MASK_DTYPES)))
    modes = draw(st.lists(st.sampled_from(fastpool.MODES), min_size=1, max_size=4, unique=True))
    return hidden, mask, modes


def check(hidden, mask, modes, device):
    hidden, mask = hidden.to(device), None if mask is None else mask.to(device)
    out = fastpool.pool(hidden, mask, mode=modes)
    d = hidden.shape[2]
    for i, mode in enumerate(modes):
        expected = torch.from_numpy(oracle.pool(to_numpy(hidden), np_mask(mask), mode)).to(hidden.dtype)
        torch.testing.assert_close(
            out[:, i * d : (i + 1) * d].cpu(), expected, **for_mode(mode, hidden.dtype)
        )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases())
def test_eager_backend_matches_oracle(device, case):
    with fastpool.use_backend("torch"):
        check(*case, device)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(case=cases(), per_program=st.sampled_from([1, 2, 1 << 20]))
def test_triton_backend_matches_oracle(device, case, per_program):
    with fastpool.use_backend("triton"), kernel_config("small-blocks"):
        from fastpool import launch

        with launch.config_override(chunks_per_program=per_program):
            check(*case, device)
