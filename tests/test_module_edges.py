"""Generic modules at the edges a new user reaches first: Python scalars that arrive as tensors (`t.item()`, and
torch.compile's handling of a float argument), sizes returned from forward, and weights swapped after compile."""

import torch

import braze


class ScalarOperands(torch.nn.Module):
    def forward(self, x, s):
        return x * s.item() + (x > s.item()).float(), torch.clamp(x, max=s.item())


def test_item_scalars_are_kernel_operands():
    """`t.item()` of a 0-d tensor used as a scalar operand becomes that tensor, loaded by the fused kernel: no
    eager step, no unbacked symbol for codegen to trip on."""
    x, s = torch.randn(2, 5), torch.tensor(0.3)
    compiled = braze.compile(ScalarOperands())
    for got, want in zip(compiled(x, s), ScalarOperands()(x, s), strict=True):
        torch.testing.assert_close(got, want)
    s2 = torch.tensor(-0.7)  # the value is read at run time, not baked in
    for got, want in zip(compiled(x, s2), ScalarOperands()(x, s2), strict=True):
        torch.testing.assert_close(got, want)
    assert compiled.report.fallbacks == []


def test_torch_compile_with_a_changing_float_argument():
    """Dynamo turns a float argument that changes between calls into a 0-d tensor read with .item()."""
    fn = torch.compile(lambda x, s, n: (x * s + n, x.half() * s), backend="braze")
    x = torch.randn(5)
    with torch.no_grad():
        for scale in (2.0, 3.5, -0.25):
            for got, want in zip(fn(x, scale, 3), (x * scale + 3, x.half() * scale), strict=True):
                torch.testing.assert_close(got, want)


class ReturnsSizes(torch.nn.Module):
    def forward(self, a):
        return a + 1, a.shape[0], a.shape[1] * 2


def test_sizes_returned_from_forward_follow_the_call():
    compiled = braze.compile(ReturnsSizes())
    for batch in (3, 6):
        out, rows, width = compiled(torch.zeros(batch, 4))
        assert (rows, width) == (batch, 8) and isinstance(rows, int)
        assert torch.equal(out, torch.ones(batch, 4))
