"""Shared helpers of the test suite: masks of every layout, kernel configurations, conversions."""

import contextlib

import pytest
import torch

from fastpool import launch

# Small blocks make interpreter-sized shapes cross several feature blocks, token blocks and
# T-splits; "default" uses the launcher's own choice.
KERNEL_CONFIGS = {
    "default": {},
    # One program per (row, feature block), folding several chunks in registers.
    "small-blocks": dict(block_t=4, block_d=16, scan_block=8, chunk=8, lanes=2, chunks_per_program=1 << 20),
    # One program per chunk: partials folded by the last program of each row (tickets).
    "split-T": dict(block_t=4, block_d=16, scan_block=8, chunk=8, lanes=2, chunks_per_program=1),
}
MASK_KINDS = ("none", "ones", "right", "left", "holes", "empty-row")


@contextlib.contextmanager
def kernel_config(name: str):
    with launch.config_override(**KERNEL_CONFIGS[name]):
        yield


def make_mask(kind: str, B: int, T: int, generator: torch.Generator) -> torch.Tensor | None:
    """A (B, T) bool mask of one layout: none, ones, right, left, holes, or empty-row."""
    if kind == "none":
        return None
    if kind == "ones":
        return torch.ones(B, T, dtype=torch.bool)
    lengths = torch.randint(0, T + 1, (B,), generator=generator)
    if B > 0:
        lengths[0] = T
    if B > 1:
        lengths[1] = min(1, T)
    pos = torch.arange(T)
    if kind == "right":
        return pos[None, :] < lengths[:, None]
    if kind == "left":
        return pos[None, :] >= (T - lengths)[:, None]
    if kind == "holes":
        return torch.rand(B, T, generator=generator) < 0.6
    if kind == "empty-row":
        mask = torch.rand(B, T, generator=generator) < 0.7
        if B > 0:
            mask[B // 2] = False
        return mask
    raise ValueError(kind)


def to_numpy(x: torch.Tensor | None):
    return (
        None
        if x is None
        else x.detach().cpu().to(torch.float64 if x.is_floating_point() else x.dtype).numpy()
    )


def np_mask(mask: torch.Tensor | None):
    if mask is None:
        return None
    return mask.detach().cpu().to(torch.float64).numpy()


def assert_clear_error(argument: str, error: type, call) -> None:
    """``call()`` raises ``error`` with a message that starts with the argument's name and says
    what was expected and what was got."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    assert message.startswith(f"{argument}:"), message
    assert "expected" in message and "got" in message, message
