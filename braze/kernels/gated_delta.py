"""Gated-delta family: braze::gated_delta_rule and braze::cached_gated_delta_rule (gated DeltaNet linear attention
of Qwen3-Next / Qwen3.5 / OLMo-hybrid; Kimi Delta Attention's per-channel decay), rendered from
templates/gated_delta.py.j2.

One launch per layer and call: each program keeps a [Dk, BLOCK_V] slice of a head's recurrent state in registers
and walks the call's tokens in order (ops/recurrent_state.py has the rules and the reference). Decode is one step
from the state cache; prefill walks the prompt (sequential in the tokens: the chunked form, matmuls over chunks of
64 tokens, is the faster prefill on a GPU and is not built yet).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, launch_kernel
from braze.kernels.render import render_template
from braze.ops.recurrent_state import L2NORM_EPS
from braze.ops.schema import op_args

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

MAX_HEAD_DIM = 256  # the key head dim one program holds (a [Dk, BLOCK_V] fp32 state slice in registers)


class GatedDeltaFamily(KernelFamily):
    name = "gated_delta"
    templates = ("gated_delta.py.j2",)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401  (registers braze::*)

        return (torch.ops.braze.gated_delta_rule.default, torch.ops.braze.cached_gated_delta_rule.default)

    def supports(self, node: fx.Node) -> str | None:
        a = op_args(node)
        q, k, v = (a[r].meta["val"] for r in ("q", "k", "v"))
        if any(t.dtype not in FLOAT_NAMES for t in (q, k, v)):
            return f"gated DeltaNet over {q.dtype} has no kernel"
        if not isinstance(k.shape[-1], int) or k.shape[-1] > MAX_HEAD_DIM:
            return f"gated DeltaNet with key head dim {k.shape[-1]} has no kernel (at most {MAX_HEAD_DIM})"
        return None

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.runtime.plan import Step

        a = op_args(node)
        cached = node.target is torch.ops.braze.cached_gated_delta_rule.default
        roles = ["q", "k", "v", "g", *(r for r in ("beta", "decay_weight") if a[r] is not None),
                 *(("state", "cache_len", "kv_start") if cached else ())]
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params={"roles": roles, "scale": float(a["scale"]), "l2norm": bool(a["l2norm"]),
                            "cached": cached})
        return render_template("gated_delta.py.j2", name=name, eps=repr(L2NORM_EPS)), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        q, k, v, g = (tensors[r] for r in ("q", "k", "v", "g"))
        beta = tensors.get("beta")  # None: no delta (Mamba2's SSD)
        weight = tensors.get("decay_weight")  # [H, Dk, Dv]: Mamba's decay per state entry, g = dt [B, S, H, Dv]
        bsz, seq, heads, dv = v.shape
        if bsz * seq == 0:
            return
        dk = k.shape[-1]
        cached = bool(params["cached"])
        state = tensors["state"] if cached else out.new_empty((1, 1, 1, 1), dtype=torch.float32)
        cache_len = tensors["cache_len"] if cached else state
        kv_start = tensors["kv_start"] if cached else state
        block_k = triton.next_power_of_2(dk)
        block_v = min(triton.next_power_of_2(dv), max(16, 4096 // block_k), 64)
        opts = {} if device.interpret else {"num_warps": 4}
        launch_kernel(getattr(module, name), (bsz * heads, triton.cdiv(dv, block_v)),
                      q, k, v, g, beta if beta is not None else g, weight if weight is not None else g, out, state,
                      cache_len, kv_start,
                      seq, heads, heads // k.shape[2], dk, dv, float(params["scale"]),
                      *q.stride(), *k.stride(), *v.stride(), *g.stride()[:3], g.stride(3) if g.dim() == 4 else 0,
                      *(beta.stride() if beta is not None else (0, 0, 0)),
                      *(weight.stride() if weight is not None else (0, 0, 0)), *out.stride(),
                      *state.stride(), cache_len.stride(0) if cached and cache_len.numel() > 1 else 0,
                      BLOCK_K=block_k, BLOCK_V=block_v, L2NORM=bool(params["l2norm"]), CACHED=cached,
                      KEY_DECAY=g.dim() == 4 and weight is None, DELTA=beta is not None,
                      ENTRY_DECAY=weight is not None, **opts)

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 1 if all(out_shape) else 0


GATED_DELTA = GatedDeltaFamily()
