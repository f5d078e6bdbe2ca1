"""Batched matmul family: braze::bmm (a matmul between two activations, in torch.matmul's shapes), rendered from
templates/bmm.py.j2.

The linear family takes every matmul with a weight operand and the attention families take matmul-softmax-matmul;
what is left (an encoder's hand-written attention over a mask braze does not read, a Mixer's token mixing, einsum
contractions, a state-space model's chunked products) ran as eager torch ops. One template reads both operands
through their strides, broadcast batch dims included, so no operand is copied to make it contiguous.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, launch_kernel
from braze.kernels.matmul import MatmulConfig, _deterministic_config, mma_config, pow2_clamp
from braze.kernels.render import render_template

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

MAX_BATCH_DIMS = 3  # the kernel's batch index unravels into three strided dims


def bmm_config(M: int, N: int, K: int, batch: int, device: DeviceSpec, *, elem_size: int, aligned: bool = True,
               deterministic: bool = False) -> MatmulConfig:
    """Tiles for one launch: the linear family's tl.dot tiles, with the batch counted toward covering the SMs
    (a [32, 64, 64] attention-like product fills the GPU with its batch, not with narrow tiles). aligned: every
    operand stride other than 1 is a multiple of 16 elements (vector loads; see mma_config)."""
    if deterministic:  # tiles from N and K alone: a row's products are the same at any M or batch
        if device.interpret:
            return MatmulConfig(16, pow2_clamp(N, 16, 64), pow2_clamp(K, 16, 64), row_dot=True)
        return _deterministic_config(N, K, device, dual=False)
    if device.interpret:  # the interpreter pays per program: the biggest tiles
        return MatmulConfig(pow2_clamp(M, 16, 64), pow2_clamp(N, 16, 128), pow2_clamp(K, 16, 128))
    per_entry = dataclasses.replace(device, sm_count=max(1, -(-device.sm_count // max(1, batch))))
    return mma_config(M, N, K, per_entry, elem_size=elem_size, aligned=aligned)


def matrices(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """torch.matmul's 1-D operands as matrices (views): a [K] is a [1, K] row and b [K] a [K, 1] column, and the
    output gets the dim each one dropped back."""
    if a.dim() == 1:
        a, out = a[None], (out.unsqueeze(-2) if b.dim() > 1 else out[None])
    if b.dim() == 1:
        b, out = b[:, None], out.unsqueeze(-1)
    return a, b, out


def batch_view(t: torch.Tensor, batch: Sequence[int]) -> torch.Tensor:
    """t expanded to `batch` + its last two dims (a view: broadcast dims get stride 0), with size-1 batch dims
    in front up to MAX_BATCH_DIMS."""
    return t.expand(*batch, *t.shape[-2:])[(None,) * (MAX_BATCH_DIMS - len(batch))]


class BmmFamily(KernelFamily):
    name = "bmm"
    templates = ("bmm.py.j2",)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401  (registers braze::*)

        return (torch.ops.braze.bmm.default,)

    def supports(self, node: fx.Node) -> str | None:
        a, b = (arg.meta["val"] for arg in node.args[:2])
        out = node.meta["val"]
        if a.dtype != b.dtype or a.dtype not in FLOAT_NAMES:
            return f"matmul of {a.dtype} by {b.dtype} has no kernel (one float dtype)"
        batch_dims = out.dim() + (a.dim() == 1) + (b.dim() == 1) - 2
        if batch_dims > MAX_BATCH_DIMS:
            return f"matmul over {batch_dims} batch dims has no kernel (at most {MAX_BATCH_DIMS})"
        return None

    def lower(self, node: fx.Node, name: str, deterministic: bool = False) -> tuple[str, Step]:
        from braze.runtime.plan import Step

        a, b = node.args[:2]
        dtype = a.meta["val"].dtype
        layercast = deterministic and dtype != torch.float32
        precision = "ieee" if layercast or dtype == torch.float32 else "tf32"
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a.name, b.name],
                    params={"roles": ["a", "b"], **({"deterministic": True} if deterministic else {})})
        return render_template("bmm.py.j2", name=name, input_precision=precision, layercast=layercast), step

    def lower_deterministic(self, node: fx.Node, name: str) -> tuple[str, Step]:
        """Batch-invariant tiles at launch; 16-bit operands computed in fp32 (LayerCast)."""
        return self.lower(node, name, deterministic=True)

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        if out.numel() == 0:
            return
        a, b, o = matrices(tensors["a"], tensors["b"], out)
        batch = tuple(o.shape[:-2])
        a, b, o = (batch_view(t, batch) for t in (a, b, o))
        M, N, K = o.shape[-2], o.shape[-1], a.shape[-1]
        entries = o.shape[0] * o.shape[1] * o.shape[2]
        aligned = all(stride % 16 == 0 for t in (a, b) for stride in t.stride() if stride != 1)
        cfg = bmm_config(M, N, K, entries, device, elem_size=a.element_size(), aligned=aligned,
                         deterministic=bool(params.get("deterministic")))
        grid = (entries * triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n),)
        launch_kernel(getattr(module, name), grid, a, b, o, M, N, K, o.shape[1], o.shape[2],
                      *a.stride(), *b.stride(), *o.stride(), **cfg.meta(device))

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 1 if all(out_shape) else 0


BMM = BmmFamily()
