"""Convolution family: braze::conv (a conv1d / conv2d too wide to unroll) as an implicit GEMM, rendered from
templates/conv.py.j2.

Convolutions of more than CONV_UNROLL_LIMIT products per output (codegen/fused.py) ran as torch's op, an eager step
inside the plan. They are matmuls whose left operand is never materialized: M = batch x output positions, N =
output channels per group, K = input channels per group x taps; the kernel gathers each A tile from x with im2col
index math in its loads (zero padding as masks) and sums with tl.dot in fp32. No split-K and tiles chosen from the
weight's shape and the device alone (never from M), so an output sums its products in one order at any batch size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, launch_kernel
from braze.kernels.matmul import pow2_clamp
from braze.kernels.render import render_template
from braze.ops.schema import op_args

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

MAX_GROUPS = 65535  # the grid's second axis
MAX_ROWS = 2**31 - 1024  # output positions (M) the kernel's int32 row index covers
# tap by tap (BLOCK_K channels a step) when at least this share of each channel block is real channels; below it
# (a 3-channel stem, 4-8 channels per group) K runs flat over channels x taps, padded once at its end
TAP_MAJOR_FILL = 0.75


@dataclass(frozen=True)
class ConvConfig:
    block_m: int
    block_n: int
    block_k: int
    tap_major: bool
    num_warps: int = 4
    num_stages: int = 2
    row_dot: bool = False  # per-row reductions instead of tl.dot (deterministic compiles under the interpreter)

    def meta(self, device: DeviceSpec) -> dict[str, Any]:
        meta: dict[str, Any] = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                                "TAP_MAJOR": self.tap_major, "ROW_DOT": self.row_dot}
        if not device.interpret:  # the interpreter ignores warps and stages
            meta.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return meta


def takes_tap_major(cin_per_group: int) -> bool:
    """Whether K runs tap by tap in 16-channel blocks (at least TAP_MAJOR_FILL of each block real channels)."""
    return cin_per_group / (triton.cdiv(cin_per_group, 16) * 16) >= TAP_MAJOR_FILL


def _channel_block(cin_per_group: int, widest: int) -> int:
    """The power-of-two channel block (16..widest) that pads the group's channels least (the widest on a tie)."""
    best = widest
    for block in (widest // 2, widest // 4, widest // 8):
        if block >= 16 and triton.cdiv(cin_per_group, block) * block < triton.cdiv(cin_per_group, best) * best:
            best = block
    return best


def conv_config(M: int, out_per_group: int, cin_per_group: int, taps: int, device: DeviceSpec, *, elem_size: int,
                deterministic: bool = False) -> ConvConfig:
    """Tiles for one launch.

    On a GPU nothing depends on M (the batch), so every launch of a layer sums each output's products in the same
    order. The gathered A tile is loaded element by element (each element its own 64-bit address), so tiles stay
    small: 64 x 64 outputs by a 32-deep K tile for 16-bit inputs; 32 x 64 by 16 for fp32 (its dots are FMA loops
    holding a K slice of both operands in registers, as in kernels/matmul.py); 8 warps, 2 stages. ptxas over 23
    conv shapes (3x3, strided, dilated, grouped, 1x1, conv1d, flat-K stems; batch 1 and 16) on sm_80 / 86 / 89 /
    90: 16-bit at most 127 registers, fp32 at most 80, no spill. With 4 warps 16-bit tiles took up to 224
    registers and fp32 ones spilled 40 B (sm_90); fp32 at 64 rows spilled 8-16 B on sm_80-89 (4 or 8 warps, 1
    or 2 stages); 128-wide N tiles at 3 stages spilled 64 B (fp16, sm_80).

    Under the interpreter, which pays per program and per element loaded (masked lanes included), tiles fit the
    problem; deterministic compiles there use ROW_DOT (its tl.dot is a BLAS call whose result for a row depends
    on the row's place in the tile)."""
    tap_major = takes_tap_major(cin_per_group)
    depth = cin_per_group if tap_major else cin_per_group * taps
    if device.interpret:
        block_m = 16 if deterministic else pow2_clamp(M, 16, 64)
        block_k = _channel_block(cin_per_group, pow2_clamp(depth, 16, 64)) if tap_major else pow2_clamp(depth, 16, 64)
        return ConvConfig(block_m, pow2_clamp(out_per_group, 16, 64), block_k, tap_major, row_dot=deterministic)
    widest_k = 16 if elem_size >= 4 else 32
    block_k = _channel_block(cin_per_group, pow2_clamp(depth, 16, widest_k)) if tap_major \
        else pow2_clamp(depth, 16, widest_k)
    block_m = 32 if elem_size >= 4 else 64
    return ConvConfig(block_m, pow2_clamp(out_per_group, 16, 64), block_k, tap_major, num_warps=8, num_stages=2)


def as_2d(t: torch.Tensor) -> torch.Tensor:
    """A conv1d operand [N, C, L] as a conv2d one [N, C, 1, L] (a view)."""
    return t.unsqueeze(2) if t.dim() == 3 else t


def conv_params_2d(values: Sequence[int], spatial: int, neutral: int) -> tuple[int, int]:
    """stride / padding / dilation as (h, w); a conv1d's H is a size-1 dim with `neutral` (1, 0, 1)."""
    values = [int(v) for v in values]
    values = values * spatial if len(values) == 1 else values
    return (neutral, values[0]) if spatial == 1 else (values[0], values[1])


class ConvFamily(KernelFamily):
    name = "conv"
    templates = ("conv.py.j2",)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401  (registers braze::*)

        return (torch.ops.braze.conv.default,)

    def supports(self, node: fx.Node) -> str | None:
        a = op_args(node)
        x, w = a["x"].meta["val"], a["weight"].meta["val"]
        b = a["bias"].meta["val"] if a["bias"] is not None else None
        if x.dtype not in FLOAT_NAMES or w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
            return f"a convolution of {x.dtype} by {w.dtype} has no kernel (one float dtype)"
        if x.dim() not in (3, 4) or w.dim() != x.dim():
            return f"a {x.dim() - 2}-d convolution has no kernel (conv1d and conv2d)"
        if not all(isinstance(d, int) for d in w.shape):
            return "a convolution with a dynamic weight shape has no kernel"
        if not 1 <= int(a["groups"]) <= MAX_GROUPS:
            return f"a convolution of {a['groups']} groups has no kernel (at most {MAX_GROUPS})"
        return None

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.runtime.plan import Step

        a = op_args(node)
        roles = ["x", "weight", *(["bias"] if a["bias"] is not None else [])]
        dtype = a["x"].meta["val"].dtype
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params={"roles": roles, "stride": [int(v) for v in a["stride"]],
                            "padding": [int(v) for v in a["padding"]], "dilation": [int(v) for v in a["dilation"]],
                            "groups": int(a["groups"])})
        precision = "ieee" if dtype == torch.float32 else "tf32"  # fp32 convs get IEEE fp32 dots, as eager does
        return render_template("conv.py.j2", name=name, input_precision=precision), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        if out.numel() == 0:
            return
        x, w, bias = tensors["x"], tensors["weight"], tensors.get("bias")
        spatial = x.dim() - 2
        x, w, o = as_2d(x), as_2d(w), as_2d(out)
        batch, _, ih, iw = x.shape
        out_ch, cin_per_group, kh, kw = w.shape
        oh, ow = o.shape[2:]
        groups = int(params["groups"])
        out_per_group = out_ch // groups
        M = batch * oh * ow
        if M > MAX_ROWS:
            raise ValueError(f"a convolution over {M} output positions exceeds the kernel's {MAX_ROWS}")
        cfg = conv_config(M, out_per_group, cin_per_group, kh * kw, device, elem_size=x.element_size(),
                          deterministic=bool(params.get("deterministic")))
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(out_per_group, cfg.block_n), groups)
        launch_kernel(getattr(module, name), grid, x, w, bias if bias is not None else w, o,
                      M, out_per_group, cin_per_group, oh, ow, ih, iw,
                      *conv_params_2d(params["stride"], spatial, 1), *conv_params_2d(params["padding"], spatial, 0),
                      *conv_params_2d(params["dilation"], spatial, 1),
                      *x.stride(), *w.stride(), bias.stride(0) if bias is not None else 0, *o.stride(),
                      KH=kh, KW=kw, HAS_BIAS=bias is not None, **cfg.meta(device))

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 1 if all(out_shape) else 0


CONV = ConvFamily()
