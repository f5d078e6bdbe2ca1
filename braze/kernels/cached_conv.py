"""Cached-conv family: braze::cached_conv1d (a causal depthwise conv1d whose past positions live in the runtime's
conv cache), rendered from templates/cached_conv.py.j2.

One launch per conv layer and call writes the tokens' inputs into the cache and sums the taps, reading this call's
tokens from x and earlier ones from the cache (ops/conv_state.py has the rules and the reference). It is what lets
short-conv hybrids (LFM2) decode over the KV-cache plans instead of recomputing the prefix every token.
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

MAX_TAPS = 16  # taps unrolled in the kernel
MAX_TREE = 64  # verify nodes whose tree mask one program reads (as a [BLOCK_S, BLOCK_S] tile)


class CachedConvFamily(KernelFamily):
    name = "cached_conv"
    templates = ("cached_conv.py.j2",)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401  (registers braze::*)

        return (torch.ops.braze.cached_conv1d.default,)

    def supports(self, node: fx.Node) -> str | None:
        a = op_args(node)
        x, w = a["x"].meta["val"], a["weight"].meta["val"]
        if x.dtype not in FLOAT_NAMES or a["cache"].meta["val"].dtype not in FLOAT_NAMES:
            return f"a cached convolution over {x.dtype} has no kernel"
        if not isinstance(w.shape[-1], int) or w.shape[-1] > MAX_TAPS:
            return f"a cached convolution of {w.shape[-1]} taps has no kernel (at most {MAX_TAPS})"
        return None

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.runtime.plan import Step

        a = op_args(node)
        roles = ["x", "weight", "cache", "cache_len", "kv_start",
                 *(r for r in ("bias", "tree_mask", "gate_in", "gate_out") if a[r] is not None)]
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params={"roles": roles, "taps": int(a["weight"].meta["val"].shape[-1]),
                            "activation": a["activation"]})
        return render_template("cached_conv.py.j2", name=name, activation=a["activation"]), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        x, w, cache = tensors["x"], tensors["weight"], tensors["cache"]
        cache_len, kv_start = tensors["cache_len"], tensors["kv_start"]
        bias, mask = tensors.get("bias"), tensors.get("tree_mask")
        bsz, channels, seq = x.shape
        if bsz * seq == 0:
            return
        if mask is not None and seq > MAX_TREE:
            raise ValueError(f"a cached convolution verifies at most {MAX_TREE} draft nodes, got {seq}")
        mask = mask.expand(bsz, seq, seq) if mask is not None else None
        w2 = w.reshape(channels, -1)
        block_c = min(triton.next_power_of_2(channels), 1024 if device.interpret else 256)
        opts = {} if device.interpret else {"num_warps": 4 if block_c >= 256 else 1}
        gin, gout = tensors.get("gate_in"), tensors.get("gate_out")
        gin, gout = (g.expand(x.shape) if g is not None else None for g in (gin, gout))

        def strides(t: torch.Tensor | None) -> tuple[int, ...]:
            return t.stride() if t is not None else (0, 0, 0)

        launch_kernel(getattr(module, name), (bsz * seq, triton.cdiv(channels, block_c)),
                      x, w2, bias if bias is not None else w2, cache, cache_len, kv_start,
                      mask if mask is not None else x, out, gin if gin is not None else x,
                      gout if gout is not None else x,
                      seq, channels, *x.stride(), *w2.stride(), cache.stride(0), cache.stride(2), cache.stride(3),
                      cache_len.stride(0) if cache_len.numel() > 1 else 0, *out.stride(), *strides(mask),
                      *strides(gin), *strides(gout), TAPS=int(params["taps"]), BLOCK_C=block_c,
                      BLOCK_S=triton.next_power_of_2(seq) if mask is not None else 1, HAS_BIAS=bias is not None,
                      TREE=mask is not None, GATE_IN=gin is not None, GATE_OUT=gout is not None, **opts)

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 1 if all(out_shape) else 0


CACHED_CONV = CachedConvFamily()
