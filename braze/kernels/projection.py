"""The projecting role the decode-layer blocks share (templates/projection.py.j2): a GEMV with the residual add,
run by the programs of a block's launch that start after all of its first role's programs have.

A block's launch hands roles out by start ticket (sync[0], an atomic counter), not by program id: the first
tickets go to the block's first role (attention; norm + gate/up), which stores its part of the projection's input
in an fp32 scratch and counts it in sync[1]; the later ones project BLOCK_O output columns each, for every row,
once every part is stored. A projecting program only ever waits on programs that took earlier tickets, which are
running, so the wait ends whatever order the hardware starts programs in (CUB's decoupled look-back takes tile ids
the same way). The projection sums in a fixed order (no float atomics), so deterministic compiles use it too,
with tiles that do not depend on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton

from braze.kernels.device import DeviceSpec
from braze.kernels.family import launch_kernel
from braze.kernels.matmul import gemv_config, pow2_clamp


@dataclass(frozen=True)
class PostNorm:
    """An RMSNorm between a block's projection and its residual add: y, the fp32 staging [R * N]."""

    weight: torch.Tensor
    eps: float
    y: torch.Tensor


@dataclass(frozen=True)
class Projection:
    """out [R, N] = residual + scratch [R, K] @ weight [N, K]^T (+ bias [N]). `scratch`: fp32, at least R * K
    elements, any contents (the first role writes it); `sync`: int32 [3], zeros before and after the launch.
    post_norm (Gemma 2/3's post-attention / post-feedforward RMSNorm): out = residual + rms_norm(scratch @
    weight^T, post_norm.weight, post_norm.eps), the product staged in post_norm.y (fp32, R * N elements)."""

    weight: torch.Tensor
    residual: torch.Tensor
    out: torch.Tensor
    scratch: torch.Tensor
    sync: torch.Tensor
    deterministic: bool = False
    post_norm: PostNorm | None = None
    bias: torch.Tensor | None = None

    def args(self) -> list[Any]:
        """scratch, weight, residual, out, sync, R, N, K, the strides, the post-norm's y, weight and eps and the
        bias, in the templates' order (without a post-norm or a bias: placeholders the kernel never reads)."""
        w, r, o, p = self.weight, self.residual, self.out, self.post_norm
        post = [p.y, p.weight, float(p.eps)] if p is not None else [self.scratch, w, 0.0]
        return [self.scratch, w, r, o, self.sync, o.shape[0], w.shape[0], w.shape[1], *w.stride(), *r.stride(),
                *o.stride(), *post, w if self.bias is None else self.bias]

    def config(self, device: DeviceSpec, num_warps: int = 4) -> dict[str, int | bool]:
        """One row (b=1 decode) and deterministic compiles take the GEMV form (ROW_DOT, matmul's gemv_config:
        BLOCK_O narrowed until the programs cover every SM); deterministic compiles also fix BLOCK_R at 1, so a
        row's sums never depend on the batch (nor on draft nodes: decode and the tree verify agree bitwise).
        Several rows otherwise: 16-row tl.dot tiles (benchmarks/matmul_tiles.py: from 2 rows on they beat the
        per-row reduction)."""
        rows, (n, k) = self.out.shape[0], self.weight.shape
        # the post-norm's row chunk: 512 columns on a GPU (4 fp32 per thread at 4 warps; at 1024 the MLP block
        # spilled 4-8 B at 80 registers on sm_80, Gemma 2 shape), 1024 under the interpreter (it pays per trip)
        post = {"POST_NORM": self.post_norm is not None,
                "BLOCK_PN": pow2_clamp(n, 16, 1024 if device.interpret else 512), "HAS_BIAS": self.bias is not None}
        if device.interpret:  # large tiles: the interpreter's cost is per program and per loop trip
            row_dot = self.deterministic
            return {"BLOCK_O": pow2_clamp(n, 16, 512), "BLOCK_R": 1 if row_dot else 16,
                    "BLOCK_KO": pow2_clamp(k, 16, 512), "ROW_DOT": row_dot, **post}
        if self.deterministic or rows == 1:
            c = gemv_config(1, n, k, device, elem_size=self.weight.element_size(), num_warps=num_warps)
            return {"BLOCK_O": c.block_n, "BLOCK_R": 1, "BLOCK_KO": c.block_k, "ROW_DOT": True, **post}
        block_o = 32 if triton.cdiv(n, 32) >= device.sm_count else 16
        return {"BLOCK_O": block_o, "BLOCK_R": 16, "BLOCK_KO": pow2_clamp(k, 16, 64), "ROW_DOT": False, **post}

    def launch(self, kernel: Any, first: int, args: list[Any], device: DeviceSpec, **meta: Any) -> None:
        """One launch of a block kernel: `first` programs of its first role, then cdiv(N, BLOCK_O) projecting
        ones; `args` are the kernel's arguments before the projection's."""
        tail = self.config(device, int(meta.get("num_warps", 4)))
        grid = (first + triton.cdiv(self.weight.shape[0], int(tail["BLOCK_O"])),)
        launch_kernel(kernel, grid, *args, *self.args(), **meta, **tail)
