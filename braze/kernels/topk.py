"""Top-k family: braze::topk_packed (torch.topk over the last dim, values and indices in one fp32 tensor),
rendered from templates/topk.py.j2.

An MoE router picks each token's experts with torch.topk; as an eager step it was the last torch op of an MoE
decode layer. One program per row keeps the row in registers and takes K maxima, so routing is a kernel like the
rest of the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, launch_kernel
from braze.kernels.render import render_template
from braze.ops.schema import op_args

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

MAX_TOPK_DIM = 1024  # a row in one program's registers
MAX_TOPK = 64  # K unrolled passes


class TopkFamily(KernelFamily):
    name = "topk"
    templates = ("topk.py.j2",)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401  (registers braze::*)

        return (torch.ops.braze.topk_packed.default,)

    def supports(self, node: fx.Node) -> str | None:
        a = op_args(node)
        x, k = a["x"].meta["val"], a["k"]
        if x.dtype not in FLOAT_NAMES or not isinstance(x.shape[-1], int) or x.shape[-1] > MAX_TOPK_DIM:
            return f"top-k over a {x.dtype} dim of {x.shape[-1]} has no kernel (at most {MAX_TOPK_DIM}, static)"
        if not 1 <= k <= min(MAX_TOPK, x.shape[-1]):
            return f"top-{k} has no kernel (1..{MAX_TOPK})"
        return None

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.runtime.plan import Step

        a = op_args(node)
        router = {flag: True for flag in ("softmax", "renorm") if a[flag]}
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a["x"].name],
                    params={"roles": ["x"], "k": int(a["k"]), **router})
        return render_template("topk.py.j2", name=name), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        x = tensors["x"]
        E = x.shape[-1]
        rows = x.reshape(-1, E)  # a view for the row-major inputs a router's softmax writes
        flat = out.view(2, -1, out.shape[-1])
        if rows.shape[0] == 0:
            return
        opts = {} if device.interpret else {"num_warps": 1 if E <= 256 else 4}
        launch_kernel(getattr(module, name), (rows.shape[0],), rows, flat, E, rows.stride(0), rows.stride(1),
                      flat.stride(1), flat.stride(0), K=int(params["k"]), BLOCK_E=triton.next_power_of_2(E),
                      BLOCK_K=triton.next_power_of_2(int(params["k"])), SOFTMAX=bool(params.get("softmax")),
                      RENORM=bool(params.get("renorm")), **opts)

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 1 if all(out_shape[1:-1]) else 0


TOPK = TopkFamily()
