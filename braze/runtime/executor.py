"""Executes a Plan: allocates the planned arena, launches kernels in order, evaluates free views and eager ops.

Modes: `interpret` (Triton interpreter on CPU tensors) and `cuda` (the same kernels on a GPU, replayed from a
CUDA graph per input-shape bucket). The `reference` executor lives in the compiled module: it runs the rewritten
graph's torch reference implementations instead of a plan.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch

from braze.kernels import FAMILIES, LAUNCH_HOOKS, DeviceSpec, KernelFamily, device_spec
from braze.kernels.fused import FUSED
from braze.runtime.errors import InputMismatchError, PackageError, ShapeOutOfRangeError
from braze.runtime.expr import Expr as _Expr
from braze.runtime.kernel_loader import check_interpreter_ready, load_kernel_module
from braze.runtime.plan import Plan

# workspace sizing at construction: dims other than the batch (the verify plan's draft nodes) count up to this
WORKSPACE_DIM_CAP = 16

DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}


def zeros_for(inputs: list, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Zeroed tensors for declared plan inputs [(name, shape without batch, dtype name)] at `batch` rows (the KV
    caches, compressed caches, query rings)."""
    return {name: torch.zeros([batch, *shape], dtype=DTYPES[dtype], device=device) for name, shape, dtype in inputs}


def resolve_target(name: str) -> Any:
    """'aten.view.default' -> torch.ops.aten.view.default; '_operator.getitem' -> operator.getitem."""
    parts = name.split(".")
    if len(parts) == 3 and parts[0] in ("aten", "braze", "prims"):
        import braze.ops  # noqa: F401  (registers braze::*)

        return getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def _check_kernel_interfaces(plan: Plan) -> None:
    """Each template step was lowered against its family's current launcher interface (KernelFamily.abi)."""
    for step in plan.steps:
        family = FAMILIES.get(step.launcher or "") if step.kind == "template" else None
        if family is None:
            continue
        have = int(step.params.get("abi", 1))
        if have != family.abi:
            raise PackageError(f"plan {plan.name!r}: step {step.outputs[0]} holds {family.name} kernels of interface "
                               f"{have}, this braze launches interface {family.abi}; recompile the package with this "
                               "braze")


class PlanExecutor:
    """Runs one plan on one device with a fixed set of weights."""

    def __init__(self, plan: Plan, weights: dict[str, torch.Tensor], device: torch.device, kernels: bool = True,
                 spec: DeviceSpec | None = None):
        """`spec` overrides the description launch configurations are chosen for (default: `device`'s); the
        cross-compiler runs a plan on CPU with a GPU target's spec to record the launches that target gets."""
        self.plan = plan
        self.device = device
        self.weights = weights
        self.user_inputs = [i for i in plan.inputs if i.kind == "user"]
        self.kernels: dict[str, Any] = {}
        self.buffers = {b.name: b for b in plan.buffers}
        self.shape_exprs = {b.name: [_Expr(s) for s in b.shape] for b in plan.buffers}
        self.stride_exprs = {b.name: [_Expr(s) for s in b.strides] for b in plan.buffers if b.strides}
        self.slot_exprs = [_Expr(s) for s in plan.slots]
        self.sym_exprs: dict[str, _Expr] = {}
        self.offset_exprs = {b.name: _Expr(b.offset) for b in plan.buffers if b.offset is not None}
        self.input_exprs = {i.name: [_Expr(s) for s in i.shape] for i in plan.inputs}
        self.step_exprs = [
            (_Expr(s.params["xnumel"]), _Expr(s.params["rnumel"])) if s.kind == "fused" else None for s in plan.steps
        ]
        self.targets = {i: resolve_target(s.target) for i, s in enumerate(plan.steps) if s.target}
        self.symbol_specs = {s.name: s for s in plan.symbols}
        self.stats = {"calls": 0, "launches": 0, "eager_ops": 0}
        self.spec = spec or device_spec(device)
        _check_kernel_interfaces(plan)
        self.workspace: dict[str, torch.Tensor] = {}
        self._init_workspace()
        # without kernels (the cross-compiler's dry run, GraphExecutor's checker) no kernel writes its outputs: they
        # are zeros, not whatever memory held, so an eager step that reads one (an index, a gather) gets valid
        # values (uninitialized int64 indices made BERT's dry run fail with an out-of-bounds index)
        self.zero_buffers = not kernels
        if kernels:
            check_interpreter_ready()

    def _init_workspace(self) -> None:
        """One buffer per key shared by the steps whose family asks for scratch (KernelFamily.workspace: the
        decode-layer blocks' accumulators and counters, kernels/decode_layer.py), zeroed and allocated here, so a
        call allocates and clears nothing (the kernels leave it at zero) and CUDA-graph replay keeps one address.
        Steps run one after another, so they can share it. Sized for the largest batch and, for other dims (the
        verify plan's draft nodes), up to WORKSPACE_DIM_CAP: a call beyond that grows it (_reserve)."""
        self.step_workspace: dict[int, list[str]] = {}
        self._workspace_need: dict[tuple, dict[str, int]] = {}
        self._retired: list[torch.Tensor] = []  # grown out of, kept alive: captured CUDA graphs may still use them
        for i, step in enumerate(self.plan.steps):
            family = FAMILIES.get(step.launcher or "") if step.kind == "template" else None
            if family is not None and type(family).workspace is not KernelFamily.workspace:
                self.step_workspace[i] = []
        if self.step_workspace:
            self._reserve({s.name: (s.upper if s.label == "batch" else min(s.upper or s.lower, WORKSPACE_DIM_CAP))
                           for s in self.plan.symbols})

    def _reserve(self, syms: dict[str, int]) -> None:
        """Grow the workspace to what the steps need at `syms` (a new largest shape only: a one-time allocation)."""
        key = tuple(sorted(syms.items()))
        need = self._workspace_need.get(key)
        if need is None:
            need = {}
            for i in self.step_workspace:
                step = self.plan.steps[i]
                shape = [e(syms) for e in self.shape_exprs[step.outputs[0]]]
                sizes = FAMILIES[step.launcher].workspace(step.params, self.spec, shape)
                self.step_workspace[i] = list(sizes)
                for k, n in sizes.items():
                    need[k] = max(need.get(k, 0), n)
            self._workspace_need[key] = need
        for k, n in need.items():
            have = self.workspace.get(k)
            if have is None or have.numel() < n:
                if have is not None:
                    self._retired.append(have)
                self.workspace[k] = torch.zeros(n, dtype=DTYPES[k.removeprefix("scratch_")], device=self.device)

    def _count_launch(self, launch: Any) -> None:
        self.stats["launches"] += 1

    def module(self, name: str) -> Any:
        if name not in self.kernels:
            self.kernels[name] = load_kernel_module(self.plan.kernels[name])
        return self.kernels[name]

    def kernel(self, name: str) -> Any:
        return getattr(self.module(name), name)

    def warm(self) -> None:
        for name in self.plan.kernels:
            self.module(name)

    # ---- inputs ------------------------------------------------------------------------------------
    def bind(self, inputs: list[torch.Tensor]) -> dict[str, int]:
        if len(inputs) != len(self.user_inputs):
            names = ", ".join(i.name for i in self.user_inputs)
            raise InputMismatchError(f"expected {len(self.user_inputs)} tensor inputs ({names}), got {len(inputs)}")
        syms: dict[str, int] = {}
        for spec, t in zip(self.user_inputs, inputs):
            if not isinstance(t, torch.Tensor):
                raise InputMismatchError(f"input '{spec.name}' must be a tensor, got {type(t).__name__}")
            if t.dim() != len(spec.shape):
                raise InputMismatchError(
                    f"input '{spec.name}' has {t.dim()} dims, expected {len(spec.shape)} (shape {spec.shape})")
            for d, expr in enumerate(spec.shape):
                if expr.isidentifier() and expr not in syms:
                    syms[expr] = int(t.shape[d])
        for name, value in syms.items():
            s = self.symbol_specs.get(name)
            if s and (value < s.lower or (s.upper is not None and value > s.upper)):
                where = next(f"input '{i.name}' dim {d}" for i in self.user_inputs
                             for d, e in enumerate(i.shape) if e == name)
                hi = "inf" if s.upper is None else s.upper
                label = f" ({s.label})" if s.label and not where.endswith(s.label.split(" of ")[0]) else ""
                raise ShapeOutOfRangeError(
                    f"{where}{label} = {value} is outside the compiled range [{s.lower}, {hi}]; recompile with a "
                    f"range that covers it (a causal LM: max_seq / max_batch; a module: dynamic_shapes)")
        for spec, t in zip(self.user_inputs, inputs):
            for d, expr in enumerate(self.input_exprs[spec.name]):
                want = expr(syms)
                if t.shape[d] != want:
                    raise InputMismatchError(f"input '{spec.name}' dim {d} is {t.shape[d]}, expected {want}")
            if str(t.dtype).removeprefix("torch.") != spec.dtype:
                raise InputMismatchError(
                    f"input '{spec.name}' has dtype {str(t.dtype).removeprefix('torch.')}, expected {spec.dtype}")
            if t.device.type != self.device.type:
                raise InputMismatchError(
                    f"input '{spec.name}' is on {t.device.type}, the compiled model runs on {self.device.type}")
        return syms

    def check_index_inputs(self, inputs: list[torch.Tensor | None]) -> None:
        """Ids that index an embedding table are rows of it. The gather kernels do not bound-check (a GPU would
        fault, the interpreter read garbage or crash) where eager PyTorch raises, so the API checks: one small
        reduction and, on a GPU, one sync per call. Plan-internal runs (decode steps) do not: their ids are the
        model's own tokens."""
        for spec, t in zip(self.user_inputs, inputs):
            if (spec.index_bound is None or not isinstance(t, torch.Tensor) or t.numel() == 0
                    or t.dtype.is_floating_point or t.device.type != self.device.type):
                continue  # nothing to check, or bind names what is wrong with the input
            low, high = (int(v) for v in torch.stack([t.min(), t.max()]).tolist())
            bad = low if low < 0 else high
            if low < 0 or high >= spec.index_bound:
                raise InputMismatchError(f"input '{spec.name}' holds id {bad}, outside the embedding table's rows "
                                         f"[0, {spec.index_bound})")

    # ---- execution ---------------------------------------------------------------------------------
    def _alloc(self, name: str, syms: dict[str, int], slots: list[torch.Tensor | None]) -> torch.Tensor:
        buf = self.buffers[name]
        shape = [e(syms) for e in self.shape_exprs[name]]
        dtype = DTYPES[buf.dtype]
        strides = [e(syms) for e in self.stride_exprs[name]] if name in self.stride_exprs else None
        if buf.slot is None:
            if strides:
                t = torch.empty_strided(shape, strides, dtype=dtype, device=self.device)
            else:
                t = torch.empty(shape, dtype=dtype, device=self.device)
            return t.zero_() if self.zero_buffers else t
        arena = slots[buf.slot]
        if arena is None:
            arena = torch.empty(self.slot_exprs[buf.slot](syms), dtype=torch.uint8, device=self.device)
            if self.zero_buffers:
                arena.zero_()
            slots[buf.slot] = arena
        numel = math.prod(shape)
        start = self.offset_exprs[name](syms) if name in self.offset_exprs else 0
        flat = arena[start: start + numel * dtype.itemsize].view(dtype)
        if strides:
            return flat.as_strided(shape, strides)
        return flat.view(shape)

    def _decode(self, a: Any, env: dict[str, Any], syms: dict[str, int]) -> Any:
        if isinstance(a, list):
            return [self._decode(x, env, syms) for x in a]
        if isinstance(a, dict):
            if "ref" in a:
                return env[a["ref"]]
            if "sym" in a:
                expr = self.sym_exprs.get(a["sym"])
                if expr is None:  # compiled once per expression, not per call
                    expr = self.sym_exprs[a["sym"]] = _Expr(a["sym"])
                return expr(syms)
            if "dtype" in a:
                return DTYPES[a["dtype"]]
            if "device" in a:
                return self.device
            if "memory_format" in a:
                return getattr(torch, a["memory_format"])
            if "layout" in a:
                return getattr(torch, a["layout"])
        return a

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        syms = self.bind(inputs)
        env: dict[str, Any] = dict(self.weights)
        for spec, t in zip(self.user_inputs, inputs):
            env[spec.name] = t.contiguous()
        slots: list[torch.Tensor | None] = [None] * len(self.slot_exprs)
        if self.step_workspace:
            self._reserve(syms)
        LAUNCH_HOOKS.append(self._count_launch)  # launches are counted where they happen, not predicted
        try:
            self._run_steps(env, syms, slots)
        except BaseException:
            for buf in self.workspace.values():  # a launch that stopped half way may have left tickets set
                buf.zero_()
            raise
        finally:
            LAUNCH_HOOKS.remove(self._count_launch)
        self.stats["calls"] += 1
        return [None if o is None else int(_Expr(o[1:])(syms)) if o.startswith("=") else env[o]
                for o in self.plan.outputs]

    def _run_steps(self, env: dict[str, Any], syms: dict[str, int], slots: list[torch.Tensor | None]) -> None:
        for i, step in enumerate(self.plan.steps):
            if step.kind == "fused":
                xexpr, rexpr = self.step_exprs[i]
                outs = [self._alloc(o, syms, slots) for o in step.outputs]
                env.update(zip(step.outputs, outs))
                args = [env[n] for n in step.inputs] + outs + [syms[s] for s in step.params["symbols"]]
                FUSED.launch_flat(self.kernel(step.kernel), args, xexpr(syms), rexpr(syms),
                                  step.params["reduction"], self.spec, bool(step.params.get("deterministic")),
                                  step.params.get("loads", 0))
            elif step.kind == "template":
                out = self._alloc(step.outputs[0], syms, slots)
                env[step.outputs[0]] = out
                tensors = {role: env[n] for role, n in zip(step.params["roles"], step.inputs)}
                if i in self.step_workspace:
                    tensors.update({f"workspace_{dtype}": self.workspace[dtype] for dtype in self.step_workspace[i]})
                FAMILIES[step.launcher].launch(self.module(step.kernel), step.kernel, tensors, out, step.params,
                                               self.spec)
            else:
                target = self.targets[i]
                args = self._decode(step.args, env, syms)
                kwargs = {k: self._decode(v, env, syms) for k, v in (step.kwargs or {}).items()}
                if step.kind == "view" and target in (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default):
                    target = torch.ops.aten.reshape.default  # our buffers may be laid out differently from eager's
                result = target(*args, **kwargs)
                if step.kind == "eager":
                    self.stats["eager_ops"] += 1
                    if isinstance(result, torch.Tensor):
                        result = result.contiguous()
                env[step.outputs[0]] = result
                for dim, symbol in step.params.get("binds", ()):  # a data-dependent size, known from now on
                    syms[symbol] = int(result) if dim < 0 else int(result.shape[dim])
            for name in step.free_after:
                env.pop(name, None)


class GraphExecutor:
    """The `reference` executor for a rewritten graph: torch reference implementations of the braze ops.

    Same interface as PlanExecutor (user_inputs, run, stats); it needs the in-memory graph, so packages
    (which hold plans only) cannot use it.
    """

    def __init__(self, graph_module: Any, weights: dict[str, torch.Tensor], plan: Plan):
        self.gm = graph_module
        self.weights = weights
        self.checker = PlanExecutor(plan, weights, torch.device("cpu"), kernels=False)
        self.user_inputs = self.checker.user_inputs
        self.stats = {"calls": 0, "launches": 0, "eager_ops": 0}

    def check_index_inputs(self, inputs: list[torch.Tensor]) -> None:
        self.checker.check_index_inputs(inputs)

    def bind(self, inputs: list[torch.Tensor]) -> dict[str, int]:
        self.checker.device = inputs[0].device if inputs else self.checker.device
        return self.checker.bind(inputs)

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.bind(inputs)
        users = dict(zip((i.name for i in self.user_inputs), inputs))
        args = [self.weights[n.name] if n.name in self.weights else users[n.name]
                for n in self.gm.graph.nodes if n.op == "placeholder"]
        with torch.no_grad():
            out = torch.fx.Interpreter(self.gm).run(*args)
        self.stats["calls"] += 1
        return list(out) if isinstance(out, (tuple, list)) else [out]
