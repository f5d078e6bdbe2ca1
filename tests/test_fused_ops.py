"""Ops the fused (pointwise / reduction) family generates beyond plain elementwise math: F.pad (constant_pad_nd)
as an index shift under an in-range mask, and full_like / zeros_like / ones_like as constants, fused with their
neighbours instead of running as eager torch ops. Compared exactly with eager (no arithmetic reassociation: a
pad selects, a fill is a literal)."""

import pytest
import torch
import torch.nn.functional as F

import braze


class Pads(torch.nn.Module):
    def forward(self, x, mask):
        return (F.pad(x, (1, 2), value=-3.5) * 2,  # last dim, a fill value, then fused math
                F.pad(x, (2, 0, -1, 1)),  # two dims, one of them cropped (a negative pad)
                F.pad(mask, (0, 3), value=True),  # bool
                F.pad(x.int(), (1, 1), value=4))  # integer


class Fills(torch.nn.Module):
    def forward(self, x):
        return torch.full_like(x, 7.0) + torch.zeros_like(x) + torch.ones_like(x) * x


@pytest.mark.parametrize("batch", [2, 3])
def test_pads_run_in_fused_kernels(batch):
    x, mask = torch.randn(batch, 5, 6), torch.rand(batch, 5, 6) > 0.5
    compiled = braze.compile(Pads())
    for got, want in zip(compiled(x, mask), Pads()(x, mask), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert compiled.report.fallbacks == []


def test_fills_are_constants_in_fused_kernels():
    x = torch.randn(4, 9)
    compiled = braze.compile(Fills())
    torch.testing.assert_close(compiled(x), Fills()(x), atol=0, rtol=0)
    assert compiled.report.fallbacks == [] and compiled.plan.launches == 1


class NanPaths(torch.nn.Module):
    def forward(self, x):
        return (torch.relu(x), x.clamp(-1, 1), torch.maximum(x, torch.zeros_like(x)), x.amax(-1), x.amin(-1),
                torch.nn.functional.linear(x, torch.eye(x.shape[-1])).relu())


def test_nan_propagates_as_in_torch():
    """relu / clamp / maximum / amax / amin keep a NaN, as torch does (tl.maximum and tl.max drop it by default)."""
    x = torch.tensor([[float("nan"), 1.0, -2.0, float("inf")], [0.5, -0.5, 3.0, -3.0]])
    compiled = braze.compile(NanPaths())
    for got, want in zip(compiled(x), NanPaths()(x), strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)


class Inverts(torch.nn.Module):
    def forward(self, ints, flags):
        return ~ints, ~flags, ~(ints > 0)


def test_bitwise_not_of_integers_is_twos_complement():
    ints, flags = torch.tensor([[0, 1, 5, -7]]), torch.tensor([[True, False, True, False]])
    compiled = braze.compile(Inverts())
    for got, want in zip(compiled(ints, flags), Inverts()(ints, flags), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert compiled.report.fallbacks == []
