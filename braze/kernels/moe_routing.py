"""MoE routing family: the sort of the (token, slot) pairs by expert (a permutation and its inverse,
braze::moe_sort) and the experts' cumulative row ends (braze::moe_offsets), or both in one launch
(braze::moe_route, passes/moe.py merges them), rendered from templates/moe_routing.py.j2.

HF's grouped-experts forward sorts the pairs with torch.sort, counts them with histc + cumsum and inverts the
permutation with index_put: four eager steps per MoE layer (passes/normalize.py rewrites them into these two ops).
Both kernels count instead of sorting, exact integer work with no host read, so a decode step's routing is two
launches inside the plan (CUDA-graph capturable) and a request's rows sort the same way whatever its companions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec
from braze.kernels.family import KernelFamily, launch_kernel
from braze.kernels.render import render_template

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

PAIRS_PER_TILE = 64  # pairs compared per loop trip: a 64 x 64 boolean tile (32 per thread at 4 warps)


def render_moe_routing(name: str) -> str:
    return render_template("moe_routing.py.j2", name=name)


class MoeRoutingFamily(KernelFamily):
    name = "moe_routing"
    templates = ("moe_routing.py.j2",)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401  (registers braze::*)

        return (torch.ops.braze.moe_sort.default, torch.ops.braze.moe_offsets.default,
                torch.ops.braze.moe_route.default)

    def supports(self, node: fx.Node) -> str | None:
        ids = node.args[0].meta["val"]
        if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64, torch.float32):
            return f"MoE routing over {ids.dim()}-D {ids.dtype} expert ids has no kernel"
        return None

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.runtime.plan import Step

        kernel = node.target.name().removeprefix("braze::moe_")
        params: dict[str, Any] = {"roles": ["ids"], "kernel": kernel}
        if kernel != "sort":
            params["num_experts"] = int(node.args[1])
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[node.args[0].name],
                    params=params)
        return render_moe_routing(name), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        ids = tensors["ids"]
        S = ids.shape[0]
        opts = {} if device.interpret else {"num_warps": 4}
        if params["kernel"] == "sort":
            if S:
                launch_kernel(getattr(module, f"{name}_sort"), (triton.cdiv(S, PAIRS_PER_TILE),), ids, out, S,
                              ids.stride(0), out.stride(0), BLOCK=PAIRS_PER_TILE, **opts)
            return
        E = int(params["num_experts"])
        block_e = min(PAIRS_PER_TILE, triton.next_power_of_2(E))
        if params["kernel"] == "route":
            rank_tiles = triton.cdiv(S, PAIRS_PER_TILE)
            launch_kernel(getattr(module, f"{name}_route"), (rank_tiles + triton.cdiv(E, block_e),), ids, out, S, E,
                          ids.stride(0), rank_tiles, BLOCK_E=block_e, BLOCK=PAIRS_PER_TILE, **opts)
            return
        launch_kernel(getattr(module, f"{name}_offsets"), (triton.cdiv(E, block_e),), ids, out, S, E, ids.stride(0),
                      BLOCK_E=block_e, BLOCK=PAIRS_PER_TILE, **opts)

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 0 if params["kernel"] == "sort" and not out_shape[-1] else 1


MOE_ROUTING = MoeRoutingFamily()
