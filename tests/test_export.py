"""torch.export with dynamic batch, length and token dimensions (issue 12 item 9).

The size-limit checks must not become shape guards (``Constraints violated``); they still hold at
run time, inside the ops, on the concrete sizes.
"""

import pytest
import torch
from helpers import make_mask
from torch.export import Dim

import fastpool

MODES = ["mean", "max", "cls", "last", "mean_sqrt_len", "weighted_mean"]


class Padded(torch.nn.Module):
    def __init__(self, normalize: bool):
        super().__init__()
        self.normalize = normalize

    def forward(self, hidden, mask):
        return fastpool.pool(hidden, mask, mode=MODES, normalize=self.normalize)


class Unmasked(torch.nn.Module):
    def forward(self, hidden):
        values, index = fastpool.max_pool(hidden, return_indices=True)
        return values, index, fastpool.mean_pool(hidden)


class Packed(torch.nn.Module):
    def forward(self, tokens, cu_seqlens):
        return fastpool.pool(tokens, mode=["mean", "max", "last"], cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
@pytest.mark.parametrize("normalize", [False, True])
def test_export_with_dynamic_batch_and_length(device, backend, strict, normalize):
    gen = torch.Generator().manual_seed(91)
    B, T = Dim("B"), Dim("T")
    example = (
        torch.randn(4, 9, 6, generator=gen).to(device),
        make_mask("right", 4, 9, gen).to(device).long(),
    )
    program = torch.export.export(
        Padded(normalize), example, dynamic_shapes=({0: B, 1: T}, {0: B, 1: T}), strict=strict
    )
    exported = program.module()
    for b, t, kind in [(3, 7, "holes"), (1, 1, "ones"), (6, 13, "left"), (5, 11, "empty-row")]:
        hidden = torch.randn(b, t, 6, generator=gen).to(device)
        mask = make_mask(kind, b, t, gen).to(device).long()
        assert torch.equal(exported(hidden, mask), Padded(normalize)(hidden, mask)), (b, t, kind)


def test_export_without_mask_keeps_indices(device, backend):
    program = torch.export.export(
        Unmasked(), (torch.randn(3, 8, 5, device=device),), dynamic_shapes=({0: Dim("B"), 1: Dim("T")},)
    )
    hidden = torch.randn(2, 11, 5, device=device)
    got = program.module()(hidden)
    want = Unmasked()(hidden)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert got[1].dtype == torch.int64


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_packed_with_dynamic_tokens_and_sequences(device, backend, strict):
    gen = torch.Generator().manual_seed(92)
    tokens = torch.randn(10, 4, generator=gen).to(device)
    cu = torch.tensor([0, 3, 3, 10], device=device)
    # S1 >= 3 (S >= 2): torch itself guards S != 1 on any (S, ...) tensor in non-strict export (the
    # same holds for ``cu_seqlens[1:] - cu_seqlens[:-1]``), whatever fastpool does.
    program = torch.export.export(
        Packed(), (tokens, cu), dynamic_shapes=({0: Dim("N")}, {0: Dim("S1", min=3)}), strict=strict
    )
    exported = program.module()
    for offsets in ([0, 5, 12, 12, 20, 21], [0, 2, 4], [0, 0, 7], [0, 0, 0]):
        cu = torch.tensor(offsets, device=device)
        tokens = torch.randn(offsets[-1], 4, generator=gen).to(device)
        assert torch.equal(exported(tokens, cu), Packed()(tokens, cu)), offsets
    # The offsets are still checked when the exported program runs.
    with pytest.raises(ValueError, match="cu_seqlens"):
        exported(torch.randn(6, 4, device=device), torch.tensor([0, 4, 2, 6], device=device))


def test_size_limits_still_hold_in_an_exported_program(device):
    program = torch.export.export(
        Unmasked(), (torch.randn(3, 8, 1, device=device),), dynamic_shapes=({0: Dim("B"), 1: Dim("T")},)
    )
    exported = program.module()
    one = torch.zeros(1, 1, 1, device=device)
    with pytest.raises(ValueError, match="hidden: B must be below"):
        exported(one.expand(2**30, 2, 1))  # no memory: a zero stride
    with pytest.raises(ValueError, match="hidden: T must be at most"):
        exported(one.expand(2, 2**31 - 2**20 + 1, 1))
