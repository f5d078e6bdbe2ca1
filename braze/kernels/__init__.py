"""Kernel families: one registered object per family (template, checker, lowering, launch configuration from a
DeviceSpec, launcher, launch count). Importable without the compiler: saved packages launch through it.

Adding a family: write its template in braze/templates/, a module here with one KernelFamily subclass (see
braze/kernels/matmul.py), a torch reference op in braze/ops/, and list the family in FAMILIES below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from braze.kernels.attention import ATTENTION, CACHED_ATTENTION, GENERAL_CACHED_ATTENTION, TREE_CACHED_ATTENTION
from braze.kernels.bmm import BMM
from braze.kernels.cached_conv import CACHED_CONV
from braze.kernels.conv import CONV
from braze.kernels.decode_layer import ATTENTION_BLOCK, MLP_BLOCK
from braze.kernels.device import INTERPRETER, TARGETS, DeviceSpec, device_spec, target_spec
from braze.kernels.df11 import DF11_DECODE, DF11_EMBEDDING, DF11_GEMV
from braze.kernels.family import LAUNCH_HOOKS, KernelFamily, Launch, device_op, launch_kernel, recording_launches
from braze.kernels.fused import FUSED
from braze.kernels.gated_delta import GATED_DELTA
from braze.kernels.grouped_matmul import GROUPED_MATMUL
from braze.kernels.int6 import INT6_MATMUL
from braze.kernels.kv_compress import KV_COMPRESS
from braze.kernels.matmul import MATMUL
from braze.kernels.moe_routing import MOE_ROUTING
from braze.kernels.topk import TOPK

FAMILIES: dict[str, KernelFamily] = {
    f.name: f for f in (FUSED, MATMUL, ATTENTION, CACHED_ATTENTION, TREE_CACHED_ATTENTION, GENERAL_CACHED_ATTENTION,
                        DF11_DECODE, DF11_EMBEDDING, DF11_GEMV, INT6_MATMUL, ATTENTION_BLOCK, MLP_BLOCK, KV_COMPRESS,
                        GROUPED_MATMUL, MOE_ROUTING, TOPK, BMM, CACHED_CONV, CONV, GATED_DELTA)
}

if TYPE_CHECKING:
    from braze.runtime.plan import Plan

_BY_OP: dict[Any, KernelFamily] = {}


def family_for_op(target: Any) -> KernelFamily | None:
    """The family that lowers the braze op `target` (None: no kernel; the op runs its reference eagerly)."""
    if not _BY_OP:
        for family in FAMILIES.values():
            for op in family.ops:
                _BY_OP[op] = family
    return _BY_OP.get(target)


def launch_count(plan: Plan, device: DeviceSpec | None = None, sizes: Mapping[str, int] | None = None) -> int:
    """Launches one call of `plan` issues on `device` (default: the interpreter) with the dynamic dims at `sizes`
    (default: each at its lower bound, e.g. batch 1), as each family counts them for its step."""
    from braze.runtime.expr import Expr

    syms = {s.name: s.lower for s in plan.symbols} | dict(sizes or {})
    shapes = {b.name: b.shape for b in plan.buffers}
    total = 0
    for step in plan.steps:
        if step.kind in ("fused", "template"):
            shape = [Expr(e)(syms) for e in shapes[step.outputs[0]]]
            total += FAMILIES[step.launcher or step.kind].launch_count(step.params, device or INTERPRETER, shape)
    return total


__all__ = ["FAMILIES", "INTERPRETER", "LAUNCH_HOOKS", "TARGETS", "DeviceSpec", "KernelFamily", "Launch", "device_op",
           "device_spec", "family_for_op", "launch_count", "launch_kernel", "recording_launches", "target_spec"]
