"""braze::conv: a non-transposed 1-D or 2-D convolution too wide to unroll, lowered as an implicit GEMM.

The fused kernels unroll convolutions of at most CONV_UNROLL_LIMIT products per output (codegen/fused.py); wider
ones (a ResNet 3x3 over 64 channels, a pointwise 1x1 over 128, a conv1d over 256 channels) are matmul-shaped: M =
batch x output positions, N = output channels per group, K = input channels per group x taps.
passes/convolution.py rewrites them into this op and kernels/conv.py lowers it (templates/conv.py.j2). The op
keeps torch's semantics (zero padding, stride, dilation, groups, any input and weight strides), so the reference
is torch's own convolution and the reference executor runs unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor


def conv_reference(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
                   dilation: list[int], groups: int) -> Tensor:
    """torch's convolution (aten.convolution, non-transposed): x [N, C, L] or [N, C, H, W], weight
    [C_out, C / groups, *taps]; its output layout (channels-last in, channels-last out) is the op's too."""
    spatial = weight.dim() - 2
    return torch.ops.aten.convolution.default(x, weight, bias, list(stride), list(padding), list(dilation), False,
                                              [0] * spatial, groups)


@torch.library.custom_op("braze::conv", mutates_args=())
def conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
         dilation: list[int], groups: int) -> Tensor:
    """out[n, o, p] = bias[o] + sum over c < C / groups and taps k of weight[o, c, k] * x[n, g(o) * C / groups + c,
    p * stride - padding + k * dilation] (zero outside x): conv1d / conv2d with a static weight."""
    return conv_reference(x, weight, bias, stride, padding, dilation, groups)


@conv.register_fake
def _conv_fake(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int], padding: list[int],
               dilation: list[int], groups: int) -> Tensor:
    return conv_reference(x, weight, bias, stride, padding, dilation, groups)


CONV_OPS = {"conv": torch.ops.braze.conv.default}
