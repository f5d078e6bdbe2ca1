"""Grouped matmul family: the experts of a mixture-of-experts layer (braze::grouped_mm, HF's grouped_mm) in one
launch, rendered from templates/grouped_mm.py.j2.

Rows arrive sorted by expert with cumulative ends `offs`; each program walks only its rows' experts, so a decode
step reads the active experts' weights and nothing else. Without it the experts ran torch's reference eagerly,
which reads `offs` on the host (a device-to-host sync per expert matmul, and no CUDA-graph capture).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, launch_kernel
from braze.kernels.matmul import MatmulConfig, _deterministic_config, mma_config, pow2_clamp
from braze.kernels.render import render_template
from braze.ops.schema import op_args

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

MAX_EXPERTS = 1024  # the experts' ends are one vector in registers
GROUP_BLOCK_M = 64  # a tile's rows span few experts (each expert it touches is a pass over K)


def render_grouped_mm(name: str, *, input_precision: str = "ieee", layercast: bool = False) -> str:
    return render_template("grouped_mm.py.j2", name=name, input_precision=input_precision, layercast=layercast)


def grouped_mm_config(T: int, N: int, K: int, device: DeviceSpec, *, elem_size: int = 2,
                      deterministic: bool = False, dual: bool = False) -> MatmulConfig:
    """The matmul family's tiles for T rows (matmul_config), BLOCK_M at most GROUP_BLOCK_M; dual: two weight
    tiles per K step (the SwiGLU epilogue's gate and up), as the matmul family's gate/up kernel.

    deterministic: matmul's batch-invariant tiles (fixed BLOCK_M/BLOCK_K, no split-K; per-row reductions under the
    interpreter). A row's result is its own expert's dot products, whatever the other rows of its tile."""
    if deterministic:
        return _deterministic_config(N, K, device, dual=dual)
    if device.interpret:
        return MatmulConfig(pow2_clamp(T, 16, GROUP_BLOCK_M), pow2_clamp(N, 16, 512), pow2_clamp(K, 16, 128))
    return mma_config(min(T, GROUP_BLOCK_M), N, K, device, elem_size=elem_size, dual=dual)


def expert_programs(T: int, E: int, block_m: int, tiles: int, device: DeviceSpec) -> int:
    """Programs per output tile (the grid's third axis): one per expert a tile can hold (min(T, BLOCK_M, E)) when
    the tiles alone leave SMs idle (decode: Qwen3-30B-A3B's gate/up at batch 1 is 48 tiles of 8 rows, 8 experts,
    on 132 SMs -> 384 programs), else 1 (each program walks its tile's experts). The interpreter takes 1."""
    if device.interpret or tiles >= device.sm_count:
        return 1
    return max(1, min(T, block_m, E))


class GroupedMatmulFamily(KernelFamily):
    name = "grouped_matmul"
    templates = ("grouped_mm.py.j2",)
    ROLES = ("x", "weight", "offs", "rows")

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401  (registers braze::*)

        return (torch.ops.braze.grouped_mm.default,)

    def supports(self, node: fx.Node) -> str | None:
        a = op_args(node)
        x, w, offs = (a[role].meta["val"] for role in ("x", "weight", "offs"))
        if a["glu"] not in ("none", "swiglu"):
            return f"grouped matmul with a {a['glu']} epilogue has no kernel"
        if a["rows"] is not None and a["rows"].meta["val"].dtype not in (torch.int32, torch.int64):
            return f"grouped matmul gathering rows by {a['rows'].meta['val'].dtype} indices has no kernel"
        if x.dtype not in FLOAT_NAMES or w.dtype not in FLOAT_NAMES:
            return f"grouped matmul of {x.dtype} rows by {w.dtype} experts has no kernel"
        if offs.dtype not in (torch.int32, torch.int64):
            return f"grouped matmul offsets of dtype {offs.dtype} have no kernel"
        if w.dim() != 3 or x.dim() != 2 or offs.dim() != 1:
            return "grouped matmul needs rows [T, K], experts [E, K, N] and offsets [E]"
        if w.shape[0] > MAX_EXPERTS:
            return f"{w.shape[0]} experts: the kernel holds at most {MAX_EXPERTS} expert offsets"
        return None

    def lower(self, node: fx.Node, name: str, deterministic: bool = False) -> tuple[str, Step]:
        from braze.runtime.plan import Step

        a = op_args(node)
        x, w = a["x"].meta["val"], a["weight"].meta["val"]
        layercast = deterministic and w.dtype != torch.float32
        precision = "ieee" if layercast or x.dtype == torch.float32 else "tf32"
        roles = [r for r in self.ROLES if a[r] is not None]
        params: dict[str, Any] = {"roles": roles}
        if a["rows"] is not None and a["row_div"] != 1:
            params["row_div"] = a["row_div"]
        if a["glu"] != "none":
            params["glu"] = a["glu"]
        if deterministic:
            params["deterministic"] = True
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params=params)
        return render_grouped_mm(name, input_precision=precision, layercast=layercast), step

    def lower_deterministic(self, node: fx.Node, name: str) -> tuple[str, Step]:
        """Batch-invariant tiles at launch; 16-bit experts computed in fp32 (LayerCast)."""
        return self.lower(node, name, deterministic=True)

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        x, w, offs, rows = tensors["x"], tensors["weight"], tensors["offs"], tensors.get("rows")
        (T, N), K, E = out.shape, x.shape[1], w.shape[0]
        swiglu = params.get("glu") == "swiglu"
        if T == 0:
            return
        cfg = grouped_mm_config(T, N, K, device, elem_size=max(x.element_size(), w.element_size()),
                                deterministic=bool(params.get("deterministic")), dual=swiglu)
        grid = (triton.cdiv(T, cfg.block_m), triton.cdiv(N, cfg.block_n))
        grid += (expert_programs(T, E, cfg.block_m, grid[0] * grid[1], device),)
        launch_kernel(getattr(module, name), grid, x, w, offs, offs if rows is None else rows, out, T, N, K, E,
                      *x.stride(), *w.stride(), *out.stride(), BLOCK_E=triton.next_power_of_2(E),
                      HAS_ROWS=rows is not None, ROW_DIV=int(params.get("row_div", 1)), SWIGLU=swiglu,
                      **cfg.meta(device))

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 1


GROUPED_MATMUL = GroupedMatmulFamily()
